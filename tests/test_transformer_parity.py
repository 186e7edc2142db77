"""Our transformer vs diffusers' Flux2Transformer2DModel on tiny random weights, every file layout."""

import json

import pytest
import torch

import klein_nodes as kn
from klein_nodes.models.transformer import Flux2Params
from klein_nodes.sampling.packing import image_ids, text_ids
from klein_nodes.testing import TINY_TRANSFORMER, bfl_to_diffusers, diffusers_config, transformer_state_dict

diffusers = pytest.importorskip("diffusers")
from safetensors.torch import save_file  # noqa: E402


def diffusers_model(params, state):
    config = {k: v for k, v in diffusers_config(params).items() if not k.startswith("_")}
    model = diffusers.Flux2Transformer2DModel(**config)
    model.load_state_dict(bfl_to_diffusers(state), strict=True)
    return model.eval()


def compare(ours, reference, ids, batch, txt_len=7, timesteps=None, guidance=None, params=TINY_TRANSFORMER):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, ids.shape[0], params.in_channels, generator=generator)
    ctx = torch.randn(batch, txt_len, params.context_in_dim, generator=generator)
    t = timesteps if timesteps is not None else torch.linspace(0.9, 0.2, batch)
    txt = text_ids(txt_len)
    with torch.inference_mode():
        expected = reference(x, ctx, t, ids, txt, guidance=guidance, return_dict=False)[0]
        got = ours(x, ids.expand(batch, -1, -1), t, ctx, txt.expand(batch, -1, -1), guidance=guidance)
    assert got.shape == expected.shape == (batch, ids.shape[0], params.out_channels)
    return (got - expected).abs().max().item()


@pytest.fixture(scope="module")
def state():
    return transformer_state_dict(TINY_TRANSFORMER, seed=3)


@pytest.fixture(scope="module")
def reference(state):
    return diffusers_model(TINY_TRANSFORMER, state)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, state, reference):
    """The same weights saved as BFL file, prefixed BFL file, diffusers folder and diffusers repo root."""
    root = tmp_path_factory.mktemp("layouts")
    save_file(state, str(root / "flux-2-klein-tiny.safetensors"))
    save_file({"model.diffusion_model." + k: v for k, v in state.items()}, str(root / "prefixed.safetensors"))
    reference.save_pretrained(root / "repo" / "transformer", max_shard_size="40KB")
    (root / "repo" / "model_index.json").write_text(
        json.dumps({"_class_name": "Flux2KleinPipeline", "is_distilled": True}))
    return {
        "bfl": root / "flux-2-klein-tiny.safetensors",
        "bfl_prefixed": root / "prefixed.safetensors",
        "diffusers_folder": root / "repo" / "transformer",
        "diffusers_repo": root / "repo",
    }


def test_diffusers_save_is_sharded(layouts):
    folder = layouts["diffusers_folder"]
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert len(list(folder.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1


@pytest.mark.parametrize("layout", ["bfl", "bfl_prefixed", "diffusers_folder", "diffusers_repo"])
def test_text_to_image_matches_diffusers(layouts, reference, layout):
    ours = kn.load_transformer(layouts[layout])
    assert compare(ours, reference, image_ids(3, 4), batch=1) <= 1e-5


@pytest.mark.parametrize("layout", ["bfl", "diffusers_folder"])
def test_references_and_batch_match_diffusers(layouts, reference, layout):
    """Noisy tokens + two references of different sizes at t=10 and t=20, batch 2 with different sigmas."""
    ours = kn.load_transformer(layouts[layout])
    ids = torch.cat([image_ids(4, 3), image_ids(2, 5, t=10), image_ids(3, 3, t=20)])
    assert compare(ours, reference, ids, batch=2, timesteps=torch.tensor([0.95, 0.4])) <= 1e-5


def test_config_comes_from_shapes(layouts):
    params = kn.load_transformer(layouts["diffusers_folder"]).params
    assert params == TINY_TRANSFORMER


def test_non_square_heads_and_depths_load(tmp_path):
    """Another shape family (3 heads of 16, 1 double + 3 single blocks) loads with the same code."""
    params = Flux2Params(in_channels=64, out_channels=64, context_in_dim=40, hidden_size=48, num_heads=3, depth=1,
                         depth_single_blocks=3, mlp_hidden_dim=144, axes_dim=(4, 4, 4, 4))
    state = transformer_state_dict(params, seed=5)
    save_file(state, str(tmp_path / "other.safetensors"))
    ours = kn.load_transformer(tmp_path / "other.safetensors")
    assert ours.params == params
    error = compare(ours, diffusers_model(params, state), image_ids(2, 2), batch=1, params=params)
    assert error <= 1e-5


def test_guidance_embedding_of_dev_topology_is_used(tmp_path):
    params = Flux2Params(**{**TINY_TRANSFORMER.__dict__, "use_guidance_embed": True})
    state = transformer_state_dict(params, seed=7)
    assert "guidance_in.in_layer.weight" in state
    save_file(state, str(tmp_path / "dev.safetensors"))
    ours = kn.load_transformer(tmp_path / "dev.safetensors")
    reference = diffusers_model(params, state)
    guidance = torch.tensor([4.0])
    assert compare(ours, reference, image_ids(2, 3), batch=1, guidance=guidance) <= 1e-5


def test_weights_are_mapped_not_copied(layouts):
    """Every parameter is a view into the one file mapping: no second copy of the weights."""
    path = layouts["bfl"]
    ours = kn.load_transformer(path)
    storages = {p.untyped_storage().data_ptr() for p in ours.parameters()}
    assert len(storages) == 1
    assert next(ours.parameters()).untyped_storage().nbytes() == path.stat().st_size


def test_bf16_file_keeps_dtype_and_converts_on_request(tmp_path, state, reference):
    save_file({k: v.bfloat16() for k, v in state.items()}, str(tmp_path / "bf16.safetensors"))
    assert kn.load_transformer(tmp_path / "bf16.safetensors").dtype == torch.bfloat16
    ours = kn.load_transformer(tmp_path / "bf16.safetensors", dtype=torch.float32)
    assert ours.dtype == torch.float32
    # bf16-rounded weights: close to the fp32 reference, not identical
    assert compare(ours, reference, image_ids(3, 4), batch=1) < 0.05


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 0.08), (torch.float16, 0.01)])
def test_low_precision_runs_close_to_fp32(layouts, reference, dtype, tolerance):
    ours = kn.load_transformer(layouts["bfl"], dtype=dtype)
    error = compare(ours, reference, image_ids(3, 4), batch=1)
    assert error < tolerance


def test_fp16_is_overflow_safe(state, tmp_path):
    """Activations beyond fp16's range are clamped instead of turning into inf/NaN."""
    loud = {k: v * 1e5 if k.endswith(("img_mlp.2.weight", "txt_mlp.2.weight", "linear2.weight")) else v
            for k, v in state.items()}
    save_file(loud, str(tmp_path / "loud.safetensors"))
    x, ctx, t = torch.randn(1, 12, 128), torch.randn(1, 7, 96), torch.tensor([0.5])
    peaks = []
    model32 = kn.load_transformer(tmp_path / "loud.safetensors", dtype=torch.float32)
    for block in model32.single_blocks:
        block.register_forward_hook(lambda m, i, out: peaks.append(out.abs().max().item()))
    model16 = kn.load_transformer(tmp_path / "loud.safetensors", dtype=torch.float16)
    with torch.inference_mode():
        model32(x, image_ids(3, 4)[None], t, ctx, text_ids(7)[None])
        out16 = model16(x, image_ids(3, 4)[None], t, ctx, text_ids(7)[None])
    assert max(peaks) > 65504  # the residual stream really leaves fp16's range
    assert torch.isfinite(out16).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_as_complex_multiply_equals_the_real_formula(dtype):
    """The CPU rotates q/k as one complex multiply; other devices use the real formula: the same bits either way."""
    from klein_nodes.models.transformer import EmbedND, apply_rope

    ids = torch.cat([text_ids(7), image_ids(5, 6)])[None]
    rotation = EmbedND(2000, (32, 32, 32, 32))(ids)
    assert rotation.is_complex()
    x = torch.randn(1, 3, ids.shape[1], 128).to(dtype)
    pair = (rotation.real.contiguous(), rotation.imag.contiguous())
    assert torch.equal(apply_rope(x, rotation), apply_rope(x, pair))
