"""`python -m klein_nodes <command>`: generate, quantize, verify, doctor, inspect."""

import argparse
import contextlib
import math
import os
import platform
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from PIL import Image

from .version import __version__
from .errors import KleinError, KleinNote
from .models.safety import image_record
from .loaders.detect import WEIGHT_SUFFIXES
from .sampling.schedule import ASPECT_RATIOS

MODEL_FOLDERS = {  # ComfyUI key -> folder names under models/
    "diffusion_models": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "checkpoints": ("checkpoints",),
}
# generate's model arguments: (ComfyUI folder key, model kind, family)
MODEL_SLOTS = {"model": ("diffusion_models", "transformer", "flux2"),
               "text_encoder": ("text_encoders", "text_encoder", "qwen3"), "vae": ("vae", "vae", "flux2")}
KLEIN_FAMILIES = {(kind, family) for _, kind, family in MODEL_SLOTS.values()}


def bounded(kind, low, high=None):
    """An argparse type: a `kind` number in [low, high], refused with its range otherwise."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {low} to {high}" if high is not None
                                             else f"{text} is out of range: give {low} or more")
        return value
    return parse


non_negative = bounded(int, 0)


def check_generate_inputs(args):
    """Everything `generate` needs that can be checked without loading a model: files, device, modes, sizes.
    Returns the output (width, height), or None to take the size of --image."""
    from .sampling.schedule import fit_size, preset_size

    files = [("--ref", p) for p in args.ref] + [(flag, getattr(args, flag[2:])) for flag in ("--image", "--mask")
                                                 if getattr(args, flag[2:])]
    for flag, path in files + [("--lora", lora_spec(s)[0]) for s in args.lora]:
        if not Path(path).is_file():
            raise KleinError(f"{flag} {path}: no such file")
    for flag, path in files:
        check_image_file(path, flag)
    check_edit_modes(args)
    args.device = checked_device(args.device)
    if "image" in args.safety and args.image_classifier is None:
        raise KleinError("--safety image needs --image-classifier FOLDER (a Hugging Face ViT classifier such as "
                         "Falconsai/nsfw_image_detection: config.json + model.safetensors)")
    if args.aspect:
        width, height = preset_size(args.aspect, args.megapixels)
    elif args.width or args.height or not args.image:
        width, height = args.width or 1024, args.height or 1024
    else:
        return None
    fit_size(width, height)  # refuses sizes over 4 MP before anything loads
    check_upscale(args, width, height)
    return width, height


DEVICE_FORMS = "auto, cpu, cuda, cuda:N (N = the GPU's number) or mps (Apple GPUs)"


def checked_device(text):
    """--device as torch names it ('auto', 'cpu', 'cuda', 'cuda:N', 'mps'), refused unless it parses and this machine
    has it: before any model loads, not as torch's error after they are built."""
    name = text.strip().lower()
    match = re.fullmatch(r"(auto|cpu|mps|cuda)(?::(\d+))?", name)
    if match is None or (match[2] is not None and match[1] != "cuda"):
        raise KleinError(f"--device {text or repr(text)}: not a device; give {DEVICE_FORMS}")
    if match[1] == "cuda":
        if not torch.cuda.is_available():
            raise KleinError(f"--device {text}: this torch has no CUDA device (torch {torch.__version__}); "
                             "use --device cpu, or install a CUDA build of torch")
        count = torch.cuda.device_count()
        if match[2] is not None and int(match[2]) >= count:
            raise KleinError(f"--device {text}: this machine has {count} CUDA device(s): give cuda:0"
                             + (f" to cuda:{count - 1}" if count > 1 else ""))
        return "cuda" if match[2] is None else f"cuda:{int(match[2])}"
    if match[1] == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise KleinError(f"--device {text}: Apple's Metal (MPS) is not available here (torch {torch.__version__}); "
                         "use --device auto or cpu" + (", or cuda" if torch.cuda.is_available() else ""))
    return match[1]


def check_edit_modes(args):
    """The editing flags fit together: each names what it needs."""
    if args.mask and not args.image:
        raise KleinError("--mask needs --image: the image to repaint where the mask is white")
    if args.outpaint and not args.image:
        raise KleinError("--outpaint needs --image: the image to extend")
    if args.outpaint and args.mask:
        raise KleinError("--outpaint makes its own mask (the new area): leave out --mask")
    if args.composite and not (args.image or args.ref):
        raise KleinError("--composite needs --image or --ref: the original to put the edit back into")
    if args.denoise is not None and not args.image:
        raise KleinError("--denoise needs --image: the image to start from")
    if args.outpaint:
        outpaint_spec(args.outpaint)


def outpaint_spec(spec):
    """'64,0,64,0' (left, top, right, bottom pixels) -> {"left": ...}; '16:9' -> {"aspect": "16:9"}."""
    if spec in ASPECT_RATIOS:
        return {"aspect": spec}
    parts = spec.split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise KleinError(f"--outpaint {spec}: give LEFT,TOP,RIGHT,BOTTOM pixels (e.g. 128,0,128,0) or an aspect "
                         f"({', '.join(ASPECT_RATIOS)})")
    return dict(zip(("left", "top", "right", "bottom"), (int(p) for p in parts)))


def check_upscale(args, width, height):
    from .sampling.refine import MAX_OUTPUT_PIXELS

    if args.upscale and width * height * args.upscale**2 > MAX_OUTPUT_PIXELS:
        raise KleinError(f"--upscale {args.upscale} would make {round(width * args.upscale)}x"
                         f"{round(height * args.upscale)}; the refine makes up to {MAX_OUTPUT_PIXELS // 2**20} MP")


def check_image_file(path, what):
    """An image Pillow can open (header only), within Pillow's decompression-bomb limit."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.size  # noqa: B018 (the header is read by open)
    except (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning, ValueError) as e:
        raise KleinError(f"{what} {path}: not an image this tool can read ({type(e).__name__}: {e})") from None


def gpu_capabilities(index):
    """Which quantized/low-precision paths run natively on CUDA device `index`."""
    major, minor = torch.cuda.get_device_capability(index)
    sm = major * 10 + minor
    triton = importable("triton")
    return {
        "bf16 matmul": sm >= 80,
        "fp8 matmul (torch._scaled_mm)": sm >= 89 and hasattr(torch, "_scaled_mm"),
        "nvfp4 matmul": sm >= 100,
        "Triton dequant kernels": triton,
        "GGUF dequant (torch)": True,
    }


def importable(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def device_report():
    lines = [f"Klein Nodes {__version__}, Python {platform.python_version()}, torch {torch.__version__}"]
    import psutil

    memory = psutil.virtual_memory()
    from .models import prepacked

    lines.append(f"CPU: {os.cpu_count()} cores, {memory.total / 2**30:.1f} GiB RAM "
                 f"({memory.available / 2**30:.1f} GiB free); {prepacked.describe()}")
    if not torch.cuda.is_available():
        cuda = ("CPU-only torch build" if torch.version.cuda is None
                else f"built for CUDA {torch.version.cuda}, no GPU visible")
        lines.append(f"CUDA: not available ({cuda}); everything runs on the CPU with torch dequantization.")
        return lines
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        major, minor = torch.cuda.get_device_capability(i)
        lines.append(f"GPU {i}: {torch.cuda.get_device_name(i)}, SM {major}.{minor}, "
                     f"{total / 2**30:.1f} GiB VRAM ({free / 2**30:.1f} GiB free)")
        for path, native in gpu_capabilities(i).items():
            lines.append(f"  {'native   ' if native else 'emulated '} {path}")
    return lines


def package_report():
    names = ("safetensors", "gguf", "tokenizers", "PIL", "c2pa", "triton")
    return ["Packages: " + ", ".join(f"{n} {'yes' if importable(n) else 'no'}" for n in names)]


def comfyui_model_dirs(comfyui_root):
    """{ComfyUI key: [folders]} from a running ComfyUI (folder_paths) or a ComfyUI install folder."""
    if comfyui_root is None:
        try:
            import folder_paths
        except ImportError:
            return {}
        return {key: folder_paths.get_folder_paths(key) for key in MODEL_FOLDERS}
    models = Path(comfyui_root) / "models"
    return {key: [str(models / name) for name in names] for key, names in MODEL_FOLDERS.items()}


def model_report(comfyui_root):
    """(lines, {(kind, family): [(path, Inventory)]} of the klein files found)."""
    from .loaders.inventory import inventory, weight_bytes

    dirs = comfyui_model_dirs(comfyui_root)
    if not dirs:
        return ["Model files: not inside ComfyUI; pass --comfyui PATH (or set COMFYUI_PATH) to scan an install."], {}
    lines, found = [], {}
    for key, folders in dirs.items():
        files = sorted(p for folder in folders if os.path.isdir(folder)
                       for p in Path(folder).rglob("*") if p.suffix.lower() in WEIGHT_SUFFIXES)
        lines.append(f"{key}: {len(files)} weight file(s) in {', '.join(folders)}")
        for path in files:
            try:
                inv = inventory(path)
                klein = (inv.kind.kind, inv.kind.family) in KLEIN_FAMILIES
                if klein:
                    found.setdefault((inv.kind.kind, inv.kind.family), []).append((path, inv))
                lines.append(f"  [{'klein' if klein else '     '}] {path.name}: {inv.lines()[0]}, "
                             f"{weight_bytes(inv) / 2**30:.2f} GiB")
            except (KleinError, OSError, ValueError) as e:
                lines.append(f"  [error] {path.name}: {e}")
    return lines, found


def memory_report(found, size=1024):
    """What one `size`² image would take with the largest klein files found: the plan and its predicted peak on the
    CPU (paged: one block's weights at a time) and on each GPU (klein 4B's activations)."""
    import psutil

    from .loaders.inventory import weight_bytes
    from .models.autoencoder import AutoEncoder, AutoEncoderParams
    from .models.text_encoder import Qwen3Params
    from .models.transformer import Flux2Params
    from .sampling import memory

    chosen = {kind: max(found.get((kind, family), []), key=lambda item: weight_bytes(item[1]), default=None)
              for _, kind, family in MODEL_SLOTS.values()}
    if None in chosen.values():
        missing = ", ".join(kind.replace("_", " ") for kind, item in chosen.items() if item is None)
        return [f"Memory: no {missing} found, so no plan (pass --comfyui PATH to a ComfyUI with klein's files)."]
    (_, transformer), (_, text_encoder), (_, vae_file) = chosen["transformer"], chosen["text_encoder"], chosen["vae"]
    with torch.device("meta"):
        vae = AutoEncoder(AutoEncoderParams())  # fp32: the CPU decodes so; GPUs in the file's dtype, ~the same
    sizes = dict(text_encoder_bytes=weight_bytes(text_encoder), transformer_bytes=weight_bytes(transformer),
                 block_bytes=transformer.blocks, vae_bytes=weight_bytes(vae_file), text_block_bytes=text_encoder.blocks,
                 **memory.working_bytes(Flux2Params(), Qwen3Params(), vae, size // 16, size // 16))
    names = ", ".join(path.name for path, _ in chosen.values())
    lines = [f"Memory for one {size}x{size} image with {names}:"]
    targets = [("CPU", psutil.virtual_memory().available, False)]
    targets += [(f"GPU {i}", torch.cuda.mem_get_info(i)[0], True) for i in range(torch.cuda.device_count())]
    for where, free, offloads in targets:
        try:
            decision = memory.plan(free, **sizes, offloads=offloads, releases=not offloads)
            lines.append(f"  {where} ({free / 2**30:.1f} GiB free): {decision.describe()}")
        except MemoryError as e:
            lines.append(f"  {where} ({free / 2**30:.1f} GiB free): does not fit: {e}")
    return lines


def doctor(args):
    root = args.comfyui or os.environ.get("COMFYUI_PATH")
    if root and not (Path(root) / "models").is_dir():
        print(f"{root}: not a ComfyUI install (no models/ folder).", file=sys.stderr)
        return 2
    models, found = model_report(root)
    print("\n".join(device_report() + package_report() + models + memory_report(found)))
    return 0


def weight_files(path):
    """A file as itself; a folder as the weight files under it."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix.lower() in WEIGHT_SUFFIXES and p.is_file())
    return [path]


def inspect(args):
    from .loaders.inventory import inventory
    from .loaders.safetensors_io import sniff_format

    status = 0
    for given in args.files:
        files = weight_files(given)
        if not files:
            print(f"error: {given}: no weight files (.safetensors, .sft, .gguf) in this folder", file=sys.stderr)
            status = 2
        for path in files:
            try:
                if Path(path).is_file() and sniff_format(path) == "image":
                    raise KleinError(f"{path}: an image, not a weight file (use `verify` for images)")
                print(f"{path}: " + "\n".join(inventory(path).lines()))
            except KleinError as e:
                print(f"error: {e}", file=sys.stderr)
                status = 2
            except OSError as e:
                print(f"error: {path}: {e.strerror or e}", file=sys.stderr)
                status = 2
    return status


def model_candidates(root, key, kind, family):
    """[(path, Inventory)] of every file in a ComfyUI install's `key` folders that holds the wanted model."""
    from .loaders.inventory import inventory

    found = []
    for folder in comfyui_model_dirs(root).get(key, []):
        for path in sorted(Path(folder).rglob("*")) if os.path.isdir(folder) else []:
            if path.suffix.lower() in WEIGHT_SUFFIXES and path.is_file():
                try:
                    inv = inventory(path)
                except (KleinError, OSError, ValueError):
                    continue
                if (inv.kind.kind, inv.kind.family) == (kind, family):
                    found.append((path, inv))
    return found


def memory_budget(device):
    """(bytes one component may take, in words): free VRAM on CUDA, available RAM on the CPU."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return free, f"{free / 2**30:.1f} GiB free VRAM"
    import psutil

    available = psutil.virtual_memory().available
    return available, f"{available / 2**30:.1f} GiB available RAM"


def choose_model(name, candidates, budget):
    """The file to use among several of one model: the largest (most precise) that fits the memory budget with
    room for activations; if none fits, the smallest (the planner streams it). Returns (path, why or None)."""
    from .loaders.inventory import weight_bytes

    sized = sorted(((weight_bytes(inv), path, inv) for path, inv in candidates), key=lambda item: item[0])
    if len(sized) == 1:
        return sized[0][1], None
    limit, words = budget
    fitting = [item for item in sized if item[0] <= 0.8 * limit]
    size, path, inv = fitting[-1] if fitting else sized[0]
    others = ", ".join(f"{p.name} ({i.format}, {b / 2**30:.1f} GiB)" for b, p, i in sized if p != path)
    reason = (f"the largest of {len(sized)} that fits {words}" if fitting else
              f"none of {len(sized)} fits {words}: the smallest, streamed")
    return path, f"{name}: {path.name} ({inv.format}, {size / 2**30:.1f} GiB), {reason}; also found: {others}"


def resolve_models(args, budget, cleanup):
    """Paths for transformer, text encoder and VAE: given, found in ComfyUI's folders (every format the loaders take;
    with several, the one that fits `budget`), or tiny random ones (removed by `cleanup` after the run)."""
    if args.tiny_random:
        import tempfile

        from .testing import write_tiny_model_set

        folder = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="klein-tiny-"))
        print("tiny random models (a wiring check, the image is noise)", file=sys.stderr)
        return write_tiny_model_set(folder)
    root = args.comfyui or os.environ.get("COMFYUI_PATH")
    paths = []
    for name, (key, kind, family) in MODEL_SLOTS.items():
        path = getattr(args, name)
        if path is None and (root or importable("folder_paths")):
            candidates = model_candidates(root, key, kind, family)
            if candidates:
                path, why = choose_model(name.replace("_", " "), candidates, budget)
                if why:
                    print(f"note: {why}", file=sys.stderr)
        if path is None:
            raise KleinError(f"no {name.replace('_', ' ')} given: pass --{name.replace('_', '-')} PATH, "
                             f"or --comfyui PATH to search ComfyUI's models/{key} folder "
                             "(or --tiny-random for a wiring check)")
        paths.append(path)
    return paths


def output_paths(output, count):
    """out.png for one image, out_00001.png ... for several; existing files are never overwritten."""
    output = Path(output)
    if output.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise KleinError(f"{output}: the output must end in .png, .jpg or .webp")
    paths = ([output] if count == 1
             else [output.with_name(f"{output.stem}_{i:05d}{output.suffix}") for i in range(1, count + 1)])
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise KleinError(f"{', '.join(existing)} already exist(s); choose another output name")
    return paths


def lora_spec(spec):
    """'file.safetensors' or 'file.safetensors:0.8' -> (path, strength). A path may hold ':' itself (C:\\x, a:b/x):
    the text after the last ':' is the strength when it is a number; when it is not and the part before is a file,
    the strength is refused; otherwise the whole text is the path (and a missing one is reported as missing)."""
    path, _, strength = spec.rpartition(":")
    if not path or Path(spec).is_file() or (len(path) == 1 and path.isalpha() and strength.startswith(("/", "\\"))):
        return spec, 1.0  # no ":", a file whose name holds one, or a Windows drive letter (C:\x.safetensors)
    try:
        value = float(strength)
    except ValueError:
        if Path(path).is_file():
            raise KleinError(f"--lora {spec}: the strength {strength!r} is not a number; give FILE or FILE:STRENGTH "
                             f"(e.g. {path}:0.8)") from None
        return spec, 1.0
    if not math.isfinite(value):
        raise KleinError(f"--lora {spec}: the strength must be a finite number (e.g. {path}:0.8)")
    return path, value


def generate(args):
    with contextlib.ExitStack() as cleanup:  # tiny random models live until the images are saved
        return generate_images(args, cleanup)


def generate_images(args, cleanup):
    from .loaders.lora import apply_lora_pair
    from .loaders.safety import load_image_safety
    from .loaders.text_encoder import load_text_encoder
    from .loaders.tokenizer import find_tokenizer
    from .loaders.transformer import load_transformer
    from .loaders.vae import load_vae
    from .models.transformer import compile_blocks
    from .sampling.pipeline import KleinPipeline

    paths = output_paths(args.output, args.batch)
    size = check_generate_inputs(args)
    edit = EditInputs(args, size)  # the image files are read before the models
    image_checker = load_image_safety(args.image_classifier) if "image" in args.safety else None  # small, read first
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else None, "bf16": torch.bfloat16,
             "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    model_path, text_encoder_path, vae_path = resolve_models(args, memory_budget(device), cleanup)
    tokenizer = args.tokenizer  # checked before any model loads; a GGUF without one uses the tokenizer it embeds
    if tokenizer or not str(text_encoder_path).lower().endswith(".gguf"):
        tokenizer = find_tokenizer(text_encoder_path, tokenizer)
    # weights load (memory-mapped) on the CPU; the memory plan moves each component to the device for its turn
    text_encoder = load_text_encoder(text_encoder_path, tokenizer=tokenizer, dtype=dtype)
    checks = [check_prompt(text_encoder, args)] if "prompt" in args.safety else []  # before the transformer loads
    transformer = load_transformer(model_path, dtype=dtype)
    for spec in args.lora:
        path, strength = lora_spec(spec)
        transformer, text_encoder = apply_lora_pair(transformer, text_encoder, path, strength)
    if args.compile:
        compile_blocks(transformer)
    pipeline = KleinPipeline(transformer, text_encoder, load_vae(vae_path), device=device, memory=args.memory)
    images = edit.run(pipeline, cleanup)
    from .provenance.save import save_file

    flagged = [False] * len(images)
    if image_checker is not None:
        _, scores, flagged = image_checker.screen(images, args.image_threshold, replace=False)
        for line in image_checker.report(scores, flagged, False):
            print(f"image check: {line}", file=sys.stderr)
        checks.append(image_record(Path(args.image_classifier).name, args.image_threshold, scores, flagged, False))
    for image, path, unsafe in zip(images, paths, flagged):
        if unsafe:
            print(f"note: {path.name} not saved: flagged by the image check", file=sys.stderr)
            continue
        with interrupt_after():  # Ctrl-C while a file is written stops after it: whole or absent, never partial
            record = save_file(image, path, quality=args.quality, watermark=not args.no_watermark,
                               watermark_mode=args.watermark_mode, c2pa=not args.no_c2pa,
                               prompt={"prompt": args.prompt, "seed": pipeline.last_seed},
                               allow_unsigned=args.allow_unsigned, safety=checks or None, sources=edit.sources)
            for note in record.notes:
                print(f"note: {path.name}: {note}", file=sys.stderr)
            print(path, flush=True)
    print(f"seed {pipeline.last_seed}", file=sys.stderr)
    return BLOCKED if any(flagged) else 0


class EditInputs:
    """What `generate` starts from and does after sampling: references, an image to edit (img2img, inpainting,
    outpainting), the composite back into the original, and the tiled upscale; with the C2PA ingredients."""

    def __init__(self, args, size):
        from .sampling.outpaint import outpaint_canvas
        from .sampling.references import pil_to_tensor, to_mask
        from .sampling.schedule import fit_size

        self.args = args
        self.references = [load_reference(p) for p in args.ref]
        self.sources = [("reference", Path(p).name, r) for p, r in zip(args.ref, self.references)]
        self.image = self.mask = self.canvas = None
        if args.image:
            with Image.open(args.image) as opened:
                self.image = pil_to_tensor(opened.convert("RGB"))[None]
            self.sources.insert(0, ("edited", Path(args.image).name, self.image))
        if args.mask:
            with Image.open(args.mask) as opened:
                self.mask = to_mask(opened)
        if args.outpaint:
            self.canvas, self.mask = outpaint_canvas(self.image, **outpaint_spec(args.outpaint))
        start = self.canvas if self.canvas is not None else self.image
        if size is None and start is not None:
            size = fit_size(*fitted_area(start.shape[2], start.shape[1]))[:2]
            check_upscale(args, *size)
        self.size = size
        self.upscale_only = bool(args.upscale and args.image and not (args.mask or args.outpaint or args.denoise))

    def run(self, pipeline, cleanup):
        """The images to save: sampled, put back into the original when asked, enlarged when asked."""
        from .sampling.composite import composite_edit, describe
        from .sampling.refine import tiled_refine

        args = self.args
        if self.upscale_only:
            from .sampling.schedule import resolve_seed

            images = self.image
            pipeline.last_seed = resolve_seed(args.seed)
        else:
            progress = cleanup.enter_context(step_progress(args.steps))
            start = self.canvas if self.canvas is not None else self.image
            denoise = args.denoise or (1.0 if self.mask is not None else 0.6)
            if start is not None and args.denoise is None and self.mask is None:
                print(f"note: img2img at --denoise {denoise} (how much of --image is redrawn)", file=sys.stderr)
            references = ([self.image] if self.canvas is not None else []) + self.references
            images = pipeline(args.prompt, width=self.size[0], height=self.size[1], steps=args.steps,
                              guidance=args.guidance, seed=args.seed, negative_prompt=args.negative,
                              references=references or None, batch_size=args.batch, callback=progress,
                              max_sequence_length=args.max_tokens or None, image=start, mask=self.mask,
                              denoise=denoise if start is not None else 1.0)
            for note in pipeline.notes:
                warnings.warn(note, KleinNote, stacklevel=1)  # printed once: most were noted as they happened
            print(f"memory plan: {pipeline.plan.describe()}", file=sys.stderr)
        original = self.canvas if self.canvas is not None else self.image if self.image is not None else (
            self.references[0] if self.references else None)
        if self.canvas is not None or (args.composite and not self.upscale_only):
            from .sampling.references import to_hwc, to_rgb

            original = to_rgb(to_hwc(original)[0]).permute(1, 2, 0)
            composited = []
            for image in images:
                image, _, info = composite_edit(original, image, self.mask)
                print(f"composite: {describe(info)}", file=sys.stderr)
                composited.append(image)
            images = torch.stack(composited)
        if args.upscale:
            seed = pipeline.last_seed  # the run's seed; the tiles take seed, seed + 1, ...
            images = torch.cat([tiled_refine(pipeline, image, args.prompt, scale=args.upscale, tile=args.tile,
                                             denoise=args.refine_denoise, seed=seed, progress=tile_lines)
                                for image in images])
            pipeline.last_seed = seed
        return images


def fitted_area(width, height):
    """A size at most klein's 4 MP with the aspect of width x height (a larger image is scaled down, noted)."""
    from .sampling.schedule import MAX_PIXELS

    if width * height <= MAX_PIXELS:
        return width, height
    scale = (MAX_PIXELS / (width * height)) ** 0.5
    fitted = int(width * scale) // 16 * 16, int(height * scale) // 16 * 16
    warnings.warn(f"--image is {width}x{height}; sampled at {fitted[0]}x{fitted[1]} (klein's 4 MP)", KleinNote,
                  stacklevel=2)
    return fitted


def tile_lines(done, total):
    print(f"refine: tile {done}/{total}", file=sys.stderr, flush=True)


def check_prompt(text_encoder, args):
    """The prompt check's record; a flagged prompt stops the command (exit 3) before anything is generated."""
    from .loaders.safety import load_prompt_safety
    from .models.safety import flagged_prompt

    score, record = load_prompt_safety(text_encoder).check(args.prompt, args.prompt_threshold)
    print(f"prompt check: P(unsafe) {score:.3f} (threshold {args.prompt_threshold})", file=sys.stderr)
    if not record["passed"]:
        raise Blocked(f"{flagged_prompt(score, args.prompt_threshold)}; nothing was generated")
    return record


class Blocked(KleinError):
    """A safety check stopped the command (exit code 3)."""


BLOCKED = 3
INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C


@contextlib.contextmanager
def interrupt_after():
    """Hold Ctrl-C (SIGINT) until the block is done, then stop as Ctrl-C does: a file being saved is finished and
    listed (save_file writes a temporary file and links it into place; an interrupt in between must not leave the
    temporary file, or a saved file the output does not list), the next one is not begun."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and previous is signal.default_int_handler:
        raise KeyboardInterrupt
    if caught and callable(previous):
        previous(signal.SIGINT, caught[0])


def interrupted(args):
    """The line for a Ctrl-C: what was (not) written."""
    if args.command == "generate":
        return "interrupted; nothing was written for the image in progress"
    if args.command == "quantize":
        return f"interrupted; {args.output} was not written"
    return "interrupted"


@contextlib.contextmanager
def step_progress(steps):
    """A step callback: a tqdm bar on a terminal, one plain line per step in logs and pipes."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        with tqdm(total=steps, desc="sampling", unit="step", file=sys.stderr, leave=True) as bar:
            yield lambda step: bar.update(step.index - bar.n)
        return
    began = time.monotonic()
    yield lambda step: print(f"step {step.index}/{step.total} ({time.monotonic() - began:.1f} s)", file=sys.stderr,
                             flush=True)


@contextlib.contextmanager
def notes_once():
    """Warnings become one `note:` line each (KleinNote; `warning:` for others), without source paths, never
    repeated within a command."""
    said = set()

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if text not in said:
            said.add(text)
            print(f"{'note' if issubclass(category, KleinNote) else 'warning'}: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


def load_reference(path):
    with Image.open(path) as image:
        image.load()
        return image


def quant_type(text):
    """--type in any case (q4_k, Q4_K, FP8) -> the canonical spelling of loaders/convert.py's OUTPUT_TYPES."""
    from .loaders.convert import OUTPUT_TYPES

    canonical = {name.lower(): name for name in OUTPUT_TYPES}.get(text.strip().lower())
    if canonical is None:
        raise KleinError(f"--type {text}: not a quantization type; choose one of {', '.join(OUTPUT_TYPES)}")
    return canonical


def quantize(args):
    from .loaders.convert import quantize_file
    from .loaders.safetensors_io import sniff_format

    qtype = quant_type(args.type)
    if Path(args.source).is_file() and sniff_format(args.source) == "gguf":
        raise KleinError(f"{args.source}: already a GGUF (quantized) file; the quantizer takes a safetensors "
                         "transformer (BFL/ComfyUI layout) or Qwen3 text encoder: quantize the original .safetensors")
    output, kind = quantize_file(args.source, args.output, qtype, args.tokenizer)
    size = Path(output).stat().st_size
    print(f"{output}: {kind.replace('_', ' ')} as {qtype}, {size / 2**30:.2f} GiB")
    return 0


def verify(args):
    import json

    from .provenance.save import verify_image

    for path in [args.trust] * bool(args.trust) + args.files:
        if not Path(path).is_file():
            raise KleinError(f"{path}: no such file")
    if args.trust:
        anchor = Path(args.trust).read_bytes()
        if b"-----BEGIN CERTIFICATE-----" not in anchor:
            raise KleinError(f"--trust {args.trust}: not a PEM certificate (-----BEGIN CERTIFICATE-----)")
        trusted_by = f"trusted by the trust list you gave (--trust {args.trust})"
        untrusted = f"not trusted: the signature is intact, but its certificate is not from the root in {args.trust}"
    else:  # verify_image's own default, passed here so the report can say whose trust it is
        anchor, trusted_by, untrusted = local_trust_anchor(), LOCAL_TRUST, UNTRUSTED
    status = 0
    for path in args.files:
        report = trust_report(verify_image(path, anchor), trusted_by, untrusted)
        print(f"{path}: " + json.dumps(report))
        status = max(status, 0 if report["c2pa"] == "Valid" else 1)
    return status


LOCAL_TRUST = "this machine's own signing key (a root this pack made here; not a public trust list)"
UNTRUSTED = ("not trusted: the signature is intact, but it is not this machine's own key; give the signer's root "
             "certificate with --trust FILE to check it")


def local_trust_anchor():
    """The root certificate this machine's signing key was issued by (made with it on the first signed save)."""
    from .provenance.c2pa_sign import default_credentials_dir

    root = default_credentials_dir() / "root.pem"
    return root.read_bytes() if root.is_file() else None


def trust_report(report, trusted_by, untrusted):
    """verify_image's report with the signature's state apart from whose trust it has: c2pa "Trusted" (valid, and
    from a root in the trust list used, by default this machine's own) becomes "Valid" plus "trust", so a local
    self-made root is never read as public trust. "trust" is null when there is no valid signature."""
    state = report["c2pa"]
    trust = trusted_by if state == "Trusted" else untrusted if state == "Valid" else None
    return {"c2pa": "Valid" if state == "Trusted" else state, "trust": trust,
            **{key: value for key, value in report.items() if key != "c2pa"}}


EXIT_CODES = {  # documented in --help and docs/cli.md
    "generate": {0: "the images were saved", 3: "a safety check flagged the prompt (nothing generated) or an image "
                                                "(not saved)"},
    "quantize": {0: "the file was written"},
    "verify": {0: "every file has a valid C2PA signature (trusted or not: see \"trust\")",
               1: "a file has no C2PA manifest or an invalid one (or an unexpected error)"},
    "doctor": {0: "the report was printed",
               2: "a mistake in the arguments, or --comfyui (or COMFYUI_PATH) is not a ComfyUI install"},
    "inspect": {0: "every file was read",
                2: "a mistake in the arguments, or a file or folder could not be read (the others are still listed)"},
}
COMMON_EXIT_CODES = {1: "an unexpected error (one line; --debug before the command shows the traceback)",
                     2: "a mistake in the arguments or a named file (one error: line)",
                     INTERRUPTED: "interrupted with Ctrl-C (nothing half-written is left)"}


def exit_codes(command=None):
    """The 'exit codes:' epilog of one command's --help, or of every command's (command None)."""
    if command is not None:
        codes = {**COMMON_EXIT_CODES, **EXIT_CODES[command]}
        return "exit codes:\n" + "\n".join(f"  {code:<4} {codes[code]}" for code in sorted(codes))
    codes = {0: "success", **COMMON_EXIT_CODES, 3: "generate: a safety check flagged the prompt or an image"}
    codes[1] += "\n       verify: also a file without a valid C2PA signature"
    return "exit codes (each command's --help lists its own):\n" + "\n".join(
        f"  {code:<4} {codes[code]}" for code in sorted(codes))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m klein_nodes", description="FLUX.2 [klein] tools.",
                                     epilog=exit_codes(), formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, **kwargs):
        return commands.add_parser(name, epilog=exit_codes(name), formatter_class=argparse.RawDescriptionHelpFormatter,
                                   **kwargs)

    gen = command("generate", help="prompt (+ references) -> image file")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="klein.png", help="output file (.png/.jpg/.webp); never overwritten")
    gen.add_argument("--ref", action="append", default=[], help="reference image (repeat for up to 4 or more)")
    gen.add_argument("--image", help="image to edit: img2img (--denoise), inpainting (--mask), outpainting "
                                     "(--outpaint) or, alone with --upscale, upscaling; recorded as the C2PA "
                                     "ingredient")
    gen.add_argument("--mask", help="inpainting mask for --image (white = repaint)")
    gen.add_argument("--denoise", type=bounded(float, 0.01, 1.0),
                     help="how much of --image is redrawn (default: 1 with --mask or --outpaint, else 0.6)")
    gen.add_argument("--composite", action="store_true",
                     help="put the edit back into --image (or the first --ref): undo its shift and colour drift and "
                          "keep every unchanged pixel of the original")
    gen.add_argument("--outpaint", metavar="L,T,R,B|ASPECT",
                     help="extend --image by pixels per side (128,0,128,0) or to an aspect (16:9); the original's "
                          "pixels come back exactly")
    gen.add_argument("--upscale", type=bounded(float, 1.0, 8.0),
                     help="enlarge the result (or --image alone) by this factor, refined by klein in tiles: "
                          "beyond 4 MP")
    gen.add_argument("--refine-denoise", type=bounded(float, 0.01, 1.0), default=0.35,
                     help="how much each --upscale tile is redrawn")
    gen.add_argument("--tile", type=bounded(int, 256, 2048), default=1024, help="--upscale tile side (multiple of 16)")
    gen.add_argument("--lora", action="append", default=[],
                     help="LoRA file, optionally with a strength: style.safetensors:0.8 (repeat to stack)")
    gen.add_argument("--compile", action="store_true",
                     help="torch.compile the transformer blocks (slow first run, then faster steps; needs a compiler)")
    gen.add_argument("--steps", type=bounded(int, 1, 1000), default=4, help="4 for distilled klein, ~50 for base klein")
    gen.add_argument("--guidance", type=bounded(float, 0.0, 100.0), default=1.0,
                     help="1.0 = no CFG (distilled); base klein: 4.0")
    gen.add_argument("--negative", default="", help="negative prompt (used when guidance > 1)")
    gen.add_argument("--max-tokens", type=non_negative, default=512,
                     help="prompt tokens: 512 cuts longer prompts (diffusers); 0 keeps every token (ComfyUI)")
    gen.add_argument("--seed", type=int, default=-1, help="-1 = random (the seed used is printed)")
    gen.add_argument("--width", type=bounded(int, 16, 16384), help="default 1024, or the size of --image")
    gen.add_argument("--height", type=bounded(int, 16, 16384), help="default 1024, or the size of --image")
    gen.add_argument("--aspect", choices=ASPECT_RATIOS, help="aspect preset, overrides --width/--height")
    gen.add_argument("--megapixels", type=bounded(float, 0.01, 4.0), default=1.0,
                     help="size of the aspect preset (1 MP = 1024x1024)")
    gen.add_argument("--batch", type=bounded(int, 1, 64), default=1, help="images to make")
    gen.add_argument("--model", help="transformer file or diffusers folder")
    gen.add_argument("--text-encoder", dest="text_encoder", help="Qwen3 text encoder file or folder")
    gen.add_argument("--vae", help="FLUX.2 VAE file or folder")
    gen.add_argument("--tokenizer", help="Qwen tokenizer: tokenizer.json, or a folder with vocab.json + merges.txt "
                                         "(found beside the text encoder, in ComfyUI, or via KLEIN_TOKENIZER)")
    gen.add_argument("--comfyui", help="ComfyUI install to find models in (or set COMFYUI_PATH): safetensors, fp8, "
                                       "nvfp4 and GGUF files; with several, the one that fits the device")
    gen.add_argument("--device", default="auto", help=DEVICE_FORMS)
    gen.add_argument("--memory", default="auto", choices=("auto", "resident", "offload", "stream"),
                     help="auto plans from free memory; or keep everything resident, offload each component after its "
                          "turn, or stream transformer blocks")
    gen.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                     help="weight dtype (auto: bf16 on CUDA, the file's own dtype on CPU)")
    gen.add_argument("--tiny-random", action="store_true",
                     help="tiny random models: checks the wiring, no weights needed")
    gen.add_argument("--quality", type=bounded(int, 1, 100), default=90, help="JPEG/WebP quality 1-100")
    gen.add_argument("--no-watermark", action="store_true", help="skip the invisible FLUX watermark")
    gen.add_argument("--watermark-mode", default="robust", choices=("robust", "standard"),
                     help="robust (default): survives JPEG/WebP saves at quality 75+; standard: BFL's embedding, "
                          "byte-identical to imwatermark")
    gen.add_argument("--no-c2pa", action="store_true", help="skip the signed C2PA manifest")
    gen.add_argument("--allow-unsigned", action="store_true", help="save unsigned if C2PA signing is impossible")
    gen.add_argument("--safety", default="", choices=("", "prompt", "image", "prompt,image"),
                     help="safety checks: prompt (klein's own text encoder; a flagged prompt stops with exit code 3), "
                          "image (--image-classifier; flagged images are not saved, exit code 3), or both")
    gen.add_argument("--image-classifier", help="a Hugging Face ViT image classifier folder (config.json + "
                                                "model.safetensors), e.g. Falconsai/nsfw_image_detection")
    gen.add_argument("--prompt-threshold", type=bounded(float, 0.01, 0.99), default=0.5,
                     help="flag prompts at or above this P(unsafe)")
    gen.add_argument("--image-threshold", type=bounded(float, 0.01, 0.99), default=0.85,
                     help="flag images at or above this P(unsafe) (BFL's reference: 0.85)")
    gen.set_defaults(run=generate)
    qua = command("quantize", help="write a GGUF (Q8_0, Q6_K, Q5_K, Q4_K, Q4_0 ...) or fp8 safetensors file")
    qua.add_argument("source", help="transformer (BFL/ComfyUI safetensors) or Qwen3 text encoder (safetensors)")
    qua.add_argument("output", help="OUT.gguf, or OUT.safetensors for fp8; never overwritten")
    qua.add_argument("--type", default="Q8_0",
                     help="Q8_0, Q6_K, Q5_K, Q4_K, Q5_1, Q5_0, Q4_1, Q4_0 or fp8 (any case: q4_k, FP8)")
    qua.add_argument("--tokenizer", help="text encoders: tokenizer folder to embed in the GGUF (found automatically)")
    qua.set_defaults(run=quantize)
    ver = command("verify", help="C2PA state, FLUX watermark bits and embedded workflow of image files")
    ver.add_argument("files", nargs="+", help="image files (.png, .jpg, .webp)")
    ver.add_argument("--trust", metavar="FILE", help="root certificate (PEM) whose signatures count as trusted; "
                                                     "default: this machine's own signing root (not a public trust "
                                                     "list)")
    ver.set_defaults(run=verify)
    doc = command("doctor", help="report torch/CUDA/VRAM, native quantized paths and klein model files")
    doc.add_argument("--comfyui", help="ComfyUI install folder to scan for model files")
    doc.set_defaults(run=doctor)
    ins = command("inspect", help="what each weight file holds: model, layout, storage format and quant types "
                                  "with counts and bytes; LoRA format, rank, targets, base model")
    ins.add_argument("files", nargs="+", help="weight files or folders")
    ins.set_defaults(run=inspect)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")
    args = parser.parse_args(argv)
    try:
        with notes_once():
            return args.run(args)
    except KeyboardInterrupt:  # Ctrl-C: one line, the shell's code for SIGINT; --debug shows where it stopped
        if args.debug:
            raise
        print(f"\n{interrupted(args)}" if sys.stderr.isatty() else interrupted(args), file=sys.stderr)
        return INTERRUPTED
    except Blocked as e:
        print(f"blocked: {e}", file=sys.stderr)
        return BLOCKED
    except KleinError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the user named: missing, unreadable, a folder ...
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 (one line instead of a traceback; --debug shows it)
        if args.debug:
            raise
        print(f"error: unexpected {type(e).__name__}: {e} (run with --debug for the details)", file=sys.stderr)
        return 1
