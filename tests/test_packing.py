"""Token packing and position ids vs diffusers' klein pipeline helpers; reference preprocessing; previews."""

import numpy as np
import pytest
import torch
from PIL import Image

from klein_nodes.errors import KleinError
from klein_nodes.sampling.packing import image_ids, pack, pack_references, text_ids, unpack
from klein_nodes.sampling.preview import LATENT_RGB_BIAS, LATENT_RGB_FACTORS, latent_preview
from klein_nodes.sampling.references import prepare_references

diffusers = pytest.importorskip("diffusers")
Pipeline = diffusers.Flux2KleinPipeline


def test_image_tokens_and_ids_match_diffusers():
    latents = torch.randn(2, 128, 5, 7)
    assert torch.equal(pack(latents), Pipeline._pack_latents(latents))
    assert torch.equal(image_ids(5, 7).expand(2, -1, -1), Pipeline._prepare_latent_ids(latents))
    ids = Pipeline._prepare_latent_ids(latents)
    assert torch.equal(unpack(pack(latents), 5, 7), Pipeline._unpack_latents_with_ids(pack(latents), ids))
    assert torch.equal(unpack(pack(latents), 5, 7), latents)


def test_text_ids_match_diffusers():
    assert torch.equal(text_ids(9)[None], Pipeline._prepare_text_ids(torch.zeros(1, 9, 4)))


@pytest.mark.parametrize("sizes", [[(4, 4)], [(4, 6), (3, 5)], [(2, 2), (6, 3), (4, 4)],
                                   [(3, 4), (5, 5), (2, 7), (6, 2)]])
def test_reference_tokens_and_ids_match_diffusers(sizes):
    latents = [torch.randn(1, 128, h, w) for h, w in sizes]
    tokens, ids = pack_references(latents)
    expected_ids = Pipeline._prepare_image_ids(latents)
    expected_tokens = torch.cat([Pipeline._pack_latents(latent) for latent in latents], dim=1)
    assert torch.equal(ids[None], expected_ids)
    assert torch.equal(tokens, expected_tokens)
    assert ids[:, 0].unique().tolist() == [10 * (k + 1) for k in range(len(sizes))]


def test_comfyui_image_batch_becomes_references():
    batch = torch.rand(2, 96, 128, 3)
    prepared, notes = prepare_references(batch)
    assert [tuple(p.shape) for p in prepared] == [(1, 3, 96, 128)] * 2 and notes == []
    assert torch.allclose(prepared[1][0], batch[1].permute(2, 0, 1) * 2 - 1)


def test_large_reference_is_resized_and_cropped_with_notes():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 2000, 3), dtype=np.uint8))
    with pytest.warns(UserWarning) as caught:
        (prepared,), notes = prepare_references(image)
    assert [str(w.message) for w in caught] == notes and "resized 2000x1500" in notes[0]
    # diffusers' rule: scale to the 1 MP area, floor, then centre-crop to multiples of 16
    scale = (1024 * 1024 / (2000 * 1500)) ** 0.5
    width, height = int(2000 * scale), int(1500 * scale)
    assert prepared.shape == (1, 3, height // 16 * 16, width // 16 * 16)
    assert len(notes) == 2 and "centre-cropped" in notes[1]


def test_odd_size_is_cropped_not_resized():
    with pytest.warns(UserWarning, match="centre-cropped 100x90 -> 96x80"):
        (prepared,), notes = prepare_references(torch.rand(90, 100, 3))
    assert prepared.shape == (1, 3, 80, 96) and len(notes) == 1


def test_configurable_area_cap():
    with pytest.warns(UserWarning, match="resized 512x512 -> 256x256"):
        (prepared,), notes = prepare_references(torch.rand(1, 512, 512, 3), max_pixels=256 * 256)
    assert prepared.shape == (1, 3, 256, 256) and "cap 0.07 MP" in notes[0]


def test_transparency_is_composited_on_white():
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[:, :32] = (255, 0, 0, 255)  # opaque red left half, transparent black right half
    (prepared,), _ = prepare_references(Image.fromarray(rgba, "RGBA"))
    assert torch.allclose(prepared[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.allclose(prepared[0, :, 0, 63], torch.tensor([1.0, 1.0, 1.0]))


def test_grayscale_sixteen_bit_and_palette_inputs():
    gray = Image.fromarray(np.full((64, 64), 128, dtype=np.uint8), "L")
    deep = Image.fromarray(np.full((64, 64), 65535 // 4, dtype=np.uint16))
    assert deep.mode.startswith("I;16")
    palette = Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    prepared, _ = prepare_references([gray, deep, palette])
    assert all(p.shape == (1, 3, 64, 64) for p in prepared)
    assert torch.allclose(prepared[0], torch.full((1, 3, 64, 64), 128 / 255 * 2 - 1), atol=1e-6)
    assert torch.allclose(prepared[1], torch.full((1, 3, 64, 64), (65535 // 4) / 65535 * 2 - 1), atol=1e-6)
    assert torch.allclose(prepared[2], torch.full((1, 3, 64, 64), 200 / 255 * 2 - 1), atol=1e-6)


def test_many_references_warn_about_memory():
    with pytest.warns(UserWarning, match="more than 4 is allowed"):
        prepared, notes = prepare_references([torch.rand(64, 64, 3) for _ in range(5)])
    assert len(prepared) == 5 and "attention memory" in notes[-1]


@pytest.mark.parametrize("shape,message", [((32, 128, 3), "at least 64"), ((64, 1024, 3), "more than 8:1"),
                                           ((2, 3, 4, 5, 6), "2-4 dimensions"), ((64, 64, 5), "1-4 channels")])
def test_bad_references_are_refused(shape, message):
    with pytest.raises(KleinError, match=message):
        prepare_references(torch.rand(*shape))


def test_latent_preview_uses_comfyui_factors():
    latents = torch.randn(1, 128, 3, 4)
    preview = latent_preview(latents)
    assert preview.shape == (1, 6, 8, 3)
    # channel c of the 32-channel latent sits at (row 2y+i, col 2x+j) = packed channel 4c + 2i + j
    y, x, i, j = 1, 2, 1, 0
    channels = latents[0, [4 * c + 2 * i + j for c in range(32)], y, x]
    rgb = channels @ torch.tensor(LATENT_RGB_FACTORS) + torch.tensor(LATENT_RGB_BIAS)
    assert torch.allclose(preview[0, 2 * y + i, 2 * x + j], ((rgb + 1) / 2).clamp(0, 1), atol=1e-6)
