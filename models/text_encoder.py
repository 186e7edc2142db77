"""Qwen3 decoder as klein's text encoder: runs only the layers whose outputs are requested. Built as the whole chat
model (every layer, final norm, LM head) only for the prompt check (models/safety.py).

Module names follow Hugging Face's `Qwen3Model` (without the `model.` prefix) so its state dicts load by name.
"""

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, KleinError, KleinNote
from . import prepacked
from .adapters import Linear, adapting, prepare_device, release_adapters
from .offload import Offloadable, compute_device, weights_on


@dataclass(frozen=True)
class Qwen3Params:
    """Defaults are Qwen3-4B; loaders fill every field from the weights."""

    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_layers: int = 27  # layers built: up to the deepest one klein reads
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    lm_head: str = ""  # "" (text encoder only), "tied" (the embedding table, as Qwen3-4B) or "own" (lm_head.weight)


class Qwen3(nn.Module):
    block_lists = ("layers",)  # what memory streaming may move block by block

    def __init__(self, params: Qwen3Params):
        super().__init__()
        self.params = params
        self.embed_tokens = Embedding(params.vocab_size, params.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(params) for _ in range(params.num_layers))
        if params.lm_head:
            self.norm = RMSNorm(params.hidden_size, params.rms_norm_eps)
        if params.lm_head == "own":
            self.lm_head = Linear(params.hidden_size, params.vocab_size, bias=False)
        for layer in self.modules():  # one forward per prompt: a kept CPU-packed copy would double the weights' RAM
            if isinstance(layer, Linear):
                layer.keep_packed = False

    @property
    def dtype(self):
        """The compute dtype: that of the float parameters (quantized layers compute in it too)."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @adapting
    def forward(self, input_ids, attention_mask, layers):
        """Hidden states after the given layers (0 = embeddings, k = output of decoder layer k), as a list, in the
        embeddings' dtype. Where bf16/fp16 layers compute in fp32 (a CPU without such matmuls, see prepacked.py) the
        whole model does, as ComfyUI's own encoder does on a CPU (elementwise work is faster there in fp32 too)."""
        deepest = max(layers)
        if deepest > len(self.layers):
            raise KleinError(f"layer {deepest} requested but only {len(self.layers)} decoder layers are loaded; load "
                             "the text encoder with these layers (load_text_encoder(..., layers=))")
        hidden = self.embed_tokens(input_ids)
        dtype = hidden.dtype
        hidden = hidden.to(prepacked.compute_dtype(dtype, hidden.device))
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        rope = rope_cos_sin(positions, self.params.head_dim, self.params.rope_theta, hidden.dtype)
        keep = attention_mask.bool()
        causal = torch.ones(len(positions), len(positions), dtype=torch.bool, device=hidden.device).tril()
        mask = causal[None, None] & keep[:, None, None, :]
        outputs = {0: hidden}
        for index, layer in enumerate(self.layers[:deepest], start=1):
            hidden = layer(hidden, rope, mask)
            if index in layers:
                outputs[index] = hidden
        return [outputs[k].to(dtype) for k in layers]


    def next_token_logits(self, input_ids, attention_mask, rows=None):
        """(B, vocab) logits of the token after each sequence's last real token (all layers, final norm, LM head);
        `rows`: only those vocabulary entries (cheap: a tied head's rows are looked up like embeddings)."""
        if not self.params.lm_head:
            raise KleinError("this Qwen3 was built as a text encoder only (no final norm or LM head)")
        (hidden,) = self(input_ids, attention_mask, [len(self.layers)])
        last = attention_mask.sum(1) - 1
        hidden = self.norm(hidden[torch.arange(len(last), device=hidden.device), last])
        if self.params.lm_head == "own":
            logits = self.lm_head(hidden)
            return logits if rows is None else logits[:, rows]
        ids = torch.arange(self.params.vocab_size, device=hidden.device) if rows is None else torch.as_tensor(
            rows, device=hidden.device)
        return hidden.float() @ self.embed_tokens(ids).float().T


class DecoderLayer(nn.Module):
    def __init__(self, params):
        super().__init__()
        self.self_attn = Attention(params)
        self.mlp = MLP(params.hidden_size, params.intermediate_size)
        self.input_layernorm = RMSNorm(params.hidden_size, params.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(params.hidden_size, params.rms_norm_eps)

    def forward(self, x, rope, mask):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Attention(nn.Module):
    def __init__(self, params):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = params.num_heads, params.num_kv_heads, params.head_dim
        self.q_proj = Linear(params.hidden_size, params.num_heads * params.head_dim, bias=False)
        self.k_proj = Linear(params.hidden_size, params.num_kv_heads * params.head_dim, bias=False)
        self.v_proj = Linear(params.hidden_size, params.num_kv_heads * params.head_dim, bias=False)
        self.o_proj = Linear(params.num_heads * params.head_dim, params.hidden_size, bias=False)
        self.q_norm = RMSNorm(params.head_dim, params.rms_norm_eps)
        self.k_norm = RMSNorm(params.head_dim, params.rms_norm_eps)

    def forward(self, x, rope, mask):
        batch, length, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # k/v shared, never copied
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(Offloadable, nn.Module):
    """Normalises in fp32, multiplies the weight after casting back (as Qwen3 does)."""

    bias = None  # ComfyUI's loaders read it (see models/offload.py)

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        with weights_on(self, x.device):
            return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Embedding(Offloadable, nn.Embedding):
    bias = None  # ComfyUI's loaders read it (see models/offload.py)

    def reset_parameters(self):
        # on the meta device (the loaders build there, then read the file) torch's first normal_ costs ~1 s
        if not self.weight.is_meta:
            super().reset_parameters()

    def forward(self, ids):
        with weights_on(self, ids.device):
            return super().forward(ids)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """Rotate-half RoPE tables over the full head, angles in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
                               / head_dim)
    angles = positions.float()[:, None] * inv_freq[None]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, rope):
    cos, sin = rope
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


KLEIN_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
PAD_ID = 151643
MIN_TOKENS = 512  # klein pads every prompt to 512 tokens
KLEIN_LAYERS = (9, 18, 27)


def check_vocabulary(model, tokenizer, path):
    """Refuse a tokenizer whose ids (or klein's padding id) reach past the model's embedding rows."""
    rows = model.params.vocab_size
    highest = max(PAD_ID, tokenizer.get_vocab_size(with_added_tokens=True) - 1)
    if highest >= rows:
        raise CheckpointError(f"{path}: the tokenizer's ids reach {highest} but the embedding table has {rows} rows; "
                              "klein's text encoder is Qwen3 with its whole vocabulary (151,936 rows)")


def check_prompts(prompts):
    """Prompts are strings of characters a tokenizer can read (a lone surrogate, from a broken copy-paste, is not)."""
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise KleinError(f"a prompt must be a string, not {type(prompt).__name__}")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise KleinError(f"the prompt holds an unpaired surrogate character ({prompt[e.start]!r} at position "
                             f"{e.start}), usually from a broken copy-paste; retype that part") from None


class KleinTextEncoder:
    """Prompt -> klein conditioning: chat template, right padding, layer-major concatenation of hidden states.

    Embeddings are cached per prompt, so re-running a graph (or a batch that repeats a prompt) encodes it once.
    """

    def __init__(self, model: Qwen3, tokenizer, cache_size=16, description="Qwen3 text encoder"):
        self.model = model
        self.tokenizer = tokenizer
        self.description = description
        self.cache_size = cache_size
        self._cache = {}

    @property
    def hidden_size(self):
        return self.model.params.hidden_size

    def tokenize(self, prompt, max_length=512, length=None):
        """Template token ids, cut to `max_length` (with a warning; None: never cut), padded with <|endoftext|> to
        `length` (default: max_length); and the mask."""
        ids = self.tokenizer.encode(KLEIN_TEMPLATE.format(prompt), add_special_tokens=False).ids
        if max_length is not None and len(ids) > max_length:
            warnings.warn(f"Prompt is {len(ids)} tokens with the chat template; the last {len(ids) - max_length} "
                          f"tokens were cut to fit max_length={max_length} (the prompt starts: {prompt[:40]!r}).",
                          KleinNote, stacklevel=3)
            ids = ids[:max_length]
        length = length or max_length or len(ids)
        mask = [1] * len(ids) + [0] * (length - len(ids))
        return ids + [PAD_ID] * (length - len(ids)), mask

    def sequence_length(self, prompts, max_length):
        """Tokens per embedding: `max_length`, or with None (every token kept, as ComfyUI does) 512 or the longest
        prompt's length, whichever is more."""
        if max_length is not None:
            if not isinstance(max_length, int) or max_length < 1:
                raise KleinError("max_length must be a positive number of tokens or None (every token), "
                                 f"not {max_length!r}")
            return max_length
        return max([MIN_TOKENS] + [len(self.tokenize(p, None)[0]) for p in prompts])

    @torch.inference_mode()
    def encode(self, prompts: str | list[str], max_length: int | None = 512,
               layers: tuple = KLEIN_LAYERS) -> torch.Tensor:
        """(B, L, len(layers)·hidden) embeddings for a prompt or a list of prompts; L = sequence_length()."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        check_prompts(prompts)
        layers = tuple(layers)
        length = self.sequence_length(prompts, max_length)
        keys = [(p, length, layers, self.model.dtype) for p in prompts]
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if todo:
            tokens = [self.tokenize(k[0], max_length, length) for k in todo]
            device = compute_device(self.model)
            ids = torch.tensor([t[0] for t in tokens], device=device)
            mask = torch.tensor([t[1] for t in tokens], device=device)
            try:
                prepare_device(self.model, device, self.model.dtype)
                hidden = torch.stack(self.model(ids, mask, layers), dim=2)  # (B, L, layers, hidden)
            finally:
                release_adapters(self.model)
            for key, embedding in zip(todo, hidden.flatten(2)):
                self._remember(key, embedding)
        return torch.stack([self._cache[k] for k in keys])

    def _remember(self, key, embedding):
        self._cache.pop(key, None)
        self._cache[key] = embedding
        while len(self._cache) > self.cache_size:
            self._cache.pop(next(iter(self._cache)))
