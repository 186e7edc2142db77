"""Tiled refine beyond 4 MP: peak memory against one tile's run plus the canvas, and time per tile, on CPU.

Tiny random models in the real layouts (transformer, 28-layer Qwen3, the real four VAE levels with narrow channels),
so the figures are the pack's own working memory, not a real model's weights. Each run is a fresh process (peak RSS =
its VmHWM): one 1024x1024 img2img tile alone, then tiled refines to each output size. The claim checked: peak
= one tile's run + the source and canvas (2 x H x W x 3 float32), whatever the output size.

    python bench/refine.py [--sizes 2048 4096] [--tile 1024]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import machine_line

CHILD = r"""
import json, sys, time
import torch
import klein_nodes as kn
from klein_nodes.loaders.tokenizer import find_tokenizer

def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

folder, paths, output, tile = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
transformer, text_encoder, vae = paths
pipe = kn.KleinPipeline(kn.load_transformer(transformer),
                        kn.load_text_encoder(text_encoder, tokenizer=find_tokenizer(text_encoder,
                                             folder + "/comfy/text_encoders/qwen25_tokenizer")), kn.load_vae(vae))
embeds = pipe.encode_prompt(["a detailed photograph"])
source = torch.rand(1, output // 2, output // 2, 3, generator=torch.Generator().manual_seed(0))
baseline = peak()
began = time.perf_counter()
if output == 0:  # one tile alone: the img2img run the refine makes per tile
    pipe(prompt_embeds=embeds, image=torch.rand(tile, tile, 3), width=tile, height=tile, denoise=0.35, seed=0)
    tiles = 1
else:
    counts = []
    kn.tiled_refine(pipe, source, prompt_embeds=embeds, scale=2, tile=tile, progress=lambda d, t: counts.append(t))
    tiles = counts[-1]
print(json.dumps({"baseline": baseline, "peak": peak(), "seconds": time.perf_counter() - began, "tiles": tiles}))
"""


def run(folder, paths, output, tile):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), json.dumps([str(p) for p in paths]), str(output),
                           str(tile)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--tile", type=int, default=1024)
    args = parser.parse_args()
    print(machine_line())
    from klein_nodes.testing import write_tiny_model_set

    with tempfile.TemporaryDirectory() as folder:
        paths = write_tiny_model_set(folder)
        one = run(folder, paths, 0, args.tile)
        tile_work = one["peak"] - one["baseline"]
        print(f"one {args.tile}x{args.tile} tile: {tile_work / 2**20:.0f} MiB over the loaded models, "
              f"{one['seconds']:.1f} s")
        print("output      tiles  s/tile  peak over models  canvas+source  one tile + canvas+source  ratio")
        for size in args.sizes:
            result = run(folder, paths, size, args.tile)
            work, canvases = result["peak"] - result["baseline"], 2 * size * size * 3 * 4
            expected = tile_work + canvases
            print(f"{size}x{size}  {result['tiles']:5d}  {result['seconds'] / result['tiles']:6.1f}  "
                  f"{work / 2**20:12.0f} MiB  {canvases / 2**20:9.0f} MiB  {expected / 2**20:19.0f} MiB  "
                  f"{work / expected:5.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
