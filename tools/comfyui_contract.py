"""The module contract against a real ComfyUI core: run with ComfyUI's own Python.

    /path/to/ComfyUI/venv/bin/python tools/comfyui_contract.py /path/to/ComfyUI

Builds tiny klein models in every weight format (bf16, fp8, GGUF transformers; bf16 and GGUF Qwen3 text encoders),
hands each to the core's own `ModelPatcher` and checks what the core does with them: its key lookup
(`get_key_weight`) on every module it may leave offloaded, its low-VRAM planning for the dynamic loader, a partial
load (most modules left offloaded), a full load, and that the outputs stay identical to the unpatched model's.
Prints one line per check and exits non-zero on the first failure. tests/test_comfyui_core.py runs it.
"""

import sys
import tempfile
from pathlib import Path

from comfyui_workflows import has_native_klein, import_pack  # this folder is on sys.path when run as a script

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # for helpers.py


def import_core(folder):
    sys.path.insert(0, str(folder))
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_patcher

    return comfy.model_patcher


def tiny_models(kn, folder):
    """(name, module, forward) per format; forward() runs the module on fixed inputs."""
    import torch

    from klein_nodes.loaders.convert import quantize_file
    from klein_nodes.testing import write_text_encoder, write_tokenizer, write_transformer
    from helpers import sample_forward

    transformer, _ = write_transformer(folder / "klein.safetensors", dtype=torch.float32)
    text_encoder, _ = write_text_encoder(folder / "qwen.safetensors", dtype=torch.float32)
    tokenizer = write_tokenizer(folder / "tokenizer")
    quantize_file(transformer, folder / "klein-fp8.safetensors", "fp8")
    quantize_file(transformer, folder / "klein-Q4_K.gguf", "Q4_K")
    quantize_file(text_encoder, folder / "qwen-Q8_0.gguf", "Q8_0", tokenizer=tokenizer)
    for name in ("klein.safetensors", "klein-fp8.safetensors", "klein-Q4_K.gguf"):
        model = kn.load_transformer(folder / name)
        yield name, model, lambda model=model: sample_forward(model)
    for name in ("qwen.safetensors", "qwen-Q8_0.gguf"):
        encoder = kn.load_text_encoder(folder / name, tokenizer=tokenizer, layers=(1, 2, 3))
        yield (name, encoder.model,
               lambda encoder=encoder: encoder.encode(["a red fox"], max_length=16, layers=(1, 2, 3)))


def check(model_patcher, name, model, forward):
    import torch

    expected = forward()
    flagged = [n for n, m in model.named_modules() if hasattr(m, "comfy_cast_weights")]
    for n in flagged:  # what every core since 0.3.76 reads before loading
        for attr in ("weight", "bias"):
            if hasattr(model_patcher, "get_key_weight"):
                model_patcher.get_key_weight(model, f"{n}.{attr}")
    patcher = model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    if "for_dynamic" in patcher._load_list.__code__.co_varnames:  # the dynamic loader's planning (0.25)
        patcher._load_list(for_dynamic=True)
    patcher.load(torch.device("cpu"), lowvram_model_memory=64 * 1024)
    left = [n for n in flagged if model.get_submodule(n).comfy_cast_weights]
    assert left, f"{name}: the core left nothing offloaded with a 64 KB budget"
    partial = forward()
    patcher.unpatch_model(torch.device("cpu"))
    patcher.load(torch.device("cpu"), lowvram_model_memory=1e32, full_load=True)
    full = forward()
    patcher.unpatch_model(torch.device("cpu"))
    assert torch.equal(partial, expected) and torch.equal(full, expected), f"{name}: outputs changed under the core"
    print(f"ok  {name}: {len(flagged)} offloadable modules, {len(left)} left offloaded by a partial load, "
          "outputs identical after partial and full loads")


def check_dynamic_vram(model_patcher):
    """Core 0.25's dynamic VRAM: core's model class, and its weight caster as our streamed modules call it (its CPU
    branch; the VBAR itself needs CUDA)."""
    import torch

    from klein_nodes.models import adapters, offload
    from klein_nodes.nodes.runtime import vbar_weights

    if not hasattr(model_patcher, "ModelPatcherDynamic"):
        print(f"--  no dynamic VRAM in this core; models register as {model_patcher.ModelPatcher.__name__}")
        return
    layer = adapters.Linear(64, 32, bias=True)
    x = torch.randn(3, 64)
    expected = layer(x)
    layer._v = object()  # the VBAR slot ModelPatcherDynamic.load gives a streamed module
    offload.vbar_caster = vbar_weights
    with vbar_weights(layer, torch.device("cpu")):
        got = layer(x)
    assert offload.vbar_caster is vbar_weights, "core's cast_bias_weight refused our module"
    assert torch.equal(got, expected), "core's cast changed the weights"
    print(f"ok  dynamic VRAM: models register as CoreModelPatcher ({model_patcher.CoreModelPatcher.__name__} here), "
          "core's cast_bias_weight/uncast_bias_weight serve our streamed layers")


def check_native_fp8(kn, folder):
    """Cores with native klein read our fp8 files as we do: core's own loader on our quantizer's fp8 output gives
    core's bf16 result within fp8's own error (ours, measured the same way); without the comfy_quant markers core
    would apply no scales."""
    import comfy.sd
    import torch
    from safetensors.torch import load_file, save_file

    from klein_nodes.loaders.convert import quantize_file
    from klein_nodes.testing import CORE_TINY_TRANSFORMER, write_transformer
    from helpers import sample_forward

    source, _ = write_transformer(folder / "core-klein.safetensors", params=CORE_TINY_TRANSFORMER, dtype=torch.float32,
                                  seed=4)
    quantize_file(source, folder / "core-klein-fp8.safetensors", "fp8")
    unmarked = {k: v for k, v in load_file(str(folder / "core-klein-fp8.safetensors")).items()
                if not k.endswith(".comfy_quant")}
    save_file(unmarked, str(folder / "core-klein-fp8-unmarked.safetensors"))
    generator = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 128, 4, 4, generator=generator), torch.randn(1, 8, 96, generator=generator)

    def core_output(name):
        model = comfy.sd.load_diffusion_model(str(folder / name)).model.diffusion_model.float()
        with torch.inference_mode():
            return model(x, torch.tensor([0.5]), context).float()

    def error(a, b):
        return ((a - b).norm() / b.norm()).item()

    reference = core_output("core-klein.safetensors")
    native = error(core_output("core-klein-fp8.safetensors"), reference)
    without_markers = error(core_output("core-klein-fp8-unmarked.safetensors"), reference)
    ours = error(*(sample_forward(kn.load_transformer(folder / name, dtype=torch.float32))
                   for name in ("core-klein-fp8.safetensors", "core-klein.safetensors")))
    assert native <= max(2 * ours, 0.01), f"core reads our fp8 file with {native:.1%} error (ours: {ours:.1%})"
    assert without_markers > 10 * native, "the check cannot tell markers from none"
    print(f"ok  our fp8 file in core's own loader: {native:.2%} from core's bf16 result (ours: {ours:.2%}; "
          f"without the markers core would be off by {without_markers:.0%})")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    core = Path(sys.argv[1]).resolve()
    model_patcher = import_core(core)
    kn = import_pack()
    with tempfile.TemporaryDirectory() as folder:
        for name, model, forward in tiny_models(kn, Path(folder)):
            check(model_patcher, name, model, forward)
        check_dynamic_vram(model_patcher)
        if has_native_klein(core):
            check_native_fp8(kn, Path(folder))


if __name__ == "__main__":
    main()
