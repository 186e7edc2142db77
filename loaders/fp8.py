"""Which layers of a safetensors checkpoint are fp8, in every published convention, and their scale tensors."""

import json

import torch

from ..errors import CheckpointError
from ..quant.fp8 import Fp8Linear
from ..quant.linear import replace_module

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")


def layer_formats(ckpt):
    """{layer: format} declared by ComfyUI's `<layer>.comfy_quant` markers or the `_quantization_metadata` header."""
    formats = {}
    header = ckpt.metadata.get("_quantization_metadata")
    if header:
        try:
            formats.update({layer: conf.get("format") for layer, conf in json.loads(header)["layers"].items()})
        except (ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{ckpt.path}: unreadable _quantization_metadata header ({e})") from None
    for key in ckpt.keys():
        if key.endswith(".comfy_quant"):
            raw = bytes(ckpt.get(key).to(torch.uint8).tolist())
            try:
                formats[key[: -len(".comfy_quant")]] = json.loads(raw.decode("utf-8")).get("format")
            except (ValueError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{ckpt.path}: '{key}' is not a JSON quantization marker ({e})") from None
    return formats


def find_fp8_layers(ckpt):
    """({layer: (weight key, scale key, input scale key or None)}, keys that only describe quantization)."""
    formats = layer_formats(ckpt)
    unsupported = {f for f in formats.values() if f not in FP8_FORMATS}
    if unsupported:
        raise CheckpointError(f"{ckpt.path}: quantization format(s) {', '.join(sorted(map(str, unsupported)))} are not "
                              f"supported yet (supported in safetensors: {', '.join(FP8_FORMATS)}; or use a GGUF file)")
    keys = set(ckpt.keys())
    markers = {k for k in keys if k.endswith((".comfy_quant", "scaled_fp8"))}
    layers = {}
    for key in keys:
        if not key.endswith(".weight") or ckpt.dtype(key) not in FP8_DTYPES:
            continue
        layer = key[: -len(".weight")]
        scale = next((f"{layer}.{s}" for s in ("weight_scale", "scale_weight") if f"{layer}.{s}" in keys), None)
        if scale is None:
            raise CheckpointError(f"{ckpt.path}: '{key}' is fp8 but has no weight_scale (or scale_weight) beside it")
        input_scale = next((f"{layer}.{s}" for s in ("input_scale", "scale_input") if f"{layer}.{s}" in keys), None)
        if input_scale is not None and ckpt.dtype(input_scale) == torch.float32 and ckpt.get(input_scale).numel() == 1 \
                and float(ckpt.get(input_scale)) == 1.0 and input_scale.endswith("scale_input"):
            input_scale = None  # legacy scaled_fp8 files store 1.0 for "no static input scale"
        layers[layer] = (key, scale, input_scale)
    described = markers | {k for layer in layers for k in keys
                           if k.startswith(layer + ".") and k.rsplit(".", 1)[1] in ("weight_scale", "scale_weight",
                                                                                      "input_scale", "scale_input")}
    return layers, described


def install_fp8_layers(model, layers, ckpt, rename, compute_dtype, device):
    """Replace each fp8 layer's nn.Linear (named by `rename(layer)`) with an Fp8Linear holding the file's data."""
    for layer, (weight, scale, input_scale) in layers.items():
        replace_module(model, rename(layer), Fp8Linear(
            ckpt.get(weight).to(device),
            ckpt.get(scale).float().to(device),
            None if input_scale is None else ckpt.get(input_scale).float().to(device),
            compute_dtype))
