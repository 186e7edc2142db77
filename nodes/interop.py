"""ComfyUI's own klein objects in our nodes: a MODEL from core's Load Diffusion Model and a VAE from core's Load VAE
become klein modules over the very tensors core loaded (no copy, no second read of the file), built once per object.

Core's names are the BFL file's, except that its transformer's QK norms call `scale` `weight` and its VAE moves the
(post_)quant_conv to the top level."""

import re

import torch

from ..errors import KleinError
from ..loaders.transformer import transformer_from_state_dict
from ..loaders.vae import vae_from_state_dict

CORE_QK_NORM = re.compile(r"\.(query_norm|key_norm)\.weight$")
CORE_VAE_CONVS = re.compile(r"^(quant_conv|post_quant_conv)\.")
MODEL_INPUT = ("KLEIN_MODEL,MODEL", {"tooltip": "From Klein Load Transformer, or a FLUX.2 klein MODEL from ComfyUI's "
                                                "Load Diffusion Model (its weights are shared, not copied)."})
VAE_INPUT = ("KLEIN_VAE,VAE", {"tooltip": "From Klein Load VAE, or the FLUX.2 VAE from ComfyUI's Load VAE."})


def plain_tensors(module, what, fix):
    """`module`'s state dict, refused when core holds quantized tensors (fp8/nvfp4 layers, GGUF packs)."""
    tensors = module.state_dict()
    quantized = [name for name, tensor in tensors.items() if type(tensor) is not torch.Tensor]
    if quantized:
        raise KleinError(f"this {what} holds quantized weights ({type(tensors[quantized[0]]).__name__}, e.g. "
                         f"'{quantized[0]}'), which Klein nodes do not read from ComfyUI's loaders: {fix}")
    return tensors


def core_vae_conv(match):
    return ("encoder." if match.group(1) == "quant_conv" else "decoder.") + match.group(0)


def cached_view(owner, build):
    """The klein module built once over core module `owner`, kept as a plain attribute (never a submodule)."""
    if "klein_view" not in owner.__dict__:
        owner.__dict__["klein_view"] = build()
    return owner.__dict__["klein_view"]


def klein_transformer(model):
    """A KLEIN_MODEL as is; a core MODEL holding FLUX.2 klein as our transformer over its weights."""
    if isinstance(model, torch.nn.Module):
        return model
    diffusion = getattr(getattr(model, "model", None), "diffusion_model", None)
    if diffusion is None:
        raise KleinError(f"the model input got a {type(model).__name__}: connect Klein Load Transformer or ComfyUI's "
                         "Load Diffusion Model")
    if getattr(model, "patches", None):
        raise KleinError("this MODEL carries ComfyUI weight patches (a LoRA from Load LoRA, ...), which Klein Sampler "
                         "cannot apply: load the LoRA with Klein LoRA on a Klein model, or sample with core's KSampler")
    def build():
        tensors = plain_tensors(diffusion, "MODEL",
                                "load the file with Klein Load Transformer, which keeps it quantized")
        return transformer_from_state_dict({CORE_QK_NORM.sub(r".\1.scale", k): v for k, v in tensors.items()},
                                           f"ComfyUI MODEL ({type(model.model).__name__})")
    return cached_view(diffusion, build)


def klein_vae(vae):
    """A KLEIN_VAE as is; core's FLUX.2 VAE as our autoencoder over its weights."""
    if isinstance(vae, torch.nn.Module):
        return vae
    first_stage = getattr(vae, "first_stage_model", None)
    if first_stage is None:
        raise KleinError(f"the vae input got a {type(vae).__name__}: connect Klein Load VAE or ComfyUI's Load VAE")
    def build():
        tensors = plain_tensors(first_stage, "VAE", "load the file with Klein Load VAE")
        return vae_from_state_dict({CORE_VAE_CONVS.sub(core_vae_conv, k): v for k, v in tensors.items()}, "ComfyUI VAE")
    return cached_view(first_stage, build)
