"""Hostile and mistaken input at every entry point, as many cases as you like; counts per outcome.

    python tools/fuzz.py [--cases 10000] [--seed 0] [--kinds safetensors,gguf,...] [--memory-gb 4] [--timeout 20]
    python tools/fuzz.py --show tokenizer:4     # one case, with its traceback

Each case is a deterministic mutation (from its kind and number) of a valid input built with testing.py: a
transformer file (safetensors, fp8 safetensors, GGUF: header bytes, tensor shapes written, shape fields in the
header), a LoRA (tensors, and its PEFT metadata: JSON of the wrong types and depth, alpha_pattern keys that are not
module names), a GGUF text encoder's embedded tokenizer, an image to verify, arguments for dequantize, save and the
command line, and arguments of the wrong type to every public function (`api`). Cases run in a worker process
(working in the fuzz folder) under a memory cap (RLIMIT_AS) and a per-case timeout; a worker that dies or hangs is
replaced and the case counted. Outcomes: `accepted`, `refused` (the pack's own error), `oserror` (an OSError
naming the path), and the failures: `bug:<Type>` (any other exception), `memory`, `hang`, `crash`, `lost` (a file
that existed changed or vanished), `escaped` (a file written outside the output folder). Exits 1 on any failure.
"""

import argparse
import io
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

KINDS = ("safetensors", "fp8", "gguf", "gguf_shape", "tokenizer", "lora", "lora_meta", "image", "dequantize", "save",
         "cli", "api")
FAILURES = ("bug", "memory", "hang", "crash", "lost", "escaped")
JUNK = [-1, 0, 2**31, 2**63, 1e30, float("nan"), "x", "", [], [1, 2], {}, {"a": 1}, None, True, [[[]]], "F8_E4M3",
        [-5, 2], [0, 10**18]]


def seeds(folder):
    """The valid inputs every mutation starts from."""
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from klein_nodes.loaders.convert import quantize_file
    from klein_nodes.testing import TINY_TRANSFORMER, transformer_state_dict, write_gguf, write_transformer

    write_transformer(folder / "klein.safetensors", dtype=torch.float32)
    write_gguf(folder / "klein.gguf", transformer_state_dict(TINY_TRANSFORMER), lambda n, t: "F32" if t.ndim == 1
               else "Q8_0", "flux", metadata={"quantization_version": 2})
    quantize_file(folder / "klein.safetensors", folder / "klein-fp8.safetensors", "fp8")
    generator = torch.Generator().manual_seed(0)
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, 64, generator=generator),
               "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.randn(192, 4, generator=generator),
               "diffusion_model.double_blocks.0.img_attn.qkv.alpha": torch.tensor(4.0)},
              str(folder / "lora.safetensors"))
    pixels = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "image.png")
    Image.fromarray(pixels).save(folder / "image.jpg", quality=90)
    save_file(peft_lora(), str(folder / "peft-lora.safetensors"), metadata={"lora_adapter_metadata": json.dumps(
        {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {"to_q": 2}})})


def peft_lora():
    """A diffusers/PEFT-named LoRA on one layer of the tiny transformer."""
    import torch

    generator = torch.Generator().manual_seed(1)
    return {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 64, generator=generator),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(64, 4, generator=generator)}


def mini_tokenizer(folder):
    """(tokens, token types, merges) of a small byte-level BPE with Qwen3's special tokens after it."""
    from klein_nodes.loaders.tokenizer import QWEN3_ADDED_TOKENS
    from klein_nodes.testing import write_tokenizer

    source = write_tokenizer(folder)
    vocab = json.loads((source / "vocab.json").read_text(encoding="utf-8"))
    specials = [token for token, _ in QWEN3_ADDED_TOKENS]
    tokens = [token for token, index in sorted(vocab.items(), key=lambda item: item[1]) if token not in specials]
    merges = [line for line in (source / "merges.txt").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#")]
    return tokens + specials, [1] * len(tokens) + [3] * len(specials), merges


def write_mini_qwen(path, tokens, types, merges, rows=None):
    """A tiny Qwen3 GGUF text encoder whose tokenizer is in its metadata: a small vocabulary, and Qwen3's 151,936
    embedding rows (klein pads with id 151643), stored as F16 so a case writes fast."""
    import dataclasses

    from klein_nodes.loaders.gguf import hf_to_llama
    from klein_nodes.testing import TINY_QWEN3, qwen3_state_dict, write_gguf

    params = dataclasses.replace(TINY_QWEN3, vocab_size=rows or TINY_QWEN3.vocab_size)
    metadata = {"tokenizer_model": "gpt2", "tokenizer_pre": "qwen2", "token_list": tokens, "token_types": types,
                "token_merges": merges}
    write_gguf(path, qwen3_state_dict(params, seed=8), lambda n, t: "F32" if t.ndim == 1 else "F16" if "embed" in n
               else "Q8_0", "qwen3", rename=hf_to_llama, metadata=metadata)


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


PATTERNS = ["to_q", "attn.to_q", "transformer_blocks.0.attn.to_q", ".*", "(a+)+$", "(", "[", "\\", "to_(q|k)",
            "a{1000000}", "(.*)*x", "(x+x+)+y", "*", "", "to_q$", "^to_q", "\ud800"]


def mutate_peft_metadata(rng):
    """`lora_adapter_metadata` text: JSON of the wrong types and depth, odd alpha_pattern keys, or none at all."""
    choice = rng.random()
    if choice < 0.25:
        return rng.choice(["[]", "1", '"x"', "null", "{", "", "[" * 100_000, '{"a":' * 5000 + "1" + "}" * 5000,
                           json.dumps({"transformer.r": "x" * 3_000_000}), "NaN", "{}" * 3])
    config = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {"to_q": 2}}
    key = rng.choice(["transformer.r", "transformer.lora_alpha", "transformer.alpha_pattern", "transformer.use_rslora",
                      "transformer", "transformer.alpha_pattern.to_q"])
    if choice < 0.6:
        config[key] = rng.choice(JUNK)
    else:
        config["transformer.alpha_pattern"] = {rng.choice(PATTERNS) + "x" * rng.choice((0, 0, 30)): rng.choice(
            [2, 0, -1, 1e30, float("nan"), "2", None, [2]]) for _ in range(rng.randint(1, 3))}
    return json.dumps(config)


def mutate_tokenizer(rng, tokens, types, merges):
    """The embedded tokenizer of a GGUF text encoder, edited: (tokens, types, merges, embedding rows or None)."""
    tokens, types, merges, rows = list(tokens), list(types), list(merges), None
    at = rng.randrange(len(tokens))
    choice = rng.randrange(10)
    if choice == 0:
        del tokens[at]  # every later id shifts; the merges may name a token no longer there
    elif choice == 1:
        tokens[at] = tokens[rng.randrange(len(tokens))]  # a duplicate
    elif choice == 2:
        tokens[at] = rng.choice(["", "x" * 70_000, "<|im_start|>", "Ġ", "a b"])  # what a GGUF file can hold
    elif choice == 3:
        merges[rng.randrange(len(merges))] = rng.choice(["a", "a b c", "", "zz qq", " ", "Ġ"])
    elif choice == 4:
        types = types[: rng.randrange(len(types))] if rng.random() < 0.5 else types + [1] * 7
    elif choice == 5:
        types[at] = rng.choice([0, 2, 3, 4, 5, 6, 99, -1, 2**31 - 1])
    elif choice == 6:
        rows = rng.choice([1, len(tokens) - 1, 151643])  # the embedding table too small for the vocabulary or padding
    elif choice == 7:
        tokens, types = tokens[: rng.randrange(300)], types[: rng.randrange(300)]
    elif choice == 8:
        merges = rng.choice([[], merges * 50, [m[::-1] for m in merges]])
    else:
        types = [3] * len(types) if rng.random() < 0.5 else [1] * len(types)  # every token special, or none
    return tokens, types, merges, rows


def reshaped(rng, shape):
    """A wrong shape for a tensor of `shape`."""
    shape = list(shape)
    choice = rng.randrange(6)
    if choice == 0:
        return shape[::-1]
    if choice == 1:
        return shape[:-1] or [0]
    if choice == 2:
        return shape + [1]
    if choice == 3:
        at = rng.randrange(len(shape))
        return shape[:at] + [max(0, shape[at] + rng.choice((-1, 1, 32, -32)))] + shape[at + 1:]
    if choice == 4:
        return [0] * len(shape)
    return [1]


def mutate_gguf_dims(rng, path):
    """Overwrite one tensor's n_dims, a dimension, its type or its data offset in the GGUF header."""
    import gguf

    data = bytearray(path.read_bytes())
    tensor = rng.choice(gguf.GGUFReader(str(path)).tensors)
    name_length = len(tensor.name.encode())
    n_dims_at = tensor.field.offset + 8 + name_length
    n_dims = struct.unpack_from("<I", data, n_dims_at)[0]
    field = rng.choice(["n_dims", "dim", "type", "offset"])
    if field == "n_dims":
        struct.pack_into("<I", data, n_dims_at, rng.choice([0, 1, 3, 4, 5, 255, 2**32 - 1]))
    elif field == "dim":
        at = n_dims_at + 4 + 8 * rng.randrange(n_dims)
        old = struct.unpack_from("<Q", data, at)[0]
        struct.pack_into("<Q", data, at, rng.choice([0, 1, old + 1, old - 1 if old else 0, old * 2, 2**32, 2**63]))
    elif field == "type":
        struct.pack_into("<I", data, n_dims_at + 4 + 8 * n_dims, rng.choice([0, 1, 2, 8, 12, 30, 39, 99, 2**31]))
    else:
        struct.pack_into("<Q", data, n_dims_at + 8 + 8 * n_dims, rng.choice([1, 3, 2**40, 2**63, 0]))
    return bytes(data)


def wrong_values(folder):
    """Arguments of the wrong type or range, for any parameter of any public function."""
    import numpy as np
    import torch

    return JUNK + [object(), b"bytes", folder / "nonexistent" / "x.safetensors", torch.zeros(0), torch.rand(2, 2),
                   torch.full((1, 8, 8, 3), float("nan")), np.zeros((3, 3)), "\ud800", "a\0b", -2**63, 2.5, (1, 2),
                   torch.rand(1, 64, 64, 3, dtype=torch.float64), torch.zeros(1, 64, 64, 3, device="meta")]


def api_calls(folder, state):
    """(name, call taking one wrong value) for every public function and each of its parameters."""
    import torch

    import klein_nodes as kn

    if "model" not in state:
        state["model"] = kn.load_transformer(folder / "klein.safetensors")
    model, image, out = state["model"], torch.rand(1, 64, 64, 3), folder / "api-out"
    pipe, embeds = kn.KleinPipeline(model), torch.randn(1, 3, model.params.context_in_dim)
    lora = folder / "lora.safetensors"

    def generate(**changed):
        return lambda: pipe(**({"prompt_embeds": embeds, "width": 32, "height": 32, "steps": 1, "seed": 0,
                                "output_type": "latent"} | changed))

    calls = {"load_transformer": lambda v: kn.load_transformer(v),
             "load_text_encoder": lambda v: kn.load_text_encoder(v), "load_vae": lambda v: kn.load_vae(v),
             "load_image_safety": lambda v: kn.load_image_safety(v),
             "load_prompt_safety": lambda v: kn.load_prompt_safety(v),
             "load_transformer(dtype)": lambda v: kn.load_transformer(folder / "klein.safetensors", dtype=v),
             "load_transformer(device)": lambda v: kn.load_transformer(folder / "klein.safetensors", device=v),
             "apply_lora(model)": lambda v: kn.apply_lora(v, lora),
             "apply_lora(path)": lambda v: kn.apply_lora(model, v),
             "apply_lora(strength)": lambda v: kn.apply_lora(model, lora, v),
             "verify_image": lambda v: kn.verify_image(v),
             "verify_image(trust_anchor)": lambda v: kn.verify_image(folder / "image.png", v),
             "composite_edit(original)": lambda v: kn.composite_edit(v, image),
             "composite_edit(edited)": lambda v: kn.composite_edit(image, v),
             "outpaint_canvas(image)": lambda v: kn.outpaint_canvas(v, left=16),
             "tiled_refine(pipe)": lambda v: kn.tiled_refine(v, image, "x"),
             "tiled_refine(image)": lambda v: kn.tiled_refine(pipe, v, "x"),
             "KleinPipeline(transformer)": lambda v: kn.KleinPipeline(v),
             "KleinPipeline(memory)": lambda v: kn.KleinPipeline(model, memory=v),
             "KleinPipeline(device)": lambda v: kn.KleinPipeline(model, device=v),
             "compile_blocks": lambda v: kn.compile_blocks(v),
             "dequantize(data)": lambda v: kn.quant.dequantize(v, "Q8_0", (32,)),
             "dequantize(dtype)": lambda v: kn.quant.dequantize(torch.zeros(34, dtype=torch.uint8), "Q8_0", (32,), v)}
    for name in ("mask", "align", "match_colors", "feather"):
        calls[f"composite_edit({name})"] = lambda v, name=name: kn.composite_edit(image, image, **{name: v})
    for name in ("left", "top", "right", "bottom", "fill", "feather"):
        calls[f"outpaint_canvas({name})"] = lambda v, name=name: kn.outpaint_canvas(image, **{name: v})
    for name in ("prompt", "scale", "tile", "overlap", "denoise", "seed", "steps", "reference", "prompt_embeds"):
        calls[f"tiled_refine({name})"] = lambda v, name=name: kn.tiled_refine(pipe, image, **{"prompt": "x", name: v})
    for name in ("images", "directory", "prefix", "format", "quality", "watermark", "c2pa", "prompt", "workflow",
                 "credentials", "allow_unsigned", "metadata_enabled", "extra_pnginfo", "alpha", "sources", "safety",
                 "watermark_mode"):
        calls[f"save_images({name})"] = lambda v, name=name: kn.save_images(
            **({"images": image, "directory": out, "c2pa": False} | {name: v}))
    for name in ("prompt", "width", "height", "steps", "guidance", "seed", "negative_prompt", "references", "noise",
                 "prompt_embeds", "negative_prompt_embeds", "batch_size", "image", "mask", "denoise",
                 "max_reference_pixels", "callback", "tiled", "output_type", "max_sequence_length"):
        calls[f"KleinPipeline.__call__({name})"] = lambda v, name=name: generate(**{name: v})()
    return calls


def forward(model):
    """One step of the loaded transformer on a 2x2 latent and 3 text tokens, through the pipeline."""
    import torch

    import klein_nodes as kn

    embeds = torch.randn(1, 3, model.params.context_in_dim)
    kn.KleinPipeline(model)(prompt_embeds=embeds, width=32, height=32, steps=1, seed=0, output_type="latent")


def run_case(kind, number, folder, state):
    """Run one case; returns its outcome. `state` keeps what a worker builds once (a tiny model)."""
    import torch

    import klein_nodes as kn

    rng = random.Random(f"{kind}:{number}")
    work = Path(tempfile.mkdtemp(dir=folder))
    if kind in ("safetensors", "fp8"):
        path = work / "model.safetensors"
        source = folder / ("klein.safetensors" if kind == "safetensors" else "klein-fp8.safetensors")
        path.write_bytes(mutate_safetensors(rng, source.read_bytes()))
        kn.load_transformer(path)
    elif kind == "gguf_shape":
        from klein_nodes.testing import TINY_TRANSFORMER, transformer_state_dict, write_gguf

        path = work / "model.gguf"
        if rng.random() < 0.5:
            path.write_bytes(mutate_gguf_dims(rng, folder / "klein.gguf"))
        else:
            tensors = transformer_state_dict(TINY_TRANSFORMER)
            name = rng.choice(list(tensors))
            tensors[name] = torch.randn(reshaped(rng, tensors[name].shape))
            write_gguf(path, tensors, lambda n, t: "Q8_0" if t.ndim == 2 and t.shape[-1] % 32 == 0 and t.numel()
                       else "F32", "flux")
        forward(kn.load_transformer(path))
    elif kind == "tokenizer":
        if "tokenizer" not in state:
            state["tokenizer"] = mini_tokenizer(folder / "tokenizer-source")
        tokens, types, merges, rows = mutate_tokenizer(rng, *state["tokenizer"])
        path = work / "qwen.gguf"  # no tokenizer files beside it: the pack reads the one in its metadata
        write_mini_qwen(path, tokens, types, merges, rows)
        encoder = kn.load_text_encoder(path, layers=(1, 2, 3))
        encoder.encode(rng.choice(["a cat", "", "<|im_start|>x", "\ud800", "x" * 3000]), layers=(1, 2, 3))
    elif kind == "lora_meta":
        from safetensors.torch import save_file

        if "model" not in state:
            state["model"] = kn.load_transformer(folder / "klein.safetensors")
        path = work / "lora.safetensors"
        save_file(peft_lora(), str(path), metadata={"lora_adapter_metadata": mutate_peft_metadata(rng)})
        began = time.monotonic()
        kn.apply_lora(state["model"], path)
        if time.monotonic() - began > 1.0:  # metadata must never make loading slow
            return "hang"
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
    elif kind == "api":
        calls = state.setdefault("api", api_calls(folder, state))
        name = rng.choice(sorted(calls))
        calls[name](rng.choice(wrong_values(folder)))
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
    os.chdir(folder)  # a relative path among the wrong arguments lands here
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


def show(kind, number):
    """Run one case in this process, as a worker would, and print what it raised."""
    folder = Path(tempfile.mkdtemp(prefix="klein-fuzz-"))
    try:
        seeds(folder)
        os.chdir(folder)
        print(f"{kind}:{number}: {run_case(kind, int(number), folder, {})}")
    except Exception:  # noqa: BLE001 (what this option is for)
        traceback.print_exc()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--memory-gb", type=float, default=4.0)
    parser.add_argument("--timeout", type=float, default=20.0)
    parser.add_argument("--show", metavar="KIND:NUMBER", help="run one case here and print its traceback")
    args = parser.parse_args()
    if args.show:
        return show(*args.show.split(":"))
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
