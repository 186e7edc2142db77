"""Qwen3 text encoder files (ComfyUI single file, Hugging Face / diffusers folders) -> `KleinTextEncoder`."""

import dataclasses
import json
import re
from pathlib import Path

import torch
from torch import nn

from ..arguments import device_argument, dtype_argument, flag, integer, path_argument
from ..errors import CheckpointError, KleinError, WrongModelError
from ..models.text_encoder import KLEIN_LAYERS, KleinTextEncoder, Qwen3, Qwen3Params, check_vocabulary
from ..models.transformer import Flux2
from ..quant.linear import fill_packed
from .checkpoint import check_state_dict, choose_dtype, is_gguf, open_checkpoint, require
from .detect import QWEN3_SIZES, identify
from .gguf import GGUFFile, llama_to_hf
from .scaled import find_quantized_layers, install_quantized_layers
from .tokenizer import find_tokenizer, load_tokenizer, tokenizer_from_gguf

TEXT_ENCODER_PREFIXES = ("model.", "text_encoders.qwen3_4b.transformer.model.",
                         "text_encoders.qwen3_8b.transformer.model.")
LAYER_KEY = re.compile(r"^layers\.(\d+)\.")
DEFAULT_ROPE_THETA = 1_000_000.0


def params_from_shapes(shapes, path, num_layers, rope_theta):
    require(shapes, {"embed_tokens.weight": 2, "layers.0.self_attn.q_proj.weight": 2,
                     "layers.0.self_attn.k_proj.weight": 2, "layers.0.self_attn.q_norm.weight": 1,
                     "layers.0.mlp.gate_proj.weight": 2}, path, "Qwen3 text encoder")
    vocab, hidden = shapes["embed_tokens.weight"]
    head_dim = shapes["layers.0.self_attn.q_norm.weight"][0]
    q_rows, k_rows = shapes["layers.0.self_attn.q_proj.weight"][0], shapes["layers.0.self_attn.k_proj.weight"][0]
    # the attention is built from these: whole heads of an even size (rotary halves), query heads in whole groups
    if head_dim % 2 or q_rows % head_dim or k_rows % head_dim or (q_rows // head_dim) % (k_rows // head_dim):
        raise CheckpointError(f"{path}: the attention shapes do not fit together: q_proj has {q_rows} rows, k_proj "
                              f"{k_rows}, q_norm {head_dim} (heads of an even size, as many query heads per key head); "
                              "a damaged file, or not a Qwen3 text encoder.")
    return Qwen3Params(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=shapes["layers.0.mlp.gate_proj.weight"][0],
        num_layers=num_layers,
        num_heads=q_rows // head_dim,
        num_kv_heads=k_rows // head_dim,
        head_dim=head_dim,
        rope_theta=rope_theta,
    )


def rope_theta_from_config(path):
    """rope_theta from a Hugging Face config.json beside the weights (the single file has none: Qwen3's 1e6)."""
    path = Path(path)
    for config in (path / "config.json", path / "text_encoder" / "config.json"):
        if config.is_file():
            data = json.loads(config.read_text())
            return float(data.get("rope_theta") or data.get("rope_parameters", {}).get("rope_theta")
                         or DEFAULT_ROPE_THETA)
    return DEFAULT_ROPE_THETA


def load_text_encoder(path: str | Path, tokenizer: str | Path | None = None, dtype: torch.dtype | None = None,
                      device: str | torch.device = "cpu", layers: tuple = KLEIN_LAYERS,
                      chat: bool = False) -> KleinTextEncoder:
    """Load Qwen3 (4B for klein 4B, 8B for klein 9B) with only the decoder layers `layers` needs.

    Accepts ComfyUI's `qwen_3_4b.safetensors`, a Hugging Face `text_encoder/` folder (sharded + index) or the
    diffusers repo root. Weights of deeper layers, the final norm and the LM head are never read, unless `chat`:
    then the whole chat model is built (every layer, final norm, LM head, tied to the embeddings when the file has
    no lm_head.weight), for the prompt check.
    """
    path, dtype, device = path_argument(path), dtype_argument(dtype), device_argument(device)
    tokenizer = None if tokenizer is None else path_argument(tokenizer, "tokenizer")
    layers, chat = layer_numbers(layers), flag(chat, "chat")
    if is_gguf(path):
        return load_gguf_text_encoder(path, tokenizer, dtype, device, layers, chat)
    ckpt = open_checkpoint(path, "text_encoder", "model", ())
    kind = identify(ckpt.shapes())
    if kind.kind != "text_encoder" or kind.family != "qwen3":
        raise WrongModelError(f"{path}: this is {kind.description}, not a Qwen3 text encoder. klein 4B uses Qwen3-4B "
                              "(qwen_3_4b.safetensors), klein 9B uses Qwen3-8B.")
    names = {strip(k): k for k in ckpt.keys()}
    shapes = {name: ckpt.shape(raw) for name, raw in names.items()}
    available = 1 + max((int(m.group(1)) for k in shapes if (m := LAYER_KEY.match(k))), default=-1)
    needed = available if chat else max(layers)
    if needed > available:
        raise CheckpointError(f"{path}: layer {needed} was requested but the file has only {available} decoder layers.")
    params = params_from_shapes(shapes, path, needed,
                                rope_theta_from_config(path if Path(path).is_dir() else Path(path).parent))
    params = chat_params(params, shapes, path) if chat else params
    with torch.device("meta"):
        model = Qwen3(params)
    expected = model.state_dict()
    # deeper layers, the final norm and an LM head are expected extras: only the needed tensors are checked
    check_state_dict(path, "a Qwen3 text encoder", {k: v.shape for k, v in expected.items()},
                     {k: shapes[k] for k in expected if k in shapes})
    quantized, _ = find_quantized_layers(ckpt)
    quantized = {layer: found for layer, found in quantized.items()  # an fp8 embedding table is plain data
                 if strip(layer) + ".weight" in expected and isinstance(model.get_submodule(strip(layer)), nn.Linear)}
    quantized_weights = {roles["weight"] for _, roles in quantized.values()}
    plain = [k for k in expected if names[k] not in quantized_weights]
    dtype = choose_dtype(ckpt, [names[k] for k in plain], dtype)
    install_quantized_layers(model, quantized, ckpt, strip, dtype, device)
    model.load_state_dict({k: ckpt.get(names[k]).to(device=device, dtype=dtype) for k in plain},
                          strict=False, assign=True)
    model.requires_grad_(False).eval()
    tokenizer_path = find_tokenizer(path, tokenizer)
    tok = load_tokenizer(tokenizer_path)
    check_vocabulary(model, tok, path)
    encoder = KleinTextEncoder(model, tok, description=kind.description)
    encoder.source = (path, tokenizer_path, dtype)
    return encoder


def load_gguf_text_encoder(path, tokenizer, dtype, device, layers, chat):
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
    file.check_model({k: names[k] for k in expected}, model)
    try:  # before the weights load: a damaged tokenizer in the metadata is refused at once
        tok = load_tokenizer(find_tokenizer(path, tokenizer))
    except CheckpointError:
        if tokenizer is not None:
            raise
        tok = tokenizer_from_gguf(file)
    check_vocabulary(model, tok, path)
    compute_dtype = dtype or torch.bfloat16
    model = fill_packed(model, file.load({k: names[k] for k in expected}, compute_dtype, device), compute_dtype)
    encoder = KleinTextEncoder(model, tok, description=f"{arch} text encoder (GGUF, {file.summary()})")
    encoder.source = (path, tokenizer, dtype)
    return encoder


def chat_params(params, shapes, path):
    """Qwen3Params for the whole chat model, once the file is known to hold its final norm (and maybe own head)."""
    if "norm.weight" not in shapes:
        raise CheckpointError(f"{path}: this Qwen3 file holds no final norm (model.norm.weight), so it is not the "
                              "whole chat model the prompt check runs; use the full qwen_3_4b file (ComfyUI's and the "
                              "Hugging Face release both are).")
    return dataclasses.replace(params, lm_head="own" if "lm_head.weight" in shapes else "tied")


def strip(name):
    for prefix in TEXT_ENCODER_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def layer_numbers(layers, name="layers"):
    """A non-empty tuple of decoder layer numbers (0 = the embeddings)."""
    if not isinstance(layers, (tuple, list, range)) or not 0 < len(layers) <= 64:
        raise KleinError(f"{name}={layers!r:.60}: give the decoder layers to read, e.g. (9, 18, 27)")
    return tuple(integer(layer, name, 0, 1024) for layer in layers)


def ensure_text_encoder_fits(text_encoder: KleinTextEncoder, transformer: Flux2, layers: tuple = KLEIN_LAYERS) -> None:
    """Raise when the encoder's features cannot feed the transformer (e.g. Qwen3-8B with klein 4B)."""
    features = text_encoder.hidden_size * len(layers)
    expected = transformer.params.context_in_dim
    if features != expected:
        want = QWEN3_SIZES.get(expected // len(layers), f"a text encoder with hidden size {expected // len(layers)}")
        raise WrongModelError(
            f"The text encoder ({text_encoder.description}, {features} features) does not fit the transformer "
            f"({getattr(transformer, 'description', 'FLUX.2')}, expects {expected} = {len(layers)} x "
            f"{expected // len(layers)}): use {want}."
        )
