"""The README's commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in readme


def test_python_snippets_run_as_written(tmp_path, monkeypatch):
    """Every ```python block of the README and then of the docs pages, in order and in one namespace, on tiny models
    saved under the official file names in a ComfyUI-style models/ folder (the images they open are made here)."""
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
    namespace = {}

    def run(page):
        blocks = re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)
        for block in blocks:
            exec(compile(block, page, "exec"), namespace)  # noqa: S102 (the documentation's own code)
        return len(blocks)

    assert run("README.md") == 1
    assert namespace["img"].shape == (1, 1024, 1024, 3) and [p.name for p in namespace["paths"]] == ["klein_00001_.png"]
    assert namespace["kept"].shape == (96, 128, 3) and namespace["info"]["mask"] == "found"
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert sum(run(page.relative_to(ROOT)) for page in pages) >= 5
    assert namespace["v"].shape == (1, 1024, 128) and namespace["px"].shape == (1, 3, 512, 512)
    assert namespace["big"].shape[-1] == 3 and namespace["emb"].shape[0] == 2


def test_documentation_links_resolve():
    """Every relative link of the README and the docs pages names a file that exists."""
    import re

    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
