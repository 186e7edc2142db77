"""Errors the pack raises for bad input: each message names the file and what was found.

ComfyUI names a failed node's exception by `full_type_name` in execution.py: `module + "." + qualname`, or the bare
qualname when the module is "builtins". A custom node's modules are named after its install path
(`/…/custom_nodes/ComfyUI-Flux2-Klein.errors`), so the frontend's error line began with that path and hid the
message. KleinError and every subclass, wherever defined, therefore report "builtins" as their module: core, the
frontends and Python's tracebacks then show `CheckpointError: <message>`. `except`, isinstance and repr work as
before; pickling goes through `_restore`, which finds the class again in the module that defined it.
"""

import importlib
import sys


def _restore(module, qualname, args, state):
    """Unpickle a Klein error: the class from the module that defined it (see KleinError.__reduce__)."""
    cls = sys.modules.get(module) or importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    error = cls(*args)
    error.__dict__.update(state or {})
    return error


class KleinError(ValueError):
    """Base class: a problem with user input (file, model, size) rather than a bug."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _short_name(cls)

    def __reduce__(self):
        return _restore, (type(self)._defined_in, type(self).__qualname__, self.args, self.__dict__ or None)


def _short_name(cls):
    """Name `cls` by its class name alone in ComfyUI and tracebacks; remember its real module for pickling."""
    cls._defined_in = cls.__dict__.get("_defined_in", cls.__module__)
    cls.__module__ = "builtins"


_short_name(KleinError)


class CheckpointError(KleinError):
    """A weight file that cannot be read: wrong format, truncated, lying header, unsupported dtype."""


class WrongModelError(KleinError):
    """A readable file that holds a different model than the slot expects."""


class KleinNote(UserWarning):
    """Something the pack changed or left out of the user's input (a size rounded, a reference cropped, a prompt cut,
    LoRA keys unused): a warning for library users, a line under the node in ComfyUI, one `note:` line in the CLI."""
