"""FLUX.2 autoencoder (BFL `autoencoder.py` names): 32 latent channels, 2x2 patchify, batch-norm normalisation.

`encode` maps images in [-1, 1] to the normalised, patchified latents klein samples in (B, 128, H/16, W/16);
`decode` is its inverse. Tiled variants live in `sampling/tiling.py`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AutoEncoderParams:
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    decoder_ch: int = 128  # the "small decoder" release narrows only the decoder
    decoder_ch_mult: tuple = (1, 2, 4, 4)
    decoder_num_res_blocks: int = 3
    z_channels: int = 32
    norm_groups: int = 32
    bn_eps: float = 1e-4


class Normalize(nn.GroupNorm):
    """GroupNorm whose statistics can be supplied from outside (tiled runs share whole-image statistics)."""

    stats_hook = None

    def forward(self, x):
        if self.stats_hook is not None:
            return self.stats_hook(self, x)
        return super().forward(x)


def swish(x):
    return F.silu(x)


class AttnBlock(nn.Module):
    def __init__(self, in_channels, groups):
        super().__init__()
        self.norm = Normalize(groups, in_channels, eps=1e-6, affine=True)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x):
        """Single-head attention over all positions; the 1x1 convs run as linears on tokens (same maths)."""
        b, c, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = (F.linear(tokens, conv.weight.flatten(1), conv.bias)[:, None] for conv in (self.q, self.k, self.v))
        h = F.linear(F.scaled_dot_product_attention(q, k, v)[:, 0], self.proj_out.weight.flatten(1), self.proj_out.bias)
        # h first: the sum keeps h's channels-last layout, so later convs take the same kernels as diffusers'.
        return h.transpose(1, 2).reshape(b, c, height, width) + x


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, groups):
        super().__init__()
        self.norm1 = Normalize(groups, in_channels, eps=1e-6, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(groups, out_channels, eps=1e-6, affine=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class Downsample(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class Upsample(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, channels, groups):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + tuple(p.ch_mult)
        self.down = nn.ModuleList()
        for level, mult in enumerate(p.ch_mult):
            down = nn.Module()
            block_in, block_out = p.ch * in_ch_mult[level], p.ch * mult
            down.block = nn.ModuleList(
                ResnetBlock(block_in if i == 0 else block_out, block_out, p.norm_groups)
                for i in range(p.num_res_blocks))
            if level != len(p.ch_mult) - 1:
                down.downsample = Downsample(block_out)
            self.down.append(down)
        block_in = p.ch * p.ch_mult[-1]
        self.mid = Mid(block_in, p.norm_groups)
        self.norm_out = Normalize(p.norm_groups, block_in, eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, kernel_size=3, stride=1, padding=1)
        self.quant_conv = nn.Conv2d(2 * p.z_channels, 2 * p.z_channels, 1)

    def downsample_path(self, x):
        """conv_in and the down levels: the high-resolution part, local except for GroupNorm statistics."""
        h = self.conv_in(x)
        for down in self.down:
            for block in down.block:
                h = block(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        return h

    def head(self, h):
        """Mid block (global attention), output convs: runs at H/8, never tiled."""
        h = self.conv_out(swish(self.norm_out(self.mid(h))))
        return self.quant_conv(h)

    def forward(self, x):
        return self.head(self.downsample_path(x))


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        block_in = p.decoder_ch * p.decoder_ch_mult[-1]
        self.post_quant_conv = nn.Conv2d(p.z_channels, p.z_channels, 1)
        self.conv_in = nn.Conv2d(p.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = Mid(block_in, p.norm_groups)
        self.up = nn.ModuleList()
        for level in reversed(range(len(p.decoder_ch_mult))):
            up = nn.Module()
            block_out = p.decoder_ch * p.decoder_ch_mult[level]
            up.block = nn.ModuleList(
                ResnetBlock(block_in if i == 0 else block_out, block_out, p.norm_groups)
                for i in range(p.decoder_num_res_blocks))
            block_in = block_out
            if level != 0:
                up.upsample = Upsample(block_in)
            self.up.insert(0, up)
        self.norm_out = Normalize(p.norm_groups, block_in, eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, kernel_size=3, stride=1, padding=1)

    def head(self, z):
        """post_quant_conv, conv_in and the mid block (global attention): runs at H/8, never tiled."""
        return self.mid(self.conv_in(self.post_quant_conv(z)))

    def upsample_path(self, h):
        for up in reversed(self.up):
            for block in up.block:
                h = block(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))

    def forward(self, z):
        return self.upsample_path(self.head(z))


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.bn = nn.BatchNorm2d(4 * params.z_channels, eps=params.bn_eps, momentum=0.1, affine=False)
        self.bn.eval()

    @property
    def dtype(self):
        return self.encoder.conv_in.weight.dtype

    def normalize(self, moments):
        """Encoder moments (B, 2z, h, w) -> mean -> patchify -> batch-norm: (B, 4z, h/2, w/2)."""
        mean = patchify(moments[:, : self.params.z_channels])
        return ((mean - self.bn.running_mean.view(1, -1, 1, 1))
                / torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.bn.eps))

    def denormalize(self, z):
        """Inverse of `normalize` (without the moments): (B, 4z, h, w) -> (B, z, 2h, 2w)."""
        z = z * torch.sqrt(self.bn.running_var.view(1, -1, 1, 1) + self.bn.eps) + self.bn.running_mean.view(1, -1, 1, 1)
        return unpatchify(z)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1], H and W multiples of 16 -> fp32 normalised latents (B, 128, H/16, W/16)."""
        return self.normalize(self.encoder(x.to(self.dtype)).float())

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, 128, h, w) -> images (B, 3, 16h, 16w), about [-1, 1]."""
        return self.decoder(self.denormalize(z.float()).to(self.dtype))


def patchify(z):
    """(B, C, H, W) -> (B, 4C, H/2, W/2), channel c·4 + 2·row + col."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify(z):
    b, c, h, w = z.shape
    return z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)
