"""Edit Composite, Outpaint Canvas and Tiled Refine called as ComfyUI calls them, with a stand-in runtime."""

import sys
import types

import klein_nodes as kn
import pytest
import torch
from klein_nodes.nodes.edit import KleinEditComposite, KleinOutpaintCanvas, KleinTiledRefine
from klein_nodes.testing import write_transformer, write_vae
from helpers import natural_photo


class Interrupted(Exception):
    pass


@pytest.fixture()
def runtime(monkeypatch):
    """comfy.model_management / model_patcher / utils stand-ins recording loads, progress and interrupt checks."""
    calls = {"loaded": [], "progress": [], "interrupt_at": None, "checks": 0}
    mm = types.ModuleType("comfy.model_management")
    for name in ("get_torch_device", "unet_offload_device", "vae_device", "vae_offload_device"):
        setattr(mm, name, lambda: torch.device("cpu"))
    mm.load_models_gpu = lambda patchers: calls["loaded"].extend(p.model for p in patchers)

    def check_interrupt():
        calls["checks"] += 1
        if calls["checks"] == calls["interrupt_at"]:
            raise Interrupted()
    mm.throw_exception_if_processing_interrupted = check_interrupt
    patcher = types.ModuleType("comfy.model_patcher")
    patcher.ModelPatcher = lambda model, load_device, offload_device: types.SimpleNamespace(model=model)
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = lambda total: types.SimpleNamespace(
        update_absolute=lambda value, total=None, preview=None: calls["progress"].append((value, total)))
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.model_patcher, comfy.utils = mm, patcher, utils
    for name, module in (("comfy", comfy), ("comfy.model_management", mm), ("comfy.model_patcher", patcher),
                         ("comfy.utils", utils)):
        monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    transformer, _ = write_transformer(folder / "klein.safetensors", dtype=torch.float32)
    return kn.load_transformer(transformer), kn.load_vae(write_vae(folder / "vae.safetensors"))


def conditioning():
    return [[torch.randn(1, 7, 96, generator=torch.Generator().manual_seed(0)), {}]]


def photo(size=128):
    return torch.from_numpy(natural_photo("chelsea", size).copy()).float()[None] / 255


def test_outpaint_node_gives_canvas_mask_and_a_report():
    image = photo(96)
    out = KleinOutpaintCanvas().canvas(image, aspect="16:9")
    canvas, mask = out["result"]
    assert canvas.shape == (1, 96, 176, 3) and mask.shape == (1, 96, 176)
    assert torch.equal(canvas[:, :, 40:136], image)
    assert out["ui"]["text"] == ["canvas 176x96 from 96x96; 45% new"]
    with pytest.raises(kn.KleinError, match="nothing to extend"):
        KleinOutpaintCanvas().canvas(image)


def test_composite_node_keeps_the_original_outside_the_edit_and_reports():
    original = photo(128)
    edited = original.clone()
    edited[:, 40:80, 40:80] = torch.tensor([0.9, 0.1, 0.1])
    out = KleinEditComposite().composite(original, torch.cat([edited, edited]))
    image, mask = out["result"]
    assert image.shape == (2, 128, 128, 3) and mask.shape == (2, 128, 128)
    assert torch.equal(image[0][mask[0] == 0], original[0][mask[0] == 0])
    assert torch.allclose(image[0, 50:70, 50:70], edited[0, 50:70, 50:70], atol=2e-3)  # colours matched: near 1:1
    assert len(out["ui"]["text"]) == 2 and "changed" in out["ui"]["text"][0]
    given = torch.zeros(1, 128, 128)
    given[:, :64] = 1
    image, mask = KleinEditComposite().composite(original, edited, align=False, match_colors=False,
                                                 mask=given)["result"]
    assert torch.equal(image[0, 64:], original[0, 64:]) and torch.equal(image[0, :64], edited[0, :64])
    with pytest.raises(kn.KleinError, match="2 originals for 3 edits"):
        KleinEditComposite().composite(torch.cat([original] * 2), torch.cat([edited] * 3))


def test_tiled_refine_node_loads_models_per_tile_and_stops_between_tiles(runtime, models):
    model, vae = models
    (refined,) = KleinTiledRefine().refine(model, conditioning(), vae, photo(160), upscale_by=2.0, tile_size=256,
                                           overlap=64, denoise=0.3, seed=1, steps=2)
    assert refined.shape == (1, 320, 320, 3)
    assert runtime["progress"] == [(k, 4) for k in (1, 2, 3, 4)]
    assert runtime["loaded"][:3] == [vae, model, vae]  # encode, sample, decode: each loaded for its turn
    runtime.update(progress=[], interrupt_at=runtime["checks"] + 2)
    with pytest.raises(Interrupted):
        KleinTiledRefine().refine(model, conditioning(), vae, photo(160), upscale_by=2.0, tile_size=256, overlap=64,
                                  denoise=0.3, seed=1, steps=2)
    assert runtime["progress"] == [(1, 4), (2, 4)]
    with pytest.raises(kn.KleinError, match="4096 features per token"):
        KleinTiledRefine().refine(model, [[torch.randn(1, 7, 4096), {}]], vae, photo(160))
