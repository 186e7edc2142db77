"""The pack's CUDA code paths run without a GPU: every pipeline mode and weight format on fake CUDA tensors.

    python tools/cuda_dry_run.py                        # every mode x format, with and without a LoRA
    python tools/cuda_dry_run.py --modes t2i,cfg --formats bf16,Q4_K --lora without --verbose

Tiny random models are written in the real file layouts (klein_nodes.testing; quantized with the pack's own
quantize_file, nvfp4 written here) and loaded with the pack's loaders on the CPU. For each run their parameters
and buffers are swapped for fake tensors (PyTorch's FakeTensorMode: shapes, dtypes and devices without data), and
`KleinPipeline(..., device="cuda")(prompt, width=256, height=256, steps=2, seed=0, ...)` runs under the fake mode
as it would on a GPU: the pipeline moves the components to "cuda" itself, as its memory plan says (resident,
offload, or the transformer's blocks streamed). Modes: text-to-image, 1 and 4 references, img2img, inpainting, the
base model's CFG, tiled VAE, memory="offload", memory="stream", and `lowvram`: ComfyUI's partial load
(device=None, half the layers left in CPU memory with comfy_cast_weights, as its memory manager does). Formats:
bf16, fp8 (torch._scaled_mm on SM 8.9; `fp8-sm86`: dequantized), GGUF Q4_K / Q8_0 / Q6_K (and the other types
quantize_file writes; `-triton`: the Triton dequantization path with a stand-in kernel), ComfyUI nvfp4; each with
and without a LoRA (low-rank pairs and a LoKr on the transformer, a pair on the text encoder).

A dispatch mode watching every aten op counts

  * device mismatches: an op whose tensors are on different devices (FakeTensorDeviceMismatchError, or "Expected
    all tensors to be on the same device"). The op is retried with its CPU tensors moved to the device, so one run
    finds every mismatch, not only the first;
  * CPU tensors inside a forward (transformer, text encoder, VAE encode/decode, tiled or not): an op whose output
    is on the CPU while a forward runs: `cpu-new`, created there (factory ops: arange, zeros, full, torch.tensor
    ... without device=, or built on the host and then copied), a defect; `cpu-op`, other ops on CPU tensors
    (reported, not a defect by itself: e.g. a LoRA factor prepared before its copy to the device);
  * host syncs inside the denoising loop (from the first transformer call of `sampler.sample` to the end of its
    last step, by step): ops that make the CPU wait for the GPU on real CUDA: .item() (aten._local_scalar_dense),
    nonzero, is_nonzero, equal, allclose, masked_select, unique, bincount, repeat_interleave by a tensor,
    device->host copies, blocking (non_blocking=False) host->device copies (PyTorch synchronizes the stream after
    them), non_blocking copies from pageable (unpinned) memory, torch.cuda.synchronize and event/stream
    synchronize. Syncs outside the loop are listed too, not counted.

The last line reads `fake cuda: N runs (M modes x F formats), K device mismatches, S host syncs in the loop`;
above it a table of the runs and every finding with its op and place (file:line in function, and its caller).
Exit status 1 on a run that failed, a device mismatch or a tensor created on the CPU in a forward.

What fake tensors cannot show: values (NaNs, overflow, wrong numbers), the Triton kernels themselves, real
memory use and speed, and anything torch decides from real hardware beyond the shims below.

Shims (here only, never in the pack; all undone after each run):

  * a CUDA device guard: on a CPU-only build of torch no CUDA device guard is registered, so every op that opens
    one (indexing, copy_, conv, SDPA, .to("cuda") without an index, ...) fails in C++ before the fake mode sees it.
    PyTorch's own `torch._C._ensureCUDADeviceGuardSet()` (what FakeTensorMode calls on CUDA builds without a GPU)
    installs its fake CUDA guard only over a registered guard that has no devices; `fake_cuda_guard` registers a
    placeholder with no devices first (in libc10's exported registry, with ctypes), calls it, and afterwards puts
    the registry back;
  * FakeTensorMode with `avoid_device_init` always on (torch.tensor(..., device="cuda") builds on the CPU and
    moves, as it must with no real device) and without the weak memo of `from_meta_and_device` (its weak
    references make `Module.to()` fail: swap_tensors refuses tensors with weak references); real tensors reaching
    an op (user images, LoRA factors) are made fake first (left real, the mode would run a `.to("cuda")` of them
    for real under inference mode, where it sees aten.to rather than the aten._to_copy its guard covers);
    `FakeTensor.data = t` also moves the tensor's reported device (sampling/streaming.py moves weights that way;
    the C++ setter alone leaves a fake tensor's Python-side device behind);
  * torch.cuda: is_available (True), device_count (1), current_device, get_device_capability (--capability, 8.9
    by default: fp8 layers take torch._scaled_mm), get_device_name, mem_get_info (--free-gb), empty_cache,
    synchronize (a sync), Stream / Event / stream / current_stream (Python stand-ins; their synchronize is a sync)
    and Tensor.record_stream, Tensor.pin_memory / is_pinned (pinning is remembered, so non_blocking copies from
    unpinned memory are told apart);
  * Triton: kernels read real memory, which fake tensors have not. KLEIN_TRITON=0 (the pack's torch
    dequantization, the path of every other GGUF type and of CUDA without Triton), or for `-triton` formats
    `dequant.triton_available` True and a stand-in quant/triton_dequant module whose `launch` checks the kernels'
    input contract (contiguous uint8 blocks, a contiguous output of the block size, one CUDA device);
  * data-dependent results (an .item() value, nonzero's length) are made up after being counted: True / 1 / 1.0,
    every element nonzero, tensors equal;
  * between runs the pack's per-process caches that would keep fake tensors are emptied: the prompt cache of the
    text encoders, the dequantization scratch buffers (models/prepacked.py), the Triton verdicts (so every run
    shows the first-call check a process makes once), Fp8Linear.native.
"""

import argparse
import contextlib
import ctypes
import functools
import glob
import logging
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensor,
                                           FakeTensorDeviceMismatchError, FakeTensorMode)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from klein_nodes.loaders.convert import GGUF_TYPES
from klein_nodes.models.text_encoder import KLEIN_LAYERS
from klein_nodes.quant.dequant import BLOCK_SIZES, TRITON_TYPES

ROOT = Path(__file__).resolve().parents[1]
aten = torch.ops.aten

MODES = ("t2i", "ref1", "ref4", "img2img", "inpaint", "cfg", "tiled", "offload", "stream", "lowvram")
FORMATS = ("bf16", "fp8", "fp8-sm86", "Q4_K", "Q4_K-triton", "Q8_0", "Q6_K", "nvfp4")  # the default matrix
EXTRA_FORMATS = tuple(t for t in GGUF_TYPES if t not in FORMATS) + tuple(  # the other GGUF types quantize_file writes
    f"{t}-triton" for t in TRITON_TYPES if f"{t}-triton" not in FORMATS and t in GGUF_TYPES)
MODE_HELP = {"t2i": "text-to-image", "ref1": "1 reference", "ref4": "4 references",
             "img2img": "image=, denoise=0.6", "inpaint": "image=, mask=", "cfg": "guidance=4, negative_prompt=''",
             "tiled": "1 reference, tiled=True (tiled encode and decode)",
             "offload": "memory='offload' (each component moved for its turn)",
             "stream": "memory='stream', resident_blocks=1 (BlockStreamer)",
             "lowvram": "device=None, ComfyUI's partial load (half the layers offloaded, comfy_cast_weights)"}
SIZE, STEPS, PROMPT = 256, 2, "a red fox in the snow"

# ops that make the host wait for the device when an input is on it
SYNC_OPS = {
    aten._local_scalar_dense.default: ".item() / bool() / float() of a device tensor",
    aten.item.default: ".item() / bool() / float() of a device tensor",
    aten.allclose.default: "torch.allclose",
    aten.nonzero.default: "nonzero (data-dependent size)",
    aten.is_nonzero.default: "bool() of a device tensor",
    aten.equal.default: "torch.equal",
    aten.masked_select.default: "masked_select (data-dependent size)",
    aten._unique2.default: "unique (data-dependent size)",
    aten.unique_consecutive.default: "unique_consecutive (data-dependent size)",
    aten.unique_dim.default: "unique (data-dependent size)",
    aten.repeat_interleave.Tensor: "repeat_interleave by a tensor (data-dependent size)",
    aten.bincount.default: "bincount (data-dependent size)",
}
# ops that make a tensor from Python data (torch.tensor, as_tensor of a list or number); the others that create one
# are those without tensor inputs (arange, zeros, ones, full, empty, rand*, linspace, eye, scalar_tensor, ...)
FACTORY_OPS = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
# the ops where a model's compute dtype decides speed and memory: their floating inputs must be in it (under
# inference mode the dispatch sees linear, matmul, conv2d and SDPA themselves, not what they decompose into)
COMPUTE_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.linear.default,
               aten.matmul.default, aten.conv2d.default, aten.convolution.default,
               aten.scaled_dot_product_attention.default, aten._scaled_dot_product_efficient_attention.default,
               aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_cudnn_attention.default,
               aten._scaled_dot_product_attention_math.default}


# ---------------------------------------------------------------------------------------------------- shims
@contextlib.contextmanager
def fake_cuda_guard():
    """PyTorch's fake CUDA device guard registered for the duration (see the module docstring); the registry is
    put back as it was afterwards. A build with CUDA needs nothing: FakeTensorMode sets the fake guard up itself
    when there is no GPU, and a GPU has its real guard."""
    if torch.backends.cuda.is_built():
        yield
        return
    names = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "*c10.*"))
    name = next((p for p in names if Path(p).name.split(".")[0] in ("libc10", "c10")), None)
    if name is None:
        raise RuntimeError(f"no libc10 next to torch ({names}): cannot register a fake CUDA device guard")
    try:
        registry = ctypes.c_void_p.in_dll(ctypes.CDLL(name), "_ZN3c104impl26device_guard_impl_registryE")
    except ValueError:
        raise RuntimeError("this torch's libc10 does not export the device guard registry; a fake CUDA device "
                           "guard cannot be registered") from None
    slot = ctypes.c_void_p.from_address(ctypes.addressof(registry) + ctypes.sizeof(ctypes.c_void_p) * 1)  # CUDA = 1
    before = slot.value
    # a placeholder guard whose every virtual method (deviceCount() included) returns 0: PyTorch's
    # _ensureCUDADeviceGuardSet replaces a registered guard that has no devices by its own fake CUDA guard at once,
    # so no other method of the placeholder is ever called
    zero = ctypes.CFUNCTYPE(ctypes.c_int8, ctypes.c_void_p)(lambda this: 0)
    vtable = (ctypes.c_void_p * 64)(*[ctypes.cast(zero, ctypes.c_void_p).value] * 64)
    placeholder = (ctypes.c_void_p * 1)(ctypes.addressof(vtable))
    if not before:
        slot.value = ctypes.addressof(placeholder)
    torch._C._ensureCUDADeviceGuardSet()
    if slot.value in (None, ctypes.addressof(placeholder)):
        slot.value = before
        raise RuntimeError("torch._C._ensureCUDADeviceGuardSet() did not install a fake CUDA device guard")
    try:
        yield
    finally:
        slot.value = before


class DryRunFakeMode(FakeTensorMode):
    """FakeTensorMode for fake CUDA on any build: device init always avoided, no weak memo of fresh outputs."""

    avoid_device_init = True

    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)  # real tensors (images, LoRA factors) enter as they would

        def from_meta_and_device(fake_mode, t, device, pytype=None, dispatch_keys=None):
            return FakeTensor(fake_mode, t, device, pytype=pytype, dispatch_keys=dispatch_keys)

        self.fake_tensor_converter.from_meta_and_device = from_meta_and_device


class FakeStream:
    """torch.cuda.Stream stand-in; waiting is free, synchronize() is a host sync."""

    def __init__(self, recorder, device=None, priority=0):
        self.recorder, self.device = recorder, device

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass

    def record_event(self, event=None):
        event = event or FakeEvent(self.recorder)
        return event

    def synchronize(self):
        self.recorder.note_sync("torch.cuda.Stream.synchronize", "torch.cuda.Stream.synchronize()")

    def query(self):
        return True


class FakeEvent:
    def __init__(self, recorder, *args, **kwargs):
        self.recorder = recorder

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def synchronize(self):
        self.recorder.note_sync("torch.cuda.Event.synchronize", "torch.cuda.Event.synchronize()")


BASE_DATA = torch._C.TensorBase.data
TRITON_MODULE = "klein_nodes.quant.triton_dequant"


def set_data(tensor, value):
    """`tensor.data = value` for fake tensors: the C++ swap moves the data but not FakeTensor's Python-side device,
    which a fake tensor reports; a Parameter moved by `.data =` (sampling/streaming.py) would stay on its old
    device."""
    BASE_DATA.__set__(tensor, value)
    if isinstance(value, FakeTensor):
        tensor.fake_device = value.fake_device


def pinned(tensor):
    return getattr(tensor, "_dry_run_pinned", False)


def triton_stand_in(recorder):
    """A module standing in for quant/triton_dequant.py: `launch` checks what the kernels need (contiguous uint8
    blocks and a contiguous output of the block size, on one CUDA device) and writes nothing."""
    import types

    def launch(name, blocks, out):
        block_size, type_size = BLOCK_SIZES[name]
        problems = [text for bad, text in (
            (name not in TRITON_TYPES, f"no Triton kernel for {name}"),
            (blocks.dtype != torch.uint8 or blocks.ndim != 2 or blocks.shape[1] != type_size,
             f"blocks {blocks.dtype} {tuple(blocks.shape)}, not uint8 (n, {type_size})"),
            (not blocks.is_contiguous(), "strided blocks (the kernel reads rows at fixed offsets)"),
            (tuple(out.shape) != (blocks.shape[0], block_size) or not out.is_contiguous(),
             f"output {tuple(out.shape)} {'contiguous' if out.is_contiguous() else 'strided'}, not contiguous "
             f"({blocks.shape[0]}, {block_size})"),
            (out.dtype not in (torch.float32, torch.bfloat16, torch.float16), f"output dtype {out.dtype}"),
            (blocks.device != out.device or blocks.device.type != "cuda",
             f"blocks on {blocks.device}, output on {out.device}")) if bad]
        if problems:
            raise RuntimeError(f"Triton {name} kernel launched with " + "; ".join(problems))
        recorder.triton_launches += 1
        return out

    module = types.ModuleType("klein_nodes.quant.triton_dequant")
    module.launch = launch
    return module


@contextlib.contextmanager
def cuda_shims(recorder, capability=(8, 9), free_bytes=24 << 30, total_bytes=24 << 30, triton=False):
    """torch.cuda answers as one GPU of `capability` with `free_bytes` free (see the module docstring); with
    `triton`, the pack's Triton dequantization is taken, with a stand-in for the kernels."""
    from klein_nodes.quant import dequant

    def pin_memory(tensor, device=None):
        copy = tensor.clone()
        copy._dry_run_pinned = True
        return copy

    def record_stream(tensor, stream):
        pass

    def synchronize(device=None):
        recorder.note_sync("torch.cuda.synchronize", "torch.cuda.synchronize()")

    def empty_cache():
        recorder.note("torch.cuda.empty_cache()")

    patches = [
        (torch.cuda, "is_available", lambda: True), (torch.cuda, "device_count", lambda: 1),
        (torch.cuda, "current_device", lambda: 0),
        (torch.cuda, "get_device_capability", lambda device=None: tuple(capability)),
        (torch.cuda, "get_device_name", lambda device=None: "fake CUDA (tools/cuda_dry_run.py)"),
        (torch.cuda, "mem_get_info", lambda device=None: (free_bytes, total_bytes)),
        (torch.cuda, "empty_cache", empty_cache), (torch.cuda, "synchronize", synchronize),
        (torch.cuda, "Stream", lambda device=None, priority=0: FakeStream(recorder, device, priority)),
        (torch.cuda, "Event", lambda *a, **k: FakeEvent(recorder, *a, **k)),
        (torch.cuda, "stream", lambda stream=None: contextlib.nullcontext(stream)),
        (torch.cuda, "current_stream", lambda device=None: FakeStream(recorder, device)),
        (torch.Tensor, "pin_memory", pin_memory), (torch.Tensor, "is_pinned", lambda t, device=None: pinned(t)),
        (torch.Tensor, "record_stream", record_stream),
    ]
    if triton:
        patches.append((dequant, "triton_available", lambda device: device.type == "cuda"))
    missing = object()  # an attribute inherited, not the owner's own: deleted again afterwards
    saved = [(owner, name, owner.__dict__.get(name, missing)) for owner, name, _ in patches]
    environment = os.environ.get("KLEIN_TRITON")
    kernels = sys.modules.get(TRITON_MODULE)
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        FakeTensor.data = property(BASE_DATA.__get__, set_data)
        os.environ["KLEIN_TRITON"] = "1" if triton else "0"
        if triton:
            sys.modules[TRITON_MODULE] = triton_stand_in(recorder)
        yield
    finally:
        if triton:
            sys.modules.pop(TRITON_MODULE, None)
            if kernels is not None:
                sys.modules[TRITON_MODULE] = kernels
        del FakeTensor.data
        for owner, name, value in saved:
            if value is missing:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
        if environment is None:
            os.environ.pop("KLEIN_TRITON", None)
        else:
            os.environ["KLEIN_TRITON"] = environment


# ---------------------------------------------------------------------------------------------------- recorder
@dataclass
class Finding:
    kind: str  # mismatch | cpu-created | cpu-computed | dtype | sync-loop | sync | note
    op: str
    where: str  # innermost file:line of the pack (and its caller)
    detail: str = ""
    forward: str = ""  # which forward was running
    step: int = 0  # denoising step (1-based) for loop syncs

    @property
    def key(self):
        return self.kind, self.op, self.where


@functools.cache
def checkout_path(filename):
    """`filename` relative to this checkout (posix), or None for files outside it, in this tool or in a venv."""
    try:
        relative = Path(filename).resolve().relative_to(ROOT)
    except (ValueError, OSError):
        return None
    if relative.parts[0] in ("tools", ".venv") or "site-packages" in relative.parts:
        return None
    return relative.as_posix()


def pack_frames(limit=2):
    """(file:line in function) of this checkout's frames on the current stack, innermost first: the pack's, and a
    test's that patched it; not this tool's."""
    frames, frame = [], sys._getframe(1)
    while frame is not None and len(frames) < limit:
        path = checkout_path(frame.f_code.co_filename)
        if path is not None:
            frames.append(f"{path}:{frame.f_lineno} in {frame.f_code.co_name}")
        frame = frame.f_back
    return frames


def place():
    frames = pack_frames()
    if not frames:
        return "(outside the pack)"
    return frames[0] + (f"  <- {frames[1]}" if len(frames) > 1 else "")


def devices_of(tree):
    return [t.device for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def on_device(tree):
    return any(d.type == "cuda" for d in devices_of(tree))


def bound(func, args, kwargs):
    """{argument name: value} of an aten op call, by its schema."""
    names = [a.name for a in func._schema.arguments]
    return {**dict(zip(names, args)), **kwargs}


def copy_reason(func, args, kwargs, out):
    """Why a copy between host and device (`.to()`, `_to_copy`, `copy_`) makes the host wait, or None."""
    packet = func._overloadpacket
    if packet not in (aten.to, aten._to_copy, aten.copy_):
        return None
    call = bound(func, args, kwargs)
    src = call.get("src") if packet is aten.copy_ else call.get("self")
    dst = call.get("self") if packet is aten.copy_ else out
    if not isinstance(src, torch.Tensor) or not isinstance(dst, torch.Tensor):
        return None
    if src.device.type == "cuda" and dst.device.type == "cpu":
        return "device->host copy (.cpu(), .to('cpu'), .tolist(), .numpy())"
    if src.device.type == "cpu" and dst.device.type == "cuda":
        if not call.get("non_blocking"):
            return "blocking host->device copy (torch synchronizes the stream after it)"
        if not pinned(src):
            return "non_blocking host->device copy from unpinned memory (runs synchronously)"
    return None


class Recorder(TorchDispatchMode):
    """Watches every aten op of a run: device mismatches, CPU outputs inside forwards, host syncs (see above)."""

    def __init__(self, fake_mode):
        super().__init__()
        self.fake_mode = fake_mode
        self.findings = []
        self.forwards = []  # (name, the model's compute dtype) of the forwards running, innermost last
        self.in_loop = False
        self.step = 0  # steps finished in the current loop
        self.ops = 0
        self.triton_launches = 0

    # events from the wrappers
    def note(self, text):
        self.findings.append(Finding("note", text, place()))

    def note_sync(self, op, detail):
        kind = "sync-loop" if self.in_loop else "sync"
        self.findings.append(Finding(kind, op, place(), detail, self.forward, self.step + 1 if self.in_loop else 0))

    @property
    def forward(self):
        return self.forwards[-1][0] if self.forwards else ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        # real tensors (user images, LoRA factors) become fakes here: left real, the fake mode would run a
        # constant's .to("cuda") for real (its device-init guard covers aten._to_copy only, not aten.to)
        args, kwargs = tree_map(self.to_fake, (args, kwargs or {}))
        if func is aten._pin_memory.default:  # Tensor.pin_memory is shimmed; anything reaching here: same answer
            out = args[0].clone()
            out._dry_run_pinned = True
            return out
        if func is aten.is_pinned.default:
            return pinned(args[0])
        reason = SYNC_OPS.get(func) if on_device((args, kwargs)) else None
        if reason:
            self.note_sync(str(func), reason)
        try:
            out = func(*args, **kwargs)
        except (FakeTensorDeviceMismatchError, RuntimeError) as e:
            if isinstance(e, (DataDependentOutputException, DynamicOutputShapeException)):
                if not reason and on_device((args, kwargs)):
                    self.note_sync(str(func), "data-dependent result")
                out = self.made_up(func, args, e)
            elif isinstance(e, FakeTensorDeviceMismatchError) or "same device" in str(e):
                devices = sorted({str(d) for d in devices_of((args, kwargs))})
                self.findings.append(Finding("mismatch", str(func), place(), f"tensors on {', '.join(devices)}",
                                             self.forward))
                out = self.retry_on_device(func, args, kwargs)
            else:
                raise
        copy = copy_reason(func, args, kwargs, out)
        if copy:
            self.note_sync(str(func), copy)
        if self.forwards:
            self.check_outputs(func, args, kwargs, out)
            self.check_dtype(func, args, kwargs)
        return out

    def check_dtype(self, func, args, kwargs):
        """A matmul, convolution or attention on the device in a dtype other than its model's compute dtype."""
        planned = self.forwards[-1][1]
        if func not in COMPUTE_OPS or planned is None or not on_device((args, kwargs)):
            return
        dtypes = {t.dtype for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.dtype.is_floating_point}
        if dtypes - {planned}:
            self.findings.append(Finding("dtype", str(func), place(), f"{', '.join(sorted(map(str, dtypes)))} in a "
                                         f"{planned} model", self.forward))

    def to_fake(self, value):
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
            return self.fake_mode.from_tensor(value)
        return value

    def retry_on_device(self, func, args, kwargs):
        device = next((d for d in devices_of((args, kwargs)) if d.type == "cuda"), None)
        moved = tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t,
                         (args, kwargs))
        return func(*moved[0], **moved[1])

    @staticmethod
    def made_up(func, args, error):
        """A stand-in for a data-dependent result (the fake tensors hold no data)."""
        if func in (aten._local_scalar_dense.default, aten.item.default):
            dtype = args[0].dtype
            return True if dtype == torch.bool else (1.0 if dtype.is_floating_point else 1)
        if func in (aten.equal.default, aten.is_nonzero.default, aten.allclose.default):
            return True
        if func is aten.nonzero.default:
            x = args[0]
            return torch.empty((x.numel(), x.ndim), dtype=torch.long, device=x.device)
        raise error

    def check_outputs(self, func, args, kwargs, out):
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
        if not outputs:
            return
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        created = func in FACTORY_OPS or not inputs
        shape = tuple(outputs[0].shape)
        self.findings.append(Finding("cpu-created" if created else "cpu-computed", str(func), place(),
                                     f"{outputs[0].dtype} {shape} on the CPU", self.forward))

    # hooks the run installs
    def forward_wrapper(self, fn, name):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            self.forwards.append((name, getattr(args[0], "dtype", None) if args else None))
            try:
                return fn(*args, **kwargs)
            finally:
                self.forwards.pop()
        return run

    def sample_wrapper(self, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            self.step = 0
            try:
                return fn(*args, **kwargs)
            finally:
                self.in_loop = False
        return run

    def predict_wrapper(self, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            self.in_loop = True  # from the first transformer call of the loop on
            return fn(*args, **kwargs)
        return run

    def step_done(self, step):
        self.step = step.index
        if step.index >= step.total:
            self.in_loop = False  # the last step has finished


@contextlib.contextmanager
def watched(recorder):
    """The forwards, the sampler and its loop instrumented for `recorder` (class and module attributes, restored)."""
    from klein_nodes.models.autoencoder import AutoEncoder
    from klein_nodes.models.text_encoder import Qwen3
    from klein_nodes.models.transformer import Flux2
    from klein_nodes.sampling import sampler, tiling

    patches = [(Flux2, "forward", "transformer"), (Qwen3, "forward", "text encoder"),
               (AutoEncoder, "encode", "VAE encode"), (AutoEncoder, "decode", "VAE decode"),
               (tiling, "tiled_encode", "VAE tiled encode"), (tiling, "tiled_decode", "VAE tiled decode")]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    saved += [(sampler, "sample", sampler.sample), (sampler, "predict", sampler.predict)]
    try:
        for owner, name, label in patches:
            setattr(owner, name, recorder.forward_wrapper(getattr(owner, name), label))
        sampler.sample = recorder.sample_wrapper(sampler.sample)
        sampler.predict = recorder.predict_wrapper(sampler.predict)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


# ---------------------------------------------------------------------------------------------------- models
def write_nvfp4(source, target, select):
    """A ComfyUI nvfp4 file from a float safetensors file: the `select`ed 2-D weights as random e2m1 codes with
    small e4m3 block scales (cuBLAS blocked layout), a global scale and the comfy_quant marker (values do not
    matter here, the layout does)."""
    from safetensors.torch import load_file, save_file

    from klein_nodes.quant.nvfp4 import GROUP, blocked_scales

    generator = torch.Generator().manual_seed(0)
    marker = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    tensors = {}
    for name, tensor in load_file(str(source)).items():
        if not (tensor.ndim == 2 and name.endswith(".weight") and select(name)):
            tensors[name] = tensor
            continue
        rows, cols = tensor.shape
        layer = name[: -len(".weight")]
        tensors[name] = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=generator)
        scales = torch.randint(0x20, 0x38, (blocked_scales(rows, cols // GROUP),), dtype=torch.uint8,
                               generator=generator)
        tensors[layer + ".weight_scale"] = scales.view(torch.float8_e4m3fn)
        tensors[layer + ".weight_scale_2"] = torch.tensor(0.01, dtype=torch.float32)
        tensors[layer + ".comfy_quant"] = marker.clone()
    save_file(tensors, str(target))
    return target


def write_lora(path, params):
    """A LoRA on transformer layers (two low-rank pairs) and a LoKr (a full delta added to the dequantized weight),
    plus a low-rank pair on a text-encoder layer, in ComfyUI's names."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=generator) * 0.1  # noqa: E731
    hidden, mlp, rank = params.hidden_size, params.mlp_hidden_dim, 4
    lora = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": randn(rank, hidden),
            "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": randn(3 * hidden, rank),
            "diffusion_model.single_blocks.0.linear2.lora_A.weight": randn(rank, hidden + mlp),
            "diffusion_model.single_blocks.0.linear2.lora_B.weight": randn(hidden, rank),
            "diffusion_model.single_blocks.1.linear1.lokr_w1": randn(4, 4),
            "diffusion_model.single_blocks.1.linear1.lokr_w2": randn((3 * hidden + 2 * mlp) // 4, hidden // 4),
            "text_encoders.qwen3_4b.transformer.model.layers.3.mlp.down_proj.lora_A.weight": randn(rank, 64),
            "text_encoders.qwen3_4b.transformer.model.layers.3.mlp.down_proj.lora_B.weight": randn(32, rank)}
    save_file(lora, str(path))
    return path


NVFP4_LAYERS = ("double_blocks", "single_blocks", "model.layers")  # as ComfyUI's nvfp4 files: the block linears


def format_files(folder, fmt, text_encoder_format=None):
    """(transformer, text encoder) files of format `fmt` (the text encoder's: `text_encoder_format`, by default the
    same) under `folder`, written when missing."""
    from klein_nodes.loaders.convert import quantize_file
    from klein_nodes.models.text_encoder import Qwen3Params
    from klein_nodes.testing import CORE_TINY_TRANSFORMER, TINY_QWEN3, write_text_encoder, write_transformer

    folder = Path(folder)
    transformer, text_encoder = folder / "transformer-bf16.safetensors", folder / "qwen3-bf16.safetensors"
    if not transformer.exists():  # heads of 128 and widths of 256: every block linear fits Q4_K's 256-blocks
        write_transformer(transformer, params=CORE_TINY_TRANSFORMER)
    if not text_encoder.exists():  # 28 layers: klein reads layers 9, 18, 27
        write_text_encoder(text_encoder, Qwen3Params(**{**TINY_QWEN3.__dict__, "num_layers": 28}))
    out = []
    for source, base, stem in ((transformer, base_format(fmt), "transformer"),
                               (text_encoder, base_format(text_encoder_format or fmt), "qwen3")):
        suffix = ".safetensors" if base in ("bf16", "fp8", "nvfp4") else ".gguf"
        target = folder / f"{stem}-{base}{suffix}"
        if not target.exists() and base == "nvfp4":
            write_nvfp4(source, target, lambda name: name.startswith(NVFP4_LAYERS))
        elif not target.exists():
            quantize_file(source, target, base, tokenizer=folder / "tokenizer")
        out.append(target)
    return tuple(out)


def build_models(folder, formats, loras=(False, True), text_layers=KLEIN_LAYERS, quantized_text_encoders=None):
    """{(format, with LoRA): (transformer, text encoder, VAE)} loaded on the CPU (files written under `folder`);
    the text encoders with the layers `text_layers` needs, in the format of the transformer (only for the formats
    in `quantized_text_encoders` when given, else bf16: reading a GGUF text encoder's 151,936-token vocabulary
    with gguf-py takes seconds). Formats sharing files share the loaded models (each run restores their weights)."""
    import klein_nodes as kn
    from klein_nodes.testing import CORE_TINY_TRANSFORMER, write_tokenizer, write_vae

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = folder / "tokenizer"
    if not (tokenizer / "vocab.json").exists():
        write_tokenizer(tokenizer)
    vae_path = folder / "vae-bf16.safetensors"
    if not vae_path.exists():
        write_vae(vae_path, dtype=torch.bfloat16)
    lora = folder / "lora.safetensors"
    if not lora.exists():
        write_lora(lora, CORE_TINY_TRANSFORMER)
    vae = kn.load_vae(vae_path)
    models, loaded = {}, {}

    def load(path, loader, **options):
        if path not in loaded:
            loaded[path] = loader(path, **options)
        return loaded[path]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fmt in dict.fromkeys(formats):
            quantized = quantized_text_encoders is None or base_format(fmt) in quantized_text_encoders
            transformer_path, text_encoder_path = format_files(folder, fmt, None if quantized else "bf16")
            transformer = load(transformer_path, kn.load_transformer)
            text_encoder = load(text_encoder_path, kn.load_text_encoder, tokenizer=tokenizer, layers=text_layers)
            for with_lora in loras:
                if with_lora:
                    models[fmt, True] = load((transformer_path, text_encoder_path, "lora"), lambda _: (
                        kn.apply_lora(transformer, lora), kn.apply_lora(text_encoder, lora), vae))
                else:
                    models[fmt, False] = (transformer, text_encoder, vae)
    return models


def inputs():
    """Real CPU inputs as a user passes them: ComfyUI IMAGE tensors (B, H, W, 3) and a (H, W) mask."""
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, SIZE, SIZE, 3, generator=generator)
    references = [torch.rand(1, 64 + 16 * k, 80, 3, generator=generator) for k in range(4)]
    mask = torch.zeros(SIZE, SIZE)
    mask[:, SIZE // 2:] = 1
    return image, references, mask


def mode_arguments(mode):
    """(pipeline keyword arguments, call keyword arguments) of a mode."""
    image, references, mask = inputs()
    pipeline, call = {}, {}
    if mode == "ref1":
        call = {"references": references[:1]}
    elif mode == "ref4":
        call = {"references": references}
    elif mode == "img2img":
        call = {"image": image, "denoise": 0.6}
    elif mode == "inpaint":
        call = {"image": image, "mask": mask}
    elif mode == "cfg":
        call = {"guidance": 4.0, "negative_prompt": ""}
    elif mode == "tiled":
        call = {"references": references[:1], "tiled": True}
    elif mode == "offload":
        pipeline = {"memory": "offload"}
    elif mode == "stream":
        pipeline = {"memory": "stream", "resident_blocks": 1}
    elif mode == "lowvram":
        pipeline = {"device": None, "before_turn": comfy_partial_load}
    elif mode != "t2i":
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    return pipeline, call


PIN_PARTIAL_LOADS = True  # core 0.25 and later; 0.3.64 pins nothing (its own modules then copy synchronously)


def comfy_partial_load(module, role):
    """`before_turn` as ComfyUI's memory manager behaves when a model does not fit (nodes/runtime.py registers the
    module; models/offload.py is the contract): the compute device recorded as `klein_device`, the first half of
    the modules with weights loaded on it, the rest left in pinned CPU memory (core 0.25 and later pin what a
    partial load leaves behind: ModelPatcher.pin_weight_to_device) with `comfy_cast_weights` set, so they bring
    their weights for each call (`weights_on`). The VAE, which has no such modules, is loaded whole."""
    device = torch.device("cuda", 0)
    base = getattr(module, "lora_base", module)
    object.__setattr__(base, "klein_device", device)
    if role == "vae":
        module.to(device)
        return
    from klein_nodes.models.offload import Offloadable

    holders = [m for m in base.modules() if isinstance(m, Offloadable)
               and any(True for _ in m.parameters(recurse=False)) | any(True for _ in m.buffers(recurse=False))]
    for index, holder in enumerate(holders):
        if index < len(holders) // 2:
            holder.to(device)
        else:
            holder.comfy_cast_weights = True
            for registry in (holder._parameters, holder._buffers) if PIN_PARTIAL_LOADS else ():
                for name, tensor in registry.items():
                    if tensor is not None and not pinned(tensor):
                        if isinstance(tensor, nn.Parameter):
                            tensor.data = tensor.data.pin_memory()
                            tensor._dry_run_pinned = True
                        else:
                            registry[name] = tensor.pin_memory()


# ---------------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    mode: str
    fmt: str
    lora: bool
    outcome: str = "ok"
    seconds: float = 0.0
    ops: int = 0
    findings: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    triton_launches: int = 0  # calls of the Triton stand-in (formats ending in -triton)

    @property
    def label(self):
        return f"{self.fmt}{'+LoRA' if self.lora else ''}"

    def count(self, *kinds):
        return sum(1 for f in self.findings if f.kind in kinds)

    @property
    def failed(self):
        return self.outcome != "ok"


def modules_of(transformer, text_encoder, vae):
    """Every module of the three models (a LoRA copy's base too), once."""
    seen, modules = set(), []
    roots = [transformer, text_encoder.model if text_encoder is not None else None, vae]
    roots += [getattr(root, "lora_base", None) for root in roots]
    for root in roots:
        for module in (root.modules() if root is not None else ()):
            if id(module) not in seen:
                seen.add(id(module))
                modules.append(module)
    return modules


@contextlib.contextmanager
def fake_weights(modules, mode):
    """Every parameter and buffer of `modules` replaced by a fake twin (same shape, strides, dtype and device, no
    data) for the duration; the real tensors are put back afterwards, whatever the run did to the modules."""
    saved = [(m, dict(m._parameters), dict(m._buffers), m.__dict__.get("_prepacked")) for m in modules]

    def twin(t):
        with mode:
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)

    try:
        for module, parameters, buffers, _ in saved:
            for name, t in parameters.items():
                if t is not None:
                    module._parameters[name] = nn.Parameter(twin(t), requires_grad=False)
            for name, t in buffers.items():
                if t is not None:
                    module._buffers[name] = twin(t)
            module.__dict__.pop("_prepacked", None)
        yield
    finally:
        for module, parameters, buffers, packed in saved:
            module._parameters.clear()
            module._parameters.update(parameters)
            module._buffers.clear()
            module._buffers.update(buffers)
            if packed is not None:
                module.__dict__["_prepacked"] = packed
            for attribute in ("comfy_cast_weights", "klein_device"):  # set by comfy_partial_load
                module.__dict__.pop(attribute, None)


@contextlib.contextmanager
def fresh_pack_state(text_encoder):
    """The pack's per-process caches emptied before and after a run (they would keep fake tensors)."""
    from klein_nodes.models import prepacked
    from klein_nodes.quant import dequant
    from klein_nodes.quant.fp8 import Fp8Linear

    native = Fp8Linear.native

    def clear():
        prepacked._scratch.__dict__.clear()
        dequant._triton_verdict.clear()
        dequant._constants.clear()
        dequant._prepared.clear()
        if text_encoder is not None:
            text_encoder._cache.clear()
        Fp8Linear.native = native

    clear()
    try:
        yield
    finally:
        clear()


class LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        message = record.getMessage()
        if record.levelno >= logging.WARNING or "memory plan" in message:
            self.lines.append(message)


def capability_of(fmt, default):
    return (8, 6) if fmt.endswith("-sm86") else default


def base_format(fmt):
    """The file format of a run's format: 'fp8-sm86' -> 'fp8', 'Q4_K-triton' -> 'Q4_K'."""
    return fmt.split("-")[0]


def run_one(models, mode, fmt, lora, capability=(8, 9), free_bytes=24 << 30, text_layers=KLEIN_LAYERS):
    """One fake CUDA pipeline run; returns its Run (outcome, findings)."""
    import klein_nodes as kn

    transformer, text_encoder, vae = models
    run = Run(mode, fmt, lora)
    pipeline_args, call_args = mode_arguments(mode)
    fake = DryRunFakeMode()
    recorder = Recorder(fake)
    logs = LogCapture()
    logger = logging.getLogger("klein_nodes")
    level, propagate = logger.level, logger.propagate
    start = time.perf_counter()
    try:
        logger.addHandler(logs)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # its warnings are in the report
        with (fake_cuda_guard(), fresh_pack_state(text_encoder), fake_weights(modules_of(*models), fake),
              warnings.catch_warnings(),
              cuda_shims(recorder, capability_of(fmt, capability), free_bytes, triton=fmt.endswith("-triton")),
              watched(recorder), fake, recorder):
            warnings.simplefilter("ignore")
            pipe = kn.KleinPipeline(transformer, text_encoder, vae, text_layers=text_layers,
                                    **{"device": "cuda", **pipeline_args})
            images = pipe(PROMPT, width=SIZE, height=SIZE, steps=STEPS, seed=0, callback=recorder.step_done,
                          **call_args)
            if tuple(images.shape) != (1, SIZE, SIZE, 3) or images.device.type != "cpu":
                run.outcome = f"wrong output: {tuple(images.shape)} on {images.device}"
    except Exception as e:  # a run that fails is reported with where it failed, and the next one runs
        frames = [f for f in traceback.extract_tb(e.__traceback__) if checkout_path(f.filename)]
        at = f" at {checkout_path(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
        run.outcome = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}{at}"
    finally:
        logger.removeHandler(logs)
        logger.setLevel(level)
        logger.propagate = propagate
    run.seconds = time.perf_counter() - start
    run.ops = recorder.ops
    run.findings = recorder.findings
    run.notes = logs.lines
    run.triton_launches = recorder.triton_launches
    return run


def dry_run(folder=None, modes=MODES, formats=FORMATS, loras=(False, True), capability=(8, 9), free_gb=24.0,
            text_layers=KLEIN_LAYERS, progress=None):
    """Every mode x format (x LoRA) run; returns the list of Runs. Model files go to `folder` (a temporary one when
    None)."""
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="klein-dry-run-"))
        models = build_models(folder, formats, loras, text_layers)
        runs = []
        for fmt in formats:
            for lora in loras:
                for mode in modes:
                    run = run_one(models[fmt, lora], mode, fmt, lora, capability, int(free_gb * 2**30), text_layers)
                    runs.append(run)
                    if progress:
                        progress(run)
        return runs


# ---------------------------------------------------------------------------------------------------- report
def totals(runs):
    return {"runs": len(runs), "failed": sum(r.failed for r in runs),
            "mismatches": sum(r.count("mismatch") for r in runs),
            "cpu_created": sum(r.count("cpu-created") for r in runs),
            "cpu_computed": sum(r.count("cpu-computed") for r in runs),
            "dtypes": sum(r.count("dtype") for r in runs),
            "loop_syncs": sum(r.count("sync-loop") for r in runs),
            "other_syncs": sum(r.count("sync") for r in runs)}


def summary_line(runs):
    t = totals(runs)
    modes, formats = len({r.mode for r in runs}), len({r.label for r in runs})
    return (f"fake cuda: {t['runs']} runs ({modes} modes x {formats} formats), {t['mismatches']} device mismatches, "
            f"{t['loop_syncs']} host syncs in the loop")


def table(runs):
    header = (f"{'mode':<8} {'format':<16} {'mismatch':>8} {'cpu-new':>7} {'cpu-op':>6} {'dtype':>5} "
              f"{'loop-sync':>9} {'sync':>5} {'ops':>6} {'s':>5}  outcome")
    lines = [header, "-" * len(header)]
    for r in runs:
        lines.append(f"{r.mode:<8} {r.label:<16} {r.count('mismatch'):>8} {r.count('cpu-created'):>7} "
                     f"{r.count('cpu-computed'):>6} {r.count('dtype'):>5} {r.count('sync-loop'):>9} "
                     f"{r.count('sync'):>5} {r.ops:>6} "
                     f"{r.seconds:>5.1f}  {r.outcome}")
    return lines


TITLES = {"mismatch": "device mismatches (the op was retried with its CPU tensors moved to the device)",
          "cpu-created": "tensors created on the CPU inside a forward",
          "cpu-computed": "ops computed on the CPU inside a forward (CPU tensors meeting CPU tensors)",
          "dtype": "matmuls, convolutions or attention on the device in a dtype other than their model's",
          "sync-loop": "host syncs in the denoising loop",
          "sync": "host syncs outside the loop (not counted: loading weights, prompts, inputs, the image out)",
          "note": "notes"}
OUTSIDE_SHOWN = 8  # sites of syncs outside the loop listed without --verbose


def findings_report(runs, verbose=False):
    """Findings grouped by kind, op and place: how often, in which runs (and forward / step)."""
    groups = {}
    for r in runs:
        for f in r.findings:
            if f.kind == "note" and not verbose:
                continue
            entry = groups.setdefault(f.key, {"count": 0, "runs": Counter(), "finding": f, "steps": set(),
                                              "forwards": Counter()})
            entry["count"] += 1
            entry["runs"][f"{r.mode}/{r.label}"] += 1
            entry["steps"].add(f.step)
            entry["forwards"][f.forward] += 1
    lines = []
    for kind, title in TITLES.items():
        entries = sorted((e for key, e in groups.items() if key[0] == kind), key=lambda e: -e["count"])
        if not entries:
            continue
        lines.append(f"{title}:")
        shown = entries if verbose or kind != "sync" else entries[:OUTSIDE_SHOWN]
        for e in shown:
            f = e["finding"]
            names = sorted(e["runs"])
            runs_text = ", ".join(names) if verbose or len(names) <= 3 else (
                f"{len(names)} runs, e.g. {', '.join(names[:3])}")
            steps = sorted(s for s in e["steps"] if s)
            forwards = ", ".join(sorted(k for k in e["forwards"] if k))
            extra = (f"; steps {steps}" if steps else "") + (f"; in {forwards}" if forwards else "")
            lines += [f"  {e['count']:>6}x {f.op}: {f.detail}", f"          at {f.where}",
                      f"          runs: {runs_text}{extra}"]
        if len(shown) < len(entries):
            rest = sum(e["count"] for e in entries[len(shown):])
            lines.append(f"  ... {len(entries) - len(shown)} more places, {rest} syncs (--verbose lists them)")
    failures = [r for r in runs if r.failed]
    if failures:
        lines.append("failed runs:")
        lines += [f"  {r.mode}/{r.label}: {r.outcome}" for r in failures]
    notes = sorted({n for r in runs for n in r.notes if "memory plan" not in n})
    if notes:
        lines.append("warnings the pack logged:")
        lines += [f"  {n}" for n in notes]
    if verbose:
        plans = sorted({f"{r.mode}: {n}" for r in runs for n in r.notes if "memory plan" in n})
        lines += ["memory plans:"] + [f"  {p}" for p in plans]
        launches = [f"{r.mode}/{r.label}: {r.triton_launches}" for r in runs if r.fmt.endswith("-triton")]
        if launches:
            lines += ["Triton kernel launches (stand-in):", "  " + ", ".join(launches)]
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="modes:\n" + "\n".join(f"  {k:<8} {v}" for k, v in MODE_HELP.items()))
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, from " + ", ".join(MODES))
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help="comma-separated, from " + ", ".join(FORMATS + EXTRA_FORMATS))
    parser.add_argument("--lora", choices=("both", "with", "without"), default="both")
    parser.add_argument("--capability", default="8.9", help="the fake GPU's SM version (8.9 and up: native fp8)")
    parser.add_argument("--free-gb", type=float, default=24.0, help="free memory the fake GPU reports")
    parser.add_argument("--text-layers", default=",".join(map(str, KLEIN_LAYERS)),
                        help="the text encoder layers klein reads (fewer, lower ones: faster runs)")
    parser.add_argument("--workdir", type=Path, help="keep the model files here (reused by later runs)")
    parser.add_argument("--verbose", action="store_true", help="every run and place of every finding, and plans")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    formats = [f for f in args.formats.split(",") if f]
    for values, known, what in ((modes, MODES, "mode"), (formats, FORMATS + EXTRA_FORMATS, "format")):
        unknown = [v for v in values if v not in known]
        if unknown:
            parser.error(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    loras = {"both": (False, True), "with": (True,), "without": (False,)}[args.lora]
    capability = tuple(int(p) for p in args.capability.split("."))
    text_layers = tuple(int(p) for p in args.text_layers.split(","))
    logging.basicConfig(level=logging.ERROR)
    start = time.perf_counter()
    runs = dry_run(args.workdir, modes, formats, loras, capability, args.free_gb, text_layers,
                   progress=lambda r: print(f"  {r.mode}/{r.label}: {r.outcome} ({r.seconds:.1f} s)", file=sys.stderr))
    print("\n".join(table(runs)))
    print()
    print("\n".join(findings_report(runs, args.verbose)))
    t = totals(runs)
    print(f"\n{t['failed']} failed runs, {t['dtypes']} ops in an unplanned dtype, "
          f"{t['cpu_created']} tensors created on the CPU and {t['cpu_computed']} ops "
          f"computed on the CPU inside forwards, {t['other_syncs']} host syncs outside the loop; "
          f"{time.perf_counter() - start:.0f} s")
    print(summary_line(runs))
    return 1 if t["failed"] or t["mismatches"] or t["cpu_created"] or t["dtypes"] or t["loop_syncs"] else 0


if __name__ == "__main__":
    sys.exit(main())
