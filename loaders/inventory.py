"""What a weight file holds, from its header: the model, how it is stored (tensor types with counts and bytes) and
in one word (bf16, fp8, nvfp4, GGUF Q4_K, ...), and for LoRA files their format, rank, targets and base model.
Used by `inspect`, `doctor`, and `generate --comfyui` to choose among several files of one model."""

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import Checkpoint
from .detect import QWEN3_SIZES, ModelKind, dim, identify
from .gguf import GGUFFile
from .lora import TEXT_ENCODER_PREFIXES, split_key
from .safetensors_io import SafetensorsFile, sniff_format
from .scaled import QUANT_FORMATS, layer_formats

FLOAT_NAMES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp64"}
LORA_BASES = {3072: "FLUX.2 [klein] 4B", 4096: "FLUX.2 [klein] 9B", 6144: "FLUX.2 [dev]"}
KLEIN_DOUBLE_BLOCKS = {3072: 5, 4096: 8}  # FLUX.1 LoRAs are 3072 wide too, with 19 double blocks
TEXT_ENCODER_WIDTHS = {2560: "Qwen3-4B", 4096: "Qwen3-8B"}
DOUBLE_BLOCK = re.compile(r"(?:double_blocks|(?<!single_)transformer_blocks)[._](\d+)")
# a model's blocks as the pack runs (and pages) them: transformer blocks, decoder layers (BFL, diffusers, HF, GGUF)
BLOCK = re.compile(r"(?:^|\.)(double_blocks|single_blocks|transformer_blocks|single_transformer_blocks|layers|blk)"
                   r"\.(\d+)\.")


@dataclass
class Inventory:
    kind: ModelKind
    storage: dict = field(default_factory=dict)  # tensor type -> [tensors, bytes]
    format: str = ""
    lora: dict | None = None  # format, ranks, targets, base
    blocks: list = field(default_factory=list)  # bytes of each block, in file order (see BLOCK)

    def lines(self):
        """What `inspect` prints for the file, after its name."""
        head = f"{self.kind.description}" + (f" [{self.kind.layout} layout]" if self.kind.layout else "")
        if self.lora:
            head = (f"{self.lora['format']} for {self.lora['base']}, rank {self.lora['ranks']}, "
                    f"targets: {self.lora['targets']}")
        out = [f"{head}; stored as {self.format}"]
        for name, (count, size) in sorted(self.storage.items(), key=lambda item: -item[1][1]):
            out.append(f"  {name:10} {count:5d} tensors {size / 2**20:10.1f} MiB")
        return out


def tally(entries):
    """{tensor type: [tensors, bytes]} from (type, bytes) pairs."""
    counts = {}
    for kind, size in entries:
        count = counts.setdefault(kind, [0, 0])
        count[0], count[1] = count[0] + 1, count[1] + size
    return counts


def gguf_format(storage):
    """GGUF and the quant type holding the most bytes (others named)."""
    quantized = {k: v for k, v in storage.items() if k not in FLOAT_NAMES}
    main = max(quantized or storage, key=lambda k: storage[k][1])
    return f"GGUF {main}" + (f" (with {', '.join(sorted(set(quantized) - {main}))})" if len(quantized) > 1 else "")


def safetensors_format(file, storage):
    """A quantization format by its marker (nvfp4) or by its dtype (fp8), else the float dtype holding the most
    bytes."""
    marked = {f for f in layer_formats(Checkpoint([file], file.path)).values() if f in QUANT_FORMATS}
    for name, spec in sorted(QUANT_FORMATS.items(), key=lambda item: not item[1].marked_only):  # nvfp4 holds fp8 too
        if spec.storage in storage and (name in marked or not spec.marked_only):
            return spec.kind + (" (scaled)" if spec.kind == "fp8" and "F32" in storage else "")
    main = max(storage, key=lambda k: storage[k][1], default="empty")
    return FLOAT_NAMES.get(main, main.lower())


def lora_of(file):
    """format / ranks / targets / base of a LoRA safetensors file, or None when it holds no adapter keys."""
    parts = [(key, split) for key in file.keys() if (split := split_key(key))]
    if not parts:
        return None
    kinds = Counter(kind for _, (_, kind, _) in parts if kind)
    kind = {"lokr": "LyCORIS LoKr", "loha": "LyCORIS LoHa", "diff": "full-weight diff"}.get(kinds.most_common(1)[0][0],
                                                                                             "LoRA")
    if any(role == "magnitude" for _, (_, _, role) in parts):
        kind = "DoRA"
    first = parts[0][0]
    naming = ("kohya" if first.startswith(("lora_unet_", "lora_te", "lora_transformer_")) else
              "LyCORIS" if first.startswith("lycoris_") else
              "diffusers/PEFT" if first.startswith(("transformer.", "base_model.", "text_encoder.")) else "BFL/ComfyUI")
    ranks = sorted({dim(file.shape(key), 0) for key, (_, kind_, role) in parts if kind_ == "lora" and role == "down"})
    modules = {module for _, (module, _, _) in parts}
    text = {m for m in modules if m.startswith(TEXT_ENCODER_PREFIXES)}
    widths = Counter(dim(shape, 0) for key, (m, kind_, role) in parts if role == "up" and m not in text
                     for shape in [file.shape(key)] if "proj" in m or "to_out" in m or "linear2" in m)
    width = widths.most_common(1)[0][0] if widths else None
    doubles = {int(m.group(1)) for module in modules if (m := DOUBLE_BLOCK.search(module))}
    base = LORA_BASES.get(width, f"a {width}-wide model" if width else "an unknown model")
    if width in KLEIN_DOUBLE_BLOCKS and doubles and max(doubles) >= KLEIN_DOUBLE_BLOCKS[width]:
        base = f"FLUX.1 or another {width}-wide model ({max(doubles) + 1} double blocks; klein has "
        base += f"{KLEIN_DOUBLE_BLOCKS[width]})"
    targets = f"{len(modules) - len(text)} transformer layers"
    if text:
        te_width = Counter(dim(file.shape(k), -1) for k, (m, kind_, role) in parts if m in text and role == "down")
        encoder = TEXT_ENCODER_WIDTHS.get(te_width.most_common(1)[0][0], "text encoder") if te_width else "text encoder"
        targets += f", {len(text)} {encoder} layers"
    return {"format": f"{kind} ({naming} names)", "ranks": "-".join(str(r) for r in ranks[:: max(1, len(ranks) - 1)])
            or "n/a", "targets": targets, "base": base}


def describe_gguf(file):
    """ModelKind of an open GGUFFile, from its metadata and tensor shapes."""
    arch = file.field("general.architecture", "")
    if isinstance(arch, str) and arch.startswith("qwen3"):
        width = dim(file.tensors.get("blk.0.attn_norm.weight", (None, ()))[1], 0)
        return ModelKind("text_encoder", "qwen3", QWEN3_SIZES.get(width, "Qwen3") + " text encoder (GGUF)", "gguf")
    kind = identify({name: shape for name, (_, shape, _) in file.tensors.items()})
    return ModelKind(kind.kind, kind.family, kind.description + " (GGUF)", "gguf")


def block_bytes(sizes):
    """[bytes of each block] from (tensor name, bytes) pairs, blocks in the order they first appear."""
    blocks = {}
    for name, size in sizes:
        if match := BLOCK.search(name):
            blocks[match.groups()] = blocks.get(match.groups(), 0) + size
    return list(blocks.values())


def inventory(path):
    """The Inventory of one weight file (its header read once)."""
    path = Path(path)
    if sniff_format(path) == "gguf":
        file = GGUFFile(path)
        storage = tally((qtype, data.nbytes) for qtype, _, data in file.tensors.values())
        blocks = block_bytes((name, data.nbytes) for name, (_, _, data) in file.tensors.items())
        return Inventory(describe_gguf(file), storage, gguf_format(storage), blocks=blocks)
    file = SafetensorsFile(path)  # anything else must be safetensors; this raises a precise error if not
    storage = tally((dtype, end - begin) for dtype, _, begin, end in file.entries.values())
    lora = lora_of(file)
    kind = ModelKind("lora", "lora", "LoRA") if lora else identify({k: file.shape(k) for k in file.keys()})
    blocks = block_bytes((name, end - begin) for name, (_, _, begin, end) in file.entries.items())
    return Inventory(kind, storage, safetensors_format(file, storage), lora, blocks)


def weight_bytes(inv):
    return sum(size for _, size in inv.storage.values())
