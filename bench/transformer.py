"""Transformer benchmark: forward speed against diffusers, and peak memory while loading.

1. Forward time of our `Flux2` against diffusers' `Flux2Transformer2DModel` with the same random weights (fp32 or
   bf16; a mid-size config or klein 4B's widths), in one process: outputs are compared first, then both run in
   interleaved rounds and the per-round ratios are printed. Goal: ours / diffusers <= 1.0 (<= 0.9 for klein widths
   in bf16).
2. Peak RSS of a fresh process that loads a ~2 GB random bf16 BFL-layout file (or its Q8_0 GGUF) with
   `kn.load_transformer` and runs one tiny forward (so every weight is touched; `--rss-image-tokens` for a larger
   one), as a ratio to the file size.
   Goal: <= 1.2 (GGUF: <= 1.15).
   Peak is the child's VmHWM (ru_maxrss on non-Linux): on Linux ru_maxrss carries the parent's peak across
   exec. Weights are memory-mapped, so most pages become resident during the forward, not the load.
   The file is written to a temporary directory that is always removed.

Run from the repository root with the package installed (diffusers needed for part 1):

    python bench/transformer.py                 # both parts
    python bench/transformer.py --skip-rss      # forward timing only
    python bench/transformer.py --skip-forward --tmpdir /big/disk
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import klein_nodes as kn
from machine import interleaved, machine_line, paired
from klein_nodes.models.transformer import Flux2, Flux2Params
from klein_nodes.sampling.packing import image_ids, text_ids
from klein_nodes.testing import bfl_to_diffusers, diffusers_config, random_state_dict, write_transformer

SPEED_GOAL = 1.0
SPEED_GOAL_KLEIN_BF16 = 0.9
RSS_GOAL = {"safetensors": 1.2, "gguf": 1.15}

# Mid-size config for the forward comparison (~70M params).
FORWARD_PARAMS = Flux2Params(
    in_channels=128, out_channels=128, context_in_dim=1536, hidden_size=768, num_heads=6,
    depth=2, depth_single_blocks=4, mlp_hidden_dim=2304, axes_dim=(32, 32, 32, 32),
)
# klein 4B's widths (3072 wide, 24 heads, 7680 text features), one double and two single blocks.
KLEIN_PARAMS = Flux2Params(
    in_channels=128, out_channels=128, context_in_dim=7680, hidden_size=3072, num_heads=24,
    depth=1, depth_single_blocks=2, mlp_hidden_dim=9216, axes_dim=(32, 32, 32, 32),
)
# ~1.0e9 params, ~2 GB in bf16: klein-4B-like widths, fewer blocks.
RSS_PARAMS = Flux2Params(
    in_channels=128, out_channels=128, context_in_dim=7680, hidden_size=2048, num_heads=16,
    depth=4, depth_single_blocks=9, mlp_hidden_dim=6144, axes_dim=(32, 32, 32, 32),
)


def make_inputs(params, text_tokens, height, width, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, height * width, params.in_channels, generator=g)
    ctx = torch.randn(1, text_tokens, params.context_in_dim, generator=g)
    t = torch.tensor([0.7])
    return x, image_ids(height, width), t, ctx, text_ids(text_tokens)


def bench_forward(args):
    from diffusers import Flux2Transformer2DModel

    params = KLEIN_PARAMS if args.config == "klein" else FORWARD_PARAMS
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    side = int(round(args.image_tokens ** 0.5))
    assert side * side == args.image_tokens, "--image-tokens must be a square"
    x, x_ids, t, ctx, ctx_ids = make_inputs(params, args.text_tokens, side, side)
    x, ctx = x.to(dtype), ctx.to(dtype)

    with tempfile.TemporaryDirectory(prefix="klein-bench-") as tmp:
        path, state = write_transformer(Path(tmp) / "fwd.safetensors", params, dtype=dtype)
        ours = kn.load_transformer(path)  # the real loading path; the file's dtype
        cfg = {k: v for k, v in diffusers_config(params).items() if k != "_class_name"}
        ref = Flux2Transformer2DModel(**cfg)
        ref.load_state_dict(bfl_to_diffusers(state), strict=True)
        ref.to(dtype).requires_grad_(False).eval()
        del state

        def run_ours():
            return ours(x, x_ids[None], t, ctx, ctx_ids[None])

        def run_ref():
            return ref(hidden_states=x, encoder_hidden_states=ctx, timestep=t,
                       img_ids=x_ids, txt_ids=ctx_ids, return_dict=False)[0]

        n_params = sum(p.numel() for p in ours.parameters())
        print(machine_line())
        print(f"## Forward: ours vs diffusers ({n_params / 1e6:.1f}M params, {args.config} widths, {args.dtype}, "
              f"batch 1, {args.text_tokens} text + {args.image_tokens} image tokens)")
        with torch.inference_mode():
            a, b = run_ours(), run_ref()
            diff = (a - b).abs().max().item()
            scale = b.abs().max().item()
            ok = diff <= (1e-4 if dtype == torch.float32 else 5e-2) * max(scale, 1.0)
            print(f"max |ours - diffusers| = {diff:.3e}  (max |out| = {scale:.3g})  -> {'match' if ok else 'MISMATCH'}")
            if not ok:
                raise SystemExit("outputs differ; not timing")
            ours_times, ref_times = interleaved([run_ours, run_ref], args.repeats, args.warmup)

    print(f"{'':10} {'median s':>9} {'min s':>8} {'max s':>8}   "
          f"({args.repeats} interleaved rounds, {args.warmup} warmup)")
    for name, values in (("ours", ours_times), ("diffusers", ref_times)):
        print(f"{name:10} {statistics.median(values):9.4f} {min(values):8.4f} {max(values):8.4f}")
    low, ratio, high = paired(ours_times, ref_times)
    goal = SPEED_GOAL_KLEIN_BF16 if (args.config, args.dtype) == ("klein", "bf16") else SPEED_GOAL
    print(f"paired ratio ours/diffusers: min {low:.3f} median {ratio:.3f} max {high:.3f}   "
          f"(goal <= {goal}: {'met' if ratio <= goal else 'NOT met'})")
    return ratio


# Runs in a fresh interpreter: argv[1] = checkpoint path. Prints one JSON line.
CHILD = r"""
import json, resource, sys, time
import psutil, torch
import klein_nodes as kn

def rss():  # current RSS, bytes
    return psutil.Process().memory_info().rss

def maxrss():  # ru_maxrss, bytes (Linux reports KiB)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def peak():
    # Linux: ru_maxrss survives exec, so a child starts with its parent's peak; VmHWM is this process's own.
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return maxrss()

out = {"baseline_rss": rss(), "baseline_peak": peak(), "baseline_maxrss": maxrss()}
start = time.perf_counter()
model = kn.load_transformer(sys.argv[1])
out.update(load_s=time.perf_counter() - start, load_rss=rss(), load_peak=peak())

p = model.params
side = int(sys.argv[2])
x, ctx = torch.randn(1, side * side, p.in_channels), torch.randn(1, 4, p.context_in_dim)
x_ids = torch.cartesian_prod(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)), torch.zeros(1))
ctx_ids = torch.zeros(4, 4)
ctx_ids[:, 3] = torch.arange(4)
start = time.perf_counter()
with torch.inference_mode():
    y = model(x, x_ids, torch.tensor([0.5]), ctx, ctx_ids)
assert torch.isfinite(y.float()).all()
out.update(forward_s=time.perf_counter() - start, forward_rss=rss(), forward_peak=peak(),
           dtype=str(model.dtype))
print(json.dumps(out))
"""


def bench_rss(args):
    params = RSS_PARAMS
    with torch.device("meta"):
        meta = Flux2(params)
    n_params = sum(p.numel() for p in meta.parameters())
    need = n_params * 2
    tmp_root = args.tmpdir or tempfile.gettempdir()
    free = shutil.disk_usage(tmp_root).free
    print(f"\n## Peak RSS loading a bf16 file ({n_params / 1e9:.3f}e9 params, {need / 1e9:.2f} GB) in a fresh process")
    if free < need * 1.2 + 1e9:
        print(f"skipped: only {free / 1e9:.1f} GB free in {tmp_root}, "
              f"need ~{need * 1.2 / 1e9 + 1:.1f} GB (use --tmpdir)")
        return None

    with tempfile.TemporaryDirectory(prefix="klein-bench-", dir=tmp_root) as tmp:
        path = Path(tmp) / "big.safetensors"
        start = time.perf_counter()
        state = random_state_dict(meta, seed=0, dtype=torch.bfloat16)  # generated per tensor, kept in bf16
        from safetensors.torch import save_file
        save_file(state, str(path))
        del state
        size = path.stat().st_size
        print(f"wrote {size / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s")

        if args.rss_format == "gguf":  # the same weights as our Q8_0 GGUF (norms, embeddings, modulation stay BF16/F32)
            from klein_nodes.loaders.convert import quantize_file

            path = quantize_file(path, Path(tmp) / "big-Q8_0.gguf", "Q8_0")[0]
            size = Path(path).stat().st_size
            print(f"quantized to {Path(path).name}: {size / 1e9:.2f} GB")
        side = round(args.rss_image_tokens ** 0.5)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(side)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])

    base = r["baseline_rss"]
    print(f"child baseline RSS (torch + klein_nodes imported): {base / 1e9:.2f} GB; dtype {r['dtype']}; "
          f"load {r['load_s']:.1f} s, forward of {side * side} image + 4 text tokens {r['forward_s']:.1f} s")
    print(f"{'':14} {'peak +GB':>9} {'peak/file':>10} {'now +GB':>9} {'now/file':>9}")
    ratio = None
    for stage in ("load", "forward"):
        peak_inc, now_inc = r[f"{stage}_peak"] - base, r[f"{stage}_rss"] - base
        ratio = peak_inc / size
        print(f"{'after ' + stage:14} {peak_inc / 1e9:9.2f} {ratio:10.3f} {now_inc / 1e9:9.2f} {now_inc / size:9.3f}")
    print(f"(peak = the child's VmHWM; its ru_maxrss already read {r['baseline_maxrss'] / 1e9:.2f} GB before loading: "
          f"this process's peak, inherited across exec)")
    goal = RSS_GOAL[args.rss_format]
    print(f"peak RSS increase / file size = {ratio:.3f}   (goal <= {goal}: {'met' if ratio <= goal else 'NOT met'})")
    return ratio


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-forward", action="store_true", help="skip the speed comparison with diffusers")
    parser.add_argument("--skip-rss", action="store_true", help="skip the 2 GB load-memory measurement")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per model (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per model first (default 2)")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--config", choices=("mid", "klein"), default="mid", help="mid: ~70M params; klein: klein "
                        "4B's widths with 1 double + 2 single blocks")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--rss-format", choices=("safetensors", "gguf"), default="safetensors",
                        help="the file the memory measurement loads: the bf16 safetensors, or its Q8_0 GGUF")
    parser.add_argument("--image-tokens", type=int, default=256, help="a square number")
    parser.add_argument("--tmpdir", help="where to write the temporary 2 GB file (default: system temp)")
    parser.add_argument("--rss-image-tokens", type=int, default=4,
                        help="image tokens of the forward after the load (a square; default 4: too few rows to pack "
                             "or widen a weight, so the peak is the weights'; 1024: with one layer's CPU copy)")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, python {sys.version.split()[0]}")
    if not args.skip_forward:
        bench_forward(args)
    if not args.skip_rss:
        bench_rss(args)


if __name__ == "__main__":
    main()
