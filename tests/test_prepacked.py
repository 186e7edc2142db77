"""Linear layers on the CPU multiply with a oneDNN-prepacked copy of their weight: in bf16 bit-identical to F.linear,
in fp32 as close as another summation order; made once per weight, dropped when the weight moves or changes, and
skipped where it can't or shouldn't apply."""

import shutil
import types

import psutil
import pytest
import torch
import torch.nn.functional as F

import klein_nodes as kn
from klein_nodes.models import prepacked
from klein_nodes.models.adapters import Adapter, with_adapters
from klein_nodes.sampling.packing import image_ids, text_ids
from klein_nodes.testing import TINY_TRANSFORMER, write_text_encoder, write_tokenizer, write_transformer

pytestmark = pytest.mark.skipif(not (torch.backends.mkldnn.is_available()
                                     and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                                reason="this CPU or torch build has no oneDNN bf16")


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.setitem(prepacked._state, "usable", None)
    monkeypatch.delenv("KLEIN_CPU_PREPACK", raising=False)


def bf16_layer(rows=96, cols=80, bias=True):
    return kn.models.adapters.Linear(cols, rows, bias=bias).to(torch.bfloat16).requires_grad_(False)


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


def test_fp32_packed_matmul_is_as_exact_as_torchs():
    layer = bf16_layer(rows=300, cols=700).float()
    x = torch.randn(2, 50, 700)
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    got = layer(x)
    assert layer.__dict__["_prepacked"][1].is_mkldnn and got.dtype == torch.float32
    ours, torchs = ((y.double() - exact).abs().max().item() for y in (got, F.linear(x, layer.weight, layer.bias)))
    assert ours <= 4 * torchs + 1e-6 * exact.abs().max().item()


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


def test_where_packing_does_not_apply(monkeypatch):
    layer = bf16_layer()
    layer(torch.randn(prepacked.MIN_ROWS - 1, 80).bfloat16())  # a modulation-sized matmul
    assert "_prepacked" not in layer.__dict__
    trained = bf16_layer().requires_grad_(True)
    out = trained(torch.randn(40, 80).bfloat16())
    assert "_prepacked" not in trained.__dict__ and out.requires_grad
    monkeypatch.undo()
    monkeypatch.setitem(prepacked._state, "usable", None)
    monkeypatch.setenv("KLEIN_CPU_PREPACK", "0")
    x = torch.randn(40, 80).bfloat16()
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias)) and "_prepacked" not in layer.__dict__


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
        monkeypatch.setitem(prepacked._state, "usable", False)
        plain = model(*args), patched(*args)
    assert all(torch.equal(a, b) for a, b in zip(packed, plain))
    assert not torch.equal(packed[0], packed[1])  # the LoRA did change the output


@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_layers_leave_packing_to_inductor():
    layer = bf16_layer()
    x = torch.randn(40, 80).bfloat16()
    eager = layer(x)
    compiled = torch.compile(layer)
    with torch.inference_mode():
        assert (compiled(x).float() - eager.float()).abs().max() <= 0.05


def test_without_room_for_a_copy_the_numbers_stay_the_same(monkeypatch):
    """No memory to keep a packed copy: each call packs afresh, so fp32 results never depend on free memory."""
    layer = bf16_layer().float()
    x = torch.randn(40, 80)
    kept = layer(x)
    assert "_prepacked" in layer.__dict__
    layer.float()  # drops the copy
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=prepacked.RESERVE))
    assert torch.equal(layer(x), kept) and "_prepacked" not in layer.__dict__


def test_the_text_encoder_packs_per_call_and_keeps_nothing(tmp_path, monkeypatch):
    """It runs once per prompt: packed per call (fp32 at oneDNN's speed), no copy of its weights kept in RAM."""
    path, _ = write_text_encoder(tmp_path / "qwen.safetensors", dtype=torch.float32)
    encoder = kn.load_text_encoder(path, tokenizer=write_tokenizer(tmp_path / "tok"), layers=(1, 2, 3))
    calls = []
    packed_linear = prepacked.linear
    monkeypatch.setattr(prepacked, "linear", lambda *args: calls.append(args[0]) or packed_linear(*args))
    with torch.inference_mode():
        packed = encoder.encode(["a fox in the snow"], max_length=40, layers=(1, 2, 3))
        monkeypatch.setitem(prepacked._state, "usable", False)
        encoder._cache.clear()
        plain = encoder.encode(["a fox in the snow"], max_length=40, layers=(1, 2, 3))
    assert len(calls) == 3 * 7  # q, k, v, o, gate, up, down of each layer, through oneDNN
    assert not any("_prepacked" in m.__dict__ for m in encoder.model.modules())
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())
