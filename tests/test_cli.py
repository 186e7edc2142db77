"""`python -m klein_nodes generate`: tiny random models, models found in a ComfyUI install, bad outputs."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from klein_nodes.cli import main
from klein_nodes.testing import write_tiny_model_set


def test_generate_tiny_random_in_a_fresh_process(tmp_path):
    out = tmp_path / "fox.png"
    env = {**os.environ, "XDG_CONFIG_HOME": str(tmp_path / "config")}
    proc = subprocess.run([sys.executable, "-m", "klein_nodes", "generate", "a red fox", "-o", str(out), "--tiny-random",
                           "--aspect", "4:3", "--megapixels", "0.1", "--seed", "5"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "seed 5" in proc.stderr and "step 4/4" in proc.stderr
    assert "memory plan: text encoder resident, transformer resident" in proc.stderr
    assert Image.open(out).size == (368, 272)
    assert (tmp_path / "config" / "klein_nodes" / "c2pa" / "signer.key").exists()
    from klein_nodes.provenance.save import verify_image

    anchor = (tmp_path / "config" / "klein_nodes" / "c2pa" / "root.pem").read_bytes()
    report = verify_image(out, anchor)
    assert report["c2pa"] == "Trusted" and report["prompt"] and report["watermark_bits"] is not None


def test_generate_finds_models_in_comfyui_and_never_overwrites(tmp_path, capsys, recwarn, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    write_tiny_model_set(tmp_path / "ComfyUI")
    reference = tmp_path / "ref.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(reference)
    args = ["generate", "a cat", "-o", str(tmp_path / "cat.png"), "--comfyui", str(tmp_path / "ComfyUI"),
            "--width", "100", "--height", "64", "--batch", "2", "--seed", "1", "--ref", str(reference), "--no-c2pa"]
    assert main(args) == 0
    assert "rounded to 96x64" in str(recwarn.pop(UserWarning).message)
    captured = capsys.readouterr()
    assert "note: size 100x64 rounded to 96x64" in captured.err
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
    (["--width", "4096", "--height", "4096"], "4096x4096 is"),
])
def test_generate_refuses_mistakes_before_loading_anything(tmp_path, monkeypatch, capsys, argv, fragment):
    if argv[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
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
