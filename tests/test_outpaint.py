"""Outpainting canvases: exact sizes, placement and masks for every side and aspect preset; fills; bad input."""

import warnings

import klein_nodes as kn
import pytest
import torch
from klein_nodes.sampling.outpaint import FILLS
from klein_nodes.sampling.schedule import ASPECT_RATIOS


def image(height=100, width=150, batch=None):
    generator = torch.Generator().manual_seed(height * width)
    shape = (height, width, 3) if batch is None else (batch, height, width, 3)
    return torch.rand(shape, generator=generator)


def placed(canvas, source):
    """(top, left) where `source` sits in `canvas`, found by exact comparison."""
    height, width = source.shape[:2]
    for top in range(canvas.shape[0] - height + 1):
        for left in range(canvas.shape[1] - width + 1):
            if torch.equal(canvas[top: top + height, left: left + width], source):
                return top, left
    raise AssertionError("the image is not in the canvas bit for bit")


@pytest.mark.parametrize("pads", [(32, 0, 0, 0), (0, 48, 0, 0), (0, 0, 64, 0), (0, 0, 0, 16), (16, 32, 48, 64),
                                  (5, 0, 7, 0)])
def test_canvas_size_placement_and_mask_for_every_side(pads):
    left, top, right, bottom = pads
    source = image(96, 128)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        canvas, mask = kn.outpaint_canvas(source, left, top, right, bottom, feather=8)
    height, width = canvas.shape[:2]
    assert height % 16 == 0 and width % 16 == 0
    extra_w = -(128 + left + right) % 16
    assert width == 128 + left + right + extra_w and height == 96 + top + bottom  # 96 is already a multiple of 16
    assert bool(caught) == bool(extra_w)
    y, x = placed(canvas, source)
    grown_left = left + (extra_w // 2 if left and right else extra_w if left else 0)
    assert (y, x) == (top, grown_left)
    new = torch.ones(height, width, dtype=torch.bool)
    new[y: y + 96, x: x + 128] = False
    assert torch.equal(mask[new], torch.ones(int(new.sum())))
    inner = torch.zeros(height, width, dtype=torch.bool)  # beyond the 8-pixel band from every grown side
    inner[y + (8 if top else 0): y + 96 - (8 if bottom else 0), x + (8 if grown_left else 0):
          x + 128 - (8 if width - x - 128 else 0)] = True
    assert torch.equal(mask[inner], torch.zeros(int(inner.sum())))
    band = ~new & ~inner
    assert ((mask[band] > 0) & (mask[band] < 1)).all()


def test_band_ramps_down_into_the_image():
    _, mask = kn.outpaint_canvas(image(64, 64), left=32, feather=7)
    assert torch.allclose(mask[0, 32:41], torch.tensor([7, 6, 5, 4, 3, 2, 1, 0, 0]) / 8)
    _, sharp = kn.outpaint_canvas(image(64, 64), left=32, feather=0)
    assert torch.equal(sharp[0, 30:34], torch.tensor([1.0, 1.0, 0.0, 0.0]))


@pytest.mark.parametrize("aspect", ASPECT_RATIOS)
def test_every_aspect_preset_grows_the_short_side_evenly(aspect):
    source = image(512, 512) if aspect != "1:1" else image(384, 512)
    canvas, mask = kn.outpaint_canvas(source, aspect=aspect)
    height, width = canvas.shape[:2]
    a, b = (int(v) for v in aspect.split(":"))
    assert height % 16 == 0 and width % 16 == 0 and height >= source.shape[0] and width >= source.shape[1]
    assert abs(width / height - a / b) <= 16 / min(width, height)  # within one 16-pixel step of the aspect
    top, left = placed(canvas, source)
    assert abs(top - (height - source.shape[0] - top)) <= 16 and abs(left - (width - source.shape[1] - left)) <= 16
    assert mask.shape == (height, width) and mask.max() == 1


def test_batches_keep_layout_and_fills_differ():
    batch = image(64, 64, batch=2)
    canvas, _ = kn.outpaint_canvas(batch, right=64)
    assert canvas.shape == (2, 64, 128, 3) and torch.equal(canvas[:, :, :64], batch)
    fills = {fill: kn.outpaint_canvas(batch[0], right=64, fill=fill)[0][:, 64:] for fill in FILLS}
    assert torch.equal(fills["mean"], batch[0].mean((0, 1)).expand(64, 64, 3))
    border = batch[0][:, -1]  # the edge fill continues the last column; it is smooth, not the streaks of replication
    assert (fills["edge"][:, 0] - border).abs().mean() < (fills["mean"][:, 0] - border).abs().mean()
    assert fills["edge"][:, -1].diff(dim=0).abs().mean() < border.diff(dim=0).abs().mean() / 2
    assert not torch.equal(fills["noise"], kn.outpaint_canvas(batch[0], right=64, fill="noise", seed=1)[0][:, 64:])
    assert 0 <= fills["noise"].min() and fills["noise"].max() <= 1


@pytest.mark.parametrize("kwargs, message", [
    ({"left": -16}, "left must be a whole number of pixels from 0"),
    ({}, "nothing to extend"),
    ({"right": 16.5}, "right must be a whole number"),
    ({"right": 16, "fill": "lama"}, "fill='lama': choose one of 'edge', 'mean', 'noise'"),
    ({"right": 16, "feather": -1}, "feather=-1: must be from 0 to 512"),
    ({"aspect": "1:1"}, "already 1:1"),
    ({"aspect": "7:3"}, "unknown aspect '7:3'"),
    ({"right": 8192, "bottom": 8192}, "klein samples up to 4 MP"),
])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(kn.KleinError, match=message):
        kn.outpaint_canvas(image(64, 64), **kwargs)


@pytest.mark.parametrize("bad, message", [(None, "got NoneType"), (torch.rand(64, 64), r"got \(64, 64\)"),
                                          (torch.rand(1, 8, 64, 3), "at least 16 pixels"),
                                          (torch.full((1, 64, 64, 3), float("nan")), "NaN")])
def test_bad_images_are_named(bad, message):
    with pytest.raises(kn.KleinError, match=message):
        kn.outpaint_canvas(bad, right=16)
