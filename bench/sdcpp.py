"""stable-diffusion.cpp (ggml) against this pack on the CPU, side by side on the same files.

    python bench/sdcpp.py [--sd-cli PATH] [--models DIR] [--sizes 512,1024] [--types Q8_0,Q4_K] [--rounds 2]

sd-cli comes from `--sd-cli`, from a build left in `--work`, or is built there (CMake, Release, the CPU's own
instruction set) from the sdist of stable-diffusion-cpp-python 0.4.7, which vendors stable-diffusion.cpp with
FLUX.2 klein support. The shared files are written once into `--models`: a transformer at klein 4B's widths with
1 double and 2 single blocks (random weights; bf16, then GGUF Q8_0 and Q4_K from the pack's own quantizer), the
full 36-layer Qwen3-4B in bf16 (ComfyUI's single-file layout) and the FLUX.2 VAE (bf16); the tokenizer is the real
Qwen vocabulary (the pack reads it from files, sd.cpp has it built in).

Each round runs both engines in turns (every other round the pack first), each as a fresh process generating one
image (4 steps, the same prompt and seed) and saving a PNG. Stages: load (sd.cpp reads every weight into memory;
the pack maps the files, so its loading happens as the weights are first used), text encode, sampling, VAE decode,
and the whole run (process start to exit). Peak RSS is each process's own (wait4's ru_maxrss). Prints every
round and, per size and type, the ratio ours/sd.cpp per stage (median, min-max over rounds) and both peak RSS.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from machine import machine_line, paired_text

ROOT = Path(__file__).resolve().parents[1]
SDIST = "stable-diffusion-cpp-python==0.4.7"
PROMPT = "A hedgehog wearing a tiny party hat surrounded by confetti"
TOKENIZER = ROOT.parent / "shared" / "data" / "qwen25_tokenizer"
STAGES = ("load", "text", "sampling", "decode", "whole")
SDCPP_STAGES = {"text": r"get_learned_condition completed, taking ([\d.]+)s",
                "sampling": r"sampling completed, taking ([\d.]+)s",
                "decode": r"decode_first_stage completed, taking ([\d.]+)s",
                "load": r"loading tensors completed, taking ([\d.]+)s"}


def sd_cli(args):
    """The sd-cli binary: given, built before in `--work`, or built there now from the sdist."""
    if args.sd_cli:
        return Path(args.sd_cli)
    work = Path(args.work)
    found = sorted(work.glob("stable_diffusion_cpp_python-*/vendor/stable-diffusion.cpp/build/bin/sd-cli"))
    if found:
        return found[-1]
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", SDIST, "-d", work],
                   check=True)
    with tarfile.open(next(work.glob("stable_diffusion_cpp_python-*.tar.gz"))) as sdist:
        sdist.extractall(work, filter="data")
    source = next(work.glob("stable_diffusion_cpp_python-*/vendor/stable-diffusion.cpp"))
    subprocess.run(["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release"], cwd=source, check=True)
    subprocess.run(["cmake", "--build", "build", "-j", str(os.cpu_count()), "--target", "sd-cli"], cwd=source,
                   check=True)
    return source / "build" / "bin" / "sd-cli"


def write_files(models, types, tiny=False):
    """The shared files (written once); `tiny`: the same layouts at tiny widths (the bench's own test)."""
    import torch
    from safetensors.torch import save_file

    from klein_nodes.loaders.convert import quantize_file
    from klein_nodes.models.autoencoder import AutoEncoderParams
    from klein_nodes.models.text_encoder import Qwen3Params
    from klein_nodes.models.transformer import Flux2Params
    from klein_nodes.testing import (TINY_QWEN3, TINY_TRANSFORMER, TINY_VAE16, qwen3_state_dict, write_tokenizer,
                                     write_transformer, write_vae)

    files = {"transformer": models / "klein-bench-1-2.safetensors", "tokenizer": TOKENIZER,
             "text_encoder": models / "qwen-bench-36.safetensors", "vae": models / "flux2-vae.safetensors"}
    transformer, text_encoder, vae = Flux2Params(), Qwen3Params(), AutoEncoderParams()
    if tiny:
        transformer, text_encoder, vae = TINY_TRANSFORMER, TINY_QWEN3, TINY_VAE16
        files["tokenizer"] = write_tokenizer(models / "tokenizer")
    models.mkdir(parents=True, exist_ok=True)
    if not files["transformer"].exists():
        write_transformer(files["transformer"], Flux2Params(**{**transformer.__dict__, "depth": 1,
                                                              "depth_single_blocks": 2}))
    if not files["text_encoder"].exists():  # in bf16 directly: an fp32 twin of 36 layers would need 16 GB
        layers = Qwen3Params(**{**text_encoder.__dict__, "num_layers": 36})
        save_file(qwen3_state_dict(layers, dtype=torch.bfloat16), str(files["text_encoder"]))
    if not files["vae"].exists():
        write_vae(files["vae"], vae, dtype=torch.bfloat16)
    for qtype in types:
        files[qtype] = files["transformer"].with_name(f"klein-bench-1-2-{qtype}.gguf")
        if not files[qtype].exists():
            quantize_file(files["transformer"], files[qtype], qtype)
    return files


def timed_process(command, **kwargs):
    """(seconds, peak RSS in bytes, stdout + stderr) of one child process."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"{command[0]} exited {child.returncode}:\n{output[-3000:]}")
    return seconds, usage.ru_maxrss * 1024, output


def run_sdcpp(cli, files, qtype, size, out):
    command = [str(cli), "--diffusion-model", str(files[qtype]), "--vae", str(files["vae"]), "--llm",
               str(files["text_encoder"]), "-p", PROMPT, "--cfg-scale", "1.0", "--steps", "4", "--sampling-method",
               "euler", "-W", str(size), "-H", str(size), "-s", "0", "-t", str(os.cpu_count()), "-v", "-o", str(out)]
    seconds, rss, output = timed_process(command)
    stages = {}
    for stage, pattern in SDCPP_STAGES.items():
        match = re.search(pattern, output)
        if match is None:
            raise RuntimeError(f"sd-cli printed no '{pattern}':\n{output[-3000:]}")
        stages[stage] = float(match.group(1))
    return {**stages, "whole": seconds, "rss": rss}


def run_ours(files, qtype, size, out):
    spec = json.dumps({"transformer": str(files[qtype]), "text_encoder": str(files["text_encoder"]),
                       "vae": str(files["vae"]), "tokenizer": str(files["tokenizer"]), "size": size,
                       "out": str(out)})
    seconds, rss, output = timed_process([sys.executable, __file__, "--ours-child", spec], cwd=ROOT.parent)
    stages = json.loads(output.strip().splitlines()[-1])
    return {**stages, "whole": seconds, "rss": rss}


def ours_child(spec):
    """One generation with the pack through its Python API, stage by stage; prints the stage times as JSON."""
    spec = json.loads(spec)
    start = time.perf_counter()
    import klein_nodes as kn
    from PIL import Image

    transformer = kn.load_transformer(spec["transformer"])
    text_encoder = kn.load_text_encoder(spec["text_encoder"], tokenizer=spec["tokenizer"])
    pipeline = kn.KleinPipeline(transformer, text_encoder, kn.load_vae(spec["vae"]), device="cpu")
    times = {"load": time.perf_counter() - start}
    encode = text_encoder.encode

    def timed_encode(*args, **kwargs):  # the text stage inside the pipeline's own call, as a user runs it
        began = time.perf_counter()
        try:
            return encode(*args, **kwargs)
        finally:
            times["text"] = time.perf_counter() - began

    text_encoder.encode = timed_encode
    began = time.perf_counter()
    latents = pipeline(PROMPT, width=spec["size"], height=spec["size"], steps=4, seed=0, output_type="latent")
    times["sampling"], began = time.perf_counter() - began - times["text"], time.perf_counter()
    image = pipeline.decode(latents)
    times["decode"] = time.perf_counter() - began
    Image.fromarray((image[0].numpy() * 255).round().astype("uint8")).save(spec["out"])
    print(json.dumps(times))


def report(results, sizes, types):
    lines = []
    for size in sizes:
        for qtype in types:
            rows = results.get((size, qtype), [])
            if not rows:
                continue
            ours, theirs = [r["ours"] for r in rows], [r["sdcpp"] for r in rows]
            cells = [f"{stage} {paired_text([o[stage] for o in ours], [t[stage] for t in theirs])}"
                     for stage in STAGES]
            rss = (f"peak RSS ours {statistics.median(o['rss'] for o in ours) / 2**30:.2f} GiB, sd.cpp "
                   f"{statistics.median(t['rss'] for t in theirs) / 2**30:.2f} GiB "
                   f"({statistics.median(o['rss'] / t['rss'] for o, t in zip(ours, theirs)):.2f}x)")
            lines.append(f"{size}² {qtype} ({len(rows)} rounds), ours/sd.cpp: {', '.join(cells)}; {rss}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd-cli", help="a built sd-cli (default: build one in --work)")
    parser.add_argument("--work", default=str(ROOT / "bench" / "out" / "sdcpp"), help="where sd-cli is built")
    parser.add_argument("--models", default=str(ROOT / "bench" / "out" / "sdcpp-models"))
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--types", default="Q8_0,Q4_K")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tiny", action="store_true", help="tiny widths (checks the bench itself)")
    parser.add_argument("--ours-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ours_child:
        return ours_child(args.ours_child)
    print(machine_line())
    cli = sd_cli(args)
    sizes, types = [int(s) for s in args.sizes.split(",")], args.types.split(",")
    files = write_files(Path(args.models), types, args.tiny)
    out = Path(args.models) / "images"
    out.mkdir(exist_ok=True)
    results = {}
    for round_ in range(args.rounds):
        for size in sizes:
            for qtype in types:
                sides = [("ours", lambda: run_ours(files, qtype, size, out / f"ours-{qtype}-{size}.png")),
                         ("sdcpp", lambda: run_sdcpp(cli, files, qtype, size, out / f"sdcpp-{qtype}-{size}.png"))]
                row = {}
                for name, run in sides if round_ % 2 == 0 else sides[::-1]:
                    row[name] = run()
                    print(f"round {round_ + 1} {size}² {qtype} {name}: "
                          + ", ".join(f"{stage} {row[name][stage]:.1f}" for stage in STAGES)
                          + f", rss {row[name]['rss'] / 2**30:.2f} GiB", flush=True)
                results.setdefault((size, qtype), []).append(row)
    print("\n".join(report(results, sizes, types)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
