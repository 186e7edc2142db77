"""ComfyUI nodes (classic API); `comfy`/`folder_paths` are imported only when a node runs."""

from .conditioning import KleinTextEncode
from .loaders import KleinTextEncoderLoader, KleinTransformerLoader, KleinVAELoader

NODE_CLASS_MAPPINGS = {
    "KleinTransformerLoader": KleinTransformerLoader,
    "KleinTextEncoderLoader": KleinTextEncoderLoader,
    "KleinTextEncode": KleinTextEncode,
    "KleinVAELoader": KleinVAELoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KleinTransformerLoader": "Klein Load Transformer",
    "KleinTextEncoderLoader": "Klein Load Text Encoder",
    "KleinTextEncode": "Klein Text Encode",
    "KleinVAELoader": "Klein Load VAE",
}
