"""composite_edit: an edit put back into its original, with the edit's shift and colour drift undone and only the
change taken from it.

Test data: the truth is a natural photo with a local change pasted in (an irregular blob of another photo, or of
the photo inverted, with a soft edge); the edit is the truth moved by a known sub-pixel shift (scipy's order-5
spline on a larger crop: no border or wraparound enters, and the method is not the bicubic the undo uses), put
through a per-channel gain, offset and gamma and rounded to 8 bits, as a saved edit would be.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from klein_nodes import KleinError, KleinNote
from klein_nodes.sampling.composite import composite_edit
from helpers import EDIT_COLOURS, EDIT_SHIFTS, PHOTOS, edit_case, edit_colours, edit_scores, natural_photo

ndimage = pytest.importorskip("scipy.ndimage")

FEATHER = 8



# mask > 0.5 reaches ~6 px beyond the change (half the feather, the margin, the smoothing): at 512² a 5 % blob
# is too small for IoU 0.8 by geometry alone (IoU ~0.80), so 5 % is tested at 1024² and these start at 8 %
FRACTIONS = [0.08, 0.3, 0.12, 0.2, 0.1, 0.25, 0.15]


@pytest.mark.parametrize("index", range(len(PHOTOS)), ids=PHOTOS)
def test_shift_colour_and_change_are_found(index):
    name, shift, fraction = PHOTOS[index], EDIT_SHIFTS[index], FRACTIONS[index]
    original, edited, truth, change = edit_case(name, 512, shift, fraction, ("paste", "invert")[index % 2],
                                                edit_colours(index), seed=index)
    result, mask, info = composite_edit(original, edited)
    error, iou, psnr, exact = edit_scores(result, mask, info, original, truth, change, shift)
    assert max(error) <= 0.25, (info["shift"], shift)
    assert exact, "pixels far from the change differ from the original"
    assert iou >= 0.8, iou
    assert psnr >= 30, psnr
    assert result.shape == original.shape and result.dtype == torch.float32 and mask.shape == (512, 512)
    assert info["mask"] == "found" and info["notes"] == [] and info["changed"] == pytest.approx(float(mask.mean()))
    assert float(mask.min()) >= 0 and float(mask.max()) == 1
    assert set(info["colour"]) == {"gain", "offset", "gamma"}


def test_a_small_change_in_a_large_picture():
    """5 % of a 1024² picture, in ComfyUI's (1, H, W, 3) layout."""
    original, edited, truth, change = edit_case("astronaut", 1024, (2.37, -4.61), 0.05, "paste", seed=7)
    result, mask, info = composite_edit(original[None], edited[None])
    assert result.shape == (1, 1024, 1024, 3)
    error, iou, psnr, exact = edit_scores(result[0], mask, info, original, truth, change, (2.37, -4.61))
    assert max(error) <= 0.25 and exact and iou >= 0.8 and psnr >= 30, (error, exact, iou, psnr)
    for channel, (gain, offset, gamma) in enumerate(zip(*EDIT_COLOURS.values())):  # the fitted model is the true one
        assert info["colour"]["gain"][channel] == pytest.approx(gain, abs=0.02)
        assert info["colour"]["offset"][channel] == pytest.approx(offset, abs=0.02)
        assert info["colour"]["gamma"][channel] == pytest.approx(gamma, abs=0.03)


def test_a_given_mask_is_used_as_it_is_and_the_rest_aligns_the_edit():
    original, edited, truth, change = edit_case("chelsea", 256, (1.5, -2.25), 0.2, seed=3)
    soft = torch.from_numpy(ndimage.gaussian_filter(change.astype(np.float32), 4))
    soft[soft < 0.05] = 0
    soft[soft > 0.95] = 1
    result, mask, info = composite_edit(original, edited, mask=soft[None])
    assert info["mask"] == "given" and torch.equal(mask, soft)  # soft values kept, nothing feathered or grown
    assert info["shift"] == pytest.approx((1.5, -2.25), abs=0.25)  # judged outside the mask
    assert torch.equal(result[soft == 0], original[soft == 0])
    inner = torch.from_numpy(ndimage.binary_erosion(change, iterations=3))
    assert 10 * math.log10(1 / float(((result[inner] - truth[inner]) ** 2).mean())) >= 30
    with pytest.warns(KleinNote, match="neither aligned nor colour-matched"):
        everything, _, info = composite_edit(original, edited, mask=torch.ones(256, 256))
    assert torch.equal(everything, edited) and info["shift"] == (0.0, 0.0) and info["colour"] is None
    with pytest.warns(KleinNote, match="the mask is empty"):
        nothing, _, info = composite_edit(original, edited, mask=torch.zeros(256, 256))
    assert torch.equal(nothing, original) and info["changed"] == 0


def test_align_and_match_colors_can_be_switched_off():
    original, edited, _, _ = edit_case("coffee", 256, (3.2, -1.7), 0.0, "none", seed=4)
    _, _, info = composite_edit(original, edited, align=False)
    assert info["shift"] == (0.0, 0.0) and info["colour"] is not None
    _, _, info = composite_edit(original, edited, match_colors=False)
    assert info["colour"] is None and info["shift"] == pytest.approx((3.2, -1.7), abs=0.25)
    result, _, info = composite_edit(original, edited, mask=torch.ones(256, 256), align=False, match_colors=False)
    assert torch.equal(result, edited) and info["shift"] == (0.0, 0.0) and info["colour"] is None


def test_an_edit_of_another_size_is_resized_with_a_note():
    original = torch.from_numpy(natural_photo("rocket", 256).astype(np.float32) / 255)
    larger = torch.nn.functional.interpolate(original.permute(2, 0, 1)[None], size=(320, 300), mode="bicubic")
    with pytest.warns(KleinNote, match="resized 300x320 -> 256x256"):
        result, mask, info = composite_edit(original, larger[0].permute(1, 2, 0).clamp(0, 1))
    assert any("resized 300x320 -> 256x256" in note for note in info["notes"])
    assert result.shape == original.shape and mask.shape == (256, 256)
    assert max(map(abs, info["shift"])) < 0.25 and info["changed"] < 0.01


@pytest.mark.parametrize("batched", [False, True])
def test_an_identical_pair_changes_nothing(batched):
    original = torch.from_numpy(natural_photo("motorcycle", 256).astype(np.float32) / 255)
    original = original[None] if batched else original
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and says nothing
        result, mask, info = composite_edit(original, original.clone())
    assert torch.equal(result, original) and result.shape == original.shape
    assert max(map(abs, info["shift"])) < 0.01 and info["changed"] == 0 and not mask.any()


def test_a_colour_change_alone_is_no_change():
    original, edited, _, _ = edit_case("retina", 512, (0.0, 0.0), 0.0, "none", edit_colours(5))
    result, mask, info = composite_edit(original, edited)
    assert info["changed"] < 0.001 and torch.equal(result[mask == 0], original[mask == 0])


def test_a_shift_beyond_the_range_is_refused_with_a_note():
    original, edited, _, _ = edit_case("astronaut", 256, (20.0, 0.0), 0.0, "none")
    with pytest.warns(KleinNote) as caught:
        _, _, info = composite_edit(original, edited)
    assert info["shift"] == (0.0, 0.0) and [str(w.message) for w in caught] == info["notes"]
    assert "moved by (20, 0) px, more than the 16 px" in info["notes"][0]


IMAGE = torch.rand(32, 32, 3)
NAN = IMAGE.clone()
NAN[3, 4, 1] = float("nan")
BAD = {
    "not a tensor": ({"original": IMAGE.numpy()}, "original must be an image tensor"),
    "grey": ({"original": IMAGE[..., 0]}, r"original must have shape \(H, W, 3\).*got \(32, 32\)"),
    "RGBA": ({"edited": torch.rand(32, 32, 4)}, r"edited must have shape .*got \(32, 32, 4\)"),
    "batch": ({"edited": torch.rand(2, 32, 32, 3)}, "edited is a batch of 2 images"),
    "NaN": ({"edited": NAN}, "edited contains NaN"),
    "integers": ({"original": (IMAGE * 255).to(torch.uint8)}, "original must hold floats in .* divide 8-bit"),
    "empty": ({"edited": torch.rand(0, 32, 3)}, r"edited is empty \(32x0\)"),
    "too small": ({"original": torch.rand(12, 40, 3)}, "original is 40x12; compositing needs at least 16 px"),
    "too large": ({"original": torch.zeros(1, 1, 3).expand(10_001, 10_001, 3)}, "10001x10001 .*the limit is 100 MP"),
    "feather": ({"feather": -1}, "feather must be a number of pixels >= 0, got -1"),
    "mask batch": ({"mask": torch.ones(2, 32, 32)}, r"mask must have shape \(H, W\) or \(1, H, W\).*\(2, 32, 32\)"),
    "mask type": ({"mask": [[1.0]]}, "mask must be a tensor"),
    "mask NaN": ({"mask": NAN[..., 1]}, "mask contains NaN"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_by_name(case):
    arguments, message = BAD[case]
    with pytest.raises(KleinError, match=message) as caught:
        composite_edit(**{"original": IMAGE, "edited": IMAGE, **arguments})
    assert caught.value.__cause__ is None and caught.value.__context__ is None  # ours, not a torch error's
