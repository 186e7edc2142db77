"""float -> GGML blocks. K-quants follow llama.cpp's reference quantizers (weighted scale/min search per
sub-block, 6-bit packed sub-scales), vectorised over blocks in float32; simple types come from gguf-py."""

import numpy as np

QK_K = 256
GROUP_MAX_EPS = 1e-15


def nearest_int(values):
    return np.rint(values).astype(np.int32)  # round half to even, as llama.cpp's float trick


def make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep):
    """Per row of x (n, k): levels L in [0, nmax], scale and (positive) min minimising the weighted squared error
    over a grid of candidate scales, each refined by least squares."""
    x, weights = x.astype(np.float32), weights.astype(np.float32)
    low = np.minimum(x.min(axis=1), 0).astype(np.float32)
    high = x.max(axis=1)
    flat = high == low
    span = np.where(flat, 1, high - low).astype(np.float32)
    sum_w = weights.sum(axis=1)
    sum_x = (weights * x).sum(axis=1)

    def error(levels, scale, minimum):
        diff = scale[:, None] * levels + minimum[:, None] - x
        return (weights * diff * diff).sum(axis=1)

    iscale = (nmax / span).astype(np.float32)
    levels = np.clip(nearest_int(iscale[:, None] * (x - low[:, None])), 0, nmax).astype(np.float32)
    scale, minimum = (1 / iscale).astype(np.float32), low
    best = error(levels, scale, minimum)
    for step in range(nstep + 1):
        # each candidate spans from the best minimum found so far, as the reference loop does
        span = np.where(flat, 1, high - minimum).astype(np.float32)
        iscale = ((np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax))
                  / span).astype(np.float32)
        trial = np.clip(nearest_int(iscale[:, None] * (x - minimum[:, None])), 0, nmax).astype(np.float32)
        sum_l, sum_l2, sum_xl = (weights * trial).sum(1), (weights * trial * trial).sum(1), (weights * trial * x).sum(1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        safe = np.where(ok, det, 1)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / safe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / safe
        positive = this_min > 0
        this_min = np.where(positive, 0, this_min).astype(np.float32)
        this_scale = np.where(positive, sum_xl / np.where(sum_l2 > 0, sum_l2, 1), this_scale).astype(np.float32)
        mad = error(trial, this_scale, this_min)
        better = ok & (mad < best)
        levels = np.where(better[:, None], trial, levels)
        best, scale, minimum = (np.where(better, mad, best), np.where(better, this_scale, scale),
                                np.where(better, this_min, minimum))
    levels = np.where(flat[:, None], 0, levels)
    scale = np.where(flat, 0, scale)
    return levels.astype(np.int32), scale.astype(np.float32), (-minimum).astype(np.float32)


def pack_k_scales(ls, lm):
    """8 six-bit scales and mins -> the 12-byte K-quant layout (inverse of the dequantizer's unpacking)."""
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return out


def k_quant_levels(x, nmax, rmin, nstep):
    """Shared part of Q4_K / Q5_K: per 32-value sub-block scale/min search, 6-bit scale quantization, final levels."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    av_x = np.sqrt((sub * sub).sum(axis=1, keepdims=True) / 32).astype(np.float32)
    _, scales, mins = make_qkx2_quants(sub, av_x + np.abs(sub), nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale, max_min = scales.max(axis=1), np.maximum(mins.max(axis=1), 0)  # no -0.0 dmin for flat blocks
    inv_scale = np.where(max_scale > 0, 63 / np.where(max_scale > 0, max_scale, 1), 0).astype(np.float32)
    inv_min = np.where(max_min > 0, 63 / np.where(max_min > 0, max_min, 1), 0).astype(np.float32)
    ls = np.minimum(63, nearest_int(inv_scale[:, None] * scales)).astype(np.uint8)
    lm = np.minimum(63, nearest_int(inv_min[:, None] * mins)).astype(np.uint8)
    d = (max_scale / 63).astype(np.float16)
    dmin = (max_min / 63).astype(np.float16)
    dl = d.astype(np.float32)[:, None] * ls.astype(np.float32)
    ml = dmin.astype(np.float32)[:, None] * lm.astype(np.float32)
    safe = np.where(dl == 0, 1, dl)
    levels = nearest_int((x.reshape(n, 8, 32) + ml[..., None]) / safe[..., None])
    levels = np.where(dl[..., None] == 0, 0, np.clip(levels, 0, nmax))
    head = np.concatenate([d[:, None].view(np.uint8), dmin[:, None].view(np.uint8), pack_k_scales(ls, lm)], axis=1)
    return head, levels.reshape(n, QK_K).astype(np.uint8)


def quantize_q4_k(x):
    head, levels = k_quant_levels(x, 15, -1.0, 20)
    halves = levels.reshape(-1, 4, 2, 32)  # per 64 values: low nibbles = first 32, high nibbles = next 32
    return np.concatenate([head, (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(-1, 128)], axis=1)


def quantize_q5_k(x):
    head, levels = k_quant_levels(x, 31, -0.5, 15)
    low, high = levels & 0x0F, levels >> 4
    halves = low.reshape(-1, 4, 2, 32)
    qs = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(-1, 128)
    qh = (high.reshape(-1, 8, 32) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1).astype(np.uint8)
    return np.concatenate([head, qh, qs], axis=1)


def make_qx_quants(x, nmax):
    """Per row (n, 16): symmetric levels in [-nmax, nmax-1] with the x²-weighted best scale over 19 candidates."""
    ax = np.abs(x)
    index = ax.argmax(axis=1)
    peak = x[np.arange(len(x)), index]
    tiny = ax.max(axis=1) < GROUP_MAX_EPS
    peak = np.where(tiny, 1, peak).astype(np.float32)
    weights = x * x

    def levels_for(iscale):
        return np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1).astype(np.float32)  # keep float32 sums

    iscale = (-nmax / peak).astype(np.float32)
    levels = levels_for(iscale)
    sumlx, suml2 = (weights * x * levels).sum(1), (weights * levels * levels).sum(1)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1), 0).astype(np.float32)
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s]:
        trial_iscale = (-(nmax + np.float32(0.1) * step) / peak).astype(np.float32)
        trial = levels_for(trial_iscale)
        sumlx, suml2 = (weights * x * trial).sum(1), (weights * trial * trial).sum(1)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        new_scale = sumlx / np.where(suml2 > 0, suml2, 1)
        levels = np.where(better[:, None], trial, levels)
        scale = np.where(better, new_scale, scale).astype(np.float32)
        best = np.where(better, scale * sumlx, best)
    return np.where(tiny, 0, scale).astype(np.float32)


def quantize_q6_k(x):
    n = x.shape[0]
    scales = make_qx_quants(x.reshape(n * 16, 16), 32).reshape(n, 16)
    pick = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(n), pick]
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    iscale = np.where(empty, 0, -128 / np.where(empty, 1, max_scale)).astype(np.float32)
    d = np.where(empty, 0, 1 / np.where(iscale == 0, 1, iscale)).astype(np.float16)
    sc = np.minimum(127, nearest_int(iscale[:, None] * scales)).astype(np.int8)
    dl = d.astype(np.float32)[:, None] * sc.astype(np.float32)
    safe = np.where(dl == 0, 1, dl)
    levels = np.clip(nearest_int(x.reshape(n, 16, 16) / safe[..., None]), -32, 31) + 32
    levels = np.where(dl[..., None] == 0, 32, levels)
    levels = np.where(empty[:, None, None], 0, levels).reshape(n, 2, 4, 32).astype(np.uint8)  # per 128: 4 runs of 32
    low, high = levels & 0x0F, levels >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)],
                        axis=2).reshape(n, 128)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d[:, None].view(np.uint8)], axis=1)


K_QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def quantize(values, qtype):
    """(rows, cols) float array -> (rows, packed bytes) uint8 GGML blocks of `qtype`."""
    import gguf

    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype in K_QUANTIZERS:
        if values.shape[-1] % QK_K:
            raise ValueError(f"{qtype} needs rows that are multiples of {QK_K}, got {values.shape[-1]}")
        blocks = K_QUANTIZERS[qtype](values.reshape(-1, QK_K))
        return blocks.reshape(*values.shape[:-1], -1)
    return gguf.quants.quantize(values, gguf.GGMLQuantizationType[qtype])
