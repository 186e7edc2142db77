"""Handing a model's file-mapped weight pages back to the OS after its turn on the CPU.

Weights load as views of memory-mapped files (safetensors, GGUF); once read, their pages count in the process's
RSS until the mapping goes. `release(module)` drops the pages of its tensors that are still the file's own with
madvise(MADV_DONTNEED): RSS falls, the data stays in the OS's page cache, and the next use faults the pages back in
(from memory while the cache keeps them, else from the file). /proc/self/pagemap says which pages those are: a page
written in place (copy-on-write made it private), swapped out, or of ordinary memory is never touched, so no value
can change. Linux only; elsewhere nothing is released.

Released block by block as a model runs (`released_as_it_runs`), a model's resident weights are one block's at a
time; each forward then faults the blocks back in from the page cache (minor faults, a fraction of a second per GB)."""

import ctypes
import ctypes.util
import functools
import mmap
import os
from contextlib import contextmanager

import numpy as np

PAGE = mmap.PAGESIZE
MADV_DONTNEED = 4
PRESENT, SWAPPED, FILE_OR_SHARED = np.uint64(1 << 63), np.uint64(1 << 62), np.uint64(1 << 61)


def release(module) -> int:
    """Bytes of `module`'s CPU tensors handed back (see above); 0 where the OS offers no way to."""
    ranges = sorted({(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                     for t in [*module.parameters(), *module.buffers()]
                     if t.device.type == "cpu" and t.numel() and t.is_contiguous()})
    if not ranges:
        return 0
    try:
        libc = c_library()
        pagemap = os.open("/proc/self/pagemap", os.O_RDONLY)
    except (OSError, AttributeError, TypeError):
        return 0
    try:
        return sum(release_range(libc, pagemap, start, end) for start, end in ranges)
    finally:
        os.close(pagemap)


@functools.cache
def c_library():
    """The C library (loaded once: `release` runs after every block of every forward)."""
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def release_range(libc, pagemap, start, end):
    """Release the whole pages inside [start, end) that are the file's own or absent; bytes released."""
    first, last = -(-start // PAGE), end // PAGE  # pages wholly inside: a neighbour's page is never touched
    if last <= first:
        return 0
    entries = np.frombuffer(os.pread(pagemap, (last - first) * 8, first * 8), dtype=np.uint64)
    if entries.size != last - first:
        return 0
    private = ((entries & PRESENT) != 0) & ((entries & FILE_OR_SHARED) == 0)
    keep = private | ((entries & SWAPPED) != 0)
    mapped = ((entries & PRESENT) != 0) & ~keep  # the pages that count in RSS and may go
    if not mapped.any():
        return 0
    # runs of pages that may go (absent ones may go too: nothing to drop there), split at the pages to keep
    edges = np.flatnonzero(np.diff(np.concatenate(([1], keep.view(np.int8), [1]))))
    released = 0
    for run_start, run_end in zip(edges[::2], edges[1::2]):
        if libc.madvise(ctypes.c_void_p((first + int(run_start)) * PAGE),
                        ctypes.c_size_t((int(run_end) - int(run_start)) * PAGE), MADV_DONTNEED) == 0:
            released += int(mapped[run_start:run_end].sum()) * PAGE
    return released


@contextmanager
def released_as_it_runs(model, blocks):
    """While `model` computes, each of `blocks` hands its pages back as soon as its forward returns (a block runs
    once per forward: the next forward faults them back in); afterwards the whole model does."""
    def finished(block, args, out):
        release(block)  # returns None: the block's output stands

    hooks = [block.register_forward_hook(finished) for block in blocks]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        release(model)
