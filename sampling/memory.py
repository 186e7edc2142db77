"""The memory planner: from free device memory, the components' sizes and the resolution, decide per component
whether it stays resident, is loaded for its turn and offloaded (text encoder -> transformer -> VAE), or (the
transformer only) streams its blocks from CPU memory with some blocks resident; and whether the VAE tiles."""

from dataclasses import dataclass, field

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


@dataclass
class Plan:
    text_encoder: str  # resident | offload
    transformer: str  # resident | offload | stream
    vae: str  # resident | offload
    vae_tiled: bool
    resident_blocks: int | None = None
    notes: list = field(default_factory=list)

    def describe(self):
        blocks = f" ({self.resident_blocks} blocks resident)" if self.transformer == "stream" else ""
        return (f"text encoder {self.text_encoder}, transformer {self.transformer}{blocks}, VAE {self.vae}"
                f"{', tiled' if self.vae_tiled else ''}" + "".join(f"; {n}" for n in self.notes))


def plan(free_bytes, text_encoder_bytes, transformer_bytes, block_bytes, vae_bytes, activation_bytes, decode_bytes,
         device_type="cuda"):
    """Choose how to run. `block_bytes`: sizes of the transformer's blocks (streamable); the rest of the transformer
    must stay on the device while it runs. Raises MemoryError when even streaming one block at a time can't fit."""
    budget = HEADROOM * free_bytes
    if device_type != "cuda":  # weights live in RAM and are used in place: nothing to move, only the VAE can help
        tiled = decode_bytes > budget - vae_bytes
        return Plan("resident", "resident", "resident", tiled, notes=["CPU: no offloading or streaming"])
    everything = text_encoder_bytes + transformer_bytes + vae_bytes + max(activation_bytes, decode_bytes)
    if everything <= budget:
        return Plan("resident", "resident", "resident", False)
    notes = [f"{everything / 2**30:.1f} GiB needed at once, {budget / 2**30:.1f} GiB usable: one component at a time"]
    tiled = decode_bytes + vae_bytes > budget
    if transformer_bytes + activation_bytes <= budget:
        return Plan("offload", "offload", "offload", tiled, notes=notes)
    fixed = transformer_bytes - sum(block_bytes) + activation_bytes + 2 * max(block_bytes)  # + two blocks in flight
    room = budget - fixed
    if room < 0:
        need = (fixed + 0.0) / HEADROOM
        raise MemoryError(f"the transformer cannot run in {free_bytes / 2**30:.1f} GiB even streaming one block at a "
                          f"time (about {need / 2**30:.1f} GiB needed at this resolution): lower the resolution or "
                          "use a smaller quantization")
    resident, used = 0, 0
    for size in block_bytes:
        if used + size > room:
            break
        used, resident = used + size, resident + 1
    notes.append(f"transformer streams {len(block_bytes) - resident} of {len(block_bytes)} blocks from CPU memory")
    return Plan("offload", "stream", "offload", tiled, resident_blocks=resident, notes=notes)
