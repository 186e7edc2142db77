"""Weight sources: a single safetensors file or a diffusers folder (sharded with an index json)."""

import functools
import json
import os
from pathlib import Path

import torch

from ..errors import CheckpointError
from .scaled import layer_formats, values_per_element
from .safetensors_io import PICKLE_SUFFIXES, SafetensorsFile, refuse_pickle, sniff_format

MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


class Checkpoint:
    """Read-only mapping name -> tensor over one or more safetensors files; shapes without reading data."""

    def __init__(self, files, path, strip_prefixes=()):
        self.path = str(path)
        self.files = files
        self.prefixes = strip_prefixes
        self.index = {}
        for file in files:
            for name in file.keys():
                self.index[self.strip(name)] = (file, name)

    def keys(self):
        return self.index.keys()

    def __contains__(self, name):
        return name in self.index

    def stored_shape(self, name):
        """The shape as the file stores it (an nvfp4 weight: its bytes, two values each)."""
        file, raw = self.index[name]
        return tuple(file.shape(raw))

    def shape(self, name):
        """The logical shape (an nvfp4 weight stores two values per byte)."""
        shape = self.stored_shape(name)
        if not name.endswith(".weight") or len(shape) != 2:
            return shape
        return torch.Size((shape[0], shape[1] * values_per_element(self.quant_formats.get(name[: -len(".weight")]))))

    @functools.cached_property
    def quant_formats(self):
        """{layer: format} of ComfyUI's quantization markers (`comfy_quant`, `_quantization_metadata`)."""
        return layer_formats(self)

    def strip(self, name):
        return strip_prefix(name, self.prefixes)

    def dtype(self, name):
        file, raw = self.index[name]
        return file.dtype(raw)

    def get(self, name):
        file, raw = self.index[name]
        return file.get(raw)

    @property
    def metadata(self):
        return self.files[0].metadata if len(self.files) == 1 else {}

    def shapes(self):
        return {name: self.shape(name) for name in self.keys()}


class TensorSource:
    """Tensors already in memory (e.g. the state dict of a model ComfyUI loaded), read like a file."""

    def __init__(self, tensors, label):
        self.path, self.tensors, self.metadata = label, tensors, {}

    def keys(self):
        return self.tensors.keys()

    def shape(self, name):
        return self.tensors[name].shape

    def dtype(self, name):
        return self.tensors[name].dtype

    def get(self, name):
        return self.tensors[name]


def strip_prefix(name, prefixes):
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def open_checkpoint(path, subfolder, weights_name, strip_prefixes=()):
    """Open a single file, or a diffusers folder (`path` itself or `path/subfolder`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder.")
    if path.is_dir():
        return Checkpoint(diffusers_shards(path, subfolder, weights_name), path, strip_prefixes)
    if path.suffix.lower() in PICKLE_SUFFIXES or sniff_format(path) == "pickle":
        refuse_pickle(path)
    if sniff_format(path) == "gguf":
        raise CheckpointError(f"{path}: GGUF files load as transformers and text encoders only (not as a VAE).")
    return Checkpoint([SafetensorsFile(path)], path, strip_prefixes)


def diffusers_shards(folder, subfolder, weights_name):
    """The safetensors files of a diffusers component folder, following the shard index when present."""
    if not has_weights(folder, weights_name) and (folder / subfolder).is_dir():
        folder = folder / subfolder
    index_path = folder / f"{weights_name}.safetensors.index.json"
    single = folder / f"{weights_name}.safetensors"
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid shard index ({e}).") from None
        shard_names = sorted(set(weight_map.values()))
        missing = [name for name in shard_names if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{index_path}: lists shard(s) that are missing from the folder: "
                                  f"{', '.join(missing)}.")
        files = [SafetensorsFile(folder / name) for name in shard_names]
        for file in files:
            absent = [key for key, shard in weight_map.items()
                      if shard == os.path.basename(file.path) and key not in file.keys()]
            if absent:
                raise CheckpointError(f"{file.path}: the shard index says it holds {absent[:3]} but it does not.")
        return files
    if single.exists():
        return [SafetensorsFile(single)]
    pickles = [p.name for p in folder.glob(f"{weights_name}*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        refuse_pickle(folder / pickles[0])
    raise CheckpointError(
        f"{folder}: no {weights_name}.safetensors or {weights_name}.safetensors.index.json found "
        f"(expected a diffusers '{subfolder}/' folder or a single .safetensors file)."
    )


def is_gguf(path):
    path = Path(path)
    return path.is_file() and sniff_format(path) == "gguf"


def has_weights(folder, weights_name):
    """Whether `folder` holds `<name>.safetensors`, its shard index, or shards (not e.g. model_index.json)."""
    return ((folder / f"{weights_name}.safetensors").exists()
            or (folder / f"{weights_name}.safetensors.index.json").exists()
            or any(folder.glob(f"{weights_name}-*-of-*.safetensors")))


def choose_dtype(checkpoint, names, dtype):
    """The requested dtype, or the floating dtype (16 bits or more) holding most parameters of `names`; bf16 when
    there is none (a model saved all in fp8 computes in bf16)."""
    if dtype is not None:
        return dtype
    counts = {}
    for name in names:
        dt = checkpoint.dtype(name)
        if dt.is_floating_point and dt.itemsize > 1:
            counts[dt] = counts.get(dt, 0) + torch.Size(checkpoint.shape(name)).numel()
    return max(counts, key=counts.get) if counts else torch.bfloat16


def require(shapes, ranks, path, what):
    """The tensors a configuration is read from ({name: number of dimensions}) must exist with that many
    dimensions, none of them zero: name the first that does not."""
    missing = [name for name in ranks if name not in shapes]
    if missing:
        raise CheckpointError(f"{path}: incomplete {what}, missing {', '.join(missing)}.")
    for name, rank in ranks.items():
        shape = tuple(shapes[name])
        if len(shape) != rank or 0 in shape:
            raise CheckpointError(f"{path}: '{name}' has shape {shape}; a {what} needs a {rank}-D tensor there with "
                                  "no empty dimension.")


def check_state_dict(path, what, expected, shapes, unused=()):
    """Missing / unexpected / mis-shaped tensors against `expected` {name: shape}, a few of each named, in one error."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected)) + list(unused)
    wrong = [f"{k} {tuple(shapes[k])} (expected {tuple(expected[k])})" for k in expected
             if k in shapes and tuple(shapes[k]) != tuple(expected[k])]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
    if problems:
        raise CheckpointError(f"{path}: does not match {what}: " + "; ".join(problems) + ".")
