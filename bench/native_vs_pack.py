"""Native ComfyUI klein vs this pack, side by side in one real ComfyUI server on the same files (CPU).

    /path/to/ComfyUI/venv/bin/python bench/native_vs_pack.py /path/to/ComfyUI [--models DIR] [--blocks 1]
        [--qwen-layers 36] [--size 512]

Random weights at klein 4B's real widths (transformer 3072 wide with `--blocks` double and single blocks, Qwen3-4B
with `--qwen-layers` layers, the full FLUX.2 VAE), written once into `--models` (default: a temporary folder).
Each side runs ComfyUI's official distilled text-to-image template (native) or the pack's equivalent graph three
times: cold (models loaded by the graph), warm (a new seed) and with a new prompt. Before each side the server
unloads every model and the peak RSS counter of the server process is reset, so each peak is that side's own.
A third side runs the pack with fp32 weights, the precision native ComfyUI uses on a CPU, to compare images at
matched precision. Then both run once more (cold only) on fp8 files our quantizer wrote from the same transformer
and text encoder: each side's fp8 image is compared with its own bf16 image, so native's reading of our fp8 files
is measured against ours. Prints a table and the pack/native ratios.

`--text-encode ROUNDS` times text encoding alone instead, in one server with both encoders loaded: core's Load CLIP
(type flux2) + CLIPTextEncode against Klein Load Text Encoder + Klein Text Encode, on the same Qwen3-4B file, with
a new prompt each round (the same for both sides), in turns (every other round the pack goes first), after one
uncounted cold run each. Prints each round's times and pack/core ratio, the ratios' median (min-max), the RSS each
side's cold run added (after it and at its peak) and the server's peak RSS during the rounds. The server inherits
this process's environment, so `KLEIN_CPU_PREPACK=0` gives the pack's plain matmuls for comparison.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import comfyui_workflows as server  # noqa: E402
from machine import machine_line, paired_text  # noqa: E402

PROMPTS = ("A hedgehog wearing a tiny party hat surrounded by confetti",
           "A lighthouse on a cliff at dusk, long exposure, waves crashing below")
TEMPLATE = Path(__file__).resolve().parents[2] / "shared/reference/comfy_klein_templates/klein4b_distilled_t2i_api.json"
FILES = {"transformer": "klein-bench.safetensors", "text_encoder": "qwen-bench.safetensors",
         "vae": "flux2-vae.safetensors"}
FP8_FILES = {**FILES, "transformer": "klein-bench-fp8.safetensors", "text_encoder": "qwen-bench-fp8.safetensors"}


def write_models(models, blocks, qwen_layers):
    import torch

    from klein_nodes.models.autoencoder import AutoEncoderParams
    from klein_nodes.models.text_encoder import Qwen3Params
    from klein_nodes.models.transformer import Flux2Params
    from klein_nodes.loaders.convert import quantize_file
    from safetensors.torch import save_file

    from klein_nodes.testing import qwen3_state_dict, write_transformer, write_vae

    paths = {"transformer": models / "diffusion_models", "text_encoder": models / "text_encoders",
             "vae": models / "vae"}
    paths = {kind: folder / FILES[kind] for kind, folder in paths.items()}
    if not paths["transformer"].exists():
        write_transformer(paths["transformer"], Flux2Params(depth=blocks, depth_single_blocks=blocks))
    if not paths["text_encoder"].exists():  # built in bf16 directly: the fp32 twin of 36 layers would need 16 GB
        paths["text_encoder"].parent.mkdir(parents=True, exist_ok=True)
        save_file(qwen3_state_dict(Qwen3Params(num_layers=qwen_layers), dtype=torch.bfloat16),
                  str(paths["text_encoder"]))
    if not paths["vae"].exists():
        write_vae(paths["vae"], AutoEncoderParams(), dtype=torch.bfloat16)
    for kind in ("transformer", "text_encoder"):
        fp8 = paths[kind].with_name(FP8_FILES[kind])
        if not fp8.exists():
            quantize_file(paths[kind], fp8, "fp8")


def native_graph(size, seed, prompt, files=FILES):
    graph = json.loads(TEMPLATE.read_text())
    graph["1"]["inputs"]["unet_name"] = files["transformer"]
    graph["2"]["inputs"]["clip_name"] = files["text_encoder"]
    graph["3"]["inputs"]["vae_name"] = files["vae"]
    graph["4"]["inputs"]["text"] = prompt
    graph["9"]["inputs"]["noise_seed"] = seed
    for node in ("8", "10"):
        graph[node]["inputs"].update(width=size, height=size)
    return graph


def pack_graph(size, seed, prompt, dtype="default", files=FILES):
    nodes = {
        "1": ("KleinTransformerLoader", {"model_name": files["transformer"], "weight_dtype": dtype}),
        "2": ("KleinTextEncoderLoader", {"text_encoder_name": files["text_encoder"], "weight_dtype": dtype}),
        "3": ("KleinVAELoader", {"vae_name": files["vae"], "weight_dtype": dtype}),
        "4": ("KleinTextEncode", {"text_encoder": ["2", 0], "text": prompt}),
        "5": ("KleinEmptyLatent", {"width": size, "height": size, "aspect": "custom", "megapixels": 1.0,
                                   "batch_size": 1}),
        "6": ("KleinSampler", {"model": ["1", 0], "positive": ["4", 0], "latent": ["5", 0], "seed": seed, "steps": 4,
                               "guidance": 1.0, "denoise": 1.0}),
        "7": ("KleinVAEDecode", {"vae": ["3", 0], "latent": ["6", 0], "tiled": "disable"}),
        "8": ("SaveImage", {"images": ["7", 0], "filename_prefix": f"pack-{dtype}"}),
    }
    return {key: {"class_type": kind, "inputs": inputs} for key, (kind, inputs) in nodes.items()}


def rss_gb(pid, field):
    """VmHWM (peak) or VmRSS (now) of process `pid`, in GB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    return float("nan")


RUNS = ((0, PROMPTS[0]), (1, PROMPTS[0]), (0, PROMPTS[1]))  # cold, warm (new seed), new prompt


def run_side(url, pid, make_graph, size, runs=RUNS):
    """[(status, seconds, files)] per run, and the server's RSS in GB at the start and at its peak."""
    server.request(f"{url}/free", {"unload_models": True, "free_memory": True})
    time.sleep(2)
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = rss_gb(pid, "VmRSS")
    results = [server.run(url, make_graph(size, seed, prompt), timeout=3600) for seed, prompt in runs]
    return results, (start, rss_gb(pid, "VmHWM"))


def encode_graph(side, prompt, files=FILES):
    """One side's text encoding, with a preview of the other side's loader so ComfyUI keeps both loaded (its cache
    drops the outputs of nodes a prompt does not use)."""
    core = {"c1": ("CLIPLoader", {"clip_name": files["text_encoder"], "type": "flux2", "device": "default"}),
            "c2": ("CLIPTextEncode", {"clip": ["c1", 0], "text": prompt}), "c3": ("PreviewAny", {"source": ["c2", 0]})}
    pack = {"k1": ("KleinTextEncoderLoader", {"text_encoder_name": files["text_encoder"], "weight_dtype": "default"}),
            "k2": ("KleinTextEncode", {"text_encoder": ["k1", 0], "text": prompt}),
            "k3": ("PreviewAny", {"source": ["k2", 0]})}
    ours, other = (core, pack) if side == "core" else (pack, core)
    nodes = {**ours, **({key: value for key, value in other.items() if key.endswith("1")}
                        | {"keep": ("PreviewAny", {"source": [next(iter(other)), 0]})})}
    return {key: {"class_type": kind, "inputs": inputs} for key, (kind, inputs) in nodes.items()}


def text_encode(url, pid, rounds):
    """{side: [(status, seconds, ...)]} of `rounds` paired rounds after a cold run each, and the RSS figures."""
    server.request(f"{url}/free", {"unload_models": True, "free_memory": True})
    time.sleep(2)
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    rss = {"start": rss_gb(pid, "VmRSS")}
    cold = {}
    for side in ("core", "pack"):
        before = rss_gb(pid, "VmRSS")
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        cold[side] = server.run(url, encode_graph(side, PROMPTS[0]), timeout=3600)
        rss[side] = rss_gb(pid, "VmRSS") - before, rss_gb(pid, "VmHWM") - before
        print(f"{side} cold: {cold[side][0]} {cold[side][1]:.1f} s, RSS +{rss[side][0]:.2f} GB after it, "
              f"+{rss[side][1]:.2f} GB at its peak", flush=True)
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    runs = {"core": [], "pack": []}
    for index in range(rounds):
        prompt = f"{PROMPTS[1]}, variation {index + 1}"
        for side in ("core", "pack") if index % 2 == 0 else ("pack", "core"):
            runs[side].append(server.run(url, encode_graph(side, prompt), timeout=3600))
        print(f"round {index + 1}: core {runs['core'][-1][1]:.1f} s, pack {runs['pack'][-1][1]:.1f} s, "
              f"pack/core {runs['pack'][-1][1] / runs['core'][-1][1]:.2f} (load {os.getloadavg()[0]:.2f})", flush=True)
    rss["peak"] = rss_gb(pid, "VmHWM")
    return cold, runs, rss


def report_text_encode(cold, runs, rss, args):
    for name, results in [("cold", list(cold.values()))] + list(runs.items()):
        failed = [r for r in results if r[0] != "success"]
        if failed:
            sys.exit(f"{name}: {failed[0][0]}: {failed[0][3]}")
    core, pack = ([r[1] for r in runs[side]] for side in ("core", "pack"))
    print(f"\ntext encoding, {args.qwen_layers}-layer Qwen3-4B bf16 file, both loaded in one server, a new prompt each "
          f"round, KLEIN_CPU_PREPACK={os.environ.get('KLEIN_CPU_PREPACK', '(unset)')}")
    print(f"{'round':>5} {'core s':>8} {'pack s':>8} {'pack/core':>10}")
    for index, (c, p) in enumerate(zip(core, pack), start=1):
        print(f"{index:>5} {c:8.1f} {p:8.1f} {p / c:10.2f}")
    print(f"median: core {statistics.median(core):.1f} s, pack {statistics.median(pack):.1f} s; per-round pack/core "
          f"{paired_text(pack, core)}; cold: core {cold['core'][1]:.1f} s, pack {cold['pack'][1]:.1f} s")
    print(f"RSS: server at start {rss['start']:.2f} GB; core's cold run added {rss['core'][0]:.2f} GB (peak "
          f"+{rss['core'][1]:.2f}), the pack's {rss['pack'][0]:.2f} GB (peak +{rss['pack'][1]:.2f}); server peak "
          f"during the rounds {rss['peak']:.2f} GB; load average now {os.getloadavg()[0]:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("comfyui", type=Path)
    parser.add_argument("--models", type=Path, help="where the random models are written once and reused")
    parser.add_argument("--blocks", type=int, default=1, help="double and single transformer blocks (klein 4B: 5, 20)")
    parser.add_argument("--qwen-layers", type=int, default=36, help="Qwen3-4B has 36; the pack reads 27")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--text-encode", type=int, metavar="ROUNDS", help="time text encoding alone, core vs pack")
    args = parser.parse_args()
    server.import_pack()
    print(machine_line())
    base = Path(tempfile.mkdtemp(prefix="klein-native-"))
    server.base_folder(base)
    models = (args.models or base / "models").resolve()
    write_models(models, args.blocks, args.qwen_layers)
    if args.models:
        (base / "models").symlink_to(models)
    sides = {"native": native_graph, "pack": pack_graph,
             "pack fp32": lambda size, seed, prompt: pack_graph(size, seed, prompt, "fp32")}
    results = {}
    with open(base / "server.log", "w") as log:
        process, url = server.start(args.comfyui.resolve(), base, None, log)  # ComfyUI's own Qwen tokenizer
        try:
            if args.text_encode:
                report_text_encode(*text_encode(url, process.pid, args.text_encode), args)
                print(f"server log {base / 'server.log'}")
                return
            for name, make_graph in sides.items():
                results[name] = run_side(url, process.pid, make_graph, args.size)
                print(f"{name}: {[r[:2] for r in results[name][0]]}, RSS start/peak {results[name][1]} GB", flush=True)
            fp8 = {"native fp8": lambda size, seed, prompt: native_graph(size, seed, prompt, FP8_FILES),
                   "pack fp8": lambda size, seed, prompt: pack_graph(size, seed, prompt, files=FP8_FILES)}
            for name, make_graph in fp8.items():
                results[name] = run_side(url, process.pid, make_graph, args.size, RUNS[:1])
        finally:
            process.terminate()
            process.wait(30)
    version = (args.comfyui / "comfyui_version.py").read_text().split('"')[1]
    print(f"\nComfyUI {version}, CPU, {args.size}x{args.size}, 4 steps; transformer 3072 wide, {args.blocks}+"
          f"{args.blocks} blocks; Qwen3-4B widths, {args.qwen_layers} layers; full VAE; "
          f"server log {base / 'server.log'}")
    print(f"{'side':10} {'cold s':>8} {'warm s':>8} {'new prompt s':>13} {'RSS at start':>13} {'peak RSS GB':>12}")
    for name, (runs, (start, peak)) in results.items():
        failed = [r for r in runs if r[0] != "success"]
        if failed:
            sys.exit(f"{name}: {failed[0][0]}: {failed[0][3]}")
        seconds = [f"{run[1]:.1f}" for run in runs] + ["-"] * (len(RUNS) - len(runs))
        print(f"{name:10} {seconds[0]:>8} {seconds[1]:>8} {seconds[2]:>13} {start:13.2f} {peak:12.2f}")
    native, pack = results["native"], results["pack"]
    print("pack/native: " + ", ".join(f"{label} {pack[0][i][1] / native[0][i][1]:.2f}x"
                                      for i, label in enumerate(("cold", "warm", "new prompt")))
          + f", peak RSS {pack[1][1] / native[1][1]:.2f}x")
    first_image = {name: runs[0][2][0] for name, (runs, _) in results.items()}
    for name, other in (("pack", "native"), ("pack fp32", "native"), ("native fp8", "native"), ("pack fp8", "pack")):
        worst = server.max_difference(base / "output", first_image[name], first_image[other])
        print(f"same seed and prompt, {name} vs {other}: max pixel difference {worst:.0f}/255")


if __name__ == "__main__":
    main()
