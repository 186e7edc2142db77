"""Outpainting canvases: the image padded to a larger frame, the new area filled, and the mask klein repaints.

The fill chosen by default, "edge", continues the border's colours outward and blurs them more with distance. At
denoise 1 the masked area restarts from noise, so the fill matters where the mask is soft (the feathered band) and
in the latent pixels that straddle the border (16 image pixels each): a continuation without a hard edge gives those
a seam-free start, and at denoise below 1 it gives the new area the image's palette. A flat mean colour leaves an
edge at the border; noise leaves noisy border latents; plain edge replication leaves streaks that lower denoise
keeps. All three are available ("mean", "noise", and "edge" is the blurred continuation).
"""

import warnings

import torch
import torch.nn.functional as F

from ..arguments import integer, one_of
from ..errors import KleinError, KleinNote
from .references import pil_as_rgb, to_hwc
from .schedule import ASPECT_RATIOS, MAX_PIXELS, MEGAPIXEL, MULTIPLE, round_to_multiple

FILLS = ("edge", "mean", "noise")
MAX_PAD = 8192


def outpaint_canvas(image: torch.Tensor, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0,
                    fill: str = "edge", feather: int = 32, aspect: str | None = None,
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(canvas, mask): `image` ((H, W, 3) or (B, H, W, 3) in [0, 1], or a PIL image) placed on a canvas grown by the
    given pixels on each side (or, with `aspect` such as "16:9", grown evenly to that aspect), both sides kept
    multiples of 16 (extra pixels go to the grown sides, noted). The canvas keeps the image's layout; its new area is
    filled with `fill`. `mask` (H', W') is 1 on the new area and ramps from 1 to 0 over `feather` pixels into the
    image, so the repaint blends in; beyond that band it is exactly 0 and the image's pixels are the input's, bit for
    bit."""
    frames = image_frames(image)
    fill, feather = one_of(fill, "fill", FILLS), integer(feather, "feather", 0, 512)
    seed = integer(seed, "seed", 0, 2**64 - 1)
    height, width = frames.shape[1:3]
    pads = aspect_pads(width, height, aspect) if aspect else check_pads(left, top, right, bottom)
    left, top, right, bottom = multiple_pads(width, height, *pads)
    canvas_w, canvas_h = width + left + right, height + top + bottom
    if canvas_w * canvas_h > MAX_PIXELS:
        raise KleinError(f"the canvas would be {canvas_w}x{canvas_h} ({canvas_w * canvas_h / MEGAPIXEL:.1f} MP); klein "
                         f"samples up to {MAX_PIXELS // MEGAPIXEL} MP: outpaint a smaller image, then enlarge the "
                         "result with Klein Tiled Refine")
    chw = frames.permute(0, 3, 1, 2)
    filled = {"edge": edge_fill, "mean": mean_fill, "noise": noise_fill}[fill](chw, (left, right, top, bottom), seed)
    filled[..., top: top + height, left: left + width] = chw  # the image itself, exactly as given
    canvas = filled.permute(0, 2, 3, 1).contiguous()
    mask = outpaint_mask(canvas_h, canvas_w, (left, top, right, bottom), feather)
    return (canvas if getattr(image, "ndim", 3) == 4 else canvas[0]), mask


def image_frames(image):
    """(B, H, W, 3) float32 frames of an IMAGE tensor or a PIL image, refused with what to give otherwise."""
    image = pil_as_rgb(image)
    if not isinstance(image, torch.Tensor) or image.ndim not in (3, 4) or image.shape[-1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise KleinError(f"the image must be an RGB image tensor (H, W, 3) or (B, H, W, 3) or a PIL image, got {shape}")
    frames = torch.stack(to_hwc(image)) if image.ndim == 4 else to_hwc(image)[0][None]
    if min(frames.shape[1:3]) < MULTIPLE:
        raise KleinError(f"the image is {frames.shape[2]}x{frames.shape[1]}: at least {MULTIPLE} pixels on each side")
    if not torch.isfinite(frames).all():
        raise KleinError("the image holds NaN or infinite values")
    return frames


def check_pads(left, top, right, bottom):
    pads = {"left": left, "top": top, "right": right, "bottom": bottom}
    for side, value in pads.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_PAD:
            raise KleinError(f"{side} must be a whole number of pixels from 0 to {MAX_PAD}, got {value!r}")
    if not any(pads.values()):
        raise KleinError("nothing to extend: give left, top, right or bottom pixels, or an aspect such as 16:9")
    return left, top, right, bottom


def aspect_pads(width, height, aspect):
    """Pads that grow (never crop) the image evenly to `aspect` at multiples of 16, the short axis growing."""
    if aspect not in ASPECT_RATIOS:
        raise KleinError(f"unknown aspect {aspect!r}; choose one of {', '.join(ASPECT_RATIOS)}")
    a, b = (int(v) for v in aspect.split(":"))
    target_w, target_h = -(-width // MULTIPLE) * MULTIPLE, -(-height // MULTIPLE) * MULTIPLE
    if target_w / target_h < a / b:
        target_w = max(target_w, round_to_multiple(target_h * a / b))
    else:
        target_h = max(target_h, round_to_multiple(target_w * b / a))
    if (target_w, target_h) == (width, height):
        raise KleinError(f"the image ({width}x{height}) is already {aspect}: nothing to extend")
    grow_w, grow_h = target_w - width, target_h - height
    return grow_w // 2, grow_h // 2, grow_w - grow_w // 2, grow_h - grow_h // 2


def multiple_pads(width, height, left, top, right, bottom):
    """Pads grown so both canvas sides are multiples of 16: the extra goes to the grown sides (split between two),
    or to the right / bottom when neither side of that axis grows; a note says where."""
    def grow(size, before, after, names):
        extra = -(size + before + after) % MULTIPLE
        if extra == 0:
            return before, after
        if before and after:
            before, after = before + extra // 2, after + extra - extra // 2
        elif before:
            before += extra
        else:
            after += extra
        warnings.warn(f"outpaint: {extra} more pixel(s) {names} so the canvas is a multiple of {MULTIPLE}", KleinNote,
                      stacklevel=4)
        return before, after

    left, right = grow(width, left, right, "left/right")
    top, bottom = grow(height, top, bottom, "top/bottom")
    return left, top, right, bottom


def edge_fill(chw, pads, seed):
    """The border continued outward (edge replication), blurred more the farther a pixel is from the image."""
    left, right, top, bottom = pads
    padded = F.pad(chw, pads, mode="replicate")
    distance = outside_distance(padded.shape[-2], padded.shape[-1], (left, top, right, bottom))
    out, scale = padded.clone(), 2
    while scale <= 2 * max(pads) and min(padded.shape[-2:]) // scale >= 1:
        coarse = F.interpolate(F.avg_pool2d(padded, scale, ceil_mode=True), size=padded.shape[-2:], mode="bilinear",
                               align_corners=False)
        weight = ((distance / (4 * scale)).clamp(0, 1))[None, None]  # farther pixels take coarser levels
        out = torch.lerp(out, coarse, weight)
        scale *= 2
    return out


def mean_fill(chw, pads, seed):
    left, right, top, bottom = pads
    mean = chw.mean(dim=(-2, -1), keepdim=True)
    return mean.expand(-1, -1, chw.shape[-2] + top + bottom, chw.shape[-1] + left + right).clone()


def noise_fill(chw, pads, seed):
    """The image's mean colour with noise of its own spread, drawn from `seed`."""
    filled = mean_fill(chw, pads, seed)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(filled.shape, generator=generator) * chw.std(dim=(-2, -1), keepdim=True)
    return (filled + noise).clamp(0, 1)


def outside_distance(height, width, pads):
    """Chebyshev distance in pixels from each canvas pixel to the image rectangle (0 inside it)."""
    left, top, right, bottom = pads
    ys, xs = torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32)
    dy = (top - ys).clamp_min(0) + (ys - (height - bottom - 1)).clamp_min(0)
    dx = (left - xs).clamp_min(0) + (xs - (width - right - 1)).clamp_min(0)
    return torch.maximum(dy[:, None], dx[None, :])


def outpaint_mask(height, width, pads, feather):
    """1 on the new area; inside the image, 1 - d / (feather + 1) at d pixels from a grown side (exactly 0 beyond)."""
    left, top, right, bottom = pads
    ys, xs = torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32)
    inf = torch.tensor(float("inf"))
    near = [torch.where(torch.tensor(bool(pad)), d, inf) for pad, d in (
        (top, (ys - top + 1)[:, None].expand(height, width)),
        (bottom, (height - bottom - ys)[:, None].expand(height, width)),
        (left, (xs - left + 1)[None, :].expand(height, width)),
        (right, (width - right - xs)[None, :].expand(height, width)))]
    distance = torch.stack(near).amin(0)  # pixels into the image from the nearest grown side (<= 0: new area)
    return (1 - distance / (feather + 1)).clamp(0, 1)
