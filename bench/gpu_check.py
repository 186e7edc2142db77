"""One command for a GPU machine (about 8 minutes on one H100 or H200): the CUDA tests, the Triton kernels against
the CPU reference, end-to-end 1024² latency against diffusers, and runs under 8 and 12 GB budgets; it prints each
row and writes them, dated, as a bench/RESULTS.md section.

    python bench/gpu_check.py --out DIR [--append bench/RESULTS.md]
    python bench/gpu_check.py --tiny           # the same steps at tiny widths; on the CPU where there is no GPU

Random weights in klein 4B's real shapes (transformer 3072 wide, 5 + 20 blocks; Qwen3-4B; the FLUX.2 VAE):
timing needs no real weights. Steps, each skipped with a line saying so once `--minutes` are spent:

1. tests: pytest on the test files with CUDA cases (their CPU cases run too);
2. triton: each Triton dequantization kernel against the pack's torch code on the CPU, bit for bit, on the
   quantizer's real blocks and on random bytes; its speed against the same torch code on the GPU;
3. latency: text encoder + 4 steps + VAE decode at 1024², the pack with a bf16, fp8 and GGUF Q4_K transformer and
   diffusers' Flux2KleinPipeline in bf16 (the reference), in alternating rounds, per-round ratios;
4. budgets: the transformer formats again with every component starting in CPU memory, under 8 and 12 GB
   (torch.cuda.set_per_process_memory_fraction caps the allocator, memory_budget= tells the planner): the plan,
   the peak the planner predicted, the peak allocated, and the time against a resident run.

A bare GPU machine needs diffusers and gguf beside its torch and transformers (carry their wheels).
"""

import argparse
import datetime
import gc
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from machine import interleaved, machine_line, paired_text

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "A red fox asleep on a stack of old books, morning light"
GIB = 2**30
FORMATS = ("bf16", "fp8", "Q4_K")
CUDA_TESTS = ("tests/test_memory.py", "tests/test_triton_dequant.py", "tests/test_fp8.py", "tests/test_cli.py")


class Check:
    """The rows so far, and the time left."""

    def __init__(self, minutes, tiny, device):
        self.start, self.limit = time.perf_counter(), minutes * 60
        self.tiny, self.device = tiny, torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.lines = []

    def row(self, text):
        print(text, flush=True)
        self.lines.append(text)

    def time_left(self, step):
        spent = time.perf_counter() - self.start
        if spent < self.limit:
            return True
        self.row(f"- {step}: skipped, {spent / 60:.1f} of {self.limit / 60:.0f} minutes spent")
        return False


# ------------------------------------------------------------------------------------------------- models
def shapes(tiny):
    from klein_nodes.models.autoencoder import AutoEncoderParams
    from klein_nodes.models.text_encoder import Qwen3Params
    from klein_nodes.models.transformer import Flux2Params
    from klein_nodes.testing import TINY_QWEN3, TINY_TRANSFORMER, TINY_VAE16

    if tiny:  # 28 text layers, so klein's layer 27 exists
        return TINY_TRANSFORMER, Qwen3Params(**{**TINY_QWEN3.__dict__, "num_layers": 28}), TINY_VAE16
    return Flux2Params(), Qwen3Params(), AutoEncoderParams()


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
    return module.to(dtype).eval()


def our_components(check, tokenizer_dir, device):
    from klein_nodes.loaders.tokenizer import load_tokenizer
    from klein_nodes.models.autoencoder import AutoEncoder
    from klein_nodes.models.text_encoder import KleinTextEncoder, Qwen3
    from klein_nodes.models.transformer import Flux2

    flux, qwen, vae = shapes(check.tiny)
    with torch.device("meta"):
        transformer, text, autoencoder = Flux2(flux), Qwen3(qwen), AutoEncoder(vae)
    return (randomize(transformer, device, check.dtype),
            KleinTextEncoder(randomize(text, device, check.dtype), load_tokenizer(tokenizer_dir)),
            randomize(autoencoder, device, check.dtype))


def format_used(check, fmt):
    """Tiny widths have rows shorter than a K-quant block: Q4_0 stands in for Q4_K there."""
    return "Q4_0" if fmt == "Q4_K" and check.tiny else fmt


_quantized = {}  # (format, shape) -> packed weights: random weights, so each shape is quantized once and shared


def quantized(check, transformer, fmt):
    """`transformer` with every block linear in `fmt` (fp8, or GGML blocks from the pack's quantizer)."""
    from klein_nodes.quant.fp8 import Fp8Linear
    from klein_nodes.quant.linear import QuantizedLinear, replace_module
    from klein_nodes.quant.quantize import quantize

    fmt = format_used(check, fmt)
    if fmt == "bf16":
        return transformer
    for name, module in list(transformer.named_modules()):
        if not (isinstance(module, torch.nn.Linear) and name.startswith(("double_blocks", "single_blocks"))):
            continue
        device, shape = module.weight.device, tuple(module.weight.shape)
        if (fmt, shape) not in _quantized:
            weight = module.weight.detach().float().cpu()
            if fmt == "fp8":
                scale = weight.abs().max() / 448
                _quantized[fmt, shape] = ((weight / scale).to(torch.float8_e4m3fn), scale)
            else:
                _quantized[fmt, shape] = torch.from_numpy(np.ascontiguousarray(quantize(weight.numpy(), fmt)))
        if fmt == "fp8":
            weight, scale = _quantized[fmt, shape]
            layer = Fp8Linear(weight.to(device), scale.to(device), compute_dtype=transformer.dtype)
        else:
            layer = QuantizedLinear(_quantized[fmt, shape].reshape(-1).to(device), fmt, module.in_features,
                                    module.out_features, transformer.dtype)
        replace_module(transformer, name, layer)
    return transformer


def diffusers_pipeline(check, tokenizer_dir):
    import diffusers
    import transformers

    from klein_nodes.testing import QWEN3_CHAT_TEMPLATE, diffusers_config, qwen3_config, vae_diffusers_config

    flux, qwen, vae = shapes(check.tiny)
    config = {k: v for k, v in diffusers_config(flux).items() if not k.startswith("_")}
    full = qwen if check.tiny else type(qwen)(**{**qwen.__dict__, "num_layers": 36})  # diffusers loads all 36
    with torch.device("meta"):
        transformer = diffusers.Flux2Transformer2DModel(**config)
        text_encoder = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**qwen3_config(full)))
        autoencoder = diffusers.AutoencoderKLFlux2(**vae_diffusers_config(vae))
    tokenizer = transformers.Qwen2Tokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    pipeline = diffusers.Flux2KleinPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential"),
        vae=randomize(autoencoder, check.device, check.dtype),
        text_encoder=randomize(text_encoder, check.device, check.dtype), tokenizer=tokenizer,
        transformer=randomize(transformer, check.device, check.dtype), is_distilled=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# -------------------------------------------------------------------------------------------------- steps
def run_tests(check):
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
    check.row(f"- tests ({', '.join(Path(t).name for t in CUDA_TESTS)}): exit {result.returncode}, {summary}")
    if result.returncode:
        print(result.stdout[-6000:] + result.stderr[-2000:])


def triton_kernels(check, repeats):
    from klein_nodes.quant.dequant import BLOCK_SIZES, DEQUANTIZERS, TRITON_TYPES, triton_available

    if check.device.type != "cuda" or not triton_available(check.device):
        check.row("- triton: skipped (needs CUDA and Triton)")
        return
    from dequant import packed_matrix
    from klein_nodes.quant.triton_dequant import launch

    rows = 256 if check.tiny else 3072
    for qtype in TRITON_TYPES:
        block_size, type_size = BLOCK_SIZES[qtype]
        real = torch.from_numpy(np.ascontiguousarray(packed_matrix(qtype, rows, rows))).reshape(-1, type_size)
        noise = torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        exact = []
        for blocks in (real, noise):
            expected = DEQUANTIZERS[qtype](blocks).to(check.dtype)
            got = launch(qtype, blocks.cuda(), torch.empty(expected.shape, dtype=check.dtype, device="cuda")).cpu()
            exact.append(torch.equal(got.isnan(), expected.isnan())
                         and torch.equal(got.nan_to_num(), expected.nan_to_num()))
        blocks = real.cuda()
        out = torch.empty(blocks.shape[0], block_size, dtype=check.dtype, device="cuda")
        torch_s, kernel_s = interleaved([lambda: DEQUANTIZERS[qtype](blocks).to(check.dtype),
                                         lambda: launch(qtype, blocks, out)], repeats)
        check.row(f"- triton {qtype} {rows}x{rows}: {'bit-exact' if all(exact) else 'DIFFERS'} vs the CPU "
                  f"(real blocks {'ok' if exact[0] else 'differ'}, random bytes {'ok' if exact[1] else 'differ'}); "
                  f"{statistics.median(kernel_s) * 1e3:.3f} ms, torch on the GPU / kernel "
                  f"{paired_text(torch_s, kernel_s)}")


def latency(check, tokenizer_dir, repeats):
    import klein_nodes as kn

    size = 64 if check.tiny else 1024
    noise = torch.randn(1, 128, size // 16, size // 16, generator=torch.Generator().manual_seed(0))
    reference = diffusers_pipeline(check, tokenizer_dir)
    latents = noise.to(check.device, check.dtype)
    runs = [lambda: reference(prompt=PROMPT, height=size, width=size, num_inference_steps=4, guidance_scale=1.0,
                              latents=latents, output_type="pt")]
    for fmt in FORMATS:
        transformer, text_encoder, vae = our_components(check, tokenizer_dir, check.device)
        pipeline = kn.KleinPipeline(quantized(check, transformer, fmt), text_encoder, vae)

        def ours(pipeline=pipeline, text_encoder=text_encoder):
            text_encoder._cache.clear()  # the prompt is encoded every round, as diffusers does
            return pipeline(PROMPT, width=size, height=size, steps=4, noise=noise, tiled=False)

        runs.append(ours)
    samples = interleaved(runs, repeats)
    dtype = str(check.dtype).removeprefix("torch.")
    check.row(f"- latency {size}², 4 steps, text encoder + steps + decode, {repeats} rounds: diffusers {dtype} "
              f"{statistics.median(samples[0]):.3f} s")
    for fmt, times in zip(FORMATS, samples[1:]):
        label = dtype if fmt == "bf16" else format_used(check, fmt)
        check.row(f"  - ours {label}: {statistics.median(times):.3f} s, ours/diffusers "
                  f"{paired_text(times, samples[0])}")


def budgets(check, tokenizer_dir):
    import klein_nodes as kn
    from klein_nodes.sampling.memory import module_bytes

    size = 64 if check.tiny else 1024
    cuda = check.device.type == "cuda"
    noise = torch.randn(1, 128, size // 16, size // 16, generator=torch.Generator().manual_seed(0))
    for fmt in FORMATS:
        transformer, text_encoder, vae = our_components(check, tokenizer_dir, check.device)
        quantized(check, transformer, fmt)
        resident = kn.KleinPipeline(transformer, text_encoder, vae, device=check.device, memory="resident")
        start = time.perf_counter()
        expected = resident(PROMPT, width=size, height=size, noise=noise)
        resident_s = time.perf_counter() - start
        models = (transformer, text_encoder.model, vae)
        weights = sum(module_bytes(m) for m in models)
        for module in models:  # back to CPU memory: the budgeted runs start there
            module.to("cpu")
        # GPUs: 12 and 8 GB; tiny models: a little more than all their weights, then than the text encoder's
        tiny_budgets = (int(1.2 * weights), int(1.2 * module_bytes(text_encoder.model)))
        for budget in (12 * GIB, 8 * GIB) if not check.tiny else tiny_budgets:
            text_encoder._cache.clear()
            pipeline = kn.KleinPipeline(transformer, text_encoder, vae, device=check.device, memory_budget=budget)
            if cuda:
                torch.cuda.empty_cache()
                total = torch.cuda.get_device_properties(check.device).total_memory
                torch.cuda.set_per_process_memory_fraction(budget / total, check.device)
                torch.cuda.reset_peak_memory_stats(check.device)
            label = f"- {format_used(check, fmt)} under {budget / GIB:.3g} GiB"
            try:
                start = time.perf_counter()
                image = pipeline(PROMPT, width=size, height=size, noise=noise)
                seconds = time.perf_counter() - start
                allocated = f"{torch.cuda.max_memory_allocated(check.device) / GIB:.2f} GiB" if cuda else "n/a"
                same = "same image" if torch.equal(image, expected) else "IMAGE DIFFERS"
                check.row(f"{label}: {pipeline.plan.describe()}; peak allocated {allocated}; "
                          f"{seconds / resident_s:.2f}x the resident run's time; {same}")
            except (MemoryError, torch.cuda.OutOfMemoryError) as e:
                check.row(f"{label}: did not fit: {str(e)[:160]}")
            finally:
                if cuda:
                    torch.cuda.set_per_process_memory_fraction(1.0, check.device)
        del resident, pipeline, models, transformer, text_encoder, vae
        free_device_memory()


def free_device_memory():
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def section(check):
    where = torch.cuda.get_device_name(check.device) if check.device.type == "cuda" else "CPU (no GPU)"
    title = (f"## GPU check ({datetime.date.today().isoformat()}, {where}, torch {torch.__version__}"
             f"{', tiny widths' if check.tiny else ''})")
    return "\n".join([title, "", "`python bench/gpu_check.py`: " + machine_line(), "", *check.lines, ""])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny widths (the steps' code on any machine)")
    parser.add_argument("--minutes", type=float, default=7.5, help="skip the steps left after this long")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", default="tests,triton,latency,budgets")
    parser.add_argument("--out", help="write gpu_check.md (the RESULTS section) into this folder")
    parser.add_argument("--append", help="append the section to this file (bench/RESULTS.md)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("no CUDA device: run with --tiny to exercise the steps at tiny widths on the CPU")
        return 0
    check = Check(args.minutes, args.tiny, "cuda" if cuda else "cpu")
    print(machine_line())
    steps = args.steps.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        from klein_nodes.testing import write_tokenizer

        tokenizer_dir = write_tokenizer(Path(tmp) / "tokenizer")
        for name, step in (("tests", lambda: run_tests(check)), ("triton", lambda: triton_kernels(check, args.repeats)),
                           ("latency", lambda: latency(check, tokenizer_dir, args.repeats)),
                           ("budgets", lambda: budgets(check, tokenizer_dir))):
            if name in steps and check.time_left(name):
                step()
                free_device_memory()  # what the step made is gone: the next one starts on an empty card
    text = section(check)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.md").write_text(text, encoding="utf-8")
    if args.append:
        with open(args.append, "a", encoding="utf-8") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
