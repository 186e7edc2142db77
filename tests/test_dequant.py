"""Dequantization is bit-exact with gguf-py's reference for every supported GGML type."""

import numpy as np
import pytest
import torch

import klein_nodes as kn
from klein_nodes.quant import BLOCK_SIZES, dequantize

gguf = pytest.importorskip("gguf")

# byte offsets of the fp16 scale fields in each block: random bytes there could be inf/NaN
HALF_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "IQ4_NL": (0,),
               "IQ4_XS": (0,), "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(name, rows, row_blocks, seed=0):
    block_size, type_size = BLOCK_SIZES[name]
    rng = np.random.default_rng(seed)
    if name in ("F32", "F16", "BF16"):
        values = rng.standard_normal((rows, row_blocks)).astype(np.float32)
        raw = {"F32": values, "F16": values.astype(np.float16)}.get(name)
        return (raw if raw is not None else gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16)).view(np.uint8)
    data = rng.integers(0, 256, (rows, row_blocks, type_size), dtype=np.uint8)
    for offset in HALF_FIELDS.get(name, ()):  # MXFP4/NVFP4 scales: any byte is a number
        data[..., offset: offset + 2] = (
            (rng.standard_normal((rows, row_blocks)) * 0.05).astype(np.float16)[..., None].view(np.uint8))
    return data.reshape(rows, row_blocks * type_size)


@pytest.mark.parametrize("name", list(BLOCK_SIZES))
def test_bit_exact_with_gguf(name):
    block_size, _ = BLOCK_SIZES[name]
    row_blocks = 3 if block_size > 1 else 96
    data = random_blocks(name, rows=5, row_blocks=row_blocks)
    qtype = gguf.GGMLQuantizationType[name]
    expected = gguf.quants.dequantize(data, qtype)
    shape = (5, row_blocks * block_size)
    for spelling in (qtype, name):
        got = dequantize(torch.from_numpy(data.copy()), spelling, shape)
        assert got.dtype == torch.float32 and got.shape == shape
        assert np.array_equal(got.numpy().view(np.uint32), expected.astype(np.float32).view(np.uint32))
    out = torch.full(shape, float("nan"))
    assert dequantize(torch.from_numpy(data.copy()), name, shape, out=out) is out
    assert np.array_equal(out.numpy().view(np.uint32), expected.astype(np.float32).view(np.uint32))


def test_quantized_by_gguf_round_trip():
    """Blocks gguf-py quantizes itself (real data, not random bytes) dequantize identically too."""
    values = np.random.default_rng(1).standard_normal((8, 256)).astype(np.float32)
    for name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4", "BF16"):
        qtype = gguf.GGMLQuantizationType[name]
        packed = gguf.quants.quantize(values, qtype)
        got = dequantize(torch.from_numpy(packed.copy()), name, (8, 256))
        assert np.array_equal(got.numpy(), gguf.quants.dequantize(packed, qtype)), name


@pytest.mark.parametrize("name", ["MXFP4", "NVFP4"])
def test_every_fp4_scale_byte(name):
    """All 256 values of the E8M0 / UE4M3 scale byte, edge encodings (0, 0x7F, 0xFF, overflow) included."""
    _, type_size = BLOCK_SIZES[name]
    data = np.full((256, type_size), 0x7A, dtype=np.uint8)
    data[:, : 4 if name == "NVFP4" else 1] = np.arange(256, dtype=np.uint8)[:, None]
    with np.errstate(over="ignore"):
        expected = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name])
    got = dequantize(torch.from_numpy(data.copy()), name, expected.shape)
    assert np.array_equal(got.numpy().view(np.uint32), expected.astype(np.float32).view(np.uint32))


def test_other_dtypes_and_errors():
    data = random_blocks("Q4_K", 2, 1)
    as_bf16 = dequantize(torch.from_numpy(data.copy()), "Q4_K", (2, 256), dtype=torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16
    with pytest.raises(kn.KleinError, match="GGML type IQ2_XXS is not supported"):
        dequantize(torch.zeros(66, dtype=torch.uint8), gguf.GGMLQuantizationType.IQ2_XXS, (1, 256))
    with pytest.raises(kn.KleinError, match="does not hold a"):
        dequantize(torch.zeros(100, dtype=torch.uint8), "Q4_K", (1, 256))


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("name", list(BLOCK_SIZES))
def test_chunked_cpu_path_is_bit_exact(name, threads, monkeypatch):
    """Large tensors go through the CPU in cache-sized pieces (made small here), one piece per thread: same bits,
    partial last piece, written into a caller's buffer in its dtype, torch's thread count left as it was."""
    from klein_nodes.quant import dequant

    monkeypatch.setattr(dequant, "CPU_CHUNK", 1024)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_chunked(name)
        with torch.inference_mode():  # as in a model's forward: the workers write inference tensors too
            check_chunked(name)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def check_chunked(name):
    block_size, _ = BLOCK_SIZES[name]
    row_blocks = 11 if block_size > 1 else 352
    data = random_blocks(name, rows=7, row_blocks=row_blocks, seed=6)
    shape = (7, row_blocks * block_size)
    expected = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name]).astype(np.float32)
    got = dequantize(torch.from_numpy(data.copy()), name, shape)
    assert np.array_equal(got.numpy().view(np.uint32), expected.view(np.uint32))
    for dtype in (torch.bfloat16, torch.float32):  # float32: each piece is written straight into the buffer
        out = torch.full(shape, float("nan"), dtype=dtype)
        assert dequantize(torch.from_numpy(data.copy()), name, shape, out=out) is out
        assert torch.equal(out, torch.from_numpy(expected).to(dtype))


@pytest.mark.parametrize("data,qtype,shape,fragment", [
    (torch.zeros(34, dtype=torch.uint8), "Q8_0", (), "must have at least one dimension"),
    (torch.zeros(34, dtype=torch.uint8), "Q8_0", (-1, 32), "none of them below 1"),
    (torch.zeros(34, dtype=torch.uint8), "Q8_0", (1.0, 32.0), "must be a sequence of whole numbers"),
    (torch.zeros(34, dtype=torch.uint8), "Q8_0", "32", "must be a sequence of whole numbers"),
    (torch.zeros(34, dtype=torch.uint8), 999, (32,), "999 is not a GGML type number"),
    (torch.zeros(34, dtype=torch.uint8), ["Q8_0"], (32,), "GGML type ['Q8_0'] is not supported"),
    (torch.zeros(34, dtype=torch.float32), "Q8_0", (32,), "uint8 tensor, not Tensor torch.float32"),
    (torch.zeros(33, dtype=torch.uint8), "Q8_0", (32,), "does not hold a (32,) tensor"),
])
def test_bad_dequantize_arguments_are_named(data, qtype, shape, fragment):
    with pytest.raises(kn.KleinError) as info:
        kn.quant.dequantize(data, qtype, shape)
    assert fragment in str(info.value)


@pytest.mark.parametrize("out,fragment", [
    (torch.empty(2, 32), "contiguous (1, 32) tensor on cpu, not (2, 32) on cpu"),
    (torch.empty(32), "not (32,) on cpu"),
    (torch.empty(64).view(1, 64)[:, ::2], "not a strided (1, 32)"),
    (torch.empty(1, 32, device="meta"), "not (1, 32) on meta"),
])
def test_a_wrong_out_buffer_is_named(out, fragment):
    """A buffer that does not fit is refused before anything is written (not broadcast into, not a torch error)."""
    with pytest.raises(kn.KleinError) as info:
        dequantize(torch.zeros(34, dtype=torch.uint8), "Q8_0", (1, 32), out=out)
    assert fragment in str(info.value)
