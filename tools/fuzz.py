"""Hostile and mistaken input at every entry point, as many cases as you like; counts per outcome.

    python tools/fuzz.py [--cases 10000] [--seed 0] [--kinds safetensors,gguf,...] [--memory-gb 4] [--timeout 20]

Each case is a deterministic mutation (from its kind and number) of a valid input built with testing.py: a
transformer file (safetensors, GGUF), a LoRA, an image to verify, arguments for dequantize, save and the command
line. Cases run in a worker process under a memory cap (RLIMIT_AS) and a per-case timeout; a worker that dies or
hangs is replaced and the case counted. Outcomes: `accepted`, `refused` (the pack's own error), `oserror` (an OSError
naming the path), and the failures: `bug:<Type>` (any other exception), `memory`, `hang`, `crash`, `lost` (a file
that existed changed or vanished), `escaped` (a file written outside the output folder). Exits 1 on any failure.
"""

import argparse
import io
import json
import multiprocessing as mp
import random
import resource
import shutil
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

KINDS = ("safetensors", "gguf", "lora", "image", "dequantize", "save", "cli")
FAILURES = ("bug", "memory", "hang", "crash", "lost", "escaped")
JUNK = [-1, 0, 2**31, 2**63, 1e30, float("nan"), "x", "", [], [1, 2], {}, {"a": 1}, None, True, [[[]]], "F8_E4M3",
        [-5, 2], [0, 10**18]]


def seeds(folder):
    """The valid inputs every mutation starts from."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from klein_nodes.testing import TINY_TRANSFORMER, transformer_state_dict, write_gguf, write_transformer

    write_transformer(folder / "klein.safetensors", dtype=torch.float32)
    write_gguf(folder / "klein.gguf", transformer_state_dict(TINY_TRANSFORMER), lambda n, t: "F32" if t.ndim == 1
               else "Q8_0", "flux", metadata={"quantization_version": 2})
    generator = torch.Generator().manual_seed(0)
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, 64, generator=generator),
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(192, 4, generator=generator),
               "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(4.0)},
              str(folder / "lora.safetensors"))
    pixels = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "image.png")
    Image.fromarray(pixels).save(folder / "image.jpg", quality=90)


def mutate_bytes(rng, data, header_end):
    """Overwrite 1, 4 or 8 bytes inside the header with extreme or random values, or cut the file."""
    data = bytearray(data)
    if rng.random() < 0.15:
        return bytes(data[: rng.randrange(len(data))])
    at, width = rng.randrange(header_end), rng.choice((1, 4, 8))
    data[at: at + width] = rng.choice((b"\xff" * width, b"\x00" * width, b"\x7f" + b"\xff" * (width - 1),
                                       rng.randbytes(width)))
    return bytes(data)


def mutate_safetensors(rng, data):
    length = struct.unpack("<Q", data[:8])[0]
    if rng.random() < 0.4:
        return mutate_bytes(rng, data, 8 + length)
    header = json.loads(data[8: 8 + length])
    name = rng.choice(list(header))
    choice = rng.random()
    if choice < 0.6 and isinstance(header[name], dict) and name != "__metadata__":
        header[name][rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(JUNK)
    elif choice < 0.8:
        header["__metadata__"] = rng.choice([JUNK[rng.randrange(len(JUNK))], {"_quantization_metadata": "{"}])
    else:
        header[name + rng.choice([".comfy_quant", "_x", ""])] = rng.choice(JUNK)
    raw = json.dumps(header).encode()
    delta = rng.choice((0, 0, 0, -3, 5))
    return struct.pack("<Q", max(0, len(raw) + delta)) + raw + data[8 + length:]


def run_case(kind, number, folder, state):
    """Run one case; returns its outcome. `state` keeps what a worker builds once (a tiny model)."""
    import torch

    import klein_nodes as kn

    rng = random.Random(f"{kind}:{number}")
    work = Path(tempfile.mkdtemp(dir=folder))
    if kind == "safetensors":
        path = work / "model.safetensors"
        path.write_bytes(mutate_safetensors(rng, (folder / "klein.safetensors").read_bytes()))
        kn.load_transformer(path)
    elif kind == "gguf":
        path = work / "model.gguf"
        data = (folder / "klein.gguf").read_bytes()
        path.write_bytes(mutate_bytes(rng, data, min(len(data), 4096)))
        from klein_nodes.loaders.inventory import inventory

        (inventory if rng.random() < 0.3 else kn.load_transformer)(path)
    elif kind == "lora":
        from safetensors.torch import load_file, save_file

        if "model" not in state:
            state["model"] = kn.load_transformer(folder / "klein.safetensors")
        tensors = load_file(str(folder / "lora.safetensors"))
        key = rng.choice(list(tensors))
        tensors[key] = rng.choice([torch.zeros(0, 4), torch.full((4, 64), float("nan")), torch.randn(3, 64),
                                   torch.randn(192, 5), torch.ones(3), torch.tensor(float("inf")),
                                   torch.zeros(4, 64, dtype=torch.int8), torch.randn(4, 64, 1)])
        path = work / "lora.safetensors"
        save_file(tensors, str(path))
        kn.apply_lora(state["model"], path, rng.choice([1.0, 0.5, -1.0, float("nan"), 0.0]))
    elif kind == "image":
        source = folder / rng.choice(["image.png", "image.jpg"])
        path = work / rng.choice(["a.png", "a.jpg", "a.webp", "a.gif", "a"])
        data = source.read_bytes()
        if rng.random() < 0.3 and source.suffix == ".png":  # claim a huge size in IHDR (a decompression bomb)
            data = data[:16] + struct.pack(">II", rng.choice((30000, 2**31 - 1)), 30000) + data[24:]
        path.write_bytes(mutate_bytes(rng, data, min(len(data), 2048)))
        kn.verify_image(path)
    elif kind == "dequantize":
        qtype = rng.choice(["Q8_0", "Q4_K", "Q6_K", "IQ4_XS", "F16", 8, 12, 999, None, "Q9_9"])
        shape = rng.choice([(32,), (256,), (2, 256), (), (-1, 32), (0, 32), (32.0,), "256", (2**40, 2**40)])
        size = rng.choice([0, 34, 144, 210, 256, 512, 1000])
        data = torch.randint(0, 255, (size,), dtype=torch.uint8) if rng.random() < 0.9 else torch.zeros(size)
        kn.quant.dequantize(data, qtype, shape)
    elif kind == "save":
        out = work / "out"
        (out / "sub").mkdir(parents=True)
        (work / "outside").mkdir()
        (out / "link").symlink_to(work / "outside")
        keep = out / "klein_00001_.png"
        keep.write_bytes(b"existing")
        prefix = rng.choice(["klein", "sub/klein", "link/klein", "../klein", "/tmp/klein", "kle\0in", "x" * 300,
                             "", "a/../../b", ".", "sub/../link/x"])
        images = rng.choice([torch.rand(1, 64, 64, 3), torch.rand(1, 0, 0, 3), torch.rand(1, 8, 8, 7),
                             torch.rand(2, 32, 20000, 3), torch.rand(1, 300, 300, 4), torch.rand(3, 3)])
        try:
            kn.save_images(images, out, prefix=prefix, format=rng.choice(["png", "jpeg", "webp", "gif", 5]),
                           quality=rng.choice([80, 0, 101, "high", 1e9, float("nan")]), c2pa=False)
        finally:
            if keep.read_bytes() != b"existing":
                return "lost"
            if any((work / "outside").iterdir()):
                return "escaped"
    elif kind == "cli":
        from klein_nodes.cli import main

        argv = rng.choice([["verify", str(work / "missing.png")], ["inspect", str(work)],
                           ["inspect", str(folder / "image.png")],
                           ["verify", "--trust", str(folder / "image.png"), str(folder / "image.png")],
                           ["generate", "x", "-o", str(work / "o.png"), rng.choice(["--steps", "--batch", "--width",
                            "--quality", "--megapixels", "--guidance", "--max-tokens"]),
                            rng.choice(["0", "-1", "nan", "1e9", "abc", "65"])],
                           ["generate", "x", "-o", str(work / "o.gif"), "--tiny-random"],
                           ["quantize", str(folder / "image.png"), str(work / "q.gguf"), "--type",
                            rng.choice(["Q4_K", "Q3_X"])]])
        stderr, sys.stderr = sys.stderr, io.StringIO()
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        finally:
            sys.stderr = stderr
        if code not in (0, 2):
            return f"bug:exit{code}"
        return "refused" if code == 2 else "accepted"
    return "accepted"


def classify(kind, number, folder, state):
    import klein_nodes as kn

    try:
        return run_case(kind, number, folder, state)
    except kn.KleinError:
        return "refused"
    except MemoryError:
        return "memory"
    except OSError as e:
        return "oserror" if e.filename or str(folder) in str(e) else f"bug:{type(e).__name__}"
    except Exception as e:  # noqa: BLE001 (what the fuzzer looks for)
        return f"bug:{type(e).__name__}:{traceback.extract_tb(e.__traceback__)[-1].name}"


def worker(connection, folder, memory_bytes):
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    state = {}
    while True:
        task = connection.recv()
        if task is None:
            return
        connection.send(classify(*task, Path(folder), state))


def start_worker(folder, memory_bytes):
    parent, child = mp.Pipe()
    # spawned, not forked: a child forked after torch ran OpenMP work can deadlock in its first parallel op
    process = mp.get_context("spawn").Process(target=worker, args=(child, folder, memory_bytes), daemon=True)
    process.start()
    return process, parent


def run(cases, kinds=KINDS, seed=0, memory_gb=4.0, timeout=20.0, report=print):
    """{outcome: count} and the first case of each failure, over `cases` cases spread across `kinds`."""
    folder = Path(tempfile.mkdtemp(prefix="klein-fuzz-"))
    try:
        return run_in(folder, cases, kinds, seed, memory_gb, timeout, report)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the seed files and every case's leftovers


def run_in(folder, cases, kinds, seed, memory_gb, timeout, report):
    seeds(folder)
    memory = int(memory_gb * 2**30)
    process, connection = start_worker(folder, memory)
    counts, examples = {}, {}
    began = time.monotonic()
    for index in range(cases):
        kind, number = kinds[index % len(kinds)], seed * 1_000_000 + index // len(kinds)
        connection.send((kind, number))
        if connection.poll(timeout):
            try:
                outcome = connection.recv()
            except EOFError:
                outcome = "crash"
        else:
            outcome = "hang"
        if not process.is_alive() or outcome in ("hang", "crash"):
            outcome = outcome if outcome == "hang" else ("crash" if process.exitcode not in (None, 0) else outcome)
            process.kill()
            process, connection = start_worker(folder, memory)
        key = f"{kind}:{outcome.split(':')[0] if outcome.startswith('bug') else outcome}"
        counts[key] = counts.get(key, 0) + 1
        if outcome.split(":")[0] in FAILURES:
            examples.setdefault(outcome, (kind, number))
        if report and (index + 1) % 500 == 0:
            report(f"{index + 1} cases, {time.monotonic() - began:.0f} s")
    connection.send(None)
    process.join(5)
    return counts, examples


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--memory-gb", type=float, default=4.0)
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args()
    began = time.monotonic()
    counts, examples = run(args.cases, tuple(args.kinds.split(",")), args.seed, args.memory_gb, args.timeout)
    print(f"\n{args.cases} cases in {time.monotonic() - began:.0f} s (memory cap {args.memory_gb} GB, "
          f"timeout {args.timeout} s per case)")
    for key in sorted(counts):
        print(f"  {key:28} {counts[key]}")
    failures = {k: v for k, v in counts.items() if k.split(":")[1] in FAILURES}
    print(f"failures: {sum(failures.values())}")
    for outcome, (kind, number) in examples.items():
        print(f"  first {outcome}: kind {kind}, case {number}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
