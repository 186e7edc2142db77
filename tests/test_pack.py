"""The pack as ComfyUI sees it (folder import, nodes) and the command line."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import klein_nodes as kn
from klein_nodes.cli import main
from klein_nodes.models.transformer import Flux2Params
from klein_nodes.testing import TINY_TRANSFORMER, write_transformer

PACK_ROOT = Path(kn.__file__).parent


def test_library_import_has_no_nodes():
    assert "comfy" not in sys.modules
    assert not hasattr(kn, "NODE_CLASS_MAPPINGS")


def test_pack_loads_under_its_folder_name_inside_comfyui(comfyui, tmp_path):
    """ComfyUI imports custom_nodes/<folder>/__init__.py under the folder's name: relative imports must hold."""
    folder = tmp_path / "custom_nodes" / "ComfyUI-Flux2-Klein"
    folder.parent.mkdir()
    folder.symlink_to(PACK_ROOT)
    spec = importlib.util.spec_from_file_location(folder.name, folder / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[folder.name] = module
    try:
        spec.loader.exec_module(module)
        assert set(module.NODE_CLASS_MAPPINGS) == set(module.NODE_DISPLAY_NAME_MAPPINGS)
        assert "KleinTransformerLoader" in module.NODE_CLASS_MAPPINGS
        assert module.load_transformer.__module__ == f"{folder.name}.loaders.transformer"
        assert (folder / module.WEB_DIRECTORY / "klein_drop_jpeg.js").is_file()
    finally:
        for name in [n for n in sys.modules if n == folder.name or n.startswith(folder.name + ".")]:
            del sys.modules[name]


def test_transformer_loader_node(comfyui):
    from klein_nodes.nodes import NODE_CLASS_MAPPINGS

    write_transformer(comfyui / "diffusion_models" / "klein" / "flux-2-klein-4b.safetensors")
    write_transformer(comfyui / "unet" / "other.gguf.txt")  # not a weight file: not listed
    node = NODE_CLASS_MAPPINGS["KleinTransformerLoader"]
    inputs = node.INPUT_TYPES()["required"]
    assert inputs["model_name"][0] == ["klein/flux-2-klein-4b.safetensors"]
    assert all("tooltip" in options for _, options in inputs.values())
    (model,) = getattr(node(), node.FUNCTION)(model_name="klein/flux-2-klein-4b.safetensors", weight_dtype="fp32")
    assert model.params == TINY_TRANSFORMER and model.dtype == torch.float32
    with pytest.raises(ValueError, match="outside"):
        node().load(model_name="../../../etc/passwd")
    shared = comfyui.parent.parent / "shared-models" / "klein.safetensors"  # models shared between installs
    write_transformer(shared)
    (comfyui / "diffusion_models" / "linked.safetensors").symlink_to(shared)
    assert node().load(model_name="linked.safetensors")[0].params == TINY_TRANSFORMER


def test_doctor_lists_klein_files(comfyui, capsys):
    klein_4b = Flux2Params(**{**TINY_TRANSFORMER.__dict__, "context_in_dim": 7680})
    write_transformer(comfyui / "diffusion_models" / "flux-2-klein-4b.safetensors", params=klein_4b)
    save_file({"model.embed_tokens.weight": torch.zeros(8, 2560),
               "model.layers.0.input_layernorm.weight": torch.zeros(2560),
               "model.layers.0.self_attn.q_norm.weight": torch.zeros(128)},
              str(comfyui / "text_encoders" / "qwen_3_4b.safetensors"))
    save_file({"decoder.conv_in.weight": torch.zeros(4, 16, 3, 3)}, str(comfyui / "vae" / "ae_flux1.safetensors"))
    (comfyui / "vae" / "broken.safetensors").write_bytes(b"\x00" * 4)
    assert main(["doctor", "--comfyui", str(comfyui.parent)]) == 0
    out = capsys.readouterr().out
    assert "torch " + torch.__version__ in out
    assert "[klein] flux-2-klein-4b.safetensors: FLUX.2 klein 4B transformer" in out
    assert "[klein] qwen_3_4b.safetensors: Qwen3-4B text encoder" in out
    assert "ae_flux1.safetensors: FLUX.1/SD3 VAE" in out and "[klein] ae_flux1" not in out
    assert "[error] broken.safetensors" in out


def test_doctor_inside_comfyui_uses_folder_paths(comfyui, capsys):
    write_transformer(comfyui / "unet" / "flux-2-klein-4b.safetensors")
    assert main(["doctor"]) == 0
    assert "[klein] flux-2-klein-4b.safetensors" in capsys.readouterr().out


def test_doctor_rejects_a_folder_that_is_not_comfyui(tmp_path, capsys):
    assert main(["doctor", "--comfyui", str(tmp_path)]) == 2
    assert "not a ComfyUI install" in capsys.readouterr().err


def test_inspect(tmp_path, capsys):
    path, _ = write_transformer(tmp_path / "t.safetensors", prefix="model.diffusion_model.")
    (tmp_path / "bad.safetensors").write_text("nope")
    assert main(["inspect", str(path), str(tmp_path / "bad.safetensors"), str(tmp_path)]) == 2  # a user's mistake
    captured = capsys.readouterr()
    assert "FLUX.2-family (text width 96) transformer [bfl layout]" in captured.out
    assert f"error: {tmp_path / 'bad.safetensors'}: not a safetensors file" in captured.err
    assert captured.out.count("t.safetensors: FLUX.2-family") == 2  # named, then found again in the folder
    assert captured.err.count("bad.safetensors: not a safetensors file") == 2


def test_text_encoder_nodes(comfyui, tmp_path, monkeypatch):
    """Loader finds the file and ComfyUI's bundled tokenizer; Text Encode gives core's CONDITIONING shape."""
    from klein_nodes.nodes import NODE_CLASS_MAPPINGS
    from klein_nodes.testing import TINY_QWEN3, write_text_encoder, write_tokenizer

    write_tokenizer(comfyui.parent / "comfy" / "text_encoders" / "qwen25_tokenizer")
    write_text_encoder(comfyui / "text_encoders" / "qwen_3_4b.safetensors",
                       params=TINY_QWEN3.__class__(**{**TINY_QWEN3.__dict__, "num_layers": 28}))
    loader = NODE_CLASS_MAPPINGS["KleinTextEncoderLoader"]
    assert loader.INPUT_TYPES()["required"]["text_encoder_name"][0] == ["qwen_3_4b.safetensors"]
    (text_encoder,) = loader().load(text_encoder_name="qwen_3_4b.safetensors")
    assert len(text_encoder.model.layers) == 27
    encode = NODE_CLASS_MAPPINGS["KleinTextEncode"]
    assert all("tooltip" in options for _, options in encode.INPUT_TYPES()["required"].values())
    ((conditioning, extras),) = encode().encode(text_encoder, "a red fox")[0]
    assert conditioning.shape == (1, 512, 3 * TINY_QWEN3.hidden_size) and conditioning.dtype == torch.float32
    assert extras == {}
    assert torch.equal(conditioning, text_encoder.encode(["a red fox"]).float())


def test_vae_loader_node(comfyui):
    from safetensors.torch import save_file as save

    from klein_nodes.nodes import NODE_CLASS_MAPPINGS
    from helpers import TINY_VAE, diffusers_vae, vae_diffusers_to_bfl

    state = vae_diffusers_to_bfl(diffusers_vae().state_dict(), TINY_VAE)
    save({k: v.contiguous() for k, v in state.items()}, str(comfyui / "vae" / "flux2-vae.safetensors"))
    node = NODE_CLASS_MAPPINGS["KleinVAELoader"]
    assert node.INPUT_TYPES()["required"]["vae_name"][0] == ["flux2-vae.safetensors"]
    (vae,) = node().load(vae_name="flux2-vae.safetensors", weight_dtype="bf16")
    assert vae.params == TINY_VAE and vae.dtype == torch.bfloat16


def test_model_names_outside_their_folder_or_missing_are_refused_by_name(comfyui):
    from klein_nodes.nodes.files import classifier_path, model_path

    (comfyui / "vae" / "ae.safetensors").write_bytes(b"")
    assert model_path("vae", "ae.safetensors") == str(comfyui / "vae" / "ae.safetensors")
    with pytest.raises(kn.KleinError, match=r"\.\./loras/x\.safetensors: refers to a file outside the vae folder"):
        model_path("vae", "../loras/x.safetensors")
    with pytest.raises(kn.KleinError, match="gone.safetensors: not found in the vae folders .* press R"):
        model_path("vae", "gone.safetensors")
    with pytest.raises(kn.KleinError, match="nsfw: no classifier folder of that name"):
        classifier_path("nsfw")


def test_doctor_predicts_the_peak_of_one_image_with_the_files_found(tmp_path, capsys):
    """Block by block from the files' headers: on the CPU one block's weights at a time (paged), then the decode."""
    from klein_nodes.loaders.inventory import inventory
    from klein_nodes.testing import write_tiny_model_set

    transformer, text_encoder, _ = write_tiny_model_set(tmp_path / "ComfyUI")
    assert main(["doctor", "--comfyui", str(tmp_path / "ComfyUI")]) == 0
    out = capsys.readouterr().out
    assert "Memory for one 1024x1024 image with flux-2-klein-tiny.safetensors, qwen3-tiny.safetensors, " in out
    assert re.search(r"  CPU \([\d.]+ GiB free\): text encoder paged, transformer paged, VAE resident, peak [\d.]+ GiB",
                     out)
    assert len(inventory(transformer).blocks) == 4 and len(inventory(text_encoder).blocks) == 28  # 2+2 blocks, layers


def test_doctor_says_what_it_could_not_plan_for(comfyui, capsys):
    write_transformer(comfyui / "diffusion_models" / "flux-2-klein-4b.safetensors")
    assert main(["doctor", "--comfyui", str(comfyui.parent)]) == 0
    assert "Memory: no text encoder, vae found, so no plan" in capsys.readouterr().out
