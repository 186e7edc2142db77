"""One graph in two ComfyUI versions, each with its own bundled Qwen tokenizer: the same seed and files must give the
same image (ComfyUI 0.3.x bundles other added tokens than Qwen3's; the pack uses Qwen3's on every core).

    python tools/comfyui_cross_core.py /path/to/ComfyUI-A[=python] /path/to/ComfyUI-B[=python] [--keep]

Each core runs with its own Python (default: <core>/venv/bin/python) on a throwaway base folder with the tiny models
of tools/comfyui_workflows.py, but no tokenizer of its own, so the core's bundled one is used. Prints each image's
tokens at the end of klein's template and the largest pixel difference; exits non-zero when the images differ.
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfyui_workflows import ROOT, prepare, run, start

GRAPH = ROOT / "example_workflows" / "api" / "klein_text_to_image.json"


def render(core, python, base):
    """The text-to-image template's image (uint8 array) from `core`, with the core's bundled tokenizer."""
    import numpy as np
    from PIL import Image

    prepare(base)
    shutil.rmtree(base / "comfy")  # the tiny tokenizer: without it the core's own is found
    version = (core / "comfyui_version.py").read_text().split('"')[1]
    with open(base / "server.log", "w") as log:
        server, url = start(core, base, None, log, python)
        try:
            status, seconds, images, message = run(url, json.loads(GRAPH.read_text()))
        finally:
            server.terminate()
            server.wait(30)
    print(f"ComfyUI {version}: {status} in {seconds:.1f} s {message}")
    if status != "success":
        raise SystemExit(f"{core}: the graph failed; see {base / 'server.log'}")
    return np.asarray(Image.open(base / "output" / images[0]).convert("RGB"), dtype=np.int16)


def tokens(core):
    """klein's template for the graph's prompt through `core`'s bundled tokenizer, as the pack reads it."""
    from klein_nodes.loaders.tokenizer import load_tokenizer
    from klein_nodes.models.text_encoder import KLEIN_TEMPLATE

    prompt = json.loads(GRAPH.read_text())
    text = next(node["inputs"]["text"] for node in prompt.values() if node["class_type"] == "KleinTextEncode")
    tokenizer = load_tokenizer(core / "comfy" / "text_encoders" / "qwen25_tokenizer")
    return tokenizer.encode(KLEIN_TEMPLATE.format(text), add_special_tokens=False).ids


def main():
    cores = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(cores) != 2:
        sys.exit(__doc__)
    images, bases = [], []
    try:
        for spec in cores:
            core, _, python = spec.partition("=")
            core = Path(core).resolve()
            bases.append(Path(tempfile.mkdtemp(prefix="klein-cross-")))
            print(f"{core.name}: template ends in tokens {tokens(core)[-4:]}")
            images.append(render(core, python or str(core / "venv" / "bin" / "python"), bases[-1]))
    finally:
        if "--keep" not in sys.argv:
            for base in bases:
                shutil.rmtree(base, ignore_errors=True)
    worst = int(abs(images[0] - images[1]).max()) if images[0].shape == images[1].shape else None
    print(f"largest pixel difference between the two images: {worst}/255")
    sys.exit(0 if worst == 0 else 1)


if __name__ == "__main__":
    main()
