"""Prompt -> CONDITIONING (core's socket type: [[embeddings (B,512,features), {}]])."""

from .runtime import load_for_inference


class KleinTextEncode:
    DESCRIPTION = "Encodes a prompt for FLUX.2 [klein] (chat template, 512 tokens, Qwen3 layers 9/18/27)."
    CATEGORY = "klein"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("Prompt embeddings; repeated prompts are served from a cache.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": ("KLEIN_TEXT_ENCODER", {"tooltip": "From Klein Load Text Encoder."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                    "tooltip": "The prompt. Empty is allowed (the base model's negative prompt is empty). "
                                               "Prompts over ~500 tokens are cut, with a warning in the console."}),
            }
        }

    def encode(self, text_encoder, text):
        load_for_inference(text_encoder.model, "text_encoder")
        embeddings = text_encoder.encode([text]).float().cpu()
        return ([[embeddings, {}]],)
