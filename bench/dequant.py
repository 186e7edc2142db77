"""Dequantization throughput per GGML type on the same klein-sized matrix (3072 x 3072): gguf-py (numpy), a
straightforward whole-tensor torch version (our kernels applied once to all blocks), `kn.quant.dequantize` (the
same kernels over cache-sized pieces) into a fresh tensor and into a reused buffer (what a quantized Linear does
every forward) and, optionally, the kernels fused by torch.compile; timed interleaved, outputs checked identical.
On a CUDA GPU it also times our kernels on the GPU and a quantized Linear against a bf16 Linear at klein shapes.

    python bench/dequant.py [--repeats 5] [--no-compile]
"""

import argparse
import statistics
import sys

import numpy as np
import torch

from machine import interleaved, machine_line, median_time, paired_text
from klein_nodes.quant.dequant import BLOCK_SIZES, DEQUANTIZERS, dequantize
from klein_nodes.quant.linear import QuantizedLinear
from klein_nodes.quant.quantize import quantize
from klein_nodes.testing import ggml_pack

TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0", "Q5_1", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS", "MXFP4", "NVFP4", "BF16")


def packed_matrix(qtype, rows, cols):
    values = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    try:
        return quantize(values, qtype)
    except (NotImplementedError, KeyError):
        return ggml_pack(torch.from_numpy(values), qtype)


def main():
    import gguf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--types", default=",".join(TYPES))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = cols = 3072
    print(machine_line())
    print(f"{rows}x{cols} weights, fp32 output; median ms of {args.repeats} interleaved rounds, "
          "and gguf-py's time over ours per round: median (min-max)")
    header = f"{'type':<8}{'gguf-py':>9}{'whole':>8}{'x gguf':>18}{'fresh':>8}{'x gguf':>18}{'buffer':>8}{'x gguf':>18}"
    print(header + ("" if args.no_compile else f"{'compiled':>10}{'x gguf':>8}"))
    for qtype in args.types.split(","):
        packed = np.ascontiguousarray(packed_matrix(qtype, rows, cols))
        kind = gguf.GGMLQuantizationType[qtype]
        data = torch.from_numpy(packed.copy()).reshape(-1)
        blocks = data.reshape(-1, BLOCK_SIZES[qtype][1])
        expected = gguf.quants.dequantize(packed, kind)
        assert np.array_equal(dequantize(data, qtype, (rows, cols)).numpy(), expected)
        assert np.array_equal(DEQUANTIZERS[qtype](blocks).reshape(rows, cols).numpy(), expected)
        buffer = torch.empty(rows, cols)
        samples = interleaved([lambda: gguf.quants.dequantize(packed, kind),
                               lambda: DEQUANTIZERS[qtype](blocks),
                               lambda: dequantize(data, qtype, (rows, cols)),
                               lambda: dequantize(data, qtype, (rows, cols), out=buffer)], args.repeats)
        reference = samples[0]
        line = f"{qtype:<8}{statistics.median(reference) * 1e3:>9.1f}"
        for times in samples[1:]:
            line += f"{statistics.median(times) * 1e3:>8.1f}{paired_text(reference, times):>18}"
        if not args.no_compile:
            compiled = torch.compile(DEQUANTIZERS[qtype], dynamic=True)
            assert np.array_equal(compiled(blocks).reshape(rows, cols).numpy(), expected)
            fused = median_time(lambda: compiled(blocks), args.repeats)
            line += f"{fused * 1e3:>10.1f}{statistics.median(reference) / fused:>8.2f}"
        print(line)
    print("goal: >= 3x gguf-py on CPU")
    if torch.cuda.is_available():
        gpu_report(args.repeats)
    else:
        print("no CUDA device: GPU dequant and quantized-Linear timings skipped")
    return 0


def gpu_report(repeats):
    """Triton vs torch dequantization on the GPU (bf16 out), and a quantized Linear vs a bf16 Linear at klein's
    shapes (4096 image + 512 text tokens)."""
    print(f"\nGPU: {torch.cuda.get_device_name()}")
    try:
        from klein_nodes.quant.triton_dequant import KERNELS, launch
    except ImportError:
        KERNELS = {}
        print("Triton is not installed: torch kernels only")
    for qtype in KERNELS:
        block_size, type_size = BLOCK_SIZES[qtype]
        blocks = torch.from_numpy(np.ascontiguousarray(packed_matrix(qtype, 3072, 3072))).reshape(-1, type_size).cuda()
        out = torch.empty(blocks.shape[0], block_size, device="cuda", dtype=torch.bfloat16)
        reference = DEQUANTIZERS[qtype](blocks).bfloat16()
        assert torch.equal(launch(qtype, blocks, out), reference)
        eager = median_time(lambda: DEQUANTIZERS[qtype](blocks).bfloat16(), repeats)
        kernel = median_time(lambda: launch(qtype, blocks, out), repeats)
        print(f"{qtype} 3072x3072 -> bf16: torch {eager * 1e3:.3f} ms, "
              f"Triton {kernel * 1e3:.3f} ms ({eager / kernel:.1f}x)")
    x = torch.randn(4608, 3072, device="cuda", dtype=torch.bfloat16)
    for out_features, in_features in ((9216, 3072), (3072, 12288), (27648, 3072)):
        weight = torch.randn(out_features, in_features) * 0.02
        dense = torch.nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=torch.bfloat16)
        dense.weight.data.copy_(weight)
        x_in = x if in_features == 3072 else torch.randn(4608, in_features, device="cuda", dtype=torch.bfloat16)
        base = median_time(lambda: dense(x_in), repeats)
        for qtype in ("Q8_0", "Q4_K", "Q6_K"):
            packed = torch.from_numpy(np.ascontiguousarray(quantize(weight.numpy(), qtype))).reshape(-1).cuda()
            layer = QuantizedLinear(packed, qtype, in_features, out_features)
            print(f"({out_features}x{in_features}) {qtype}: "
                  f"quantized Linear {median_time(lambda: layer(x_in), repeats) * 1e3:.2f} ms, "
                  f"bf16 Linear {base * 1e3:.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
