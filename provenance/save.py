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
import sys
import unicodedata
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
    array = image.detach().float().cpu().numpy() if hasattr(image, "cpu") else np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] in (2, 4):
        array = np.nan_to_num(array, posinf=1.0, neginf=0.0)  # inf * 0 would be NaN; finite values are unchanged
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
    prefix = os.fspath(prefix) if isinstance(prefix, os.PathLike) else prefix
    if not isinstance(prefix, str):
        raise KleinError(f"filename prefix {prefix!r} is not a usable file name: give a str such as 'klein' or "
                         f"'portraits/klein', not {type(prefix).__name__}")
    bad = next((c for c in prefix if unicodedata.category(c) in ("Cc", "Cs")), None)  # controls, lone surrogates
    if bad is not None or not prefix.strip():
        raise KleinError(f"filename prefix {prefix!r} is not a usable file name" + (
            "" if bad is None else f": it holds the character U+{ord(bad):04X}; remove it"))
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
    if isinstance(quality, (bool, np.bool_)) or not isinstance(quality, (int, float, np.integer, np.floating)) or (
            not 1 <= quality <= 100):
        raise KleinError(f"quality must be a number from 1 to 100, got {quality!r}")
    if quality != int(quality):
        raise KleinError(f"quality must be a number from 1 to 100, got {quality!r}: use a whole number")


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
    temp = None
    try:
        try:
            os.makedirs(folder, exist_ok=True)
            temp = Path(folder) / f".klein-{uuid.uuid4().hex}.tmp"  # unique; made with the usual (umask) permissions
            temp.write_bytes(data)  # a part written before a failure (disk full) is removed below
        except OSError as e:
            raise KleinError(f"cannot write to {folder}: {e.strerror or e}") from None
        for key, path in candidates:
            try:
                os.link(temp, path)
                return key, path
            except FileExistsError:
                continue
            except OSError as e:  # a file system without hard links, a name it refuses
                raise KleinError(f"cannot write {path}: {e.strerror or e}") from None
        return None
    finally:
        if temp is not None:
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
    array = (opacity.detach().float().cpu().numpy() if hasattr(opacity, "cpu")
             else np.asarray(opacity, dtype=np.float32))
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
    if not isinstance(mode, str) or mode not in WATERMARK_MODES:
        raise KleinError(f"watermark_mode={mode!r}: use 'robust' (survives JPEG/WebP) or 'standard' (BFL's "
                         "embedding, byte-identical to imwatermark)")
    return mode if watermark else None


def prepare(image, fmt, quality, mark_mode, items, opacity=None):
    """Watermarked (when asked and large enough) and encoded bytes, the matched bits read back, and notes. The
    watermark goes into the colour; an opacity plane is added to it afterwards."""
    notes = []
    alpha, rgb = to_alpha(opacity, fmt, to_uint8(image, notes), notes)
    marked, limit = False, None
    if mark_mode:
        if rgb.shape[0] * rgb.shape[1] < watermark.MIN_PIXELS:
            notes.append(f"watermark skipped: {rgb.shape[1]}x{rgb.shape[0]} is below the 256x256 minimum")
        elif mark_mode == "standard":
            rgb, marked = watermark.embed(rgb), True
        else:  # robust, compensated also for this very save when it is lossy
            this_save = [] if fmt == "png" else [lambda x: decoded(metadata.encode(x, fmt, quality, alpha=alpha))]
            mark = watermark.robust_mark(rgb, codecs=this_save)
            rgb, marked, limit = mark.image, True, mark.limit
    with warnings.catch_warnings(record=True) as dropped:  # metadata over a format's limit: reported per image
        warnings.simplefilter("always")
        data = metadata.encode(rgb, fmt, quality, items, alpha=alpha)
    notes += [str(warning.message) for warning in dropped]
    bits = None
    if marked:  # self-check on what is actually written: lossy formats and dark content can erase the mark
        bits = watermark.matched_bits(decoded(data))
        if bits < watermark.DETECTED_AT:
            why = ("lossy " + fmt if fmt != "png" else "dark or flat content") + (f": {limit}" if limit else "")
            notes.append(f"watermark embedded but only {bits}/{len(watermark.FLUX_BITS)} bits read back ({why}); it "
                         "will not be detected")
    return data, bits, notes


def check_arguments(**given):
    """The one validation step at the top of each public function: every argument given is checked (type, value,
    the files it names) before a pixel is converted, a file read or written or credentials made, and each mistake
    is one KleinError naming the argument and the fix. `new_path` is save_file's `path` (a file still to be made),
    `path` verify_image's (an existing file). Returns the metadata items: serialising them is their check."""
    for name in ("c2pa", "allow_unsigned", "metadata_enabled"):
        if name in given and not isinstance(given[name], (bool, np.bool_)):
            raise KleinError(f"{name}={given[name]!r}: use True or False")
    if "watermark" in given:
        watermark_to_embed(given["watermark"], given["watermark_mode"])
    if "quality" in given:
        check_quality(given["quality"])
    if "format" in given and (not isinstance(given["format"], str) or image_format(given["format"]) is None):
        raise KleinError(f"format {given['format']!r} is not supported; choose {NAMES}")
    if "directory" in given:
        check_writable(output_folder(usable_path(given["directory"], "directory"), given["prefix"])[0], "directory")
    if "new_path" in given:
        path = usable_path(given["new_path"], "path")
        if format_of_path(path) is None:
            raise KleinError(f"{path}: the output must end in {SUFFIXES}")
        if os.path.lexists(path):
            raise KleinError(f"{path} already exists; choose another output name")
        check_writable(os.path.dirname(os.path.abspath(path)), "path")
    if "path" in given:
        existing_file(given["path"], "path")
    anchor = given.get("trust_anchor")
    if anchor is not None:
        try:  # c2pa takes the PEM as UTF-8 text
            text = anchor.decode() if isinstance(anchor, bytes) else anchor.encode().decode()
        except (AttributeError, UnicodeError):  # neither str nor bytes, or not UTF-8
            text = ""
        if "-----BEGIN CERTIFICATE-----" not in text:
            raise KleinError("the trust anchor is not a PEM certificate (-----BEGIN CERTIFICATE-----): give the text "
                             "of root.pem as str or bytes")
    if "credentials" in given:
        check_credentials(given["credentials"])
    check_sources(given.get("sources"))
    if given.get("safety") is not None and not isinstance(given["safety"], (list, tuple)):
        raise KleinError(f"safety must be a list of the checks that ran (dicts), not {type(given['safety']).__name__}")
    if given.get("extra_pnginfo") is not None and not isinstance(given["extra_pnginfo"], dict):
        raise KleinError(f"extra_pnginfo must be a dict of JSON values, not {type(given['extra_pnginfo']).__name__}")
    extra, arguments = dict(given.get("extra_pnginfo") or {}), {}
    if given.get("workflow") is not None:
        extra["workflow"], arguments["workflow"] = given["workflow"], "workflow"
    if given.get("safety"):
        extra["klein_safety"], arguments["klein_safety"] = given["safety"], "safety"
    items = metadata.metadata_items(given.get("prompt"), extra, arguments)
    fmt = image_format(given["format"]) if "format" in given else format_of_path(given.get("new_path", ""))
    pixels = [(name, given[name]) for name in ("images", "image") if name in given]
    for name, images in pixels:
        check_pixels(images, name, (3, 4) if name == "images" else (2, 3),
                     "(B, H, W, C)" if name == "images" else "(H, W, C)")
        check_images(images if name == "images" else [images], fmt.name)
    if given.get("alpha") is not None:
        alpha, images = given["alpha"], given["images"]
        check_pixels(alpha, "alpha", (3,), "(B or 1, H, W)", kinds="fiub")
        if len(alpha) not in (1, len(images)):
            raise KleinError(f"alpha holds {len(alpha)} opacity masks for {len(images)} images: give one, or one per "
                             "image")
        if tuple(alpha.shape[1:]) != tuple(images.shape[1:3]):
            raise KleinError(f"alpha: the opacity must be an (H, W) = {tuple(images.shape[1:3])} array per image, of "
                             f"finite values in 0..1; got shape {tuple(alpha.shape)}")
        pixels.append(("alpha", alpha))
    for name, values in pixels:  # last: the one pass over every pixel
        if not valid_values(values, finite=name == "alpha"):
            raise KleinError(f"{name} holds NaN or infinite values; give finite opacities in 0..1" if name == "alpha"
                             else f"{name} holds NaN values, which have no colour: nothing was saved. NaN usually "
                             "comes from an overflow in the sampler or VAE (try bf16 or fp32); values outside 0..1, "
                             "inf included, are clipped as ComfyUI's Save Image does")
    return items if given.get("metadata_enabled", True) else []


def usable_path(value, name):
    """`value` (a str or os.PathLike) as a str the file system takes; a KleinError naming `name` otherwise."""
    path = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(path, str) or not path:
        raise KleinError(f"{name}={value!r}: give a path as a non-empty str or pathlib.Path")
    try:
        os.fsencode(path)  # a lone surrogate (other than one standing for an undecodable byte) names no file
    except UnicodeError:
        path = None
    if path is None or "\0" in path:
        raise KleinError(f"{name}={value!r} is not a usable path: it holds a NUL byte or a lone surrogate")
    return path


def existing_file(value, name):
    """`value` as the str path of an existing regular file this process may read (never a FIFO: opening one
    would block)."""
    path = usable_path(value, name)
    if not os.path.exists(path):
        raise KleinError(f"{name}: {path}: no such file")
    if not os.path.isfile(path):
        raise KleinError(f"{name}: {path} is a " + ("folder" if os.path.isdir(path) else "FIFO, socket or device")
                         + ", not an image file")
    if not os.access(path, os.R_OK):
        raise KleinError(f"{name}: {path} cannot be read (permission denied)")
    return path


def check_writable(folder, argument):
    """The nearest existing folder at or above `folder`, where it or the file will be made, is a folder this
    process may write to."""
    existing = os.path.abspath(folder)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise KleinError(f"cannot write to {folder} ({argument}): {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise KleinError(f"cannot write to {folder} ({argument}): permission denied on {existing}")


def check_credentials(credentials):
    """None (the pack's local credentials), a folder, or {"chain": path, "key": path, "root": path, "alg": str,
    "tsa_url": str}; whether the files can be read is found when they are loaded (allow_unsigned decides then)."""
    if not isinstance(credentials, dict):
        if credentials is not None:
            usable_path(credentials, "credentials")
        return
    for key, value in credentials.items():
        if key in ("chain", "key") or (key == "root" and value):
            usable_path(value, f"credentials[{key!r}]")
        elif key not in ("root", "alg", "tsa_url") or (key != "root" and not isinstance(value, str)
                                                       and (key, value) != ("tsa_url", None)):
            raise KleinError(f"credentials[{key!r}]={value!r}: use the keys 'chain', 'key' and 'root' (paths), 'alg' "
                             "and 'tsa_url' (str)")


def check_sources(sources):
    """[(role, title, image)] as `source_records` takes them, checked without decoding an image."""
    if sources is None:
        return
    if not isinstance(sources, (list, tuple)):
        raise KleinError(f"sources must be a list of (role, title, image) tuples, not {type(sources).__name__}")
    for source in sources:
        if not isinstance(source, (list, tuple)) or len(source) != 3:
            raise KleinError(f"sources: {repr(source)[:60]} is not a (role, title, image) tuple")
        role, title, image = source
        if not isinstance(role, str) or role not in ("edited", "reference"):
            raise KleinError(f"source role {role!r}: use 'edited' or 'reference'")
        if not isinstance(title, str):
            raise KleinError(f"source title {title!r}: give the source image's name as a str")
        name = f"source {title!r}"
        if isinstance(image, (str, os.PathLike)):
            path = existing_file(image, name)
            try:
                Image.open(path).close()  # the header only
            except Exception as e:  # noqa: BLE001 (Pillow raises many types for what is not an image)
                raise KleinError(f"{name}: {path} is not an image Pillow can read ({e})") from None
        elif not isinstance(image, Image.Image):
            check_pixels(image, name, (3, 4), "(H, W, C) or (1, H, W, C)")
            if image.ndim == 4 and image.shape[0] != 1:
                raise KleinError(f"source {title!r} is a batch of {image.shape[0]} images; give one per source")
            check_images([image[0] if image.ndim == 4 else image], "png")
            if not valid_values(image):
                raise KleinError(f"{name} holds NaN values; give an image in 0..1")


def is_tensor(value):
    torch = sys.modules.get("torch")  # saving never imports torch: a tensor means torch is loaded
    return torch is not None and isinstance(value, torch.Tensor)


def check_pixels(value, name, dims, shape, kinds="fiu"):
    """`value`: a torch tensor or numpy array of real numbers (`kinds`: numpy's dtype kinds) with `dims` dimensions,
    whose data can be read: a meta-device, sparse or quantized tensor is refused."""
    if is_tensor(value):
        import torch

        special = "meta-device" if value.is_meta else "quantized" if value.is_quantized else (
            "sparse" if value.layout != torch.strided else None)
        if special:
            raise KleinError(f"{name} is a {special} tensor, which holds no plain pixels; give an ordinary tensor "
                             "(on the CPU or a GPU)")
        kind = ("b" if value.dtype == torch.bool else "c" if value.is_complex() else
                "f" if value.is_floating_point() else "i")
    elif isinstance(value, np.ndarray):
        kind = value.dtype.kind
    else:
        raise KleinError(f"{name} must be a torch tensor or numpy array of shape {shape} with values in 0..1, not "
                         f"{type(value).__name__}")
    if kind not in kinds:
        raise KleinError(f"{name} has dtype {value.dtype}; give real numbers: floats in 0..1")
    if value.ndim not in dims:
        raise KleinError(f"{name} must have the shape {shape}, not {tuple(value.shape)}")


def valid_values(value, finite=False):
    """No NaN in a tensor or array that `check_pixels` passed (no inf either when `finite`)."""
    if is_tensor(value):
        if not value.is_floating_point():
            return True
        return bool(value.isfinite().all()) if finite else not bool(value.isnan().any())
    if value.dtype.kind != "f":
        return True
    return bool(np.isfinite(value).all()) if finite else not bool(np.isnan(value).any())


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
    items = check_arguments(images=images, directory=directory, prefix=prefix, format=format, quality=quality,
                            watermark=watermark, watermark_mode=watermark_mode, c2pa=c2pa, prompt=prompt,
                            workflow=workflow, credentials=credentials, allow_unsigned=allow_unsigned,
                            metadata_enabled=metadata_enabled, extra_pnginfo=extra_pnginfo, alpha=alpha,
                            sources=sources, safety=safety)
    fmt = image_format(format).name
    mark_mode = watermark_to_embed(watermark, watermark_mode)
    folder, name, subfolder = output_folder(directory, prefix)
    signer = signing_credentials(c2pa, credentials, allow_unsigned)
    ingredients = source_records(sources) if signer is not None else []
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
    for role, title, image in sources or ():  # checked by check_sources
        if isinstance(image, (str, os.PathLike)):
            try:
                with Image.open(image) as opened:
                    image = opened.convert("RGB")
            except Exception as e:  # noqa: BLE001 (a damaged file: Pillow's decoders raise many types)
                raise KleinError(f"source {title!r}: {image} cannot be decoded ({e}); nothing was written") from None
        if isinstance(image, Image.Image):
            rgb = np.asarray(image.convert("RGB"))
        else:
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
    items = check_arguments(image=image, new_path=path, quality=quality, watermark=watermark,
                            watermark_mode=watermark_mode, c2pa=c2pa, prompt=prompt, credentials=credentials,
                            allow_unsigned=allow_unsigned, safety=safety, sources=sources)
    path = Path(path)
    fmt = format_of_path(path).name
    mark_mode = watermark_to_embed(watermark, watermark_mode)
    signer = signing_credentials(c2pa, credentials, allow_unsigned)
    data, bits, notes = prepare(image, fmt, quality, mark_mode, items)
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
    check_arguments(path=path, trust_anchor=trust_anchor)
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
