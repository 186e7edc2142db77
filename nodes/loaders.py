"""Loader nodes: files from ComfyUI's model folders -> klein modules."""

import torch

from ..loaders.text_encoder import load_text_encoder
from ..loaders.transformer import load_transformer
from ..loaders.vae import load_vae
from .files import list_model_files, model_path

WEIGHT_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_TOOLTIP = "Precision the weights are kept in. 'default' keeps the file's own dtype (no copy)."


class KleinTransformerLoader:
    DESCRIPTION = "Loads a FLUX.2 [klein] transformer (klein 4B/9B, distilled or base) from models/diffusion_models."
    CATEGORY = "klein"
    RETURN_TYPES = ("KLEIN_MODEL",)
    OUTPUT_TOOLTIPS = ("The klein transformer, for the Klein sampler nodes.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (list_model_files("diffusion_models"), {
                    "tooltip": "Transformer file in models/diffusion_models, e.g. flux-2-klein-4b.safetensors "
                               "(BFL/ComfyUI layout; bf16, fp16 or fp32)."}),
                "weight_dtype": (list(WEIGHT_DTYPES), {
                    "default": "default",
                    "tooltip": DTYPE_TOOLTIP}),
            }
        }

    def load(self, model_name, weight_dtype="default"):
        return (load_transformer(model_path("diffusion_models", model_name), dtype=WEIGHT_DTYPES[weight_dtype]),)


class KleinTextEncoderLoader:
    DESCRIPTION = ("Loads the Qwen3 text encoder (Qwen3-4B for klein 4B, Qwen3-8B for klein 9B) from "
                   "models/text_encoders; only the layers klein reads are loaded. The tokenizer is ComfyUI's own.")
    CATEGORY = "klein"
    RETURN_TYPES = ("KLEIN_TEXT_ENCODER",)
    OUTPUT_TOOLTIPS = ("The klein text encoder, for Klein Text Encode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder_name": (list_model_files("text_encoders"), {
                    "tooltip": "Text encoder file in models/text_encoders, e.g. qwen_3_4b.safetensors."}),
                "weight_dtype": (list(WEIGHT_DTYPES), {"default": "default", "tooltip": DTYPE_TOOLTIP}),
            }
        }

    def load(self, text_encoder_name, weight_dtype="default"):
        path = model_path("text_encoders", text_encoder_name)
        return (load_text_encoder(path, dtype=WEIGHT_DTYPES[weight_dtype]),)


class KleinVAELoader:
    DESCRIPTION = "Loads the FLUX.2 VAE (flux2-vae.safetensors, ae.safetensors or a diffusers vae/ file) from models/vae."
    CATEGORY = "klein"
    RETURN_TYPES = ("KLEIN_VAE",)
    OUTPUT_TOOLTIPS = ("The FLUX.2 VAE, for the Klein encode/decode and reference nodes.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae_name": (list_model_files("vae"), {
                    "tooltip": "VAE file in models/vae, e.g. flux2-vae.safetensors (FLUX.1/SD VAEs do not fit klein)."}),
                "weight_dtype": (list(WEIGHT_DTYPES), {"default": "default", "tooltip": DTYPE_TOOLTIP}),
            }
        }

    def load(self, vae_name, weight_dtype="default"):
        return (load_vae(model_path("vae", vae_name), dtype=WEIGHT_DTYPES[weight_dtype]),)
