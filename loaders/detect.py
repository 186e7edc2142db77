"""What model a set of weight names and shapes holds: used for wrong-slot errors and `doctor`."""

from dataclasses import dataclass

WEIGHT_SUFFIXES = (".safetensors", ".sft", ".gguf")
FLUX2_CONTEXT_DIMS = {7680: "klein 4B", 12288: "klein 9B", 15360: "FLUX.2 dev"}
QWEN3_SIZES = {2560: "Qwen3-4B", 4096: "Qwen3-8B", 5120: "Qwen3-14B"}
LATENT_CHANNELS = {4: "SD1.x/SDXL", 16: "FLUX.1/SD3", 32: "FLUX.2"}


@dataclass(frozen=True)
class ModelKind:
    kind: str  # transformer | text_encoder | vae | unknown
    family: str  # flux2 | flux1 | sd | qwen3 | llm | clip | t5 | ...
    description: str
    layout: str = ""


def dim(shape, index):
    """Dimension `index` of `shape`, or 0 when the shape has no such dimension or is not a shape at all."""
    try:
        return int(tuple(shape)[index])
    except (TypeError, ValueError, IndexError, OverflowError):
        return 0


def identify(shapes):
    """Classify a state dict from {name: shape} (prefixes already stripped where it matters). Total: any dict (a
    damaged file's empty, 1-D or malformed shapes included) gives a ModelKind, never an exception."""
    keys = dict.fromkeys(k for k in shapes if isinstance(k, str))
    has = lambda *names: all(n in keys for n in names)  # noqa: E731
    stripped = {k.split("model.diffusion_model.", 1)[-1] for k in keys}

    for layout, mod_key, ctx_key in (
        ("bfl", "double_stream_modulation_img.lin.weight", "txt_in.weight"),
        ("diffusers", "double_stream_modulation_img.linear.weight", "context_embedder.weight"),
    ):
        if mod_key in stripped:
            ctx = dim(next((shapes[k] for k in keys if k.endswith(ctx_key)), ()), -1)
            name = FLUX2_CONTEXT_DIMS.get(ctx, f"FLUX.2-family (text width {ctx})")
            return ModelKind("transformer", "flux2",
                             f"FLUX.2 {name} transformer" if "klein" in name else f"{name} transformer", layout)
    if ("double_blocks.0.img_mod.lin.weight" in stripped
            or has("transformer_blocks.0.norm1.linear.weight", "x_embedder.weight")):
        return ModelKind("transformer", "flux1", "FLUX.1 transformer (FLUX.1 dev/schnell/Kontext)")
    if any(k.startswith("joint_blocks.") for k in stripped):
        return ModelKind("transformer", "sd3", "Stable Diffusion 3 MMDiT")
    if any(k.startswith(("input_blocks.", "down_blocks.0.resnets.")) for k in stripped) and not any(
        k.startswith("encoder.") for k in stripped
    ):
        return ModelKind("transformer", "sd", "Stable Diffusion UNet (SD1.x/SDXL)")

    if "model.embed_tokens.weight" in keys or "model.layers.0.input_layernorm.weight" in keys:
        width = dim(shapes.get("model.layers.0.input_layernorm.weight", ()), 0)
        if "model.layers.0.self_attn.q_norm.weight" in keys:
            return ModelKind("text_encoder", "qwen3",
                             QWEN3_SIZES.get(width, f"Qwen3 (hidden {width})") + " text encoder")
        return ModelKind("text_encoder", "llm", f"a Llama/Qwen2-style language model (hidden {width}), not Qwen3")
    if any(k.startswith(("text_model.encoder.", "transformer.resblocks.")) for k in keys):
        return ModelKind("text_encoder", "clip", "a CLIP text encoder")
    if any(k.startswith(("encoder.block.0.layer.0.", "shared.weight")) for k in keys):
        return ModelKind("text_encoder", "t5", "a T5 text encoder")

    vae_keys = {k.split("first_stage_model.", 1)[-1] for k in keys}
    if "decoder.conv_in.weight" in vae_keys:
        channels = dim(shapes[next(k for k in keys if k.endswith("decoder.conv_in.weight"))], 1)
        family = LATENT_CHANNELS.get(channels, f"{channels}-channel")
        is_flux2 = channels == 32 and "bn.running_mean" in vae_keys
        layout = "diffusers" if "decoder.up_blocks.0.resnets.0.norm1.weight" in vae_keys else "bfl"
        return ModelKind("vae", "flux2" if is_flux2 else "other", f"{family} VAE", layout)
    return ModelKind("unknown", "unknown", "an unrecognised model")
