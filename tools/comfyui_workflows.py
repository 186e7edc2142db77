"""Every example workflow in a real ComfyUI server, on tiny random models: run with ComfyUI's own Python.

    /path/to/ComfyUI/venv/bin/python tools/comfyui_workflows.py /path/to/ComfyUI [--keep]

Builds a throwaway base folder (this pack under custom_nodes/, tiny models under the file names the workflows use,
their input images), starts `main.py --cpu` on it, queues each API twin of example_workflows/api/ through
POST /prompt, waits for /history and prints one row per workflow (status, seconds, images written, first error
line). On cores with native klein (0.9 and later) it also runs interop graphs, core's loaders and VAE nodes wired to
Klein nodes both ways, on a small transformer that core can load (128-wide heads) and the full-size VAE, and checks
that each gives the same image as the all-Klein graph. Exits non-zero when a graph fails or an image differs.
The ComfyUI folder itself is not modified.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # for helpers.py

ROOT = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url, payload=None):
    data = None if payload is None else json.dumps(payload).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=30) as response:
        body = response.read()
    return json.loads(body) if body else {}


def import_pack():
    """This checkout as `klein_nodes`, whatever its folder is called."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("klein_nodes", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["klein_nodes"] = pack
    spec.loader.exec_module(pack)
    return pack


def base_folder(base):
    """A ComfyUI base directory with this pack as a custom node."""
    for folder in ("custom_nodes", "user", "output", "input"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "ComfyUI-Flux2-Klein").symlink_to(ROOT)


def prepare(base):
    """custom_nodes/<pack>, models/, input/ and the tiny tokenizer under `base`."""
    import_pack()
    from klein_nodes.testing import write_workflow_inputs, write_workflow_models

    base_folder(base)
    write_workflow_models(base)
    write_workflow_inputs(base / "input")
    write_interop_models(base / "models")
    return base / "comfy" / "text_encoders" / "qwen25_tokenizer"


def write_interop_models(models):
    """A transformer core's detection accepts (heads of 128, mlp ratio 3) and the full-size FLUX.2 VAE."""
    from klein_nodes.models.autoencoder import AutoEncoderParams
    from klein_nodes.testing import CORE_TINY_TRANSFORMER, write_transformer, write_vae

    write_transformer(models / "diffusion_models" / "klein-core-tiny.safetensors", params=CORE_TINY_TRANSFORMER)
    write_vae(models / "vae" / "flux2-vae-full.safetensors", params=AutoEncoderParams())


TRANSPARENT_SAVE = {  # Load Image's mask (1 = transparent) into Klein Watermark & Save: an RGBA PNG
    "1": {"class_type": "LoadImage", "inputs": {"image": "inpaint_source.png"}},
    "2": {"class_type": "KleinSave", "inputs": {"images": ["1", 0], "mask": ["1", 1], "filename_prefix": "alpha",
                                               "format": "png", "quality": 80, "watermark": True, "c2pa": True,
                                               "allow_unsigned": False}},
}


EDIT_SAVE = {  # an encoded and decoded input saved by Klein Watermark & Save: its manifest lists the input
    "1": {"class_type": "LoadImage", "inputs": {"image": "reference_1.png"}},
    "2": {"class_type": "KleinVAELoader", "inputs": {"vae_name": "flux2-vae.safetensors", "weight_dtype": "default"}},
    "3": {"class_type": "KleinVAEEncode", "inputs": {"vae": ["2", 0], "image": ["1", 0], "tiled": "disable"}},
    "4": {"class_type": "KleinVAEDecode", "inputs": {"vae": ["2", 0], "latent": ["3", 0], "tiled": "disable"}},
    "5": {"class_type": "KleinSave", "inputs": {"images": ["4", 0], "filename_prefix": "edit", "format": "png",
                                               "quality": 80, "watermark": True, "c2pa": True,
                                               "allow_unsigned": False}},
}


def mistake_graphs():
    """{name: (graph, what the error must say)}: mistakes an artist makes with the edit nodes, each refused with one
    clear message (or, where the node can go on, run with a note and checked to succeed: expected "")."""
    def graph(*nodes):
        return {str(k): {"class_type": kind, "inputs": inputs} for k, (kind, inputs) in enumerate(nodes, start=1)}

    load = ("LoadImage", {"image": "outpaint_source.png"})
    canvas = {"image": ["1", 0], "left": 0, "top": 0, "right": 0, "bottom": 0, "aspect": "custom", "fill": "edge",
              "feather": 32}
    refine = {"model": ["3", 0], "positive": ["5", 0], "vae": ["6", 0], "image": ["2", 0], "upscale_by": 2.0,
              "tile_size": 1024, "overlap": 128, "denoise": 0.35, "seed": 1, "steps": 1, "tile_as_reference": False}
    models = [("KleinTransformerLoader", {"model_name": "flux-2-klein-4b.safetensors", "weight_dtype": "default"}),
              ("KleinTextEncoderLoader", {"text_encoder_name": "qwen_3_4b.safetensors", "weight_dtype": "default"}),
              ("KleinTextEncode", {"text_encoder": ["4", 0], "text": "a photo"}),
              ("KleinVAELoader", {"vae_name": "flux2-vae.safetensors", "weight_dtype": "default"})]
    same_size = ("ImageScaleBy", {"image": ["1", 0], "scale_by": 1.0, "upscale_method": "nearest-exact"})
    composite = {"original": ["1", 0], "edited": ["2", 0], "align": True, "match_colors": True, "feather": 8}
    return {
        "mistake_outpaint_zero_pads": (graph(load, ("KleinOutpaintCanvas", canvas),
                                             ("SaveImage", {"images": ["2", 0], "filename_prefix": "x"})),
                                       "nothing to extend"),
        "mistake_outpaint_68_megapixels": (graph(load, ("KleinOutpaintCanvas", {**canvas, "left": 4096, "top": 4096,
                                                                                "right": 4096, "bottom": 4096}),
                                                 ("SaveImage", {"images": ["2", 0], "filename_prefix": "x"})),
                                           "klein samples up to 4 MP"),
        "mistake_refine_144_megapixels": (graph(load, ("ImageScaleBy", {"image": ["1", 0],
                                                                        "upscale_method": "nearest-exact",
                                                                        "scale_by": 8.0}), *models,
                                                ("ImageScaleBy", {"image": ["2", 0], "upscale_method": "nearest-exact",
                                                                  "scale_by": 8.0}),
                                                ("KleinTiledRefine", {**refine, "image": ["7", 0]}),
                                                ("SaveImage", {"images": ["8", 0], "filename_prefix": "x"})),
                                          "makes up to 64 MP"),
        "mistake_save_outside_the_output_folder": (graph(load, ("KleinSave", {
            "images": ["1", 0], "filename_prefix": "../outside/klein", "format": "png", "quality": 80,
            "watermark": True, "c2pa": True, "allow_unsigned": False})), "points outside the output folder"),
        "mistake_refine_overlap_over_half_the_tile": (graph(load, same_size, *models, ("KleinTiledRefine", {
            **refine, "tile_size": 256, "overlap": 200}), ("SaveImage", {"images": ["7", 0], "filename_prefix": "x"})),
            "overlap must be 0 to half the tile"),
        "note_refine_tile_larger_than_image": (graph(load, same_size, *models, ("KleinTiledRefine", refine),
                                                     ("SaveImage", {"images": ["7", 0], "filename_prefix": "x"})), ""),
        "note_composite_other_size_empty_mask": (graph(load, ("LoadImage", {"image": "reference_1.png"}),
                                                       ("SolidMask", {"value": 0.0, "width": 96, "height": 96}),
                                                       ("KleinEditComposite", {**composite, "mask": ["3", 0]}),
                                                       ("SaveImage", {"images": ["4", 0], "filename_prefix": "x"})),
                                                 ""),
    }


def interop_graphs():
    """{name: (graph, the name of the all-Klein graph it must match)}: core's MODEL and VAE into Klein nodes, and
    Klein latents into core's VAE nodes (EmptyFlux2LatentImage, VAEEncode, VAEDecode)."""
    def graph(model, decode, empty, image_to_latent=None):
        nodes = {
            "1": ("UNETLoader", {"unet_name": "klein-core-tiny.safetensors", "weight_dtype": "default"})
            if model == "core" else ("KleinTransformerLoader", {"model_name": "klein-core-tiny.safetensors",
                                                                 "weight_dtype": "default"}),
            "2": ("KleinTextEncoderLoader", {"text_encoder_name": "qwen_3_4b.safetensors", "weight_dtype": "default"}),
            "3": ("VAELoader", {"vae_name": "flux2-vae-full.safetensors"}),
            "4": ("KleinVAELoader", {"vae_name": "flux2-vae-full.safetensors", "weight_dtype": "default"}),
            "5": ("KleinTextEncode", {"text_encoder": ["2", 0], "text": "a red fox in the snow"}),
            "6": ("EmptyFlux2LatentImage", {"width": 64, "height": 48, "batch_size": 1}) if empty == "core"
            else ("KleinEmptyLatent", {"width": 64, "height": 48, "aspect": "custom", "megapixels": 1.0,
                                       "batch_size": 1}),
            "7": ("KleinSampler", {"model": ["1", 0], "positive": ["5", 0], "latent": ["6", 0], "seed": 7, "steps": 2,
                                   "guidance": 1.0, "denoise": 1.0}),
            "8": ("VAEDecode", {"vae": ["3", 0], "samples": ["7", 0]}) if decode == "core"
            else ("KleinVAEDecode", {"vae": ["3" if decode == "klein_on_core" else "4", 0], "latent": ["7", 0],
                                     "tiled": "disable"}),
            "9": ("SaveImage", {"images": ["8", 0], "filename_prefix": "interop"}),
        }
        if image_to_latent:  # img2img from an encoded input: core's VAEEncode or ours
            nodes["10"] = ("LoadImage", {"image": "reference_1.png"})
            nodes["11"] = ("VAEEncode", {"vae": ["3", 0], "pixels": ["10", 0]}) if image_to_latent == "core" \
                else ("KleinVAEEncode", {"vae": ["4", 0], "image": ["10", 0], "tiled": "disable"})
            nodes["7"][1].update(latent=["11", 0], denoise=0.6)
        return {key: {"class_type": kind, "inputs": inputs} for key, (kind, inputs) in nodes.items()}

    return {
        "interop_all_klein": (graph("klein", "klein", "klein"), None),
        "interop_core_model_and_latent": (graph("core", "klein", "core"), "interop_all_klein"),
        "interop_core_vae_in_klein_decode": (graph("klein", "klein_on_core", "klein"), "interop_all_klein"),
        "interop_core_decode_of_klein_latent": (graph("klein", "core", "klein"), "interop_all_klein"),
        "interop_img2img_all_klein": (graph("klein", "klein", "klein", "klein"), None),
        "interop_img2img_core_encode": (graph("core", "core", "klein", "core"), "interop_img2img_all_klein"),
    }


def start(core, base, tokenizer, log, python=sys.executable):
    """Start `main.py --cpu` on `base` with `python`; (process, url) once it answers. `tokenizer`: KLEIN_TOKENIZER,
    or None for ComfyUI's bundled one."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "KLEIN_TOKENIZER"}
    env.update({"KLEIN_TOKENIZER": str(tokenizer)} if tokenizer else {})
    server = subprocess.Popen([python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                               "--base-directory", str(base), "--disable-auto-launch"],
                              cwd=core, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}; see {log.name}")
        try:
            request(f"{url}/system_stats")
            return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit(f"the server did not answer in 5 minutes; see {log.name}")


def run(url, graph, timeout=900):
    """(status, seconds, [saved image file names], message) of one queued graph."""
    began = time.monotonic()
    try:
        prompt_id = request(f"{url}/prompt", {"prompt": graph, "client_id": "klein-check"})["prompt_id"]
    except urllib.error.HTTPError as e:  # refused when queued (validation): the nodes' error details
        answer = json.loads(e.read())
        details = [error.get("details", "") for node in answer.get("node_errors", {}).values()
                   for error in node.get("errors", [])]
        return "refused", 0.0, [], "; ".join(details) or json.dumps(answer)[:300]
    while time.monotonic() - began < timeout:
        history = request(f"{url}/history/{prompt_id}").get(prompt_id)
        if history and history.get("status", {}).get("completed") is not None:
            status = history["status"]
            seconds = time.monotonic() - began
            images = [image["filename"] for out in history.get("outputs", {}).values()
                      for image in out.get("images", []) if image.get("type") == "output"]
            errors = [m[1] for m in status.get("messages", []) if m[0] == "execution_error"]
            message = errors[0].get("exception_message", "").strip().splitlines()[0] if errors else ""
            return status.get("status_str", "?"), seconds, images, message
        time.sleep(0.25)
    return "timeout", time.monotonic() - began, [], ""


def has_native_klein(core):
    """Core runs klein itself (ComfyUI 0.9 and later)."""
    nodes = core / "comfy_extras" / "nodes_flux.py"
    return nodes.exists() and "EmptyFlux2LatentImage" in nodes.read_text()


def max_difference(folder, first, second):
    import numpy as np
    from PIL import Image

    a, b = (np.asarray(Image.open(folder / name).convert("RGB"), dtype=np.int16) for name in (first, second))
    return float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 1:
        sys.exit(__doc__)
    core = Path(args[0]).resolve()
    version = (core / "comfyui_version.py").read_text().split('"')[1]
    base = Path(tempfile.mkdtemp(prefix="klein-comfyui-"))
    failed = 0
    try:
        tokenizer = prepare(base)
        with open(base / "server.log", "w") as log:
            server, url = start(core, base, tokenizer, log)
            try:
                print(f"ComfyUI {version} ({core}), CPU; server log: {base / 'server.log'}")
                print(f"{'graph':38} {'status':8} {'seconds':>7} {'images':>6} {'vs twin':>8}  error")
                from helpers import random_weight_thresholds

                graphs = {path.stem: (random_weight_thresholds(json.loads(path.read_text())), None)
                          for path in sorted((ROOT / "example_workflows" / "api").glob("*.json"))}
                graphs["save_transparent_png"] = (TRANSPARENT_SAVE, None)
                graphs["save_edit_with_ingredients"] = (EDIT_SAVE, None)
                mistakes = mistake_graphs()
                graphs.update({name: (graph, None) for name, (graph, _) in mistakes.items()})
                if has_native_klein(core):
                    graphs.update(interop_graphs())
                saved = {}
                for name, (graph, twin) in graphs.items():
                    status, seconds, saved[name], message = run(url, graph)
                    expected = mistakes.get(name, (None, ""))[1]
                    if expected:  # a mistake: its error must say what is wrong
                        status = "refused" if status in ("error", "refused") and expected in message else f"{status}?"
                        failed += status != "refused"
                        print(f"{name:38} {status:8} {seconds:7.1f} {0:6d} {'':>8}  {message}", flush=True)
                        continue
                    difference = ""
                    if twin and saved[name] and saved.get(twin):
                        worst = max_difference(base / "output", saved[name][0], saved[twin][0])
                        difference = f"{worst:.0f}/255"
                        if worst > 1:
                            status, message = "differs", message or f"its image differs from {twin}'s"
                    failed += status != "success"
                    print(f"{name:38} {status:8} {seconds:7.1f} {len(saved[name]):6d} {difference:>8}  {message}",
                          flush=True)
            finally:
                server.terminate()
                server.wait(30)
    finally:
        if "--keep" not in sys.argv and not failed:
            shutil.rmtree(base, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
