"""Safety checkers: the prompt check from klein's own text encoder file, the image check from a Hugging Face ViT
image classifier folder (config.json + model.safetensors [+ preprocessor_config.json])."""

import json
from pathlib import Path

import torch
from PIL import Image

from ..arguments import device_argument, dtype_argument, path_argument
from ..errors import CheckpointError, KleinError, WrongModelError
from ..models.safety import ImageSafety, PromptSafety
from ..models.text_encoder import KleinTextEncoder
from ..models.vit import ViT, ViTParams
from .checkpoint import check_state_dict, choose_dtype
from .safetensors_io import SafetensorsFile
from .text_encoder import load_text_encoder

MAX_CONFIG_BYTES = 1 << 20


def load_prompt_safety(path_or_text_encoder: str | Path | KleinTextEncoder, tokenizer: str | Path | None = None,
                       policy: dict | None = None, dtype: torch.dtype | None = None,
                       device: str | torch.device = "cpu") -> PromptSafety:
    """A PromptSafety over the whole Qwen3 chat model in klein's text encoder file (safetensors, fp8, nvfp4 or
    GGUF). Given a loaded text encoder (built to layer 27 for klein), the layers it has are shared and only the
    rest, the final norm and the head are read from the same file."""
    dtype, device = dtype_argument(dtype), device_argument(device)
    if isinstance(path_or_text_encoder, KleinTextEncoder):
        encoder = path_or_text_encoder
        if encoder.model.params.lm_head:
            return PromptSafety(encoder.model, encoder.tokenizer, policy)
        source = getattr(encoder, "source", None)
        if source is None:
            raise KleinError("this text encoder was not loaded from a file; give the text encoder file's path")
        path, found_tokenizer, file_dtype = source
        chat = load_text_encoder(path, found_tokenizer, dtype or file_dtype, device, chat=True)
        chat.model.embed_tokens = encoder.model.embed_tokens  # what is already loaded is shared, not read twice
        for index, layer in enumerate(encoder.model.layers):
            chat.model.layers[index] = layer
        return PromptSafety(chat.model, encoder.tokenizer, policy)
    chat = load_text_encoder(path_argument(path_or_text_encoder, "path_or_text_encoder"), tokenizer, dtype, device,
                             chat=True)
    return PromptSafety(chat.model, chat.tokenizer, policy)


def read_json(path, what):
    path = Path(path)
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: {what} over 1 MB; not a model configuration")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return data


def number(config, key, default, kind=int, low=1, high=1 << 16):
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise CheckpointError(f"config.json: {key}={value!r} is not a number from {low} to {high}")
    return kind(value)


def vit_params(config, folder):
    if config.get("model_type") != "vit" or "ViTForImageClassification" not in (config.get("architectures") or []):
        kind = config.get("model_type") or "an unknown model"
        raise WrongModelError(f"{folder}: holds {kind} ({', '.join(config.get('architectures') or [])}), not a ViT "
                              "image classifier (ViTForImageClassification, as Falconsai/nsfw_image_detection)")
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{folder}: hidden_act {config.get('hidden_act')!r} is not supported (gelu)")
    labels = config.get("id2label") or {}
    if not isinstance(labels, dict) or not labels or len(labels) > 4096:
        raise CheckpointError(f"{folder}: config.json has no id2label naming the classes")
    # bounded, so a lying config.json cannot make building the (empty) model itself slow
    params = ViTParams(hidden_size=number(config, "hidden_size", 768, high=8192),
                       num_layers=number(config, "num_hidden_layers", 12, high=128),
                       num_heads=number(config, "num_attention_heads", 12, high=256),
                       intermediate_size=number(config, "intermediate_size", 3072, high=32768),
                       image_size=number(config, "image_size", 224, high=2048),
                       patch_size=number(config, "patch_size", 16, high=512),
                       channels=number(config, "num_channels", 3, high=4), num_labels=len(labels),
                       layer_norm_eps=number(config, "layer_norm_eps", 1e-12, float, 0, 1),
                       qkv_bias=bool(config.get("qkv_bias", True)))
    if params.hidden_size % params.num_heads or params.image_size % params.patch_size or params.channels != 3:
        raise CheckpointError(f"{folder}: inconsistent ViT configuration {params}")
    return params, {int(k): str(v) for k, v in labels.items()}


def preprocessing(config, params):
    """The image processor's resize / rescale / normalise settings (Hugging Face defaults for ViT where absent)."""
    config = config or {}
    size = config.get("size", {"height": params.image_size, "width": params.image_size})
    size = (size, size) if isinstance(size, int) else (size.get("height"), size.get("width"))
    if size != (params.image_size, params.image_size):
        raise CheckpointError(f"preprocessor_config.json: size {size} differs from the model's {params.image_size}")
    mean, std = config.get("image_mean", [0.5] * 3), config.get("image_std", [0.5] * 3)
    if not config.get("do_normalize", True):
        mean, std = [0.0] * 3, [1.0] * 3
    valid = lambda v: isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)  # noqa: E731
    if not (valid(mean) and valid(std) and all(s > 0 for s in std)):
        raise CheckpointError("preprocessor_config.json: image_mean / image_std must be three numbers (std > 0)")
    resample = config.get("resample", 2)
    if resample not in (0, 1, 2, 3, 4, 5):
        raise CheckpointError(f"preprocessor_config.json: resample {resample!r} is not a PIL filter")
    rescale = config.get("rescale_factor", 1 / 255) if config.get("do_rescale", True) else 1.0
    return {"size": size, "resample": Image.Resampling(resample), "mean": mean, "std": std, "rescale": float(rescale)}


def check_image_safety(path):
    """(empty model on the meta device, weights file, labels, preprocessing) of a ViT image classifier, checked from
    its JSON files and the weights' header alone: cheap enough to run when a graph is validated."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = path if path.is_file() else folder / "model.safetensors"
    config = read_json(folder / "config.json", "config.json")
    if config is None or not weights.is_file():
        raise CheckpointError(f"{path}: an image safety classifier is a folder with config.json and model.safetensors "
                              "(as Falconsai/nsfw_image_detection ships); put it in ComfyUI's models/safety/<name>/")
    params, id2label = vit_params(config, folder)
    with torch.device("meta"):
        model = ViT(params)
    file = SafetensorsFile(weights)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(weights, "a ViT image classifier with this config.json", expected,
                     {k: file.shape(k) for k in file.keys() if not k.startswith("vit.pooler.")})
    settings = preprocessing(read_json(folder / "preprocessor_config.json", "preprocessor_config.json"), params)
    return model, file, id2label, settings


def load_image_safety(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                      unsafe_labels: list | None = None) -> ImageSafety:
    """An ImageSafety from a Hugging Face ViT image classifier: a folder with config.json and model.safetensors
    (and preprocessor_config.json), or the model.safetensors file inside one."""
    path, device = path_argument(path), device_argument(device)
    dtype = dtype_argument(dtype)
    model, file, id2label, settings = check_image_safety(path)
    dtype = choose_dtype(file, [k for k in file.keys() if not k.startswith("vit.pooler.")], dtype)
    model.load_state_dict({k: file.get(k).to(device=device, dtype=dtype) for k in model.state_dict()}, assign=True)
    return ImageSafety(model.eval().requires_grad_(False), id2label, settings, unsafe_labels)
