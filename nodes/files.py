"""Model file lists from ComfyUI's model folders (safetensors and GGUF), imported lazily."""

import os

from ..loaders.detect import WEIGHT_SUFFIXES


def model_folders(key):
    import folder_paths  # ComfyUI only

    return folder_paths.get_folder_paths(key)


def list_model_files(key):
    """Relative paths of weight files under every folder ComfyUI knows for `key` (incl. extra_model_paths)."""
    names = set()
    for folder in model_folders(key):
        for root, _, files in os.walk(folder, followlinks=True):
            for name in files:
                if name.lower().endswith(WEIGHT_SUFFIXES):
                    names.add(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(names)


def model_path(key, name):
    """Full path of `name` in the `key` folders; names that escape their folder are refused (checked on the
    normalised name, so files symlinked into a model folder are fine)."""
    for folder in model_folders(key):
        base = os.path.abspath(folder)
        path = os.path.normpath(os.path.join(base, name))
        if os.path.commonpath((base, path)) != base:
            raise ValueError(f"{name}: refers to a file outside the {key} folder.")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{name}: not found in the {key} folders ({', '.join(model_folders(key))}).")
