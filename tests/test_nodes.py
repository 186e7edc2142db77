"""Sampling nodes called directly, with a stand-in ComfyUI runtime (memory manager, progress bar, interrupt)."""

import sys
import types

import pytest
import torch

import klein_nodes as kn
from klein_nodes.nodes.sampling import (KleinEmptyLatent, KleinReferences, KleinSampler, KleinVAEDecode,
                                        KleinVAEEncode)
from klein_nodes.testing import write_transformer
from helpers import TINY_VAE, diffusers_vae, vae_diffusers_to_bfl


class Interrupted(Exception):
    pass


@pytest.fixture()
def runtime(monkeypatch):
    """comfy.model_management / model_patcher / utils stand-ins that record what the nodes ask of them."""
    calls = {"loaded": [], "progress": [], "interrupt_at": None, "checks": 0}
    mm = types.ModuleType("comfy.model_management")
    for name in ("get_torch_device", "unet_offload_device", "text_encoder_device", "text_encoder_offload_device",
                 "vae_device", "vae_offload_device"):
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

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total, preview):
            calls["progress"].append((value, total, preview[0], preview[1].size, preview[2]))
    utils.ProgressBar = ProgressBar
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.model_patcher, comfy.utils = mm, patcher, utils
    for name, module in (("comfy", comfy), ("comfy.model_management", mm), ("comfy.model_patcher", patcher),
                         ("comfy.utils", utils)):
        monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = write_transformer(tmp_path_factory.mktemp("t") / "klein.safetensors", dtype=torch.float32)
    return kn.load_transformer(path)


@pytest.fixture(scope="module")
def vae():
    from klein_nodes.models.autoencoder import AutoEncoder

    with torch.device("meta"):
        module = AutoEncoder(TINY_VAE)
    module.load_state_dict(vae_diffusers_to_bfl(diffusers_vae().state_dict(), TINY_VAE), assign=True)
    return module.eval().requires_grad_(False)


def conditioning(seed=0, **extras):
    return [[torch.randn(1, 7, 96, generator=torch.Generator().manual_seed(seed)), extras]]


def test_sampler_uses_memory_manager_progress_and_previews(runtime, model):
    latent = KleinEmptyLatent().create(64, 48, batch_size=2)[0]
    (out,) = KleinSampler().sample(model, conditioning(), latent, seed=5, steps=3)
    assert out["samples"].shape == (2, 128, 3, 4)
    assert runtime["loaded"] == [model]
    assert [(v, t, kind, size, limit) for v, t, kind, size, limit in runtime["progress"]] == [
        (i, 3, "JPEG", (8, 6), 512) for i in (1, 2, 3)]
    (again,) = KleinSampler().sample(model, conditioning(), latent, seed=5, steps=3)
    assert torch.equal(again["samples"], out["samples"])


def test_sampler_interrupt_stops_between_steps(runtime, model):
    runtime["interrupt_at"] = 2
    with pytest.raises(Interrupted):
        KleinSampler().sample(model, conditioning(), KleinEmptyLatent().create(32, 32)[0], seed=1, steps=4)
    assert [p[0] for p in runtime["progress"]] == [1]


def test_sampler_cfg_needs_negative(model):
    with pytest.raises(kn.KleinError, match="negative"):
        KleinSampler().sample(model, conditioning(), KleinEmptyLatent().create(32, 32)[0], seed=1, guidance=4.0)
    (out,) = KleinSampler().sample(model, conditioning(), KleinEmptyLatent().create(32, 32)[0], seed=1, guidance=4.0,
                                   steps=2, negative=conditioning(seed=1))
    assert torch.isfinite(out["samples"]).all()


def test_sampler_noise_mask_keeps_unmasked_latents(model):
    source = torch.randn(1, 128, 4, 4)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 32:] = 1
    (out,) = KleinSampler().sample(model, conditioning(), {"samples": source, "noise_mask": mask}, seed=3, steps=2)
    assert torch.allclose(out["samples"][..., :2], source[..., :2], atol=1e-5)
    assert not torch.allclose(out["samples"][..., 2:], source[..., 2:], atol=1e-2)


def test_empty_latent_sizes():
    assert KleinEmptyLatent().create(1024, 1024, aspect="16:9", megapixels=1.0)[1:] == (1360, 768)
    rounded = KleinEmptyLatent().create(1000, 500)  # the note goes under the node, not only to the console
    assert rounded["ui"]["text"] == ["size 1000x500 rounded to 1008x496 (multiples of 16)"]
    latent, width, height = rounded["result"]
    assert latent["samples"].shape == (1, 128, 31, 63) and (width, height) == (1008, 496)
    photo = torch.rand(1, 3000, 2000, 3)
    assert KleinEmptyLatent().create(1024, 1024, megapixels=1.0, size_from=photo)[1:] == (832, 1248)


def test_references_append_and_keep_extras(runtime, vae):
    image = torch.rand(1, 64, 80, 3)
    (first,) = KleinReferences().add(conditioning(guidance=3.5), vae, image)
    (second,) = KleinReferences().add(first, vae, image, image_2=torch.rand(2, 64, 64, 3))
    extras = second[0][1]
    assert extras["guidance"] == 3.5
    assert [tuple(r.shape) for r in extras["reference_latents"]] == [(1, 128, 16, 20)] * 2 + [(1, 128, 16, 16)] * 2
    assert runtime["loaded"] == [vae, vae]


def test_vae_encode_crops_image_and_mask_together(vae):
    image = torch.rand(1, 70, 68, 3)
    mask = torch.zeros(1, 70, 68)
    mask[:, :, 34:] = 1
    encoded = KleinVAEEncode().encode(vae, image, mask=mask)
    assert encoded["ui"]["text"] == ["image 1: centre-cropped 68x70 -> 64x64 (multiples of 16)"]
    (latent,) = encoded["result"]
    assert latent["samples"].shape == (1, 128, 16, 16)
    assert latent["noise_mask"].shape == (1, 1, 64, 64)
    assert torch.equal(latent["noise_mask"][0, 0], mask[0, 3:67, 2:66])
    (decoded,) = KleinVAEDecode().decode(vae, latent, tiled="enable")
    assert decoded.shape == (1, 64, 64, 3) and 0 <= decoded.min() and decoded.max() <= 1


def test_lora_node_patches_copies_and_uses_the_base_models_memory_slot(comfyui, runtime, model, tmp_path, caplog):
    from safetensors.torch import save_file

    from klein_nodes.nodes.lora import KleinLora
    from klein_nodes.testing import write_text_encoder, write_tokenizer

    te_path, _ = write_text_encoder(tmp_path / "qwen.safetensors", dtype=torch.float32)
    encoder = kn.load_text_encoder(te_path, tokenizer=write_tokenizer(tmp_path / "tok"), layers=(1, 2, 3))
    generator = torch.Generator().manual_seed(0)
    save_file({"diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": torch.randn(2, 64, generator=generator),
               "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": torch.randn(64, 2, generator=generator),
               "text_encoders.qwen3_4b.transformer.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 32),
               "text_encoders.qwen3_4b.transformer.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 2)},
              str(comfyui / "loras" / "style.safetensors"))
    assert KleinLora.INPUT_TYPES()["required"]["lora_name"][0] == ["style.safetensors"]
    patched, patched_encoder = KleinLora().apply(model, "style.safetensors", 0.8, encoder, 0.5)
    assert list(patched.lora_layers) == ["double_blocks.0.img_attn.proj"] and not hasattr(model, "lora_layers")
    assert [a.strength for a in patched_encoder.model.lora_layers["layers.0.self_attn.q_proj"]] == [0.5]
    assert not torch.equal(patched_encoder.encode("a cat", 32, (1, 2, 3)), encoder.encode("a cat", 32, (1, 2, 3)))
    latent = {"samples": torch.zeros(1, 128, 2, 3)}
    (base_out,) = KleinSampler().sample(model, conditioning(), latent, seed=3, steps=2)
    (lora_out,) = KleinSampler().sample(patched, conditioning(), latent, seed=3, steps=2)
    assert (lora_out["samples"] - base_out["samples"]).abs().max() > 1e-3
    assert runtime["loaded"] == [model, model]  # the copy registers as its base: one set of weights, one slot
    with caplog.at_level("WARNING", logger="klein_nodes"):
        alone = KleinLora().apply(model, "style.safetensors", 1.0)
    assert alone["result"][1] is None and "connect a text encoder" in caplog.text
    assert alone["ui"]["text"] == ["style.safetensors: has text-encoder layers; connect a text encoder to apply them"]
    assert KleinLora().apply(model, "style.safetensors", 0.0, encoder, 0.0) == (model, encoder)


def test_latents_and_conditionings_of_other_models_are_named_at_the_socket(runtime, model, vae):
    from klein_nodes.errors import KleinError

    core_empty = {"samples": torch.zeros(1, 4, 8, 12)}  # core's Empty Latent Image at 96x64
    converted = KleinSampler().sample(model, conditioning(), core_empty, seed=1, steps=1)
    assert converted["result"][0]["samples"].shape == (1, 128, 4, 6)
    assert converted["ui"]["text"] == ["Klein Sampler: an empty 4-channel latent (SD 1.x/SDXL, as core's Empty Latent "
                                       "Image makes) was read as an empty 96x64 klein latent; use Klein Empty Latent "
                                       "(or Empty Flux 2 Latent) to set klein sizes directly"]
    encoded_elsewhere = {"samples": torch.randn(1, 16, 8, 8)}
    with pytest.raises(KleinError, match="16 channels \\(SD3/FLUX.1.*Klein Empty Latent.*Klein VAE Encode"):
        KleinSampler().sample(model, conditioning(), encoded_elsewhere, seed=1, steps=1)
    with pytest.raises(KleinError, match="Klein VAE Decode: this LATENT has 4 channels"):
        KleinVAEDecode().decode(vae, {"samples": torch.randn(1, 4, 8, 8)})
    t5 = [[torch.randn(1, 7, 4096), {}]]
    with pytest.raises(KleinError, match="4096 features per token \\(T5-XXL.*takes 96.*Klein Text Encode"):
        KleinSampler().sample(model, t5, KleinEmptyLatent().create(64, 64)[0], seed=1, steps=1)
    assert runtime["loaded"] == [model]  # refused before the transformer was loaded (the first run loaded it)
