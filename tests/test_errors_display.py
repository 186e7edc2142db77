"""How ComfyUI names the pack's errors: the short class name, never the install path, so the message shows."""

import copy
import importlib.util
import pickle
import sys
import traceback
from pathlib import Path

import klein_nodes as kn
import pytest
from klein_nodes.cli import Blocked
from klein_nodes.errors import KleinNote

PACK_ROOT = Path(kn.__file__).parent


def full_type_name(klass):
    """ComfyUI's rule (execution.py, full_type_name; alike in 0.3.64, 0.25 and 0.33): the exception_type shown."""
    module = klass.__module__
    if module == "builtins":
        return klass.__qualname__
    return module + "." + klass.__qualname__


ERRORS = [kn.KleinError, kn.CheckpointError, kn.WrongModelError, kn.Cancelled, Blocked]


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_core_names_the_error_by_its_class_alone(cls):
    assert full_type_name(cls) == cls.__name__
    try:
        raise cls("flux.safetensors: not a safetensors file")
    except kn.KleinError as e:  # the base class still catches every one of them
        assert isinstance(e, ValueError) and type(e) is cls
        assert full_type_name(type(e)) == cls.__name__
        assert repr(e) == f"{cls.__name__}('flux.safetensors: not a safetensors file')"
        assert traceback.format_exception_only(type(e), e) == [
            f"{cls.__name__}: flux.safetensors: not a safetensors file\n"]


def test_short_names_inside_comfyui_whose_module_names_are_paths(tmp_path):
    """ComfyUI imports the pack under its folder's path (nodes.py, load_custom_node: sys_module_name is the path with
    dots replaced), so without the short name exception_type would read `/…/ComfyUI-Flux2-Klein.errors.<class>`."""
    folder = tmp_path / "custom_nodes" / "ComfyUI-Flux2-Klein"
    folder.parent.mkdir()
    folder.symlink_to(PACK_ROOT)
    name = str(folder).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        errors = sys.modules[f"{name}.errors"]
        for cls in (errors.KleinError, errors.CheckpointError, errors.WrongModelError, module.Cancelled):
            assert full_type_name(cls) == cls.__name__
            error = pickle.loads(pickle.dumps(cls("bad file")))  # found again under the path-named module
            assert type(error) is cls and error.args == ("bad file",)
    finally:
        for loaded in [n for n in sys.modules if n == name or n.startswith(name + ".")]:
            del sys.modules[loaded]


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_errors_still_pickle_and_copy(cls):
    error = cls("truncated file")
    error.path = "model.safetensors"
    for again in (pickle.loads(pickle.dumps(error)), copy.deepcopy(error), copy.copy(error)):
        assert type(again) is cls and again.args == ("truncated file",) and again.path == "model.safetensors"


def test_notes_are_warnings_named_as_usual():
    assert issubclass(KleinNote, UserWarning) and KleinNote.__module__.endswith("errors")
