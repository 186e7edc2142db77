"""Reference images -> VAE-ready tensors: any common input, area cap, crop to multiples of 16, all reported.

Accepted: ComfyUI IMAGE tensors (B, H, W, C) in [0, 1] (C = 1, 3 or 4), (C, H, W) / (H, W) tensors, and PIL
images in any mode (RGB, RGBA, LA, L, P, 16-bit I;16 / I, F, CMYK). Transparency is composited on white (a
transparent background reads as white paper, not as the arbitrary colours stored under it). Images larger
than `max_pixels` are downscaled with an antialiased bicubic filter to that area (diffusers' rule: the new
size is floored), then centre-cropped to multiples of 16. Every resize and crop is reported, never silent.
"""

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..arguments import tensor_argument
from ..errors import KleinError, KleinNote

DEFAULT_MAX_PIXELS = 1024 * 1024
MULTIPLE = 16
MIN_SIDE = 64
MAX_ASPECT = 8
RECOMMENDED_REFERENCES = 4


def pil_to_tensor(image):
    """A PIL image in any mode -> (H, W, C) float32 in [0, 1], C = 1..4."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        array = np.asarray(image, dtype=np.uint16).astype(np.float32) / 65535.0
    elif mode == "I":
        array = np.asarray(image, dtype=np.int32).astype(np.float32)
        array = array / 65535.0 if array.max(initial=0) > 255 else array / 255.0
    elif mode == "F":
        array = np.asarray(image, dtype=np.float32)
    elif mode in ("RGB", "RGBA", "L", "LA"):
        array = np.asarray(image, dtype=np.float32) / 255.0
    else:  # P, CMYK, YCbCr, 1, ...: let PIL resolve palettes and colour spaces
        converted = image.convert("RGBA" if "transparency" in image.info or mode == "PA" else "RGB")
        array = np.asarray(converted, dtype=np.float32) / 255.0
    array = array if array.ndim == 3 else array[..., None]
    return torch.from_numpy(np.ascontiguousarray(array)).clamp(0, 1)


def pil_as_rgb(image):
    """A PIL image as an (H, W, 3) float tensor in [0, 1] (grey replicated, alpha on white); anything else as is."""
    return to_rgb(pil_to_tensor(image)).permute(1, 2, 0) if isinstance(image, Image.Image) else image


def to_hwc(image):
    """Any accepted input -> list of (H, W, C) float tensors (a batch of B gives B references)."""
    if isinstance(image, Image.Image):
        return [pil_to_tensor(image)]
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    if not isinstance(image, torch.Tensor):
        raise KleinError(f"a reference image must be a PIL image or an image tensor, not {type(image).__name__}")
    image = tensor_argument(image, "image").detach().cpu()
    if not image.is_floating_point():
        image = image.float() / (65535.0 if image.dtype in (torch.int32, torch.int64) and image.max() > 255 else 255.0)
    if image.ndim == 2:
        return [image[..., None].float()]
    if image.ndim == 3:
        channels_first = image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4)
        return [(image.permute(1, 2, 0) if channels_first else image).float()]
    if image.ndim == 4:
        return [frame.float() for frame in image]
    raise KleinError("a reference image tensor must have 2-4 dimensions (H,W / H,W,C / B,H,W,C), "
                     f"got shape {tuple(image.shape)}")


def to_rgb(hwc):
    """(H, W, C) -> (3, H, W): grey replicated, alpha composited on white."""
    channels = hwc.shape[-1]
    if channels in (2, 4):
        colour, alpha = hwc[..., :-1], hwc[..., -1:]
        hwc = colour * alpha + (1 - alpha)
    if hwc.shape[-1] == 1:
        hwc = hwc.expand(-1, -1, 3)
    if hwc.shape[-1] != 3:
        raise KleinError(f"a reference image must have 1-4 channels, got {channels}")
    return hwc.permute(2, 0, 1).contiguous()


def fit(chw, max_pixels, notes, label):
    """Downscale to at most `max_pixels` (area), then centre-crop to multiples of 16; notes say what changed."""
    _, height, width = chw.shape
    if min(height, width) < MIN_SIDE:
        raise KleinError(f"{label} is {width}x{height}; references need at least {MIN_SIDE} pixels on each side.")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise KleinError(f"{label} is {width}x{height}; references may not be more than {MAX_ASPECT}:1.")
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        new_w, new_h = int(width * scale), int(height * scale)
        chw = F.interpolate(chw[None], size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)[0]
        notes.append(f"{label}: resized {width}x{height} -> {new_w}x{new_h} (cap {max_pixels / 1e6:.2f} MP)")
        width, height = new_w, new_h
    return crop_to_multiple(chw, notes, label)


def crop_to_multiple(chw, notes, label):
    """Centre-crop (C, H, W) to multiples of 16, noting the change."""
    _, height, width = chw.shape
    crop_w, crop_h = width // MULTIPLE * MULTIPLE, height // MULTIPLE * MULTIPLE
    if min(crop_w, crop_h) == 0:
        raise KleinError(f"{label} is {width}x{height}; it must be at least {MULTIPLE}x{MULTIPLE}.")
    if (crop_w, crop_h) != (width, height):
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        chw = chw[:, top: top + crop_h, left: left + crop_w]
        notes.append(f"{label}: centre-cropped {width}x{height} -> {crop_w}x{crop_h} (multiples of {MULTIPLE})")
    return chw.clamp(0, 1)


def prepare_batch(images):
    """Images to encode as they are (VAE Encode): (B, 3, H, W) in [-1, 1] cropped to multiples of 16, notes."""
    notes = []
    frames = [crop_to_multiple(to_rgb(frame), notes, f"image {k + 1}") for k, frame in enumerate(to_hwc(images))]
    if len({f.shape for f in frames}) > 1:
        raise KleinError("images of one batch must have the same size")
    for note in dict.fromkeys(notes):
        warnings.warn(note, KleinNote, stacklevel=2)
    return torch.stack(frames) * 2 - 1, notes


def prepare_references(images, max_pixels=DEFAULT_MAX_PIXELS):
    """References -> ([(1, 3, H, W) in [-1, 1], ...], notes). A batched IMAGE counts as several references."""
    images = images if isinstance(images, (list, tuple)) else [images]
    frames = [frame for image in images for frame in to_hwc(image)]
    notes = []
    prepared = [fit(to_rgb(frame), max_pixels, notes, f"reference {k + 1}")[None] * 2 - 1
                for k, frame in enumerate(frames)]
    if len(prepared) > RECOMMENDED_REFERENCES:
        pixels = sum(p.shape[-1] * p.shape[-2] for p in prepared)
        notes.append(f"{len(prepared)} references ({pixels / 1e6:.1f} MP, {pixels // 256} tokens): more than "
                     f"{RECOMMENDED_REFERENCES} is allowed, but attention memory and time grow with the square of "
                     "the token count.")
    for note in notes:
        warnings.warn(note, KleinNote, stacklevel=2)
    return prepared, notes


def prepare_image(image, width, height):
    """An img2img / inpainting source -> ((1, 3, height, width) in [-1, 1], notes); resized (reported) if needed."""
    frames = to_hwc(image)
    if len(frames) != 1:
        raise KleinError(f"give one source image for img2img/inpainting, got a batch of {len(frames)}")
    chw, notes = to_rgb(frames[0]), []
    if chw.shape[-2:] != (height, width):
        notes.append(f"source image: resized {chw.shape[-1]}x{chw.shape[-2]} -> {width}x{height} (the output size)")
        warnings.warn(notes[-1], KleinNote, stacklevel=2)
        chw = F.interpolate(chw[None], size=(height, width), mode="bicubic", antialias=True, align_corners=False)[0]
    return chw.clamp(0, 1)[None] * 2 - 1, notes


def image_size(image):
    """(width, height) of a PIL image or an image tensor, without preparing it."""
    frame = to_hwc(image)[0]
    return frame.shape[1], frame.shape[0]


def to_mask(mask):
    """An inpainting mask, 1 = repaint, as (B, H, W) or (H, W) floats: a PIL image (white = repaint, as diffusers'
    mask_image; colour and alpha images are read as grey), a numpy array or a tensor (integers are scaled from 255)."""
    if mask is None:
        return None
    if isinstance(mask, Image.Image):
        return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask)
    if not isinstance(mask, torch.Tensor):
        raise KleinError(f"mask must be a PIL image, a numpy array or a tensor, not {type(mask).__name__}")
    return mask.float() / 255.0 if not mask.is_floating_point() else mask.float()
