"""FLUX.2 transformer (klein 4B / 9B, base and distilled; tolerates the dev guidance input).

Block names and order follow BFL's flux2 `model.py` so BFL/ComfyUI state dicts load by name.
Shared modulation: three modulation heads run once per forward and every block of a kind reuses them.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KleinError
from .adapters import Linear, adapting
from .offload import Offloadable, weights_on

FP16_MAX = 65504.0


@dataclass(frozen=True)
class Flux2Params:
    """Defaults are klein 4B; loaders fill every field from the checkpoint's shapes."""

    in_channels: int = 128
    out_channels: int = 128
    context_in_dim: int = 7680
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 5
    depth_single_blocks: int = 20
    mlp_hidden_dim: int = 9216
    time_dim: int = 256
    axes_dim: tuple = (32, 32, 32, 32)
    theta: int = 2000
    use_guidance_embed: bool = False

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads


class Flux2(nn.Module):
    block_lists = ("double_blocks", "single_blocks")  # what memory streaming may move block by block

    def __init__(self, params: Flux2Params):
        super().__init__()
        if sum(params.axes_dim) != params.head_dim:
            raise ValueError(f"Got {list(params.axes_dim)} but expected positional dim {params.head_dim}")
        self.params = params
        hidden, mlp = params.hidden_size, params.mlp_hidden_dim
        self.pe_embedder = EmbedND(params.theta, params.axes_dim)
        self.img_in = Linear(params.in_channels, hidden, bias=False)
        self.time_in = MLPEmbedder(params.time_dim, hidden)
        self.guidance_in = MLPEmbedder(params.time_dim, hidden) if params.use_guidance_embed else None
        self.txt_in = Linear(params.context_in_dim, hidden, bias=False)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden, params.num_heads, mlp) for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden, params.num_heads, mlp) for _ in range(params.depth_single_blocks)
        )
        self.double_stream_modulation_img = Modulation(hidden, double=True)
        self.double_stream_modulation_txt = Modulation(hidden, double=True)
        self.single_stream_modulation = Modulation(hidden, double=False)
        self.final_layer = LastLayer(hidden, params.out_channels)

    @property
    def dtype(self):
        """The compute dtype: that of the float parameters (quantized layers compute in it too)."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @adapting
    def forward(self, x: torch.Tensor, x_ids: torch.Tensor, timesteps: torch.Tensor, ctx: torch.Tensor,
                ctx_ids: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """x (B,L,C) tokens, x_ids (B,L,4), timesteps (B,) sigma in [0,1], ctx (B,Lt,Ctx), ctx_ids (B,Lt,4)."""
        dtype = self.dtype
        x, ctx = x.to(dtype), ctx.to(dtype)
        timesteps = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        vec = self.time_in(timestep_embedding(timesteps, self.params.time_dim).to(dtype))
        if self.guidance_in is not None and guidance is not None:
            guidance = torch.as_tensor(guidance, device=x.device).reshape(-1).expand(x.shape[0])
            vec = vec + self.guidance_in(timestep_embedding(guidance, self.params.time_dim).to(dtype))
        mod_img = self.double_stream_modulation_img(vec)
        mod_txt = self.double_stream_modulation_txt(vec)
        mod_single = self.single_stream_modulation(vec)

        img = self.img_in(x)
        txt = self.txt_in(ctx)
        ids = torch.cat((batched_ids(ctx_ids, ctx.shape[0]), batched_ids(x_ids, x.shape[0])), dim=1)
        pe = self.pe_embedder(ids.to(x.device))

        for block in self.double_blocks:
            img, txt = block(img, txt, pe, mod_img, mod_txt)
        num_txt = txt.shape[1]
        hidden = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            hidden = block(hidden, pe, mod_single)
        return self.final_layer(hidden[:, num_txt:], vec)


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = Linear(dim, dim * 3, bias=False)
        self.norm = QKNorm(dim // num_heads)
        self.proj = Linear(dim, dim, bias=False)


class Modulation(nn.Module):
    def __init__(self, dim, double):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = Linear(dim, self.multiplier * dim, bias=False)

    def forward(self, vec):
        """(shift, scale, gate) triples, each (B,1,D): two for double blocks, one for single blocks."""
        chunks = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return tuple(chunks[i : i + 3] for i in range(0, self.multiplier, 3))


class LastLayer(nn.Module):
    def __init__(self, hidden_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(hidden_size, out_channels, bias=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden_size, 2 * hidden_size, bias=False))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear((1 + scale[:, None]) * self.norm_final(x) + shift[:, None])


class SiLUActivation(nn.Module):
    """SwiGLU gate: the first half of the fused projection gates the second (written into `out` when given)."""

    def forward(self, x, out=None):
        gate, up = x.chunk(2, dim=-1)
        return torch.mul(F.silu(gate), up, out=out)


class SingleStreamBlock(nn.Module):
    """Parallel block: one projection feeds attention and the MLP, one projection merges them."""

    def __init__(self, hidden_size, num_heads, mlp_hidden_dim):
        super().__init__()
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.mlp_hidden_dim = mlp_hidden_dim
        self.linear1 = Linear(hidden_size, hidden_size * 3 + mlp_hidden_dim * 2, bias=False)
        self.linear2 = Linear(hidden_size + mlp_hidden_dim, hidden_size, bias=False)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = SiLUActivation()

    def forward(self, x, pe, mod):
        (shift, scale, gate), = mod
        x_mod = modulated(self.pre_norm(x), shift, scale)
        qkv, mlp = self.linear1(x_mod).split((3 * self.hidden_size, 2 * self.mlp_hidden_dim), dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        # attention and MLP outputs written side by side into linear2's input (no concatenation copy)
        merged = x.new_empty(*x.shape[:-1], self.hidden_size + self.mlp_hidden_dim)
        attention(q, k, v, pe, out=merged[..., :self.hidden_size])
        self.mlp_act(mlp, out=merged[..., self.hidden_size:])
        return clamp_fp16(torch.addcmul(x, gate, self.linear2(merged)))


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_hidden_dim):
        super().__init__()
        self.num_heads = num_heads
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = nn.Sequential(
            Linear(hidden_size, mlp_hidden_dim * 2, bias=False),
            SiLUActivation(),
            Linear(mlp_hidden_dim, hidden_size, bias=False),
        )
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = nn.Sequential(
            Linear(hidden_size, mlp_hidden_dim * 2, bias=False),
            SiLUActivation(),
            Linear(mlp_hidden_dim, hidden_size, bias=False),
        )

    def forward(self, img, txt, pe, mod_img, mod_txt):
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = mod_img
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = mod_txt

        img_q, img_k, img_v = split_heads(self.img_attn.qkv(modulated(self.img_norm1(img), img_shift1, img_scale1)),
                                          self.num_heads)
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_v)
        txt_q, txt_k, txt_v = split_heads(self.txt_attn.qkv(modulated(self.txt_norm1(txt), txt_shift1, txt_scale1)),
                                          self.num_heads)
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v)

        q, k, v = (torch.cat(pair, dim=2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        attn = attention(q, k, v, pe)
        # 2-D rows into the projections: a (B, L, D) slice of the joint sequence makes matmul take its slow
        # batched path (bf16 on CPU: 1.9x the time of the same rows as a matrix)
        txt_attn, img_attn = (a.reshape(-1, a.shape[-1]) for a in attn.split((txt.shape[1], img.shape[1]), dim=1))

        img = torch.addcmul(img, img_gate1, self.img_attn.proj(img_attn).view(img.shape))
        img = clamp_fp16(torch.addcmul(img, img_gate2,
                                       self.img_mlp(modulated(self.img_norm2(img), img_shift2, img_scale2))))
        txt = torch.addcmul(txt, txt_gate1, self.txt_attn.proj(txt_attn).view(txt.shape))
        txt = clamp_fp16(torch.addcmul(txt, txt_gate2,
                                       self.txt_mlp(modulated(self.txt_norm2(txt), txt_shift2, txt_scale2))))
        return img, txt


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden_dim):
        super().__init__()
        self.in_layer = Linear(in_dim, hidden_dim, bias=False)
        self.silu = nn.SiLU()
        self.out_layer = Linear(hidden_dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.out_layer(self.silu(self.in_layer(x)))


class EmbedND(nn.Module):
    """RoPE angles for 4-axis ids (t, h, w, l): cos + i·sin as one complex64 tensor (B, 1, L, head_dim/2) on the CPU,
    where that is measured faster and bit-identical; elsewhere the pair (cos, sin) in fp32."""

    def __init__(self, theta, axes_dim):
        super().__init__()
        self.theta = theta
        self.axes_dim = tuple(axes_dim)

    def forward(self, ids):
        angles = torch.cat([rope(ids[..., i], dim, self.theta) for i, dim in enumerate(self.axes_dim)], dim=-1)
        cos, sin = angles.cos().float()[:, None], angles.sin().float()[:, None]
        return torch.complex(cos, sin) if ids.device.type == "cpu" else (cos, sin)


class RMSNorm(Offloadable, nn.Module):
    weight = bias = None  # ComfyUI's loaders read both (see models/offload.py); BFL names the weight `scale`

    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        with weights_on(self, x.device):
            # bf16/fp16 inputs are normalised in fp32 inside rms_norm (same result as converting first)
            return F.rms_norm(x, (x.shape[-1],), eps=1e-6) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


def split_heads(qkv, num_heads):
    """(B, L, 3·H·d) with layout (3, H, d) -> q, k, v each (B, H, L, d)."""
    batch, length, _ = qkv.shape
    return qkv.view(batch, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def attention(q, k, v, pe, out=None):
    """q, k, v (B, H, L, d) -> (B, L, H·d), written into `out` when given."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)  # contiguous; v too (a strided v: CPU SDPA ~5% slower)
    heads = F.scaled_dot_product_attention(q, k, v.contiguous()).transpose(1, 2)
    if out is None:
        return heads.flatten(2)
    out.unflatten(-1, heads.shape[-2:]).copy_(heads)
    return out


def rope(pos, dim, theta):
    """Angles pos·ω_j, ω_j = theta^(-2j/dim), in float64 (float32 where the device lacks it)."""
    freq_dtype = torch.float32 if pos.device.type in ("mps", "npu") else torch.float64
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=freq_dtype, device=pos.device) / dim)
    return pos.to(freq_dtype)[..., None] * omega


def apply_rope(x, pe):
    """Rotate interleaved pairs (x[2m], x[2m+1]) of each head by the RoPE angles, in fp32. With complex angles (see
    EmbedND) as one complex multiply (x₂ₘ + i·x₂ₘ₊₁)(cos + i·sin): the same products, sums and roundings in a third
    of the passes over memory."""
    if isinstance(pe, torch.Tensor):
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(pairs * pe).flatten(-2).to(x.dtype)
    cos, sin = pe
    x_even, x_odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((cos * x_even - sin * x_odd, sin * x_even + cos * x_odd), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def timestep_embedding(t, dim, max_period=10000, time_factor=1000.0):
    """Sinusoidal embedding of sigma·1000, cos half first, in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (time_factor * t.float())[:, None] * freqs[None]
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)


def batched_ids(ids, batch):
    ids = torch.as_tensor(ids)
    return (ids[None] if ids.ndim == 2 else ids).expand(batch, -1, -1)


def modulated(normed, shift, scale):
    """(1 + scale)·normed + shift in one pass (gated residuals likewise use addcmul: x + gate·y)."""
    return torch.addcmul(shift, normed, 1 + scale)


def clamp_fp16(x):
    return x.clamp(-FP16_MAX, FP16_MAX) if x.dtype == torch.float16 else x


def compile_blocks(model: Flux2, **options) -> Flux2:
    """`torch.compile` every double and single block in place (the first run compiles, later runs reuse the
    kernels; LoRA copies share the compiled blocks). `options` go to torch.compile, e.g. mode="max-autotune"."""
    if not isinstance(model, Flux2):
        raise KleinError(f"compile_blocks takes a klein transformer (kn.load_transformer), not {type(model).__name__}")
    for block in (*model.double_blocks, *model.single_blocks):
        block.compile(**options)
    return model
