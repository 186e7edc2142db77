"""Example workflows: files up to date, UI files valid for our nodes, every API twin executed on tiny models."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from klein_nodes.testing import write_workflow_inputs, write_workflow_models
from helpers import random_weight_thresholds

WORKFLOWS = Path(__file__).resolve().parents[1] / "example_workflows"
sys.path.insert(0, str(WORKFLOWS))
import build  # noqa: E402

NAMES = list(build.WORKFLOWS)


def test_files_are_up_to_date():
    for relative, text in build.render().items():
        assert (WORKFLOWS / relative).read_text() == text, f"{relative} is stale: run python example_workflows/build.py"
    titles = sorted(title for title, _ in build.TEMPLATES.values())
    assert sorted(p.stem for p in WORKFLOWS.glob("*.json")) == titles  # only templates where ComfyUI lists them


def test_every_template_has_its_thumbnail_and_a_note_naming_its_files():
    assert sorted(p.stem for p in WORKFLOWS.glob("*.jpg")) == sorted(title for title, _ in build.TEMPLATES.values())
    for title, make in build.TEMPLATES.values():
        with Image.open(WORKFLOWS / f"{title}.jpg") as thumbnail:  # ComfyUI asks for exactly <title>.jpg
            assert thumbnail.format == "JPEG" and thumbnail.size == (640, 400)
        drawn = np.asarray(build.thumbnail(make()), dtype=np.int16)
        saved = np.asarray(Image.open(WORKFLOWS / f"{title}.jpg").convert("RGB"), dtype=np.int16)
        assert np.abs(drawn - saved).mean() < 6, f"{title}.jpg is stale: run python example_workflows/build.py"
        workflow = json.loads((WORKFLOWS / f"{title}.json").read_text())
        (note,) = [node for node in workflow["nodes"] if node["type"] == "Note"]
        for path in build.files_needed(make()):
            assert path in note["widgets_values"][0]


# The official downloads of the files our templates name, as ComfyUI's FLUX.2 klein templates list them
# (comfyui-workflow-templates: image_flux2_klein_text_to_image.json): file name -> folder under ComfyUI/models/.
OFFICIAL = {"flux-2-klein-4b.safetensors": "diffusion_models", "flux-2-klein-base-4b.safetensors": "diffusion_models",
            "qwen_3_4b.safetensors": "text_encoders", "flux2-vae.safetensors": "vae"}
LOADER_WIDGETS = {"KleinTransformerLoader": "model_name", "KleinTextEncoderLoader": "text_encoder_name",
                  "KleinVAELoader": "vae_name"}


@pytest.mark.parametrize("name", NAMES)
def test_official_files_come_with_their_download(name):
    """The frontend offers to download a missing model from the loader node's properties.models (name, url,
    directory); every official file a template loads has one, and no entry points at a file we made up."""
    ui = json.loads((WORKFLOWS / f"{build.TEMPLATES[name][0]}.json").read_text())
    loaded = 0
    for node in ui["nodes"]:
        entries = {m["name"]: m for m in node["properties"].get("models", [])}
        if node["type"] in LOADER_WIDGETS:
            loaded += 1
            value = node["widgets_values"][0]  # the file widget comes first on each loader
            if value in OFFICIAL:
                entry = entries.pop(value, None)
                assert entry is not None, f"{node['type']} loads {value} without a models entry"
                assert entry["directory"] == OFFICIAL[value]
                assert entry["url"].startswith("https://huggingface.co/") and entry["url"].endswith("/" + value)
                assert "/resolve/" in entry["url"]  # the file itself, not its page
        assert entries == {}, f"{node['type']}: models entries for files it does not load: {list(entries)}"
    assert loaded == 3


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """Tiny models under the file names the workflows use (built once), and ComfyUI's bundled tokenizer."""
    return write_workflow_models(tmp_path_factory.mktemp("comfy-models"))


@pytest.fixture()
def models(comfyui, model_files):
    for path in (model_files / "models").rglob("*.*"):
        target = comfyui / path.relative_to(model_files / "models")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
    (comfyui.parent / "comfy").symlink_to(model_files / "comfy")
    return comfyui


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_fits_the_nodes(models, name):
    from klein_nodes.nodes import NODE_CLASS_MAPPINGS

    ui = json.loads((WORKFLOWS / f"{build.TEMPLATES[name][0]}.json").read_text())
    for node in ui["nodes"]:
        assert node["type"] in NODE_CLASS_MAPPINGS or node["type"] in (*build.CORE_NODES, "Note"), node["type"]
        if node["type"] in (*build.CORE_NODES, "Note"):
            continue
        spec = NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
        widgets = [(name, kind, options) for section in ("required", "optional")
                   for name, (kind, *rest) in spec.get(section, {}).items()
                   for options in [rest[0] if rest else {}]
                   if isinstance(kind, list) or kind in build.WIDGET_TYPES]
        values = list(node["widgets_values"])
        for name_, kind, options in widgets:
            value = values.pop(0)
            if isinstance(kind, list):
                assert value in kind, f"{node['type']}.{name_}={value!r} not in {kind}"
            elif kind in ("INT", "FLOAT"):
                assert options.get("min", -np.inf) <= value <= options.get("max", np.inf), f"{node['type']}.{name_}"
            if options.get("control_after_generate"):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize")
        assert values == [], f"{node['type']} has extra widget values {values}"
        linked = {i["name"] for i in node["inputs"]}
        required = {n for n, (kind, *_) in spec["required"].items()
                    if not (isinstance(kind, list) or kind in build.WIDGET_TYPES)}
        assert required <= linked, f"{node['type']} misses inputs {required - linked}"


def load_image(path):
    """ComfyUI's LoadImage: IMAGE (1,H,W,3) and MASK = 1 - alpha (transparent = repaint)."""
    rgba = np.asarray(Image.open(path).convert("RGBA"), dtype=np.float32) / 255
    return torch.from_numpy(rgba[..., :3])[None], torch.from_numpy(1 - rgba[..., 3])[None]


def run_api(graph, inputs_dir):
    """Execute an API-format graph in order, ComfyUI-style; returns what SaveImage received."""
    from klein_nodes.nodes import NODE_CLASS_MAPPINGS

    results, saved = {}, []
    pending = dict(graph)
    while pending:
        ready = [i for i, node in pending.items()
                 if all(v[0] in results for v in node["inputs"].values() if isinstance(v, list))]
        assert ready, "the graph has a cycle or a dangling link"
        for node_id in ready:
            node = pending.pop(node_id)
            args = {k: results[v[0]][v[1]] if isinstance(v, list) else v for k, v in node["inputs"].items()}
            if node["class_type"] == "LoadImage":
                results[node_id] = load_image(inputs_dir / args["image"])
            elif node["class_type"] == "SaveImage":
                saved.append(args["images"])
                results[node_id] = ()
            else:
                cls = NODE_CLASS_MAPPINGS[node["class_type"]]
                output = getattr(cls(), cls.FUNCTION)(**args)
                if isinstance(output, dict):  # output nodes: {"ui": ..., "result": ...}
                    saved.extend(args["images"] for _ in output["ui"].get("images", [])[:1])
                    output = output["result"]
                results[node_id] = output
    return saved


@pytest.mark.parametrize("name", NAMES)
def test_api_twin_runs(models, tmp_path, name):
    write_workflow_inputs(tmp_path)
    graph = random_weight_thresholds(json.loads((WORKFLOWS / "api" / f"{name}.json").read_text()))
    (images,) = run_api(graph, tmp_path)
    if name == "klein_watermark_and_save":
        from klein_nodes.provenance import c2pa_sign

        (written,) = (models.parent / "output" / "klein").glob("signed_*_.png")
        anchor = (models.parent / "user" / "klein_nodes" / "c2pa" / "root.pem").read_bytes()
        assert c2pa_sign.verify(written, anchor)["state"] == "Trusted"
    if name == "klein_outpaint":  # 96x96 grown to 176x96: beyond the 32-pixel band the source comes back exactly
        source, _ = load_image(tmp_path / "outpaint_source.png")
        assert images.shape == (1, 96, 176, 3) and torch.equal(images[:, :, 40 + 32: 136 - 32], source[:, :, 32:64])
    assert images.ndim == 4 and images.shape[-1] == 3 and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1 and images.std() > 0
