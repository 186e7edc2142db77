"""A strict, memory-mapped safetensors reader.

Tensors are zero-copy views into a private (copy-on-write) mapping of the file, so a model filled
with them with `load_state_dict(assign=True)` holds one copy of the weights: the file's pages.
Every header field is checked against the file before anything is read, so truncated or hostile
files fail with a message instead of a crash deep inside torch.
"""

import json
import math
import mmap
import os

import torch

from ..errors import CheckpointError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def refuse_pickle(path):
    """Pickle checkpoints can run arbitrary code when loaded; we never unpickle them."""
    raise CheckpointError(
        f"{path}: PyTorch pickle checkpoints (.ckpt/.pt/.pth/.bin) are refused because loading them can "
        "run arbitrary code. Use the .safetensors (or .gguf) release of this model, or convert the file "
        "with a tool you trust."
    )


def sniff_format(path):
    """'safetensors', 'gguf', 'pickle', 'image' or 'unknown', from the first bytes of the file."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"GGUF"):
        return "gguf"
    if len(head) >= 9 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return "safetensors"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8")) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    raw_pickle = len(head) > 1 and head[0] == 0x80 and head[1] in (2, 3, 4, 5)  # PROTO opcode, protocol 2-5
    if head.startswith(b"PK\x03\x04") or raw_pickle:  # torch's zip archive, or a raw pickle
        return "pickle"
    return "unknown"


class SafetensorsFile:
    """One .safetensors file: validated header, lazy zero-copy tensors."""

    def __init__(self, path):
        self.path = str(path)
        size = os.path.getsize(self.path)
        fmt = sniff_format(self.path) if size else "unknown"
        if fmt == "pickle":
            refuse_pickle(self.path)
        if fmt == "gguf":
            raise CheckpointError(f"{self.path}: this is a GGUF file, not safetensors (check its extension).")
        if fmt == "image":
            raise CheckpointError(f"{self.path}: this is an image, not a model file.")
        if fmt != "safetensors" and self.path.lower().endswith(".gguf"):
            raise CheckpointError(f"{self.path}: named .gguf but it does not start with the GGUF magic: "
                                  "not a GGUF file (a damaged download, or another file renamed).")
        if size < 10:
            raise CheckpointError(f"{self.path}: not a safetensors file "
                                  f"({size} bytes; the file is empty or truncated).")
        with open(self.path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{self.path}: not a valid safetensors file: the header claims {header_len} bytes but the file has "
                    f"{size} bytes (truncated download or a different format)."
                )
            raw = f.read(header_len)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a safetensors file: its header is not valid JSON ({e}).") from None
        except RecursionError:
            raise CheckpointError(f"{self.path}: not a safetensors file: its header nests JSON too deeply.") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: not a safetensors file: its header is not a JSON object.")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict) or not all(isinstance(v, str) for v in self.metadata.values()):
            raise CheckpointError(f"{self.path}: malformed safetensors header: __metadata__ must map names to strings.")
        self.data_start = 8 + header_len
        self.data_size = size - self.data_start
        self.entries = {name: self._check_entry(name, entry) for name, entry in header.items()}
        self._check_layout()
        self._buffer = None

    def _check_entry(self, name, entry):
        where = f"{self.path}: tensor '{name}'"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise CheckpointError(f"{where}: malformed header entry {entry!r}.")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{where}: unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)}).")
        ok_ints = lambda xs: isinstance(xs, list) and all(isinstance(v, int) and v >= 0 for v in xs)  # noqa: E731
        if not ok_ints(shape) or not ok_ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            raise CheckpointError(f"{where}: malformed shape {shape!r} or data_offsets {offsets!r}.")
        begin, end = offsets
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != expected:
            raise CheckpointError(
                f"{where}: the header lies: shape {shape} {dtype} needs {expected} bytes but its offsets span "
                f"{end - begin}."
            )
        if end > self.data_size:
            raise CheckpointError(
                f"{where}: needs bytes up to {end} but the file holds only {self.data_size} bytes of data; the file "
                "is truncated (an interrupted download?). Download it again."
            )
        return dtype, tuple(shape), begin, end

    def _check_layout(self):
        """Tensors may not overlap, and the data must end where the last tensor ends, as the safetensors format
        requires: a header length a few bytes off would otherwise shift every tensor by that much."""
        spans = sorted((b, e, n) for n, (_, _, b, e) in self.entries.items() if e > b)
        for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise CheckpointError(f"{self.path}: the header lies: tensors '{n0}' and '{n1}' overlap in the file.")
        end = max((e for _, e, _ in spans), default=0)
        if end != self.data_size:
            raise CheckpointError(
                f"{self.path}: not a valid safetensors file: its tensors end {self.data_size - end} bytes before the "
                f"file does (the header length or an offset is wrong, or data was appended)."
            )

    def keys(self):
        return self.entries.keys()

    def shape(self, name):
        return self.entries[name][1]

    def dtype(self, name):
        return DTYPES[self.entries[name][0]]

    def get(self, name):
        """The tensor as a view into the file mapping (a copy only if the file misaligns it)."""
        dtype_name, shape, begin, end = self.entries[name]
        dtype = DTYPES[dtype_name]
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        if self._buffer is None:
            with open(self.path, "rb") as f:
                self._buffer = torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=torch.uint8)
        raw = self._buffer[self.data_start + begin : self.data_start + end]
        if (self.data_start + begin) % dtype.itemsize:
            raw = raw.clone()
        return raw.view(dtype).reshape(shape)
