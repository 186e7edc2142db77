"""ComfyUI's low-VRAM contract: every klein module holding weights has `comfy_cast_weights`; when ComfyUI's
ModelPatcher leaves one offloaded (flag set to True), it brings its weights to the input's device for each call
and leaves them where they were. A second device is emulated with torch's meta device."""

import torch

import klein_nodes as kn
from klein_nodes.models.adapters import with_adapters
from klein_nodes.models.offload import Offloadable, compute_device
from klein_nodes.loaders.convert import quantize_file
from klein_nodes.quant.fp8 import Fp8Linear
from klein_nodes.quant.linear import QuantizedEmbedding, QuantizedLinear
from klein_nodes.testing import write_gguf, write_text_encoder, write_tokenizer, write_transformer
from helpers import sample_forward


def weight_holders(model):
    return [(name, m) for name, m in model.named_modules()
            if list(m.parameters(recurse=False)) or list(m.buffers(recurse=False))]


def test_every_module_with_weights_can_be_left_offloaded_by_comfyui(tmp_path):
    path, state = write_transformer(tmp_path / "klein.safetensors", dtype=torch.float32)
    write_gguf(tmp_path / "klein.gguf", state, lambda n, t: "F32" if t.ndim == 1 else "Q4_0", "flux")
    te_path, _ = write_text_encoder(tmp_path / "qwen.safetensors", dtype=torch.float32)
    encoder = kn.load_text_encoder(te_path, tokenizer=write_tokenizer(tmp_path / "tok"), layers=(1, 2, 3))
    for model in (kn.load_transformer(path), kn.load_transformer(tmp_path / "klein.gguf"), encoder.model):
        holders = weight_holders(model)
        assert holders and all(isinstance(m, Offloadable) for _, m in holders), \
            [name for name, m in holders if not isinstance(m, Offloadable)]


def test_every_offloadable_module_answers_weight_and_bias_as_comfyui_reads_them(tmp_path):
    """ComfyUI >= 0.3.76 reads `getattr(module, "weight")` and `"bias"` of every module with `comfy_cast_weights`
    (model_patcher.get_key_weight): a tensor or None, never AttributeError; real tensors stay reachable."""
    path, state = write_transformer(tmp_path / "klein.safetensors", dtype=torch.float32)
    write_gguf(tmp_path / "klein.gguf", state, lambda n, t: "F32" if t.ndim == 1 else "Q4_0", "flux")
    quantize_file(path, tmp_path / "klein-fp8.safetensors", "fp8")
    te_path, _ = write_text_encoder(tmp_path / "qwen.safetensors", dtype=torch.float32)
    quantize_file(te_path, tmp_path / "qwen.gguf", "Q8_0", tokenizer=write_tokenizer(tmp_path / "tok"))
    models = [kn.load_transformer(tmp_path / name)
              for name in ("klein.safetensors", "klein.gguf", "klein-fp8.safetensors")]
    models += [kn.load_text_encoder(p, tokenizer=tmp_path / "tok", layers=(1, 2, 3)).model
               for p in (te_path, tmp_path / "qwen.gguf")]
    kinds = set()
    for model in models:
        tensors = dict(model.state_dict(keep_vars=True))
        for name, module in model.named_modules():
            if not hasattr(module, "comfy_cast_weights"):
                continue
            kinds.add(type(module).__name__)
            for attr in ("weight", "bias"):
                value = getattr(module, attr)
                assert value is tensors.get(f"{name}.{attr}"), (type(module).__name__, name, attr)
    assert {"Linear", "QuantizedLinear", "Fp8Linear", "RMSNorm", "Embedding", "QuantizedEmbedding"} <= kinds, kinds


def test_flagged_layers_bring_their_weights_to_the_input_and_put_them_back(monkeypatch):
    matmul_weights = []  # the device of the weight each matmul really used
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda x, w, b=None: matmul_weights.append(w.device.type) or linear(x, w, b))
    weight = torch.randn(32, 64)
    layers = [kn.models.adapters.Linear(64, 32, bias=False),
              QuantizedLinear(torch.zeros(32 * 2 * 34, dtype=torch.uint8), "Q8_0", 64, 32, torch.float32),
              Fp8Linear((weight / 2).to(torch.float8_e4m3fn), torch.tensor(2.0), compute_dtype=torch.float32),
              kn.models.transformer.RMSNorm(64)]
    for layer in layers:
        before = {name: t for name, t in layer.state_dict(keep_vars=True).items()}
        layer.comfy_cast_weights = True  # what ComfyUI's ModelPatcher does to a module it leaves in CPU memory
        out = layer(torch.zeros(3, 64, device="meta"))  # a second device: weights must follow the input there
        assert out.device.type == "meta" and out.shape[0] == 3
        assert all(t is before[name] and t.device.type == "cpu" for name, t in layer.state_dict(keep_vars=True).items())
    assert matmul_weights == ["meta"] * 3
    embedding = QuantizedEmbedding(torch.zeros(10 * 34, dtype=torch.uint8), "Q8_0", 10, 32, torch.float32)
    embedding.comfy_cast_weights = True
    rows = embedding(torch.zeros(2, 4, dtype=torch.long, device="meta"))
    assert rows.shape == (2, 4, 32) and rows.device.type == "meta"


def test_flagged_model_computes_the_same_and_on_comfyuis_device(tmp_path):
    path, _ = write_transformer(tmp_path / "klein.safetensors", dtype=torch.float32)
    model = kn.load_transformer(path)
    expected = sample_forward(model)
    for module in model.modules():
        if isinstance(module, Offloadable):
            module.comfy_cast_weights = True
    assert torch.equal(sample_forward(model), expected)
    object.__setattr__(model, "klein_device", torch.device("meta"))  # recorded by the nodes: ComfyUI's load device
    patched = with_adapters(model, {}, "a LoRA copy")
    assert compute_device(model) == compute_device(patched) == torch.device("meta")


def test_modules_streamed_by_comfyuis_dynamic_vram_fetch_weights_through_its_caster(monkeypatch, caplog):
    """Core 0.25's dynamic loader gives streamed modules a `_v` VBAR slot; their weight and bias must come from
    comfy.ops.cast_bias_weight (and go back through uncast_bias_weight), as core's own layers do. Core is stood in
    for here (its dynamic VRAM needs CUDA); tools/comfyui_contract.py checks the rest against the real core."""
    import sys
    import types

    from klein_nodes.models import offload
    from klein_nodes.nodes import runtime

    calls = []
    ops = types.ModuleType("comfy.ops")

    def cast_bias_weight(module, device, dtype, bias_dtype, offloadable):
        assert offloadable and dtype == module.weight.dtype
        calls.append("cast")
        return module.weight.to(device), None if module.bias is None else module.bias.to(device), "stream"
    ops.cast_bias_weight = cast_bias_weight
    ops.uncast_bias_weight = lambda module, weight, bias, stream: calls.append(("uncast", weight.device.type, stream))
    comfy = types.ModuleType("comfy")
    comfy.ops = ops
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.ops", ops)
    patcher = types.ModuleType("comfy.model_patcher")

    class CoreModelPatcher:  # what core builds its own models with; dynamic where DynamicVRAM is on
        def __init__(self, model, load_device, offload_device):
            self.model = model

        def is_dynamic(self):
            return True
    patcher.ModelPatcher, patcher.CoreModelPatcher = None, CoreModelPatcher
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = mm.unet_offload_device = lambda: torch.device("cpu")
    mm.load_models_gpu = lambda patchers: calls.append(("load", type(patchers[0]).__name__))
    monkeypatch.setattr(runtime, "comfy_modules", lambda: (mm, patcher, None))
    monkeypatch.setattr(offload, "vbar_caster", None)

    layer = kn.models.adapters.Linear(64, 32, bias=True)
    runtime.load_for_inference(layer, "transformer")
    assert calls == [("load", "CoreModelPatcher")] and offload.vbar_caster is runtime.vbar_weights
    before = dict(layer._parameters)
    layer.comfy_cast_weights, layer._v = True, object()  # what ModelPatcherDynamic.load sets on a streamed module
    out = layer(torch.zeros(3, 64, device="meta"))
    assert out.device.type == "meta" and calls[1:] == ["cast", ("uncast", "meta", "stream")]
    assert layer._parameters == before

    def refuse(*args, **kwargs):
        raise RuntimeError("no VBAR")
    ops.cast_bias_weight = refuse
    assert layer(torch.zeros(3, 64, device="meta")).device.type == "meta"  # plain copies instead
    assert offload.vbar_caster is None and "copying weights per call instead" in caplog.text
