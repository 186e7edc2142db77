"""Beyond 4 MP: an image enlarged (Lanczos) and refined tile by tile with img2img, the tiles blended seam-free.

Tiles of about 1 MP (multiples of 16) overlap by `overlap` pixels and are laid out in rows, each tile written into
the canvas as soon as it is done: in an overlap the new tile is mixed in with `torch.lerp`, its weight rising from 0
at the far edge of the band (already written by the tile above or to the left) to 1. Every pixel is thus a convex
mix whose weights sum to one, and where the tiles agree the mix is their value exactly (a lerp between equal
values returns that value), so an unchanged tile leaves the image bit for bit. Memory is the source and the canvas
plus one tile's run, whatever the output size.
"""

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from ..arguments import tensor_argument
from ..errors import KleinError, KleinNote
from .outpaint import image_frames
from .pipeline import KleinPipeline
from .schedule import MEGAPIXEL, MULTIPLE

MAX_OUTPUT_PIXELS = 64 * MEGAPIXEL
MIN_TILE, MAX_TILE = 256, 2048


def tiled_refine(pipe: KleinPipeline, image: torch.Tensor, prompt: str | None = None, scale: float = 2,
                 tile: int = 1024, overlap: int = 128, denoise: float = 0.35, seed: int = 0, steps: int = 4,
                 reference: bool = False, prompt_embeds: torch.Tensor | None = None,
                 progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """`image` ((H, W, 3) or (1, H, W, 3) in [0, 1], or a PIL image) enlarged `scale` times with Lanczos and refined
    by `pipe` (a KleinPipeline) tile by tile at `denoise` with `prompt` (or `prompt_embeds`), each tile seeded
    `seed + index` and, with `reference`, given itself as reference image. Returns (1, H*scale, W*scale, 3).
    `progress(done, total)` is called after each tile; raising from it stops between tiles."""
    if not (callable(pipe) and callable(getattr(pipe, "encode_prompt", None))):  # a KleinPipeline, or one like it
        raise KleinError(f"tiled_refine refines with a kn.KleinPipeline (with a VAE), not {type(pipe).__name__}")
    prompt_embeds = tensor_argument(prompt_embeds, "prompt_embeds", dims=(3,), optional=True)
    frames = image_frames(image)
    if frames.shape[0] != 1:
        raise KleinError(f"give one image to refine, got a batch of {frames.shape[0]}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and 1 <= scale <= 8):
        raise KleinError(f"scale must be 1 to 8, got {scale!r}")
    if not (isinstance(denoise, (int, float)) and 0 < denoise <= 1):
        raise KleinError(f"denoise must be above 0 and at most 1, got {denoise!r} (0.3-0.4 keeps the picture)")
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise KleinError(f"seed must be a whole number from 0 to 2^64-1, got {seed!r}")
    height, width = frames.shape[1:3]
    out_h, out_w = round(height * scale), round(width * scale)
    if out_w * out_h > MAX_OUTPUT_PIXELS:
        raise KleinError(f"the result would be {out_w}x{out_h} ({out_w * out_h / MEGAPIXEL:.0f} MP); tiled refine "
                         f"makes up to {MAX_OUTPUT_PIXELS // MEGAPIXEL} MP: lower the scale or start from a smaller "
                         "image")
    tile_w, tile_h = tile_sizes(out_w, out_h, tile, overlap)
    if prompt_embeds is None:
        if prompt is None:
            raise KleinError("give a prompt (or prompt_embeds) for the refine")
        prompt_embeds = pipe.encode_prompt([prompt])
    source = lanczos(frames[0], out_w, out_h) if (out_w, out_h) != (width, height) else frames[0]
    canvas = torch.zeros_like(source)  # never NaN: a weight-1 lerp over it must give the tile exactly
    boxes = [(y, x) for y in starts(out_h, tile_h, overlap) for x in starts(out_w, tile_w, overlap)]
    for index, (y, x) in enumerate(boxes):
        crop = source[y: y + tile_h, x: x + tile_w]
        refined = pipe(prompt_embeds=prompt_embeds, image=crop, width=tile_w, height=tile_h, steps=steps,
                       denoise=denoise, seed=(seed + index) % 2**64, references=[crop] if reference else None)[0]
        weight = blend_weight(tile_h, tile_w, y, x, boxes[:index])
        target = canvas[y: y + tile_h, x: x + tile_w]
        target.copy_(torch.lerp(target, refined, weight))
        if progress is not None:
            progress(index + 1, len(boxes))
    return canvas[None]


def tile_sizes(width, height, tile, overlap):
    """(tile width, tile height): `tile` (multiple of 16), or the image's side when that is smaller (noted)."""
    if not isinstance(tile, int) or not MIN_TILE <= tile <= MAX_TILE or tile % MULTIPLE:
        raise KleinError(f"tile must be a multiple of {MULTIPLE} from {MIN_TILE} to {MAX_TILE} pixels, got {tile!r}")
    if not isinstance(overlap, int) or not 0 <= overlap <= tile // 2:
        raise KleinError(f"overlap must be 0 to half the tile ({tile // 2} pixels), got {overlap!r}")
    if min(width, height) < 4 * MULTIPLE:
        raise KleinError(f"the result would be {width}x{height}: refine needs at least {4 * MULTIPLE} pixels a side")
    sizes = tuple(min(tile, side // MULTIPLE * MULTIPLE) for side in (width, height))
    if sizes != (tile, tile):
        warnings.warn(f"tiled refine: the image ({width}x{height}) is smaller than the {tile}px tile; tiles of "
                      f"{sizes[0]}x{sizes[1]}", KleinNote, stacklevel=3)
    return sizes


def starts(size, tile, overlap):
    """Tile starts along one side: the first at 0, the last ending at `size`, neighbours overlapping >= `overlap`."""
    if size == tile:
        return [0]
    overlap = min(overlap, tile // 2)  # a tile fitted to a small image keeps the requested overlap within reason
    count = max(2, math.ceil((size - overlap) / (tile - overlap)))
    return [round(k * (size - tile) / (count - 1)) for k in range(count)]


def blend_weight(height, width, y, x, earlier):
    """(h, w, 1) weight of a new tile at (y, x): a linear ramp across each band an earlier tile already covers."""
    above = max((ey + height - y for ey, ex in earlier if ey < y and ex < x + width and ex + width > x), default=0)
    before = max((ex + width - x for ey, ex in earlier if ey == y and ex < x), default=0)
    def ramp(n, band):
        return ((torch.arange(n) + 1) / (band + 1)).clamp(max=1) if band else torch.ones(n)

    return (ramp(height, above)[:, None] * ramp(width, before)[None, :])[..., None]


def lanczos(hwc, width, height):
    """(H, W, 3) float enlarged with PIL's Lanczos filter on float planes (no rounding to 8 bits), one plane at a
    time into the result, so the enlargement needs about one extra plane of memory."""
    out = torch.empty(height, width, hwc.shape[-1])
    for c in range(hwc.shape[-1]):
        plane = Image.fromarray(np.ascontiguousarray(hwc[..., c].numpy(), dtype=np.float32), "F")
        out[..., c] = torch.from_numpy(np.array(plane.resize((width, height), Image.LANCZOS)))
    return out.clamp_(0, 1)
