"""FLUX.2 VAE vs diffusers' AutoencoderKLFlux2 + the klein pipeline's patchify/batch-norm helpers; tiling."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import klein_nodes as kn
from klein_nodes.models.autoencoder import AutoEncoder, AutoEncoderParams
from klein_nodes.sampling import tiling
from helpers import TINY_VAE, diffusers_vae, vae_diffusers_to_bfl

diffusers = pytest.importorskip("diffusers")
Pipeline = diffusers.Flux2KleinPipeline
KEY_DUMP = Path(__file__).resolve().parents[2] / "shared" / "design" / "keys" / "vae_keys.json"


def reference_encode(vae, x):
    latents = Pipeline._patchify_latents(vae.encode(x).latent_dist.mode())
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return (latents - mean) / std


def reference_decode(vae, z):
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return vae.decode(Pipeline._unpatchify_latents(z * std + mean)).sample


def smooth_image(batch, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, height // 16, width // 16, generator=generator)
    return F.interpolate(coarse, size=(height, width), mode="bicubic").clamp(0, 1) * 2 - 1


@pytest.fixture(scope="module")
def reference():
    return diffusers_vae()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, reference):
    root = tmp_path_factory.mktemp("vae")
    reference.save_pretrained(root / "repo" / "vae")
    bfl = vae_diffusers_to_bfl(reference.state_dict(), TINY_VAE)
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(root / "ae.safetensors"))
    save_file({k: v.contiguous().bfloat16() if v.is_floating_point() else v for k, v in bfl.items()},
              str(root / "flux2-vae-bf16.safetensors"))
    return {"bfl": root / "ae.safetensors", "diffusers": root / "repo" / "vae", "repo": root / "repo",
            "bf16": root / "flux2-vae-bf16.safetensors"}


@pytest.mark.parametrize("layout", ["bfl", "diffusers", "repo"])
def test_encode_decode_match_diffusers(layouts, reference, layout):
    vae = kn.load_vae(layouts[layout])
    assert vae.params == TINY_VAE
    x = smooth_image(2, 32, 48)
    z_noise = torch.randn(2, 128, 8, 12, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected_z, expected_px = reference_encode(reference, x), reference_decode(reference, z_noise)
        z, px = vae.encode(x), vae.decode(z_noise)
    assert z.shape == (2, 128, 8, 12) and px.shape == (2, 3, 32, 48)
    assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # NHWC convolutions
    # fp32 rounding of NHWC against diffusers' NCHW convolutions: up to 3e-5 of the output's scale
    assert (z - expected_z).abs().max() <= 3e-5 * expected_z.abs().max()
    assert (px - expected_px).abs().max() <= 3e-5 * expected_px.abs().max()


def test_low_precision_files_and_dtypes(layouts, reference):
    vae = kn.load_vae(layouts["bf16"])
    assert vae.dtype == torch.bfloat16 and vae.bn.running_var.dtype == torch.float32
    x = smooth_image(1, 32, 32)
    with torch.inference_mode():
        expected = reference_encode(reference, x)
        for dtype in (torch.bfloat16, torch.float16):
            z = kn.load_vae(layouts["bfl"], dtype=dtype).encode(x)
            assert z.dtype == torch.float32
            assert (z - expected).abs().max() < 0.1


def test_our_names_are_the_bfl_layout():
    """Our module's state dict is exactly the BFL key set the spec's dump lists (real config, on meta)."""
    with torch.device("meta"):
        ours = AutoEncoder(AutoEncoderParams()).state_dict()
        theirs = vae_diffusers_to_bfl(diffusers.AutoencoderKLFlux2().state_dict(), AutoEncoderParams())
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    if KEY_DUMP.is_file():
        dump = json.loads(KEY_DUMP.read_text())
        assert set(ours) == set(dump["bfl"]) and len(dump["diffusers"]) == len(ours)


@pytest.mark.parametrize("channels,name", [(16, "FLUX.1/SD3 VAE"), (4, "SD1.x/SDXL VAE")])
def test_other_vaes_are_refused(tmp_path, channels, name):
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
               "decoder.conv_in.weight": torch.zeros(8, channels, 3, 3)}, str(tmp_path / "vae.safetensors"))
    with pytest.raises(kn.WrongModelError, match=f"{name}, not the FLUX.2 VAE"):
        kn.load_vae(tmp_path / "vae.safetensors")


def test_transformer_in_vae_slot(tmp_path):
    from klein_nodes.testing import write_transformer

    path, _ = write_transformer(tmp_path / "klein.safetensors")
    with pytest.raises(kn.WrongModelError, match="transformer, not the FLUX.2 VAE"):
        kn.load_vae(path)


# --- tiling -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vae(layouts):
    return kn.load_vae(layouts["bfl"])


def test_tiles_add_no_seams(vae):
    """With shared statistics, the tile layout changes nothing: tiles of 8 latent pixels = one whole tile."""
    z = torch.randn(1, 128, 12, 16, generator=torch.Generator().manual_seed(2))
    x = smooth_image(1, 96, 128)
    small = tiling.tiled_decode(vae, z, tile=8, margin=8, proxy_pixels=64)
    whole = tiling.tiled_decode(vae, z, tile=10_000, margin=8, proxy_pixels=64)
    assert (small - whole).abs().max() <= 1e-5 * whole.abs().max()  # fp32 rounding of the NHWC convolutions
    small = tiling.tiled_encode(vae, x, tile=32, margin=16, proxy_pixels=32 * 32)
    whole = tiling.tiled_encode(vae, x, tile=10_000, margin=16, proxy_pixels=32 * 32)
    assert (small - whole).abs().max() <= 1e-5 * whole.abs().max()  # fp32 rounding of the NHWC convolutions


def test_tiled_equals_untiled_given_whole_image_statistics(vae):
    z = torch.randn(1, 128, 12, 16, generator=torch.Generator().manual_seed(3))
    x = smooth_image(1, 96, 128)
    with torch.inference_mode():
        untiled_px, untiled_z = vae.decode(z), vae.encode(x)
    assert (tiling.tiled_decode(vae, z, tile=8, margin=8, proxy_pixels=10**9) - untiled_px).abs().max() <= (
        1e-5 * untiled_px.abs().max())
    assert (tiling.tiled_encode(vae, x, tile=32, margin=16, proxy_pixels=10**9) - untiled_z).abs().max() <= (
        1e-5 * untiled_z.abs().max())


def test_tiled_vs_untiled_difference_is_bounded(vae):
    """Default settings (statistics from a proxy of one tile's area): max and colour difference, measured.
    Random weights are a harsh case (noisy activations); real VAE activations are far smoother."""
    x = smooth_image(1, 192, 256)
    with torch.inference_mode():
        z = vae.encode(x)
        untiled = vae.decode(z)
    tiled = tiling.tiled_decode(vae, z, tile=32, margin=8)
    max_abs = (tiled - untiled).abs().max().item()
    colour = (tiled.mean((2, 3)) - untiled.mean((2, 3))).abs().max().item()
    scale = untiled.abs().max().item()
    print(f"tiled vs untiled decode: max abs {max_abs:.4f}, mean colour {colour:.4f} (output range ±{scale:.2f})")
    assert colour < 0.02 * scale and max_abs < 0.25 * scale
    refined = tiling.tiled_decode(vae, z, tile=32, margin=8, refine=1)
    refined_colour = (refined.mean((2, 3)) - untiled.mean((2, 3))).abs().max().item()
    print(f"with one refinement pass: mean colour {refined_colour:.4f}")
    assert refined_colour < 0.02 * scale


def test_auto_tiling_follows_free_memory(vae, monkeypatch):
    z = torch.randn(1, 128, 4, 4)
    need = tiling.decode_bytes(vae, z)
    monkeypatch.setattr(tiling, "free_bytes", lambda device: need * 10)
    assert not tiling.should_tile(vae, z)
    monkeypatch.setattr(tiling, "free_bytes", lambda device: need)
    assert tiling.should_tile(vae, z)
    calls = []
    monkeypatch.setattr(tiling, "tiled_decode", lambda v, latents: calls.append(latents) or "tiled")
    assert tiling.decode(vae, z) == "tiled" and len(calls) == 1
    assert tiling.decode(vae, z, tiled=False).shape == (1, 3, 16, 16)  # the tiny VAE upsamples x2 (real: x8)
