"""fp8 checkpoints (BFL weight_scale, ComfyUI comfy_quant / _quantization_metadata, legacy scaled_fp8) load with
fp8 weights kept and match their dequantized float twins."""

import json

import pytest
import torch
from safetensors.torch import save_file

import klein_nodes as kn
from klein_nodes.quant.fp8 import Fp8Linear, native_fp8
from klein_nodes.testing import TINY_QWEN3, TINY_TRANSFORMER, qwen3_state_dict, transformer_state_dict, write_tokenizer
from helpers import sample_forward


def is_block_linear(name, tensor):
    return tensor.ndim == 2 and name.startswith(("double_blocks", "single_blocks"))


def to_fp8(state, select, style):
    """(file tensors, header metadata, float twin): selected weights as float8_e4m3fn with a per-tensor scale."""
    tensors, twin, layers = {}, {}, {}
    for name, tensor in state.items():
        if not select(name, tensor):
            tensors[name] = tensor.bfloat16()
            twin[name] = tensors[name].float()
            continue
        layer = name[: -len(".weight")]
        scale = tensor.abs().max() / 448
        quantized = (tensor / scale).to(torch.float8_e4m3fn)
        tensors[name], twin[name] = quantized, quantized.float() * scale
        if style == "scaled_fp8":
            tensors[f"{layer}.scale_weight"], tensors[f"{layer}.scale_input"] = scale.reshape(1), torch.ones(1)
        else:
            tensors[f"{layer}.weight_scale"] = scale.reshape(())
        if style == "comfy_quant":
            tensors[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                           dtype=torch.uint8)
        layers[layer] = {"format": "float8_e4m3fn"}
    if style == "scaled_fp8":
        tensors["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    metadata = {"_quantization_metadata": json.dumps({"layers": layers})} if style == "header" else None
    return tensors, metadata, twin


@pytest.mark.parametrize("style", ["bfl", "comfy_quant", "header", "scaled_fp8"])
def test_fp8_transformer_matches_its_twin(tmp_path, style):
    tensors, metadata, twin = to_fp8(transformer_state_dict(TINY_TRANSFORMER, seed=2), is_block_linear, style)
    save_file(tensors, str(tmp_path / "klein-fp8.safetensors"), metadata=metadata)
    save_file(twin, str(tmp_path / "twin.safetensors"))
    fp8 = kn.load_transformer(tmp_path / "klein-fp8.safetensors", dtype=torch.float32)
    reference = kn.load_transformer(tmp_path / "twin.safetensors", dtype=torch.float32)
    layers = [m for m in fp8.modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 2 * 8 + 2 * 2 and all(m.weight.dtype == torch.float8_e4m3fn for m in layers)
    assert "fp8, 20 layers" in fp8.description
    assert (sample_forward(fp8) - sample_forward(reference)).abs().max() <= 1e-5


def test_fp8_without_scale_is_refused(tmp_path):
    tensors, _, _ = to_fp8(transformer_state_dict(TINY_TRANSFORMER), is_block_linear, "bfl")
    del tensors["single_blocks.1.linear2.weight_scale"]
    save_file(tensors, str(tmp_path / "noscale.safetensors"))
    with pytest.raises(kn.CheckpointError,
                       match="single_blocks.1.linear2.weight. is fp8 but has no weight_scale or scale_weight"):
        kn.load_transformer(tmp_path / "noscale.safetensors")


def comfy_fp8_save(state):
    """(file tensors, float twin) as ComfyUI saves a model cast to fp8: every float tensor float8_e4m3fn, no scale,
    no marker."""
    tensors = {name: tensor.to(torch.float8_e4m3fn) for name, tensor in state.items()}
    return tensors, {name: tensor.float() for name, tensor in tensors.items()}


def test_unscaled_comfyui_fp8_save_loads_with_scale_one(tmp_path):
    tensors, twin = comfy_fp8_save(transformer_state_dict(TINY_TRANSFORMER, seed=2))
    save_file(tensors, str(tmp_path / "comfy-fp8.safetensors"))
    save_file(twin, str(tmp_path / "twin.safetensors"))
    fp8 = kn.load_transformer(tmp_path / "comfy-fp8.safetensors")
    assert fp8.img_in.weight.dtype == torch.float8_e4m3fn and fp8.final_layer.linear.weight_scale == 1
    assert next(p for n, p in fp8.named_parameters() if n.endswith("scale")).dtype == torch.bfloat16  # compute dtype
    fp8, reference = (kn.load_transformer(tmp_path / name, dtype=torch.float32)
                      for name in ("comfy-fp8.safetensors", "twin.safetensors"))
    assert (sample_forward(fp8) - sample_forward(reference)).abs().max() <= 1e-5


def test_unscaled_comfyui_fp8_text_encoder_keeps_its_embedding_a_table(tmp_path):
    tensors, twin = comfy_fp8_save(qwen3_state_dict(TINY_QWEN3, seed=3))
    save_file(tensors, str(tmp_path / "qwen-fp8.safetensors"))
    save_file(twin, str(tmp_path / "twin.safetensors"))
    tokenizer = write_tokenizer(tmp_path / "tok")
    fp8, reference = (kn.load_text_encoder(tmp_path / name, tokenizer=tokenizer, dtype=torch.float32, layers=(1, 2, 3))
                      for name in ("qwen-fp8.safetensors", "twin.safetensors"))
    assert sum(isinstance(m, Fp8Linear) for m in fp8.model.modules()) == 3 * 7
    assert not isinstance(fp8.model.embed_tokens, Fp8Linear)
    assert (fp8.encode("a cat", max_length=32, layers=(1, 2, 3)) -
            reference.encode("a cat", max_length=32, layers=(1, 2, 3))).abs().max() <= 1e-5


def test_unsupported_comfy_format_is_named(tmp_path):
    tensors, _, _ = to_fp8(transformer_state_dict(TINY_TRANSFORMER), is_block_linear, "comfy_quant")
    tensors["double_blocks.0.img_mlp.0.comfy_quant"] = torch.tensor(list(b'{"format": "mxfp8"}'), dtype=torch.uint8)
    save_file(tensors, str(tmp_path / "mxfp8.safetensors"))
    with pytest.raises(kn.CheckpointError, match="format.s. mxfp8 are not supported"):
        kn.load_transformer(tmp_path / "mxfp8.safetensors")


def test_fp8_mixed_text_encoder(tmp_path):
    """ComfyUI's qwen_3_8b_fp8mixed style: some Qwen3 linears fp8 with comfy_quant markers."""
    state = qwen3_state_dict(TINY_QWEN3, seed=3)
    select = lambda name, tensor: tensor.ndim == 2 and ".mlp." in name  # noqa: E731
    tensors, _, twin = to_fp8(state, select, "comfy_quant")
    save_file(tensors, str(tmp_path / "qwen_fp8mixed.safetensors"))
    save_file(twin, str(tmp_path / "twin.safetensors"))
    tokenizer = write_tokenizer(tmp_path / "tok")
    fp8 = kn.load_text_encoder(tmp_path / "qwen_fp8mixed.safetensors", tokenizer=tokenizer, dtype=torch.float32,
                               layers=(1, 2, 3))
    reference = kn.load_text_encoder(tmp_path / "twin.safetensors", tokenizer=tokenizer, dtype=torch.float32,
                                     layers=(1, 2, 3))
    assert sum(isinstance(m, Fp8Linear) for m in fp8.model.modules()) == 3 * 3
    assert (fp8.encode("a cat", max_length=32, layers=(1, 2, 3)) -
            reference.encode("a cat", max_length=32, layers=(1, 2, 3))).abs().max() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available() or not native_fp8("cuda"), reason="needs a CUDA GPU with SM >= 8.9")
def test_scaled_mm_path_close_to_dequantized():
    weight = torch.randn(256, 512, device="cuda")
    scale = weight.abs().max() / 448
    layer = Fp8Linear((weight / scale).to(torch.float8_e4m3fn), scale, compute_dtype=torch.bfloat16)
    x = torch.randn(4, 77, 512, device="cuda", dtype=torch.bfloat16)
    exact = torch.nn.functional.linear(x, layer.dequantized())
    assert ((layer(x) - exact).abs().max() / exact.abs().max()) < 0.05


def test_failing_fp8_matmul_falls_back_to_dequantizing(monkeypatch, caplog):
    from klein_nodes.quant import fp8

    weight = torch.randn(32, 64)
    scale = weight.abs().max() / 448
    layer = Fp8Linear((weight / scale).to(torch.float8_e4m3fn), scale, compute_dtype=torch.float32)
    monkeypatch.setattr(fp8, "native_fp8", lambda device: True)
    monkeypatch.setattr(Fp8Linear, "native", True)

    def unsupported(self, x):
        raise RuntimeError("Multiplication of two Float8_e4m3fn matrices is only supported on CUDA devices "
                           "with compute capability >= 9.0")
    monkeypatch.setattr(Fp8Linear, "scaled_mm", unsupported)
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.dequantized()))
    assert Fp8Linear.native is False and "dequantizing fp8 weights instead" in caplog.text


@pytest.mark.parametrize("marker,fragment", [
    (torch.tensor(list(b'["float8_e4m3fn"]'), dtype=torch.uint8), "not a JSON quantization marker with a \"format\""),
    (torch.tensor(list(b'{"fmt": 1}'), dtype=torch.uint8), "not a JSON quantization marker with a \"format\""),
    (torch.tensor(list(b'[' * 5000), dtype=torch.uint8), "expected a short uint8 string, found torch.uint8 (5000,)"),
    (torch.zeros(4, dtype=torch.float32), "expected a short uint8 string, found torch.float32"),
])
def test_markers_of_the_wrong_shape_or_type_are_refused(tmp_path, marker, fragment):
    tensors, _, _ = to_fp8(transformer_state_dict(TINY_TRANSFORMER), is_block_linear, "comfy_quant")
    tensors["double_blocks.0.img_mlp.0.comfy_quant"] = marker
    save_file(tensors, str(tmp_path / "odd.safetensors"))
    with pytest.raises(kn.CheckpointError, match="double_blocks.0.img_mlp.0.comfy_quant' is not a") as info:
        kn.load_transformer(tmp_path / "odd.safetensors")
    assert fragment in str(info.value)


def test_quantization_header_of_the_wrong_shape_is_refused(tmp_path):
    tensors, _, _ = to_fp8(transformer_state_dict(TINY_TRANSFORMER), is_block_linear, "bfl")
    save_file(tensors, str(tmp_path / "odd.safetensors"), metadata={"_quantization_metadata": '{"layers": ["a"]}'})
    with pytest.raises(kn.CheckpointError, match="unreadable _quantization_metadata header"):
        kn.load_transformer(tmp_path / "odd.safetensors")
