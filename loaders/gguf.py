"""GGUF files (memory-mapped with gguf-py): klein transformers and Qwen3 text encoders, weights kept packed."""

import math
import re

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, WrongModelError
from ..quant.dequant import type_name
from ..quant.linear import QuantizedEmbedding, QuantizedLinear, replace_module
from .checkpoint import MODEL_PREFIXES, check_state_dict, strip_prefix
from .detect import identify
from .gguf_header import check_gguf_header

FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
TRANSFORMER_ARCHS = ("flux", "")  # ComfyUI-GGUF writes "flux"; stable-diffusion.cpp writes none
# llama.cpp tensor names <-> Hugging Face Qwen3 names; {i} is the layer
QWEN3_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "output.weight": "lm_head.weight",
}


def rename(name, table):
    """Map a name through a {pattern: pattern} table whose patterns may hold a {i} layer index; None if unknown."""
    for source, target in table.items():
        match = re.fullmatch(re.escape(source).replace(r"\{i\}", r"(\d+)"), name)
        if match:
            return target.replace("{i}", match.group(1)) if match.groups() else target
    return None


def llama_to_hf(name):
    return rename(name, QWEN3_NAMES)


def hf_to_llama(name):
    return rename(name, {hf: llama for llama, hf in QWEN3_NAMES.items()})


class GGUFFile:
    """Tensors of a GGUF file by name: GGML type, torch-order shape, packed bytes (memory-mapped, copy-on-write)."""

    def __init__(self, path):
        import gguf

        self.path = str(path)
        check_gguf_header(self.path)
        try:
            self.reader = gguf.GGUFReader(self.path, "c")
        except Exception as e:  # noqa: BLE001 (gguf-py's own parser: any failure means a damaged file)
            raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated "
                                  "or damaged.") from None
        self.tensors = {}
        for tensor in self.reader.tensors:
            name = getattr(tensor.tensor_type, "name", str(tensor.tensor_type))
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            self.tensors[tensor.name] = (name, shape, tensor.data)

    def field(self, key, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise CheckpointError(f"{self.path}: metadata '{key}' is unreadable ({type(e).__name__}: {e}).") from None

    def packed(self, name):
        """The raw bytes of a tensor as a uint8 torch tensor sharing the mapping."""
        return torch.from_numpy(np.asarray(self.tensors[name][2]).reshape(-1).view(np.uint8))

    def load(self, names, dtype, device):
        """{new name: tensor or (packed, qtype, shape)}: float types converted to `dtype`, others left packed."""
        out = {}
        for new_name, name in names.items():
            qtype, shape, _ = self.tensors[name]
            try:
                type_name(qtype)
            except Exception as e:
                raise CheckpointError(f"{self.path}: tensor '{name}': {e}") from None
            packed = self.packed(name)
            if qtype in FLOAT_TYPES:  # the file's own pages when the dtype matches, else one conversion
                stored = FLOAT_TYPES[qtype]
                if packed.numel() != math.prod(shape) * stored.itemsize:
                    raise CheckpointError(f"{self.path}: tensor '{name}' holds {packed.numel()} bytes, not a {shape} "
                                          f"{qtype} tensor")
                try:
                    values = packed.view(stored)
                except RuntimeError:  # data not aligned for its dtype (a file with a small general.alignment)
                    values = packed.clone().view(stored)
                out[new_name] = values.view(shape).to(device=device, dtype=dtype)
            else:
                out[new_name] = (packed.to(device), qtype, shape)
        return out


def fill(model, tensors, compute_dtype):
    """Quantized 2-D weights become QuantizedLinear/QuantizedEmbedding modules; the rest loads with assign."""
    plain = {}
    for name, value in tensors.items():
        if not isinstance(value, tuple):
            plain[name] = value
            continue
        packed, qtype, shape = value
        owner_name = name.rsplit(".", 1)[0]
        owner = model.get_submodule(owner_name)
        if isinstance(owner, nn.Embedding):
            replace_module(model, owner_name, QuantizedEmbedding(packed, qtype, *shape, compute_dtype))
        elif isinstance(owner, nn.Linear):
            replace_module(model, owner_name, QuantizedLinear(packed, qtype, shape[1], shape[0], compute_dtype))
        else:
            raise CheckpointError(f"'{name}' is stored as {qtype}, but only linear and embedding weights may be quantized")
    model.load_state_dict(plain, strict=False, assign=True)
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftover:
        raise CheckpointError(f"tensors missing from the file: {', '.join(leftover[:5])}")
    return model.requires_grad_(False).eval()


def load_gguf_transformer(path, dtype=None, device="cpu"):
    from ..models.transformer import Flux2
    from .transformer import params_from_shapes

    file = GGUFFile(path)
    arch = file.field("general.architecture", "") or ""
    names = {strip_prefix(name, MODEL_PREFIXES): name for name in file.tensors}
    shapes = {new: file.tensors[old][1] for new, old in names.items()}
    kind = identify(shapes)
    if arch not in TRANSFORMER_ARCHS or (kind.kind, kind.family) != ("transformer", "flux2"):
        what = f"a '{arch}' model" if arch not in TRANSFORMER_ARCHS else kind.description
        raise WrongModelError(f"{path}: this GGUF holds {what}, not a FLUX.2 klein transformer.")
    names = {re.sub(r"_norm\.weight$", "_norm.scale", k): v for k, v in names.items()}
    shapes = {new: file.tensors[old][1] for new, old in names.items()}
    params = params_from_shapes(shapes, path)
    with torch.device("meta"):
        model = Flux2(params)
    check_state_dict(path, "a FLUX.2 transformer", {k: v.shape for k, v in model.state_dict().items()}, shapes)
    compute_dtype = dtype or torch.bfloat16
    model = fill(model, file.load(names, compute_dtype, device), compute_dtype)
    model.description = kind.description + f" (GGUF, {quant_summary(file)})"
    return model


def load_gguf_text_encoder(path, tokenizer=None, dtype=None, device="cpu", layers=None, chat=False):
    from ..models.text_encoder import KLEIN_LAYERS, KleinTextEncoder, Qwen3
    from .text_encoder import chat_params, params_from_shapes, strip
    from .tokenizer import find_tokenizer, load_tokenizer

    layers = layers or KLEIN_LAYERS
    file = GGUFFile(path)
    arch = file.field("general.architecture", "")
    if not str(arch).startswith("qwen3"):
        raise WrongModelError(f"{path}: this GGUF holds a '{arch}' model, not a Qwen3 text encoder.")
    names = {strip(hf): name for name in file.tensors if (hf := llama_to_hf(name))}
    shapes = {new: file.tensors[old][1] for new, old in names.items()}
    available = 1 + max((int(m.group(1)) for k in shapes if (m := re.match(r"^layers\.(\d+)\.", k))), default=-1)
    needed = available if chat else max(layers)
    if needed > available:
        raise CheckpointError(f"{path}: layer {needed} was requested but the file has only {available} decoder layers.")
    theta = file.field(f"{arch}.rope.freq_base", 1_000_000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not 0 < theta < float("inf"):
        raise CheckpointError(f"{path}: {arch}.rope.freq_base is {theta!r}, not a positive number.")
    params = params_from_shapes(shapes, path, needed, theta)
    params = chat_params(params, shapes, path) if chat else params
    with torch.device("meta"):
        model = Qwen3(params)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(path, "a Qwen3 text encoder", expected, {k: shapes[k] for k in expected if k in shapes})
    compute_dtype = dtype or torch.bfloat16
    model = fill(model, file.load({k: names[k] for k in expected}, compute_dtype, device), compute_dtype)
    try:
        tok = load_tokenizer(find_tokenizer(path, tokenizer))
    except CheckpointError:
        if tokenizer is not None:
            raise
        tok = tokenizer_from_gguf(file)
    encoder = KleinTextEncoder(model, tok, description=f"{arch} text encoder (GGUF, {quant_summary(file)})")
    encoder.source = (path, tokenizer, dtype)
    return encoder


def tokenizer_from_gguf(file):
    """A byte-level BPE tokenizer from the GGUF metadata (tokens, merges, control tokens)."""
    from tokenizers import AddedToken

    from .tokenizer import qwen_bpe

    tokens = file.field("tokenizer.ggml.tokens")
    merges = file.field("tokenizer.ggml.merges")
    if not tokens or not merges:
        raise CheckpointError(f"{file.path}: no tokenizer files were found and the GGUF has no tokenizer metadata; "
                              "pass tokenizer=<folder with vocab.json + merges.txt>")
    types = file.field("tokenizer.ggml.token_type") or [1] * len(tokens)
    malformed = [key for key, values, kind in (("tokens", tokens, str), ("merges", merges, str), ("token_type", types, int))
                 if not isinstance(values, list) or not all(isinstance(v, kind) for v in values)]
    malformed += ["merges"] * any(len(m.split(" ")) != 2 for m in merges if "merges" not in malformed)
    if malformed:
        raise CheckpointError(f"{file.path}: the tokenizer metadata is malformed (tokenizer.ggml.{malformed[0]}); pass "
                              "tokenizer=<folder with vocab.json + merges.txt>")
    tokenizer = qwen_bpe({token: i for i, token in enumerate(tokens)}, merges)
    # control (3) and user-defined (4) tokens such as <|im_start|> and <think> are matched whole, at their own ids
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token, kind in zip(tokens, types) if kind in (3, 4)])
    return tokenizer


def quant_summary(file):
    counts = {}
    for qtype, _, _ in file.tensors.values():
        counts[qtype] = counts.get(qtype, 0) + 1
    return ", ".join(f"{count} {qtype}" for qtype, count in sorted(counts.items(), key=lambda kv: -kv[1]))
