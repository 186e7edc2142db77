"""Lying GGUF headers are refused before gguf-py reads them: in bounded time, with the pack's own error."""

import random
import struct
import time

import pytest

import klein_nodes as kn
from klein_nodes.loaders.inventory import inventory
from klein_nodes.testing import TINY_TRANSFORMER, transformer_state_dict, write_gguf

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "klein.gguf"
    write_gguf(path, transformer_state_dict(TINY_TRANSFORMER), lambda n, t: "F32" if t.ndim == 1 else "Q8_0", "flux",
               metadata={"quantization_version": 2})  # a UINT32 key
    return path


def field_offsets(path, key):
    """(offset of the value-type field, offset of the value) of metadata `key`."""
    field = gguf.GGUFReader(str(path)).fields[key]
    type_at = field.offset + field.parts[0].nbytes + field.parts[1].nbytes
    return type_at, type_at + 4


def refused_quickly(path, match):
    began = time.monotonic()
    for read in (kn.load_transformer, inventory):
        with pytest.raises(kn.CheckpointError, match=match):
            read(path)
    assert time.monotonic() - began < 2


def test_a_scalar_turned_into_a_huge_array_is_refused_at_once(good, tmp_path):
    data = bytearray(good.read_bytes())
    type_at, value_at = field_offsets(good, "general.quantization_version")  # a UINT32
    data[type_at: type_at + 4] = struct.pack("<I", 9)  # ARRAY: the value and what follows now read as type and count
    (tmp_path / "array.gguf").write_bytes(bytes(data))
    refused_quickly(tmp_path / "array.gguf", "not a valid GGUF file: ")


@pytest.mark.parametrize("offset,value,match", [
    (8, 1 << 40, "claims 1099511627776 tensors"),        # tensor count
    (16, 1 << 40, "1099511627776 metadata keys"),       # key count
    (24, 1 << 50, "a metadata key claims 1125899906842624 bytes"),  # the first key's length
])
def test_counts_and_lengths_beyond_the_file_are_refused(good, tmp_path, offset, value, match):
    data = bytearray(good.read_bytes())
    data[offset: offset + 8] = struct.pack("<Q", value)
    (tmp_path / "lie.gguf").write_bytes(bytes(data))
    refused_quickly(tmp_path / "lie.gguf", match)


def test_random_header_mutations_never_escape_as_other_errors(good, tmp_path):
    """Deterministic single-field mutations of the header: each file loads or is refused with KleinError, fast."""
    clean = good.read_bytes()
    header_end = gguf.GGUFReader(str(good)).data_offset
    rng = random.Random(0)
    outcomes = {}
    for case in range(150):
        data = bytearray(clean)
        at = rng.randrange(header_end)
        width = rng.choice((1, 4, 8))
        data[at: at + width] = rng.choice((b"\xff" * width, b"\x00" * width, rng.randbytes(width)))
        path = tmp_path / f"m{case}.gguf"
        path.write_bytes(bytes(data))
        began = time.monotonic()
        try:
            kn.load_transformer(path)
            outcome = "loaded"
        except kn.KleinError as e:
            outcome = type(e).__name__
        assert time.monotonic() - began < 5, f"case {case} (byte {at}) took too long"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        path.unlink()
    assert outcomes.get("CheckpointError", 0) > 50, outcomes
