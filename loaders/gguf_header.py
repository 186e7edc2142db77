"""A bounded walk over a GGUF header before gguf-py reads it.

gguf-py trusts every count and length in a file: one scalar turned into an ARRAY with a huge element count makes it
allocate until memory runs out. This walk reads the same structure with struct, checks every count, length, type
and tensor extent against the file's size and plausible limits, and reads no more than the header itself, so a
lying file is refused in milliseconds with a message naming what lies.
"""

import mmap
import os
import struct

from ..errors import CheckpointError

SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
STRING, ARRAY, UINT32 = 8, 9, 4
MAX_KEYS = MAX_TENSORS = 1 << 16  # real files: < 100 keys, ~500 tensors
MAX_STRING = 1 << 24
MAX_STRING_ARRAY = 1 << 22  # a tokenizer's vocabulary or merges: ~150,000
MAX_DIMS = 4  # GGML_MAX_DIMS


class HeaderWalk:
    def __init__(self, path, data):
        self.path, self.data, self.pos, self.order = path, data, 0, "<"

    def fail(self, what, where=True):
        at = f" (header byte {self.pos})" if where else ""
        raise CheckpointError(f"{self.path}: not a valid GGUF file: {what}{at}; it may be truncated, damaged or not "
                              "a GGUF file at all.")

    def take(self, size):
        if size > len(self.data) - self.pos:
            self.fail(f"needs {size} more bytes but the file ends")
        self.pos += size
        return self.pos - size

    def number(self, fmt):
        return struct.unpack_from(self.order + fmt, self.data, self.take(struct.calcsize(fmt)))[0]

    def string(self, what):
        length = self.number("Q")
        if length > MAX_STRING:
            self.fail(f"{what} claims {length} bytes")
        start = self.take(length)
        return bytes(self.data[start: start + length])

    def value(self, kind, key, depth=0):
        if kind in SCALAR_SIZES:
            self.take(SCALAR_SIZES[kind])
        elif kind == STRING:
            self.string(f"the string value of '{key}'")
        elif kind == ARRAY and depth == 0:
            item, count = self.number("I"), self.number("Q")
            if item in SCALAR_SIZES:
                if count > (len(self.data) - self.pos) // SCALAR_SIZES[item]:
                    self.fail(f"'{key}' claims {count} elements, more than the file holds")
                self.take(count * SCALAR_SIZES[item])
            elif item == STRING and count <= min(MAX_STRING_ARRAY, (len(self.data) - self.pos) // 8):
                for _ in range(count):
                    self.string(f"an element of '{key}'")
            else:
                self.fail(f"'{key}' is an array of type {item} with {count} elements")
        else:
            self.fail(f"'{key}' has value type {kind}")


def check_gguf_header(path):
    """Refuse a GGUF file whose header cannot be read within its own size (see the module docstring)."""
    from gguf.constants import GGML_QUANT_SIZES

    if os.path.getsize(path) < 24:
        raise CheckpointError(f"{path}: not a valid GGUF file: {os.path.getsize(path)} bytes, too short for a header.")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        walk = HeaderWalk(path, data)
        if data[:4] != b"GGUF":
            walk.fail("no GGUF magic")
        walk.take(4)
        version = walk.number("I")
        if version & 0xFFFF == 0:  # written big-endian
            walk.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in (2, 3):
            walk.fail(f"version {version} (GGUF 2 and 3 are read)")
        tensors, keys = walk.number("Q"), walk.number("Q")
        if tensors > MAX_TENSORS or keys > MAX_KEYS:
            walk.fail(f"it claims {tensors} tensors and {keys} metadata keys")
        alignment = 32
        for _ in range(keys):
            key = walk.string("a metadata key").decode("utf-8", "replace")
            kind = walk.number("I")
            start = walk.pos
            walk.value(kind, key)
            if key == "general.alignment":
                alignment = struct.unpack_from(walk.order + "I", data, start)[0] if kind == UINT32 else 0
                if alignment == 0 or alignment & (alignment - 1):
                    walk.fail(f"general.alignment is {alignment}, not a power of two")
        infos = []
        for _ in range(tensors):
            name = walk.string("a tensor name").decode("utf-8", "replace")
            dims = walk.number("I")
            if not 1 <= dims <= MAX_DIMS:
                walk.fail(f"tensor '{name}' has {dims} dimensions")
            shape = [walk.number("Q") for _ in range(dims)]
            qtype, offset = walk.number("I"), walk.number("Q")
            if qtype not in GGML_QUANT_SIZES:
                walk.fail(f"tensor '{name}' has GGML type {qtype}, which this gguf package does not know")
            infos.append((name, shape, qtype, offset))
        data_start = -(-walk.pos // alignment) * alignment
        for name, shape, qtype, offset in infos:
            block, size = GGML_QUANT_SIZES[qtype]
            elements = 1
            for d in shape:
                elements *= d
            if shape[0] % block:
                walk.fail(f"tensor '{name}' rows of {shape[0]} are not whole blocks of {block}", where=False)
            end = data_start + offset + elements // block * size
            if end > len(data):
                walk.fail(f"tensor '{name}' {shape} ends at byte {end}, past the end of the file ({len(data)} bytes)",
                          where=False)
