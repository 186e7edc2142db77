"""Triton dequantization kernels for the hot GGML types (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K).

Each program turns `GROUP` blocks into a (GROUP, block size) tile: every output element computes the byte offsets
of its codes and scales and gathers them. The float32 operations and their order are those of `dequant.py`
(and so of gguf-py); fp contraction is disabled so the GPU does not fuse a multiply and a subtract into one
rounding. Imported only when a kernel is wanted (CUDA, or Triton's CPU interpreter in tests).
"""

import triton
import triton.language as tl

GROUP = tl.constexpr(16)  # GGML blocks per program


@triton.jit
def _half(ptr):
    """The little-endian fp16 at `ptr` (and ptr + 1), as float32."""
    bits = tl.load(ptr).to(tl.uint16) | (tl.load(ptr + 1).to(tl.uint16) << 8)
    return bits.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _tile(n_blocks, TYPE_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    """(block index column, element index row, mask, byte offset of each block) for this program's tile."""
    block = tl.program_id(0) * GROUP + tl.arange(0, GROUP)[:, None]
    element = tl.arange(0, BLOCK)[None, :]
    mask = (block < n_blocks) & (element < BLOCK)
    return block, element, mask, block.to(tl.int64) * TYPE_SIZE


@triton.jit
def _store(out_ptr, block, element, mask, value, BLOCK: tl.constexpr):
    # float32 -> bf16/fp16 rounds to nearest even, as torch's .to() does
    tl.store(out_ptr + block.to(tl.int64) * BLOCK + element, value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def q8_0_kernel(src, out_ptr, n_blocks):
    block, element, mask, base = _tile(n_blocks, 34, 32)
    d = _half(src + base)
    q = tl.load(src + base + 2 + element, mask=mask).to(tl.int8, bitcast=True)
    _store(out_ptr, block, element, mask, q.to(tl.float32) * d, 32)


@triton.jit
def q4_0_kernel(src, out_ptr, n_blocks):
    block, element, mask, base = _tile(n_blocks, 18, 32)
    d = _half(src + base)
    byte = tl.load(src + base + 2 + element % 16, mask=mask)
    q = ((byte >> (4 * (element // 16)).to(tl.uint8)) & 0xF).to(tl.int8) - 8
    _store(out_ptr, block, element, mask, q.to(tl.float32) * d, 32)


@triton.jit
def _k_scale_min(src, base, sub, mask):
    """The 6-bit scale and min of sub-block `sub` (0-7) from the 12 packed bytes at base + 4 (Q4_K / Q5_K)."""
    low = sub < 4
    t = sub % 4
    b_t = tl.load(src + base + 4 + t, mask=mask)
    b_4t = tl.load(src + base + 8 + t, mask=mask)
    b_8t = tl.load(src + base + 12 + t, mask=mask)
    scale = tl.where(low, b_t & 0x3F, (b_8t & 0x0F) | ((b_t >> 2) & 0x30))
    minimum = tl.where(low, b_4t & 0x3F, (b_8t >> 4) | ((b_4t >> 2) & 0x30))
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def q4_k_kernel(src, out_ptr, n_blocks):
    block, element, mask, base = _tile(n_blocks, 144, 256)
    sub, j = element // 32, element % 32
    scale, minimum = _k_scale_min(src, base, sub, mask)
    byte = tl.load(src + base + 16 + (sub // 2) * 32 + j, mask=mask)
    q = (byte >> (4 * (sub % 2)).to(tl.uint8)) & 0xF
    d, dmin = _half(src + base), _half(src + base + 2)
    _store(out_ptr, block, element, mask, q.to(tl.float32) * (d * scale) - dmin * minimum, 256)


@triton.jit
def q5_k_kernel(src, out_ptr, n_blocks):
    block, element, mask, base = _tile(n_blocks, 176, 256)
    sub, j = element // 32, element % 32
    scale, minimum = _k_scale_min(src, base, sub, mask)
    low = (tl.load(src + base + 48 + (sub // 2) * 32 + j, mask=mask) >> (4 * (sub % 2)).to(tl.uint8)) & 0xF
    high = (tl.load(src + base + 16 + j, mask=mask) >> sub.to(tl.uint8)) & 1
    d, dmin = _half(src + base), _half(src + base + 2)
    _store(out_ptr, block, element, mask, (low | (high << 4)).to(tl.float32) * (d * scale) - dmin * minimum, 256)


@triton.jit
def q6_k_kernel(src, out_ptr, n_blocks):
    block, element, mask, base = _tile(n_blocks, 210, 256)
    half, within = element // 128, element % 128
    low = (tl.load(src + base + half * 64 + within % 64, mask=mask) >> (4 * (within // 64)).to(tl.uint8)) & 0xF
    high = (tl.load(src + base + 128 + half * 32 + within % 32, mask=mask) >> (2 * (within // 32)).to(tl.uint8)) & 3
    q = (low | (high << 4)).to(tl.int8) - 32
    scale = tl.load(src + base + 192 + element // 16, mask=mask).to(tl.int8, bitcast=True).to(tl.float32)
    d = _half(src + base + 208)
    _store(out_ptr, block, element, mask, q.to(tl.float32) * (d * scale), 256)


KERNELS = {"Q8_0": q8_0_kernel, "Q4_0": q4_0_kernel, "Q4_K": q4_k_kernel, "Q5_K": q5_k_kernel, "Q6_K": q6_k_kernel}


def launch(name, blocks, out):
    """Dequantize `blocks` (n, type size) uint8 into `out` (n, block size) float32/bf16/fp16, in place."""
    n = blocks.shape[0]
    options = {} if blocks.device.type == "cpu" else {"enable_fp_fusion": False}  # the interpreter takes no options
    KERNELS[name][(triton.cdiv(n, GROUP.value),)](blocks, out, n, **options)
    return out
