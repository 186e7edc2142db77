"""fp8 checkpoints (BFL weight_scale, ComfyUI comfy_quant / _quantization_metadata, legacy scaled_fp8) load with
fp8 weights kept and match their dequantized float twins."""

import json

import pytest
import torch
from safetensors.torch import save_file

import klein_nodes as kn
from klein_nodes.quant.fp8 import Fp8Linear, native_fp8
from klein_nodes.testing import TINY_QWEN3, TINY_TRANSFORMER, qwen3_state_dict, transformer_state_dict, write_tokenizer
from helpers import refused_by_name, sample_forward


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


LAYER = "double_blocks.0.img_mlp.0"  # a (384, 64) linear


def refused_before_weights(path, monkeypatch, *fragments, values_read=False):
    """load_transformer refuses `path` with one CheckpointError naming the file and `fragments`; unless the problem
    is in the values (`values_read`), before any weight is read."""
    from klein_nodes.loaders.safetensors_io import SafetensorsFile

    read, get = [], SafetensorsFile.get
    monkeypatch.setattr(SafetensorsFile, "get", lambda self, name: read.append(name) or get(self, name))
    message = refused_by_name(path, *fragments)
    if not values_read:
        assert not [name for name in read if name.endswith(".weight")], read
    return message


@pytest.mark.parametrize("style", ["bfl", "scaled_fp8"])
@pytest.mark.parametrize("role,value,fragment", [
    ("weight_scale", torch.zeros(0), "its weight_scale is float32 of shape (0,); an fp8 layer takes one float scale"),
    ("weight_scale", torch.ones(2), "its weight_scale is float32 of shape (2,)"),
    ("weight_scale", torch.ones(384), "its weight_scale is float32 of shape (384,)"),
    ("weight_scale", torch.tensor(3), "its weight_scale is int64 of shape ()"),
    ("input_scale", torch.zeros(0), "its input_scale is float32 of shape (0,)"),
    ("input_scale", torch.ones(3, 3), "its input_scale is float32 of shape (3, 3)"),
])
def test_fp8_scales_of_the_wrong_size_are_refused(tmp_path, monkeypatch, style, role, value, fragment):
    """A per-tensor scale that is not one float reached `reshape(())` ("shape '[]' is invalid for input of size
    0"): now named, before any weight is read."""
    tensors, _, _ = to_fp8(transformer_state_dict(TINY_TRANSFORMER), is_block_linear, style)
    legacy = {"weight_scale": "scale_weight", "input_scale": "scale_input"}
    tensors[f"{LAYER}.{legacy[role] if style == 'scaled_fp8' else role}"] = value
    save_file(tensors, str(tmp_path / "odd.safetensors"))
    refused_before_weights(tmp_path / "odd.safetensors", monkeypatch, f"{LAYER}: {fragment}")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_fp8_scales_that_are_not_finite_are_refused(tmp_path, monkeypatch, value):
    tensors, _, _ = to_fp8(transformer_state_dict(TINY_TRANSFORMER), is_block_linear, "bfl")
    tensors[f"{LAYER}.weight_scale"] = torch.tensor(value)
    save_file(tensors, str(tmp_path / "nan.safetensors"))
    refused_before_weights(tmp_path / "nan.safetensors", monkeypatch,
                           f"{LAYER}: its weight_scale is {value}, not a finite number", values_read=True)


def test_a_quantized_norm_is_refused(tmp_path, monkeypatch):
    """A comfy_quant marker on a norm (a 1-D fp8 tensor) made it a quantized layer with no linear to replace."""
    tensors, _, _ = to_fp8(transformer_state_dict(TINY_TRANSFORMER), is_block_linear, "comfy_quant")
    norm = "double_blocks.0.img_attn.norm.query_norm"
    tensors[f"{norm}.weight"] = tensors.pop(f"{norm}.scale").to(torch.float8_e4m3fn)
    tensors[f"{norm}.weight_scale"] = torch.tensor(1.0)
    tensors[f"{norm}.comfy_quant"] = tensors[f"{LAYER}.comfy_quant"].clone()
    save_file(tensors, str(tmp_path / "norm.safetensors"))
    refused_before_weights(tmp_path / "norm.safetensors", monkeypatch, f"'{norm}.weight' is stored as float8_e4m3fn, "
                           "but only the weights of linear layers may be quantized")


@pytest.mark.parametrize("shape", [(), (0,), (384,), (0, 64), (384, 64, 1), (64, 384)])
def test_fp8_weights_of_degenerate_shapes_are_refused(tmp_path, monkeypatch, shape):
    tensors, _, _ = to_fp8(transformer_state_dict(TINY_TRANSFORMER), is_block_linear, "comfy_quant")
    tensors[f"{LAYER}.weight"] = torch.zeros(shape, dtype=torch.float8_e4m3fn)
    save_file(tensors, str(tmp_path / "odd.safetensors"))
    refused_before_weights(tmp_path / "odd.safetensors", monkeypatch, f"{LAYER}.weight {shape} (expected (384, 64))")


def nvfp4_file(state):
    """Block linears as ComfyUI's nvfp4 (random codes, small block scales, a global scale), the rest float."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, tensor in state.items():
        if not is_block_linear(name, tensor):
            tensors[name] = tensor
            continue
        layer, (rows, cols) = name[: -len(".weight")], tensor.shape
        tensors[name] = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=generator)
        tensors[f"{layer}.weight_scale"] = torch.full((-(-rows // 128) * 128, -(-cols // 64) * 4),
                                                      0.01).to(torch.float8_e4m3fn)
        tensors[f"{layer}.weight_scale_2"] = torch.tensor(0.5)
        tensors[f"{layer}.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    return tensors


@pytest.mark.parametrize("role,value,fragment", [
    ("weight_scale", torch.ones(384, 4), "nvfp4 block scales are float32 (384, 4), not float8_e4m3fn"),
    ("weight_scale", torch.zeros((), dtype=torch.float8_e4m3fn), "nvfp4 block scales hold 1 values; a 384x4 grid "
                                                                 "needs 1536"),
    ("weight_scale_2", torch.ones(2), "its weight_scale_2 is float32 (2,); nvfp4 takes one float global scale"),
    ("weight_scale_2", torch.zeros(0), "its weight_scale_2 is float32 (0,)"),
    ("pre_quant_scale", torch.ones(32), "its pre_quant_scale is float32 (32,); it needs one float per input feature "
                                        "(64)"),
    ("pre_quant_scale", torch.ones(384, 64), "its pre_quant_scale is float32 (384, 64)"),
])
def test_nvfp4_scales_of_the_wrong_size_or_type_are_refused(tmp_path, monkeypatch, role, value, fragment):
    """Scales that used to fail in `reshape(())`, or only in the first forward (a float32 block scale viewed as
    fp8, a smoothing vector of the wrong length), are named before any weight is read."""
    tensors = nvfp4_file(transformer_state_dict(TINY_TRANSFORMER))
    save_file(tensors, str(tmp_path / "good.safetensors"))
    assert torch.isfinite(sample_forward(kn.load_transformer(tmp_path / "good.safetensors"))).all()
    tensors[f"{LAYER}.{role}"] = value
    save_file(tensors, str(tmp_path / "odd.safetensors"))
    refused_before_weights(tmp_path / "odd.safetensors", monkeypatch, f"{LAYER}: {fragment}")
