"""The image formats the pack writes and reads: one row each, every fact about a format in one place."""

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ImageFormat:
    name: str  # as `format=` takes it (and ComfyUI's Save node lists it)
    extension: str  # written
    suffixes: tuple  # read and accepted for an output path
    mime: str  # for C2PA
    pil: str  # PIL's format name
    max_side: int  # the format's own limit, pixels per side
    alpha: bool  # keeps an opacity plane (JPEG: composited on white)
    lossy: bool  # the watermark is compensated for this save, and may still be weakened
    metadata: str  # where ComfyUI's prompt/workflow go
    metadata_limit: int | None = None  # bytes, beyond which items are dropped (noted)


IMAGE_FORMATS = {
    "png": ImageFormat("png", "png", (".png",), "image/png", "PNG", 2**31 - 1, True, False, "tEXt chunks"),
    "jpeg": ImageFormat("jpeg", "jpg", (".jpg", ".jpeg"), "image/jpeg", "JPEG", 65500, False, True,
                        "EXIF in one APP1 segment", 65533),
    "webp": ImageFormat("webp", "webp", (".webp",), "image/webp", "WEBP", 16383, True, True, "EXIF"),
}
ALIASES = {"jpg": "jpeg"}


def in_words(items):
    """"a, b or c"."""
    items = list(items)
    return ", ".join(items[:-1]) + " or " + items[-1] if len(items) > 1 else "".join(items)


NAMES = in_words(IMAGE_FORMATS)  # "png, jpeg or webp"
SUFFIXES = in_words(f.suffixes[0] for f in IMAGE_FORMATS.values())  # ".png, .jpg or .webp"


def image_format(name):
    """The ImageFormat called `name` (any case, "jpg" too), or None."""
    name = str(name).lower()
    return IMAGE_FORMATS.get(ALIASES.get(name, name))


def format_of_path(path):
    """The ImageFormat a file name's suffix says, or None."""
    suffix = Path(path).suffix.lower()
    return next((f for f in IMAGE_FORMATS.values() if suffix in f.suffixes), None)
