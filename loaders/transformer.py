"""FLUX.2 transformer files -> `Flux2` modules (BFL/ComfyUI single file, diffusers folders)."""

import re
from pathlib import Path

import torch

from ..arguments import device_argument, dtype_argument, path_argument
from ..errors import CheckpointError, WrongModelError
from ..models.transformer import Flux2, Flux2Params
from ..quant.linear import fill_packed
from .checkpoint import (MODEL_PREFIXES, Checkpoint, TensorSource, check_state_dict, choose_dtype, is_gguf,
                         open_checkpoint, require, strip_prefix)
from .detect import identify
from .gguf import TRANSFORMER_ARCHS, GGUFFile
from .scaled import describe, find_quantized_layers, install_quantized_layers

# diffusers name -> BFL name (klein-spec §2.2); `{}` is the block index.
DIFFUSERS_GLOBAL = {
    "x_embedder.weight": "img_in.weight",
    "context_embedder.weight": "txt_in.weight",
    "time_guidance_embed.timestep_embedder.linear_1.weight": "time_in.in_layer.weight",
    "time_guidance_embed.timestep_embedder.linear_2.weight": "time_in.out_layer.weight",
    "time_guidance_embed.guidance_embedder.linear_1.weight": "guidance_in.in_layer.weight",
    "time_guidance_embed.guidance_embedder.linear_2.weight": "guidance_in.out_layer.weight",
    "double_stream_modulation_img.linear.weight": "double_stream_modulation_img.lin.weight",
    "double_stream_modulation_txt.linear.weight": "double_stream_modulation_txt.lin.weight",
    "single_stream_modulation.linear.weight": "single_stream_modulation.lin.weight",
    "proj_out.weight": "final_layer.linear.weight",
}
DIFFUSERS_DOUBLE = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.to_out.0.weight": "img_attn.proj.weight",
    "ff.linear_in.weight": "img_mlp.0.weight",
    "ff.linear_out.weight": "img_mlp.2.weight",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    "attn.to_add_out.weight": "txt_attn.proj.weight",
    "ff_context.linear_in.weight": "txt_mlp.0.weight",
    "ff_context.linear_out.weight": "txt_mlp.2.weight",
}
DIFFUSERS_FUSED_QKV = {
    "img_attn.qkv.weight": ("attn.to_q.weight", "attn.to_k.weight", "attn.to_v.weight"),
    "txt_attn.qkv.weight": ("attn.add_q_proj.weight", "attn.add_k_proj.weight", "attn.add_v_proj.weight"),
}
DIFFUSERS_SINGLE = {
    "attn.to_qkv_mlp_proj.weight": "linear1.weight",
    "attn.to_out.weight": "linear2.weight",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
}
DIFFUSERS_FINAL_MOD = "norm_out.linear.weight"
BFL_FINAL_MOD = "final_layer.adaLN_modulation.1.weight"


class Source:
    """How to build one BFL tensor: from source names, concatenated along dim 0, optionally half-swapped."""

    def __init__(self, names, swap_halves=False):
        self.names = tuple(names)
        self.swap_halves = swap_halves

    def shape(self, ckpt):
        shapes = [tuple(ckpt.shape(n)) for n in self.names]
        if len(shapes) == 1:
            return shapes[0]
        if any(not s or s[1:] != shapes[0][1:] for s in shapes):
            raise CheckpointError(f"{ckpt.path}: {', '.join(self.names)} of shapes {shapes} cannot be joined into one "
                                  "tensor.")
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def load(self, ckpt):
        tensors = [ckpt.get(n) for n in self.names]
        tensor = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
        if self.swap_halves:
            scale, shift = tensor.chunk(2, dim=0)
            tensor = torch.cat((shift, scale), dim=0)
        return tensor


def bfl_sources(keys, layout):
    """{BFL name: Source} plus the source names no BFL tensor uses."""
    if layout == "bfl":
        # ComfyUI re-saves QK-norm scales as `.weight`; accept both spellings.
        sources = {re.sub(r"_norm\.weight$", "_norm.scale", k): Source([k]) for k in keys}
        return sources, []
    sources, used = {}, set()
    for diffusers_name, bfl_name in DIFFUSERS_GLOBAL.items():
        if diffusers_name in keys:
            sources[bfl_name] = Source([diffusers_name])
    if DIFFUSERS_FINAL_MOD in keys:
        sources[BFL_FINAL_MOD] = Source([DIFFUSERS_FINAL_MOD], swap_halves=True)
    for index in block_indices(keys, "transformer_blocks"):
        prefix = f"transformer_blocks.{index}."
        for diffusers_name, bfl_name in DIFFUSERS_DOUBLE.items():
            if prefix + diffusers_name in keys:
                sources[f"double_blocks.{index}.{bfl_name}"] = Source([prefix + diffusers_name])
        for bfl_name, parts in DIFFUSERS_FUSED_QKV.items():
            if all(prefix + p in keys for p in parts):
                sources[f"double_blocks.{index}.{bfl_name}"] = Source([prefix + p for p in parts])
    for index in block_indices(keys, "single_transformer_blocks"):
        prefix = f"single_transformer_blocks.{index}."
        for diffusers_name, bfl_name in DIFFUSERS_SINGLE.items():
            if prefix + diffusers_name in keys:
                sources[f"single_blocks.{index}.{bfl_name}"] = Source([prefix + diffusers_name])
    for source in sources.values():
        used.update(source.names)
    return sources, sorted(set(keys) - used)


def block_indices(keys, prefix):
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def params_from_shapes(shapes, path):
    """Flux2Params read off the BFL-named shapes: widths from matrices, depths from key counts."""
    require(shapes, {"img_in.weight": 2, "txt_in.weight": 2, "time_in.in_layer.weight": 2,
                     "double_blocks.0.img_attn.norm.query_norm.scale": 1, "double_blocks.0.img_mlp.2.weight": 2,
                     "final_layer.linear.weight": 2}, path, "FLUX.2 transformer")
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    if hidden % head_dim or head_dim % 8:
        raise CheckpointError(f"{path}: hidden size {hidden} is not a multiple of the head size {head_dim} "
                              "(or it is not a multiple of 8).")
    time_dim, out_channels = shapes["time_in.in_layer.weight"][1], shapes["final_layer.linear.weight"][0]
    if time_dim % 2:  # the sinusoidal timestep embedding has an even width
        raise CheckpointError(f"{path}: 'time_in.in_layer.weight' has shape {tuple(shapes['time_in.in_layer.weight'])}"
                              f"; its {time_dim} inputs must be an even number (cos and sin halves): a damaged file.")
    if out_channels != in_channels:  # the model predicts the velocity of its own input latent
        raise CheckpointError(f"{path}: 'img_in.weight' takes {in_channels} latent channels but "
                              f"'final_layer.linear.weight' gives {out_channels}; a FLUX.2 transformer returns as many "
                              "as it takes: a damaged file.")
    return Flux2Params(
        in_channels=in_channels,
        out_channels=out_channels,
        context_in_dim=shapes["txt_in.weight"][1],
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=len(block_indices(shapes, "double_blocks")),
        depth_single_blocks=len(block_indices(shapes, "single_blocks")),
        mlp_hidden_dim=shapes["double_blocks.0.img_mlp.2.weight"][1],
        time_dim=time_dim,
        axes_dim=(head_dim // 4,) * 4,
        use_guidance_embed="guidance_in.in_layer.weight" in shapes,
    )


def check_dtypes(path, ckpt, sources, quantized_weights=()):
    for source in sources.values():
        for name in source.names:
            dtype = ckpt.dtype(name)
            if name in quantized_weights or dtype.is_floating_point:
                continue
            raise CheckpointError(f"{path}: '{name}' has dtype {dtype}; transformer weights must be F32/F16/BF16, "
                                  "or fp8 (scaled or not), or nvfp4 with its comfy_quant marker.")


def load_transformer(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Flux2:
    """Load a FLUX.2 [klein] transformer from a BFL/ComfyUI file, a diffusers folder or a GGUF file.

    Built on the meta device and filled with the file's own (memory-mapped) tensors, so the weights exist
    once. `dtype=None` keeps the file's dtype (for fp8 and GGUF files: bf16 compute).
    """
    path, dtype, device = path_argument(path), dtype_argument(dtype), device_argument(device)
    if is_gguf(path):
        return load_gguf_transformer(path, dtype, device)
    return build_transformer(open_checkpoint(path, "transformer", "diffusion_pytorch_model", MODEL_PREFIXES),
                             dtype, device)


def transformer_from_state_dict(tensors, label, dtype=None):
    """A transformer over tensors already in memory (BFL or diffusers names), sharing them where dtypes allow;
    `label` names them in messages."""
    device = next(iter(tensors.values())).device if tensors else "cpu"
    return build_transformer(Checkpoint([TensorSource(tensors, label)], label, MODEL_PREFIXES), dtype, device)


def build_transformer(ckpt, dtype, device):
    path = ckpt.path
    kind = identify(ckpt.shapes())
    if kind.kind != "transformer" or kind.family != "flux2":
        raise WrongModelError(f"{path}: this is {kind.description}, not a FLUX.2 klein transformer.{slot_hint(kind)}")
    quantized, described = find_quantized_layers(ckpt)
    if quantized and kind.layout != "bfl":
        raise CheckpointError(f"{path}: fp8/nvfp4 weights are read from BFL/ComfyUI single files, "
                              "not diffusers folders.")
    sources, unused = bfl_sources([k for k in ckpt.keys() if k not in described], kind.layout)
    shapes = {name: source.shape(ckpt) for name, source in sources.items()}
    params = params_from_shapes(shapes, path)
    with torch.device("meta"):
        model = Flux2(params)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(path, "a FLUX.2 transformer", expected, shapes, unused)
    quantized_weights = {roles["weight"] for _, roles in quantized.values()}
    check_dtypes(path, ckpt, sources, quantized_weights)
    plain = {name: source for name, source in sources.items() if source.names[0] not in quantized_weights}
    dtype = choose_dtype(ckpt, [n for s in plain.values() for n in s.names], dtype)
    install_quantized_layers(model, quantized, ckpt, lambda layer: layer, dtype, device)
    state = {name: source.load(ckpt).to(device=device, dtype=dtype) for name, source in plain.items()}
    model.load_state_dict(state, strict=False, assign=True)
    model.requires_grad_(False).eval()
    model.description = kind.description + describe(quantized)
    return model


def load_gguf_transformer(path, dtype, device):
    file = GGUFFile(path)
    arch = file.field("general.architecture", "") or ""
    names = {strip_prefix(name, MODEL_PREFIXES): name for name in file.tensors}
    shapes = {new: file.tensors[old][1] for new, old in names.items()}
    kind = identify(shapes)
    if arch not in TRANSFORMER_ARCHS or (kind.kind, kind.family) != ("transformer", "flux2"):
        what = f"a '{arch}' model" if arch not in TRANSFORMER_ARCHS else kind.description
        raise WrongModelError(f"{path}: this GGUF holds {what}, not a FLUX.2 klein transformer.")
    names = {re.sub(r"_norm\.weight$", "_norm.scale", k): v for k, v in names.items()}
    shapes = {new: file.tensors[old][1] for new, old in names.items()}
    params = params_from_shapes(shapes, path)
    with torch.device("meta"):
        model = Flux2(params)
    check_state_dict(path, "a FLUX.2 transformer", {k: v.shape for k, v in model.state_dict().items()}, shapes)
    file.check_model(names, model)
    compute_dtype = dtype or torch.bfloat16
    model = fill_packed(model, file.load(names, compute_dtype, device), compute_dtype)
    model.description = kind.description + f" (GGUF, {file.summary()})"
    return model


def slot_hint(kind):
    if kind.kind == "text_encoder":
        return " Load it in the text encoder slot (kn.load_text_encoder / Klein Load Text Encoder)."
    if kind.kind == "vae":
        return " Load it in the VAE slot (kn.load_vae / Klein Load VAE)."
    if kind.family == "flux1":
        return (" FLUX.1 models use a different architecture; use a FLUX.2 [klein] file such as "
                "flux-2-klein-4b.safetensors.")
    return " Expected a file such as flux-2-klein-4b.safetensors or a diffusers 'transformer/' folder."
