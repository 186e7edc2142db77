"""Quantized layers of safetensors checkpoints: fp8 (BFL `weight_scale`, ComfyUI `comfy_quant` /
`_quantization_metadata`, legacy `scaled_fp8`) and ComfyUI's nvfp4, with the tensors that describe them."""

import json

import torch

from ..errors import CheckpointError
from ..quant.fp8 import Fp8Linear
from ..quant.linear import replace_module
from ..quant.nvfp4 import Nvfp4Linear

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
FORMATS = FP8_FORMATS + ("nvfp4",)
SCALE_NAMES = ("weight_scale", "scale_weight", "weight_scale_2", "input_scale", "scale_input", "pre_quant_scale")


def layer_formats(ckpt):
    """{layer: format} declared by ComfyUI's `<layer>.comfy_quant` markers or the `_quantization_metadata` header."""
    formats = {}
    header = ckpt.metadata.get("_quantization_metadata")
    if header:
        try:
            layers = json.loads(header)["layers"].items()
            formats.update({ckpt.strip(layer): conf.get("format") for layer, conf in layers})
        except (ValueError, KeyError, AttributeError, TypeError, RecursionError) as e:
            raise CheckpointError(f"{ckpt.path}: unreadable _quantization_metadata header ({e})") from None
    for key in ckpt.keys():
        if key.endswith(".comfy_quant"):
            if ckpt.dtype(key) != torch.uint8 or len(ckpt.shape(key)) != 1 or ckpt.shape(key)[0] > 4096:
                raise CheckpointError(f"{ckpt.path}: '{key}' is not a quantization marker (expected a short uint8 "
                                      f"string, found {ckpt.dtype(key)} {tuple(ckpt.shape(key))})")
            try:
                marker = json.loads(bytes(ckpt.get(key).tolist()).decode("utf-8"))
                formats[key[: -len(".comfy_quant")]] = marker["format"]
            except (ValueError, UnicodeDecodeError, TypeError, KeyError, RecursionError) as e:
                raise CheckpointError(f"{ckpt.path}: '{key}' is not a JSON quantization marker with a \"format\" "
                                      f"({type(e).__name__}: {e})") from None
    return formats


def find_quantized_layers(ckpt):
    """({layer: (format, {role: key})}, keys that only describe quantization) for every 2-D fp8 or marked nvfp4
    `.weight`. Roles: weight, weight_scale (None: unscaled fp8), input_scale, and for nvfp4 weight_scale_2 and
    pre_quant_scale."""
    formats = ckpt.quant_formats
    unsupported = {str(f) for f in formats.values() if f not in FORMATS}
    if unsupported:
        raise CheckpointError(f"{ckpt.path}: quantization format(s) {', '.join(sorted(unsupported))} are not "
                              f"supported (supported in safetensors: {', '.join(FORMATS)}; or use a GGUF file)")
    keys = set(ckpt.keys())
    scaled = any(k.endswith((".weight_scale", ".scale_weight")) for k in keys)
    layers = {}
    for key in keys:
        layer = key[: -len(".weight")]
        if not key.endswith(".weight") or (ckpt.dtype(key) not in FP8_DTYPES and formats.get(layer) != "nvfp4"):
            continue
        if formats.get(layer) is None and len(ckpt.shape(key)) != 2:
            continue  # an unmarked 1-D fp8 tensor (a norm) is plain data
        fmt = formats.get(layer, "fp8")

        def find(*names, required=True):
            found = next((f"{layer}.{name}" for name in names if f"{layer}.{name}" in keys), None)
            if found is None and required:
                raise CheckpointError(f"{ckpt.path}: '{key}' is {fmt} but has no {' or '.join(names)} beside it")
            return found

        # a file with no scale and no marker at all is how ComfyUI saves a model cast to fp8: scale 1
        roles = {"weight": key, "weight_scale": find("weight_scale", "scale_weight", required=scaled or layer in formats),
                 "input_scale": find("input_scale", "scale_input", required=False)}
        if fmt == "nvfp4":
            if ckpt.dtype(key) != torch.uint8:
                raise CheckpointError(f"{ckpt.path}: '{key}' is marked nvfp4 but stored as {ckpt.dtype(key)}, not uint8")
            roles.update(weight_scale_2=find("weight_scale_2"), pre_quant_scale=find("pre_quant_scale", required=False))
        elif roles["input_scale"] and roles["input_scale"].endswith("scale_input") and is_one(ckpt, roles["input_scale"]):
            roles["input_scale"] = None  # legacy scaled_fp8 files store 1.0 for "no static input scale"
        layers[layer] = (fmt, roles)
    described = {k for k in keys if k.endswith((".comfy_quant", "scaled_fp8"))}
    described |= {k for layer in layers for k in keys if k.startswith(layer + ".") and k.rsplit(".", 1)[1] in SCALE_NAMES}
    return layers, described


def is_one(ckpt, key):
    value = ckpt.get(key)
    return value.numel() == 1 and float(value) == 1.0


def install_quantized_layers(model, layers, ckpt, rename, compute_dtype, device):
    """Replace each quantized layer's nn.Linear (named by `rename(layer)`) with one holding the file's data."""
    for layer, (fmt, roles) in layers.items():
        name = rename(layer)
        tensor = {role: None if key is None else ckpt.get(key).to(device) for role, key in roles.items()}
        if fmt == "nvfp4":
            shape = model.get_submodule(name).weight.shape
            try:
                module = Nvfp4Linear(tensor["weight"], tensor["weight_scale"], tensor["weight_scale_2"], shape,
                                     tensor["pre_quant_scale"], compute_dtype)
            except ValueError as e:
                raise CheckpointError(f"{ckpt.path}: {layer}: {e}") from None
        else:
            scale = torch.ones(()) if tensor["weight_scale"] is None else tensor["weight_scale"].float()
            module = Fp8Linear(tensor["weight"], scale.to(device), tensor["input_scale"], compute_dtype)
        replace_module(model, name, module)


def describe(layers):
    """' (fp8, 20 layers)' style suffix for a model description."""
    counts = {}
    for fmt, _ in layers.values():
        kind = "nvfp4" if fmt == "nvfp4" else "fp8"
        counts[kind] = counts.get(kind, 0) + 1
    return "".join(f" ({kind}, {n} layers)" for kind, n in sorted(counts.items()))
