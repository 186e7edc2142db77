"""Watermark & save: uint8 -> watermark -> encode with ComfyUI metadata -> C2PA-sign -> atomic write.

Nothing touches a file after it is signed (any later byte change invalidates the manifest).
"""

from __future__ import annotations

import io
import json
import itertools
import logging
import os
import re
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..errors import KleinError
from ..version import __version__
from . import c2pa_sign, metadata, watermark
from .formats import IMAGE_FORMATS, NAMES, SUFFIXES, format_of_path, image_format

if TYPE_CHECKING:  # annotations only: saving takes tensors or arrays and never imports torch
    import torch

log = logging.getLogger("klein_nodes")
WATERMARK_MODES = ("robust", "standard")
MAX_NAME_BYTES = 200  # a file name with the counter and extension stays under the usual 255-byte limit
VERIFY_MAX_PIXELS = 64 * 2**20
BYTES_PER_PIXEL = 80  # peak memory of a save above its input: 77 bytes a pixel measured at 2048², watermarked


@dataclass
class Saved:
    path: Path
    subfolder: str
    watermark_bits: int | None  # matched bits in the written file, None when not watermarked
    signed: bool
    notes: list = field(default_factory=list)


def to_uint8(image, notes):
    """An IMAGE tensor/array (H, W, C) in [0, 1] -> uint8 RGB, as ComfyUI's SaveImage converts (truncating).
    Grey is replicated; an alpha channel is composited on white (noted), as references are."""
    array = image.float().cpu().numpy() if hasattr(image, "cpu") else np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] in (2, 4):
        array = array[..., :-1] * array[..., -1:] + (1 - array[..., -1:])
        notes.append("alpha channel composited on white")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise KleinError(f"images must be (H, W, 1-4 channels); got shape {array.shape}")
    return np.clip(255.0 * array, 0, 255).astype(np.uint8)


def output_folder(directory, prefix):
    """(folder, base name, subfolder) for a prefix like "klein" or "portraits/klein"; no escaping `directory`,
    neither by `..` nor through a symlinked subfolder."""
    if not isinstance(prefix, str) or "\0" in prefix or not prefix.strip():
        raise KleinError(f"filename prefix {prefix!r} is not a usable file name")
    if any(len(part.encode()) > MAX_NAME_BYTES for part in re.split(r"[\\/]", prefix)):
        raise KleinError(f"filename prefix {prefix[:40]!r}... has a name over {MAX_NAME_BYTES} bytes; shorten it")
    directory = os.path.abspath(directory)
    folder = os.path.normpath(os.path.join(directory, os.path.dirname(os.path.normpath(prefix))))
    name = os.path.basename(os.path.normpath(prefix))
    real_directory = os.path.realpath(directory)
    if (os.path.commonpath((directory, folder)) != directory or not name or name in (".", "..")
            or os.path.commonpath((real_directory, os.path.realpath(folder))) != real_directory):
        raise KleinError(f"filename prefix {prefix!r} points outside the output folder {directory}")
    return folder, name, os.path.relpath(folder, directory) if folder != directory else ""


def check_images(images, fmt):
    """Sizes every step can handle, in the memory there is, before any image is processed."""
    import psutil

    for image in images:
        shape = tuple(image.shape)
        if len(shape) not in (2, 3) or 0 in shape[:2] or (len(shape) == 3 and not 1 <= shape[2] <= 4):
            raise KleinError(f"cannot save an image of shape {shape}: it needs a height, a width and 1-4 channels")
        height, width = shape[:2]
        if max(height, width) > IMAGE_FORMATS[fmt].max_side:
            raise KleinError(f"a {width}x{height} image cannot be saved as {fmt} (at most "
                             f"{IMAGE_FORMATS[fmt].max_side} pixels a side); choose png")
        needed, available = height * width * BYTES_PER_PIXEL, psutil.virtual_memory().available
        if needed > available:
            raise KleinError(f"saving a {width}x{height} image needs about {needed / 2**30:.1f} GB of memory and "
                             f"{available / 2**30:.1f} GB is available")


def check_quality(quality):
    if isinstance(quality, bool) or not isinstance(quality, (int, float)) or not 1 <= quality <= 100:
        raise KleinError(f"quality must be a number from 1 to 100, got {quality!r}")


def next_counter(folder, name):
    """One past the largest counter of `<name>_<digits>_...` files in `folder`, whatever their extension."""
    pattern = re.compile(rf"^{re.escape(name)}_(\d+)_")
    counters = [int(m.group(1)) for f in (os.listdir(folder) if os.path.isdir(folder) else [])
                if (m := pattern.match(f))]
    return max(counters, default=0) + 1


def write_exclusive(folder, data, candidates):
    """Write `data` to the first free path of `candidates` ((key, path) pairs) without ever replacing a file: a
    temporary file, then a hard link (atomic, fails if the name exists). Returns (key, path), or None if none is
    free."""
    try:
        os.makedirs(folder, exist_ok=True)
        temp = Path(folder) / f".klein-{uuid.uuid4().hex}.tmp"  # unique; created with the usual (umask) permissions
        temp.write_bytes(data)
    except OSError as e:
        raise KleinError(f"cannot write to {folder}: {e.strerror or e}") from None
    try:
        for key, path in candidates:
            try:
                os.link(temp, path)
                return key, path
            except FileExistsError:
                continue
        return None
    finally:
        temp.unlink(missing_ok=True)


def write_new(folder, name, counter, extension, data):
    """Write `data` as `<name>_<counter:05>_.<ext>`, taking the next counter while the name is in use."""
    candidates = ((n, Path(folder) / f"{name}_{n:05}_.{extension}") for n in itertools.count(counter))
    counter, target = write_exclusive(folder, data, candidates)
    return target, counter


def to_alpha(opacity, fmt, rgb, notes):
    """Opacity (H, W) in [0, 1] -> (uint8 alpha plane or None, rgb): PNG and WebP keep it; JPEG, which has no
    transparency, gets the image composited on white, with a note."""
    if opacity is None:
        return None, rgb
    array = opacity.float().cpu().numpy() if hasattr(opacity, "cpu") else np.asarray(opacity, dtype=np.float32)
    if array.shape != rgb.shape[:2] or not np.isfinite(array).all():
        raise KleinError(f"the opacity must be an (H, W) = {rgb.shape[:2]} array of finite values in 0..1, not "
                         f"{array.shape}")
    array = np.clip(array, 0, 1)
    if fmt == "jpeg":
        notes.append("JPEG has no transparency: the image was composited on white (save PNG or WebP to keep it)")
        return None, (rgb * array[..., None] + 255 * (1 - array[..., None])).astype(np.uint8)
    return (255.0 * array).astype(np.uint8), rgb


def decoded(data):
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def watermark_to_embed(watermark, mode):
    """The mode of the watermark to embed ("robust" or "standard"), or None for none; bad arguments refused."""
    if not isinstance(watermark, (bool, np.bool_)):
        raise KleinError(f"watermark={watermark!r}: use True or False (the kind goes in watermark_mode)")
    if mode not in WATERMARK_MODES:
        raise KleinError(f"watermark_mode={mode!r}: use 'robust' (survives JPEG/WebP) or 'standard' (BFL's "
                         "embedding, byte-identical to imwatermark)")
    return mode if watermark else None


def prepare(image, fmt, quality, mark_mode, items, opacity=None):
    """Watermarked (when asked and large enough) and encoded bytes, the matched bits read back, and notes. The
    watermark goes into the colour; an opacity plane is added to it afterwards."""
    notes = []
    alpha, rgb = to_alpha(opacity, fmt, to_uint8(image, notes), notes)
    marked = False
    if mark_mode:
        if rgb.shape[0] * rgb.shape[1] < watermark.MIN_PIXELS:
            notes.append(f"watermark skipped: {rgb.shape[1]}x{rgb.shape[0]} is below the 256x256 minimum")
        elif mark_mode == "standard":
            rgb, marked = watermark.embed(rgb), True
        else:  # robust, compensated also for this very save when it is lossy
            this_save = [] if fmt == "png" else [lambda x: decoded(metadata.encode(x, fmt, quality, alpha=alpha))]
            rgb, marked = watermark.embed_robust(rgb, codecs=this_save), True
    with warnings.catch_warnings(record=True) as dropped:  # metadata over a format's limit: reported per image
        warnings.simplefilter("always")
        data = metadata.encode(rgb, fmt, quality, items, alpha=alpha)
    notes += [str(warning.message) for warning in dropped]
    bits = None
    if marked:  # self-check on what is actually written: lossy formats and dark content can erase the mark
        bits = watermark.matched_bits(decoded(data))
        if bits < watermark.DETECTED_AT:
            notes.append(f"watermark embedded but only {bits}/{len(watermark.FLUX_BITS)} bits read back "
                         f"({'lossy ' + fmt if fmt != 'png' else 'dark or flat content'}); it will not be detected")
    return data, bits, notes


def save_images(images: torch.Tensor, directory: str | Path, prefix: str = "klein", format: str = "png",
                quality: int = 80, watermark: bool = True, c2pa: bool = True, prompt: dict | None = None,
                workflow: dict | None = None, credentials: str | Path | None = None, allow_unsigned: bool = False,
                metadata_enabled: bool = True, extra_pnginfo: dict | None = None, alpha: torch.Tensor | None = None,
                sources: list | None = None, safety: list | None = None,
                watermark_mode: str = "robust") -> list[Path]:
    """Save (B, H, W, 3) images in [0, 1]; returns the written paths. See `save_image_records` for details."""
    return [record.path for record in save_image_records(
        images, directory, prefix, format, quality, watermark, c2pa, prompt, workflow, credentials, allow_unsigned,
        metadata_enabled, extra_pnginfo, alpha, sources, safety, watermark_mode)]


def save_image_records(images: torch.Tensor, directory: str | Path, prefix: str = "klein", format: str = "png",
                       quality: int = 80, watermark: bool = True, c2pa: bool = True, prompt: dict | None = None,
                       workflow: dict | None = None, credentials: str | Path | None = None,
                       allow_unsigned: bool = False, metadata_enabled: bool = True, extra_pnginfo: dict | None = None,
                       alpha: torch.Tensor | None = None, sources: list | None = None, safety: list | None = None,
                       watermark_mode: str = "robust") -> list[Saved]:
    """Save images as `<prefix>_<counter:05>_.<ext>`: optional FLUX watermark (self-checked; `watermark_mode`
    "robust": survives JPEG/WebP saves, "standard": BFL's embedding, byte-identical to imwatermark), ComfyUI metadata
    (prompt/workflow; none when `metadata_enabled` is False, as with --disable-metadata), a signed C2PA manifest.
    `alpha`: opacity (B or 1, H, W) in [0, 1] for RGBA PNG/WebP (JPEG: composited on white, noted).
    `sources`: the images that shaped the result, recorded in the manifest as ingredients (see `source_records`).
    `safety`: the safety checks that ran ([{...}], scores and thresholds, never the prompt), as `klein_safety`.
    If signing is impossible and `allow_unsigned` is False, nothing is written and KleinError is raised."""
    if image_format(format) is None:
        raise KleinError(f"format {format!r} is not supported; choose {NAMES}")
    fmt = image_format(format).name
    check_quality(quality)
    mark_mode = watermark_to_embed(watermark, watermark_mode)
    check_images(images, fmt)
    extra = dict(extra_pnginfo or {})
    if workflow is not None:
        extra["workflow"] = workflow
    if safety:
        extra["klein_safety"] = safety
    items = metadata.metadata_items(prompt, extra) if metadata_enabled else []
    folder, name, subfolder = output_folder(directory, prefix)
    signer = signing_credentials(c2pa, credentials, allow_unsigned)
    ingredients = source_records(sources) if signer is not None else []
    if alpha is not None and len(alpha) not in (1, len(images)):
        raise KleinError(f"{len(alpha)} opacity masks for {len(images)} images: give one, or one per image")
    prepared = [prepare(image, fmt, quality, mark_mode, items, None if alpha is None else alpha[min(i, len(alpha) - 1)])
                for i, image in enumerate(images)]
    records, counter = [], next_counter(folder, name)
    for data, bits, notes in prepared:
        data, signed = sign_or_note(data, fmt, f"{name}_{counter:05}_.{IMAGE_FORMATS[fmt].extension}", signer,
                                    allow_unsigned, notes, ingredients)
        path, counter = write_new(folder, name, counter, IMAGE_FORMATS[fmt].extension, data)
        counter += 1
        for note in notes:
            log.warning("klein save: %s: %s", path.name, note)
        records.append(Saved(path, subfolder, bits, signed, notes))
    return records


def source_records(sources):
    """[{"role", "title", "png"}] for the C2PA ingredients: `sources` is [(role, title, image)], role "edited"
    (the image img2img / inpainting changed) or "reference", image a tensor (H, W, 3) or (1, H, W, 3) in 0..1, a PIL
    image or a file path; each is recorded as the PNG of its pixels."""
    records = []
    for role, title, image in sources or ():
        if role not in ("edited", "reference"):
            raise KleinError(f"source role {role!r}: use 'edited' or 'reference'")
        if isinstance(image, (str, os.PathLike)):
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        if isinstance(image, Image.Image):
            rgb = np.asarray(image.convert("RGB"))
        else:
            if len(image.shape) == 4 and image.shape[0] != 1:
                raise KleinError(f"source {title!r} is a batch of {image.shape[0]} images; give one per source")
            rgb = to_uint8(image[0] if len(image.shape) == 4 else image, [])
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, "PNG")
        records.append({"role": role, "title": str(title), "png": buffer.getvalue()})
    return records


def sign_or_note(data, fmt, title, signer, allow_unsigned, notes, sources=()):
    """(bytes, signed): C2PA-signed bytes, or the unsigned bytes with a note when that is allowed."""
    if signer is None:
        return data, False
    try:
        return c2pa_sign.sign(data, IMAGE_FORMATS[fmt].mime, title, signer, __version__, sources), True
    except Exception as e:  # c2pa raises its own error types; the message is what the user needs
        if not allow_unsigned:
            raise KleinError(f"C2PA signing failed ({e}); nothing was written for this image. Allow unsigned "
                             "saving to write it without Content Credentials.") from None
        notes.append(f"saved unsigned: C2PA signing failed ({e})")
        return data, False


def save_file(image: torch.Tensor, path: str | Path, quality: int = 90, watermark: bool = True, c2pa: bool = True,
              prompt: dict | None = None, credentials: str | Path | None = None, allow_unsigned: bool = False,
              safety: list | None = None, sources: list | None = None, watermark_mode: str = "robust") -> Saved:
    """One image to exactly `path` (format from the extension), same steps as `save_image_records` (`sources`: the
    C2PA ingredients); an existing file is never replaced. Returns the Saved record."""
    path = Path(path)
    if format_of_path(path) is None:
        raise KleinError(f"{path}: the output must end in {SUFFIXES}")
    fmt = format_of_path(path).name
    check_quality(quality)
    mark_mode = watermark_to_embed(watermark, watermark_mode)
    check_images([image], fmt)
    signer = signing_credentials(c2pa, credentials, allow_unsigned)
    data, bits, notes = prepare(image, fmt, quality, mark_mode,
                                metadata.metadata_items(prompt, {"klein_safety": safety} if safety else {}))
    data, signed = sign_or_note(data, fmt, path.name, signer, allow_unsigned, notes,
                                source_records(sources) if signer is not None else [])
    if write_exclusive(path.parent, data, [(None, path)]) is None:
        raise KleinError(f"{path} already exists; choose another output name")
    return Saved(path, "", bits, signed, notes)


def signing_credentials(enabled, credentials, allow_unsigned):
    if not enabled:
        return None
    try:
        import c2pa  # noqa: F401
        return c2pa_sign.load_credentials(credentials)
    except (ImportError, OSError, KleinError, ValueError) as e:
        if allow_unsigned:
            log.warning("klein save: saving without C2PA (%s)", e)
            return None
        raise KleinError(f"C2PA signing is not available ({e}). Install c2pa-python, fix the credentials, or allow "
                         "unsigned saving.") from None


def verify_image(path: str | Path, trust_anchor: str | bytes | None = None) -> dict:
    """{"c2pa": Trusted/Valid/Invalid/None, "c2pa_codes": [...], "watermark_bits": n of 46 (or None when too small),
    "watermark_detected": bool, "workflow": bool, "prompt": bool, "safety": the recorded checks or None}. The pack's
    local root is the default trust anchor."""
    if not Path(path).is_file():
        raise KleinError(f"{path}: no such file")
    if trust_anchor is not None and b"-----BEGIN CERTIFICATE-----" not in (
            trust_anchor.encode() if isinstance(trust_anchor, str) else bytes(trust_anchor)):
        raise KleinError("the trust anchor is not a PEM certificate (-----BEGIN CERTIFICATE-----)")
    if trust_anchor is None:
        root = c2pa_sign.default_credentials_dir() / "root.pem"
        trust_anchor = root.read_bytes() if root.exists() else None
    try:
        report = c2pa_sign.verify(path, trust_anchor)
    except ImportError:
        report = {"state": "unknown (c2pa-python is not installed)", "codes": []}
    bits, items = None, {}
    try:
        with Image.open(path) as image:
            width, height = image.size  # from the header: a decompression bomb is refused before decoding
            if width * height > VERIFY_MAX_PIXELS:
                report["codes"] = report["codes"] + [f"watermark not read: {width}x{height} is over the "
                                                     f"{VERIFY_MAX_PIXELS // 2**20} MP verification limit"]
            else:
                rgb = np.asarray(image.convert("RGB"))
                bits = watermark.matched_bits(rgb) if rgb.shape[0] * rgb.shape[1] >= watermark.MIN_PIXELS else None
        items = metadata.read_items(path)
    except Exception as e:  # noqa: BLE001 (Pillow's decoders raise many types for damaged pixels or EXIF)
        report["codes"] = report["codes"] + [f"image not decoded: {type(e).__name__}: {e}"]
    manifest = report.get("manifest") or {}
    actions = [a.get("action") for assertion in manifest.get("assertions", [])
               if assertion.get("label", "").startswith("c2pa.actions") for a in assertion["data"].get("actions", [])]
    ingredients = [{key: i.get(key) for key in ("title", "relationship", "instance_id")}
                   for i in manifest.get("ingredients", [])]
    return {"c2pa": report["state"], "c2pa_codes": report["codes"], "c2pa_actions": actions,
            "c2pa_ingredients": ingredients, "watermark_bits": bits,
            "watermark_total": len(watermark.FLUX_BITS),
            "watermark_detected": bits is not None and bits >= watermark.DETECTED_AT,
            "workflow": "workflow" in items, "prompt": "prompt" in items, "safety": safety_record(items)}


def safety_record(items):
    """The safety checks a save recorded (`klein_safety`), or None."""
    try:
        return json.loads(items["klein_safety"]) if "klein_safety" in items else None
    except ValueError:
        return "unreadable"
