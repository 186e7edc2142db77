"""The memory planner per card: what `KleinPipeline(..., device="cuda")` decides and the peak it predicts for
klein 4B on 6-24 GB cards, at 1024² and 2048², for each weight format set.

    python tools/memory_table.py            # the markdown table docs/engine.md carries
    python tools/memory_table.py --check docs/engine.md   # exit 1 when the docs' table differs

The models are the real ones at their real widths (klein 4B transformer, Qwen3-4B with the 27 layers klein reads,
FLUX.2 VAE in its file's fp32), built on the meta device with the pack's own layer classes: each weight format's
layers hold the tensors a loaded file gives them (GGUF blocks of the quantizer's types, fp8 weights with their
scales, nvfp4 codes with blocked scales), so their sizes are what loading a real file puts on the card, without
any weights. The planner (sampling/memory.plan_models) then plans one text-to-image generation, batch 1, no
references.

A card of N GB is taken to have N GiB with 0.6 GiB already used (CUDA context and a display); the planner keeps
10 % of the rest in reserve.
"""

import argparse
import functools
import sys

import torch
from torch import nn

from klein_nodes.loaders.convert import in_fp8, tensor_type
from klein_nodes.loaders.scaled import QUANT_FORMATS
from klein_nodes.models.autoencoder import AutoEncoder, AutoEncoderParams
from klein_nodes.models.text_encoder import Qwen3, Qwen3Params
from klein_nodes.models.transformer import Flux2, Flux2Params
from klein_nodes.quant.dequant import BLOCK_SIZES
from klein_nodes.quant.linear import QuantizedEmbedding, QuantizedLinear, replace_module
from klein_nodes.quant.nvfp4 import GROUP, blocked_scales
from klein_nodes.sampling.memory import HEADROOM, module_bytes, plan_models

GIB = 2**30
CARDS_GB = (6, 8, 10, 12, 16, 24)
RESERVED = 0.6 * GIB
SIZES = (1024, 2048)
# name -> (transformer format, text encoder format)
FORMAT_SETS = {"bf16": ("bf16", "bf16"), "fp8": ("fp8", "fp8"), "nvfp4": ("nvfp4", "fp8"),
               "GGUF Q4_K": ("Q4_K", "Q4_K")}
BEGIN, END = "<!-- memory table: tools/memory_table.py -->", "<!-- end of memory table -->"


def meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def scaled_layer(fmt, linear):
    """The fp8 or nvfp4 layer a scaled file gives a linear of this shape (tensors on the meta device)."""
    shape = (linear.out_features, linear.in_features)
    if fmt == "fp8":
        tensors = {"weight": meta(shape, torch.float8_e4m3fn), "weight_scale": meta((), torch.float32),
                   "input_scale": None}
        return QUANT_FORMATS["float8_e4m3fn"].build(tensors, shape, torch.bfloat16)
    tensors = {"weight": meta((shape[0], shape[1] // 2), torch.uint8),
               "weight_scale": meta((blocked_scales(shape[0], shape[1] // GROUP),), torch.uint8),
               "weight_scale_2": meta((), torch.float32), "pre_quant_scale": None}
    return QUANT_FORMATS["nvfp4"].build(tensors, shape, torch.bfloat16)


def packed_layer(qtype, module):
    """The GGUF layer of `qtype` for a linear or embedding of this shape (its blocks on the meta device)."""
    rows, cols = module.weight.shape
    block_size, type_size = BLOCK_SIZES[qtype]
    packed = meta((rows * cols // block_size * type_size,), torch.uint8)
    if isinstance(module, nn.Embedding):
        return QuantizedEmbedding(packed, qtype, rows, cols)
    return QuantizedLinear(packed, qtype, cols, rows)


def quantized(model, kind, fmt):
    """`model` (bf16, on the meta device) with its weights in `fmt`, as the loaders build it from such a file."""
    if fmt == "bf16":
        return model
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        weight_name = f"{name}.weight"
        if fmt in ("fp8", "nvfp4"):
            if isinstance(module, nn.Linear) and in_fp8(kind, weight_name, module.weight):
                replace_module(model, name, scaled_layer(fmt, module))
            continue
        qtype = tensor_type(weight_name, module.weight, fmt, kind == "text_encoder")
        if qtype in BLOCK_SIZES and qtype not in ("BF16", "F16", "F32"):
            replace_module(model, name, packed_layer(qtype, module))
    return model


@functools.cache  # meta-device models: no memory, built once for the plans and the sizes
def models(transformer_format, text_encoder_format):
    with torch.device("meta"):
        transformer = Flux2(Flux2Params()).to(torch.bfloat16)
        text_encoder = Qwen3(Qwen3Params()).to(torch.bfloat16)
        vae = AutoEncoder(AutoEncoderParams())  # the published file's fp32, as kn.load_vae keeps it
    return (quantized(transformer, "transformer", transformer_format),
            quantized(text_encoder, "text_encoder", text_encoder_format), vae)


def plans():
    """[(card GB, format set, {size: Plan or the MemoryError's message}, component GiB)]"""
    rows = []
    for name, (transformer_format, text_encoder_format) in FORMAT_SETS.items():
        transformer, text_encoder, vae = models(transformer_format, text_encoder_format)
        for card in CARDS_GB:
            free = card * GIB - RESERVED
            by_size = {}
            for size in SIZES:
                try:
                    by_size[size] = plan_models(free, transformer, text_encoder, vae, size // 16, size // 16)
                except MemoryError as e:
                    by_size[size] = str(e)
            rows.append((card, name, free, by_size))
    return rows


def cell(decision):
    if isinstance(decision, str):
        return "does not fit"
    roles = {"resident": "R", "offload": "O", "stream": "S"}
    parts = [f"TE {roles[decision.text_encoder]}", f"DiT {roles[decision.transformer]}",
             f"VAE {roles[decision.vae]}{'+tiles' if decision.vae_tiled else ''}"]
    if decision.text_encoder == "stream":
        parts[0] += f"({decision.text_resident_blocks}/27)"
    if decision.transformer == "stream":
        parts[1] += f"({decision.resident_blocks}/25)"
    return f"{', '.join(parts)}: {decision.peak / GIB:.1f} GiB"


def table(rows):
    lines = ["| card | formats | 1024² | 2048² |", "|---|---|---|---|"]
    for card, name, free, by_size in rows:
        lines.append(f"| {card} GB | {name} | {cell(by_size[1024])} | {cell(by_size[2048])} |")
    return "\n".join(lines)


def component_sizes():
    lines = ["| formats | text encoder | transformer | VAE |", "|---|---|---|---|"]
    for name, formats in FORMAT_SETS.items():
        sizes = [module_bytes(m) / GIB for m in models(*formats)]
        lines.append(f"| {name} | {sizes[1]:.2f} GiB | {sizes[0]:.2f} GiB | {sizes[2]:.2f} GiB |")
    return "\n".join(lines)


def document():
    return "\n\n".join([BEGIN, component_sizes(), table(plans()), END])


def within_budget(rows):
    """(card, formats, size) of every plan whose predicted peak exceeds the budget it was made for."""
    return [(card, name, size) for card, name, free, by_size in rows for size, decision in by_size.items()
            if not isinstance(decision, str) and decision.peak > HEADROOM * free]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", metavar="FILE", help="compare with the table in FILE (exit 1 when it differs)")
    args = parser.parse_args(argv)
    text = document()
    if args.check:
        with open(args.check, encoding="utf-8") as f:
            current = f.read()
        start, end = current.find(BEGIN), current.find(END)
        if start < 0 or end < 0 or current[start: end + len(END)] != text:
            print(f"{args.check}: the memory table differs from the planner's; paste the output of "
                  "python tools/memory_table.py between its markers")
            return 1
        return 0
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
