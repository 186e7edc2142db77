"""Checks of what the public API is given: a wrong type or range is one KleinError naming the argument and what it
takes, raised before any work. Each returns the value in the form the code uses."""

import math
import numbers
import os
from pathlib import Path

import torch

from .errors import KleinError

DTYPES = {None: None, torch.float32: torch.float32, torch.float16: torch.float16, torch.bfloat16: torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def shown(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def path_argument(value, name="path"):
    """A file or folder path: a str or os.PathLike, not empty, without NUL bytes or unencodable characters."""
    if not isinstance(value, (str, os.PathLike)) or isinstance(value, bytes):
        raise KleinError(f"{name}={shown(value)}: give a file path (str or pathlib.Path)")
    text = os.fspath(value)
    if not isinstance(text, str) or not text or "\0" in text:
        raise KleinError(f"{name}={shown(value)}: not a usable path")
    try:
        text.encode()
    except UnicodeEncodeError:
        raise KleinError(f"{name}={shown(value)}: the path holds characters no file name can hold") from None
    return Path(text)


def device_argument(value, name="device"):
    """A torch device (or its name) this torch can use."""
    if not isinstance(value, (str, torch.device)):
        raise KleinError(f"{name}={shown(value)}: give a device such as 'cpu', 'cuda' or 'cuda:1'")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise KleinError(f"{name}={shown(value)}: not a device; give 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise KleinError(f"{name}={shown(value)}: this torch sees no such CUDA device "
                         f"({torch.cuda.device_count()} GPUs); use 'cpu' or a CUDA build of torch")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise KleinError(f"{name}={shown(value)}: the pack computes on cpu, cuda, mps or xpu devices")
    return device


def dtype_argument(value, name="dtype"):
    """None (the file's own) or one of fp32, fp16, bf16 (as torch dtypes or those names)."""
    try:
        return DTYPES[value]
    except (KeyError, TypeError):
        raise KleinError(f"{name}={shown(value)}: give None (the file's own), torch.float32, torch.float16 or "
                         "torch.bfloat16") from None


def integer(value, name, low=None, high=None):
    """A whole number (int, or a float with no fraction) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
            not isinstance(value, numbers.Integral) and not (math.isfinite(value) and float(value).is_integer())):
        raise KleinError(f"{name}={shown(value)}: give a whole number")
    return int(in_range(int(value), name, low, high))


def number(value, name, low=None, high=None):
    """A finite real number in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise KleinError(f"{name}={shown(value)}: give a finite number")
    return float(in_range(value, name, low, high))


def in_range(value, name, low, high):
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"from {low} to {high}" if low is not None and high is not None
                  else f"at least {low}" if low is not None else f"at most {high}")
        raise KleinError(f"{name}={shown(value)}: must be {bounds}")
    return value


def flag(value, name):
    """True or False."""
    if not isinstance(value, bool):
        raise KleinError(f"{name}={shown(value)}: give True or False")
    return value


def one_of(value, name, options):
    """One of `options` (compared by equality, so only hashable plain values)."""
    if not isinstance(value, (str, bool, type(None))) or value not in options:
        raise KleinError(f"{name}={shown(value)}: choose one of {', '.join(repr(o) for o in options)}")
    return value


def tensor_argument(value, name, dims=None, optional=False):
    """A real (float or integer) tensor with data (not on the meta device), of one of `dims` dimensions."""
    if value is None and optional:
        return None
    if not isinstance(value, torch.Tensor):
        raise KleinError(f"{name}: give a torch tensor, not {type(value).__name__}")
    if value.is_meta or value.is_complex() or value.dtype == torch.bool or value.layout != torch.strided:
        raise KleinError(f"{name}: a {value.dtype} tensor on {value.device} ({value.layout}); give real numbers in a "
                         "dense tensor with data")
    if dims is not None and value.ndim not in dims:
        raise KleinError(f"{name}: a tensor of shape {tuple(value.shape)}; it takes "
                         f"{' or '.join(str(d) for d in dims)} dimensions")
    return value
