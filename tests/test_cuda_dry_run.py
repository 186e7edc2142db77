"""A fixed sample of tools/cuda_dry_run.py: the pipeline's CUDA code paths, run on fake CUDA tensors without a GPU,
keep every tensor on the device inside the forwards and never mix devices; and the checker itself catches a tensor
made on the CPU in a forward and a host sync in the denoising loop."""

import math
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import cuda_dry_run as dry  # noqa: E402

pytest.importorskip("gguf")  # the GGUF files are written with the pack's quantizer, which needs it

TEXT_LAYERS = (2, 4, 6)  # three layers as klein's (9, 18, 27), from a text encoder of 6: the same code, faster
CASES = [("t2i", "bf16", False), ("img2img", "Q4_K", True), ("cfg", "fp8", False), ("stream", "Q8_0", True),
         ("inpaint", "Q6_K-triton", False), ("offload", "nvfp4", True), ("ref1", "Q4_K-triton", True),
         ("lowvram", "bf16", True)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    formats = sorted({fmt for _, fmt, _ in CASES} | {"fp8-sm86", "Q4_K"})
    return dry.build_models(tmp_path_factory.mktemp("dry_run"), formats, (False, True), TEXT_LAYERS,
                            quantized_text_encoders=("Q4_K", "fp8"))  # one GGUF text encoder: reading one is slow


def run(models, mode, fmt, lora=False):
    return dry.run_one(models[fmt, lora], mode, fmt, lora, text_layers=TEXT_LAYERS)


def described(result):
    return "\n".join(dry.table([result]) + dry.findings_report([result], verbose=True))


@pytest.mark.parametrize("mode, fmt, lora", CASES, ids=[f"{m}-{f}{'-lora' if lo else ''}" for m, f, lo in CASES])
def test_cuda_paths_keep_tensors_on_the_device(models, mode, fmt, lora):
    result = run(models, mode, fmt, lora)
    assert result.outcome == "ok", described(result)
    assert result.count("mismatch", "cpu-created", "dtype", "sync-loop") == 0, described(result)
    assert any(f.kind == "sync" and "device->host" in f.detail for f in result.findings)  # the image comes back
    assert result.triton_launches > 0 if fmt.endswith("-triton") else result.triton_launches == 0
    if lora:  # the LoRA's device copies are made before the loop, and were used (one placement per tensor)
        assert any(f.kind == "sync" and "models/adapters.py" in f.where for f in result.findings)


def test_comfyui_partial_load_without_pinned_memory_copies_synchronously(models, monkeypatch):
    """Core 0.3.64 leaves a partial load's weights in pageable memory: each call's copy then waits (for core's own
    modules too); the checker sees it, and nothing else."""
    monkeypatch.setattr(dry, "PIN_PARTIAL_LOADS", False)
    result = run(models, "lowvram", "Q4_K")
    assert result.outcome == "ok", described(result)
    assert result.count("mismatch", "cpu-created", "dtype") == 0, described(result)
    syncs = [f for f in result.findings if f.kind == "sync-loop"]
    assert syncs and all("models/offload.py" in f.where and "unpinned" in f.detail for f in syncs), described(result)
    assert {f.step for f in syncs} == set(range(1, dry.STEPS + 1))


def test_fp8_takes_the_native_matmul_on_sm89_and_dequantizes_below(models, monkeypatch):
    from klein_nodes.quant.fp8 import Fp8Linear

    calls = []
    original = Fp8Linear.scaled_mm
    monkeypatch.setattr(Fp8Linear, "scaled_mm", lambda layer, x: calls.append(x.shape) or original(layer, x))
    native = run(models, "t2i", "fp8")
    native_calls = len(calls)
    dequantized = run(models, "t2i", "fp8-sm86")
    assert native.outcome == dequantized.outcome == "ok", described(native) + described(dequantized)
    assert native_calls > 0 and len(calls) == native_calls  # SM 8.6: no torch._scaled_mm
    assert not [n for n in native.notes if "scaled_mm" in n], native.notes  # and no fallback from a failed one


def test_a_tensor_made_on_the_cpu_in_a_forward_is_caught(models, monkeypatch):
    from klein_nodes.models import transformer

    def rope_without_device(pos, dim, theta):  # the defect: torch.arange without device=
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        return pos.to(torch.float64)[..., None] * omega

    monkeypatch.setattr(transformer, "rope", rope_without_device)
    result = run(models, "t2i", "bf16")
    created = [f for f in result.findings if f.kind == "cpu-created"]
    assert created and all(f.forward == "transformer" for f in created), described(result)
    assert any(f.op == "aten.arange.start_step" and "rope_without_device" in f.where for f in created)
    mismatches = [f for f in result.findings if f.kind == "mismatch"]
    assert mismatches and "test_cuda_dry_run.py" in mismatches[0].where, described(result)
    assert result.outcome == "ok"  # retried on the device: the run goes on and finds the next defect too
    assert re.search(r", [1-9]\d* device mismatches,", dry.summary_line([result]))


def test_a_matmul_in_another_dtype_is_caught(models, monkeypatch):
    from klein_nodes.models import transformer

    original = transformer.attention

    def attention_in_fp32(q, k, v, pe, out=None):  # the defect: attention upcast in a bf16 model
        return original(q.float(), k.float(), v.float(), pe, out).to(q.dtype)

    monkeypatch.setattr(transformer, "attention", attention_in_fp32)
    result = run(models, "t2i", "bf16")
    wrong = [f for f in result.findings if f.kind == "dtype"]
    assert wrong and all(f.forward == "transformer" and "torch.float32" in f.detail for f in wrong), described(result)
    assert any("attention" in f.op for f in wrong)


def test_a_host_sync_in_the_loop_is_caught(models, monkeypatch):
    from klein_nodes.models import transformer

    original = transformer.timestep_embedding

    def embedding_with_item(t, dim, *args):  # the defect: a Python number read from a device tensor every step
        return original(t, dim, *args) * math.cos(float(t[0]) * 0)

    monkeypatch.setattr(transformer, "timestep_embedding", embedding_with_item)
    result = run(models, "t2i", "bf16")
    syncs = [f for f in result.findings if f.kind == "sync-loop"]
    assert len(syncs) == dry.STEPS and [f.step for f in syncs] == list(range(1, dry.STEPS + 1)), described(result)
    assert "item" in syncs[0].op or "_local_scalar_dense" in syncs[0].op
    assert "embedding_with_item" in syncs[0].where and syncs[0].forward == "transformer"
    assert dry.summary_line([result]).endswith(f", 0 device mismatches, {dry.STEPS} host syncs in the loop")


def test_command_line_summary(tmp_path, capsys):
    status = dry.main(["--modes", "t2i", "--formats", "bf16", "--lora", "without", "--workdir", str(tmp_path),
                       "--text-layers", ",".join(map(str, TEXT_LAYERS))])
    lines = capsys.readouterr().out.strip().splitlines()
    assert status == 0
    assert lines[-1] == "fake cuda: 1 runs (1 modes x 1 formats), 0 device mismatches, 0 host syncs in the loop"
    assert any(line.startswith("t2i      bf16") and line.endswith("ok") for line in lines)
