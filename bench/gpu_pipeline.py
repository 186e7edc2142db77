"""GPU benchmark with random weights in klein 4B's exact shapes (no real weights needed for timing), 1024², 4 steps.

1. End-to-end latency (text encoder + 4 steps + VAE decode), ours vs diffusers' Flux2KleinPipeline built with the
   same shapes on the same GPU, as a ratio (goals: faster than diffusers, <= 0.30 s bf16 on an H200).
2. Peak torch.cuda.max_memory_allocated under set_per_process_memory_fraction budgets of 8 and 12 GB with bf16,
   fp8, Q8_0 and Q4_K transformers, components starting in CPU memory and placed by the memory planner; the time
   against a fully resident run is reported.

Skips cleanly without CUDA.    python bench/gpu_pipeline.py [--repeats 3] [--skip-diffusers] [--skip-budgets]
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from machine import machine_line, median_time

PROMPT = "A red fox asleep on a stack of old books, morning light"
GIB = 2**30


def randomize(module, device, dtype):
    """Random weights in place on the device (matrices ~ N(0, 1/fan_in), vectors ~ 1)."""
    module.to_empty(device=device)
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.is_floating_point():
                if tensor.ndim >= 2:
                    tensor.normal_(0, tensor[0].numel() ** -0.5)
                else:
                    tensor.fill_(1.0)
    return module.to(dtype)


def our_components(device, tokenizer_dir):
    import klein_nodes as kn
    from klein_nodes.loaders.tokenizer import load_tokenizer
    from klein_nodes.models.autoencoder import AutoEncoder, AutoEncoderParams
    from klein_nodes.models.text_encoder import KleinTextEncoder, Qwen3, Qwen3Params
    from klein_nodes.models.transformer import Flux2, Flux2Params

    with torch.device("meta"):
        transformer, qwen, vae = Flux2(Flux2Params()), Qwen3(Qwen3Params()), AutoEncoder(AutoEncoderParams())
    transformer = randomize(transformer, device, torch.bfloat16).eval()
    text_encoder = KleinTextEncoder(randomize(qwen, device, torch.bfloat16).eval(), load_tokenizer(tokenizer_dir))
    vae = randomize(vae, device, torch.bfloat16).eval()
    return kn, transformer, text_encoder, vae


def diffusers_pipeline(device, tokenizer_dir):
    import diffusers
    import transformers

    from klein_nodes.models.text_encoder import Qwen3Params
    from klein_nodes.models.transformer import Flux2Params
    from klein_nodes.testing import QWEN3_CHAT_TEMPLATE, diffusers_config, qwen3_config

    config = {k: v for k, v in diffusers_config(Flux2Params()).items() if not k.startswith("_")}
    with torch.device("meta"):
        transformer = diffusers.Flux2Transformer2DModel(**config)
        text_encoder = transformers.Qwen3ForCausalLM(
            transformers.Qwen3Config(**qwen3_config(Qwen3Params(num_layers=36))))
        vae = diffusers.AutoencoderKLFlux2()
    tokenizer = transformers.Qwen2Tokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    pipeline = diffusers.Flux2KleinPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential"),
        vae=randomize(vae, device, torch.bfloat16), text_encoder=randomize(text_encoder, device, torch.bfloat16),
        tokenizer=tokenizer, transformer=randomize(transformer, device, torch.bfloat16), is_distilled=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def time_ours(args, device, tokenizer_dir, noise):
    kn, transformer, text_encoder, vae = our_components(device, tokenizer_dir)
    ours = kn.KleinPipeline(transformer, text_encoder, vae)

    def run():
        text_encoder._cache.clear()
        return ours(PROMPT, width=1024, height=1024, steps=4, noise=noise, tiled=False)

    return median_time(run, args.repeats)


def time_diffusers(args, device, tokenizer_dir, noise):
    reference = diffusers_pipeline(device, tokenizer_dir)
    latents = noise.to(device, torch.bfloat16)
    return median_time(lambda: reference(prompt=PROMPT, height=1024, width=1024, num_inference_steps=4,
                                         guidance_scale=1.0, latents=latents, output_type="pt"), args.repeats)


def latency(args, device, tokenizer_dir):
    noise = torch.randn(1, 128, 64, 64, generator=torch.Generator().manual_seed(0))
    ours_s = time_ours(args, device, tokenizer_dir, noise)  # components freed on return
    torch.cuda.empty_cache()
    print(f"ours, bf16, 1024², 4 steps, end to end: {ours_s:.3f} s (goal <= 0.30 s on an H200)")
    if not args.skip_diffusers:
        reference_s = time_diffusers(args, device, tokenizer_dir, noise)
        torch.cuda.empty_cache()
        print(f"diffusers: {reference_s:.3f} s   ratio ours/diffusers = {ours_s / reference_s:.2f} (goal < 1.0)")


def quantize_blocks(transformer, fmt):
    """Replace every block linear with the `fmt` layer built from its weights (fp8, or GGML via our quantizer)."""
    import numpy as np

    from klein_nodes.quant.fp8 import Fp8Linear
    from klein_nodes.quant.linear import QuantizedLinear, replace_module
    from klein_nodes.quant.quantize import quantize

    for name, module in list(transformer.named_modules()):
        if not (isinstance(module, torch.nn.Linear) and name.startswith(("double_blocks", "single_blocks"))):
            continue
        weight = module.weight.detach().float().cpu()
        if fmt == "fp8":
            scale = weight.abs().max() / 448
            layer = Fp8Linear((weight / scale).to(torch.float8_e4m3fn), scale)
        else:
            packed = torch.from_numpy(np.ascontiguousarray(quantize(weight.numpy(), fmt))).reshape(-1)
            layer = QuantizedLinear(packed, fmt, module.in_features, module.out_features)
        replace_module(transformer, name, layer)
    return transformer


def budgets(args, tokenizer_dir):
    print(f"\n{'transformer':<12}{'budget':>8}{'plan':>48}{'peak GiB':>10}{'s':>8}{'x resident':>12}")
    for fmt in ("bf16", "fp8", "Q8_0", "Q4_K"):
        budget_rows(fmt, tokenizer_dir)  # components freed on return
        torch.cuda.empty_cache()


def budget_rows(fmt, tokenizer_dir):
    total = torch.cuda.get_device_properties(0).total_memory
    kn, transformer, text_encoder, vae = our_components("cpu", tokenizer_dir)  # CPU: the planner moves them
    if fmt != "bf16":
        quantize_blocks(transformer, fmt)
    noise = torch.randn(1, 128, 64, 64, generator=torch.Generator().manual_seed(0))
    resident = kn.KleinPipeline(transformer, text_encoder, vae, device="cuda", memory="resident")
    resident_s = median_time(lambda: resident(PROMPT, width=1024, height=1024, noise=noise), 1)
    for module in (transformer, text_encoder.model, vae):  # back to CPU memory: the budgeted runs start from there
        module.to("cpu")
    text_encoder._cache.clear()
    for budget_gib in (12, 8):
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(budget_gib * GIB / total)
        torch.cuda.reset_peak_memory_stats()
        pipeline = kn.KleinPipeline(transformer, text_encoder, vae, device="cuda", memory="auto")
        try:
            seconds = median_time(lambda: pipeline(PROMPT, width=1024, height=1024, noise=noise), 1)
            peak = torch.cuda.max_memory_allocated() / GIB
            print(f"{fmt:<12}{budget_gib:>6} GB{pipeline.plan.describe()[:46]:>48}{peak:>10.2f}{seconds:>8.2f}"
                  f"{seconds / resident_s:>12.2f}")
        except (MemoryError, torch.cuda.OutOfMemoryError) as e:
            print(f"{fmt:<12}{budget_gib:>6} GB  did not fit: {str(e)[:80]}")
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-diffusers", action="store_true")
    parser.add_argument("--skip-budgets", action="store_true")
    args = parser.parse_args()
    print(machine_line())
    if not torch.cuda.is_available():
        print("skipped: no CUDA device (this benchmark needs a GPU)")
        return 0
    from klein_nodes.testing import write_tokenizer

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = write_tokenizer(Path(tmp) / "tokenizer")
        latency(args, "cuda", tokenizer_dir)
        if not args.skip_budgets:
            budgets(args, tokenizer_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
