"""LoRA files in every published naming, applied to our models at run time, match the reference libraries:
diffusers' `load_lora_weights` (BFL/ComfyUI, PEFT, kohya, LoKr), peft's LoHa and transformers + peft for Qwen3."""

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import save_file

import klein_nodes as kn
from klein_nodes.quant.linear import QuantizedLinear
from klein_nodes.sampling.packing import image_ids, text_ids
from klein_nodes.sampling.sampler import Conditioning, sample
from klein_nodes.testing import (TINY_QWEN3, TINY_TRANSFORMER, bfl_to_diffusers, diffusers_config, qwen3_config,
                                 qwen3_state_dict, transformer_state_dict, write_gguf, write_tokenizer)
from helpers import sample_forward

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
H, MLP, RANK = TINY_TRANSFORMER.hidden_size, TINY_TRANSFORMER.mlp_hidden_dim, 4
# every kind of transformer layer once (BFL names, output and input sizes)
BFL_LAYERS = {
    "double_blocks.0.img_attn.qkv": (3 * H, H), "double_blocks.1.txt_attn.qkv": (3 * H, H),
    "double_blocks.0.img_attn.proj": (H, H), "double_blocks.1.txt_attn.proj": (H, H),
    "double_blocks.0.img_mlp.0": (2 * MLP, H), "double_blocks.1.txt_mlp.2": (H, MLP),
    "single_blocks.0.linear1": (3 * H + 2 * MLP, H), "single_blocks.1.linear2": (H, H + MLP),
    "img_in": (H, TINY_TRANSFORMER.in_channels), "txt_in": (H, TINY_TRANSFORMER.context_in_dim),
}


@pytest.fixture(scope="module")
def state():
    return transformer_state_dict(TINY_TRANSFORMER, seed=3)


@pytest.fixture(scope="module")
def ours(state, tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "klein.safetensors"
    save_file(state, str(path))
    return kn.load_transformer(path, dtype=torch.float32)


def diffusers_transformer(state):
    config = {k: v for k, v in diffusers_config(TINY_TRANSFORMER).items() if not k.startswith("_")}
    model = diffusers.Flux2Transformer2DModel(**config)
    model.load_state_dict(bfl_to_diffusers(state), strict=True)
    return model.eval()


def with_diffusers_lora(state, lora):
    """diffusers' own loader on a tiny pipeline: the reference for what a LoRA file means."""
    transformer = diffusers_transformer(state)
    pipe = diffusers.Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                        transformer=transformer)
    pipe.load_lora_weights(dict(lora))
    return transformer


def difference(ours, reference, batch=2, txt_len=5):
    generator = torch.Generator().manual_seed(1)
    ids = image_ids(2, 3)
    x = torch.randn(batch, ids.shape[0], TINY_TRANSFORMER.in_channels, generator=generator)
    ctx = torch.randn(batch, txt_len, TINY_TRANSFORMER.context_in_dim, generator=generator)
    t, txt = torch.tensor([0.9, 0.4]), text_ids(txt_len)
    with torch.inference_mode():
        expected = reference(x, ctx, t, ids, txt, return_dict=False)[0]
        got = ours(x, ids.expand(batch, -1, -1), t, ctx, txt.expand(batch, -1, -1))
    return (got - expected).abs().max().item()


def lora_factors(seed=0, layers=BFL_LAYERS, rank=RANK):
    generator = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(out, rank, generator=generator) * 0.3, torch.randn(rank, inp, generator=generator) * 0.3)
            for name, (out, inp) in layers.items()}


def bfl_lora(factors, prefix="diffusion_model.", names=("lora_B.weight", "lora_A.weight"), alpha=None):
    lora = {}
    for name, (up, down) in factors.items():
        lora[f"{prefix}{name}.{names[0]}"], lora[f"{prefix}{name}.{names[1]}"] = up, down
        if alpha is not None:
            lora[f"{prefix}{name}.alpha"] = torch.tensor(float(alpha))
    return lora


def applied(model, lora, tmp_path, strength=1.0, metadata=None, name="lora.safetensors"):
    save_file(lora, str(tmp_path / name), metadata=metadata)
    return kn.apply_lora(model, tmp_path / name, strength)


def test_bfl_comfyui_lora(state, ours, tmp_path):
    lora = bfl_lora(lora_factors())
    reference = with_diffusers_lora(state, lora)
    assert difference(ours, diffusers_transformer(state)) <= 1e-5 < difference(ours, reference)
    assert difference(applied(ours, lora, tmp_path), reference) <= 1e-5


def test_lora_down_up_with_alpha(state, ours, tmp_path):
    """ComfyUI's `lora_down/lora_up` + `alpha` spelling: delta = up·down·alpha/rank."""
    factors = lora_factors(1)
    reference = with_diffusers_lora(state, bfl_lora({n: (u * 2.0, d) for n, (u, d) in factors.items()}))
    lora = bfl_lora(factors, names=("lora_up.weight", "lora_down.weight"), alpha=2 * RANK)
    assert difference(applied(ours, lora, tmp_path), reference) <= 1e-5


@pytest.mark.parametrize("spelling", ["diffusers", "diffsynth"])
def test_diffusers_peft_lora_with_split_qkv(state, ours, tmp_path, spelling):
    """Saved by diffusers itself from a peft adapter on to_q/to_k/to_v, add_*_proj, norm_out ... (lora_alpha != r);
    DiffSynth writes the same adapter with bare module names and peft's `.default` adapter name (alpha = r)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    reference = diffusers_transformer(state)
    targets = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
               "linear_in", "linear_out", "to_qkv_mlp_proj", "norm_out.linear", "x_embedder",
               "single_transformer_blocks.0.attn.to_out", "single_transformer_blocks.1.attn.to_out"]
    config = LoraConfig(r=RANK, lora_alpha=6 if spelling == "diffusers" else RANK, target_modules=targets,
                        init_lora_weights=False)
    reference.add_adapter(config)
    if spelling == "diffusers":
        diffusers.Flux2KleinPipeline.save_lora_weights(
            tmp_path, transformer_lora_layers=get_peft_model_state_dict(reference),
            transformer_lora_adapter_metadata=config.to_dict())
        patched = kn.apply_lora(ours, tmp_path / "pytorch_lora_weights.safetensors")
    else:
        lora = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
                for k, v in get_peft_model_state_dict(reference).items()}
        assert "transformer_blocks.0.attn.to_q.lora_A.default.weight" in lora
        patched = applied(ours, lora, tmp_path)
    assert len(patched.lora_layers) == 2 * 8 + 2 * 2 + 2  # split q/k/v fused into 2 qkv layers per double block
    assert difference(patched, reference) <= 1e-5


def test_kohya_lora(state, ours, tmp_path):
    layers = {name: shape for name, shape in BFL_LAYERS.items() if not name.endswith("_in")}  # diffusers maps no txt_in
    lora = {}
    for name, (up, down) in lora_factors(2, layers).items():
        module = "lora_unet_" + name.replace(".", "_")
        lora[f"{module}.lora_up.weight"], lora[f"{module}.lora_down.weight"] = up, down
        lora[f"{module}.alpha"] = torch.tensor(2.0)
    reference = with_diffusers_lora(state, lora)
    assert difference(applied(ours, lora, tmp_path), reference) <= 1e-5


def lokr_tensors(out, inp, seed, decomposed):
    generator = torch.Generator().manual_seed(seed)
    w1 = torch.randn(4, 4, generator=generator) * 0.3
    w2_shape = (out // 4, inp // 4)
    if not decomposed:
        return {"lokr_w1": w1, "lokr_w2": torch.randn(*w2_shape, generator=generator) * 0.3}
    return {"lokr_w1": w1, "lokr_w2_a": torch.randn(w2_shape[0], 2, generator=generator) * 0.3,
            "lokr_w2_b": torch.randn(2, w2_shape[1], generator=generator) * 0.3, "alpha": torch.tensor(3.0)}


def test_bfl_lokr(state, ours, tmp_path):
    """ai-toolkit's LoKr on BFL names (fused qkv kept fused), full and rank-decomposed factors with alpha."""
    lora = {}
    for index, (name, (out, inp)) in enumerate(BFL_LAYERS.items()):
        if name.endswith(("img_in", "txt_in")):
            continue
        for suffix, tensor in lokr_tensors(out, inp, index, decomposed=index % 2 == 0).items():
            lora[f"diffusion_model.{name}.{suffix}"] = tensor
    reference = with_diffusers_lora(state, lora)
    assert difference(applied(ours, lora, tmp_path), reference) <= 1e-5


def test_lycoris_lokr_on_diffusers_names(state, ours, tmp_path):
    layers = {"transformer_blocks_0_attn_to_q": (H, H), "transformer_blocks_1_attn_add_v_proj": (H, H),
              "transformer_blocks_0_ff_linear_in": (2 * MLP, H),
              "single_transformer_blocks_1_attn_to_out": (H, H + MLP)}
    lora = {f"lycoris_{name}.{suffix}": tensor for index, (name, (out, inp)) in enumerate(layers.items())
            for suffix, tensor in lokr_tensors(out, inp, index, decomposed=index % 2 == 1).items()}
    reference = with_diffusers_lora(state, lora)
    assert difference(applied(ours, lora, tmp_path), reference) <= 1e-5


def test_lycoris_loha(state, ours, tmp_path):
    """LoHa has no diffusers loader: peft's LoHa on the diffusers model is the reference, saved in LyCORIS names."""
    from peft import LoHaConfig, inject_adapter_in_model

    reference = diffusers_transformer(state)
    config = LoHaConfig(r=RANK, alpha=6, target_modules=["to_k", "to_add_out", "linear_out", "to_qkv_mlp_proj"],
                        init_weights=False)
    reference = inject_adapter_in_model(config, reference)
    lora = {}
    for name, module in reference.named_modules():
        if hasattr(module, "hada_w1_a") and "default" in module.hada_w1_a:
            for part in ("w1_a", "w1_b", "w2_a", "w2_b"):
                lora[f"lycoris_{name.replace('.', '_')}.hada_{part}"] = (
                    getattr(module, f"hada_{part}")["default"].detach())
            lora[f"lycoris_{name.replace('.', '_')}.alpha"] = torch.tensor(6.0)
    assert len(lora) == 5 * (2 + 2 + 4 + 2)  # to_k, to_add_out, both ff linear_out, to_qkv_mlp_proj
    assert difference(applied(ours, lora, tmp_path), reference) <= 1e-5


def peft_dora_reference(state, targets, seed):
    """peft's own DoRA on the diffusers model (diffusers' loader drops DoRA magnitudes), and its state dict."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    reference = diffusers_transformer(state)
    reference.add_adapter(LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=targets, use_dora=True,
                                     init_lora_weights=False))
    for name, parameter in reference.named_parameters():
        if "lora_magnitude_vector" in name:  # away from the weight norms, so the rescaling matters
            parameter.data.mul_(torch.rand_like(parameter) + 0.5)
    return reference, get_peft_model_state_dict(reference)


def test_dora_peft(state, ours, tmp_path):
    """PEFT DoRA (lora_magnitude_vector), split q/k/v included: the rows of W + ΔW rescaled to the magnitudes."""
    reference, lora = peft_dora_reference(state, ["to_q", "to_v", "add_k_proj", "to_out.0", "linear_in",
                                                  "to_qkv_mlp_proj"], seed=12)
    metadata = {"lora_adapter_metadata": '{"transformer.lora_alpha": 8, "transformer.r": 4}'}
    patched = applied(ours, {"transformer." + k: v for k, v in lora.items()}, tmp_path, metadata=metadata)
    assert all(a.is_dora for adapters in patched.lora_layers.values() for a in adapters)
    assert difference(patched, reference) <= 1e-5


def test_dora_lycoris_dora_scale_and_strength(state, ours, tmp_path):
    """LyCORIS/ComfyUI `dora_scale` on BFL names; strength s gives W + s·(W_dora - W)."""
    reference, lora = peft_dora_reference(state, ["to_out.0", "linear_out", "to_qkv_mlp_proj"], seed=13)
    bfl = {}
    renames = {"attn.to_out.0": "img_attn.proj", "ff.linear_out": "img_mlp.2", "ff_context.linear_out": "txt_mlp.2",
               "attn.to_qkv_mlp_proj": "linear1"}
    for key, value in lora.items():
        for diffusers_name, bfl_name in renames.items():
            key = key.replace(diffusers_name, bfl_name)
        key = key.replace("single_transformer_blocks.", "single_blocks.")
        key = key.replace("transformer_blocks.", "double_blocks.")
        key = key.replace("lora_magnitude_vector", "dora_scale")
        key = key.replace("lora_A", "lora_down").replace("lora_B", "lora_up")
        bfl["diffusion_model." + key] = value.reshape(-1, 1) if "dora_scale" in key else value
        if key.endswith("lora_down.weight"):
            bfl["diffusion_model." + key.replace("lora_down.weight", "alpha")] = torch.tensor(float(2 * RANK))
    assert difference(applied(ours, bfl, tmp_path), reference) <= 1e-5
    half = kn.apply_lora(ours, tmp_path / "lora.safetensors", 0.5)
    halfway = diffusers_transformer(state)
    with torch.inference_mode():
        for name, module in reference.named_modules():  # peft's merge gives W_dora; halfway is the mean with W
            if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
                base = module.base_layer.weight.detach().clone()
                module.merge()
                halfway.get_submodule(name).weight.copy_((base + module.base_layer.weight) / 2)
    assert difference(half, halfway) <= 1e-5


def test_strength_stacking_and_the_base_model_untouched(state, ours, tmp_path):
    first, second = lora_factors(5), lora_factors(6, rank=2)
    before = difference(ours, diffusers_transformer(state))
    save_file(bfl_lora(second), str(tmp_path / "b.safetensors"))
    stacked = kn.apply_lora(applied(ours, bfl_lora(first), tmp_path, 0.5, name="a.safetensors"),
                            tmp_path / "b.safetensors", -1.5)
    merged = {n: (torch.cat((u1 * 0.5, u2 * -1.5), 1), torch.cat((d1, d2))) for (n, (u1, d1)), (u2, d2)
              in zip(first.items(), second.values())}  # one LoRA of rank 4+2 whose delta is the weighted sum
    assert difference(stacked, with_diffusers_lora(state, bfl_lora(merged))) <= 1e-5
    assert stacked.lora_names == ["a.safetensors", "b.safetensors"]
    assert difference(ours, diffusers_transformer(state)) == before  # the input model never changed


def test_lora_on_a_quantized_model_keeps_it_packed(state, tmp_path):
    """A GGUF model with LoRAs equals its float twin with the same LoRAs; packed data and memory do not change."""
    gguf = pytest.importorskip("gguf")  # noqa: F841
    twin = write_gguf(tmp_path / "klein.gguf", state, lambda n, t: "F32" if t.ndim == 1 or "_in." in n else "Q8_0",
                      "flux")
    save_file(twin, str(tmp_path / "twin.safetensors"))
    quantized = kn.load_transformer(tmp_path / "klein.gguf", dtype=torch.float32)
    reference = kn.load_transformer(tmp_path / "twin.safetensors", dtype=torch.float32)
    packed_before = {n: b.clone() for n, b in quantized.named_buffers()}
    lora = bfl_lora(lora_factors(7))  # LoRAs (beside the matmul) and a LoKr (added to the dequantized weight)
    lora.update({f"diffusion_model.single_blocks.1.linear1.{k}": v for k, v in lokr_tensors(576, 64, 3, True).items()})
    patched = applied(quantized, lora, tmp_path)
    assert [a.kind for a in patched.lora_layers["single_blocks.1.linear1"]] == ["lokr"]
    patched_twin = kn.apply_lora(reference, tmp_path / "lora.safetensors")
    assert any(isinstance(m, QuantizedLinear) for m in patched.modules())
    generator = torch.Generator().manual_seed(0)
    ids, txt = image_ids(2, 3)[None], text_ids(5)[None]
    x, ctx = torch.randn(1, 6, 128, generator=generator), torch.randn(1, 5, 96, generator=generator)
    t = torch.tensor([0.7])
    with torch.inference_mode():
        assert (patched(x, ids, t, ctx, txt) - patched_twin(x, ids, t, ctx, txt)).abs().max() <= 1e-5
        assert (patched(x, ids, t, ctx, txt) - quantized(x, ids, t, ctx, txt)).abs().max() > 1e-2
    assert all(torch.equal(b, packed_before[n]) for n, b in quantized.named_buffers())
    assert {n for n, _ in patched.named_buffers()} == set(packed_before)  # no weight copy was added


def test_text_encoder_lora_matches_transformers_with_peft(tmp_path):
    """ComfyUI names (text_encoders.qwen3_4b.transformer.model.layers...) vs transformers' Qwen3 + peft."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    state = qwen3_state_dict(TINY_QWEN3, seed=8)
    save_file(state, str(tmp_path / "qwen.safetensors"))
    encoder = kn.load_text_encoder(tmp_path / "qwen.safetensors", tokenizer=write_tokenizer(tmp_path / "tok"),
                                   dtype=torch.float32, layers=(1, 2, 3))
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**qwen3_config(TINY_QWEN3)))
    hf.model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=False)
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    hf = get_peft_model(hf, config).eval()
    lora = {k.replace("base_model.model.", "text_encoders.qwen3_4b.transformer."): v
            for k, v in get_peft_model_state_dict(hf).items()}
    patched = applied(encoder, lora, tmp_path)
    ids = torch.tensor([[5, 9, 2, 7, 1, 3]])
    with torch.inference_mode():
        expected = hf(input_ids=ids, output_hidden_states=True).hidden_states
        got = patched.model(ids, torch.ones_like(ids), (1, 2, 3))
        base = encoder.model(ids, torch.ones_like(ids), (1, 2, 3))
    assert max((g - expected[k]).abs().max().item() for g, k in zip(got, (1, 2, 3))) <= 1e-5
    assert (base[2] - expected[2]).abs().max() > 1e-3  # the LoRA did something; the base encoder is unchanged


def test_unknown_keys_are_listed_and_foreign_loras_refused(ours, tmp_path):
    lora = bfl_lora(lora_factors(9, {"double_blocks.0.img_attn.proj": (H, H)}))
    lora["diffusion_model.double_blocks.0.img_attn.norm.query_norm.lora_A.weight"] = torch.zeros(2, 2)
    lora["diffusion_model.double_blocks.0.img_attn.proj.diff_b"] = torch.ones(H)
    with pytest.warns(kn.KleinNote, match="2 keys match no klein transformer layer.*proj.diff_b"):
        patched = applied(ours, lora, tmp_path)
    assert list(patched.lora_layers) == ["double_blocks.0.img_attn.proj"]
    nine_b = bfl_lora(lora_factors(9, {"double_blocks.0.img_attn.proj": (4096, 4096)}))
    with pytest.raises(kn.WrongModelError, match="made for another model"):
        applied(ours, nine_b, tmp_path, name="9b.safetensors")
    with pytest.raises(kn.WrongModelError, match="no layer of this LoRA matches"):
        applied(ours, {"unet.down_blocks.0.lora_A.weight": torch.zeros(2, 2)}, tmp_path, name="sdxl.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(kn.CheckpointError):
        kn.apply_lora(ours, tmp_path / "bad.safetensors")


def test_lora_with_block_streaming(ours, tmp_path):
    """Streamed blocks get their LoRAs too: the same output as the resident model with the LoRA."""
    from klein_nodes.sampling.streaming import BlockStreamer

    patched = applied(ours, bfl_lora(lora_factors(11)), tmp_path)
    resident = sample_forward(patched)
    with BlockStreamer(patched, "cpu", resident_blocks=1):
        streamed = sample_forward(patched)
    assert torch.equal(streamed, resident) and not torch.equal(resident, sample_forward(ours))


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_blocks_match_eager_with_and_without_loras(state, tmp_path):
    """torch.compile'd blocks give the eager numbers, and LoRA copies sharing them still get their adapters."""

    save_file(state, str(tmp_path / "klein.safetensors"))
    model = kn.load_transformer(tmp_path / "klein.safetensors", dtype=torch.float32)
    patched = applied(model, bfl_lora(lora_factors(14)), tmp_path)
    eager, eager_lora = sample_forward(model), sample_forward(patched)
    kn.compile_blocks(model, dynamic=True)
    assert (sample_forward(model) - eager).abs().max() <= 1e-5
    assert (sample_forward(patched) - eager_lora).abs().max() <= 1e-5
    assert (sample_forward(model) - eager).abs().max() <= 1e-5  # the base again, after the LoRA run


def test_a_run_leaves_no_adapter_copies_behind(ours, tmp_path):
    """Device copies of a LoRA live for one sampling run (or one encode), not beyond: between runs a LoRA holds
    no memory ComfyUI's memory manager cannot see."""
    patched = applied(ours, bfl_lora(lora_factors(15)), tmp_path)
    adapters = [a for layer in patched.lora_layers.values() for a in layer]
    sample_forward(patched)  # a bare forward keeps them for the next forward
    assert all(a._placed for a in adapters)
    noise = torch.randn(1, 128, 2, 3, generator=torch.Generator().manual_seed(0))
    sample(patched, noise, Conditioning(torch.randn(1, 5, TINY_TRANSFORMER.context_in_dim)), [1.0, 0.5, 0.0])
    assert not any(a._placed for a in adapters)


LAYER = "diffusion_model.double_blocks.0.img_attn.qkv"
RANDOM = torch.Generator().manual_seed(3)


def lora_file(tmp_path, **tensors):
    path = tmp_path / "lora.safetensors"
    save_file({f"{LAYER}.{role}": tensor for role, tensor in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize("tensors,fragment", [
    ({"lora_down.weight": torch.randn(4, 64, generator=RANDOM),
      "lora_up.weight": torch.randn(192, 3, generator=RANDOM)},
     "up (192, 3) and down (4, 64) do not agree on a rank above 0"),
    ({"lora_down.weight": torch.zeros(0, 64), "lora_up.weight": torch.zeros(192, 0)}, "do not agree on a rank above 0"),
    ({"lora_down.weight": torch.randn(4, 64, generator=RANDOM), "lora_up.weight": torch.randn(192, 4, generator=RANDOM),
      "alpha": torch.tensor(float("nan"))}, "its alpha is nan, not one finite number"),
    ({"lora_down.weight": torch.randn(4, 64, generator=RANDOM), "lora_up.weight": torch.randn(192, 4, generator=RANDOM),
      "alpha": torch.ones(3)}, "its alpha is [1.0, 1.0, 1.0], not one finite number"),
    ({"lora_down.weight": torch.full((4, 64), float("inf")), "lora_up.weight": torch.randn(192, 4, generator=RANDOM)},
     "its down holds NaN or infinite values"),
    ({"hada_w1_a": torch.randn(192, 2, generator=RANDOM), "hada_w1_b": torch.randn(2, 64, generator=RANDOM),
      "hada_w2_a": torch.randn(192, 2, generator=RANDOM), "hada_w2_b": torch.randn(2, 32, generator=RANDOM)},
     "its two Hadamard factors make (192, 64) and (192, 32)"),
])
def test_broken_lora_structure_is_refused_when_applied(ours, tmp_path, tensors, fragment):
    path = lora_file(tmp_path, **tensors)
    with pytest.raises(kn.CheckpointError,
                       match="lora.safetensors: LoRA layer '.*double_blocks.0.img_attn.qkv'") as info:
        kn.apply_lora(ours, path)
    assert fragment in str(info.value)


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), "0.5"])
def test_lora_strength_must_be_a_finite_number(ours, tmp_path, strength):
    path = lora_file(tmp_path, **{"lora_down.weight": torch.randn(4, 64, generator=RANDOM),
                                  "lora_up.weight": torch.randn(192, 4, generator=RANDOM)})
    with pytest.raises(kn.KleinError, match="LoRA strength must be a finite number"):
        kn.apply_lora(ours, path, strength)


SDXL = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 640),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(640, 4),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4)}
FLUX1_CLIP = {f"lora_te1_text_model_encoder_layers_{i}_mlp_fc1.lora_{r}.weight": torch.zeros(4, 4)
              for i in range(2) for r in ("down", "up")}


@pytest.mark.parametrize("lora, family", [(SDXL, "a Stable Diffusion UNet"), (FLUX1_CLIP, "CLIP or T5 text encoders")])
def test_a_lora_of_which_nothing_applies_is_refused_by_name(ours, tmp_path, lora, family):
    """An SDXL LoRA (UNet + CLIP-L) or CLIP-only layers: nothing reaches klein, with or without a text encoder."""
    from klein_nodes.loaders.lora import apply_lora_pair

    save_file(lora, str(tmp_path / "other.safetensors"))
    with pytest.raises(kn.WrongModelError, match=f"other.safetensors: nothing in this LoRA applies to FLUX.2 "
                                                 f"\\[klein\\]: it looks made for {family}"):
        apply_lora_pair(ours, None, tmp_path / "other.safetensors", 1.0)
    with pytest.raises(kn.WrongModelError, match="nothing in this LoRA applies"):
        apply_lora_pair(ours, None, tmp_path / "other.safetensors", 0.0)  # refused even at strength 0


def peft_lora_file(tmp_path, adapter_metadata, name="lora.safetensors"):
    """One diffusers-named LoRA layer without an alpha tensor (its scale comes from the header), with
    `adapter_metadata` as diffusers' `lora_adapter_metadata` header."""
    lora = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(RANK, H, generator=RANDOM),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(H, RANK, generator=RANDOM)}
    save_file(lora, str(tmp_path / name), metadata={"lora_adapter_metadata": adapter_metadata})
    return tmp_path / name


def fields(**config):
    """diffusers' lora_adapter_metadata: peft LoraConfig fields under the component's prefix."""
    return json.dumps({f"transformer.{k}": v for k, v in config.items()})


def malformed(text, fragment, id):
    return pytest.param(text, fragment, id=id)


MALFORMED_METADATA = [
    malformed("[1, 2]", "lora_adapter_metadata must be a JSON object of LoRA config fields, not a JSON list", "list"),
    malformed("8", "lora_adapter_metadata must be a JSON object of LoRA config fields, not 8", "number"),
    malformed('"x"', 'lora_adapter_metadata must be a JSON object of LoRA config fields, not "x"', "string"),
    malformed('{"transformer.lora_alpha": 8', "lora_adapter_metadata is not valid JSON", "truncated"),
    malformed("[" * 100_000, "lora_adapter_metadata nests JSON deeper than the 16 levels", "deep-open"),
    malformed("[" * 100_000 + "]" * 100_000, "nests JSON deeper than the 16 levels", "deep-balanced"),
    malformed('{"a": ' * 50_000 + "1" + "}" * 50_000, "nests JSON deeper than the 16 levels", "deep-objects"),
    malformed('{"transformer.lora_alpha": 8, "transformer.alpha_pattern": ' + "[" * 17 + "]" * 17 + "}",
              "nests JSON deeper than the 16 levels", "deep-field"),
    malformed('{"x": "' + "a" * (1 << 20) + '"}', "characters, more than the 1048576 a LoRA config can need", "huge"),
    malformed('{"x": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", "transformer.lora_alpha": 0}',
              "lora_adapter_metadata.transformer.lora_alpha must be a finite number above 0, not 0",
              "brackets-in-strings-are-not-nesting"),
    malformed(fields(lora_alpha=8, alpha_pattern=["to_q", 4]), "lora_adapter_metadata.transformer.alpha_pattern "
              "must be an object mapping module names to numbers above 0, not a JSON list", "alpha_pattern-list"),
    malformed(fields(lora_alpha=8, alpha_pattern=7), "transformer.alpha_pattern must be an object mapping module "
              "names to numbers above 0, not 7", "alpha_pattern-number"),
    malformed(fields(lora_alpha=8, alpha_pattern={"to_q": "4"}),
              'lora_adapter_metadata.transformer.alpha_pattern["to_q"] must be a finite number above 0, not "4"',
              "alpha_pattern-value-string"),
    malformed(fields(lora_alpha=8, alpha_pattern={"to_q": None}), 'alpha_pattern["to_q"] must be a finite number '
              "above 0, not null", "alpha_pattern-value-null"),
    malformed(fields(lora_alpha=8, alpha_pattern={"to_q": -2}), "not -2", "alpha_pattern-value-negative"),
    malformed(fields(lora_alpha=8, alpha_pattern={f"m{i}": 1 for i in range(2000)}),
              "transformer.alpha_pattern has 2000 entries, more than the 1024", "alpha_pattern-too-long"),
    malformed(fields(lora_alpha="8"), 'transformer.lora_alpha must be a finite number above 0, not "8"', "alpha-str"),
    malformed(fields(lora_alpha=True), "transformer.lora_alpha must be a finite number above 0, not true",
              "alpha-bool"),
    malformed('{"transformer.lora_alpha": NaN}', "lora_alpha must be a finite number above 0, not NaN", "alpha-nan"),
    malformed('{"transformer.lora_alpha": 1e400}', "lora_alpha must be a finite number above 0, not Infinity",
              "alpha-inf"),
    malformed('{"transformer.lora_alpha": 1' + "0" * 400 + "}", "lora_alpha must be a finite number above 0, not "
              "1000", "alpha-beyond-float"),
    malformed(fields(lora_alpha=0), "lora_alpha must be a finite number above 0, not 0", "alpha-zero"),
    malformed(fields(lora_alpha=-8), "lora_alpha must be a finite number above 0, not -8", "alpha-negative"),
    malformed(fields(lora_alpha={"v": 8}), "lora_alpha must be a finite number above 0, not a JSON object",
              "alpha-object"),
    malformed(fields(lora_alpha=8, r="4"),
              'lora_adapter_metadata.transformer.r must be a whole number above 0, not "4"', "r-str"),
    malformed(fields(lora_alpha=8, r=True), "transformer.r must be a whole number above 0, not true", "r-bool"),
    malformed(fields(lora_alpha=8, r=0), "transformer.r must be a whole number above 0, not 0", "r-zero"),
    malformed(fields(lora_alpha=8, r=-4), "transformer.r must be a whole number above 0, not -4", "r-negative"),
    malformed(fields(lora_alpha=8, r=float("nan")), "transformer.r must be a whole number above 0, not NaN", "r-nan"),
    malformed(fields(lora_alpha=8, use_rslora="yes"), 'transformer.use_rslora must be true or false, not "yes"',
              "rslora-str"),
]


@pytest.mark.parametrize("adapter_metadata, fragment", MALFORMED_METADATA)
def test_malformed_lora_adapter_metadata_is_refused_by_field(ours, tmp_path, adapter_metadata, fragment):
    """Valid JSON of the wrong shape, the wrong types, NaN/0/negative alphas, deep nesting, too much of it: one
    CheckpointError naming the file and the field, never a raw exception, before anything is applied."""
    path = peft_lora_file(tmp_path, adapter_metadata)
    with pytest.raises(kn.CheckpointError, match="^lora.safetensors: lora_adapter_metadata") as info:
        kn.apply_lora(ours, path)
    assert fragment in str(info.value)
    assert "re-export the LoRA" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("key", [
    "(a+)+$", "(t|to|to_)*_x", r"(\w+)+\.to_x", "(.*)*z", "to_q(", "[to_q", "to_q{2,", "a**", "to_q|to_k", "^to_q",
    r"to_out\.0",
])
def test_alpha_pattern_keys_are_never_run_as_regular_expressions(ours, tmp_path, key):
    r"""peft compiles alpha_pattern keys into `(.*\.)?(key)$`: a file's key could raise re.error or backtrack for
    hours against a long module name. klein reads keys as module names and refuses any other regex syntax, at once
    and by name, on both ways of applying a LoRA."""
    from klein_nodes.loaders.lora import apply_lora_pair

    path = peft_lora_file(tmp_path, fields(lora_alpha=8, alpha_pattern={"to_k": 2, key: 4}))
    for apply in (lambda: kn.apply_lora(ours, path), lambda: apply_lora_pair(ours, None, path)):
        start = time.perf_counter()
        with pytest.raises(kn.CheckpointError, match="^lora.safetensors: lora_adapter_metadata.transformer"
                                                     ".alpha_pattern key ") as info:
            apply()
        assert time.perf_counter() - start < 0.5
        assert json.dumps(key) in str(info.value)
        assert "alpha_pattern keys must be module names ('to_q', 'transformer_blocks.0.attn.to_q')" in str(info.value)


def test_well_formed_lora_adapter_metadata_still_applies(ours, tmp_path):
    """An empty header, null fields and keys that match nothing are not errors; a file of lora_alpha 8 without
    alpha_pattern scales by 8 / rank, rsLoRA by 8 / sqrt(rank); a long, flat pattern is quick to match."""
    def scale(text):
        patched = kn.apply_lora(ours, peft_lora_file(tmp_path, text))
        (adapter,) = patched.lora_layers["double_blocks.0.img_attn.qkv"]
        return adapter.scale

    assert scale("") == scale("{}") == scale(fields(lora_alpha=None, alpha_pattern=None)) == 1.0
    assert scale(fields(lora_alpha=8, r=RANK, use_rslora=False, alpha_pattern={})) == 8 / RANK
    assert scale(fields(lora_alpha=8, use_rslora=True)) == 8 / RANK ** 0.5
    assert scale(fields(lora_alpha=8, alpha_pattern={"my-module name": 1, "": 2, "to_k": 3})) == 8 / RANK
    many = {f"transformer_blocks.{i}.attn.to_{c}": 1 for i in range(1, 301) for c in "qkv"}  # not block 0
    start = time.perf_counter()
    assert scale(fields(lora_alpha=8, alpha_pattern={**many, "attn.to_q": 2})) == 2 / RANK  # 901 entries
    assert time.perf_counter() - start < 1.0


MODULE_NAME_KEYS = ["to_q", "attn.to_q", "q", "o_q", ".to_q", "to_q.", "", "attn", "0.attn.to_q", "blocks.0.attn.to_q",
                    "transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_out", "to_out.0", "to_out",
                    "out.0", "0", "a.tn.to_q", "attn.to.q", "to.add_out", "ff.linear_in", "ff_context.linear_in",
                    "...........to_q", "transformer.transformer_blocks.0.attn.to_q", "norm_out.linear", "x_embedder"]


def test_alpha_pattern_keys_match_as_in_peft(state):
    """Oracle: for module-name keys ('.' included, which peft's regex reads as any character) our matcher agrees with
    peft's own get_pattern_key on every module name of the diffusers model."""
    from peft.utils.other import get_pattern_key

    from klein_nodes.loaders.lora import pattern_matches

    names = [name for name, _ in diffusers_transformer(state).named_modules() if name]
    matched = 0
    for key in MODULE_NAME_KEYS:
        for name in names:
            assert pattern_matches(key, name) == (get_pattern_key([key], name) == key), (key, name)
            matched += pattern_matches(key, name)
    assert matched > 20


@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_alpha_pattern_gives_each_layer_the_alpha_peft_gives_it(state, ours, tmp_path, order):
    """Oracle: a peft adapter with overlapping alpha_pattern keys, whole names, suffixes and a '.' standing for '_',
    saved by diffusers (which sorts the keys) or with the keys in reverse: every layer's scale is the one peft gives
    when diffusers loads the file (the first matching key in file order wins), and so is the output."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    from klein_nodes.loaders.lora import adapter_config, peft_scale, read_lora

    pattern = {"transformer_blocks.1.attn.to_q": 3, "to_q": 5, "attn.to_k": 2, "0.attn.add_v_proj": 12,
               "add_v_proj": 1.5, "to.add_out": 7, "to_out.0": 9, "ff.linear_in": 10, "linear_in": 0.5}
    targets = ["to_q", "to_k", "to_v", "add_v_proj", "to_add_out", "to_out.0", "linear_in", "linear_out"]
    trained = diffusers_transformer(state)
    config = LoraConfig(r=RANK, lora_alpha=6, alpha_pattern=pattern, target_modules=targets, init_lora_weights=False)
    trained.add_adapter(config)
    diffusers.Flux2KleinPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(trained),
        transformer_lora_adapter_metadata=config.to_dict())
    path = tmp_path / "pytorch_lora_weights.safetensors"
    if order == "reversed":
        with safe_open(str(path), "pt") as f:
            lora, fields = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["lora_adapter_metadata"])
        fields["transformer.alpha_pattern"] = dict(reversed(fields["transformer.alpha_pattern"].items()))
        save_file(lora, str(path), metadata={"lora_adapter_metadata": json.dumps(fields)})
    reference = diffusers_transformer(state)
    diffusers.Flux2KleinPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                 transformer=reference).load_lora_weights(str(path))
    scales = {name: next(iter(module.scaling.values())) for name, module in reference.named_modules()
              if getattr(module, "scaling", None)}
    ours_config = adapter_config(read_lora(path)[1], "transformer")
    for name, expected in scales.items():
        assert peft_scale(ours_config, "transformer." + name, RANK) == pytest.approx(expected), name
    # "to_q" sorts before "transformer_blocks.1.attn.to_q": the first key in the file wins
    assert scales["transformer_blocks.1.attn.to_q"] == (5 if order == "sorted" else 3) / RANK
    assert scales["transformer_blocks.0.attn.to_q"] == 5 / RANK
    assert scales["transformer_blocks.0.attn.add_v_proj"] == (12 if order == "sorted" else 1.5) / RANK
    assert scales["transformer_blocks.0.ff_context.linear_in"] == 0.5 / RANK
    assert scales["transformer_blocks.0.attn.to_add_out"] == 7 / RANK and len(set(scales.values())) >= 6
    assert difference(kn.apply_lora(ours, path), reference) <= 1e-5
