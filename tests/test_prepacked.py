"""CPU Linear layers: oneDNN-prepacked weights (in bf16 bit-identical to F.linear, in fp32 as close as another
summation order; made once per weight, dropped when the weight moves or changes, skipped where they can't or
shouldn't apply), and half-precision layers computed in fp32 where the CPU has no bf16/fp16 matmul (forced here
through the capability check, so these run on any CPU)."""

import shutil
import threading
import types

import psutil
import pytest
import torch
import torch.nn.functional as F

import klein_nodes as kn
from klein_nodes.models import prepacked
from klein_nodes.models.adapters import Adapter, with_adapters
from klein_nodes.quant.fp8 import Fp8Linear
from klein_nodes.sampling.packing import image_ids, text_ids
from klein_nodes.testing import TINY_TRANSFORMER, write_text_encoder, write_tokenizer, write_transformer
from helpers import sample_forward

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
needs_onednn_bf16 = pytest.mark.skipif(not (torch.backends.mkldnn.is_available()
                                            and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                                       reason="this CPU or torch build has no oneDNN bf16")


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.setitem(prepacked._state, "enabled", None)
    monkeypatch.setitem(prepacked._state, "onednn", None)
    monkeypatch.setitem(prepacked._state, "native", {})
    monkeypatch.setattr(prepacked, "_scratch", threading.local())
    monkeypatch.delenv("KLEIN_CPU_PREPACK", raising=False)


@pytest.fixture
def no_half_matmuls(monkeypatch):
    """This CPU as one whose oneDNN has no bf16 or fp16 matmul, whatever it really has."""
    monkeypatch.setitem(prepacked._state, "native", {torch.bfloat16: False, torch.float16: False})


def plain(monkeypatch):
    """From now on torch's own matmuls in the weights' dtype (KLEIN_CPU_PREPACK=0)."""
    monkeypatch.setitem(prepacked._state, "enabled", False)


def bf16_layer(rows=96, cols=80, bias=True):
    return kn.models.adapters.Linear(cols, rows, bias=bias).to(torch.bfloat16).requires_grad_(False)


@needs_onednn_bf16
def test_packed_matmul_is_bit_identical_and_made_once():
    layer = bf16_layer()
    for shape in ((40, 80), (2, 33, 80), (3, 100, 80)):
        x = torch.randn(shape).bfloat16()
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    packed = layer.__dict__["_prepacked"][1]
    assert packed.is_mkldnn
    layer(torch.randn(64, 80).bfloat16())
    assert layer.__dict__["_prepacked"][1] is packed  # reused, not rebuilt
    strided = torch.randn(80, 64).bfloat16().t()  # a transposed input is made contiguous first
    assert torch.equal(layer(strided), F.linear(strided, layer.weight, layer.bias))


@needs_onednn
def test_fp32_packed_matmul_is_as_exact_as_torchs():
    layer = bf16_layer(rows=300, cols=700).float()
    x = torch.randn(2, 50, 700)
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    got = layer(x)
    assert layer.__dict__["_prepacked"][1].is_mkldnn and got.dtype == torch.float32
    ours, torchs = ((y.double() - exact).abs().max().item() for y in (got, F.linear(x, layer.weight, layer.bias)))
    assert ours <= 4 * torchs + 1e-6 * exact.abs().max().item()


@needs_onednn_bf16
def test_a_changed_or_moved_weight_is_packed_again():
    layer = bf16_layer(bias=False)
    x = torch.randn(48, 80).bfloat16()
    layer(x)
    with torch.no_grad():
        layer.weight.mul_(2)  # in place: the version counter moves
    assert torch.equal(layer(x), F.linear(x, layer.weight))
    layer.weight = torch.nn.Parameter(torch.randn(96, 80).bfloat16(), requires_grad=False)
    assert torch.equal(layer(x), F.linear(x, layer.weight))
    layer.float()  # any .to()/.float()/.cuda() drops the copy
    assert "_prepacked" not in layer.__dict__
    torch.testing.assert_close(layer(x.float()), F.linear(x.float(), layer.weight))
    assert layer.__dict__["_prepacked"][1].dtype == torch.float32  # packed again, in the new dtype
    half = layer.half()
    assert torch.equal(half(x.half()), F.linear(x.half(), layer.weight)) and "_prepacked" not in layer.__dict__


@needs_onednn_bf16
def test_where_packing_does_not_apply(monkeypatch):
    layer = bf16_layer()
    layer(torch.randn(prepacked.MIN_ROWS - 1, 80).bfloat16())  # a modulation-sized matmul
    assert "_prepacked" not in layer.__dict__
    trained = bf16_layer().requires_grad_(True)
    out = trained(torch.randn(40, 80).bfloat16())
    assert "_prepacked" not in trained.__dict__ and out.requires_grad
    monkeypatch.setitem(prepacked._state, "enabled", None)
    monkeypatch.setenv("KLEIN_CPU_PREPACK", "0")
    x = torch.randn(40, 80).bfloat16()
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias)) and "_prepacked" not in layer.__dict__


@needs_onednn_bf16
def test_transformer_and_lora_give_the_same_bits_packed_or_not(tmp_path, monkeypatch):
    path, _ = write_transformer(tmp_path / "klein.safetensors", dtype=torch.bfloat16)
    model = kn.load_transformer(path)
    layer = "double_blocks.0.img_attn.qkv"
    weight = model.get_submodule(layer).weight
    lora = Adapter("lora", {"down": torch.randn(4, weight.shape[1]) * 0.1,
                            "up": torch.randn(weight.shape[0], 4) * 0.1}, scale=1.0)
    patched = with_adapters(model, {layer: [lora]}, "test")
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 36, 128, generator=g), torch.randn(1, 7, TINY_TRANSFORMER.context_in_dim, generator=g)
    args = (x, image_ids(6, 6)[None], torch.tensor([0.6]), ctx, text_ids(7)[None])
    with torch.inference_mode():
        packed = model(*args), patched(*args)
        assert "_prepacked" in model.get_submodule(layer).__dict__
        monkeypatch.setitem(prepacked._state, "onednn", False)
        plain = model(*args), patched(*args)
    assert all(torch.equal(a, b) for a, b in zip(packed, plain))
    assert not torch.equal(packed[0], packed[1])  # the LoRA did change the output


@needs_onednn_bf16
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_layers_leave_packing_to_inductor():
    layer = bf16_layer()
    x = torch.randn(40, 80).bfloat16()
    eager = layer(x)
    compiled = torch.compile(layer)
    with torch.inference_mode():
        assert (compiled(x).float() - eager.float()).abs().max() <= 0.05


@needs_onednn
def test_without_room_for_a_copy_the_numbers_stay_the_same(monkeypatch):
    """No memory to keep a packed copy: each call packs afresh, so fp32 results never depend on free memory."""
    layer = bf16_layer().float()
    x = torch.randn(40, 80)
    kept = layer(x)
    assert "_prepacked" in layer.__dict__
    layer.float()  # drops the copy
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=prepacked.RESERVE))
    assert torch.equal(layer(x), kept) and "_prepacked" not in layer.__dict__


@needs_onednn
def test_the_text_encoder_packs_per_call_and_keeps_nothing(tmp_path, monkeypatch):
    """It runs once per prompt: packed per call (fp32 at oneDNN's speed), no copy of its weights kept in RAM."""
    path, _ = write_text_encoder(tmp_path / "qwen.safetensors", dtype=torch.float32)
    encoder = kn.load_text_encoder(path, tokenizer=write_tokenizer(tmp_path / "tok"), layers=(1, 2, 3))
    calls = []
    packed_linear = prepacked.linear
    monkeypatch.setattr(prepacked, "linear", lambda *args: calls.append(args[0]) or packed_linear(*args))
    with torch.inference_mode():
        packed = encoder.encode(["a fox in the snow"], max_length=40, layers=(1, 2, 3))
        monkeypatch.setitem(prepacked._state, "onednn", False)
        encoder._cache.clear()
        plain = encoder.encode(["a fox in the snow"], max_length=40, layers=(1, 2, 3))
    assert len(calls) == 3 * 7  # q, k, v, o, gate, up, down of each layer, through oneDNN
    assert not any("_prepacked" in m.__dict__ for m in encoder.model.modules())
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())


def test_the_default_follows_the_cpu():
    """bf16 layers compute in fp32 on the CPU exactly where oneDNN has no bf16 matmul; never on a GPU."""
    has_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert prepacked.compute_dtype(torch.bfloat16, "cpu") == (torch.bfloat16 if has_bf16 else torch.float32)
    assert prepacked.compute_dtype(torch.bfloat16, "cuda") == torch.bfloat16
    assert prepacked.compute_dtype(torch.float16, "cuda:0") == torch.float16
    assert prepacked.compute_dtype(torch.float32, "cpu") == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layers_compute_in_fp32_without_such_matmuls(no_half_matmuls, dtype, monkeypatch):
    layer = bf16_layer(rows=300, cols=700).to(dtype)
    weight, bias = layer.weight.float(), layer.bias.float()
    x = torch.randn(2, 50, 700).to(dtype)
    with torch.inference_mode():
        got = layer(x)
        assert got.dtype == dtype and got.shape == (2, 50, 300) and "_prepacked" not in layer.__dict__
        assert torch.equal(got, F.linear(x.float(), weight, bias).to(dtype))  # fp32 matmul, one rounding at the end
        assert torch.equal(layer(x.float()), F.linear(x.float(), weight, bias))  # fp32 activations stay fp32
        exact = F.linear(x.double(), weight.double(), bias.double())
        torch.testing.assert_close(got.double(), exact, rtol=torch.finfo(dtype).eps, atol=1e-6)  # within an ulp
        few = x[:, :prepacked.WIDEN_MIN_ROWS // 2 - 1]  # a few rows: the half-precision matmul, cheaper than widening
        assert torch.equal(layer(few), F.linear(few, layer.weight, layer.bias))
        # the weight converted a few rows at a time (the last piece shorter), into one buffer every layer reuses
        monkeypatch.setattr(prepacked, "PIECE_BYTES", 128 * 700 * 4)
        prepacked._scratch.__dict__.clear()
        strided = torch.randn(50, 2, 700).to(dtype).transpose(0, 1)
        pieces = layer(strided), bf16_layer(rows=100, cols=700, bias=False).to(dtype)
        torch.testing.assert_close(pieces[0].double(), F.linear(strided.double(), weight.double(), bias.double()),
                                   rtol=torch.finfo(dtype).eps, atol=1e-6)
        buffer = prepacked._scratch.__dict__[(torch.device("cpu"), torch.float32)]
        assert buffer.numel() == 128 * (700 + 100)
        torch.testing.assert_close(pieces[1](x).float(), F.linear(x.float(), pieces[1].weight.float()),
                                   rtol=torch.finfo(dtype).eps, atol=1e-6)
        assert prepacked._scratch.__dict__[(torch.device("cpu"), torch.float32)] is buffer


def test_widening_follows_the_switch_and_autograd(no_half_matmuls, monkeypatch):
    layer = bf16_layer(rows=64, cols=48)
    x = torch.randn(40, 48).bfloat16()
    trained = bf16_layer(rows=64, cols=48).requires_grad_(True)
    trained.load_state_dict(layer.state_dict())
    weight, bias, x1, x2 = (t.detach().clone().requires_grad_(True) for t in (layer.weight, layer.bias, x, x))
    loss = trained(x1).float().square().sum()  # autograd keeps its own fp32 weight, not the shared buffer,
    prepacked.scratch(64 * 48, torch.float32, "cpu").fill_(float("nan"))  # which the next layer overwrites
    loss.backward()
    F.linear(x2.float(), weight.float(), bias.float()).bfloat16().float().square().sum().backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in ((trained.weight, weight), (trained.bias, bias), (x1, x2)))
    plain(monkeypatch)  # KLEIN_CPU_PREPACK=0: torch's bf16 matmul, bit for bit
    with torch.inference_mode():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert prepacked.compute_dtype(torch.bfloat16, "cpu") == torch.bfloat16


def relative_error(got, expected):
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def test_the_transformer_and_its_adapters_widen_close_to_fp32(no_half_matmuls, tmp_path, monkeypatch):
    """A bf16 transformer (LoRA and a full difference on one layer) computed with widened layers lands nearer its
    fp32 twin than torch's bf16 matmuls do, in bf16."""
    path, _ = write_transformer(tmp_path / "klein.safetensors", dtype=torch.bfloat16)
    model, twin = kn.load_transformer(path), kn.load_transformer(path, dtype=torch.float32)
    layer = "double_blocks.0.img_attn.qkv"
    weight = model.get_submodule(layer).weight
    g = torch.Generator().manual_seed(1)
    adapters = {layer: [Adapter("lora", {"down": torch.randn(4, weight.shape[1], generator=g) * 0.1,
                                         "up": torch.randn(weight.shape[0], 4, generator=g) * 0.1}, scale=1.0)],
                "single_blocks.0.linear2": [Adapter("diff", {"diff": torch.randn(
                    model.get_submodule("single_blocks.0.linear2").weight.shape, generator=g) * 0.01}, scale=1.0)]}
    patched, patched_twin = with_adapters(model, adapters, "test"), with_adapters(twin, adapters, "test")
    grid = {"height": 4, "width": 6, "text_tokens": 16}  # 40 rows: the blocks' layers widen, the modulations' don't
    rows = []
    widen = prepacked.widened_linear
    monkeypatch.setattr(prepacked, "widened_linear", lambda x, *args: rows.append(x.shape[-2]) or widen(x, *args))
    widened = sample_forward(model, **grid), sample_forward(patched, **grid)
    assert 40 in rows and 1 in rows  # the joint blocks' rows in fp32, modulations in bf16 (fewer than 16 rows)
    monkeypatch.setattr(prepacked, "widened_linear", widen)
    references = sample_forward(twin, **grid), sample_forward(patched_twin, **grid)
    plain(monkeypatch)
    plains = sample_forward(model, **grid), sample_forward(patched, **grid)
    for got, reference, bf16 in zip(widened, references, plains):
        assert got.dtype == torch.bfloat16
        assert relative_error(got, reference) <= max(relative_error(bf16, reference), 2 ** -7)
        assert relative_error(got, bf16) <= 2e-2
    assert relative_error(widened[0], widened[1]) > 1e-2  # the adapters did change the output


def test_quantized_layers_dequantize_to_fp32_without_bf16_matmuls(no_half_matmuls, monkeypatch):
    """GGUF and fp8 layers computing in bf16 dequantize straight to fp32 there (GGUF into the shared buffer)."""
    pytest.importorskip("gguf")
    from klein_nodes.quant.linear import QuantizedLinear
    from klein_nodes.quant.quantize import quantize

    g = torch.Generator().manual_seed(2)
    values = torch.randn(96, 256, generator=g)
    scale = values.abs().max() / 448
    layers = [QuantizedLinear(torch.from_numpy(quantize(values.numpy(), "Q8_0")), "Q8_0", 256, 96),
              Fp8Linear((values / scale).to(torch.float8_e4m3fn), scale, compute_dtype=torch.bfloat16)]
    x = torch.randn(3, 20, 256, generator=g).bfloat16()
    with torch.inference_mode():
        for layer in layers:
            weight = layer.dequantized(torch.float32).clone()
            got = layer(x)
            assert got.dtype == torch.bfloat16 and torch.equal(got, F.linear(x.float(), weight).bfloat16())
            assert torch.equal(layer(x.float()), F.linear(x.float(), weight))  # fp32 activations stay fp32
        plain(monkeypatch)
        for layer in layers:
            assert torch.equal(layer(x), F.linear(x, layer.dequantized()))
