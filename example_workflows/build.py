"""Builds the example workflows: each graph below is written as a UI workflow (listed by ComfyUI as a template)
and as its API-format twin in api/ (what the tests execute). Run `python example_workflows/build.py` after
changing a graph or a node's inputs; a test checks the files are up to date.
"""

import json
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
if "folder_paths" not in sys.modules:  # only the input names matter here, not ComfyUI's file lists
    sys.modules["folder_paths"] = types.SimpleNamespace(get_folder_paths=lambda key: [])

from klein_nodes.nodes import NODE_CLASS_MAPPINGS  # noqa: E402

# Core nodes the examples use, with their inputs in ComfyUI's order: (name, socket type or None for a widget).
CORE_NODES = {
    "LoadImage": {"inputs": [("image", None), ("upload", None)], "outputs": ["IMAGE", "MASK"]},
    "SaveImage": {"inputs": [("images", "IMAGE"), ("filename_prefix", None)], "outputs": []},
}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def node_inputs(class_type):
    """[(name, socket type or None for widgets, adds a control_after_generate value, default)] in ComfyUI's order."""
    if class_type in CORE_NODES:
        return [(name, kind, False, None) for name, kind in CORE_NODES[class_type]["inputs"]]
    spec = NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    inputs = []
    for section in ("required", "optional"):
        for name, (kind, *options) in spec.get(section, {}).items():
            widget = isinstance(kind, list) or kind in WIDGET_TYPES
            control = bool(options and options[0].get("control_after_generate"))
            inputs.append((name, None if widget else kind, control, options[0].get("default") if options else None))
    return inputs


def node_outputs(class_type):
    if class_type in CORE_NODES:
        return CORE_NODES[class_type]["outputs"]
    return list(NODE_CLASS_MAPPINGS[class_type].RETURN_TYPES)


class Graph:
    def __init__(self, title):
        self.title = title
        self.nodes = []  # (id, class_type, inputs)

    def add(self, class_type, **inputs):
        """Add a node; inputs are widget values or (node id, output slot) links. Returns the node id."""
        node_id = len(self.nodes) + 1
        self.nodes.append((node_id, class_type, inputs))
        return node_id

    def api(self):
        return {str(node_id): {"class_type": class_type, "_meta": {"title": class_type},
                               "inputs": {k: [str(v[0]), v[1]] if isinstance(v, tuple) else v for k, v in inputs.items()}}
                for node_id, class_type, inputs in self.nodes}

    def ui(self):
        links, nodes = [], []
        for node_id, class_type, inputs in self.nodes:
            for name, value in inputs.items():
                if isinstance(value, tuple):
                    source_id, slot = value
                    source_type = next(t for i, t, _ in self.nodes if i == source_id)
                    links.append([len(links) + 1, source_id, slot, node_id, name, node_outputs(source_type)[slot]])
        for order, (node_id, class_type, inputs) in enumerate(self.nodes):
            sockets, widgets = [], []
            for name, kind, control, default in node_inputs(class_type):
                if kind is not None:
                    link = next((link[0] for link in links if link[3] == node_id and link[4] == name), None)
                    if link is not None or name in inputs:
                        sockets.append({"name": name, "type": kind, "link": link})
                    continue
                widgets.append(inputs.get(name, default))  # the UI holds every widget's value
                if control:
                    widgets.append("fixed")
            outputs = [{"name": kind, "type": kind, "slot_index": slot,
                        "links": [link[0] for link in links if link[1] == node_id and link[2] == slot]}
                       for slot, kind in enumerate(node_outputs(class_type))]
            nodes.append({"id": node_id, "type": class_type, "pos": [40 + 340 * (order % 4), 60 + 380 * (order // 4)],
                          "size": [300, 120], "flags": {}, "order": order, "mode": 0, "inputs": sockets,
                          "outputs": outputs, "properties": {"Node name for S&R": class_type},
                          "widgets_values": widgets})
        ui_links = []
        for link_id, source, slot, target, name, kind in links:
            target_slot = next(i for i, s in enumerate(next(n for n in nodes if n["id"] == target)["inputs"])
                               if s["name"] == name)
            ui_links.append([link_id, source, slot, target, target_slot, kind])
        return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": ui_links,
                "groups": [], "config": {}, "extra": {"title": self.title}, "version": 0.4}


def loaders(graph, model="flux-2-klein-4b.safetensors", text_encoder="qwen_3_4b.safetensors"):
    model = graph.add("KleinTransformerLoader", model_name=model, weight_dtype="default")
    text_encoder = graph.add("KleinTextEncoderLoader", text_encoder_name=text_encoder, weight_dtype="default")
    vae = graph.add("KleinVAELoader", vae_name="flux2-vae.safetensors", weight_dtype="default")
    return model, text_encoder, vae


def sampler(graph, model, positive, latent, steps=4, guidance=1.0, negative=None, denoise=1.0):
    extra = {} if negative is None else {"negative": (negative, 0)}
    return graph.add("KleinSampler", model=(model, 0), positive=(positive, 0), latent=(latent, 0), seed=42,
                     steps=steps, guidance=guidance, denoise=denoise, **extra)


def finish(graph, vae, latent, prefix):
    image = graph.add("KleinVAEDecode", vae=(vae, 0), latent=(latent, 0), tiled="auto")
    graph.add("SaveImage", images=(image, 0), filename_prefix=prefix)


def text_to_image():
    graph = Graph("FLUX.2 klein 4B: text to image (distilled, 4 steps)")
    model, text_encoder, vae = loaders(graph)
    prompt = graph.add("KleinTextEncode", text_encoder=(text_encoder, 0),
                       text="A red fox asleep on a stack of old books, morning light, shallow depth of field")
    latent = graph.add("KleinEmptyLatent", width=1024, height=1024, aspect="custom", megapixels=1.0, batch_size=1)
    finish(graph, vae, sampler(graph, model, prompt, latent), "klein")
    return graph


def base_with_cfg():
    graph = Graph("FLUX.2 klein base 4B: text to image with CFG (50 steps, guidance 4)")
    model, text_encoder, vae = loaders(graph, "flux-2-klein-base-4b.safetensors")
    prompt = graph.add("KleinTextEncode", text_encoder=(text_encoder, 0),
                       text="A lighthouse on a cliff at dusk, oil painting, thick brush strokes")
    negative = graph.add("KleinTextEncode", text_encoder=(text_encoder, 0), text="")
    latent = graph.add("KleinEmptyLatent", width=1024, height=1024, aspect="16:9", megapixels=1.0, batch_size=1)
    finish(graph, vae, sampler(graph, model, prompt, latent, steps=50, guidance=4.0, negative=negative), "klein_base")
    return graph


def reference_edit(count):
    title = ("FLUX.2 klein 4B: edit one image" if count == 1 else
             f"FLUX.2 klein 4B: compose {count} reference images")
    graph = Graph(title)
    model, text_encoder, vae = loaders(graph)
    text = ("Turn the photo into a watercolor painting, keep the composition" if count == 1 else
            "The person from image 1 wearing the jacket from image 2, holding the cup from image 3, "
            "in the room from image 4")
    prompt = graph.add("KleinTextEncode", text_encoder=(text_encoder, 0), text=text)
    images = [graph.add("LoadImage", image=f"reference_{k + 1}.png", upload="image") for k in range(count)]
    slots = {f"image_{k + 1}": (image, 0) for k, image in enumerate(images)}
    references = graph.add("KleinReferences", conditioning=(prompt, 0), vae=(vae, 0), max_megapixels=1.0, tiled="auto",
                           **slots)
    latent = graph.add("KleinEmptyLatent", width=1024, height=1024, aspect="custom", megapixels=1.0, batch_size=1,
                       size_from=(images[0], 0))
    finish(graph, vae, sampler(graph, model, references, latent), "klein_edit")
    return graph


def inpainting():
    graph = Graph("FLUX.2 klein 4B: inpainting (paint the mask in the image editor)")
    model, text_encoder, vae = loaders(graph)
    prompt = graph.add("KleinTextEncode", text_encoder=(text_encoder, 0), text="A small potted cactus on the table")
    image = graph.add("LoadImage", image="inpaint_source.png", upload="image")
    latent = graph.add("KleinVAEEncode", vae=(vae, 0), image=(image, 0), mask=(image, 1), tiled="auto")
    finish(graph, vae, sampler(graph, model, prompt, latent), "klein_inpaint")
    return graph


def low_vram_gguf():
    graph = Graph("FLUX.2 klein 4B on 8 GB cards: Q4_K GGUF transformer and text encoder, tiled VAE when needed")
    model, text_encoder, vae = loaders(graph, "flux-2-klein-4b-Q4_K.gguf", "qwen_3_4b-Q4_K.gguf")
    prompt = graph.add("KleinTextEncode", text_encoder=(text_encoder, 0),
                       text="A cozy reading nook by a rainy window, warm lamp light, film grain")
    latent = graph.add("KleinEmptyLatent", width=1024, height=1024, aspect="4:3", megapixels=1.0, batch_size=1)
    finish(graph, vae, sampler(graph, model, prompt, latent), "klein_gguf")
    return graph


def loras():
    graph = Graph("FLUX.2 klein 4B: two LoRAs stacked (a style LoRA with text-encoder layers, then a LoKr)")
    model, text_encoder, vae = loaders(graph)
    style = graph.add("KleinLora", model=(model, 0), text_encoder=(text_encoder, 0),
                      lora_name="klein_style_lora.safetensors", strength_model=0.8, strength_text_encoder=0.8)
    detail = graph.add("KleinLora", model=(style, 0), text_encoder=(style, 1), lora_name="klein_detail_lokr.safetensors",
                       strength_model=0.5, strength_text_encoder=0.5)
    prompt = graph.add("KleinTextEncode", text_encoder=(detail, 1),
                       text="A harbour town at dawn, fishing boats, gulls, in the LoRA's style")
    latent = graph.add("KleinEmptyLatent", width=1024, height=1024, aspect="custom", megapixels=1.0, batch_size=1)
    finish(graph, vae, sampler(graph, detail, prompt, latent), "klein_lora")
    return graph


def watermark_and_save():
    graph = Graph("FLUX.2 klein 4B: watermark and save with signed Content Credentials (C2PA)")
    model, text_encoder, vae = loaders(graph)
    prompt = graph.add("KleinTextEncode", text_encoder=(text_encoder, 0),
                       text="A botanical illustration of a fern, ink and watercolor on cream paper")
    latent = graph.add("KleinEmptyLatent", width=1024, height=1024, aspect="custom", megapixels=1.0, batch_size=1)
    image = graph.add("KleinVAEDecode", vae=(vae, 0), latent=(sampler(graph, model, prompt, latent), 0), tiled="auto")
    graph.add("KleinSave", images=(image, 0), filename_prefix="klein/signed", format="png", quality=80, watermark=True,
              c2pa=True, allow_unsigned=False)
    return graph


def one_node():
    graph = Graph("FLUX.2 klein 4B: everything in one node")
    model, text_encoder, vae = loaders(graph)
    image = graph.add("KleinGenerate", model=(model, 0), text_encoder=(text_encoder, 0), vae=(vae, 0),
                      prompt="A paper boat on a puddle after the rain, reflections, 35mm photo", negative_prompt="",
                      width=1024, height=1024, aspect="3:2", megapixels=1.0, seed=7, steps=4, guidance=1.0,
                      batch_size=1)
    graph.add("SaveImage", images=(image, 0), filename_prefix="klein")
    return graph


WORKFLOWS = {
    "klein_text_to_image": text_to_image,
    "klein_base_cfg": base_with_cfg,
    "klein_edit_single_reference": lambda: reference_edit(1),
    "klein_compose_four_references": lambda: reference_edit(4),
    "klein_inpainting": inpainting,
    "klein_low_vram_gguf": low_vram_gguf,
    "klein_loras": loras,
    "klein_watermark_and_save": watermark_and_save,
    "klein_generate_one_node": one_node,
}


def render():
    """{relative path: JSON text} for every workflow and its API twin."""
    files = {}
    for name, build in WORKFLOWS.items():
        graph = build()
        files[f"{name}.json"] = json.dumps(graph.ui(), indent=2) + "\n"
        files[f"api/{name}.json"] = json.dumps(graph.api(), indent=2) + "\n"
    return files


if __name__ == "__main__":
    for relative, text in render().items():
        (HERE / relative).parent.mkdir(exist_ok=True)
        (HERE / relative).write_text(text)
        print(HERE / relative)
