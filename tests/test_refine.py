"""Tiled refine: the blend is exact where tiles agree and convex where they differ, runs are reproducible, progress
and cancelling work per tile, and bad requests are refused before any work."""

import klein_nodes as kn
import pytest
import torch
from klein_nodes.loaders.tokenizer import find_tokenizer
from klein_nodes.sampling.refine import lanczos, starts
from klein_nodes.testing import write_tiny_model_set


class PerTile:
    """A stand-in pipeline: each tile through `fn(tile, index)`; records the calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, image, width, height, seed, **kwargs):
        assert image.shape == (height, width, 3) and height % 16 == 0 and width % 16 == 0
        self.calls.append(seed)
        return self.fn(image, len(self.calls) - 1)[None]

    def encode_prompt(self, prompts):
        return torch.zeros(1, 4, 8)


def photo(height, width):
    return torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(height + width))


def test_unchanged_tiles_give_back_the_input_bit_for_bit():
    source = photo(700, 900)
    identity = PerTile(lambda tile, _: tile.clone())
    assert torch.equal(kn.tiled_refine(identity, source, "x", scale=1, tile=256, overlap=64), source)
    assert len(identity.calls) == len(starts(700, 256, 64)) * len(starts(900, 256, 64)) == 20
    enlarged = kn.tiled_refine(PerTile(lambda tile, _: tile.clone()), source, "x", scale=2, tile=512, overlap=128)
    assert torch.equal(enlarged[0], lanczos(source[0], 1800, 1400))


def test_overlaps_blend_as_convex_ramps_and_owned_areas_stay_exact():
    refined = kn.tiled_refine(PerTile(lambda tile, k: torch.full_like(tile, float(k))), photo(256, 512), "x", scale=1,
                              tile=256, overlap=64)[0, 0, :, 0]
    assert starts(512, 256, 64) == [0, 128, 256]
    assert torch.equal(refined[:128], torch.zeros(128)) and torch.equal(refined[384:], torch.full((128,), 2.0))
    band = refined[128:384]  # tiles 0 and 1 share 128..255, tiles 1 and 2 share 256..383
    assert (band.diff() > 0).all() and 0 < band[0] < band[-1] < 2
    assert 0 < band[127] < 1 < band[128] < 2  # the ramps meet at tile 1's value where it owns no pixel alone


def test_progress_per_tile_and_cancel_between_tiles():
    seen = []
    pipe = PerTile(lambda tile, _: tile)
    kn.tiled_refine(pipe, photo(128, 128), "x", scale=3, tile=256, overlap=64, seed=7,
                    progress=lambda done, total: seen.append((done, total)))
    assert seen == [(k, 4) for k in (1, 2, 3, 4)] and pipe.calls == [7, 8, 9, 10]  # a seed per tile

    def stop(done, total):
        if done == 2:
            raise kn.Cancelled("stopped")
    pipe = PerTile(lambda tile, _: tile)
    with pytest.raises(kn.Cancelled):
        kn.tiled_refine(pipe, photo(128, 128), "x", scale=3, tile=256, overlap=64, progress=stop)
    assert len(pipe.calls) == 2


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    transformer, text_encoder, vae = write_tiny_model_set(folder)
    tokenizer = find_tokenizer(text_encoder, folder / "comfy" / "text_encoders" / "qwen25_tokenizer")
    return kn.KleinPipeline(kn.load_transformer(transformer), kn.load_text_encoder(text_encoder, tokenizer=tokenizer),
                            kn.load_vae(vae))


def test_real_pipeline_same_seed_same_bytes_and_img2img_per_tile(pipeline):
    source = photo(160, 192)
    first = kn.tiled_refine(pipeline, source, "a red fox", scale=2, tile=256, overlap=64, denoise=0.3, seed=3)
    assert first.shape == (1, 320, 384, 3) and first.dtype == torch.float32
    assert torch.equal(first, kn.tiled_refine(pipeline, source, "a red fox", scale=2, tile=256, overlap=64,
                                              denoise=0.3, seed=3))
    other = kn.tiled_refine(pipeline, source, "a red fox", scale=2, tile=256, overlap=64, denoise=0.3, seed=4)
    assert not torch.equal(first, other)
    embeds = pipeline.encode_prompt(["a red fox"])
    with_reference = kn.tiled_refine(pipeline, source, prompt_embeds=embeds, scale=2, tile=256, overlap=64,
                                     denoise=0.3, seed=3, reference=True)
    assert not torch.equal(first, with_reference)


class Untouchable:
    def __call__(self, **kwargs):
        raise AssertionError("the pipeline ran for a refused request")

    def encode_prompt(self, prompts):
        raise AssertionError("the prompt was encoded for a refused request")


@pytest.mark.parametrize("image, kwargs, message", [
    (photo(1280, 1280), {"scale": 8}, "10240x10240 \\(100 MP\\).*up to 64 MP"),
    (photo(64, 64), {"tile": 4096}, "tile must be a multiple of 16 from 256 to 2048"),
    (photo(64, 64), {"tile": 1000}, "tile must be a multiple of 16"),
    (photo(256, 256), {"overlap": 600}, "overlap must be 0 to half the tile \\(512"),
    (photo(256, 256), {"scale": 0.5}, "scale must be 1 to 8"),
    (photo(256, 256), {"denoise": 0}, "denoise must be above 0"),
    (photo(256, 256), {"seed": -1}, "seed must be a whole number"),
    (torch.rand(2, 64, 64, 3), {}, "one image to refine, got a batch of 2"),
    (photo(16, 200), {"scale": 1}, "at least 64 pixels a side"),
    ("photo.png", {}, "got str"),
])
def test_bad_requests_are_refused_before_any_work(image, kwargs, message):
    with pytest.raises(kn.KleinError, match=message):
        kn.tiled_refine(Untouchable(), image, "x", **{"tile": 1024, **kwargs})


def test_a_tile_larger_than_the_image_is_fitted_with_a_note():
    pipe = PerTile(lambda tile, _: tile)
    with pytest.warns(kn.KleinNote, match="smaller than the 1024px tile; tiles of 96x128"):
        kn.tiled_refine(pipe, photo(64, 48), "x", scale=2, tile=1024)
    assert len(pipe.calls) == 1
    with pytest.raises(kn.KleinError, match="give a prompt"):
        kn.tiled_refine(pipe, photo(64, 64), scale=4, tile=256)
