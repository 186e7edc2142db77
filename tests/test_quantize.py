"""The quantizer: K-quants against simple baselines, and files that load back in our loaders and in gguf-py."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import klein_nodes as kn
from klein_nodes.cli import main
from klein_nodes.loaders.convert import quantize_file
from klein_nodes.models.transformer import Flux2Params
from klein_nodes.quant.fp8 import Fp8Linear
from klein_nodes.quant.linear import QuantizedLinear
from klein_nodes.quant.quantize import make_qkx2_quants, quantize
from klein_nodes.testing import write_text_encoder, write_tokenizer, write_transformer
from helpers import sample_forward

gguf = pytest.importorskip("gguf")
PARAMS = Flux2Params(in_channels=128, out_channels=128, context_in_dim=96, hidden_size=256, num_heads=2, depth=1,
                     depth_single_blocks=1, mlp_hidden_dim=512, axes_dim=(32, 32, 32, 32))


def relative_error(values, qtype):
    packed = quantize(values, qtype)
    back = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType[qtype])
    return float(np.sqrt(((back - values) ** 2).mean() / (values ** 2).mean()))


def test_k_quant_errors_order_and_bounds():
    values = np.random.default_rng(0).standard_normal((32, 1024)).astype(np.float32)
    errors = {t: relative_error(values, t) for t in ("Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0")}
    assert errors["Q8_0"] < errors["Q6_K"] < errors["Q5_K"] < errors["Q4_K"] < errors["Q4_0"]
    # llama.cpp's reference quantizer (ggml d99724f) on unit Gaussians, 512x4096: 0.07131 / 0.03611 / 0.01773
    # relative RMSE (bench/RESULTS.md); on this sample ours must stay within ~0.5% of that
    assert errors["Q4_K"] < 0.0717 and errors["Q5_K"] < 0.0365 and errors["Q6_K"] < 0.0179


def test_scale_search_beats_min_max():
    x = np.random.default_rng(1).standard_normal((256, 32)).astype(np.float32) ** 3
    weights = np.abs(x) + 0.1
    for nstep in (0, 20):
        levels, scale, minimum = make_qkx2_quants(x, weights, 15, -1.0, 0.1, nstep)
        error = (weights * (scale[:, None] * levels - minimum[:, None] - x) ** 2).sum()
        if nstep == 0:
            naive = error
    assert error < naive * 0.97


def test_flat_and_zero_blocks():
    for qtype in ("Q4_K", "Q5_K", "Q6_K"):
        values = np.zeros((2, 256), dtype=np.float32)
        values[1] = 0.5
        back = gguf.quants.dequantize(quantize(values, qtype), gguf.GGMLQuantizationType[qtype])
        assert np.abs(back - values).max() < 0.01, qtype


@pytest.mark.parametrize("qtype,suffix,tolerance", [("Q4_K", "gguf", 0.2), ("Q6_K", "gguf", 0.05),
                                                    ("Q8_0", "gguf", 0.02), ("fp8", "safetensors", 0.1)])
def test_transformer_round_trip(tmp_path, qtype, suffix, tolerance, capsys):
    source, _ = write_transformer(tmp_path / "klein.safetensors", PARAMS, dtype=torch.float32, seed=3)
    output = tmp_path / f"klein-{qtype}.{suffix}"
    assert main(["quantize", str(source), str(output), "--type", qtype]) == 0
    assert f"transformer as {qtype}" in capsys.readouterr().out
    quantized = kn.load_transformer(output, dtype=torch.float32)
    layer_type = Fp8Linear if qtype == "fp8" else QuantizedLinear
    layers = [m for m in quantized.modules() if isinstance(m, layer_type)]
    assert len(layers) == 8 + 2  # block linears only; embeddings, modulation, final layer kept
    if qtype != "fp8":
        assert {m.qtype for m in layers} == {qtype}
        assert len(gguf.GGUFReader(str(output)).tensors) == len(kn.load_transformer(source).state_dict())
    reference = sample_forward(kn.load_transformer(source))
    error = ((sample_forward(quantized) - reference).norm() / reference.norm()).item()
    assert error < tolerance
    assert main(["quantize", str(source), str(output), "--type", qtype]) == 2  # never overwritten


def comfyui_reading(tensors):
    """The weights ComfyUI's loaders see in a safetensors file (design/quant-formats.md section 5): a layer with a
    `comfy_quant` float8 marker is q * weight_scale; an fp8 tensor without one is read unscaled."""
    read = {}
    for name, tensor in tensors.items():
        layer = name.rsplit(".", 1)[0]
        if name.endswith((".comfy_quant", ".weight_scale")):
            continue
        if f"{layer}.comfy_quant" in tensors:
            assert json.loads(bytes(tensors[f"{layer}.comfy_quant"].tolist())) == {"format": "float8_e4m3fn"}
            tensor = tensor.float() * tensors[f"{layer}.weight_scale"]
        read[name] = tensor.float()
    return read


@pytest.mark.parametrize("kind", ["transformer", "text_encoder"])
def test_fp8_output_means_the_same_to_comfyui(tmp_path, kind):
    if kind == "transformer":
        source, _ = write_transformer(tmp_path / "model.safetensors", PARAMS, dtype=torch.float32, seed=3)
        load, run = kn.load_transformer, sample_forward
    else:
        source, _ = write_text_encoder(tmp_path / "model.safetensors", dtype=torch.float32, seed=3)
        tokenizer = write_tokenizer(tmp_path / "tok")
        load = lambda path, dtype: kn.load_text_encoder(path, tokenizer, dtype, layers=(1, 2, 3))  # noqa: E731
        run = lambda encoder: encoder.encode("a cat", 32, (1, 2, 3))  # noqa: E731
    quantize_file(source, tmp_path / "fp8.safetensors", "fp8")
    save_file(comfyui_reading(load_file(str(tmp_path / "fp8.safetensors"))),
              str(tmp_path / "as_comfyui_reads.safetensors"))
    reference = run(load(source, dtype=torch.float32))
    for name in ("fp8.safetensors", "as_comfyui_reads.safetensors"):
        error = ((run(load(tmp_path / name, dtype=torch.float32)) - reference).norm() / reference.norm()).item()
        assert error < 0.1, (name, error)


def test_text_encoder_gguf_carries_its_tokenizer(tmp_path):
    folder = tmp_path / "te"
    source, _ = write_text_encoder(folder / "qwen3.safetensors", dtype=torch.float32)
    write_tokenizer(folder)
    output = tmp_path / "qwen3-q8.gguf"
    assert main(["quantize", str(source), str(output), "--type", "Q4_K"]) == 0
    quantized = kn.load_text_encoder(output, dtype=torch.float32, layers=(1, 2, 3))  # tokenizer from the GGUF itself
    reference = kn.load_text_encoder(source, dtype=torch.float32, layers=(1, 2, 3))
    for prompt in ("a cat on a mat", "ünï 🐱\n<think>"):
        assert quantized.tokenize(prompt, 64) == reference.tokenize(prompt, 64)
    a, b = quantized.encode("a cat", 32, (1, 2, 3)), reference.encode("a cat", 32, (1, 2, 3))
    assert ((a - b).norm() / b.norm()).item() < 0.05  # rows of 32: Q8_0 fallback, embeddings Q6_K


def test_bad_requests(tmp_path):
    source, _ = write_transformer(tmp_path / "klein.safetensors")
    with pytest.raises(kn.KleinError, match="unknown quantization type 'Q3_X'"):
        quantize_file(source, tmp_path / "x.gguf", "Q3_X")
    with pytest.raises(kn.KleinError, match="must end in .safetensors"):
        quantize_file(source, tmp_path / "x.gguf", "fp8")
    vae = tmp_path / "vae.safetensors"
    from safetensors.torch import save_file
    save_file({"decoder.conv_in.weight": torch.zeros(4, 32, 3, 3), "bn.running_mean": torch.zeros(128)}, str(vae))
    with pytest.raises(kn.KleinError, match="quantizer takes a FLUX.2 transformer"):
        quantize_file(vae, tmp_path / "v.gguf", "Q8_0")
