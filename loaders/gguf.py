"""GGUF files read with gguf-py (memory-mapped): tensors by name, kept packed, and metadata. The models are built
from them in loaders/transformer.py and loaders/text_encoder.py."""

import math
import re

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError
from ..quant.dequant import BLOCK_SIZES, FLOAT_TYPES, type_name
from .gguf_header import check_gguf_header

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
        for name in names.values():
            self.check_layout(name)
        out = {}
        for new_name, name in names.items():
            qtype, shape, _ = self.tensors[name]
            packed = self.packed(name)
            if qtype in FLOAT_TYPES:  # the file's own pages when the dtype matches, else one conversion
                stored = FLOAT_TYPES[qtype]
                try:
                    values = packed.view(stored)
                except RuntimeError:  # data not aligned for its dtype (a file with a small general.alignment)
                    values = packed.clone().view(stored)
                out[new_name] = values.view(shape).to(device=device, dtype=dtype)
            else:
                out[new_name] = (packed.to(device), qtype, shape)
        return out

    def check_layout(self, name):
        """A tensor's type must be one we run and its bytes what its shape needs in that type; a GGML-packed one
        must be a non-empty matrix with rows of whole blocks."""
        qtype, shape, data = self.tensors[name]
        try:
            type_name(qtype)
        except Exception as e:
            raise CheckpointError(f"{self.path}: tensor '{name}': {e}") from None
        size = np.asarray(data).nbytes
        if qtype in FLOAT_TYPES:
            if size != math.prod(shape) * FLOAT_TYPES[qtype].itemsize:
                raise CheckpointError(f"{self.path}: tensor '{name}' holds {size} bytes, not a {shape} {qtype} "
                                      "tensor")
            return
        block, type_size = BLOCK_SIZES[qtype]
        if len(shape) != 2 or 0 in shape or shape[-1] % block:
            raise CheckpointError(f"{self.path}: tensor '{name}' is {qtype} of shape {tuple(shape)}; packed GGML "
                                  f"weights must be non-empty matrices with rows of whole {block}-value blocks.")
        expected = math.prod(shape) // block * type_size
        if size != expected:
            raise CheckpointError(f"{self.path}: tensor '{name}' holds {size} bytes, not the {expected} of a "
                                  f"{tuple(shape)} {qtype} tensor ({block} values in {type_size} bytes per block).")

    def check_model(self, names, model):
        """Before anything loads: every tensor of `names` ({model name: file name}) has its layout checked, and a
        GGML-packed one must be the weight of one of `model`'s linear or embedding layers (only those run packed)."""
        for new_name, name in names.items():
            self.check_layout(name)
            qtype = self.tensors[name][0]
            if qtype in FLOAT_TYPES:
                continue
            owner_name, _, leaf = new_name.rpartition(".")
            try:
                owner = model.get_submodule(owner_name)
            except AttributeError:
                owner = None
            if leaf != "weight" or not isinstance(owner, (nn.Linear, nn.Embedding)):
                raise CheckpointError(f"{self.path}: tensor '{name}' is stored as {qtype}, but only linear and "
                                      "embedding weights may be quantized (keep it F32/F16/BF16).")

    def summary(self):
        """Tensor counts by type, most common first: "197 Q4_K, 90 F32"."""
        counts = {}
        for qtype, _, _ in self.tensors.values():
            counts[qtype] = counts.get(qtype, 0) + 1
        return ", ".join(f"{count} {qtype}" for qtype, count in sorted(counts.items(), key=lambda kv: -kv[1]))
