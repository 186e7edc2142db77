"""Loader nodes: files from ComfyUI's model folders -> klein modules."""

import torch

from ..loaders.transformer import load_transformer
from .files import list_model_files, model_path

WEIGHT_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
                    "tooltip": "Precision the weights are kept in. 'default' keeps the file's own dtype (no copy)."}),
            }
        }

    def load(self, model_name, weight_dtype="default"):
        return (load_transformer(model_path("diffusion_models", model_name), dtype=WEIGHT_DTYPES[weight_dtype]),)
