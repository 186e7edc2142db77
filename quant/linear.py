"""Layers whose weights stay packed in memory and are dequantized only when the layer runs."""

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError
from ..models import prepacked
from ..models.adapters import linear_with_adapters
from ..models.offload import Offloadable, weights_on
from ..models.prepacked import scratch  # one buffer per thread, device and dtype, shared with widened layers
from . import dequant
from .dequant import BLOCK_SIZES, dequantize, type_name


class DequantizingLinear(Offloadable, nn.Module):
    """nn.Linear (no bias) whose weight is stored quantized: `dequantized()` rebuilds it each time the layer runs.
    Adapters (LoRA ...) attached for a forward apply to the dequantized weight; the packed data never changes."""

    adapters = ()
    bias = None  # ComfyUI's loaders read it (see models/offload.py)

    def __init__(self, in_features, out_features, compute_dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.storage()}"

    def storage(self):
        return f"dtype={self.weight.dtype}"

    def dequantized(self, dtype=None):
        raise NotImplementedError

    def forward(self, x):
        with weights_on(self, x.device):
            return linear_with_adapters(self, x, self.forward_base) if self.adapters else self.forward_base(x)

    def forward_base(self, x):
        if not prepacked.widens(self.compute_dtype, x):
            return F.linear(x.to(self.compute_dtype), self.dequantized())
        # a CPU without bf16/fp16 matmuls: dequantized to fp32 (a few rows: to the compute dtype), in x's dtype
        dtype = self.compute_dtype if prepacked.few_rows(x) else torch.float32
        return F.linear(x.to(dtype), self.dequantized(dtype)).to(x.dtype)


class QuantizedLinear(DequantizingLinear):
    """GGML-packed weights: per forward, dequantize into a shared buffer, then matmul."""

    weight = bias = None  # ComfyUI's loaders read both (see models/offload.py); the data is `packed`

    def __init__(self, packed, qtype, in_features, out_features, compute_dtype=torch.bfloat16):
        super().__init__(in_features, out_features, compute_dtype)
        self.qtype = type_name(qtype)
        self.register_buffer("packed", packed)

    def storage(self):
        return f"qtype={self.qtype}"

    def prepare_device(self, device):
        """Called before a sampling loop on `device` (see dequant.prepare)."""
        dequant.prepare(self.qtype, self.packed, self.compute_dtype, device)

    def dequantized(self, dtype=None):
        dtype = dtype or self.compute_dtype
        shape = (self.out_features, self.in_features)
        weight = scratch(shape[0] * shape[1], dtype, self.packed.device).view(shape)
        return dequantize(self.packed, self.qtype, shape, dtype, out=weight)


class QuantizedEmbedding(Offloadable, nn.Module):
    """nn.Embedding with GGML-packed rows: only the rows looked up are dequantized."""

    weight = bias = None  # ComfyUI's loaders read both (see models/offload.py); the data is `packed`

    def __init__(self, packed, qtype, num_embeddings, embedding_dim, compute_dtype=torch.bfloat16):
        super().__init__()
        self.qtype = type_name(qtype)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.compute_dtype = compute_dtype
        block_size, type_size = BLOCK_SIZES[self.qtype]
        self.register_buffer("packed", packed.reshape(num_embeddings, embedding_dim // block_size * type_size))

    def forward(self, ids):
        with weights_on(self, ids.device):
            rows = self.packed[ids.reshape(-1)]
        values = dequantize(rows, self.qtype, (rows.shape[0], self.embedding_dim), self.compute_dtype)
        return values.reshape(*ids.shape, self.embedding_dim)


def replace_module(root, name, module):
    """Put `module` at dotted `name` inside `root` (e.g. 'double_blocks.0.img_attn.qkv')."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def fill_packed(model, tensors, compute_dtype):
    """Fill a model built on the meta device from {name: tensor or (packed, qtype, shape)} (a GGUF file's): packed
    2-D weights become QuantizedLinear/QuantizedEmbedding modules, the rest loads with assign."""
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
            raise CheckpointError(f"'{name}' is stored as {qtype}, "
                                  "but only linear and embedding weights may be quantized")
    model.load_state_dict(plain, strict=False, assign=True)
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftover:
        raise CheckpointError(f"tensors missing from the file: {', '.join(leftover[:5])}")
    return model.requires_grad_(False).eval()
