"""Tiled VAE encode/decode without seams or colour shift.

Only the high-resolution paths are tiled (decoder up-blocks, encoder down-blocks); the mid blocks, whose
attention is global, run whole at H/8. Each tile owns a region of the output and is computed with a margin
wider than the receptive field, so convolutions inside the owned region see exactly what they would see in
one piece: cropping replaces blending and no seam can appear. What remains is GroupNorm, whose statistics
span the whole image: a first pass over the tiles collects them (per group, over owned regions only), and
the second pass normalises every tile with those whole-image statistics. That is what keeps the colours of
tiled and untiled runs the same (per-tile statistics are what cause the colour shifts users see elsewhere).
"""

import contextlib
import copy

import psutil
import torch
import torch.nn.functional as F

from ..models import prepacked
from ..models.autoencoder import Normalize

# Margins are the receptive fields of the tiled paths, so owned regions are computed exactly: decoder up-path
# 12.25 latent pixels (6 convs per level, halved at each 2x level, plus the upsample convs); encoder down-path
# 75 image pixels (conv_in, 4 convs and a stride-2 conv per level, doubled at each level), rounded up to 8.
DECODE_TILE, DECODE_MARGIN = 96, 13  # in latent pixels (image / 8): 768 px tiles
ENCODE_TILE, ENCODE_MARGIN = 768, 80  # in image pixels


class SharedStatistics:
    """GroupNorm hook. `measure`: normalise as usual and record whole-input statistics (the proxy run).
    Otherwise: normalise with the recorded statistics and accumulate new ones over each tile's owned region."""

    def __init__(self):
        self.stats = {}  # norm -> (mean, var), each (B, groups) float64
        self.sums = {}
        self.measure = False
        self.owned = None  # (top, bottom, left, right) as fractions of the tile input

    def refine(self):
        """Replace the statistics by those accumulated over the owned regions of the last pass."""
        self.stats = {norm: (total / count, (total_sq / count - (total / count).square()).clamp_min(0))
                      for norm, (total, total_sq, count) in self.sums.items()}
        self.sums = {}

    def __call__(self, norm, x):
        batch, groups = x.shape[0], norm.num_groups
        if self.measure:
            grouped = x.double().reshape(batch, groups, -1)
            self.stats[norm] = (grouped.mean(-1), grouped.var(-1, unbiased=False))
            return F.group_norm(x, groups, norm.weight, norm.bias, norm.eps)
        top, bottom, left, right = self.owned
        height, width = x.shape[-2:]
        owned = x[:, :, round(top * height): round(bottom * height), round(left * width): round(right * width)]
        owned = owned.reshape(batch, groups, -1)
        totals = self.sums.setdefault(norm, [0.0, 0.0, 0])
        totals[0] = totals[0] + owned.sum(-1, dtype=torch.float64)
        totals[1] = totals[1] + torch.linalg.vector_norm(owned, 2, dim=-1, dtype=torch.float64).square()
        totals[2] += owned.shape[-1]
        # normalise and apply the affine in one multiply-add: x·(w/σ) + (b − μ·w/σ), per sample and channel
        mean, var = self.stats[norm]
        per_channel = x.shape[1] // groups
        inv_std = torch.rsqrt(var + norm.eps).repeat_interleave(per_channel, dim=1)
        scale = inv_std * norm.weight.double()
        shift = norm.bias.double() - mean.repeat_interleave(per_channel, dim=1) * scale
        return torch.addcmul(shift.to(x.dtype)[..., None, None], x, scale.to(x.dtype)[..., None, None])


@contextlib.contextmanager
def shared_statistics(module):
    stats = SharedStatistics()
    norms = [m for m in module.modules() if isinstance(m, Normalize)]
    for norm in norms:
        norm.stats_hook = stats
    try:
        yield stats
    finally:
        for norm in norms:
            norm.stats_hook = None


def proxy(x, max_pixels, align):
    """`x` area-downscaled (by a power of two, so alignment holds) until it has at most `max_pixels`."""
    factor = 1
    while x.shape[-2] * x.shape[-1] // factor**2 > max_pixels and min(x.shape[-2:]) // (factor * 2) >= align:
        factor *= 2
    return F.avg_pool2d(x, factor) if factor > 1 else x


def spans(size, tile, align):
    """Owned [start, end) spans covering `size`, each a multiple of `align` long (tile rounded down to it)."""
    tile = max(align, tile // align * align)
    return [(start, min(start + tile, size)) for start in range(0, size, tile)]


def run_tiled(fn, module, x, tile, margin, scale, align, proxy_pixels, refine=0):
    """fn(x) computed tile by tile: owned spans of `tile` (input pixels) with `margin` of context; the output
    grows by `scale`. GroupNorm statistics come from a downscaled whole-image proxy run, shared by all tiles,
    then optionally refined `refine` times from the full-resolution tiles themselves."""
    height, width = x.shape[-2:]
    boxes = [(y0, y1, x0, x1) for y0, y1 in spans(height, tile, align) for x0, x1 in spans(width, tile, align)]
    with shared_statistics(module) as stats:
        stats.measure = True
        fn(proxy(x, proxy_pixels, align))
        stats.measure = False
        for index in range(refine + 1):
            if index:
                stats.refine()
            out = None
            for y0, y1, x0, x1 in boxes:
                cy0, cy1 = max(0, y0 - margin), min(height, y1 + margin)
                cx0, cx1 = max(0, x0 - margin), min(width, x1 + margin)
                th, tw = cy1 - cy0, cx1 - cx0
                stats.owned = ((y0 - cy0) / th, (y1 - cy0) / th, (x0 - cx0) / tw, (x1 - cx0) / tw)
                result = fn(x[..., cy0:cy1, cx0:cx1])
                if out is None:
                    out = result.new_empty(*result.shape[:2], round(height * scale), round(width * scale))
                out[..., round(y0 * scale): round(y1 * scale), round(x0 * scale): round(x1 * scale)] = result[
                    ..., round((y0 - cy0) * scale): round((y1 - cy0) * scale),
                    round((x0 - cx0) * scale): round((x1 - cx0) * scale)]
    return out


def vae_factor(vae):
    return 2 ** (len(vae.params.ch_mult) - 1)


@torch.inference_mode()
def tiled_decode(vae, z, tile=DECODE_TILE, margin=DECODE_MARGIN, proxy_pixels=None, refine=0):
    """`vae.decode` in tiles of `tile` latent pixels (at H/8); GroupNorm statistics from a proxy of at most
    `proxy_pixels` latent pixels (default: one tile's area)."""
    h = vae.decoder.head(vae.denormalize(z.float()).to(vae.dtype))
    return run_tiled(vae.decoder.upsample_path, vae.decoder, h, tile, margin, vae_factor(vae), 1,
                     proxy_pixels or tile * tile, refine)


@torch.inference_mode()
def tiled_encode(vae, x, tile=ENCODE_TILE, margin=ENCODE_MARGIN, proxy_pixels=None, refine=0):
    """`vae.encode` in tiles of `tile` image pixels; statistics from a proxy of at most `proxy_pixels`."""
    factor = vae_factor(vae)
    h = run_tiled(vae.encoder.downsample_path, vae.encoder, x.to(vae.dtype), tile, margin, 1 / factor, factor,
                  proxy_pixels or tile * tile, refine)
    return vae.normalize(vae.encoder.head(h).float())


def decode_bytes(vae, z):
    """Rough peak activation bytes of an untiled decode: a few full-resolution tensors of the widest level."""
    batch, _, h, w = z.shape
    pixels = batch * (h * 2 * vae_factor(vae)) * (w * 2 * vae_factor(vae))
    return 4 * pixels * vae.params.decoder_ch * vae.params.decoder_ch_mult[0] * max(vae.dtype.itemsize, 2)


def tile_decode_bytes(vae, z):
    """The same for a tiled decode: one tile with its margins."""
    side = (DECODE_TILE + 2 * DECODE_MARGIN) // 2  # in z's pixels (H/16)
    return decode_bytes(vae, z[..., :side, :side])


def free_bytes(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def should_tile(vae, z, device=None):
    """True when an untiled decode of `z` would not fit in free memory with a safety factor of 1.5."""
    device = device or z.device
    return decode_bytes(vae, z) * 1.5 > free_bytes(device)


def computing(vae, device):
    """`vae` as it computes on `device`: a half-precision VAE on a CPU without half-precision matmuls (see
    models/prepacked.py) runs as an fp32 copy made for the call: 84M parameters, converted in a fraction of a second,
    where bf16 convolutions there take several times as long (and ComfyUI decodes in fp32 on a CPU too)."""
    if prepacked.compute_dtype(vae.dtype, device) == vae.dtype:
        return vae
    return copy.deepcopy(vae).float()


def decode(vae, z, tiled="auto"):
    """Decode, tiled when asked (True) or when `should_tile` says an untiled decode would not fit ("auto")."""
    vae = computing(vae, z.device)
    if tiled is True or (tiled == "auto" and should_tile(vae, z)):
        return tiled_decode(vae, z)
    with torch.inference_mode():
        return vae.decode(z)


def encode(vae, x, tiled="auto"):
    """Encode, tiled when asked or when the image's decode-sized activations would not fit."""
    vae = computing(vae, x.device)
    latent_shape = (x.shape[0], 4 * vae.params.z_channels, x.shape[-2] // 16, x.shape[-1] // 16)
    if tiled is True or (tiled == "auto" and should_tile(vae, torch.empty(latent_shape, device="meta"), x.device)):
        return tiled_encode(vae, x)
    with torch.inference_mode():
        return vae.encode(x)
