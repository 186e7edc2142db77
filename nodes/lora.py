"""Klein LoRA: a LoRA file from models/loras on the transformer (and the text encoder when the file has layers
for it). Chainable; the input models are never changed."""

from ..loaders.lora import apply_lora_pair
from ..models.text_encoder import KleinTextEncoder
from ..models.transformer import Flux2
from .files import list_model_files, model_path

STRENGTH = {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}


class KleinLora:
    DESCRIPTION = ("Adds a LoRA to klein: BFL/ComfyUI, diffusers/PEFT, kohya and LyCORIS LoKr/LoHa files, on bf16, "
                   "fp8, nvfp4 and GGUF models alike (the LoRA runs beside the weights, which stay as loaded). "
                   "Chain several to stack them.")
    CATEGORY = "klein"
    FUNCTION = "apply"
    RETURN_TYPES = ("KLEIN_MODEL", "KLEIN_TEXT_ENCODER")
    RETURN_NAMES = ("model", "text_encoder")
    OUTPUT_TOOLTIPS = ("The transformer with the LoRA.",
                       "The text encoder with the LoRA's text-encoder layers (unchanged if it has none).")

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("KLEIN_MODEL", {"tooltip": "From Klein Load Transformer or another Klein LoRA."}),
                "lora_name": (list_model_files("loras"), {"tooltip": "LoRA file in models/loras (.safetensors)."}),
                "strength_model": ("FLOAT", {**STRENGTH, "tooltip": "How strongly the LoRA changes the transformer; "
                                                                    "0 leaves it as it is, negative values invert "
                                                                    "it."}),
            },
            "optional": {
                "text_encoder": ("KLEIN_TEXT_ENCODER", {"tooltip": "Connect it when the LoRA also trained the text "
                                                                   "encoder (a console warning says so)."}),
                "strength_text_encoder": ("FLOAT", {**STRENGTH, "tooltip": "Strength on the text encoder."}),
            },
        }

    def apply(self, model: Flux2, lora_name: str, strength_model: float, text_encoder: KleinTextEncoder | None = None,
              strength_text_encoder: float = 1.0) -> tuple[Flux2, KleinTextEncoder | None]:
        return apply_lora_pair(model, text_encoder, model_path("loras", lora_name), strength_model,
                               strength_text_encoder)
