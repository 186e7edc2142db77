"""The README's commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in readme


def test_python_snippets_run_as_written(tmp_path, monkeypatch):
    """Every ```python block of the README, in order and in one namespace, on tiny models saved under the official
    file names in a ComfyUI-style models/ folder (the images they open are made here)."""
    import re

    import numpy as np
    from PIL import Image

    from klein_nodes.testing import write_workflow_models

    write_workflow_models(tmp_path)
    rng = np.random.default_rng(0)
    for name in ("cat.png", "hat.png", "photo.png"):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(tmp_path / name)
    Image.fromarray((np.arange(128)[None, :].repeat(96, 0) > 64).astype(np.uint8) * 255).save(tmp_path / "mask.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 4
    namespace = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 (the README's own code)
    assert namespace["v"].shape == (1, 1024, 128) and namespace["px"].shape == (1, 3, 512, 512)
    assert namespace["img"].shape == (1, 96, 128, 3) and [p.name for p in namespace["paths"]] == ["klein_00001_.png"]
