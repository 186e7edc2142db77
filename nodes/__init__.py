"""ComfyUI nodes (classic API); `comfy`/`folder_paths` are imported only when a node runs."""

from .loaders import KleinTransformerLoader

NODE_CLASS_MAPPINGS = {
    "KleinTransformerLoader": KleinTransformerLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "KleinTransformerLoader": "Klein Load Transformer",
}
