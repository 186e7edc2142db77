"""Model file lists from ComfyUI's model folders (safetensors and GGUF), imported lazily."""

import os

from ..errors import KleinError
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


def contained(folder, name):
    """`name` joined to `folder`, or None when it escapes it (judged on the normalised path, so files symlinked
    into a model folder are fine)."""
    base = os.path.abspath(folder)
    path = os.path.normpath(os.path.join(base, name))
    return path if os.path.commonpath((base, path)) == base else None


def model_path(key, name):
    """Full path of `name` in the `key` folders; names that escape their folder are refused (checked on the
    normalised name, so files symlinked into a model folder are fine)."""
    for folder in model_folders(key):
        path = contained(folder, name)
        if path is None:
            raise KleinError(f"{name}: refers to a file outside the {key} folder; choose a file from the list.")
        if os.path.isfile(path):
            return path
    raise KleinError(f"{name}: not found in the {key} folders ({', '.join(model_folders(key))}); put the file there "
                     "and press R in ComfyUI to refresh the lists.")


SAFETY = "safety"  # ComfyUI models/safety/<classifier folder>/ (config.json + model.safetensors)


def safety_folders():
    """ComfyUI's folders for image safety classifiers, registered as `safety` (models/safety) on first use."""
    import folder_paths

    known = getattr(folder_paths, "folder_names_and_paths", None)
    if known is not None and SAFETY not in known:
        folder_paths.add_model_folder_path(SAFETY, os.path.join(folder_paths.models_dir, SAFETY))
    return folder_paths.get_folder_paths(SAFETY)


def list_classifiers():
    """Classifier folder names (relative) under the safety folders."""
    names = set()
    for folder in safety_folders():
        for root, _, files in os.walk(folder, followlinks=True):
            if "config.json" in files and "model.safetensors" in files:
                names.add(os.path.relpath(root, folder).replace(os.sep, "/"))
    return sorted(names)


def classifier_path(name):
    for folder in safety_folders():
        path = contained(folder, name)
        if path is not None and os.path.isfile(os.path.join(path, "config.json")):
            return path
    raise KleinError(f"{name}: no classifier folder of that name in {', '.join(safety_folders())}; put the "
                     "classifier's folder (config.json + model.safetensors) there and press R to refresh the lists.")
