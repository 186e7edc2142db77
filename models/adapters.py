"""LoRA-family adapters applied when a layer runs, never merged into the weights.

The base weights (bf16, fp8, GGUF, nvfp4) stay exactly as loaded and are shared: a model with adapters is a
shallow copy of the base model carrying `lora_layers` {layer name: [Adapter]}. For the duration of its forward the
adapters are attached to the shared layers; a LoRA adds two small matmuls (x·Aᵀ·Bᵀ) to the layer's output, a
LoKr / LoHa / full difference is rebuilt and added to the (dequantized) weight before the matmul, and a DoRA
rescales the rows (or columns) of W + ΔW to its stored magnitudes.
"""

import copy
import functools
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from . import prepacked
from .offload import Offloadable, weights_on


class Adapter:
    """One adapter on one layer: W[rows] += strength · scale · delta, `rows` a slice or an index (None: the whole
    layer). `kind` "lora" (tensors up, down; with `magnitude` a DoRA), "lokr" (w1 or w1_a·w1_b, w2 or w2_a·w2_b),
    "loha" (w1_a, w1_b, w2_a, w2_b) or "diff" (diff). A DoRA's strength interpolates between W and its result."""

    def __init__(self, kind, tensors, scale, rows=None, strength=1.0):
        self.kind, self.tensors, self.scale, self.rows, self.strength = kind, tensors, scale, rows, strength
        self.is_dora = "magnitude" in tensors
        self._placed = {}

    def scaled(self, strength):
        return Adapter(self.kind, self.tensors, self.scale, self.rows, self.strength * strength)

    def placed(self, key, make):
        """`make()`'s device copy under `key`, made once per run (see release_adapters)."""
        if key not in self._placed:
            self._placed[key] = make()
        return self._placed[key]

    def on(self, device, dtype):
        """The tensors on `device` in `dtype`."""
        return self.placed((device, dtype),
                           lambda: {n: t.to(device=device, dtype=dtype) for n, t in self.tensors.items()})

    def rows_on(self, device):
        """`rows` for indexing a tensor on `device` (an index tensor is copied there)."""
        if self.rows is None:
            return slice(None)
        if isinstance(self.rows, slice):
            return self.rows
        return self.placed(("rows", device), lambda: self.rows.to(device))

    def low_rank(self, device, dtype):
        """(down, up · scale · strength) as 2-D matrices on `device`, for x·downᵀ·upᵀ."""
        gain = self.scale * self.strength
        return self.placed(("low_rank", device, dtype), lambda: (
            self.tensors["down"].flatten(1).to(device=device, dtype=dtype),
            (self.tensors["up"].flatten(1) * gain).to(device=device, dtype=dtype)))

    def apply(self, weight):
        """`weight` (this adapter's rows, float32) with the adapter applied."""
        if not self.is_dora:
            return weight + self.delta(weight.device) * self.strength
        changed = weight + self.delta(weight.device)
        magnitude = self.on(weight.device, torch.float32)["magnitude"]
        per_row = magnitude.numel() == changed.shape[0]  # PEFT and LyCORIS' default; else one per input column
        norm = changed.norm(dim=1 if per_row else 0, keepdim=True)
        changed = changed * (magnitude.reshape(-1, 1) if per_row else magnitude.reshape(1, -1)) / norm.clamp_min(1e-12)
        return weight + self.strength * (changed - weight)

    def delta(self, device, dtype=torch.float32):
        """The full weight difference with the file's scale (not the strength), computed in `dtype`."""
        t = self.on(device, dtype)
        if self.kind == "lora":
            delta = t["up"].flatten(1) @ t["down"].flatten(1)
        elif self.kind == "lokr":
            delta = torch.kron(factor(t, "w1"), factor(t, "w2"))
        elif self.kind == "loha":
            delta = (t["w1_a"] @ t["w1_b"]) * (t["w2_a"] @ t["w2_b"])
        else:
            delta = t["diff"]
        return delta * self.scale

    def shape(self):
        """The (rows, columns) of the delta, from the tensor shapes alone."""
        t = self.tensors
        if self.kind == "lora":
            return t["up"].shape[0], t["down"].flatten(1).shape[1]
        if self.kind == "lokr":
            (a, b), (c, d) = factor_shape(t, "w1"), factor_shape(t, "w2")
            return a * c, b * d
        if self.kind == "loha":
            return t["w1_a"].shape[0], t["w1_b"].shape[1]
        return tuple(t["diff"].shape)


def factor(tensors, name):
    return tensors[name] if name in tensors else tensors[name + "_a"] @ tensors[name + "_b"]


def factor_shape(tensors, name):
    if name in tensors:
        return tuple(tensors[name].shape)
    return tensors[name + "_a"].shape[0], tensors[name + "_b"].shape[1]


class Linear(Offloadable, nn.Linear):
    """nn.Linear that honours the adapters attached to it for the current forward (and ComfyUI's offloading); on
    the CPU in bf16 and fp32 it multiplies with a prepacked copy of its weight, and where the CPU has no bf16/fp16
    matmul it computes in fp32 (models/prepacked.py)."""

    adapters = ()
    keep_packed = True  # see models/prepacked.py

    def forward(self, x):
        with weights_on(self, x.device):
            return linear_with_adapters(self, x, self.dense) if self.adapters else self.dense(x)

    def dense(self, x):
        packed = prepacked.packed_weight(self, x)
        if packed is not None:
            return prepacked.linear(self, x, packed)
        if prepacked.widens(self.weight.dtype, x):
            return prepacked.widened_linear(x, self.weight, self.bias)
        return super().forward(x)

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_prepacked", None)  # moved or converted weights: the packed copy is stale
        return super()._apply(fn, recurse)


def adapter_plan(layer, adapters, x):
    """How `layer` applies `adapters` to input `x`: (low-rank LoRAs run on the output, adapters added to the
    weight, the dtype they compute in, the output's dtype)."""
    in_weight = any(a.is_dora for a in adapters)  # a DoRA normalises the weight with every change in it
    low_rank = [a for a in adapters if a.kind == "lora" and not in_weight]
    full = [a for a in adapters if a.kind != "lora" or in_weight]
    dtype = out_dtype = layer.compute_dtype if hasattr(layer, "dequantized") else layer.weight.dtype
    if prepacked.widens(dtype, x):  # a half-precision layer on a CPU without such matmuls: all in fp32
        dtype, out_dtype = torch.float32, x.dtype
    return low_rank, full, dtype, out_dtype


def linear_with_adapters(layer, x, forward):
    """`layer(x)` with its adapters: full deltas are added to the weight, LoRAs run as x·Aᵀ·Bᵀ on the output of
    the layer's own `forward` (which may be a native fp8 matmul)."""
    low_rank, full, dtype, out_dtype = adapter_plan(layer, layer.adapters, x)
    dequantized = getattr(layer, "dequantized", None)
    x = x.to(dtype)
    if full:
        # dequantized: a fresh scratch buffer
        weight = dequantized(dtype) if dequantized else layer.weight.to(dtype, copy=True)
        for adapter in full:
            rows = adapter.rows_on(weight.device)
            weight[rows] = adapter.apply(weight[rows].float()).to(dtype)
        bias = getattr(layer, "bias", None)
        out = F.linear(x, weight, None if bias is None else bias.to(dtype))
    else:
        out = forward(x)
    for adapter in low_rank:
        down, up = adapter.low_rank(x.device, dtype)
        update = F.linear(F.linear(x, down), up)
        if adapter.rows is None:
            out += update  # in place; indexing would add a copy
        else:
            out[..., adapter.rows_on(out.device)] += update
    return out.to(out_dtype)


@contextmanager
def attached(model):
    """Attach `model.lora_layers` to their layers for the duration of a forward."""
    layers = [(model.get_submodule(name), adapters) for name, adapters in getattr(model, "lora_layers", {}).items()]
    for layer, adapters in layers:
        layer.adapters = adapters
    try:
        yield
    finally:
        for layer, _ in layers:
            del layer.adapters


def prepare_device(model, device, dtype):
    """Before `model` runs on `device` (inputs in `dtype`): what its forwards would otherwise copy there as they go
    (adapter tensors; dequantization tables and the Triton kernels' first-use check, through each layer's
    `prepare_device`), copied now: inside a sampling loop such a copy makes the host wait for the GPU."""
    place_adapters(model, device, dtype)
    for module in model.modules():
        if hasattr(module, "prepare_device"):
            module.prepare_device(device)


def place_adapters(model, device, dtype):
    """Copy `model`'s adapter tensors to `device` as its forwards (inputs in `dtype`) will use them."""
    probe = torch.empty(0, dtype=dtype, device=device)
    for name, adapters in getattr(model, "lora_layers", {}).items():
        low_rank, full, compute_dtype, _ = adapter_plan(model.get_submodule(name), adapters, probe)
        for adapter in low_rank:
            adapter.low_rank(device, compute_dtype)
            adapter.rows_on(device)
        for adapter in full:
            adapter.on(device, torch.float32)
            adapter.rows_on(device)


def release_adapters(model):
    """Drop the device copies of `model`'s adapters, made for a run (the loaded tensors stay), so a LoRA holds no
    GPU memory that ComfyUI's memory manager does not know about between runs."""
    for adapters in getattr(model, "lora_layers", {}).values():
        for adapter in adapters:
            adapter._placed.clear()


def adapting(forward):
    """Decorator for a model's forward: its adapters are attached while it runs."""

    @functools.wraps(forward)
    def run(model, *args, **kwargs):
        with attached(model):
            return forward(model, *args, **kwargs)

    return run


def with_adapters(model, layer_adapters, label):
    """A shallow copy of `model` sharing every weight, with `layer_adapters` added to the adapters it already has."""
    patched = copy.copy(model)
    patched._modules = dict(model._modules)  # its own registry of the shared submodules
    layers = {name: list(adapters) for name, adapters in getattr(model, "lora_layers", {}).items()}
    for name, adapters in layer_adapters.items():
        layers.setdefault(name, []).extend(adapters)
    patched.lora_layers = layers
    object.__setattr__(patched, "lora_base", getattr(model, "lora_base", model))  # not a submodule
    patched.lora_names = [*getattr(model, "lora_names", []), label]
    return patched
