"""LoRA cost on a quantized (GGUF) transformer: per-step time with 0, 1 and 3 LoRAs (rank 32 on every layer),
interleaved in one process; and why LoRAs are not merged and re-quantized instead: how much of a LoRA's change
survives re-quantization of the merged weight, per type, and what the merge costs.

    python bench/lora.py [--repeats 5] [--hidden 1024] [--tokens 1024]
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import klein_nodes as kn
from machine import interleaved, machine_line, paired_text
from klein_nodes.loaders.convert import quantize_file
from klein_nodes.models.transformer import Flux2Params
from klein_nodes.quant.dequant import dequantize
from klein_nodes.quant.quantize import quantize
from klein_nodes.sampling.packing import image_ids, text_ids
from klein_nodes.testing import write_transformer


def lora_file(path, model, rank, seed):
    """A BFL-named LoRA on every linear layer of the blocks, of typical size (delta ~ 5% of the weight)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.startswith(("double_blocks", "single_blocks")) and hasattr(module, "adapters"):
            tensors[f"diffusion_model.{name}.lora_A.weight"] = (
                torch.randn(rank, module.in_features, generator=generator) / module.in_features ** 0.5)
            tensors[f"diffusion_model.{name}.lora_B.weight"] = (
                torch.randn(module.out_features, rank, generator=generator) * 0.004)
    save_file(tensors, str(path))
    return path


def surviving_change(qtype, rows=256, cols=3072, rank=32):
    """Re-quantizing W + ΔW: the fraction of ΔW's norm that the re-quantized weight misrepresents."""
    rng = np.random.default_rng(0)
    weight = dequantize(torch.from_numpy(quantize(rng.standard_normal((rows, cols)).astype(np.float32) * 0.02, qtype)),
                        qtype, (rows, cols))
    delta = torch.from_numpy(rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols))).float()
    delta *= 0.05 * weight.norm() / delta.norm()
    merged = torch.from_numpy(quantize((weight + delta).numpy(), qtype))
    applied = dequantize(merged, qtype, (rows, cols)) - weight
    return ((applied - delta).norm() / delta.norm()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=1024, help="image tokens per step (1024 = a 512x512 image)")
    parser.add_argument("--type", default="Q4_K")
    args = parser.parse_args()
    print(machine_line())
    torch.set_grad_enabled(False)
    h = args.hidden
    params = Flux2Params(in_channels=128, out_channels=128, context_in_dim=3 * h, hidden_size=h, num_heads=h // 128,
                         depth=2, depth_single_blocks=4, mlp_hidden_dim=3 * h, axes_dim=(32, 32, 32, 32))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source, _ = write_transformer(tmp / "klein.safetensors", params, dtype=torch.bfloat16)
        start = time.perf_counter()
        quantize_file(source, tmp / "klein.gguf", args.type)
        quantize_seconds = time.perf_counter() - start
        base = kn.load_transformer(tmp / "klein.gguf", dtype=torch.float32)
        models = {"no LoRA": base}
        models["1 LoRA"] = kn.apply_lora(base, lora_file(tmp / "a.safetensors", base, 32, 1), 1.0)
        models["3 LoRAs"] = kn.apply_lora(kn.apply_lora(models["1 LoRA"], lora_file(tmp / "b.safetensors", base, 32, 2),
                                                        0.7), lora_file(tmp / "c.safetensors", base, 32, 3), 0.5)
        side = int(args.tokens ** 0.5)
        x_ids, ctx_ids = image_ids(side, args.tokens // side)[None], text_ids(128)[None]
        x, ctx = torch.randn(1, x_ids.shape[1], 128), torch.randn(1, 128, 3 * h)
        t = torch.tensor([0.5])
        runs = [lambda model=model: model(x, x_ids, t, ctx, ctx_ids) for model in models.values()]
        samples = dict(zip(models, interleaved(runs, args.repeats)))
        print(f"{args.type} transformer, hidden {h}, {len(list(base.double_blocks))}+{len(list(base.single_blocks))} "
              f"blocks, {x_ids.shape[1]} image + 128 text tokens, rank-32 LoRAs on every block layer; "
              f"{args.repeats} interleaved rounds, step time over no LoRA's per round: median (min-max)")
        for name, times in samples.items():
            print(f"  {name:8s} step {statistics.median(times) * 1000:8.1f} ms   "
                  f"x{paired_text(times, samples['no LoRA'], 3)}")
        print(f"merge-and-requantize instead: re-quantizing this model took {quantize_seconds:.1f} s per LoRA "
              "change, and the re-quantized weight misrepresents the LoRA's change by:")
        for qtype in ("Q8_0", "Q6_K", "Q5_K", "Q4_K"):
            print(f"  {qtype}: {surviving_change(qtype) * 100:5.1f}% of ‖ΔW‖")


if __name__ == "__main__":
    main()
