"""Prompt -> CONDITIONING (core's socket type: [[embeddings (B,tokens,features), {}]])."""

from ..models.text_encoder import KleinTextEncoder
from .runtime import load_for_inference

MAX_TOKENS_INPUT = ("INT", {"default": 0, "min": 0, "max": 32768, "step": 1, "advanced": True,
                            "tooltip": "0 keeps every prompt token, padded to at least 512, as ComfyUI's own klein "
                                       "text encoding does. 512 cuts longer prompts there, as diffusers and BFL's "
                                       "reference code do."})


def max_length(max_tokens):
    """The max_tokens widget as encode()'s max_length: 0 keeps every token."""
    return max_tokens or None


class KleinTextEncode:
    DESCRIPTION = "Encodes a prompt for FLUX.2 [klein] (chat template, at least 512 tokens, Qwen3 layers 9/18/27)."
    CATEGORY = "klein"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Prompt embeddings; repeated prompts are served from a cache.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "text_encoder": ("KLEIN_TEXT_ENCODER", {"tooltip": "From Klein Load Text Encoder."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                    "tooltip": "The prompt. Empty is allowed (the base model's negative prompt is "
                                               "empty)."}),
            },
            "optional": {"max_tokens": MAX_TOKENS_INPUT},
        }

    def encode(self, text_encoder: KleinTextEncoder, text: str, max_tokens: int = 0) -> tuple[list]:
        load_for_inference(text_encoder.model, "text_encoder")
        embeddings = text_encoder.encode([text], max_length=max_length(max_tokens)).float().cpu()
        return ([[embeddings, {}]],)
