"""VAE decode: time and peak memory, tiled vs untiled, same random FLUX.2 VAE (real architecture), on CPU.

Each mode runs in a fresh process (peak RSS = the child's own VmHWM, reset before decoding where the kernel
allows), one after the other, so their memory peaks don't mix. Also prints the tiled-vs-untiled difference.

    python bench/vae.py [--size 768] [--tile 32] [--margin 13] [--repeats 2]
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from machine import machine_line, paired_text
from klein_nodes.models.autoencoder import AutoEncoder, AutoEncoderParams
from klein_nodes.testing import random_state_dict

CHILD = r"""
import json, sys, time
import psutil, torch
import klein_nodes as kn
from klein_nodes.sampling import tiling

def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

path, size, mode, tile, margin, out = (sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]),
                                       sys.argv[6])
vae = kn.load_vae(path)
z = torch.randn(1, 128, size // 16, size // 16, generator=torch.Generator().manual_seed(0))
with torch.inference_mode():
    vae.decode(z[..., :2, :2])  # touch the weights so they count in the baseline, not in the decode
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
except OSError:
    pass
before = psutil.Process().memory_info().rss
start = time.perf_counter()
with torch.inference_mode():
    image = tiling.tiled_decode(vae, z, tile=tile, margin=margin) if mode == "tiled" else vae.decode(z)
seconds = time.perf_counter() - start
torch.save(image, out)
print(json.dumps({"seconds": seconds, "peak": peak() - before}))
"""


def run(path, size, mode, tile, margin, out):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(size), mode, str(tile), str(margin), str(out)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{mode} decode failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=768, help="output side in pixels (multiple of 16)")
    parser.add_argument("--tile", type=int, default=32, help="tile side in latent pixels (image / 8)")
    parser.add_argument("--margin", type=int, default=13, help="context margin in latent pixels")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the two fresh processes")
    args = parser.parse_args()
    print(machine_line())
    with torch.device("meta"):
        meta = AutoEncoder(AutoEncoderParams())
    with tempfile.TemporaryDirectory(prefix="klein-vae-bench-") as tmp:
        path = Path(tmp) / "flux2-vae.safetensors"
        state = random_state_dict(meta, seed=0)
        state["bn.running_var"] = state["bn.running_var"].abs()
        state["bn.num_batches_tracked"] = torch.tensor(0)
        save_file(state, str(path))
        results = {"untiled": [], "tiled": []}
        for round_ in range(args.repeats):  # fresh processes in turns, every other round tiled first
            for mode in results if round_ % 2 == 0 else reversed(results):
                results[mode].append(run(path, args.size, mode, args.tile, args.margin, Path(tmp) / f"{mode}.pt"))
        untiled, tiled = (torch.load(Path(tmp) / f"{m}.pt") for m in ("untiled", "tiled"))
    print(f"FLUX.2 VAE (random weights, real architecture), {args.size}x{args.size} decode, fp32; tiles of "
          f"{args.tile * 8} px with {args.margin * 8} px context; {args.repeats} rounds, medians")
    print(f"{'mode':<10}{'seconds':>10}{'peak MB':>10}")
    for mode, rounds in results.items():
        print(f"{mode:<10}{statistics.median(r['seconds'] for r in rounds):>10.2f}"
              f"{statistics.median(r['peak'] for r in rounds) / 2**20:>10.0f}")
    seconds, peaks = ([[r[key] for r in results[mode]] for mode in results] for key in ("seconds", "peak"))
    print(f"tiled/untiled per round, median (min-max): time x{paired_text(seconds[1], seconds[0])}, "
          f"peak memory x{paired_text(peaks[1], peaks[0])}")
    colour = (tiled.mean((2, 3)) - untiled.mean((2, 3))).abs().max().item()
    print(f"tiled vs untiled: max abs {(tiled - untiled).abs().max().item():.4f}, mean colour {colour:.4f} "
          f"(output range ±{untiled.abs().max().item():.2f}; random weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
