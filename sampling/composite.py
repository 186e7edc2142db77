"""Put an edit back into its original: undo the edit's global shift and colour drift, find what changed, and take
only that from the edit, feathered, so that everything else stays the original's pixels, bit for bit.

Image editing models re-render the whole picture: besides the requested change the result is often moved by a few
pixels, its colours drift, and fine detail is re-synthesised everywhere. Alignment: phase correlation on an area
downscale (tile by tile, whitened: blind to gain, offset and most tone curves) gives the shift to about a pixel; robust
Gauss-Newton (Lucas-Kanade) on the translation, at that scale and then at full resolution, makes it sub-pixel,
counting only pixels whose residual is within 3 sigma of the median (the change itself is an outlier). Colour: per
channel, edited = gain * original ** gamma + offset, fitted on the same inliers between the shift steps, and
inverted on the edit. Change: the colour difference of the aligned, corrected edit, less what a fraction of a pixel
of misregistration explains on edges, thresholded above its own noise level, cleaned of specks and holes on a
coarse grid, grown by a margin and feathered outward.
"""

import math
import warnings

import torch
import torch.nn.functional as F

from ..arguments import flag, tensor_argument
from ..errors import KleinError, KleinNote
from .references import pil_as_rgb

MAX_SHIFT = 16  # px: a larger global shift is refused with a note (composited unaligned), not followed
MAX_PIXELS = 100_000_000
MIN_SIDE = 16
WORK_SIDE = 512  # alignment starts at an area downscale to this long side
POINTS = 256 * 256  # sample points per Gauss-Newton step (a regular grid)
MARGIN = 1  # px grown around the found change: residual misalignment, interpolation
FLOOR, CEILING = 0.04, 0.15  # colour differences always / never below the threshold of a change, whatever the noise
NOISE_SIGMAS = 6  # threshold above the median difference, in robust sigmas of the unchanged area's noise
MIN_AREA = 0.001  # found changes smaller than this fraction of the image are noise
MIN_TRUSTED = 0.05  # a given mask must leave this fraction of the image to align and colour-match on
TILE = 128  # px of the tiles that phase correlation compares (at the downscale)
GRID = 128  # cells on the long side of the grid on which specks and holes are judged
TOLERANCE = 0.02  # residuals up to this always count as unchanged when fitting shift and colour
SLOPE = 0.2  # px: differences up to this times the local slope are misregistration, not change
LUMA = (0.299, 0.587, 0.114)


def as_image(image, name):
    """(H, W, 3) or (1, H, W, 3) float tensor -> (3, H, W) float32; every refusal names the argument."""
    if not isinstance(image, torch.Tensor):
        raise KleinError(f"{name} must be an image tensor (H, W, 3) or (1, H, W, 3), not {type(image).__name__}")
    tensor_argument(image, name)
    if image.ndim not in (3, 4) or image.shape[-1] != 3:
        raise KleinError(f"{name} must have shape (H, W, 3) or (1, H, W, 3) (an RGB ComfyUI IMAGE), got "
                         f"{tuple(image.shape)}: convert grey or RGBA images to RGB first")
    if image.ndim == 4 and image.shape[0] != 1:
        raise KleinError(f"{name} is a batch of {image.shape[0]} images; composite one at a time (split the batch)")
    height, width = image.shape[-3], image.shape[-2]
    if height * width == 0:
        raise KleinError(f"{name} is empty ({width}x{height})")
    if height * width > MAX_PIXELS:
        raise KleinError(f"{name} is {width}x{height} ({height * width / 1e6:.0f} MP); the limit is "
                         f"{MAX_PIXELS // 1_000_000} MP: downscale it first")
    if not image.is_floating_point():
        raise KleinError(f"{name} must hold floats in [0, 1], got {image.dtype}: divide 8-bit images by 255")
    image = image.detach().to(torch.float32).reshape(height, width, 3).permute(2, 0, 1).contiguous()
    if not torch.isfinite(image).all():
        raise KleinError(f"{name} contains NaN or infinite values")
    return image


def as_mask(mask, height, width, notes):
    """(H, W), (1, H, W) or (B=1, H, W) float or bool -> (H, W) float32 in [0, 1], resized if needed (noted)."""
    if not isinstance(mask, torch.Tensor):
        raise KleinError(f"mask must be a tensor (H, W) or (1, H, W) with 1 = take the edit, not {type(mask).__name__}")
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise KleinError(f"mask must have shape (H, W) or (1, H, W) (one mask), got {tuple(mask.shape)}")
    if mask.numel() == 0 or mask.numel() > MAX_PIXELS:
        raise KleinError(f"mask is {mask.shape[1]}x{mask.shape[0]}: give one of the original's size ({width}x{height})")
    if not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise KleinError(f"mask must hold floats in [0, 1] (or bools), got {mask.dtype}")
    mask = mask.detach().to(torch.float32)
    if not torch.isfinite(mask).all():
        raise KleinError("mask contains NaN or infinite values")
    if mask.shape != (height, width):
        notes.append(f"mask: resized {mask.shape[1]}x{mask.shape[0]} -> {width}x{height} (the original's size)")
        mask = F.interpolate(mask[None, None], size=(height, width), mode="bilinear", antialias=True)[0, 0]
    return mask.clamp(0, 1)


def grey(image):
    return torch.einsum("c...,c->...", image, image.new_tensor(LUMA))


def sample(image, xs, ys):
    """Bicubic samples of (C, H, W) at pixel coordinates -> (C, N); outside repeats the border."""
    height, width = image.shape[-2:]
    grid = torch.stack([xs * (2 / max(width - 1, 1)) - 1, ys * (2 / max(height - 1, 1)) - 1], -1)
    return F.grid_sample(image[None], grid[None, None], mode="bicubic", padding_mode="border",
                         align_corners=True)[0, :, 0]


def taper(n, device):
    """A window flat in the middle with cosine ends (Tukey), so the whole picture counts about equally."""
    ramp = max(1, n // 8)
    edge = 0.5 - 0.5 * torch.cos(torch.pi * (torch.arange(ramp, device=device) + 0.5) / ramp)
    return torch.cat([edge, torch.ones(n - 2 * ramp, device=device), edge.flip(0)]) if n > 2 * ramp else \
        torch.ones(n, device=device)


def phase_correlation(a, b):
    """The shift (dx, dy) of `b`'s content relative to `a`'s (two grey images), to a fraction of a pixel. Tiles are
    correlated apart and their surfaces' squares summed: a changed region then spoils only its own tiles, and one
    whose contrast is inverted peaks (negatively) at the same shift as the rest instead of cancelling it."""
    tile = min(TILE, *a.shape)
    rows, cols = max(1, a.shape[0] // tile), max(1, a.shape[1] // tile)
    top, left = (a.shape[0] - rows * tile) // 2, (a.shape[1] - cols * tile) // 2

    def tiles(x):
        x = x[top: top + rows * tile, left: left + cols * tile].reshape(rows, tile, cols, tile).transpose(1, 2)
        x = x - x.mean((-2, -1), keepdim=True)
        return torch.fft.rfft2(x * torch.outer(taper(tile, x.device), taper(tile, x.device)))

    cross = tiles(b) * tiles(a).conj()
    cross = cross / (cross.abs() + 1e-12)  # phases only: blind to gain, offset and most tone curves
    # taper the highest frequencies (noise, aliasing): the peak becomes a smooth blob that a parabola fits
    fy, fx = torch.fft.fftfreq(tile, device=a.device), torch.fft.rfftfreq(tile, device=a.device)
    cross = cross * torch.exp(-(fy[:, None] ** 2 + fx[None] ** 2) / (2 * 0.15 ** 2))
    surface = torch.fft.irfft2(cross, s=(tile, tile)).square().sum((0, 1))
    height, width = surface.shape
    py, px = divmod(int(surface.argmax()), width)

    def vertex(left, centre, right):
        curvature = left - 2 * centre + right
        return float(0.5 * (left - right) / curvature) if curvature < 0 else 0.0

    dy = vertex(surface[py - 1, px], surface[py, px], surface[(py + 1) % height, px])
    dx = vertex(surface[py, px - 1], surface[py, px], surface[py, (px + 1) % width])
    return (px - width if px > width // 2 else px) + dx, (py - height if py > height // 2 else py) + dy


def least_squares(p, e, weight):
    """gain, offset and the weighted squared error of e ≈ gain * p + offset, over the last axis."""
    w, sp, se = weight.sum(-1), (weight * p).sum(-1), (weight * e).sum(-1)
    spp, spe = (weight * p * p).sum(-1), (weight * p * e).sum(-1)
    det = w * spp - sp * sp
    gain = torch.where(det > 1e-9 * w * w, (w * spe - sp * se) / det.clamp_min(1e-30), 1.0).clamp(0.2, 5)
    offset = (se - gain * sp) / w.clamp_min(1)
    return gain, offset, (weight * (e - gain[..., None] * p - offset[..., None]) ** 2).sum(-1)


def fit_colour(original, edited, keep):
    """Per channel, edited = gain * original ** gamma + offset, by least squares on the `keep` samples ((3, N)
    each): gamma on a coarse and then a fine grid, gain and offset in closed form; refitted twice without the
    outliers of the last fit. Clipped edit values (0 or 1) say nothing and are left out. -> (3, 3): rows gain,
    offset, gamma."""
    index = keep.nonzero()[:, 0]
    if len(index) < 100:  # too little to go by: leave the colours alone
        return torch.tensor([[1.0] * 3, [0.0] * 3, [1.0] * 3], device=edited.device)
    index = index[:: max(1, len(index) // 8192)]
    log_o, e = original[:, index].clamp_min(1e-4).log(), edited[:, index]
    usable = (e > 0.5 / 255) & (e < 1 - 0.5 / 255)
    weight = usable.float()
    for _ in range(3):
        step = math.log(9) / 23
        log_gammas = torch.linspace(-math.log(3), math.log(3), 24, device=e.device)[:, None].expand(24, 3)
        for _ in range(4):  # a coarse grid of gammas, then three finer ones around the best
            gain, offset, error = least_squares(torch.exp(log_gammas.exp()[..., None] * log_o), e, weight)
            best = error.argmin(0)[None]
            params = torch.stack([gain.gather(0, best)[0], offset.gather(0, best)[0], log_gammas.gather(0, best)[0]])
            log_gammas = params[2] + torch.linspace(-step, step, 9, device=e.device)[:, None]
            step /= 4
        residual = (e - params[0, :, None] * torch.exp(params[2, :, None].exp() * log_o) - params[1, :, None]).abs()
        spread = 1.4826 * residual.masked_fill(~usable, float("nan")).nanmedian(-1).values
        weight = (usable & (residual <= (3 * spread).clamp_min(TOLERANCE)[:, None])).float()
    params[2] = params[2].exp()
    centred = e - (weight * e).sum(-1, keepdim=True) / weight.sum(-1, keepdim=True).clamp_min(1)
    explained = 1 - (weight * residual ** 2).sum(-1) / (weight * centred ** 2).sum(-1)
    if (weight.sum(-1) < 100).any() or (explained < 0.5).any():  # no tone curve relates the two: leave them alone
        return torch.tensor([[1.0] * 3, [0.0] * 3, [1.0] * 3], device=e.device)
    return params


def uncolour(edited, params):
    """The inverse of the fitted colour model: edited colours -> the original's."""
    gain, offset, gamma = (p.view(-1, *[1] * (edited.ndim - 1)) for p in params)
    return ((edited - offset) / gain).clamp(0, 1) ** (1 / gamma)


def refine(original, edited, shift, params, rounds, align, match_colors, keep=None, trusted=None):
    """Alternate colour fits and robust Gauss-Newton steps on the translation at one scale, on a grid of points
    (`keep`: those trusted so far; `trusted`: (H, W) bool, where the edit may be compared at all). -> (shift,
    params, keep)."""
    height, width = original.shape[-2:]
    stride = max(1, round(math.sqrt(height * width / POINTS)))
    ys, xs = torch.meshgrid(torch.arange(1, height - 1, stride, device=original.device),
                            torch.arange(1, width - 1, stride, device=original.device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    flat = grey(original)
    o, colours = flat[ys, xs], original[:, ys, xs]
    gx, gy = (flat[ys, xs + 1] - flat[ys, xs - 1]) / 2, (flat[ys + 1, xs] - flat[ys - 1, xs]) / 2
    dx, dy = shift
    usable = torch.ones_like(o, dtype=torch.bool) if trusted is None else trusted[ys, xs]
    keep = usable if keep is None else keep & usable
    for round_ in range(rounds + 1):
        inside = (xs + dx >= 0) & (xs + dx <= width - 1) & (ys + dy >= 0) & (ys + dy <= height - 1)
        samples = sample(edited, xs + dx, ys + dy)
        if match_colors:
            params = fit_colour(colours, samples, keep & inside)
        if round_ == rounds or not align:
            break
        for _ in range(8):
            residual = grey(uncolour(samples, params)) - o
            spread = 1.4826 * residual[inside & usable].abs().median() if (inside & usable).any() else torch.tensor(0.0)
            keep = inside & usable & (residual.abs() <= max(3 * float(spread), TOLERANCE))
            w = keep.float()
            hessian = torch.stack([(w * gx * gx).sum(), (w * gx * gy).sum(), (w * gx * gy).sum(), (w * gy * gy).sum()])
            if float(hessian[0] * hessian[3] - hessian[1] ** 2) <= 1e-12:
                break  # no texture to align on
            step = torch.linalg.solve(hessian.view(2, 2).double(), -torch.stack([(w * residual * gx).sum(),
                                                                                 (w * residual * gy).sum()]).double())
            dx, dy = dx + float(step[0]), dy + float(step[1])
            if abs(dx) > width / 4 or abs(dy) > height / 4:
                return (math.inf, math.inf), params, keep
            inside = (xs + dx >= 0) & (xs + dx <= width - 1) & (ys + dy >= 0) & (ys + dy <= height - 1)
            samples = sample(edited, xs + dx, ys + dy)
            if float(step.abs().max()) < 1e-3:
                break
    return (dx, dy), params, keep


def find_shift_and_colour(original, edited, align, match_colors, notes, trusted=None):
    """The edit's shift and colour model, judged where `trusted` ((H, W) bool, default everywhere). -> (shift,
    params). Phase correlation and alternating colour fits and
    shift steps run on an area downscale (at least 2x: the colour fit wants averaged pixels, as noise in the
    original would flatten the fitted curve), a last few shift steps at full size, a last colour fit at the end."""
    factor = max(2, math.ceil(max(original.shape[-2:]) / WORK_SIDE))
    small = [F.avg_pool2d(x[None], factor)[0] for x in (original, edited)]
    small_trusted = None if trusted is None else F.avg_pool2d(trusted.float()[None], factor)[0] == 1
    shift, params = (0.0, 0.0), torch.tensor([[1.0] * 3, [0.0] * 3, [1.0] * 3], device=original.device)
    keep = None
    if align:
        dx, dy = phase_correlation(grey(small[0]), grey(small[1]))
        shift = (dx * factor, dy * factor)
        if max(abs(dx), abs(dy)) * factor <= MAX_SHIFT + 1:
            (dx, dy), params, keep = refine(*small, (dx, dy), params, 2, True, match_colors, trusted=small_trusted)
            shift, _, _ = refine(original, edited, (dx * factor, dy * factor), params, 1, True, False, trusted=trusted)
        if not max(abs(shift[0]), abs(shift[1])) <= MAX_SHIFT:
            found = f"seems moved by ({shift[0]:.0f}, {shift[1]:.0f}) px, more than the {MAX_SHIFT} px that " \
                "alignment follows," if math.isfinite(shift[0]) else "could not be aligned:"
            notes.append(f"the edit {found} or has little in common with the original; composited unaligned (pass "
                         "align=False, and a mask, if that is intended)")
            shift, keep = (0.0, 0.0), None
    if match_colors:
        _, params, _ = refine(*small, (shift[0] / factor, shift[1] / factor), params, 0, False, True, keep,
                              small_trusted)
        if torch.equal(params, params.new_tensor([[1.0] * 3, [0.0] * 3, [1.0] * 3])):  # what fit_colour gives up with
            notes.append("colours not matched: no tone curve was found that relates the edit to the original")
    return shift, params


def translate(image, dx, dy):
    """(C, H, W) resampled so that its content moves by (-dx, -dy): bicubic, the border repeated."""
    if dx == 0 and dy == 0:
        return image
    height, width = image.shape[-2:]
    xs = torch.arange(width, device=image.device, dtype=torch.float32) + dx
    ys = torch.arange(height, device=image.device, dtype=torch.float32) + dy
    grid = torch.stack(torch.broadcast_tensors(xs[None] * (2 / max(width - 1, 1)) - 1,
                                               ys[:, None] * (2 / max(height - 1, 1)) - 1), -1)
    return F.grid_sample(image[None], grid[None], mode="bicubic", padding_mode="border", align_corners=True)[0]


def box_sum(x, radius, fill=0):
    """Sums over (2r+1)² windows, same size, outside the image counting as `fill`: cumulative sums, so the cost
    does not grow with the radius. Integer inputs give exact counts."""
    for _ in range(2):
        total = F.pad(x, (radius + 1, radius), value=fill).cumsum(-1, dtype=x.dtype)
        x = (total[..., 2 * radius + 1:] - total[..., : -2 * radius - 1]).mT.contiguous()
    return x


def dilate(x, radius):
    return box_sum(x.to(torch.int32), radius) > 0 if radius > 0 else x


def grow(x):
    """One step of 8-connected dilation of a boolean image."""
    y = x.clone()
    y[1:] |= x[:-1]
    y[:-1] |= x[1:]
    z = y.clone()
    z[:, 1:] |= y[:, :-1]
    z[:, :-1] |= y[:, 1:]
    return z


def components(on):
    """8-connected components of a small boolean grid: each labelled with its largest flat index, -1 when off.
    Max-propagation with pointer jumping (a label is a cell index: read that cell's label), so even long, winding
    components take a few dozen steps."""
    height, width = on.shape
    index = torch.arange(height * width, device=on.device, dtype=torch.float32).view(height, width)
    labels = torch.where(on, index, -1.0)
    while True:
        grown = torch.where(on, F.max_pool2d(labels[None, None], 3, 1, 1)[0, 0], -1.0)
        for _ in range(2):
            grown = torch.where(on, grown.flatten()[grown.long().clamp_min(0)].view(height, width), -1.0)
        if torch.equal(grown, labels):
            return labels.long()
        labels = grown


def clean(changed, min_area):
    """Drop found changes smaller than `min_area` pixels and fill holes, judged on a coarse grid of cells (a cell
    is on when any of its pixels is), then made exact at full size by growing the outside pixel by pixel."""
    height, width = changed.shape
    cell = max(1, math.ceil(max(height, width) / GRID))
    rows, cols = math.ceil(height / cell), math.ceil(width / cell)

    def cells(x):
        padded = F.pad(x.to(torch.int32), (0, cols * cell - width, 0, rows * cell - height))
        return padded.view(rows, cell, cols, cell).sum((1, 3))

    def full(x):
        return x.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[:height, :width]

    counts = cells(changed)
    labels = components(counts > 0)
    area = torch.zeros(rows * cols, device=changed.device, dtype=torch.int64).index_add_(
        0, labels.flatten().clamp_min(0), counts.flatten().long())
    changed = changed & full((counts > 0) & (area[labels.clamp_min(0)] >= min_area))
    occupied = cells(changed) > 0
    labels = components(~occupied)
    border = torch.cat([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    outside = full(~occupied & torch.isin(labels, border[border >= 0])) & ~changed
    for _ in range(cell):
        outside = grow(outside) & ~changed
    return ~outside


def find_change(original, corrected, aligned, valid, params, feather):
    """The found change as a feathered mask (H, W) and the difference threshold used."""
    difference = (original - corrected).abs()
    if params is not None:  # an edit value clipped at 0 or 1 where the original maps there too is no change
        low, high = uncolour(torch.tensor([0.0, 1.0], device=original.device).expand(3, 2), params).unbind(-1)
        difference = difference.masked_fill(((aligned >= 1 - 0.5 / 255) & (original >= high[:, None, None] - 1 / 255))
                                            | ((aligned <= 0.5 / 255) & (original <= low[:, None, None] + 1 / 255)), 0)
    # an edge moved by a fraction of a pixel, or resampled, differs in proportion to its slope: not a change
    slope = F.pad((original[:, :, 2:] - original[:, :, :-2]).abs(), (1, 1)).amax(0) + \
        F.pad((original[:, 2:] - original[:, :-2]).abs(), (0, 0, 1, 1)).amax(0)
    difference = box_sum((difference.amax(0) - SLOPE * slope).clamp_min(0), 1) / 9
    step = max(1, round(math.sqrt(valid.sum().item() / POINTS)))
    values = difference[::step, ::step][valid[::step, ::step]]
    if values.numel() == 0:
        return torch.zeros_like(difference), FLOOR
    middle = values.median()
    threshold = min(max(FLOOR, float(middle + NOISE_SIGMAS * 1.4826 * (values - middle).abs().median())), CEILING)
    changed = (difference > threshold) & valid
    if not changed.any():
        return torch.zeros_like(difference), threshold
    region = dilate(clean(changed, MIN_AREA * changed.numel()), MARGIN)
    if feather > 0:
        inner = feather // 2
        counts = box_sum(dilate(region, feather - inner).to(torch.int32), inner)
        region = torch.where(region, 1.0, counts / float((2 * inner + 1) ** 2))
    return region.float() * valid, threshold


def composite_edit(original: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor | None = None, align: bool = True,
                   match_colors: bool = True, feather: float = 8) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The original with the edit put in: (image in the original's layout, mask (H, W) with 1 = from the edit,
    info). info: shift (dx, dy) of the edit's content found and undone (px, +x = right); changed (fraction taken
    from the edit); colour ({gain, offset, gamma} per RGB channel of the fitted edited = gain * original ** gamma +
    offset, whose inverse was applied to the edit; None without match_colors); mask ("given" or "found");
    threshold (the colour difference counted as a change, found masks); notes. Where the mask is 0 the result is
    the original, bit for bit; a given mask is used as it is (soft values kept, no feather). PIL images are taken
    too (the result is then (H, W, 3))."""
    original, edited = pil_as_rgb(original), pil_as_rgb(edited)
    align, match_colors = flag(align, "align"), flag(match_colors, "match_colors")
    if isinstance(feather, bool) or not isinstance(feather, (int, float)) or not 0 <= feather < math.inf:
        raise KleinError(f"feather must be a number of pixels >= 0, got {feather!r}")
    image = as_image(original, "original")
    height, width = image.shape[-2:]
    if min(height, width) < MIN_SIDE:
        raise KleinError(f"original is {width}x{height}; compositing needs at least {MIN_SIDE} px on each side")
    other = as_image(edited, "edited").to(image.device)
    notes = []
    if other.shape != image.shape:
        notes.append(f"edited image: resized {other.shape[-1]}x{other.shape[-2]} -> {width}x{height} (the original's "
                     "size, bicubic) before aligning")
        other = F.interpolate(other[None], size=(height, width), mode="bicubic", antialias=True)[0].clamp(0, 1)
    given = None if mask is None else as_mask(mask, height, width, notes).to(image.device)
    trusted = None if given is None else given == 0  # a given mask: judge the edit where it is to be left out
    if given is not None and not given.any():
        notes.append("the mask is empty: nothing is taken from the edit, the result is the original")
    elif trusted is not None and float(trusted.float().mean()) < MIN_TRUSTED and (align or match_colors):
        notes.append(f"the mask leaves under {MIN_TRUSTED:.0%} of the image to compare the edit with: it is taken "
                     "as it is, neither aligned nor colour-matched")
        align = match_colors = False
    if align or match_colors:
        (dx, dy), params = find_shift_and_colour(image, other, align, match_colors, notes, trusted)
    else:
        (dx, dy), params = (0.0, 0.0), None
    aligned = translate(other, dx, dy)
    corrected = uncolour(aligned, params) if match_colors else aligned
    threshold = None
    if given is None:
        xs, ys = torch.arange(width, device=image.device) + dx, torch.arange(height, device=image.device) + dy
        valid = ((ys >= 0) & (ys <= height - 1))[:, None] & ((xs >= 0) & (xs <= width - 1))[None]
        given, threshold = find_change(image, corrected, aligned, valid, params if match_colors else None,
                                       min(round(feather), max(height, width)))
    result = torch.where(given > 0, torch.lerp(image, corrected, given), image)
    for note in notes:
        warnings.warn(note, KleinNote, stacklevel=2)
    colour = None if not match_colors else {name: [round(float(v), 4) for v in values]
                                            for name, values in zip(("gain", "offset", "gamma"), params)}
    info = {"shift": (dx, dy), "changed": float(given.mean()), "colour": colour,
            "mask": "found" if threshold is not None else "given", "threshold": threshold, "notes": notes}
    return result.permute(1, 2, 0).reshape(original.shape).to(torch.float32), given, info


def describe(info: dict) -> str:
    """One line for people: the shift undone, the colour correction, the share of the image taken from the edit."""
    dx, dy = (round(v, 2) + 0.0 for v in info["shift"])
    colour = info.get("colour")
    if colour:
        gain, offset, gamma = ("/".join(format(round(v, 2) + 0.0, form) for v in colour[key])  # no "-0.00"
                               for key, form in (("gain", ".2f"), ("offset", "+.2f"), ("gamma", ".2f")))
        colour = f"colour: gain {gain}, offset {offset}, gamma {gamma}"
    else:
        colour = "colours as they are"
    return f"shift ({dx:+.2f}, {dy:+.2f}) px undone; {colour}; {info['changed']:.1%} changed ({info['mask']} mask)"
