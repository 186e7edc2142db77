"""Weights prepacked for oneDNN, for bf16 and fp32 Linear layers computing on the CPU.

A bf16 matmul on the CPU reorders the whole weight into oneDNN's blocked layout on every call: at klein's shapes
that is 5-25% of the matmul; prepacked, the results are bit-identical. An fp32 matmul goes to MKL, which on AMD CPUs
runs at about half oneDNN's speed; prepacked, oneDNN sums in another order (results within ~1e-6 of the output's
scale, as any fp32 reordering). A layer keeps the reordered copy from its first CPU forward of at least MIN_ROWS
rows and reuses it. The copy is as large as the weight, so it is kept only while the memory available stays above
its size plus a reserve, and only by layers that run many times per image (`keep_packed`: the transformer's, not the
text encoder's, which run once per prompt); otherwise each call packs afresh (the same numbers, so fp32 results
never depend on free memory; in fp32 still oneDNN's speed). The original weight is untouched (a file-mapped one's
pages are no longer read, so the OS can reclaim them). `KLEIN_CPU_PREPACK=0` turns it off.
"""

import logging
import os

import psutil
import torch

log = logging.getLogger("klein_nodes")
RESERVE = 2 << 30  # bytes left free beyond a packed copy
PACKED_DTYPES = (torch.bfloat16, torch.float32)  # fp16: oneDNN needs AVX512-FP16 or AVX-NE-CONVERT for it
MIN_ROWS = 32  # matmuls of fewer rows (the modulation's one row per image) keep the plain path: little to gain there
_state = {"usable": None}  # None: not decided yet; False: switched off, or oneDNN refused once


def usable(dtype):
    if _state["usable"] is None:
        _state["usable"] = os.environ.get("KLEIN_CPU_PREPACK", "1") != "0" and torch.backends.mkldnn.is_available()
    return _state["usable"] and (dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packed_weight(layer, x):
    """`layer.weight` reordered for oneDNN when `layer(x)` is a plain bf16/fp32 CPU matmul without autograd, else None.
    Cached on the layer for this very weight (its storage, shape and, where tracked, version)."""
    weight = layer.weight
    rows = x.numel() // max(1, x.shape[-1])
    if (x.device.type != "cpu" or weight is None or weight.dtype not in PACKED_DTYPES or x.dtype != weight.dtype
            or weight.device.type != "cpu" or rows < MIN_ROWS or (torch.is_grad_enabled() and weight.requires_grad)
            or torch.compiler.is_compiling() or not usable(weight.dtype)):  # inductor packs weights its own way
        return None
    key = (weight.data_ptr(), tuple(weight.shape), tuple(weight.stride()), version(weight))
    cached = layer.__dict__.get("_prepacked")
    if cached is not None and cached[0] == key:
        return cached[1]
    layer.__dict__.pop("_prepacked", None)  # a changed weight: its old copy goes first
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
    except RuntimeError as e:  # a CPU or build oneDNN cannot serve: plain matmuls from now on
        log.warning("klein: CPU weight prepacking unavailable (%s); using plain matmuls", e)
        _state["usable"] = False
        return None
    if layer.keep_packed and psutil.virtual_memory().available >= weight.nbytes + RESERVE:
        layer.__dict__["_prepacked"] = (key, packed)
    # else packed for this call only: the same numbers as with a kept copy
    return packed


def version(tensor):
    """The tensor's in-place version counter; None for inference tensors (they have none: ComfyUI loads in
    inference mode), whose in-place changes the storage/shape key cannot see; nothing here writes weights in place."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def linear(layer, x, packed):
    """`F.linear(x, layer.weight, layer.bias)` with the prepacked weight (a contiguous input: strided inputs round
    differently in oneDNN)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, layer.bias, "none", [], "")

