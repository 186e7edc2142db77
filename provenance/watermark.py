"""BFL's invisible FLUX watermark (invisible-watermark's "dwtDct", 46-bit message) in numpy, and its detector.

Byte-compatible with `imwatermark` on uint8 images (the library is MIT-licensed; this is an independent
implementation of the same algorithm): OpenCV's 8-bit fixed-point YUV conversion, a one-level Haar transform of
the U channel, and per 4x4 block of its low band a quantisation (step 36) of the largest coefficient. Like the
library, the inverse transform swaps the horizontal and vertical detail bands.
"""

import numpy as np

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


def decode(rgb, length=len(FLUX_BITS)):
    """The embedded bits as the library's decoder reads them (majority over every block carrying each bit)."""
    check_size(rgb)
    yuv = bgr_to_yuv(rgb[..., ::-1])
    height, width = rgb.shape[0] // 4 * 4, rgb.shape[1] // 4 * 4
    ll, _ = dwt2(yuv[:height, :width, 1])
    flat, peak, _ = block_peaks(ll)
    scores = (np.abs(flat[np.arange(len(flat)), peak]) % STEP > 0.5 * STEP).astype(np.float64)
    counts = np.bincount(np.arange(len(flat)) % length, minlength=length)
    means = np.bincount(np.arange(len(flat)) % length, weights=scores, minlength=length) / counts
    return tuple(int(bit) for bit in means * 255 > 127)


def matched_bits(rgb, bits=FLUX_BITS):
    """How many of the FLUX watermark's bits the image carries (46 = all; unmarked images score ~18 or 28)."""
    return sum(a == b for a, b in zip(decode(rgb, len(bits)), bits))
