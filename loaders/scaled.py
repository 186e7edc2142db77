"""Quantized layers of safetensors checkpoints: fp8 (BFL `weight_scale`, ComfyUI `comfy_quant` /
`_quantization_metadata`, legacy `scaled_fp8`) and ComfyUI's nvfp4, with the tensors that describe them.
QUANT_FORMATS is the one table of these formats: how each is stored, marked and described, and its layer."""

import json
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CheckpointError
from ..quant.fp8 import Fp8Linear, fp8_problem
from ..quant.linear import replace_module
from ..quant.nvfp4 import Nvfp4Linear, nvfp4_problem



@dataclass(frozen=True)
class QuantFormat:
    kind: str  # in descriptions and `inspect`: fp8 | nvfp4
    stored: torch.dtype  # the weight's dtype in the file
    storage: str  # the same, as safetensors headers spell it
    values_per_element: int  # logical weight values per stored element (nvfp4: two 4-bit values per byte)
    marked_only: bool  # recognised by its marker alone (a uint8 weight is not quantized by itself)
    extra_roles: dict  # tensors beside the weight and its scale: {role: required}
    build: object  # (tensors by role, logical shape, compute dtype) -> the layer
    check: object  # (tensors by role, logical shape) -> why they cannot form the layer, or None; meta tensors do


def fp8_layer(tensor, shape, compute_dtype):
    scale = torch.ones(()) if tensor["weight_scale"] is None else tensor["weight_scale"].float()
    return Fp8Linear(tensor["weight"], scale.to(tensor["weight"].device), tensor["input_scale"], compute_dtype)


def fp8_check(tensor, shape):
    if tuple(tensor["weight"].shape) != tuple(shape):
        return f"the fp8 weight has shape {tuple(tensor['weight'].shape)}; the layer needs {tuple(shape)}"
    return fp8_problem(tensor["weight"], tensor["weight_scale"], tensor["input_scale"])


def nvfp4_check(tensor, shape):
    return nvfp4_problem(tensor["weight"], tensor["weight_scale"], tensor["weight_scale_2"], shape,
                         tensor["pre_quant_scale"])


def nvfp4_layer(tensor, shape, compute_dtype):
    return Nvfp4Linear(tensor["weight"], tensor["weight_scale"], tensor["weight_scale_2"], shape,
                       tensor["pre_quant_scale"], compute_dtype)


# keyed by the name ComfyUI's markers use (an unmarked fp8 weight is found by its dtype)
QUANT_FORMATS = {
    "float8_e4m3fn": QuantFormat("fp8", torch.float8_e4m3fn, "F8_E4M3", 1, False, {}, fp8_layer, fp8_check),
    "float8_e5m2": QuantFormat("fp8", torch.float8_e5m2, "F8_E5M2", 1, False, {}, fp8_layer, fp8_check),
    "nvfp4": QuantFormat("nvfp4", torch.uint8, "U8", 2, True, {"weight_scale_2": True, "pre_quant_scale": False},
                         nvfp4_layer, nvfp4_check),
}
BY_DTYPE = {f.stored: name for name, f in QUANT_FORMATS.items() if not f.marked_only}
SCALE_NAMES = ("weight_scale", "scale_weight", "weight_scale_2", "input_scale", "scale_input", "pre_quant_scale")


def values_per_element(fmt):
    """Logical weight values per stored element of a layer marked `fmt` (None: unmarked)."""
    spec = QUANT_FORMATS.get(fmt)
    return 1 if spec is None else spec.values_per_element


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
    """({layer: (QUANT_FORMATS key, {role: key})}, keys that only describe quantization) for every 2-D fp8 or
    marked nvfp4 `.weight`. Roles: weight, weight_scale (None: unscaled fp8), input_scale, and the format's
    extra_roles (nvfp4: weight_scale_2, pre_quant_scale)."""
    formats = ckpt.quant_formats
    unsupported = {str(f) for f in formats.values() if f not in QUANT_FORMATS}
    if unsupported:
        raise CheckpointError(f"{ckpt.path}: quantization format(s) {', '.join(sorted(unsupported))} are not "
                              f"supported (supported in safetensors: {', '.join(QUANT_FORMATS)}; or use a GGUF file)")
    keys = set(ckpt.keys())
    scaled = any(k.endswith((".weight_scale", ".scale_weight")) for k in keys)
    layers = {}
    for key in keys:
        layer = key[: -len(".weight")]
        marked = formats.get(layer)
        by_marker = marked is not None and QUANT_FORMATS[marked].marked_only
        if not key.endswith(".weight") or (ckpt.dtype(key) not in BY_DTYPE and not by_marker):
            continue
        if marked is None and len(ckpt.shape(key)) != 2:
            continue  # an unmarked 1-D fp8 tensor (a norm) is plain data
        name = marked if by_marker else BY_DTYPE[ckpt.dtype(key)]
        spec, fmt = QUANT_FORMATS[name], marked or QUANT_FORMATS[name].kind  # fmt: as messages name it

        def find(*names, required=True):
            found = next((f"{layer}.{name}" for name in names if f"{layer}.{name}" in keys), None)
            if found is None and required:
                raise CheckpointError(f"{ckpt.path}: '{key}' is {fmt} but has no {' or '.join(names)} beside it")
            return found

        # a file with no scale and no marker at all is how ComfyUI saves a model cast to fp8: scale 1
        roles = {"weight": key,
                 "weight_scale": find("weight_scale", "scale_weight", required=scaled or layer in formats),
                 "input_scale": find("input_scale", "scale_input", required=False)}
        if spec.marked_only:
            if ckpt.dtype(key) != spec.stored:
                raise CheckpointError(f"{ckpt.path}: '{key}' is marked {name} but stored as {ckpt.dtype(key)}, "
                                      f"not {str(spec.stored).removeprefix('torch.')}")
            roles.update({role: find(role, required=required) for role, required in spec.extra_roles.items()})
        elif (roles["input_scale"] and roles["input_scale"].endswith("scale_input")
              and is_one(ckpt, roles["input_scale"])):
            roles["input_scale"] = None  # legacy scaled_fp8 files store 1.0 for "no static input scale"
        layers[layer] = (name, roles)
    described = {k for k in keys if k.endswith((".comfy_quant", "scaled_fp8"))}
    described |= {k for layer in layers for k in keys
                  if k.startswith(layer + ".") and k.rsplit(".", 1)[1] in SCALE_NAMES}
    return layers, described


def is_one(ckpt, key):
    value = ckpt.get(key)
    return value.numel() == 1 and float(value) == 1.0


def check_quantized_layers(model, layers, ckpt, rename):
    """Before any data is read: each quantized layer must replace an nn.Linear of `model` (built on the meta device),
    with tensors whose shapes and dtypes its format accepts (the same checks the layers make, on meta tensors)."""
    for layer, (fmt, roles) in layers.items():
        name = rename(layer)
        try:
            target = model.get_submodule(name)
        except AttributeError:
            target = None
        if not isinstance(target, nn.Linear):
            raise CheckpointError(f"{ckpt.path}: '{roles['weight']}' is stored as {fmt}, but only the weights of "
                                  "linear layers may be quantized: a damaged file, or not a model this loader reads.")
        meta = {role: None if key is None else torch.empty(ckpt.stored_shape(key), dtype=ckpt.dtype(key),
                                                           device="meta") for role, key in roles.items()}
        problem = QUANT_FORMATS[fmt].check(meta, tuple(target.weight.shape))
        if problem:
            raise CheckpointError(f"{ckpt.path}: {layer}: {problem}")


def install_quantized_layers(model, layers, ckpt, rename, compute_dtype, device):
    """Replace each quantized layer's nn.Linear (named by `rename(layer)`) with one holding the file's data."""
    check_quantized_layers(model, layers, ckpt, rename)
    for layer, (fmt, roles) in layers.items():
        name = rename(layer)
        tensor = {role: None if key is None else ckpt.get(key).to(device) for role, key in roles.items()}
        try:
            module = QUANT_FORMATS[fmt].build(tensor, model.get_submodule(name).weight.shape, compute_dtype)
        except ValueError as e:
            raise CheckpointError(f"{ckpt.path}: {layer}: {e}") from None
        replace_module(model, name, module)


def describe(layers):
    """' (fp8, 20 layers)' style suffix for a model description."""
    counts = {}
    for fmt, _ in layers.values():
        kind = QUANT_FORMATS[fmt].kind
        counts[kind] = counts.get(kind, 0) + 1
    return "".join(f" ({kind}, {n} layers)" for kind, n in sorted(counts.items()))
