"""CPU matmuls for bf16/fp16 and fp32 Linear layers: oneDNN-prepacked weights, and half-precision layers computed in
fp32 on CPUs without half-precision matmuls.

A bf16 matmul on the CPU reorders the whole weight into oneDNN's blocked layout on every call: at klein's shapes
that is 5-25% of the matmul; prepacked, the results are bit-identical. An fp32 matmul goes to MKL, which on AMD CPUs
with AVX-512 runs at about half oneDNN's speed; prepacked, oneDNN sums in another order (results within ~1e-6 of the
output's scale, as any fp32 reordering). A layer keeps the reordered copy from its first CPU forward of at least
MIN_ROWS rows and reuses it. The copy is as large as the weight, so it is kept only while the memory available stays
above its size plus a reserve, and only by layers that run many times per image (`keep_packed`: the transformer's,
not the text encoder's, which run once per prompt); otherwise each call packs afresh (the same numbers, so fp32
results never depend on free memory; in fp32 still oneDNN's speed). The original weight is untouched (a file-mapped
one's pages are no longer read, so the OS can reclaim them).

Where oneDNN has no bf16 (fp16) matmul on this CPU (`torch.ops.mkldnn._is_mkldnn_bf16_supported()` False: CPUs
without AVX-512, such as AMD Zen 2/3), torch's bf16 matmul falls back to a kernel 5-8x slower than fp32. There a
half-precision layer `widens`: for a call of WIDEN_MIN_ROWS rows or more its weight is converted to fp32 a few rows
at a time (PIECE_BYTES) into a buffer every layer reuses, each piece multiplied by torch's fp32 BLAS while in cache
and written into the output, in the input's dtype. That runs at the speed of weights kept in fp32 (on these CPUs
MKL's fp32 matmul is as fast as a oneDNN-packed one, without the reorder) with the memory of the half-precision
weights plus a few MB (a whole layer's fp32 copy per call would add up to 340 MB at klein 4B's widths, and its fresh
allocation cost 3x the conversion in page faults). The text encoder keeps its activations in fp32 there too
(models/text_encoder.py), as ComfyUI's own does on a CPU; quantized layers dequantize to fp32 (quant/linear.py).

`KLEIN_CPU_PREPACK=0` turns both off: torch's own matmul in the weights' dtype.
"""

import logging
import os
import threading

import psutil
import torch
import torch.nn.functional as F

log = logging.getLogger("klein_nodes")
RESERVE = 2 << 30  # bytes left free beyond a packed copy
PACKED_DTYPES = (torch.bfloat16, torch.float32)  # fp16: oneDNN needs AVX512-FP16 or AVX-NE-CONVERT for it
HALF_DTYPES = (torch.bfloat16, torch.float16)
MIN_ROWS = 32  # matmuls of fewer rows (the modulation's one row per image) keep the plain path: little to gain there
WIDEN_MIN_ROWS = 16  # below, converting the weight costs more than the half-precision matmul saves (~10 rows here)
PIECE_BYTES = 8 << 20  # fp32 weight rows converted at a time (cache-sized: 3-5% faster than whole layers here)
_state = {"enabled": None, "onednn": None, "native": {}}  # None: not decided yet; onednn False: refused once
_scratch = threading.local()


def enabled():
    """KLEIN_CPU_PREPACK is not 0 (read once)."""
    if _state["enabled"] is None:
        _state["enabled"] = os.environ.get("KLEIN_CPU_PREPACK", "1") != "0"
    return _state["enabled"]


def native(dtype):
    """oneDNN multiplies `dtype` natively on this CPU: fp32 always, bf16/fp16 where the CPU has the instructions."""
    known = _state["native"]
    if dtype not in known:
        check = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
        try:
            known[dtype] = check is None or bool(getattr(torch.ops.mkldnn, check)())
        except (AttributeError, RuntimeError):  # a torch build without oneDNN
            known[dtype] = False
    return known[dtype]


def usable(dtype):
    """Weights of `dtype` can be prepacked for oneDNN on this CPU."""
    if _state["onednn"] is None:
        _state["onednn"] = torch.backends.mkldnn.is_available()
    return enabled() and _state["onednn"] and dtype in PACKED_DTYPES and native(dtype)


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
        _state["onednn"] = False
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


def describe():
    """How bf16 layers compute on this CPU, in words (for `doctor` and the benches)."""
    if not enabled():
        return "bf16 layers: torch's own bf16 matmul (KLEIN_CPU_PREPACK=0)"
    if native(torch.bfloat16):
        return "bf16 layers: oneDNN bf16 matmul, weights prepacked"
    return "bf16 layers: widened to fp32 per call (this CPU's oneDNN has no bf16 matmul)"


def compute_dtype(dtype, device):
    """The dtype layers of `dtype` on `device` compute in: fp32 for half-precision layers on a CPU oneDNN has no such
    matmul for (they widen), else `dtype`."""
    if (dtype in HALF_DTYPES and torch.device(device).type == "cpu" and enabled() and not native(dtype)
            and not torch.compiler.is_compiling()):
        return torch.float32
    return dtype


def widens(dtype, x):
    """A layer computing in `dtype` computes in fp32 for input `x` (in that dtype or in fp32)."""
    return x.dtype in (dtype, torch.float32) and compute_dtype(dtype, x.device) != dtype


def scratch(numel, dtype, device):
    """A buffer of this thread reused by every layer that needs one on this device/dtype (layers run one at a time):
    quantized weights dequantized for a call, half-precision weights widened to fp32."""
    buffers = _scratch.__dict__
    key = (torch.device(device), dtype)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffers.pop(key, None)  # the old one goes before the larger one comes
        with torch.inference_mode(False):  # a normal tensor: inference mode and no_grad may both write it
            buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def release_scratch():
    """Drop this thread's shared buffers (a model's turn is over: the next model's layers make their own)."""
    _scratch.__dict__.clear()


def few_rows(x):
    """Too few rows to widen for: the half-precision matmul costs less than converting the weight."""
    return x.numel() // max(1, x.shape[-1]) < WIDEN_MIN_ROWS


def widened_linear(x, weight, bias=None):
    """`F.linear(x, weight, bias)` for a half-precision `weight` that `widens`: computed in fp32 and returned in x's
    dtype (x in the weight's dtype or fp32). The weight is converted PIECE_BYTES of rows at a time into a buffer that
    every layer reuses, each piece multiplied while in cache and written into the output: faster than converting the
    whole weight (a fresh 100 MB allocation per call costs 3x the conversion in page faults), and the memory beyond
    the weights stays a few MB. Under autograd, a plain fp32 copy it can keep."""
    if few_rows(x):
        return F.linear(x.to(weight.dtype), weight, bias).to(x.dtype)
    if torch.is_grad_enabled():
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    step = min(out_features, max(64, PIECE_BYTES // (4 * in_features) // 64 * 64))
    inputs = x.reshape(rows, in_features).float()
    bias = None if bias is None else bias.float()
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    buffer = scratch(step * (in_features + rows), torch.float32, x.device)
    for start in range(0, out_features, step):
        size = min(step, out_features - start)
        piece = buffer[:size * in_features].view(size, in_features).copy_(weight[start:start + size])
        product = buffer[size * in_features:size * (in_features + rows)].view(rows, size)
        if bias is None:
            torch.mm(inputs, piece.t(), out=product)
        else:
            torch.addmm(bias[start:start + size], inputs, piece.t(), out=product)
        out[:, start:start + size] = product
    return out.view(*x.shape[:-1], out_features)
