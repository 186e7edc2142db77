"""`python -m klein_nodes <command>`: doctor, inspect."""

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

from . import __version__
from .errors import KleinError
from .loaders.detect import describe_file

WEIGHT_SUFFIXES = (".safetensors", ".sft", ".gguf")
MODEL_FOLDERS = {  # ComfyUI key -> folder names under models/
    "diffusion_models": ("diffusion_models", "unet"),
    "text_encoders": ("text_encoders", "clip"),
    "vae": ("vae",),
    "checkpoints": ("checkpoints",),
}
KLEIN_FAMILIES = {("transformer", "flux2"), ("text_encoder", "qwen3"), ("vae", "flux2")}


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
    lines.append(f"CPU: {os.cpu_count()} cores, {memory.total / 2**30:.1f} GiB RAM ({memory.available / 2**30:.1f} GiB free)")
    if not torch.cuda.is_available():
        cuda = "CPU-only torch build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, no GPU visible"
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
    dirs = comfyui_model_dirs(comfyui_root)
    if not dirs:
        return ["Model files: not inside ComfyUI; pass --comfyui PATH (or set COMFYUI_PATH) to scan an install."]
    lines = []
    for key, folders in dirs.items():
        files = sorted(p for folder in folders if os.path.isdir(folder)
                       for p in Path(folder).rglob("*") if p.suffix.lower() in WEIGHT_SUFFIXES)
        lines.append(f"{key}: {len(files)} weight file(s) in {', '.join(folders)}")
        for path in files:
            try:
                kind = describe_file(path)
                mark = "klein" if (kind.kind, kind.family) in KLEIN_FAMILIES else "     "
                lines.append(f"  [{mark}] {path.name}: {kind.description}")
            except (KleinError, OSError, ValueError) as e:
                lines.append(f"  [error] {path.name}: {e}")
    return lines


def doctor(args):
    root = args.comfyui or os.environ.get("COMFYUI_PATH")
    if root and not (Path(root) / "models").is_dir():
        print(f"{root}: not a ComfyUI install (no models/ folder).", file=sys.stderr)
        return 2
    print("\n".join(device_report() + package_report() + model_report(root)))
    return 0


def inspect(args):
    status = 0
    for path in args.files:
        try:
            kind = describe_file(path)
            print(f"{path}: {kind.description}" + (f" [{kind.layout} layout]" if kind.layout else ""))
        except (KleinError, OSError, ValueError) as e:
            print(f"{path}: error: {e}", file=sys.stderr)
            status = 1
    return status


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m klein_nodes", description="FLUX.2 [klein] tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    doc = commands.add_parser("doctor", help="report torch/CUDA/VRAM, native quantized paths and klein model files")
    doc.add_argument("--comfyui", help="ComfyUI install folder to scan for model files")
    doc.set_defaults(run=doctor)
    ins = commands.add_parser("inspect", help="say what model each weight file holds (reads headers only)")
    ins.add_argument("files", nargs="+")
    ins.set_defaults(run=inspect)
    args = parser.parse_args(argv)
    return args.run(args)
