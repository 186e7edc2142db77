"""Shared fixtures: a stand-in ComfyUI (module stubs and a models/ tree)."""

import sys
import types

import pytest


@pytest.fixture()
def comfyui(monkeypatch, tmp_path):
    """A stand-in ComfyUI: `comfy.utils` importable and `folder_paths` pointing at a models/ tree."""
    models = tmp_path / "ComfyUI" / "models"
    folders = {"diffusion_models": [models / "diffusion_models", models / "unet"],
               "text_encoders": [models / "text_encoders"], "vae": [models / "vae"],
               "checkpoints": [models / "checkpoints"], "loras": [models / "loras"], "safety": [models / "safety"]}
    for paths in folders.values():
        for path in paths:
            path.mkdir(parents=True)
    comfy, utils = types.ModuleType("comfy"), types.ModuleType("comfy.utils")
    comfy.utils = utils
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.get_folder_paths = lambda key: [str(p) for p in folders[key]]
    folder_paths.get_output_directory = lambda: str(models.parent / "output")
    folder_paths.get_user_directory = lambda: str(models.parent / "user")
    for name, module in (("comfy", comfy), ("comfy.utils", utils), ("folder_paths", folder_paths)):
        monkeypatch.setitem(sys.modules, name, module)
    return models


@pytest.fixture(autouse=True)
def private_config(monkeypatch, tmp_path_factory):
    """Signing credentials created by tests go to a temporary folder, never to the real ~/.config."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("config")))
