"""The memory planner: from free device memory, the components' sizes and the resolution, decide per component
whether it stays resident, is loaded for its turn and offloaded (text encoder -> transformer -> VAE), or (the
transformer and the text encoder) streams its blocks from CPU memory with some blocks resident; whether the VAE
tiles; and the peak this plan predicts."""

from dataclasses import dataclass, field

import torch

from . import tiling
from .streaming import streamable_blocks

HEADROOM = 0.9  # plan within 90% of the free memory: allocator fragmentation and CUDA context


def module_bytes(module):
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def transformer_activation_bytes(params, image_tokens, reference_tokens=0, text_tokens=512, batch=1, dtype_bytes=2,
                                 cfg=False):
    """Peak activations of one forward: the widest projection of a single block over every token (plus the residual
    streams), for each CFG branch run together. Attention itself runs in SDPA's fused kernels."""
    tokens = text_tokens + image_tokens + reference_tokens
    widest = 3 * params.hidden_size + 2 * params.mlp_hidden_dim
    return (2 if cfg else 1) * batch * tokens * (widest + 4 * params.hidden_size) * dtype_bytes


def text_encoder_activation_bytes(params, tokens=512, batch=1, dtype_bytes=2):
    """Peak activations of a text encoder forward: one layer's MLP over every token plus the residual stream and
    the hidden states klein keeps (attention runs in SDPA's fused kernels)."""
    return batch * tokens * (3 * params.intermediate_size + 8 * params.hidden_size) * dtype_bytes


@dataclass
class Plan:
    text_encoder: str  # resident | offload | stream | paged (in place on the CPU, pages handed back as it runs)
    transformer: str  # the same
    vae: str  # resident | offload
    vae_tiled: bool
    resident_blocks: int | None = None  # the transformer's, when it streams
    notes: list = field(default_factory=list)
    peak: int | None = None  # predicted device memory at the busiest moment, in bytes (None: a forced mode)
    text_resident_blocks: int | None = None  # the text encoder's, when it streams

    def describe(self):
        blocks = f" ({self.resident_blocks} blocks resident)" if self.transformer == "stream" else ""
        layers = f" ({self.text_resident_blocks} layers resident)" if self.text_encoder == "stream" else ""
        peak = f", peak {self.peak / 2**30:.1f} GiB" if self.peak is not None else ""
        return (f"text encoder {self.text_encoder}{layers}, transformer {self.transformer}{blocks}, VAE {self.vae}"
                f"{', tiled' if self.vae_tiled else ''}{peak}" + "".join(f"; {n}" for n in self.notes))


def plan(free_bytes, text_encoder_bytes, transformer_bytes, block_bytes, vae_bytes, activation_bytes, decode_bytes,
         tile_decode_bytes=None, offloads=True, text_block_bytes=(), text_activation_bytes=0, releases=False):
    """Choose how to run and predict the peak. `block_bytes` / `text_block_bytes`: sizes of the transformer's /
    text encoder's blocks (streamable); the rest of a model stays on the device while it runs. `tile_decode_bytes`:
    a tiled decode's working memory (default: the untiled one's). `offloads`: weights can move between the device
    and CPU memory (CUDA, or any device given a budget); otherwise they are used in place and only the VAE can
    help, and `releases` (the CPU) hands a model's file pages back after its turn. Raises MemoryError when even
    streaming one block at a time can't fit."""
    budget = HEADROOM * free_bytes
    tile_decode_bytes = decode_bytes if tile_decode_bytes is None else min(tile_decode_bytes, decode_bytes)
    if not offloads:  # weights are used in place from their files (on the CPU their pages go back after a turn)
        tiled = decode_bytes > budget - vae_bytes
        decode = tile_decode_bytes if tiled else decode_bytes
        if not releases:
            peak = text_encoder_bytes + transformer_bytes + vae_bytes + max(activation_bytes, text_activation_bytes,
                                                                            decode)
            return Plan("resident", "resident", "resident", tiled, peak=peak, notes=["no offloading or streaming"])
        peak = vae_bytes + max(one_block_at_a_time(text_encoder_bytes, text_block_bytes) + text_activation_bytes,
                               one_block_at_a_time(transformer_bytes, block_bytes) + activation_bytes, decode)
        return Plan("paged", "paged", "resident", tiled, peak=peak,
                    notes=["CPU: weights used in place from their files, each block's pages handed back as it "
                           "finishes"])
    everything = (text_encoder_bytes + transformer_bytes + vae_bytes
                  + max(activation_bytes, text_activation_bytes, decode_bytes))
    if everything <= budget:
        return Plan("resident", "resident", "resident", False, peak=everything)
    notes = [f"{everything / 2**30:.1f} GiB needed at once, {budget / 2**30:.1f} GiB usable: one component at a time"]
    tiled = decode_bytes + vae_bytes > budget
    vae_peak = vae_bytes + (tile_decode_bytes if tiled else decode_bytes)
    transformer = turn("transformer", transformer_bytes, block_bytes, activation_bytes, free_bytes, notes)
    text = turn("text encoder", text_encoder_bytes, text_block_bytes, text_activation_bytes, free_bytes, notes)
    if vae_peak > budget:
        raise MemoryError(f"the VAE cannot decode in {free_bytes / 2**30:.1f} GiB even in tiles (about "
                          f"{vae_peak / HEADROOM / 2**30:.1f} GiB needed): free some memory on the device")
    return Plan(text[0], transformer[0], "offload", tiled, resident_blocks=transformer[1], notes=notes,
                peak=max(text[2], transformer[2], vae_peak), text_resident_blocks=text[1])


def one_block_at_a_time(total, block_bytes):
    """A model's resident weights when its blocks' pages go back as each one finishes: the rest, and one block."""
    return total - sum(block_bytes) + max(block_bytes, default=0)


def turn(name, total, block_bytes, activation_bytes, free_bytes, notes):
    """(role, blocks kept resident when streaming, peak) of a model that runs alone for its turn: loaded whole
    when it fits, else its blocks streamed from CPU memory around the rest of it."""
    budget = HEADROOM * free_bytes
    if total + activation_bytes <= budget:
        return "offload", None, total + activation_bytes
    fixed = total - sum(block_bytes) + activation_bytes + 2 * max(block_bytes, default=0)  # + two blocks in flight
    if not block_bytes or fixed > budget:
        need = fixed / HEADROOM
        raise MemoryError(f"the {name} cannot run in {free_bytes / 2**30:.1f} GiB even streaming one block at a "
                          f"time (about {need / 2**30:.1f} GiB needed at this resolution): lower the resolution or "
                          "use a smaller quantization")
    resident, used = 0, 0
    for size in block_bytes:
        if fixed + used + size > budget:
            break
        used, resident = used + size, resident + 1
    notes.append(f"{name} streams {len(block_bytes) - resident} of {len(block_bytes)} blocks from CPU memory")
    return "stream", resident, fixed + used


def working_bytes(transformer_params, text_params, vae, latent_h, latent_w, references=0, batch=1, cfg=False,
                  dtype_bytes=2, text_dtype_bytes=2):
    """The working memory of generating `batch` images of latent_h x latent_w (H/16, W/16) with `references`
    reference images of the same size, as `plan`'s keyword arguments: the transformer's and the text encoder's
    activations (text_params None: no text encoder) and the VAE's decode, whole and in tiles (vae None: none)."""
    tokens = latent_h * latent_w
    latents = torch.empty(batch, 128, latent_h, latent_w, device="meta")
    return {"activation_bytes": transformer_activation_bytes(transformer_params, tokens, references * tokens,
                                                             batch=batch, cfg=cfg, dtype_bytes=dtype_bytes),
            "text_activation_bytes": (text_encoder_activation_bytes(text_params, dtype_bytes=text_dtype_bytes)
                                      if text_params is not None else 0),
            "decode_bytes": tiling.decode_bytes(vae, latents) if vae is not None else 0,
            "tile_decode_bytes": tiling.tile_decode_bytes(vae, latents) if vae is not None else 0}


def plan_models(free_bytes, transformer, text_encoder, vae, latent_h, latent_w, references=0, batch=1, cfg=False,
                offloads=True, releases=False):
    """`plan` for these models (a text encoder's Qwen3 and the VAE may be None; meta-device models do); the rest
    as in `working_bytes`."""
    text = text_encoder is not None
    working = working_bytes(transformer.params, text_encoder.params if text else None, vae, latent_h, latent_w,
                            references, batch, cfg, transformer.dtype.itemsize,
                            text_encoder.dtype.itemsize if text else 2)
    return plan(free_bytes, module_bytes(text_encoder) if text else 0, module_bytes(transformer),
                [module_bytes(b) for b in streamable_blocks(transformer)], module_bytes(vae) if vae else 0,
                offloads=offloads, releases=releases,
                text_block_bytes=[module_bytes(b) for b in streamable_blocks(text_encoder)] if text else [], **working)
