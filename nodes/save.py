"""Watermark & Save and Verify nodes."""

import json
import os

import torch

from ..errors import KleinError
from ..provenance.formats import IMAGE_FORMATS
from ..provenance.save import output_folder, save_image_records, verify_image
from .runtime import verdict
from .safety import checks_upstream
from .sampling import IMAGE_SLOTS


def comfy_output_directory():
    import folder_paths  # ComfyUI only

    return folder_paths.get_output_directory()


def credentials_directory():
    """The pack's signing credentials live in ComfyUI's user directory, never in the output folder."""
    import folder_paths

    return os.path.join(folder_paths.get_user_directory(), "klein_nodes", "c2pa")


def metadata_disabled():
    try:
        from comfy.cli_args import args
    except ImportError:
        return False
    return bool(getattr(args, "disable_metadata", False))


# inputs through which a loaded image shapes a result: as a reference, or as the image being edited
REFERENCE_INPUTS = {"KleinReferences": IMAGE_SLOTS, "KleinGenerate": IMAGE_SLOTS}
EDITED_INPUTS = {"KleinVAEEncode": ("image",), "VAEEncode": ("pixels",), "VAEEncodeForInpaint": ("pixels",)}


def walk_upstream(prompt, node_id):
    """(id, node) of node `node_id` of the API `prompt` and of every node feeding it, each once."""
    seen, stack = set(), [str(node_id)]
    while stack:
        current = stack.pop()
        if current in seen or current not in (prompt or {}):
            continue
        seen.add(current)
        yield current, prompt[current]
        stack.extend(str(v[0]) for v in prompt[current].get("inputs", {}).values()
                     if isinstance(v, list) and len(v) == 2)


def graph_sources(prompt, node_id):
    """[(role, file name)] of the Load Image nodes whose image reaches node `node_id` of the API `prompt` through a
    reference input or an encode-for-editing input, for the C2PA ingredients."""
    found = []
    for _, node in walk_upstream(prompt, node_id):
        kind = node.get("class_type")
        for name, value in node.get("inputs", {}).items():
            if not (isinstance(value, list) and len(value) == 2):
                continue
            upstream = prompt.get(str(value[0]), {})
            role = ("reference" if name in REFERENCE_INPUTS.get(kind, ()) else
                    "edited" if name in EDITED_INPUTS.get(kind, ()) else None)
            if (role and upstream.get("class_type") == "LoadImage"
                    and (role, upstream["inputs"].get("image")) not in found):
                found.append((role, upstream["inputs"].get("image")))
    return found


def input_file(name):
    import folder_paths

    return folder_paths.get_annotated_filepath(name)


def report(record):
    """One line per saved image for the node's UI: watermark bits read back, C2PA state, anything dropped."""
    mark = "no watermark" if record.watermark_bits is None else f"watermark {record.watermark_bits}/46 bits read back"
    c2pa = "C2PA signed" if record.signed else "not signed"
    return "; ".join([record.path.name, mark, c2pa, *record.notes])


class KleinSave:
    DESCRIPTION = ("Saves images with BFL's invisible FLUX watermark (self-checked), a signed C2PA manifest "
                   "(trainedAlgorithmicMedia; the prompt stays out of it) and ComfyUI's workflow metadata.")
    CATEGORY = "klein"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The images, passed through.",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "images": ("IMAGE", {"tooltip": "Images to save."}),
                "filename_prefix": ("STRING", {"default": "klein", "tooltip": "File name prefix; 'folder/name' saves "
                                                                             "into a subfolder of the output folder."}),
                "format": (list(IMAGE_FORMATS), {"default": "png", "tooltip": "PNG keeps the watermark and loads the "
                                                                       "workflow on drop; JPEG is saved 4:4:4."}),
                "quality": ("INT", {"default": 80, "min": 1, "max": 100,
                                    "tooltip": "JPEG/WebP quality (the hosted klein APIs use 80). Ignored for PNG."}),
                "watermark": ("BOOLEAN", {"default": True, "tooltip": "Embed the invisible FLUX watermark (any FLUX "
                                                                      "watermark detector reads it)."}),
                "c2pa": ("BOOLEAN", {"default": True, "tooltip": "Sign Content Credentials (C2PA) with the local "
                                                                 "credentials (created on first use in ComfyUI's "
                                                                 "user folder)."}),
                "allow_unsigned": ("BOOLEAN", {"default": False, "tooltip": "If signing is impossible, save unsigned "
                                                                            "instead of failing."}),
            },
            "optional": {"mask": ("MASK", {"tooltip": "Transparency, as Load Image gives it (1 = transparent): saved "
                                                      "as the alpha channel of PNG/WebP; JPEG is composited on "
                                                      "white."}),
                         "watermark_mode": (["robust", "standard"], {
                             "default": "robust", "tooltip": "robust: placed so the mark survives JPEG/WebP saves and "
                             "re-saves at quality 75+ (PSNR >= 35 dB). standard: BFL's embedding, byte-identical to "
                             "imwatermark; lost by most lossy saves."})},
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO", "unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix: str | None = None) -> bool | str:
        return verdict(lambda prefix: output_folder(comfy_output_directory(), prefix), filename_prefix)

    def save(self, images: torch.Tensor, filename_prefix: str = "klein", format: str = "png", quality: int = 80,
             watermark: bool = True, c2pa: bool = True, allow_unsigned: bool = False, mask: torch.Tensor | None = None,
             watermark_mode: str = "robust", prompt: dict | None = None, extra_pnginfo: dict | None = None,
             unique_id: str | None = None) -> dict:
        alpha = None if mask is None else 1 - mask.reshape(-1, *mask.shape[-2:]).float()
        sources = [(role, name, path) for role, name in (graph_sources(prompt, unique_id) if c2pa else [])
                   if os.path.isfile(path := input_file(name))]  # an input deleted since the run is left out
        records = save_image_records(images, comfy_output_directory(), filename_prefix, format, quality, watermark,
                                     c2pa, prompt=prompt, extra_pnginfo=extra_pnginfo,
                                     credentials=credentials_directory(),
                                     allow_unsigned=allow_unsigned, metadata_enabled=not metadata_disabled(),
                                     alpha=alpha, sources=sources,
                                     safety=checks_upstream(prompt, unique_id, walk_upstream) or None,
                                     watermark_mode=watermark_mode)
        ui = [{"filename": r.path.name, "subfolder": r.subfolder, "type": "output"} for r in records]
        return {"ui": {"images": ui, "text": [report(r) for r in records]}, "result": (images,)}


class KleinVerify:
    DESCRIPTION = ("Reports an image file's C2PA state (Trusted/Valid/Invalid/None), FLUX watermark bits and "
                   "embedded workflow.")
    CATEGORY = "klein"
    RETURN_TYPES = ("STRING",)
    OUTPUT_TOOLTIPS = ("The report as JSON.",)
    FUNCTION = "verify"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"path": ("STRING", {"default": "", "tooltip": "Image file, absolute or relative to "
                                                                           "ComfyUI's output folder."})}}

    def verify(self, path: str) -> dict:
        full = path if os.path.isabs(path) else os.path.join(comfy_output_directory(), path)
        if not os.path.isfile(full):
            raise KleinError(f"Klein Verify Image: {path!r} is not a file (looked for {full}); give a path relative to "
                             "ComfyUI's output folder, such as 'klein/signed_00001_.png', or an absolute path")
        anchor = os.path.join(credentials_directory(), "root.pem")
        report = verify_image(full, open(anchor, "rb").read() if os.path.exists(anchor) else None)
        text = json.dumps(report, indent=2)
        return {"ui": {"text": [text]}, "result": (text,)}
