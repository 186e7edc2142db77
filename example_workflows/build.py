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

    def layout(self):
        """{node id: [x, y]}: a column per dependency depth (loaders left, savers right), nodes stacked in each."""
        depth = {}
        for node_id, _, inputs in self.nodes:  # nodes are added after their sources
            depth[node_id] = max((depth[v[0]] + 1 for v in inputs.values() if isinstance(v, tuple)), default=0)
        places, filled = {}, {}
        for node_id, class_type, inputs in self.nodes:
            column = depth[node_id]
            places[node_id] = [40 + 360 * column, filled.get(column, 60)]
            rows = len(node_inputs(class_type)) + len(node_outputs(class_type))
            filled[column] = places[node_id][1] + 60 + 24 * rows + 40
        return places

    def api(self):
        return {str(node_id): {"class_type": class_type, "_meta": {"title": class_type},
                               "inputs": {k: [str(v[0]), v[1]] if isinstance(v, tuple) else v
                                          for k, v in inputs.items()}}
                for node_id, class_type, inputs in self.nodes}

    def ui(self, note=None):
        """The UI workflow; `note`: the text of a Note node placed above the graph."""
        links, nodes = [], []
        for node_id, class_type, inputs in self.nodes:
            for name, value in inputs.items():
                if isinstance(value, tuple):
                    source_id, slot = value
                    source_type = next(t for i, t, _ in self.nodes if i == source_id)
                    links.append([len(links) + 1, source_id, slot, node_id, name, node_outputs(source_type)[slot]])
        places = self.layout()
        for order, (node_id, class_type, inputs) in enumerate(self.nodes):
            sockets, widgets = [], []
            for name, kind, control, default in node_inputs(class_type):
                if kind is None and isinstance(inputs.get(name), tuple):  # a widget fed by a link
                    link = next(link[0] for link in links if link[3] == node_id and link[4] == name)
                    sockets.append({"name": name, "type": "STRING", "widget": {"name": name}, "link": link})
                    widgets.append(default if default is not None else "")
                    continue
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
            nodes.append({"id": node_id, "type": class_type, "pos": places[node_id],
                          "size": [300, node_height(sockets, widgets, outputs)], "flags": {}, "order": order,
                          "mode": 0, "inputs": sockets,
                          "outputs": outputs, "properties": {"Node name for S&R": class_type, **downloads(inputs)},
                          "widgets_values": widgets})
        ui_links = []
        for link_id, source, slot, target, name, kind in links:
            target_slot = next(i for i, s in enumerate(next(n for n in nodes if n["id"] == target)["inputs"])
                               if s["name"] == name)
            ui_links.append([link_id, source, slot, target, target_slot, kind])
        if note is not None:  # a frontend-only node: in the template, not in the API twin
            right = max(n["pos"][0] for n in nodes) + 360
            nodes.append({"id": len(nodes) + 1, "type": "Note", "pos": [right, 60], "size": [420, 260],
                          "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                          "properties": {"text": ""}, "widgets_values": [note], "color": "#432", "bgcolor": "#653"})
        return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": ui_links,
                "groups": [], "config": {}, "extra": {"title": self.title}, "version": 0.4}


# Files with an official download: (folder under ComfyUI/models/, URL), as ComfyUI's own FLUX.2 klein templates give
# them (comfyui-workflow-templates, image_flux2_klein_text_to_image.json). A template's loader node carries them in
# properties.models, and the frontend offers the download when the file is missing. Our GGUF quantizations, the
# example LoRAs and the safety classifier's folder have no such file to point at: they get no entry.
KLEIN_FILES = "https://huggingface.co/Comfy-Org/flux2-klein/resolve/main/split_files"
DOWNLOADS = {
    "flux-2-klein-4b.safetensors": ("diffusion_models", f"{KLEIN_FILES}/diffusion_models/flux-2-klein-4b.safetensors"),
    "flux-2-klein-base-4b.safetensors": ("diffusion_models",
                                         f"{KLEIN_FILES}/diffusion_models/flux-2-klein-base-4b.safetensors"),
    "qwen_3_4b.safetensors": ("text_encoders", f"{KLEIN_FILES}/text_encoders/qwen_3_4b.safetensors"),
    "flux2-vae.safetensors": (
        "vae", "https://huggingface.co/Comfy-Org/flux2-dev/resolve/main/split_files/vae/flux2-vae.safetensors"),
}


def downloads(inputs):
    """{"models": [{name, url, directory}]} for a node's file widgets that name an official download, else {}."""
    models = [{"name": value, "url": DOWNLOADS[value][1], "directory": DOWNLOADS[value][0]}
              for key, value in inputs.items() if key in FILE_WIDGETS and isinstance(value, str) and value in DOWNLOADS]
    return {"models": models} if models else {}


def node_height(sockets, widgets, outputs):
    return 60 + 24 * (max(len(sockets), len(outputs)) + len(widgets))


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
    if count > 1:
        finish(graph, vae, sampler(graph, model, references, latent), "klein_compose")
        return graph
    edited = graph.add("KleinVAEDecode", vae=(vae, 0), latent=(sampler(graph, model, references, latent), 0),
                       tiled="auto")
    composite = graph.add("KleinEditComposite", original=(images[0], 0), edited=(edited, 0), align=True,
                          match_colors=True, feather=8)
    graph.add("SaveImage", images=(composite, 0), filename_prefix="klein_edit")
    return graph


def inpainting():
    graph = Graph("FLUX.2 klein 4B: inpainting (paint the mask in the image editor)")
    model, text_encoder, vae = loaders(graph)
    prompt = graph.add("KleinTextEncode", text_encoder=(text_encoder, 0), text="A small potted cactus on the table")
    image = graph.add("LoadImage", image="inpaint_source.png", upload="image")
    latent = graph.add("KleinVAEEncode", vae=(vae, 0), image=(image, 0), mask=(image, 1), tiled="auto")
    edited = graph.add("KleinVAEDecode", vae=(vae, 0), latent=(sampler(graph, model, prompt, latent), 0), tiled="auto")
    composite = graph.add("KleinEditComposite", original=(image, 0), edited=(edited, 0), mask=(image, 1), align=True,
                          match_colors=True, feather=8)
    graph.add("SaveImage", images=(composite, 0), filename_prefix="klein_inpaint")
    return graph


def outpaint():
    graph = Graph("FLUX.2 klein 4B: outpaint (extend an image to 16:9; its own pixels come back exactly)")
    model, text_encoder, vae = loaders(graph)
    prompt = graph.add("KleinTextEncode", text_encoder=(text_encoder, 0),
                       text="Continue the scene beyond the frame, same light and style")
    image = graph.add("LoadImage", image="outpaint_source.png", upload="image")
    canvas = graph.add("KleinOutpaintCanvas", image=(image, 0), left=0, top=0, right=0, bottom=0, aspect="16:9",
                       fill="edge", feather=32)
    references = graph.add("KleinReferences", conditioning=(prompt, 0), vae=(vae, 0), image_1=(image, 0),
                           max_megapixels=1.0, tiled="auto")
    latent = graph.add("KleinVAEEncode", vae=(vae, 0), image=(canvas, 0), mask=(canvas, 1), tiled="auto")
    edited = graph.add("KleinVAEDecode", vae=(vae, 0), latent=(sampler(graph, model, references, latent), 0),
                       tiled="auto")
    composite = graph.add("KleinEditComposite", original=(canvas, 0), edited=(edited, 0), mask=(canvas, 1), align=True,
                          match_colors=True, feather=8)
    graph.add("SaveImage", images=(composite, 0), filename_prefix="klein_outpaint")
    return graph


def upscale():
    graph = Graph("FLUX.2 klein 4B: upscale beyond 4 MP (Lanczos, then klein refines 1 MP tiles)")
    model, text_encoder, vae = loaders(graph)
    prompt = graph.add("KleinTextEncode", text_encoder=(text_encoder, 0),
                       text="A detailed photograph, sharp focus, natural textures")
    image = graph.add("LoadImage", image="upscale_source.png", upload="image")
    refined = graph.add("KleinTiledRefine", model=(model, 0), positive=(prompt, 0), vae=(vae, 0), image=(image, 0),
                        upscale_by=2.0, tile_size=1024, overlap=128, denoise=0.35, seed=42, steps=4,
                        tile_as_reference=False)
    graph.add("SaveImage", images=(refined, 0), filename_prefix="klein_upscale")
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
    detail = graph.add("KleinLora", model=(style, 0), text_encoder=(style, 1),
                       lora_name="klein_detail_lokr.safetensors", strength_model=0.5, strength_text_encoder=0.5)
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


def safety_checks():
    graph = Graph("FLUX.2 klein 4B: prompt and image safety checks before saving")
    model, text_encoder, vae = loaders(graph)
    check = graph.add("KleinPromptCheck", text_encoder=(text_encoder, 0), threshold=0.5, block=True, policy="",
                      prompt="A lighthouse keeper feeding a cat, warm evening light, watercolor")
    prompt = graph.add("KleinTextEncode", text_encoder=(text_encoder, 0), text=(check, 0))
    latent = graph.add("KleinEmptyLatent", width=1024, height=1024, aspect="custom", megapixels=1.0, batch_size=1)
    image = graph.add("KleinVAEDecode", vae=(vae, 0), latent=(sampler(graph, model, prompt, latent), 0), tiled="auto")
    checked = graph.add("KleinImageCheck", images=(image, 0), classifier="nsfw_image_detection", threshold=0.85,
                        replace=True)
    graph.add("KleinSave", images=(checked, 0), filename_prefix="klein/checked", format="png", quality=80,
              watermark=True, c2pa=True, allow_unsigned=False)
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


# API twin name: (template title: the UI file's name, which ComfyUI's template browser shows as title and description;
# builder). The thumbnail beside each is `<title>.jpg`, as the browser asks for it.
TEMPLATES = {
    "klein_text_to_image": ("Klein text to image", text_to_image),
    "klein_base_cfg": ("Klein base model with CFG", base_with_cfg),
    "klein_edit_single_reference": ("Klein edit an image", lambda: reference_edit(1)),
    "klein_compose_four_references": ("Klein compose four references", lambda: reference_edit(4)),
    "klein_inpainting": ("Klein inpainting", inpainting),
    "klein_outpaint": ("Klein outpaint", outpaint),
    "klein_upscale": ("Klein upscale beyond 4 MP", upscale),
    "klein_low_vram_gguf": ("Klein low VRAM GGUF for 8 GB cards", low_vram_gguf),
    "klein_loras": ("Klein two LoRAs stacked", loras),
    "klein_watermark_and_save": ("Klein watermark and signed save", watermark_and_save),
    "klein_generate_one_node": ("Klein everything in one node", one_node),
    "klein_safety_checks": ("Klein safety checks", safety_checks),
}
WORKFLOWS = {name: build for name, (_, build) in TEMPLATES.items()}
FILE_WIDGETS = {"model_name": "diffusion_models", "text_encoder_name": "text_encoders", "vae_name": "vae",
                "lora_name": "loras", "image": "input", "classifier": "safety"}


def files_needed(graph):
    return list(dict.fromkeys(f"{FILE_WIDGETS[k]}/{v}" + (FOLDER_NOTE if k == "classifier" else "")
                              for _, _, inputs in graph.nodes for k, v in inputs.items()
                              if k in FILE_WIDGETS and isinstance(v, str)))


FOLDER_NOTE = ("/ (a folder: config.json, model.safetensors and preprocessor_config.json of "
               "Falconsai/nsfw_image_detection)")


def note_text(graph):
    """The Note every template opens with: what it does and which files go where."""
    return (f"{graph.title}\n\nFiles (under ComfyUI/models/, images under ComfyUI/input/):\n"
            + "\n".join(f"- {path}" for path in files_needed(graph))
            + "\n\nNotes from the nodes (sizes rounded, references cropped, watermark bits) appear under each node.")


def render():
    """{relative path: JSON text} for every template (UI workflow) and its API twin."""
    files = {}
    for name, (title, build) in TEMPLATES.items():
        graph = build()
        files[f"{title}.json"] = json.dumps(graph.ui(note_text(graph)), indent=2) + "\n"
        files[f"api/{name}.json"] = json.dumps(graph.api(), indent=2) + "\n"
    return files


def thumbnail(graph, size=(640, 400)):
    """A diagram of the graph (no weights to render a real output here): its nodes where the workflow places them,
    coloured by kind, and its links."""
    from PIL import Image, ImageDraw, ImageFont

    workflow = graph.ui()
    nodes = {n["id"]: n for n in workflow["nodes"]}
    image = Image.new("RGB", size, (24, 26, 30))
    draw = ImageDraw.Draw(image)
    draw.text((16, 12), graph.title.split(": ", 1)[-1], fill=(235, 235, 235), font=ImageFont.load_default(17))
    right = max(n["pos"][0] + n["size"][0] for n in nodes.values()) + 40
    bottom = max(n["pos"][1] + n["size"][1] for n in nodes.values()) + 40
    scale = min((size[0] - 24) / right, (size[1] - 56) / bottom)

    def box(node):
        x, y = node["pos"]
        return 12 + x * scale, 44 + y * scale, 12 + (x + node["size"][0]) * scale, 44 + (y + node["size"][1]) * scale

    for _, source, _, target, _, kind in workflow["links"]:
        (_, y0, x0, y1), (x2, y2, _, y3) = box(nodes[source]), box(nodes[target])
        draw.line([(x0, (y0 + y1) / 2), (x2, (y2 + y3) / 2)], fill=LINK_COLOURS.get(kind, (150, 150, 150)), width=2)
    font = ImageFont.load_default(max(9, min(13, round(40 * scale))))
    for node in nodes.values():
        left, top, right_edge, lower = box(node)
        kind = next((colour for prefix, colour in NODE_COLOURS if node["type"].startswith(prefix)), (70, 74, 84))
        draw.rounded_rectangle((left, top, right_edge, lower), radius=6, fill=kind, outline=(200, 200, 200))
        words, lines = display_name(node["type"]).split(), [""]
        for word in words:  # wrap the node's name into its box
            if draw.textlength(f"{lines[-1]} {word}".strip(), font=font) > right_edge - left - 10:
                lines.append("")
            lines[-1] = f"{lines[-1]} {word}".strip()
        step = font.size + 2
        for k, line in enumerate(lines[: max(1, int((lower - top - 6) // step))]):
            draw.text((left + 5, top + 4 + step * k), line, fill=(245, 245, 245), font=font)
    return image


NODE_COLOURS = [("KleinPromptCheck", (150, 120, 40)), ("KleinImageCheck", (150, 120, 40)),
                ("KleinTransformerLoader", (52, 88, 140)), ("KleinTextEncoderLoader", (52, 88, 140)),
                ("KleinVAELoader", (52, 88, 140)), ("KleinLora", (92, 70, 140)), ("KleinTextEncode", (140, 110, 40)),
                ("KleinSave", (40, 120, 80)), ("SaveImage", (40, 120, 80)), ("LoadImage", (120, 70, 60)),
                ("KleinSampler", (150, 60, 90)), ("KleinGenerate", (150, 60, 90)),
                ("KleinTiledRefine", (150, 60, 90)), ("KleinEditComposite", (40, 110, 120)),
                ("KleinOutpaintCanvas", (40, 110, 120))]
LINK_COLOURS = {"KLEIN_MODEL": (120, 160, 230), "KLEIN_TEXT_ENCODER": (230, 200, 90), "KLEIN_VAE": (230, 110, 110),
                "CONDITIONING": (240, 170, 60), "LATENT": (240, 130, 200), "IMAGE": (110, 200, 240),
                "MASK": (120, 220, 120)}


def display_name(class_type):
    from klein_nodes.nodes import NODE_DISPLAY_NAME_MAPPINGS

    return NODE_DISPLAY_NAME_MAPPINGS.get(class_type, {"LoadImage": "Load Image", "SaveImage": "Save Image"}.get(
        class_type, class_type))


if __name__ == "__main__":
    for relative, text in render().items():
        (HERE / relative).parent.mkdir(exist_ok=True)
        (HERE / relative).write_text(text)
        print(HERE / relative)
    for title, build in TEMPLATES.values():
        thumbnail(build()).save(HERE / f"{title}.jpg", quality=88)
        print(HERE / f"{title}.jpg")
