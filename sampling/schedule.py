"""klein's sigma schedule, image sizes and aspect presets, seeds and noise."""

import logging
import math
import secrets
import warnings

import numpy as np
import torch

from ..errors import KleinError, KleinNote

log = logging.getLogger("klein_nodes")

MULTIPLE = 16
MAX_PIXELS = 4 * 1024 * 1024
MEGAPIXEL = 1024 * 1024
ASPECT_RATIOS = ("1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21")
MAX_SEED = 2**64 - 1


def compute_empirical_mu(image_seq_len, num_steps):
    """Shift parameter from the image token count and the step count (klein-spec §6.1)."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return a2 * image_seq_len + b2
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return a * num_steps + (m_200 - 200.0 * a)


def time_shift(mu, t):
    """Exponential time shift: e^mu / (e^mu + (1/t - 1))."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def get_schedule(num_steps, image_seq_len, denoise=1.0):
    """num_steps + 1 sigmas from the start sigma down to 0.

    denoise < 1 follows ComfyUI: the schedule of round(num_steps / denoise) steps is built and its last
    num_steps are run, so `steps` is always the number of steps taken and img2img starts at the matching sigma.
    """
    if not 0 < denoise <= 1:
        raise KleinError(f"denoise must be in (0, 1], got {denoise}")
    total = max(num_steps, round(num_steps / denoise))
    mu = compute_empirical_mu(image_seq_len, total)
    grid = np.linspace(1.0, 1.0 / total, total)  # as diffusers builds it, then shifts and appends 0
    sigmas = [time_shift(mu, float(t)) for t in grid] + [0.0]
    return sigmas[total - num_steps:]


def round_to_multiple(value):
    """Nearest multiple of 16 (halves round up), at least 16."""
    return max(MULTIPLE, int(value / MULTIPLE + 0.5) * MULTIPLE)


def fit_size(width, height):
    """Width/height rounded to multiples of 16 and checked against 4 MP; returns (w, h, notes)."""
    if width < MULTIPLE or height < MULTIPLE:
        raise KleinError(f"size {width}x{height} is too small: at least {MULTIPLE}x{MULTIPLE}")
    fitted = (round_to_multiple(width), round_to_multiple(height))
    notes = []
    if fitted != (width, height):
        notes.append(f"size {width}x{height} rounded to {fitted[0]}x{fitted[1]} (multiples of {MULTIPLE})")
        warnings.warn(notes[-1], KleinNote, stacklevel=3)
    if fitted[0] * fitted[1] > MAX_PIXELS:
        raise KleinError(f"size {fitted[0]}x{fitted[1]} is {fitted[0] * fitted[1] / MEGAPIXEL:.2f} MP; klein "
                         f"supports up to {MAX_PIXELS // MEGAPIXEL} MP (e.g. 2048x2048)")
    return fitted[0], fitted[1], notes


def preset_size(aspect, megapixels=1.0):
    """(width, height) for an aspect preset like "16:9" at about `megapixels` (1 MP = 1024x1024), multiples of 16."""
    if aspect not in ASPECT_RATIOS:
        raise KleinError(f"unknown aspect ratio {aspect!r}; choose one of {', '.join(ASPECT_RATIOS)}")
    if not 0 < megapixels <= MAX_PIXELS / MEGAPIXEL:
        raise KleinError(f"megapixels must be in (0, {MAX_PIXELS // MEGAPIXEL}], got {megapixels}")
    a, b = (int(v) for v in aspect.split(":"))
    width = round_to_multiple(math.sqrt(megapixels * MEGAPIXEL * a / b))
    while True:  # rounding may push a 4 MP preset just over the limit: narrow until it fits
        height = round_to_multiple(width * b / a)
        if width * height <= MAX_PIXELS:
            return width, height
        width -= MULTIPLE


def resolve_seed(seed):
    """-1 (or None) means a fresh random seed; the seed actually used is returned so it can be reported."""
    if seed is None or seed == -1:
        return secrets.randbelow(2**63)
    if not 0 <= seed <= MAX_SEED:
        raise KleinError(f"seed must be -1 (random) or in [0, {MAX_SEED}], got {seed}")
    return seed


def initial_noise(seed, batch, channels, height, width):
    """fp32 N(0, 1) latents drawn on the CPU, so a seed gives the same image on every device."""
    log.info("klein: seed %d", seed)
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float32)
