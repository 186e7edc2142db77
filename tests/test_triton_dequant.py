"""Triton dequantization kernels: bit-exact with gguf-py. On a CUDA GPU they run natively; elsewhere Triton's CPU
interpreter runs the same kernel code (skipped when Triton is not installed)."""

import os

import numpy as np
import pytest
import torch

from klein_nodes.quant import dequant
from klein_nodes.quant.dequant import BLOCK_SIZES, TRITON_TYPES, dequantize

gguf = pytest.importorskip("gguf")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined, i.e. on first import
pytest.importorskip("triton")
from klein_nodes.quant import triton_dequant  # noqa: E402

from test_dequant import random_blocks  # noqa: E402


@pytest.mark.parametrize("name", TRITON_TYPES)
def test_kernels_are_bit_exact_with_gguf(name):
    block_size, type_size = BLOCK_SIZES[name]
    data = random_blocks(name, rows=3, row_blocks=11, seed=4)  # 33 blocks: a partial last program
    expected = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name]).astype(np.float32).reshape(-1, block_size)
    blocks = torch.from_numpy(data.copy()).reshape(-1, type_size).to(DEVICE)
    got = triton_dequant.launch(name, blocks, torch.empty(len(blocks), block_size, device=DEVICE))
    assert np.array_equal(got.cpu().numpy().view(np.uint32), expected.view(np.uint32))
    if DEVICE == "cuda":  # Triton's CPU interpreter truncates to bf16 instead of rounding; GPUs round to nearest even
        as_bf16 = triton_dequant.launch(name, blocks, torch.empty(len(blocks), block_size, device=DEVICE,
                                                                  dtype=torch.bfloat16))
        assert torch.equal(as_bf16.cpu(), torch.from_numpy(expected).bfloat16())


def test_dequantize_uses_a_kernel_only_after_it_matched_on_real_data(monkeypatch):
    """The first call per type and device compares kernel and torch code on the data itself; a kernel that differs
    (simulated here) is never used again and torch answers instead."""
    monkeypatch.setattr(dequant, "triton_available", lambda device: True)
    monkeypatch.setattr(dequant, "_triton_verdict", {})
    data = torch.from_numpy(random_blocks("Q4_K", 4, 2, seed=5).copy()).to(DEVICE)
    reference = dequant.DEQUANTIZERS["Q4_K"](data.reshape(-1, 144)).reshape(4, 512)
    out = torch.empty(4, 512, device=DEVICE)
    assert dequantize(data, "Q4_K", (4, 512), out=out) is out and torch.equal(out, reference)
    assert dequant._triton_verdict == {("Q4_K", data.device, torch.float32): True}
    calls = []
    monkeypatch.setattr(triton_dequant, "launch", lambda name, blocks, out: calls.append(name) or out.fill_(1.0))
    monkeypatch.setattr(dequant, "_triton_verdict", {})
    assert torch.equal(dequantize(data, "Q4_K", (4, 512)), reference)
    assert dequant._triton_verdict == {("Q4_K", data.device, torch.float32): False} and calls == ["Q4_K"]
    dequantize(data, "Q4_K", (4, 512))
    assert calls == ["Q4_K"]  # not asked again

    def broken(name, blocks, out):
        raise RuntimeError("PTX too new for this driver")
    monkeypatch.setattr(triton_dequant, "launch", broken)
    monkeypatch.setattr(dequant, "_triton_verdict", {})
    assert torch.equal(dequantize(data, "Q4_K", (4, 512)), reference)  # a kernel that cannot run falls back too
