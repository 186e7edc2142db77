"""ComfyUI nvfp4 layers (comfy_quant "nvfp4"): dequantization bit-exact with comfy-kitchen's, checkpoints with
nvfp4 layers load packed and match their dequantized float twins."""

import json

import pytest
import torch
from safetensors.torch import save_file

import klein_nodes as kn
from klein_nodes.quant.nvfp4 import Nvfp4Linear, dequantize_nvfp4
from klein_nodes.testing import TINY_QWEN3, TINY_TRANSFORMER, qwen3_state_dict, transformer_state_dict, write_tokenizer
from helpers import sample_forward

ck = pytest.importorskip("comfy_kitchen")


def quantize(weight):
    """comfy-kitchen's own quantizer: (packed, block scales, global scale)."""
    global_scale = weight.abs().amax().float() / (448.0 * 6.0)
    packed, block_scale = ck.quantize_nvfp4(weight.float(), global_scale)
    return packed, block_scale, global_scale


@pytest.mark.parametrize("shape", [(128, 64), (48, 96), (300, 160)])
def test_dequantize_is_bit_exact_with_comfy_kitchen(shape):
    packed, block_scale, global_scale = quantize(torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3)
    ours = dequantize_nvfp4(packed, block_scale, global_scale)
    theirs = ck.dequantize_nvfp4(packed, global_scale, block_scale, torch.float32)[: shape[0]]
    assert ours.shape == shape and torch.equal(ours, theirs)


def test_nibble_order_and_scale_layout():
    """Even elements live in the high nibble; the block scale of row r, group g sits in its blocked-layout slot."""
    packed = torch.zeros(128, 16, dtype=torch.uint8)
    packed[5, 0] = 0x71  # elements 0 and 1 of row 5: codes 7 (6.0) and 1 (0.5)
    grid = torch.ones(128, 4)
    grid[5, 0] = 2.0
    blocked = grid.reshape(1, 128, 1, 4).permute(0, 2, 1, 3).reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1)
    weight = dequantize_nvfp4(packed, blocked.to(torch.float8_e4m3fn), torch.tensor(0.5))
    assert weight[5, :3].tolist() == [6.0, 0.5, 0.0] and weight.abs().sum() == 6.5


def to_nvfp4(state, select, style):
    """(file tensors, header metadata, float twin) with the selected weights nvfp4 as ComfyUI writes them."""
    tensors, twin, layers = {}, {}, {}
    for name, tensor in state.items():
        if not select(name, tensor):
            tensors[name] = twin[name] = tensor.float()
            continue
        layer = name[: -len(".weight")]
        packed, block_scale, global_scale = quantize(tensor)
        tensors[name], tensors[f"{layer}.weight_scale"] = packed, block_scale
        tensors[f"{layer}.weight_scale_2"] = global_scale
        twin[name] = ck.dequantize_nvfp4(packed, global_scale, block_scale, torch.float32)
        if style == "comfy_quant":
            tensors[f"{layer}.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
        layers[("model.diffusion_model." if style == "header" else "") + layer] = {"format": "nvfp4"}
    metadata = {"_quantization_metadata": json.dumps({"layers": layers})} if style == "header" else None
    return tensors, metadata, twin


def is_block_linear(name, tensor):
    return tensor.ndim == 2 and name.startswith(("double_blocks", "single_blocks"))


@pytest.mark.parametrize("style", ["comfy_quant", "header"])
def test_nvfp4_transformer_matches_its_twin(tmp_path, style):
    tensors, metadata, twin = to_nvfp4(transformer_state_dict(TINY_TRANSFORMER, seed=4), is_block_linear, style)
    if style == "header":
        tensors = {"model.diffusion_model." + k: v for k, v in tensors.items()}
    save_file(tensors, str(tmp_path / "klein-nvfp4.safetensors"), metadata=metadata)
    save_file(twin, str(tmp_path / "twin.safetensors"))
    packed = kn.load_transformer(tmp_path / "klein-nvfp4.safetensors", dtype=torch.float32)
    reference = kn.load_transformer(tmp_path / "twin.safetensors", dtype=torch.float32)
    layers = [m for m in packed.modules() if isinstance(m, Nvfp4Linear)]
    assert len(layers) == 20 and all(m.weight.dtype == torch.uint8 for m in layers)
    assert "nvfp4, 20 layers" in packed.description
    resident = sum(b.numel() * b.element_size() for m in layers for b in m.buffers())
    assert resident == sum(tensors[k].numel() * tensors[k].element_size() for k in tensors
                           if k.endswith(("weight_scale", "weight_scale_2")) or
                           (k.endswith(".weight") and tensors[k].dtype == torch.uint8))
    assert (sample_forward(packed) - sample_forward(reference)).abs().max() <= 1e-5


def test_nvfp4_text_encoder(tmp_path):
    """ComfyUI's qwen_3_4b_fp4 style: the Qwen3 linears nvfp4, norms and embeddings in float."""
    select = lambda name, tensor: tensor.ndim == 2 and ".layers." in name  # noqa: E731
    tensors, _, twin = to_nvfp4(qwen3_state_dict(TINY_QWEN3, seed=5), select, "comfy_quant")
    save_file(tensors, str(tmp_path / "qwen_fp4.safetensors"))
    save_file(twin, str(tmp_path / "twin.safetensors"))
    tokenizer = write_tokenizer(tmp_path / "tok")
    load = lambda name: kn.load_text_encoder(tmp_path / name, tokenizer=tokenizer, dtype=torch.float32,  # noqa: E731
                                             layers=(1, 2, 3))
    packed, reference = load("qwen_fp4.safetensors"), load("twin.safetensors")
    assert sum(isinstance(m, Nvfp4Linear) for m in packed.model.modules()) == 3 * 7
    assert (packed.encode("a cat", max_length=32, layers=(1, 2, 3)) -
            reference.encode("a cat", max_length=32, layers=(1, 2, 3))).abs().max() <= 1e-5


def test_pre_quant_scale_multiplies_the_input():
    packed, block_scale, global_scale = quantize(torch.randn(32, 64))
    smoothing = torch.rand(64) + 0.5
    layer = Nvfp4Linear(packed, block_scale, global_scale, (32, 64), smoothing, torch.float32)
    x = torch.randn(3, 64)
    expected = torch.nn.functional.linear(x * smoothing, dequantize_nvfp4(packed, block_scale, global_scale))
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_broken_nvfp4_layers_are_refused(tmp_path):
    tensors, _, _ = to_nvfp4(transformer_state_dict(TINY_TRANSFORMER), is_block_linear, "comfy_quant")
    del tensors["double_blocks.1.txt_mlp.2.weight_scale_2"]
    save_file(tensors, str(tmp_path / "noglobal.safetensors"))
    with pytest.raises(kn.CheckpointError, match="txt_mlp.2.weight' is nvfp4 but has no weight_scale_2"):
        kn.load_transformer(tmp_path / "noglobal.safetensors")
    tensors, _, _ = to_nvfp4(transformer_state_dict(TINY_TRANSFORMER), is_block_linear, "comfy_quant")
    tensors["single_blocks.0.linear2.weight_scale"] = tensors["single_blocks.0.linear2.weight_scale"].flatten()[:100]
    save_file(tensors, str(tmp_path / "short.safetensors"))
    with pytest.raises(kn.CheckpointError, match="single_blocks.0.linear2: nvfp4 block scales hold 100 values"):
        kn.load_transformer(tmp_path / "short.safetensors")
