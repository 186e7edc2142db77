"""Encode an image with ComfyUI's workflow metadata: PNG tEXt chunks, or EXIF IFD0 for WebP and JPEG.

PNG: tEXt `prompt` and one chunk per extra_pnginfo key (`workflow`). WebP/JPEG: ComfyUI's EXIF convention,
0x0110 Model = "prompt:<json>", 0x010F Make = "workflow:<json>" (then 0x010E ... for further keys).
"""

import io
import json
import warnings

import numpy as np
from PIL import Image, PngImagePlugin

from ..errors import KleinError
from .formats import IMAGE_FORMATS, NAMES


def json_text(value, argument):
    """`value` as strict JSON (what ComfyUI's frontend parses back), or one KleinError naming `argument`."""
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:  # an unknown type, NaN/inf, a cycle, a too deep nesting
        reason = "it nests too deeply" if isinstance(e, RecursionError) else str(e)
        raise KleinError(f"{argument} cannot be saved as JSON metadata ({reason}); give dicts, lists, strings, "
                         "finite numbers, True, False and None only") from None


def metadata_items(prompt, extra_pnginfo, arguments=None):
    """[(key, JSON text)]: the prompt, then one item per extra_pnginfo key. A mistake is refused naming the argument
    the item came from (`arguments`: {key: name}, default `extra_pnginfo[key]`)."""
    items = [] if prompt is None else [("prompt", json_text(prompt, "prompt"))]
    for key, value in (extra_pnginfo or {}).items():
        argument = (arguments or {}).get(key, f"extra_pnginfo[{key!r}]")
        if (not isinstance(key, str) or not 1 <= len(key) <= 79 or key == "prompt"  # the prompt's own key
                or any(ord(c) > 255 or not c.isprintable() for c in key)):  # a PNG tEXt keyword is Latin-1
            raise KleinError(f"{argument}: the key must be a str of 1-79 Latin-1 characters without control "
                             "characters, other than 'prompt'")
        items.append((key, json_text(value, argument)))
    return items


def exif_for(items):
    """A fresh EXIF block for the items (never the image's own cached one, which would keep dropped items)."""
    exif = Image.Exif()
    tag = 0x010F
    for key, text in items:
        if key == "prompt":
            exif[0x0110] = f"prompt:{text}"
        else:
            exif[tag] = f"{key}:{text}"
            tag -= 1
    return exif


def encode(rgb, fmt, quality=80, items=(), lossless_webp=False, jpeg_full_chroma=True, alpha=None):
    """uint8 RGB array (and optional uint8 alpha plane, PNG/WebP) -> encoded bytes with the metadata items embedded
    (the file is signed after this)."""
    quality = int(quality)  # Pillow's JPEG encoder takes a Python int only (not 80.0, not numpy's int64)
    image = Image.fromarray(rgb) if alpha is None else Image.fromarray(np.dstack((rgb, alpha)), "RGBA")
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        for key, text in items:
            info.add_text(key, text)
        image.save(buffer, "PNG", pnginfo=info, compress_level=4)
    elif fmt == "webp":
        # exact: colour under fully transparent pixels is kept, so the watermark in it survives
        image.save(buffer, "WEBP", quality=quality, lossless=lossless_webp, method=4, exif=exif_for(items), exact=True)
    elif fmt == "jpeg":
        items = list(items)
        while items and len(exif_for(items).tobytes()) > IMAGE_FORMATS["jpeg"].metadata_limit:
            dropped = max(items, key=lambda item: len(item[1]))  # the largest first: usually the UI workflow, so the
            items.remove(dropped)                                 # smaller prompt (which ComfyUI also loads) stays
            warnings.warn(f"JPEG EXIF is limited to 64 KB: the {dropped[0]} ({len(dropped[1]) // 1024} KB) was not "
                          "embedded (save PNG or WebP to keep it)", stacklevel=3)
        image.save(buffer, "JPEG", quality=quality, subsampling=0 if jpeg_full_chroma else 2, exif=exif_for(items))
    else:
        raise ValueError(f"unknown format {fmt!r}; choose {NAMES}")
    return buffer.getvalue()


def read_items(path):
    """{key: JSON string} of the items `encode` embedded (prompt, workflow, klein_safety ...)."""
    with Image.open(path) as image:
        if image.format == "PNG":
            return {k: v for k, v in image.info.items() if isinstance(v, str)}
        found = {}
        for value in image.getexif().values():
            if isinstance(value, str) and ":" in value:
                key, text = value.split(":", 1)
                found.setdefault(key.lower(), text)
        return found


def read_workflow(path):
    """(prompt, workflow) JSON strings embedded by `encode`, or None where absent."""
    items = read_items(path)
    return items.get("prompt"), items.get("workflow")
