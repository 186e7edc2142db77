"""Loader nodes: files from ComfyUI's model folders -> klein modules."""

import torch

from ..loaders.text_encoder import load_text_encoder
from ..loaders.transformer import load_transformer
from ..loaders.vae import load_vae
from ..models.autoencoder import AutoEncoder
from ..models.text_encoder import KleinTextEncoder
from ..models.transformer import Flux2
from .files import list_model_files, model_path

WEIGHT_DTYPES = {"default": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ModelLoader:
    """One file from a ComfyUI model folder (`FOLDER`) -> `LOADER(path, dtype=...)`, with a weight dtype choice."""

    CATEGORY = "klein"
    FUNCTION = "load"
    FOLDER = INPUT = FILE_TOOLTIP = None
    LOADER = None

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                cls.INPUT: (list_model_files(cls.FOLDER), {"tooltip": cls.FILE_TOOLTIP}),
                "weight_dtype": (list(WEIGHT_DTYPES), {
                    "default": "default",
                    "tooltip": "Precision the weights are kept in. 'default' keeps the file's own dtype (no copy)."}),
            }
        }

    def load(self, weight_dtype: str = "default",
             **name: str) -> tuple[Flux2 | KleinTextEncoder | AutoEncoder]:
        path = model_path(self.FOLDER, name[self.INPUT])
        return (type(self).LOADER(path, dtype=WEIGHT_DTYPES[weight_dtype]),)


class KleinTransformerLoader(ModelLoader):
    DESCRIPTION = "Loads a FLUX.2 [klein] transformer (klein 4B/9B, distilled or base) from models/diffusion_models."
    RETURN_TYPES = ("KLEIN_MODEL",)
    OUTPUT_TOOLTIPS = ("The klein transformer, for the Klein sampler nodes.",)
    FOLDER, INPUT, LOADER = "diffusion_models", "model_name", load_transformer
    FILE_TOOLTIP = ("Transformer file in models/diffusion_models, e.g. flux-2-klein-4b.safetensors "
                    "(BFL/ComfyUI layout; bf16, fp16 or fp32).")


class KleinTextEncoderLoader(ModelLoader):
    DESCRIPTION = ("Loads the Qwen3 text encoder (Qwen3-4B for klein 4B, Qwen3-8B for klein 9B) from "
                   "models/text_encoders; only the layers klein reads are loaded. The tokenizer is ComfyUI's own.")
    RETURN_TYPES = ("KLEIN_TEXT_ENCODER",)
    OUTPUT_TOOLTIPS = ("The klein text encoder, for Klein Text Encode.",)
    FOLDER, INPUT, LOADER = "text_encoders", "text_encoder_name", load_text_encoder
    FILE_TOOLTIP = "Text encoder file in models/text_encoders, e.g. qwen_3_4b.safetensors."


class KleinVAELoader(ModelLoader):
    DESCRIPTION = ("Loads the FLUX.2 VAE (flux2-vae.safetensors, ae.safetensors or a diffusers vae/ file) "
                   "from models/vae.")
    RETURN_TYPES = ("KLEIN_VAE",)
    OUTPUT_TOOLTIPS = ("The FLUX.2 VAE, for the Klein encode/decode and reference nodes.",)
    FOLDER, INPUT, LOADER = "vae", "vae_name", load_vae
    FILE_TOOLTIP = "VAE file in models/vae, e.g. flux2-vae.safetensors (FLUX.1/SD VAEs do not fit klein)."
