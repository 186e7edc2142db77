"""BFL's invisible FLUX watermark (invisible-watermark's "dwtDct", 46-bit message) in numpy, and its detector.

Byte-compatible with `imwatermark` on uint8 images (the library is MIT-licensed; this is an independent
implementation of the same algorithm): OpenCV's 8-bit fixed-point YUV conversion, a one-level Haar transform of
the U channel, and per 4x4 block of its low band a quantisation (step 36) of the largest coefficient. Like the
library, the inverse transform swaps the horizontal and vertical detail bands.
"""

import io
from typing import NamedTuple

import numpy as np
from PIL import Image

from .formats import IMAGE_FORMATS

# BFL's constant (FLUX.1 and FLUX.2); bin() drops its two leading zeros, so 46 bits are embedded.
FLUX_MESSAGE = 0b001010101111111010000111100111001111010100101110
FLUX_BITS = tuple(int(bit) for bit in bin(FLUX_MESSAGE)[2:])
STEP = 36
BLOCK = 4
MIN_PIXELS = 256 * 256
DETECTED_AT = 40  # of 46 bits; unmarked images score about 18 (all-zero) or 28 (all-one decodes)
SHIFT = 14
HAAR = 0.7071067811865476  # pywt's Haar filter tap, 1/sqrt(2) in float64


def descale(value):
    return (value + (1 << (SHIFT - 1))) >> SHIFT


def bgr_to_yuv(bgr):
    """OpenCV COLOR_BGR2YUV for uint8 (fixed point, 14 fractional bits)."""
    b, g, r = (bgr[..., i].astype(np.int32) for i in range(3))
    y = descale(r * 4899 + g * 9617 + b * 1868)
    u = descale((b - y) * 8061 + (128 << SHIFT))
    v = descale((r - y) * 14369 + (128 << SHIFT))
    return np.clip(np.stack((y, u, v), axis=-1), 0, 255).astype(np.uint8)


def yuv_to_bgr(yuv):
    """OpenCV COLOR_YUV2BGR for uint8."""
    y, u, v = yuv[..., 0].astype(np.int32), yuv[..., 1].astype(np.int32) - 128, yuv[..., 2].astype(np.int32) - 128
    b = y + descale(u * 33292)
    g = y + descale(u * -6472 + v * -9519)
    r = y + descale(v * 18678)
    return np.clip(np.stack((b, g, r), axis=-1), 0, 255).astype(np.uint8)


def haar_axis(x, axis):
    even, odd = np.take(x, np.arange(0, x.shape[axis], 2), axis), np.take(x, np.arange(1, x.shape[axis], 2), axis)
    return HAAR * even + HAAR * odd, HAAR * even - HAAR * odd


def dwt2(x):
    """pywt.dwt2(x, 'haar') for even sizes: (LL, (H, V, D)), same float64 operations."""
    low, high = haar_axis(x.astype(np.float64), 0)
    ll, lh = haar_axis(low, 1)
    hl, hh = haar_axis(high, 1)
    return ll, (hl, lh, hh)


def inverse_axis(approx, detail, axis):
    first, second = HAAR * approx + HAAR * detail, HAAR * approx - HAAR * detail
    out = np.stack((first, second), axis=axis + 1)
    shape = list(approx.shape)
    shape[axis] *= 2
    return out.reshape(shape)


def idwt2(ll, details):
    horizontal, vertical, diagonal = details
    low = inverse_axis(ll, vertical, 1)
    high = inverse_axis(horizontal, diagonal, 1)
    return inverse_axis(low, high, 0)


def block_peaks(ll):
    """Per 4x4 block of the low band (row-major): index of the largest |coefficient| other than the first."""
    rows, cols = ll.shape[0] // BLOCK, ll.shape[1] // BLOCK
    blocks = ll[: rows * BLOCK, : cols * BLOCK].reshape(rows, BLOCK, cols, BLOCK).transpose(0, 2, 1, 3)
    flat = blocks.reshape(rows * cols, BLOCK * BLOCK)
    peak = np.argmax(np.abs(flat[:, 1:]), axis=1) + 1
    return flat, peak, (rows, cols)


def check_size(rgb):
    if rgb.shape[0] * rgb.shape[1] < MIN_PIXELS:
        raise ValueError(f"{rgb.shape[1]}x{rgb.shape[0]} is below the watermark's minimum of 256x256 pixels")


def embed(rgb, bits=FLUX_BITS):
    """Watermark a uint8 RGB image (H, W, 3); returns a new uint8 RGB image."""
    check_size(rgb)
    yuv = bgr_to_yuv(rgb[..., ::-1])
    height, width = rgb.shape[0] // 4 * 4, rgb.shape[1] // 4 * 4
    ll, (horizontal, vertical, diagonal) = dwt2(yuv[:height, :width, 1])
    flat, peak, (rows, cols) = block_peaks(ll)
    index = np.arange(len(flat))
    values = flat[index, peak]
    bit = np.asarray(bits, dtype=np.float64)[index % len(bits)]
    magnitude = (np.abs(values) // STEP + 0.25 + 0.5 * bit) * STEP
    flat[index, peak] = np.where(values >= 0, magnitude, -1.0 * magnitude)
    ll[: rows * BLOCK, : cols * BLOCK] = flat.reshape(rows, cols, BLOCK, BLOCK).transpose(0, 2, 1, 3).reshape(
        rows * BLOCK, cols * BLOCK)
    yuv[:height, :width, 1] = idwt2(ll, (vertical, horizontal, diagonal))  # the library's H/V swap, kept
    return yuv_to_bgr(yuv)[..., ::-1].copy()


def residues(rgb):
    """What the library's decoder reads per 4x4 block of the U low band (row-major): |peak| modulo STEP."""
    height, width = rgb.shape[0] // 4 * 4, rgb.shape[1] // 4 * 4
    ll, _ = dwt2(bgr_to_yuv(rgb[..., ::-1])[:height, :width, 1])
    flat, peak, _ = block_peaks(ll)
    return np.abs(flat[np.arange(len(flat)), peak]) % STEP


def decode(rgb, length=len(FLUX_BITS)):
    """The embedded bits as the library's decoder reads them (majority over every block carrying each bit)."""
    check_size(rgb)
    scores = (residues(rgb) > 0.5 * STEP).astype(np.float64)
    counts = np.bincount(np.arange(len(scores)) % length, minlength=length)
    means = np.bincount(np.arange(len(scores)) % length, weights=scores, minlength=length) / counts
    return tuple(int(bit) for bit in means * 255 > 127)


def matched_bits(rgb, bits=FLUX_BITS):
    """How many of the FLUX watermark's bits the image carries (46 = all; unmarked images score ~18 or 28)."""
    return sum(a == b for a, b in zip(decode(rgb, len(bits)), bits))


# Robust mode: the same mark for the same decoder, placed where JPEG and WebP keep it. BFL's embedding moves one 2x2
# pixel spot of U per 8x8 block; chroma subsampling and quantisation average such spots away (reads fall to ~18/46).
# Here whole 8x8 blocks of U move uniformly (the block's peak stays its peak; JPEG's and WebP's chroma transforms are
# aligned to these blocks, so the shift survives as a DC term), each block only into the +-ZONE window around its
# bit's bin centre, pre-compensated for what the codecs below do to it, and on the cheapest blocks of every bit up
# to a PSNR budget: the decoder's per-bit majority needs most blocks of each bit, not all.
# Two plans. "keep-y": blocks move along Y-neutral blue/green and are compensated until every simulated save reads
# them within ZONE of their centre (the furthest-off save decides): safe blocks, costly ones. Kept while the budget
# still pays for MAJORITY_SHARE of every bit's blocks. Dark or flat colour can make it pay for fewer: the Hubble deep
# field's black sky sits in bin 0, so every block of a 1-bit must move ~13 (blue down by ~13, to 0 in much of it);
# 35.5 dB paid for ~60% of them, a majority WebP q75's errors overturned (19/46). Then "lift": the least-MSE RGB
# direction (where U falls, blue falls 1.48 per unit instead of 2.03 and red and green rise, lifting luminance by
# 0.56: 21% less MSE where nothing clips, less clipping at 0), compensated until the median save reads a block
# within ZONE, on as many blocks as MIN_PSNR_DB allows (measured per block, clipping included): more blocks, moved
# less far. A further lift to keep blue off 0 after the codecs costs more blocks than it saves.
ZONE = 6.0  # LL units either side of a bin centre (the bins are 18 wide)
BUDGET_DB = 35.5  # PSNR the keep-y plan's block selection aims at
MIN_PSNR_DB = 35.0  # never below this (the lift plan goes down to it)
MAJORITY_SHARE = 0.7  # of each bit's blocks the "keep-y" plan must afford, else the "lift" plan is used
PIXEL = 8  # a 4x4 block of the half-size low band
KEEP_Y = np.array([0.0, -0.395, 2.032])  # RGB change that moves U by 1 with Y and V unchanged
U_GRADIENT = np.array([-0.299, -0.587, 0.886]) * 0.492  # dU/d(R, G, B)
LIFT = U_GRADIENT / (U_GRADIENT @ U_GRADIENT)  # the smallest RGB change that moves U by 1 (Y moves -0.56)
NEAR_BLACK = 16  # a pixel with all channels below this is near black (said when a mark is weak)
SHARING_CODECS = (("jpeg", 75, 2), ("jpeg", 75, 0), ("webp", 75, None), ("jpeg", 90, 2), ("webp", 90, None))


def roundtrip(rgb, fmt, quality, subsampling=0):
    """What an image looks like after a JPEG (subsampling 0 = 4:4:4, 2 = 4:2:0) or WebP save at `quality`."""
    buffer = io.BytesIO()
    options = {"subsampling": subsampling} if fmt == "jpeg" else {"method": 4}
    Image.fromarray(rgb).save(buffer, fmt.upper(), quality=quality, **options)
    return np.asarray(Image.open(buffer).convert("RGB"))


def bin_errors(rgb, bits):
    """Per block, the signed distance (LL units) from what the decoder reads to the centre of the wanted bin."""
    error = (0.25 + 0.5 * bits) * STEP - residues(rgb)
    return (error + STEP / 2) % STEP - STEP / 2


def shift_blocks(rgb, delta, grid, direction=KEEP_Y):
    """`rgb` with U moved by delta/2 over each 8x8 block (delta in LL units): along `direction` (by default Y- and
    V-neutral blue/green), and where that clips, along U's gradient through the channels that can still move."""
    rows, cols = grid
    target = np.zeros(rgb.shape[:2], dtype=np.float32)
    per_block = (delta.reshape(rows, cols) / 2).astype(np.float32)
    target[: rows * PIXEL, : cols * PIXEL] = per_block.repeat(PIXEL, 0).repeat(PIXEL, 1)
    out = rgb.astype(np.float32)
    out += target[..., None] * np.asarray(direction, dtype=np.float32)
    clipped = ((out < 0) | (out > 255)).any(-1)
    start, want = rgb[clipped].astype(np.float64), target[clipped]
    fixed = np.clip(out[clipped], 0, 255)
    for _ in range(2):
        short = want - (fixed - start) @ U_GRADIENT
        movable = np.where(short[..., None] * U_GRADIENT > 0, fixed < 255, fixed > 0)
        direction = U_GRADIENT * movable
        norm = (direction * direction).sum(-1)
        fixed = np.clip(fixed + (short / np.maximum(norm, 1e-9) * (norm > 0))[..., None] * direction, 0, 255)
    out[clipped] = fixed
    return np.clip(np.round(out, out=out), 0, 255, out=out).astype(np.uint8)


def into_zone(error):
    return np.sign(error) * np.maximum(np.abs(error) - ZONE, 0)


def cheapest(cost, period, share):
    """Per bit (blocks i, i + period, ...), the cheapest `share` of its blocks."""
    bit = np.arange(len(cost)) % period
    order = np.lexsort((cost, bit))
    rank = np.empty(len(cost), dtype=np.int64)
    starts = np.searchsorted(bit[order], np.arange(period))
    rank[order] = np.arange(len(cost)) - starts[bit[order]]
    return rank < np.ceil(share * np.bincount(bit, minlength=period))[bit]


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


class RobustMark(NamedTuple):
    """A robust mark and what it could afford on its image."""

    image: np.ndarray  # the marked uint8 RGB image
    plan: str  # "keep-y" or "lift"
    share: float  # of every bit's blocks that moved (the decoder's majority needs well over half to survive a save)
    near_black: float  # share of the image's pixels that are near black

    @property
    def limit(self):
        """What limits the mark on this image, in words (for a note when a save reads too few bits back)."""
        if self.share >= 0.9:
            return "its blocks moved, but the save's quantisation overturns too many of them"
        floor = MIN_PSNR_DB if self.plan == "lift" else BUDGET_DB
        dark = (f", the image being {self.near_black:.0%} near black (U falls there only by lifting luminance)"
                if self.near_black >= 0.2 else "")
        return f"the {floor:g} dB quality budget moves only {self.share:.0%} of each bit's blocks{dark}"


def compensation_step(delta, lossless, lossy, plan):
    """`delta` moved on by what the saves read (signed bin errors: the lossless read, one row per simulated save)."""
    if not len(lossy):
        error = lossless
    elif plan == "keep-y":  # the save furthest off, on the side most saves are off
        side = np.sign(lossy.mean(0))
        error = side * (lossy * side).max(0)
    else:
        error = np.median(lossy, axis=0)
    return np.clip(delta + into_zone(error), -2 * STEP, 2 * STEP)


def block_costs(rgb, marked, grid):
    """Per 8x8 block (row-major), the summed squared RGB change from `rgb` to `marked`."""
    rows, cols = grid
    change = marked[: rows * PIXEL, : cols * PIXEL].astype(np.int32) - rgb[: rows * PIXEL, : cols * PIXEL]
    return (change * change).reshape(rows, PIXEL, cols, PIXEL, 3).sum((1, 3, 4)).ravel().astype(np.float64)


def affordable_share(size, cost, period, budget):
    """The largest share of every bit's blocks, smallest moves first, whose cost fits the budget."""
    low, high = 0.0, 1.0
    for _ in range(12):
        share = (low + high) / 2
        low, high = (share, high) if cost[cheapest(size, period, share)].sum() <= budget else (low, share)
    return low


def robust_mark(rgb, bits=FLUX_BITS, codecs=(), iterations=2):
    """`embed_robust`'s mark, with the plan it took and how much of the image it could move (a RobustMark)."""
    check_size(rgb)
    rows, cols = rgb.shape[0] // 4 * 2 // BLOCK, rgb.shape[1] // 4 * 2 // BLOCK  # low-band blocks
    wanted = np.asarray(bits, dtype=np.float64)[np.arange(rows * cols) % len(bits)]
    fits = [c for c in SHARING_CODECS if max(rgb.shape[:2]) <= IMAGE_FORMATS[c[0]].max_side]
    simulated = [lambda x, c=c: roundtrip(x, *c) for c in fits] + list(codecs)
    near_black = float((rgb < NEAR_BLACK).all(-1).mean())
    start = into_zone(bin_errors(rgb, wanted))
    grid, pixels = (rows, cols), rgb.shape[0] * rgb.shape[1]
    for plan, direction in (("keep-y", KEEP_Y), ("lift", LIFT)):
        delta = start
        for _ in range(iterations):  # pre-compensate each block for the shift the codecs give it
            marked = shift_blocks(rgb, delta, grid, direction)
            lossy = np.array([bin_errors(c(marked), wanted) for c in simulated])
            delta = compensation_step(delta, bin_errors(marked, wanted), lossy, plan)
        size = delta**2  # blocks are taken smallest move first (in dark images: the flat sky, which holds best)
        if plan == "keep-y":  # cost estimated from the move, aiming at BUDGET_DB
            cost, budget = size, pixels * 255.0**2 / 10 ** (BUDGET_DB / 10) / (1.428 / 4 * PIXEL * PIXEL)
        else:  # cost measured per block (clipping included), down to the floor
            cost = block_costs(rgb, shift_blocks(rgb, delta, grid, direction), grid)
            budget = 3 * pixels * 255.0**2 / 10 ** ((MIN_PSNR_DB + 0.01) / 10)
        share = affordable_share(size, cost, len(bits), budget)
        if share >= MAJORITY_SHARE:
            break
    while True:
        marked = shift_blocks(rgb, np.where(cheapest(size, len(bits), share), delta, 0.0), grid, direction)
        if psnr(rgb, marked) >= MIN_PSNR_DB or share <= 0:
            return RobustMark(marked, plan, share, near_black)
        share = max(share - 0.05, 0.0)


def embed_robust(rgb, bits=FLUX_BITS, codecs=(), iterations=2):
    """Watermark a uint8 RGB image so that `decode` (and imwatermark's dwtDct decoder) still reads it after JPEG
    4:2:0/4:4:4 and WebP saves at quality 75-90; `codecs` adds callables rgb -> rgb (the save that will follow) to
    the compensation. Costs at least MIN_PSNR_DB; `robust_mark` also says what limited it."""
    return robust_mark(rgb, bits, codecs, iterations).image
