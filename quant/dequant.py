"""GGML block formats -> float tensors, in plain torch (any device).

Each function takes the packed blocks as a (n_blocks, type_size) uint8 tensor and returns (n_blocks, block_size)
float32, written into `out` (a float32 buffer of that size) when given. The float32 operations and their order are
those of the GGML reference (gguf-py), so results are bit-identical to `gguf.quants.dequantize`. Integer work stays in
bytes (cut 8 at a time from int64 words); the float steps run in place in the output (allocating and faulting in a
new full-size tensor per step costs as much as the arithmetic).
"""

import logging
import math
import operator
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..errors import KleinError

log = logging.getLogger("klein_nodes")
# On the CPU, large tensors are dequantized in pieces of this many values (4 MB of float32): each piece's
# intermediate results stay in cache instead of every step streaming the whole tensor through memory (2-3x faster),
# and pieces are large enough that the ~40 small ops per piece cost little (a quarter of this size: 1.3-2x slower).
CPU_CHUNK = 1 << 20
_triton_verdict = {}  # (type, device, dtype) -> the Triton kernel matched the torch code on its first data
_constants = {}  # (id of a table below, dtype, device) -> that table as a tensor there
_prepared = set()  # (type, dtype, device) made ready by `prepare`

QK_K = 256
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
E2M1_DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # GGML's fp4 codes, paired with half scales


def half(blocks, start):
    """An fp16 field at byte `start` of every block, as (n, 1) float32."""
    return blocks[:, start: start + 2].contiguous().view(torch.float16).float()


EVERY_BYTE = 0x0101010101010101


def bits(packed, count, width, groups=1, at=0):
    """(n, groups·k) bytes -> (n, groups, count, k) uint8: field i holds bits [i·width, (i+1)·width) of each byte,
    moved up to bit `at`. The fields are cut from a contiguous copy, 8 bytes at a time (as int64 words) when k
    allows: byte-wise operations on a block's strided slice are ~10x slower."""
    n, mask = packed.shape[0], (1 << width) - 1
    if packed.shape[1] % (8 * groups) == 0:
        packed, mask = packed.clone(memory_format=torch.contiguous_format).view(torch.int64), mask * EVERY_BYTE
    else:
        packed = packed.contiguous()
    packed = packed.reshape(n, groups, 1, -1)
    fields = torch.cat([(packed >> i * width if i else packed) & mask for i in range(count)], dim=2)
    if at:
        fields <<= at  # the fields stay inside their bytes: width + at <= 8
    return fields.view(torch.uint8).reshape(n, groups, count, -1)


def nibbles(packed, groups):
    """(n, groups·k) bytes -> (n, groups, 2, k) 4-bit values: low nibbles first, then high nibbles, per group."""
    return bits(packed, 2, 4, groups)


def scaled(q, d, m=None, out=None):
    """float(q)·d (− m), GGML's last steps, in place: into `out` (a float32 buffer of q's size) when given."""
    values = q.float() if out is None else out.view(q.shape).copy_(q)
    values.mul_(d)
    return values if m is None else values.sub_(m)


def dequant_q4_0(blocks, out=None):
    q = nibbles(blocks[:, 2:], 1).reshape(blocks.shape[0], 32).view(torch.int8).sub_(8)
    return scaled(q, half(blocks, 0), out=out)


def dequant_q4_1(blocks, out=None):
    q = nibbles(blocks[:, 4:], 1).reshape(blocks.shape[0], 32)
    return scaled(q, half(blocks, 0), out=out).add_(half(blocks, 2))


# byte -> its 8 bits as 8 bytes (bit i in byte i, moved up to bit 4), one int64 word per byte value
SPREAD_BITS = tuple(sum(((value >> i) & 1) << (8 * i + 4) for i in range(8)) for value in range(256))


def constant(table, dtype, device):
    """A module-level table as a tensor on `device`, made once per device and dtype: a fresh host->device copy in
    every forward would make the host wait for the GPU inside the sampling loop (see `prepare`)."""
    key = (id(table), dtype, device)
    if key not in _constants:
        with torch.inference_mode(False):  # a normal tensor, usable inside and outside inference mode
            _constants[key] = torch.tensor(table, dtype=dtype, device=device)
    return _constants[key]


def q5_values(blocks, offset):
    """Q5_0 / Q5_1: value k's fifth bit is bit k of a little-endian 32-bit word, i.e. bit k % 8 of its byte k // 8:
    each byte looked up as the 8 bytes it spreads to, already in value order."""
    n = blocks.shape[0]
    table = constant(SPREAD_BITS, torch.int64, blocks.device)
    high = torch.index_select(table, 0, blocks[:, offset: offset + 4].reshape(-1).int()).view(torch.uint8)
    low = nibbles(blocks[:, offset + 4:], 1).reshape(n, 32)
    return low.bitwise_or_(high.reshape(n, 32))


def dequant_q5_0(blocks, out=None):
    return scaled(q5_values(blocks, 2).view(torch.int8).sub_(16), half(blocks, 0), out=out)


def dequant_q5_1(blocks, out=None):
    return scaled(q5_values(blocks, 4), half(blocks, 0), out=out).add_(half(blocks, 2))


def dequant_q8_0(blocks, out=None):
    return scaled(blocks[:, 2:].view(torch.int8), half(blocks, 0), out=out)


def dequant_q2_k(blocks, out=None):
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = half(blocks, 80), half(blocks, 82)
    dl = (d * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    return scaled(bits(qs, 4, 2, groups=2).reshape(n, 16, 16), dl, ml, out).reshape(n, QK_K)


def dequant_q3_k(blocks, out=None):
    n = blocks.shape[0]
    hmask, qs, packed_scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = half(blocks, 108)
    low = nibbles(packed_scales[:, :8], 1).reshape(n, 16)
    high = bits(packed_scales[:, 8:], 4, 2, at=4).reshape(n, 16)
    scales = low.bitwise_or_(high).view(torch.int8).sub_(32).float()
    dl = (d * scales).reshape(n, 16, 1)
    low_q = bits(qs, 4, 2, groups=2).reshape(n, 16, 16)
    offset = bits(hmask, 8, 1, at=2).reshape(n, 16, 16).bitwise_xor_(4)  # a set mask bit means no -4 offset
    q = low_q.view(torch.int8).sub_(offset.view(torch.int8))
    return scaled(q, dl, out=out).reshape(n, QK_K)


def k_factors(blocks):
    """Q4_K / Q5_K: each 32-value group's scale d·scale and offset dmin·min, as (n, 8, 1) float32. The eight
    six-bit scales and mins are packed in 12 bytes as words d, m, m_d: scales 0-3 are d's low 6 bits, mins 0-3 m's;
    scales and mins 4-7 take their low 4 bits from m_d's nibbles and their top 2 from the top bits of d and m."""
    n = blocks.shape[0]
    words = blocks[:, 4:16].clone(memory_format=torch.contiguous_format).view(torch.int32)
    d_m, m_d = words[:, :2], words[:, 2:]
    first = d_m & 0x3F3F3F3F
    second = (torch.cat((m_d, m_d >> 4), dim=1) & 0x0F0F0F0F) | ((d_m >> 2) & 0x30303030)
    scales_mins = torch.stack((first, second), dim=2).view(torch.uint8).reshape(n, 2, 8).float()
    d_dmin = blocks[:, :4].clone(memory_format=torch.contiguous_format).view(torch.float16).float().reshape(n, 2, 1)
    # two products, not one over both halves: the caller's broadcast multiply is ~3x slower with strided factors
    return tuple((scales_mins[:, i] * d_dmin[:, i]).reshape(n, 8, 1) for i in range(2))


def dequant_q4_k(blocks, out=None):
    n = blocks.shape[0]
    q = nibbles(blocks[:, 16:], 4).reshape(n, 8, 32)
    return scaled(q, *k_factors(blocks), out=out).reshape(n, QK_K)


def dequant_q5_k(blocks, out=None):
    n = blocks.shape[0]
    low = nibbles(blocks[:, 48:], 4).reshape(n, 8, 32)
    high = bits(blocks[:, 16:48], 8, 1, at=4).reshape(n, 8, 32)
    return scaled(low.bitwise_or_(high), *k_factors(blocks), out=out).reshape(n, QK_K)


def dequant_q6_k(blocks, out=None):
    n = blocks.shape[0]
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = (half(blocks, 208) * scales).reshape(n, 16, 1)
    low = nibbles(ql, 2).reshape(n, 8, 32)
    high = bits(qh, 4, 2, groups=2, at=4).reshape(n, 8, 32)
    q = low.bitwise_or_(high).view(torch.int8).sub_(32).reshape(n, 16, 16)
    return scaled(q, d, out=out).reshape(n, QK_K)


def lookup(table, indices, out=None):
    """table[indices] as float32 (into `out` when given); index_select with int32 indices is ~2.5x faster than int64
    fancy indexing."""
    values = constant(table, torch.float32, indices.device)
    flat = indices.reshape(-1).int()
    if out is None:
        return torch.index_select(values, 0, flat).reshape(indices.shape)
    return torch.index_select(values, 0, flat, out=out.view(-1)).view(indices.shape)


def dequant_iq4_nl(blocks, out=None):
    q = nibbles(blocks[:, 2:], 1).reshape(blocks.shape[0], 32)
    return lookup(IQ4_VALUES, q, out).mul_(half(blocks, 0))


def dequant_iq4_xs(blocks, out=None):
    n = blocks.shape[0]
    high_word = blocks[:, 2:4].contiguous().view(torch.int16).to(torch.int32)
    high = torch.cat([(high_word >> i) & 3 for i in range(0, 16, 2)], dim=1).to(torch.uint8)
    low = nibbles(blocks[:, 4:8], 4).reshape(n, 8)  # per byte: low nibble, then high
    scales = (low | (high << 4)).view(torch.int8).sub_(32).float()
    dl = (half(blocks, 0) * scales).reshape(n, 8, 1)
    q = nibbles(blocks[:, 8:], 8).reshape(n, 8, 32)
    return lookup(IQ4_VALUES, q, out).mul_(dl).reshape(n, QK_K)


def dequant_mxfp4(blocks, out=None):
    """E8M0 exponent byte (decoded as half the power of two, as GGML does), then 16 bytes of e2m1 pairs."""
    e = blocks[:, :1].to(torch.int32)
    half_scale = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23).view(torch.float32)
    q = nibbles(blocks[:, 1:], 1).reshape(blocks.shape[0], 32)
    return lookup(E2M1_DOUBLED, q, out).mul_(half_scale)


def dequant_nvfp4(blocks, out=None):
    """4 unsigned e4m3 scales (bit 7 ignored; the byte 0x7F reads as 0, 0xFF as 480 as in GGML), each for 16 values
    stored as 8 bytes: low nibbles, then high."""
    n = blocks.shape[0]
    raw = blocks[:, :4]
    codes = raw & 0x7F
    scales = torch.where(codes == 0x7F, 0, codes).view(torch.float8_e4m3fn).float()
    scales = torch.where((codes == 0x7F) & (raw != 0x7F), 480.0, scales).mul_(0.5).reshape(n, 4, 1)
    q = nibbles(blocks[:, 4:], 4).reshape(n, 4, 16)
    return lookup(E2M1_DOUBLED, q, out).mul_(scales).reshape(n, 64)


def floats(dtype):
    """Dequantizer of a float type: the blocks' bytes read as `dtype`, as float32."""
    def read(blocks, out=None):
        values = blocks.contiguous().view(dtype)
        if out is None:
            return values.float()
        return out.view(values.shape).copy_(values)
    return read


@dataclass(frozen=True)
class GGMLType:
    block_size: int  # elements per block
    type_size: int  # bytes per block
    dequantize: object  # (blocks, out=None) -> (n_blocks, block_size) float32
    triton: bool = False  # a Triton kernel runs it on CUDA (quant/triton_dequant.py)
    float_dtype: torch.dtype | None = None  # float types: the elements are this dtype, read in place


def float_type(dtype):
    return GGMLType(1, dtype.itemsize, floats(dtype), float_dtype=dtype)


# The one table of GGML types: block layout, kernel. Names as gguf-py's GGMLQuantizationType spells them.
GGML_TYPES = {
    "F32": float_type(torch.float32), "F16": float_type(torch.float16), "BF16": float_type(torch.bfloat16),
    "Q4_0": GGMLType(32, 18, dequant_q4_0, triton=True), "Q4_1": GGMLType(32, 20, dequant_q4_1),
    "Q5_0": GGMLType(32, 22, dequant_q5_0), "Q5_1": GGMLType(32, 24, dequant_q5_1),
    "Q8_0": GGMLType(32, 34, dequant_q8_0, triton=True),
    "Q2_K": GGMLType(QK_K, 84, dequant_q2_k), "Q3_K": GGMLType(QK_K, 110, dequant_q3_k),
    "Q4_K": GGMLType(QK_K, 144, dequant_q4_k, triton=True), "Q5_K": GGMLType(QK_K, 176, dequant_q5_k, triton=True),
    "Q6_K": GGMLType(QK_K, 210, dequant_q6_k, triton=True),
    "IQ4_NL": GGMLType(32, 18, dequant_iq4_nl), "IQ4_XS": GGMLType(QK_K, 136, dequant_iq4_xs),
    "MXFP4": GGMLType(32, 17, dequant_mxfp4), "NVFP4": GGMLType(64, 36, dequant_nvfp4),
}
# views of the table
BLOCK_SIZES = {name: (t.block_size, t.type_size) for name, t in GGML_TYPES.items()}  # (elements, bytes) per block
DEQUANTIZERS = {name: t.dequantize for name, t in GGML_TYPES.items()}
TRITON_TYPES = tuple(name for name, t in GGML_TYPES.items() if t.triton)
FLOAT_TYPES = {name: t.float_dtype for name, t in GGML_TYPES.items() if t.float_dtype is not None}


def type_name(qtype):
    """A GGMLQuantizationType, its name or its number -> the name, or a clear error for types we don't run."""
    name = getattr(qtype, "name", qtype)
    if isinstance(name, int) and not isinstance(name, bool):
        import gguf

        try:
            name = gguf.GGMLQuantizationType(name).name
        except ValueError:
            raise KleinError(f"{name} is not a GGML type number") from None
    if not isinstance(name, str) or name not in GGML_TYPES:
        raise KleinError(f"GGML type {name} is not supported (supported: {', '.join(GGML_TYPES)}); "
                         "re-quantize the file to one of these (Q8_0, Q6_K, Q5_K, Q4_K are the usual choices)")
    return name


def dequantize(data: torch.Tensor, qtype: object, shape: tuple, dtype: torch.dtype = torch.float32,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Raw GGML blocks (uint8) -> a tensor of `shape` (torch order, last dim = the row) in `dtype`, written into
    `out` when given. On CUDA the hot types run as Triton kernels (see `use_triton`)."""
    name = type_name(qtype)
    block_size, type_size = BLOCK_SIZES[name]
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8:
        raise KleinError(f"dequantize takes the raw blocks as a uint8 tensor, not {type(data).__name__} "
                         f"{getattr(data, 'dtype', '')}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize == 1:
        raise KleinError(f"dequantize's dtype must be torch.float32, float16 or bfloat16, not {dtype!r:.40}")
    if out is not None and not isinstance(out, torch.Tensor):
        raise KleinError(f"dequantize's out must be a tensor or None, not {type(out).__name__}")
    try:
        shape = tuple(operator.index(dim) for dim in shape)
    except TypeError:
        raise KleinError(f"shape {shape!r} must be a sequence of whole numbers") from None
    if not shape or min(shape) < 1:
        raise KleinError(f"shape {shape} must have at least one dimension, none of them below 1")
    count = math.prod(shape)
    if shape[-1] % block_size or data.numel() != count // block_size * type_size:
        raise KleinError(f"{name} data of {data.numel()} bytes does not hold a {tuple(shape)} tensor "
                         f"({block_size} values per {type_size}-byte block)")
    if out is not None and (tuple(out.shape) != shape or out.device != data.device or not out.is_contiguous()):
        raise KleinError(f"dequantize's out must be a contiguous {shape} tensor on {data.device}, not "
                         f"{'a strided ' if not out.is_contiguous() else ''}{tuple(out.shape)} on {out.device}")
    blocks = data.reshape(-1, type_size)
    if use_triton(name, blocks, dtype if out is None else out.dtype):
        from .triton_dequant import launch

        out = torch.empty(shape, dtype=dtype, device=data.device) if out is None else out
        launch(name, blocks, out.view(-1, block_size))
        return out
    if blocks.device.type == "cpu" and blocks.shape[0] * block_size > CPU_CHUNK:
        out = torch.empty(shape, dtype=dtype) if out is None else out
        flat, step = out.view(-1, block_size), CPU_CHUNK // block_size
        in_parallel(lambda start: write(name, blocks[start: start + step], flat[start: start + step]),
                    range(0, blocks.shape[0], step))
        return out
    if out is not None:
        write(name, blocks, out.view(-1, block_size))
        return out
    return DEQUANTIZERS[name](blocks).reshape(shape).to(dtype)


def write(name, blocks, out):
    """`blocks` dequantized into `out` (n_blocks, block_size): float32 straight in, other dtypes rounded once from
    float32."""
    if out.dtype == torch.float32:
        DEQUANTIZERS[name](blocks, out=out)
    else:
        out.copy_(DEQUANTIZERS[name](blocks))


_pool = (None, 0)  # (executor, its thread count)


def in_parallel(work, pieces):
    """`work(piece)` for every piece: one piece per thread, each single-threaded, on torch's CPU thread count.
    A piece's dozen small ops would otherwise each split across threads and wait on a barrier (on a busy machine
    slower at 2 threads than at 1); whole pieces on separate threads scale instead, with identical results."""
    global _pool
    threads = torch.get_num_threads()
    if threads == 1 or len(pieces) == 1:
        for start in pieces:
            work(start)
        return
    if _pool[1] != threads:
        # each worker's own OpenMP setting: one thread per op, for good
        _pool = (ThreadPoolExecutor(threads, "klein-dequant", initializer=torch.set_num_threads, initargs=(1,)),
                 threads)
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()  # thread-local: carried over

    def run(piece):
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            work(piece)

    torch.set_num_threads(1)
    try:
        list(_pool[0].map(run, pieces))
    finally:
        torch.set_num_threads(threads)


def triton_available(device):
    """Triton kernels run on CUDA devices with Triton installed, unless KLEIN_TRITON=0."""
    if device.type != "cuda" or os.environ.get("KLEIN_TRITON", "1") == "0":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def prepare(name, packed, dtype, device):
    """Before a sampling loop, what dequantizing `name` data into `dtype` on `device` will need there, made once:
    the lookup tables and the Triton kernel's first-use check (on the first blocks of `packed`), both of which copy
    or read across host and device."""
    key = (name, dtype, device)
    if key not in _prepared:
        blocks = packed.reshape(-1, BLOCK_SIZES[name][1])[:256].to(device)
        DEQUANTIZERS[name](blocks[:1])
        use_triton(name, blocks, dtype)
        _prepared.add(key)


def use_triton(name, blocks, dtype):
    """Whether to run `name`'s Triton kernel. The first time per type, device and dtype, the kernel and the torch
    code dequantize the same blocks of real data; any difference (a Triton/GPU combination that rounds differently)
    falls back to torch for good, with a warning."""
    if name not in TRITON_TYPES or not triton_available(blocks.device):
        return False
    key = (name, blocks.device, dtype)
    if key not in _triton_verdict:
        sample = blocks[:256]
        expected = DEQUANTIZERS[name](sample).to(dtype)
        try:
            from .triton_dequant import launch

            got = launch(name, sample, torch.empty_like(expected))
        except Exception as e:  # a Triton/driver combination that cannot build the kernel: torch does the work
            log.warning("Triton %s dequantization kernel failed on %s (%s); using torch instead",
                        name, blocks.device, e)
            _triton_verdict[key] = False
            return False
        _triton_verdict[key] = torch.equal(got, expected) and torch.equal(got.isnan(), expected.isnan())
        if not _triton_verdict[key]:
            log.warning("Triton %s dequantization differs from the reference on %s (max %.3g); using torch instead",
                        name, blocks.device, (got - expected).abs().max().item())
    return _triton_verdict[key]
