"""ComfyUI nodes (classic API); `comfy`/`folder_paths` are imported only when a node runs."""

from .conditioning import KleinTextEncode
from .loaders import KleinTextEncoderLoader, KleinTransformerLoader, KleinVAELoader
from .lora import KleinLora
from .save import KleinSave, KleinVerify
from .sampling import KleinEmptyLatent, KleinGenerate, KleinReferences, KleinSampler, KleinVAEDecode, KleinVAEEncode

NODE_CLASS_MAPPINGS = {
    "KleinTransformerLoader": KleinTransformerLoader,
    "KleinTextEncoderLoader": KleinTextEncoderLoader,
    "KleinLora": KleinLora,
    "KleinTextEncode": KleinTextEncode,
    "KleinVAELoader": KleinVAELoader,
    "KleinReferences": KleinReferences,
    "KleinEmptyLatent": KleinEmptyLatent,
    "KleinSampler": KleinSampler,
    "KleinVAEEncode": KleinVAEEncode,
    "KleinVAEDecode": KleinVAEDecode,
    "KleinGenerate": KleinGenerate,
    "KleinSave": KleinSave,
    "KleinVerify": KleinVerify,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KleinTransformerLoader": "Klein Load Transformer",
    "KleinTextEncoderLoader": "Klein Load Text Encoder",
    "KleinLora": "Klein LoRA",
    "KleinTextEncode": "Klein Text Encode",
    "KleinVAELoader": "Klein Load VAE",
    "KleinReferences": "Klein References",
    "KleinEmptyLatent": "Klein Empty Latent",
    "KleinSampler": "Klein Sampler",
    "KleinVAEEncode": "Klein VAE Encode",
    "KleinVAEDecode": "Klein VAE Decode",
    "KleinGenerate": "Klein Generate",
    "KleinSave": "Klein Watermark & Save",
    "KleinVerify": "Klein Verify Image",
}
