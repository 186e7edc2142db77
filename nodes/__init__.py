"""ComfyUI nodes (classic API); `comfy`/`folder_paths` are imported only when a node runs."""

import functools
import logging
import warnings

from ..errors import KleinNote
from .conditioning import KleinTextEncode
from .edit import KleinEditComposite, KleinOutpaintCanvas, KleinTiledRefine
from .loaders import KleinTextEncoderLoader, KleinTransformerLoader, KleinVAELoader
from .lora import KleinLora
from .safety import KleinImageCheck, KleinPromptCheck
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
    "KleinEditComposite": KleinEditComposite,
    "KleinOutpaintCanvas": KleinOutpaintCanvas,
    "KleinTiledRefine": KleinTiledRefine,
    "KleinSave": KleinSave,
    "KleinVerify": KleinVerify,
    "KleinPromptCheck": KleinPromptCheck,
    "KleinImageCheck": KleinImageCheck,
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
    "KleinEditComposite": "Klein Edit Composite",
    "KleinOutpaintCanvas": "Klein Outpaint Canvas",
    "KleinTiledRefine": "Klein Tiled Refine",
    "KleinSave": "Klein Watermark & Save",
    "KleinVerify": "Klein Verify Image",
    "KleinPromptCheck": "Klein Prompt Check",
    "KleinImageCheck": "Klein Image Check",
}


def reporting(node_class):
    """The notes a node's run raises (KleinNote: a size rounded, a reference cropped, a prompt cut, LoRA keys left
    out) become text under the node in the UI (`ui.text`, shown by js/klein_report.js) and one console line each."""
    run = getattr(node_class, node_class.FUNCTION)

    @functools.wraps(run)
    def run_reporting(self, *args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = run(self, *args, **kwargs)
        notes = []
        for warning in caught:
            if issubclass(warning.category, KleinNote):
                notes.append(str(warning.message))
            else:  # not ours to show: back to Python's warning machinery
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        notes = list(dict.fromkeys(notes))
        for note in notes:
            logging.getLogger("klein_nodes").warning("klein: %s", note)
        if not notes:
            return result
        if isinstance(result, dict):
            return {**result, "ui": {**result.get("ui", {}), "text": [*result.get("ui", {}).get("text", []), *notes]}}
        return {"ui": {"text": notes}, "result": result}

    setattr(node_class, node_class.FUNCTION, run_reporting)
    return node_class


for _node in NODE_CLASS_MAPPINGS.values():
    reporting(_node)

