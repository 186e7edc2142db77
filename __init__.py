"""Klein Nodes: FLUX.2 [klein] for ComfyUI and Python.

Outside ComfyUI this is a plain library (`import klein_nodes as kn`); inside ComfyUI's `custom_nodes/`
the same package also registers its nodes.
"""

from . import quant
from .errors import CheckpointError, KleinError, KleinNote, WrongModelError
from .loaders.lora import apply_lora
from .loaders.safety import load_image_safety, load_prompt_safety
from .loaders.text_encoder import ensure_text_encoder_fits, load_text_encoder
from .loaders.transformer import load_transformer
from .loaders.vae import load_vae
from .models.transformer import compile_blocks
from .provenance.save import save_images, verify_image
from .sampling.composite import composite_edit
from .sampling.outpaint import outpaint_canvas
from .sampling.pipeline import KleinPipeline
from .sampling.refine import tiled_refine
from .sampling.sampler import Cancelled
from .version import __version__
__all__ = ["Cancelled", "CheckpointError", "KleinError", "KleinNote", "KleinPipeline", "WrongModelError", "apply_lora",
           "compile_blocks", "composite_edit", "ensure_text_encoder_fits", "load_image_safety", "load_prompt_safety",
           "load_text_encoder", "load_transformer", "load_vae", "outpaint_canvas", "quant", "save_images",
           "tiled_refine", "verify_image", "__version__"]

try:
    import comfy.utils  # noqa: F401  (present only inside ComfyUI)
except ImportError:
    pass
else:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    WEB_DIRECTORY = "./js"  # node report lines in the UI; workflows from dropped JPEGs saved by Klein Watermark & Save
    __all__ += ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
