"""`python -m klein_nodes generate`: tiny random models, models found in a ComfyUI install, bad outputs."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from klein_nodes.cli import main
from klein_nodes.errors import KleinError
from klein_nodes.testing import write_tiny_model_set


def test_generate_tiny_random_in_a_fresh_process(tmp_path):
    out = tmp_path / "fox.png"
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "TMPDIR": str(tmp_path / "tmp")}
    proc = subprocess.run([sys.executable, "-m", "klein_nodes", "generate", "a red fox", "-o", str(out),
                           "--tiny-random", "--aspect", "4:3", "--megapixels", "0.1", "--seed", "5"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "seed 5" in proc.stderr and "\nstep 4/4 (" in proc.stderr and "\r" not in proc.stderr  # log-friendly lines
    assert list((tmp_path / "tmp").glob("klein-*")) == []  # the tiny random models are removed after the run
    assert "memory plan: text encoder paged, transformer paged, VAE resident" in proc.stderr
    assert Image.open(out).size == (368, 272)
    assert (tmp_path / "config" / "klein_nodes" / "c2pa" / "signer.key").exists()
    from klein_nodes.provenance.save import verify_image

    anchor = (tmp_path / "config" / "klein_nodes" / "c2pa" / "root.pem").read_bytes()
    report = verify_image(out, anchor)
    assert report["c2pa"] == "Trusted" and report["prompt"] and report["watermark_bits"] is not None


def test_generate_finds_models_in_comfyui_and_never_overwrites(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    write_tiny_model_set(tmp_path / "ComfyUI")
    reference = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(reference)
    args = ["generate", "a cat", "-o", str(tmp_path / "cat.png"), "--comfyui", str(tmp_path / "ComfyUI"),
            "--width", "100", "--height", "64", "--batch", "2", "--seed", "1", "--ref", str(reference), "--no-c2pa"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.err.count("rounded to 96x64") == 1 and "note: size 100x64 rounded to 96x64" in captured.err
    assert "Warning" not in captured.err and ".py" not in captured.err  # one note, no raw warning with a source path
    assert [Image.open(tmp_path / f"cat_0000{i}.png").size for i in (1, 2)] == [(96, 64)] * 2
    assert main(args) == 2
    assert "already exist" in capsys.readouterr().err


def test_generate_without_models_explains(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert main(["generate", "a cat", "-o", str(tmp_path / "x.png")]) == 2
    assert "--model PATH" in capsys.readouterr().err
    assert main(["generate", "a cat", "-o", str(tmp_path / "x.gif"), "--tiny-random"]) == 2
    assert ".png, .jpg or .webp" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "a cat", "-o", str(tmp_path / "x.png"), "--tiny-random", "--max-tokens", "-1"])
    assert "argument --max-tokens: -1 is out of range: give 0 or more" in capsys.readouterr().err


def test_generate_with_loras(tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    from klein_nodes.cli import lora_spec

    assert lora_spec("a:b/style.safetensors:0.75") == ("a:b/style.safetensors", 0.75)
    assert lora_spec("C:/loras/style.safetensors") == ("C:/loras/style.safetensors", 1.0)
    write_tiny_model_set(tmp_path / "ComfyUI")
    generator = torch.Generator().manual_seed(0)
    save_file({"diffusion_model.single_blocks.0.linear2.lora_A.weight": torch.randn(4, 64 + 192, generator=generator),
               "diffusion_model.single_blocks.0.linear2.lora_B.weight": torch.randn(64, 4, generator=generator)},
              str(tmp_path / "style.safetensors"))
    base = ["generate", "a cat", "--comfyui", str(tmp_path / "ComfyUI"), "--width", "64", "--height", "64",
            "--seed", "5", "--no-c2pa", "--no-watermark"]
    assert main([*base, "-o", str(tmp_path / "plain.png")]) == 0
    assert main([*base, "-o", str(tmp_path / "lora.png"), "--lora", f"{tmp_path / 'style.safetensors'}:2"]) == 0
    plain, styled = (np.asarray(Image.open(tmp_path / n), dtype=np.float32) for n in ("plain.png", "lora.png"))
    assert np.abs(plain - styled).max() > 8


@pytest.mark.parametrize("argv,fragment", [
    (["--steps", "0"], "argument --steps: 0 is out of range: give 1 to 1000"),
    (["--steps", "-1"], "argument --steps: -1 is out of range"),
    (["--batch", "0"], "argument --batch: 0 is out of range"),
    (["--height", "-64"], "argument --height: -64 is out of range"),
    (["--quality", "101"], "argument --quality: 101 is out of range: give 1 to 100"),
    (["--quality", "0"], "argument --quality: 0 is out of range"),
    (["--guidance", "nan"], "argument --guidance: nan is out of range"),
    (["--steps", "four"], "argument --steps: 'four' is not a number"),
    (["--ref", "missing.png"], "--ref missing.png: no such file"),
    (["--ref", "NOTES"], "--ref NOTES: not an image this tool can read"),
    (["--lora", "missing.safetensors:0.5"], "--lora missing.safetensors: no such file"),
    (["--device", "cuda"], "--device cuda: this torch has no CUDA device"),
    (["--device", "gpu"], "--device gpu: not a device; give auto, cpu, cuda, cuda:N (N = the GPU's number) or mps"),
    (["--device", "cuda:x"], "--device cuda:x: not a device; give auto, cpu, cuda, cuda:N"),
    (["--device", ""], "--device '': not a device; give auto, cpu"),
    (["--device", "mps"], "--device mps: Apple's Metal (MPS) is not available here"),
    (["--lora", "NOTES:abc"], "--lora NOTES:abc: the strength 'abc' is not a number; give FILE or FILE:STRENGTH"),
    (["--lora", "NOTES:inf"], "--lora NOTES:inf: the strength must be a finite number"),
    (["--lora", "absent.safetensors:abc"], "--lora absent.safetensors:abc: no such file"),
    (["--width", "4096", "--height", "4096"], "4096x4096 is"),
])
def test_generate_refuses_mistakes_before_loading_anything(tmp_path, monkeypatch, capsys, argv, fragment):
    if argv[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if argv[:2] == ["--device", "mps"] and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "NOTES").write_text("not an image")
    monkeypatch.setattr("klein_nodes.cli.resolve_models", lambda args: pytest.fail("models were loaded"))
    try:
        code = main(["generate", "a cat", "-o", str(tmp_path / "x.png"), *argv])
    except SystemExit as exit:  # argparse's own usage error
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err, err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv,fragment", [
    (["verify", "missing.png"], "missing.png: no such file"),
    (["verify", "--trust", "missing.pem", "NOTES"], "missing.pem: no such file"),
])
def test_verify_refuses_missing_files(tmp_path, monkeypatch, capsys, argv, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "NOTES").write_text("x")
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err


def test_unexpected_errors_are_one_line_unless_debugging(monkeypatch, capsys):
    def broken(args):
        raise ZeroDivisionError("division by zero")
    from klein_nodes import cli

    monkeypatch.setattr(cli, "doctor", broken)
    assert main(["doctor"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: unexpected ZeroDivisionError: division by zero (run with --debug for the details)"
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "doctor"])


def test_comfyui_search_takes_every_format_and_picks_what_fits(tmp_path, capsys, monkeypatch):
    from klein_nodes.loaders.convert import quantize_file

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    transformer, _, _ = write_tiny_model_set(tmp_path / "ComfyUI")
    folder = transformer.parent
    quantize_file(transformer, folder / "klein-Q4_K.gguf", "Q4_K")
    quantize_file(transformer, folder / "klein-fp8.safetensors", "fp8")
    args = ["generate", "a cat", "-o", str(tmp_path / "cat.png"), "--comfyui", str(tmp_path / "ComfyUI"),
            "--width", "64", "--height", "64", "--steps", "1", "--no-c2pa"]
    monkeypatch.setattr("klein_nodes.cli.memory_budget", lambda device: (10**9, "1.0 GiB free VRAM"))
    assert main(args) == 0
    err = capsys.readouterr().err
    assert f"note: model: {transformer.name} (bf16, " in err and "the largest of 3 that fits 1.0 GiB free VRAM" in err
    assert "klein-Q4_K.gguf (GGUF Q8_0 (with Q4_K)" in err and "klein-fp8.safetensors (fp8 (scaled)" in err
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    monkeypatch.setattr("klein_nodes.cli.memory_budget",  # room for the GGUF only
                        lambda device: (int(sizes["klein-Q4_K.gguf"] * 1.3), "little VRAM"))
    assert main(args[:3] + [str(tmp_path / "cat2.png")] + args[4:]) == 0
    assert "note: model: klein-Q4_K.gguf (GGUF" in capsys.readouterr().err
    transformer.unlink()
    (folder / "klein-fp8.safetensors").unlink()  # a GGUF alone is found too (README: the low-VRAM path)
    assert main(args[:3] + [str(tmp_path / "cat3.png")] + args[4:]) == 0
    assert Image.open(tmp_path / "cat3.png").size == (64, 64)


def test_tokenizer_option_and_a_missing_tokenizer_before_loading(tmp_path, capsys, monkeypatch):
    from klein_nodes.models.text_encoder import Qwen3Params
    from klein_nodes.testing import TINY_QWEN3, write_text_encoder, write_tokenizer

    monkeypatch.delenv("KLEIN_TOKENIZER", raising=False)
    transformer, _, vae = write_tiny_model_set(tmp_path / "models")
    (tmp_path / "alone").mkdir()
    encoder, _ = write_text_encoder(tmp_path / "alone" / "qwen_3_4b.safetensors",  # no tokenizer beside it
                                    Qwen3Params(**{**TINY_QWEN3.__dict__, "num_layers": 28}))
    loaded = []
    monkeypatch.setattr("klein_nodes.loaders.transformer.load_transformer", lambda *a, **k: loaded.append(a))
    args = ["generate", "a cat", "-o", str(tmp_path / "cat.png"), "--model", str(transformer), "--text-encoder",
            str(encoder), "--vae", str(vae), "--width", "64", "--height", "64", "--steps", "1", "--no-c2pa"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no Qwen tokenizer found" in err and "--tokenizer" in err and loaded == []
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert main(args + ["--tokenizer", str(write_tokenizer(tmp_path / "tok"))]) == 0
    assert Image.open(tmp_path / "cat.png").size == (64, 64)


def test_inspect_files_and_folders(tmp_path, capsys):
    from klein_nodes.loaders.convert import quantize_file
    from klein_nodes.testing import write_workflow_loras

    transformer, encoder, _ = write_tiny_model_set(tmp_path / "models")
    quantize_file(transformer, tmp_path / "models" / "klein-fp8.safetensors", "fp8")
    quantize_file(encoder, tmp_path / "models" / "qwen-Q4_K.gguf", "Q4_K")
    write_workflow_loras(tmp_path / "loras")
    assert main(["inspect", str(tmp_path / "models"), str(tmp_path / "loras")]) == 0
    out = capsys.readouterr().out
    assert ("klein-fp8.safetensors: FLUX.2-family (text width 96) transformer [bfl layout]; stored as fp8 (scaled)"
            in out)
    assert "qwen-Q4_K.gguf: Qwen3 text encoder (GGUF) [gguf layout]; stored as GGUF Q8_0" in out  # tiny rows: Q8_0
    assert " F8_E4M3 " in out and " Q8_0 " in out and " tensors " in out and " MiB" in out
    assert ("klein_style_lora.safetensors: LoRA (BFL/ComfyUI names) for an unknown model, rank 4, targets: 1 "
            "transformer layers, 1 text encoder layers") in out
    assert "klein_detail_lokr.safetensors: LyCORIS LoKr (BFL/ComfyUI names)" in out
    assert main(["inspect", str(tmp_path / "empty-folder")]) == 2


@pytest.fixture(scope="module")
def tiny_comfyui(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit") / "ComfyUI"
    write_tiny_model_set(root)
    return root


def photo_file(path, size=(96, 64), seed=0):
    from helpers import natural_photo

    pixels = natural_photo(("chelsea", "coffee", "rocket")[seed], max(size))[: size[1], : size[0]]
    Image.fromarray(np.ascontiguousarray(pixels)).save(path)
    return path


def ingredients(path):
    from klein_nodes.provenance.save import verify_image

    anchor = (Path(os.environ["XDG_CONFIG_HOME"]) / "klein_nodes" / "c2pa" / "root.pem").read_bytes()
    return [i["title"] for i in verify_image(path, anchor)["c2pa_ingredients"]]


def test_generate_edits_images_and_records_them_as_ingredients(tiny_comfyui, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    source, reference = photo_file(tmp_path / "photo.png"), photo_file(tmp_path / "hat.png", seed=1)
    mask = np.zeros((64, 96), dtype=np.uint8)
    mask[16:48, 32:64] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    base = ["generate", "a cat", "--comfyui", str(tiny_comfyui), "--seed", "3", "--steps", "2", "--no-watermark"]
    assert main([*base, "-o", str(tmp_path / "img2img.png"), "--image", str(source), "--denoise", "0.5"]) == 0
    assert Image.open(tmp_path / "img2img.png").size == (96, 64)  # the size of --image
    assert ingredients(tmp_path / "img2img.png") == ["photo.png"]
    assert main([*base, "-o", str(tmp_path / "inpaint.png"), "--image", str(source), "--mask",
                 str(tmp_path / "mask.png"), "--composite", "--ref", str(reference)]) == 0
    assert "composite: shift" in capsys.readouterr().err
    inpainted = np.asarray(Image.open(tmp_path / "inpaint.png"))
    original = np.asarray(Image.open(source))
    assert np.array_equal(inpainted[mask == 0], original[mask == 0])  # outside the mask: the photo's own pixels
    assert not np.array_equal(inpainted[mask == 255], original[mask == 255])
    assert ingredients(tmp_path / "inpaint.png") == ["photo.png", "hat.png"]
    assert main([*base, "-o", str(tmp_path / "edit.png"), "--ref", str(reference),
                 "--width", "64", "--height", "64"]) == 0
    assert ingredients(tmp_path / "edit.png") == ["hat.png"]


def test_generate_outpaints_and_upscales(tiny_comfyui, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    source = photo_file(tmp_path / "photo.png")
    base = ["generate", "a cat", "--comfyui", str(tiny_comfyui), "--seed", "3", "--steps", "2", "--no-watermark",
            "--no-c2pa"]
    assert main([*base, "-o", str(tmp_path / "wide.png"), "--image", str(source), "--outpaint", "32,0,32,16"]) == 0
    wide = np.asarray(Image.open(tmp_path / "wide.png"))
    assert wide.shape == (80, 160, 3)
    assert np.array_equal(wide[:32, 32 + 32: 128 - 32], np.asarray(Image.open(source))[:32, 32:64])  # beyond the band
    assert main([*base, "-o", str(tmp_path / "big.png"), "--image", str(source),
                 "--upscale", "4", "--tile", "256"]) == 0
    assert Image.open(tmp_path / "big.png").size == (384, 256)
    err = capsys.readouterr().err
    assert "refine: tile 2/2" in err and "seed 3" in err
    assert main([*base, "-o", str(tmp_path / "t2i_big.png"), "--width", "64", "--height", "64", "--upscale", "4",
                 "--tile", "256"]) == 0
    assert Image.open(tmp_path / "t2i_big.png").size == (256, 256)


@pytest.mark.parametrize("flags, message", [
    (["--mask", "MASK"], "--mask needs --image"),
    (["--outpaint", "16:9"], "--outpaint needs --image"),
    (["--image", "PHOTO", "--outpaint", "16:9", "--mask", "MASK"], "makes its own mask"),
    (["--image", "PHOTO", "--outpaint", "1,2,3"], "LEFT,TOP,RIGHT,BOTTOM"),
    (["--composite"], "--composite needs --image or --ref"),
    (["--denoise", "0.5"], "--denoise needs --image"),
    (["--image", "PHOTO", "--upscale", "8", "--width", "2048", "--height", "2048"], "up to 64 MP"),
    (["--image", "missing.png"], "--image missing.png: no such file"),
    (["--image", "MASK_AS_TEXT"], "not an image"),
])
def test_generate_refuses_edit_mistakes_before_loading_models(tmp_path, capsys, flags, message):
    photo = photo_file(tmp_path / "photo.png")
    (tmp_path / "notes.txt").write_text("not an image")
    names = {"PHOTO": str(photo), "MASK": str(photo), "MASK_AS_TEXT": str(tmp_path / "notes.txt")}
    args = ["generate", "a cat", "-o", str(tmp_path / "x.png"), "--model", str(tmp_path / "absent.safetensors"),
            "--text-encoder", "x", "--vae", "y"] + [names.get(f, f) for f in flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "absent.safetensors" not in err and "Traceback" not in err


def test_ctrl_c_stops_with_one_line_and_leaves_nothing(tmp_path):
    import signal

    out, scratch = tmp_path / "out", tmp_path / "tmp"
    out.mkdir()
    scratch.mkdir()
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config"), "TMPDIR": str(scratch)}
    proc = subprocess.Popen([sys.executable, "-m", "klein_nodes", "generate", "a red fox", "-o", str(out / "fox.png"),
                             "--tiny-random", "--width", "64", "--height", "64", "--steps", "1000", "--batch", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        before = []
        for line in proc.stderr:  # the first progress line: sampling has begun
            before.append(line)
            if line.startswith("step "):
                proc.send_signal(signal.SIGINT)
                break
        stdout, after = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, "".join(before) + after
    said = [line for line in after.splitlines() if not line.startswith("step ")]  # steps already under way
    assert said == ["interrupted; nothing was written for the image in progress"], after
    assert "Traceback" not in "".join(before) and stdout == ""
    assert list(out.iterdir()) == [] and list(scratch.iterdir()) == []  # no image, no temporary file, no tiny models


def test_ctrl_c_while_a_file_is_written_finishes_that_file_then_stops(tiny_comfyui, tmp_path, capsys, monkeypatch):
    import pathlib
    import signal

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    write_bytes = pathlib.Path.write_bytes

    def interrupted_write(self, data):  # Ctrl-C halfway through save_file's temporary file
        if not self.name.startswith(".klein-"):
            return write_bytes(self, data)
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGINT)
            f.write(data[len(data) // 2:])
        return len(data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", interrupted_write)
    assert main(["generate", "a cat", "-o", str(tmp_path / "cat.png"), "--comfyui", str(tiny_comfyui), "--width", "64",
                 "--height", "64", "--steps", "1", "--batch", "2", "--no-watermark"]) == 130
    captured = capsys.readouterr()
    assert captured.err.endswith("\ninterrupted; nothing was written for the image in progress\n")
    assert captured.out == f"{tmp_path / 'cat_00001.png'}\n"  # the file being written was finished, the next not begun
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat_00001.png", "config"]
    monkeypatch.undo()
    from klein_nodes.provenance.save import verify_image

    anchor = (tmp_path / "config" / "klein_nodes" / "c2pa" / "root.pem").read_bytes()
    assert verify_image(tmp_path / "cat_00001.png", anchor)["c2pa"] == "Trusted"  # whole: its signature checks


def test_interrupting_quantize_leaves_no_file(tmp_path, capsys, monkeypatch):
    transformer, _, _ = write_tiny_model_set(tmp_path / "models")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("klein_nodes.loaders.convert.write_gguf", interrupted)
    assert main(["quantize", str(transformer), str(tmp_path / "out.gguf")]) == 130
    assert capsys.readouterr().err == f"interrupted; {tmp_path / 'out.gguf'} was not written\n"
    assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())


def test_device_names_are_checked_and_normalised():
    from klein_nodes.cli import checked_device

    assert checked_device("auto") == "auto" and checked_device(" CPU ") == "cpu"
    with pytest.raises(KleinError, match=r"--device cuda:0:1: not a device; give auto, cpu, cuda, cuda:N"):
        checked_device("cuda:0:1")
    with pytest.raises(KleinError, match="--device cpu:1: not a device"):
        checked_device("cpu:1")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        assert checked_device("CUDA:0") == "cuda:0" and checked_device("cuda") == "cuda"
        with pytest.raises(KleinError, match=f"--device cuda:{count}: this machine has {count} CUDA device"):
            checked_device(f"cuda:{count}")
    else:
        with pytest.raises(KleinError, match="--device cuda:1: this torch has no CUDA device"):
            checked_device("cuda:1")


def test_lora_file_and_strength(tmp_path, monkeypatch):
    from klein_nodes.cli import lora_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "style.safetensors").write_bytes(b"x")
    (tmp_path / "odd:name.safetensors").write_bytes(b"x")
    assert lora_spec("style.safetensors") == ("style.safetensors", 1.0)
    assert lora_spec("style.safetensors:-0.5") == ("style.safetensors", -0.5)
    assert lora_spec("odd:name.safetensors") == ("odd:name.safetensors", 1.0)  # a file whose name holds a ':'
    assert lora_spec("C:\\loras\\style.safetensors") == ("C:\\loras\\style.safetensors", 1.0)  # Windows drive
    assert lora_spec("C:\\loras\\style.safetensors:0.8") == ("C:\\loras\\style.safetensors", 0.8)
    assert lora_spec("missing.safetensors:abc") == ("missing.safetensors:abc", 1.0)  # then reported missing
    (tmp_path / "C").write_bytes(b"x")  # a file named like a drive letter does not take the path apart
    assert lora_spec("C:/loras/style.safetensors") == ("C:/loras/style.safetensors", 1.0)
    with pytest.raises(KleinError, match=r"--lora style.safetensors:abc: the strength 'abc' is not a number; give "
                                         r"FILE or FILE:STRENGTH \(e.g. style.safetensors:0.8\)"):
        lora_spec("style.safetensors:abc")
    with pytest.raises(KleinError, match="the strength '' is not a number"):
        lora_spec("style.safetensors:")


def test_quantize_refuses_a_gguf_input_and_takes_types_in_any_case(tmp_path, capsys):
    from klein_nodes.loaders.convert import quantize_file

    transformer, _, _ = write_tiny_model_set(tmp_path / "models")
    gguf = tmp_path / "klein-Q8_0.gguf"
    quantize_file(transformer, gguf, "Q8_0")
    assert main(["quantize", str(gguf), str(tmp_path / "again.gguf"), "--type", "Q4_K"]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {gguf}: already a GGUF (quantized) file; the quantizer takes a safetensors transformer "
                   "(BFL/ComfyUI layout) or Qwen3 text encoder: quantize the original .safetensors\n")
    assert not (tmp_path / "again.gguf").exists()
    assert main(["quantize", str(transformer), str(tmp_path / "q4.gguf"), "--type", "q4_k"]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'q4.gguf'}: transformer as Q4_K, ")
    assert main(["quantize", str(transformer), str(tmp_path / "fp8.safetensors"), "--type", "FP8"]) == 0
    assert "transformer as fp8, " in capsys.readouterr().out
    assert main(["quantize", str(transformer), str(tmp_path / "q3.gguf"), "--type", "q3_k"]) == 2
    assert capsys.readouterr().err == ("error: --type q3_k: not a quantization type; choose one of Q8_0, Q6_K, Q5_K, "
                                       "Q4_K, Q5_1, Q5_0, Q4_1, Q4_0, fp8\n")


def test_verify_says_whose_trust_a_signature_has(tiny_comfyui, tmp_path, capsys, monkeypatch):
    import json

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    image = tmp_path / "cat.png"
    assert main(["generate", "a cat", "-o", str(image), "--comfyui", str(tiny_comfyui), "--width", "64", "--height",
                 "64", "--steps", "1"]) == 0
    capsys.readouterr()

    def report(*argv):
        code = main(["verify", str(image), *argv])
        line = capsys.readouterr().out
        assert line.startswith(f"{image}: ")
        return code, json.loads(line[len(f"{image}: "):])

    code, local = report()  # the default: this machine's own self-made root, not public trust
    assert code == 0 and local["c2pa"] == "Valid"
    assert local["trust"] == "this machine's own signing key (a root this pack made here; not a public trust list)"
    root = tmp_path / "config" / "klein_nodes" / "c2pa" / "root.pem"
    code, given = report("--trust", str(root))
    assert code == 0 and given["c2pa"] == "Valid"
    assert given["trust"] == f"trusted by the trust list you gave (--trust {root})"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "elsewhere"))  # another machine: no root of its own
    code, other = report()
    assert code == 0 and other["c2pa"] == "Valid" and other["trust"].startswith("not trusted: the signature is intact")
    assert "Trusted" not in json.dumps([local, given, other])
    unsigned = tmp_path / "unsigned.png"
    Image.new("RGB", (32, 32)).save(unsigned)
    assert main(["verify", str(unsigned)]) == 1
    line = capsys.readouterr().out
    assert '"c2pa": "None", "trust": null' in line
    assert main(["verify", str(image), "--trust", str(image)]) == 2
    assert capsys.readouterr().err == f"error: --trust {image}: not a PEM certificate (-----BEGIN CERTIFICATE-----)\n"


@pytest.mark.parametrize("command", ["generate", "quantize", "verify", "doctor", "inspect"])
def test_help_lists_exit_codes(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    codes = text[text.index("\nexit codes:\n"):]
    assert all(f"\n  {code} " in codes for code in (0, 1, 2, 130)) and ("\n  3 " in codes) == (command == "generate")
    docs = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    assert f"`{command}`" in docs[docs.index("## Exit codes"):]
