"""End to end: our KleinPipeline vs diffusers' Flux2KleinPipeline on tiny random components in the real layouts."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import klein_nodes as kn
from klein_nodes.sampling.schedule import get_schedule
from klein_nodes.testing import (QWEN3_CHAT_TEMPLATE, TINY_QWEN3, TINY_TRANSFORMER, bfl_to_diffusers, diffusers_config,
                                 qwen3_config, qwen3_state_dict, transformer_state_dict, write_tokenizer)
from helpers import diffusers_vae

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
LAYERS = (1, 2, 3)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A diffusers klein repo (transformer/, text_encoder/, tokenizer/, vae/, scheduler/) with tiny random weights."""
    root = tmp_path_factory.mktemp("klein-repo")
    transformer = diffusers.Flux2Transformer2DModel(**{k: v for k, v in diffusers_config(TINY_TRANSFORMER).items()
                                                       if not k.startswith("_")})
    transformer.load_state_dict(bfl_to_diffusers(transformer_state_dict(TINY_TRANSFORMER, seed=11)))
    transformer.save_pretrained(root / "transformer", max_shard_size="50KB")
    text_encoder = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**qwen3_config(TINY_QWEN3)))
    text_encoder.load_state_dict(qwen3_state_dict(TINY_QWEN3, seed=12), strict=False)
    text_encoder.save_pretrained(root / "text_encoder")
    write_tokenizer(root / "tokenizer")
    diffusers_vae(seed=13).save_pretrained(root / "vae")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    scheduler.save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline", "is_distilled": True}))
    return root


def reference_pipeline(repo, distilled):
    tokenizer = transformers.Qwen2Tokenizer.from_pretrained(str(repo / "tokenizer"))
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return diffusers.Flux2KleinPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(repo / "scheduler"),
        vae=diffusers.AutoencoderKLFlux2.from_pretrained(repo / "vae"),
        text_encoder=transformers.Qwen3ForCausalLM.from_pretrained(repo / "text_encoder"),
        tokenizer=tokenizer,
        transformer=diffusers.Flux2Transformer2DModel.from_pretrained(repo / "transformer"),
        is_distilled=distilled,
    )


@pytest.fixture(scope="module")
def ours(repo):
    return kn.KleinPipeline(kn.load_transformer(repo), kn.load_text_encoder(repo, layers=LAYERS), kn.load_vae(repo),
                            text_layers=LAYERS)


def reference_images(count, seed=5):
    rng = np.random.default_rng(seed)
    sizes = [(96, 64), (64, 80)][:count]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.mark.parametrize("distilled,guidance,steps", [(True, 1.0, 4), (False, 3.5, 3)])
@pytest.mark.parametrize("references", [0, 1, 2])
@pytest.mark.parametrize("width,height", [(32, 32), (48, 32)])
def test_images_match_diffusers(repo, ours, distilled, guidance, steps, references, width, height):
    prompt = "a tiny red fox"
    latents = torch.randn(1, 128, height // 4, width // 4, generator=torch.Generator().manual_seed(7))
    images = reference_images(references) or None
    reference = reference_pipeline(repo, distilled)
    with torch.inference_mode():
        expected = reference(image=images, prompt=prompt, height=height, width=width, num_inference_steps=steps,
                             guidance_scale=guidance, latents=latents, output_type="pt", max_sequence_length=512,
                             text_encoder_out_layers=LAYERS).images
    got = ours(prompt, width=width, height=height, steps=steps, guidance=guidance, references=images, noise=latents)
    assert got.shape == (1, height, width, 3)
    assert (got.permute(0, 3, 1, 2) - expected).abs().max() <= 1e-4


def test_sigmas_match_diffusers_scheduler():
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    for steps, tokens in ((4, 4096), (4, 1024), (50, 4096), (4, 16384), (7, 777)):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(tokens, steps))
        assert np.allclose(get_schedule(steps, tokens), scheduler.sigmas.numpy(), atol=1e-6)


def test_seed_is_reported_and_reproducible(ours):
    first = ours("a cat", width=32, height=32, seed=-1)
    seed = ours.last_seed
    assert 0 <= seed < 2**63
    again = ours("a cat", width=32, height=32, seed=seed)
    assert torch.equal(first, again)
    other = ours("a cat", width=32, height=32, seed=seed + 1)
    assert not torch.equal(first, other)


def test_batch_of_prompts_and_images_per_prompt(ours):
    images = ours(["a cat", "a dog"], width=32, height=32, seed=3, batch_size=2)
    assert images.shape == (4, 32, 32, 3)
    singles = [ours(p, width=32, height=32, noise=n[None]) for p, n in
               zip(["a cat", "a cat", "a dog", "a dog"], kn.sampling.schedule.initial_noise(3, 4, 128, 8, 8))]
    assert (torch.cat(singles) - images).abs().max() <= 1e-4  # batched vs single matmuls: float-level only


def test_sizes_are_rounded_and_reported(ours):
    with pytest.warns(UserWarning, match="size 40x30 rounded to 48x32"):
        images = ours("a cat", width=40, height=30, seed=1)
    assert images.shape == (1, 32, 48, 3) and ours.notes == ["size 40x30 rounded to 48x32 (multiples of 16)"]
    with pytest.raises(kn.KleinError, match="up to 4 MP"):
        ours("a cat", width=4096, height=2048, seed=1)


def test_img2img_starts_from_the_image(ours):
    source = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    low = ours("a cat", width=32, height=32, seed=4, image=source, denoise=0.05)
    high = ours("a cat", width=32, height=32, seed=4, image=source, denoise=1.0)
    reconstructed = ours.decode(ours.vae.encode(kn.sampling.references.prepare_image(source, 32, 32)[0]))
    assert low.shape == (1, 32, 32, 3)
    assert (low - reconstructed).abs().mean() < (high - reconstructed).abs().mean()


def test_inpainting_keeps_the_unmasked_half(ours):
    source = Image.fromarray(np.random.default_rng(2).integers(0, 255, (32, 64, 3), dtype=np.uint8))
    mask = torch.zeros(32, 64)
    mask[:, 32:] = 1  # repaint the right half
    latents = ours("a cat", width=64, height=32, seed=9, image=source, mask=mask, output_type="latent")
    encoded = ours.vae.encode(kn.sampling.references.prepare_image(source, 64, 32)[0])
    assert torch.allclose(latents[..., :8], encoded[..., :8], atol=1e-5)  # left half: the image itself
    assert not torch.allclose(latents[..., 8:], encoded[..., 8:], atol=1e-2)
    painted = np.zeros((32, 64), dtype=np.uint8)
    painted[:, 32:] = 255  # the same mask drawn as a PIL image (white = repaint) and as a uint8 array
    for given in (Image.fromarray(painted), Image.fromarray(painted).convert("RGB"), painted):
        again = ours("a cat", width=64, height=32, seed=9, image=source, mask=given, output_type="latent")
        assert torch.equal(again, latents)
    with pytest.raises(kn.KleinError, match="mask must be a PIL image, a numpy array or a tensor, not str"):
        ours("a cat", width=64, height=32, seed=9, image=source, mask="mask.png")


def test_progress_callback_and_cancellation(ours):
    steps = []
    ours("a cat", width=32, height=32, seed=1, steps=3, callback=lambda step: steps.append((step.index, step.total,
                                                                                             step.preview().shape)))
    assert steps == [(1, 3, (1, 16, 16, 3)), (2, 3, (1, 16, 16, 3)), (3, 3, (1, 16, 16, 3))]

    def cancel(step):
        if step.index == 2:
            raise kn.Cancelled("stop")
    with pytest.raises(kn.Cancelled):
        ours("a cat", width=32, height=32, seed=1, steps=4, callback=cancel)


def test_cfg_needs_a_negative_and_fits_checks(repo, ours):
    embeds = ours.encode_prompt(["a cat"])
    with pytest.raises(kn.KleinError, match="negative"):
        kn.sampling.sampler.sample(ours.transformer, torch.randn(1, 128, 8, 8),
                                   kn.sampling.sampler.Conditioning(embeds), [1.0, 0.0], guidance=4.0)
    from helpers import TINY_VAE
    from klein_nodes.models.autoencoder import AutoEncoder, AutoEncoderParams

    with torch.device("meta"):
        wrong_vae = AutoEncoder(AutoEncoderParams(**{**TINY_VAE.__dict__, "z_channels": 16}))
    with pytest.raises(kn.WrongModelError, match="64-channel latents"):
        kn.KleinPipeline(ours.transformer, vae=wrong_vae)


@pytest.mark.parametrize("memory", ["auto", "resident", "offload", "stream"])
def test_memory_plans_give_the_same_images(repo, ours, memory):
    """The planned paths (component turns, offloading, block streaming) change where weights live, not the maths."""
    planned = kn.KleinPipeline(kn.load_transformer(repo), kn.load_text_encoder(repo, layers=LAYERS), kn.load_vae(repo),
                               text_layers=LAYERS, device="cpu", memory=memory, resident_blocks=1)
    expected = ours("a fox", width=48, height=32, seed=2, steps=2)
    got = planned("a fox", width=48, height=32, seed=2, steps=2)
    assert torch.equal(got, expected)
    assert planned.plan.transformer == ("paged" if memory == "auto" else memory)  # on the CPU: pages go back
    if memory == "auto":
        assert "each block's pages handed back as it finishes" in planned.plan.describe()


def test_unknown_memory_mode(ours):
    with pytest.raises(kn.KleinError, match="memory=.sometimes.: choose one of .auto., .resident., .offload."):
        kn.KleinPipeline(ours.transformer, memory="sometimes")


def test_long_prompt_keeping_every_token_matches_diffusers_at_that_length(repo, ours):
    """max_sequence_length=None (ComfyUI's behaviour) runs the transformer on every prompt token: the same image as
    diffusers given that many tokens, with guidance (negative "" padded to 512) too."""
    prompt = " ".join(f"word{i % 37} and more" for i in range(300))
    tokens = len(transformers.Qwen2Tokenizer.from_pretrained(str(repo / "tokenizer"))(
        kn.models.text_encoder.KLEIN_TEMPLATE.format(prompt))["input_ids"])
    assert tokens > 512
    latents = torch.randn(1, 128, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        expected = reference_pipeline(repo, True)(prompt=prompt, height=32, width=32, num_inference_steps=2,
                                                  latents=latents, output_type="pt", max_sequence_length=tokens,
                                                  text_encoder_out_layers=LAYERS).images
    got = ours(prompt, width=32, height=32, steps=2, noise=latents, max_sequence_length=None)
    assert (got.permute(0, 3, 1, 2) - expected).abs().max() <= 1e-4
    cfg = ours(prompt, width=32, height=32, steps=1, guidance=2.0, noise=latents, max_sequence_length=None)
    assert cfg.shape == (1, 32, 32, 3) and torch.isfinite(cfg).all()  # positive > 512 tokens, negative 512
