"""Lying GGUF headers are refused before gguf-py reads them: in bounded time, with the pack's own error. Shapes
that build no runnable model (or that a packed type cannot hold) are refused before the weights load, and the
model detection takes any shapes at all."""

import random
import struct
import time

import pytest
import torch
from safetensors.torch import save_file

import klein_nodes as kn
from klein_nodes.loaders.detect import ModelKind, identify
from klein_nodes.loaders.gguf import GGUFFile
from klein_nodes.loaders.inventory import inventory
from klein_nodes.testing import TINY_TRANSFORMER, transformer_state_dict, write_gguf
from helpers import refused_by_name, sample_forward

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


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """The tiny transformer with its matrices in BF16, so a header may claim any width (no GGML blocks to fill)."""
    path = tmp_path_factory.mktemp("gguf") / "klein-bf16.gguf"
    write_gguf(path, transformer_state_dict(TINY_TRANSFORMER), lambda n, t: "F32" if t.ndim == 1 else "BF16", "flux")
    return path


def with_dimension(path, tensor, axis, value, out):
    """A copy of `path` whose header gives `tensor` (torch axis `axis`) the size `value`; its data stays as it was."""
    data = bytearray(path.read_bytes())
    info = next(t for t in gguf.GGUFReader(str(path)).tensors if t.name == tensor)
    dims_at = info.field.offset + info.field.parts[0].nbytes + info.field.parts[1].nbytes + 4
    ggml_axis = len(info.shape) - 1 - axis  # GGUF lists the row (torch's last axis) first
    data[dims_at + 8 * ggml_axis: dims_at + 8 * ggml_axis + 8] = struct.pack("<Q", value)
    out.write_bytes(bytes(data))
    return out


def refused_before_loading(path, monkeypatch, *fragments):
    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the shapes were checked")

    monkeypatch.setattr(GGUFFile, "load", no_loading)
    return refused_by_name(path, *fragments)


@pytest.mark.parametrize("value", [255, 257, 1])
def test_an_odd_timestep_width_is_refused(wide, tmp_path, monkeypatch, value):
    """time_in of an odd width builds a model whose timestep embedding (cos and sin halves) cannot feed it: it used
    to load and fail in the first step's matmul."""
    path = with_dimension(wide, "time_in.in_layer.weight", 1, value, tmp_path / "odd.gguf")
    refused_before_loading(path, monkeypatch, "'time_in.in_layer.weight' has shape", f"its {value} inputs must be "
                           "an even number")


def test_latent_channels_in_and_out_must_agree(wide, tmp_path, monkeypatch):
    path = with_dimension(wide, "final_layer.linear.weight", 0, 64, tmp_path / "out64.gguf")
    refused_before_loading(path, monkeypatch, "'img_in.weight' takes 128 latent channels but "
                           "'final_layer.linear.weight' gives 64")


SHAPE_TARGETS = ["img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "time_in.out_layer.weight",
                 "double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_mlp.2.weight",
                 "double_blocks.0.img_attn.norm.query_norm.scale", "single_blocks.1.linear1.weight",
                 "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"]


@pytest.mark.parametrize("tensor", SHAPE_TARGETS)
def test_shape_fields_never_reach_the_forward(wide, tmp_path, tensor):
    """Every size a header may give a tensor: the file is refused with the pack's error, or the model it builds runs."""
    shape = next(t for t in gguf.GGUFReader(str(wide)).tensors if t.name == tensor).shape.tolist()[::-1]
    outcomes = {}
    for axis, size in enumerate(shape):
        for value in sorted({0, 1, 2, 31, size // 2, size - 1, size + 1, 2 * size} - {size}):
            path = with_dimension(wide, tensor, axis, value, tmp_path / f"{axis}-{value}.gguf")
            try:
                model = kn.load_transformer(path, dtype=torch.float32)
            except kn.KleinError as e:
                assert str(e).startswith(f"{path}: "), e
                outcomes["refused"] = outcomes.get("refused", 0) + 1
                continue
            assert torch.isfinite(sample_forward(model)).all()
            outcomes["ran"] = outcomes.get("ran", 0) + 1
    assert outcomes.get("refused", 0) >= len(shape) * 4, outcomes


def test_a_quantized_norm_is_refused_naming_the_file(tmp_path, monkeypatch):
    """Only linear and embedding layers run GGML-packed; a Q8_0 norm scale was refused without the file's name."""
    path = tmp_path / "q8-norm.gguf"
    write_gguf(path, transformer_state_dict(TINY_TRANSFORMER), lambda n, t: "Q8_0" if n.endswith("query_norm.scale")
               or t.ndim == 2 else "F32", "flux")
    refused_before_loading(path, monkeypatch, "tensor 'double_blocks.0.img_attn.norm.query_norm.scale' is Q8_0 of "
                           "shape (32,); packed GGML weights must be non-empty matrices with rows of whole 32-value "
                           "blocks")


def test_packed_bytes_must_fill_the_block_layout(good):
    """A packed tensor's bytes against its GGML type's blocks (34 bytes per 32 values for Q8_0), before any load."""
    file = GGUFFile(good)
    name = "double_blocks.0.img_mlp.0.weight"
    qtype, shape, data = file.tensors[name]
    assert (qtype, shape) == ("Q8_0", (384, 64))
    file.tensors[name] = (qtype, shape, data.reshape(-1)[:-34])
    with pytest.raises(kn.CheckpointError, match=rf"{good}: tensor '{name}' holds 26078 bytes, not the 26112 of a "
                                                 r"\(384, 64\) Q8_0 tensor \(32 values in 34 bytes per block\)"):
        file.load({name: name}, None, "cpu")
    file.tensors[name] = (qtype, (384, 48), data)
    with pytest.raises(kn.CheckpointError, match="rows of whole 32-value blocks"):
        file.load({name: name}, None, "cpu")


@pytest.mark.parametrize("shapes", [
    {}, {"txt_in.weight": (), "double_stream_modulation_img.lin.weight": ()},
    {"context_embedder.weight": None, "double_stream_modulation_img.linear.weight": "x"},
    {"model.layers.0.input_layernorm.weight": (), "model.layers.0.self_attn.q_norm.weight": (1,)},
    {"model.embed_tokens.weight": [float("nan")]}, {"decoder.conv_in.weight": (3,)},
    {"first_stage_model.decoder.conv_in.weight": ()}, {"decoder.conv_in.weight": (2**70, 2**70)},
    {1: (2,), None: (), ("a",): 1, "shared.weight": ()},
])
def test_identify_is_total(shapes):
    """Any {name: shape}, however damaged, is classified: identify never raises (it raised IndexError on 0-D and
    1-D shapes where it read a width)."""
    assert isinstance(identify(shapes), ModelKind)


def test_empty_shapes_are_named_not_indexed(tmp_path):
    """A safetensors transformer whose txt_in.weight is 0-D: refused by name; `inspect` still describes it."""
    state = transformer_state_dict(TINY_TRANSFORMER)
    state["txt_in.weight"] = torch.tensor(1.0)
    save_file(state, str(tmp_path / "flat.safetensors"))
    with pytest.raises(kn.CheckpointError, match=r"flat.safetensors: 'txt_in.weight' has shape \(\); a FLUX.2 "
                                                 "transformer needs a 2-D tensor there"):
        kn.load_transformer(tmp_path / "flat.safetensors")
    assert inventory(tmp_path / "flat.safetensors").kind.kind == "transformer"
    save_file({"decoder.conv_in.weight": torch.ones(3), "lora_unet_x.lora_down.weight": torch.tensor(1.0)},
              str(tmp_path / "odd.safetensors"))
    inventory(tmp_path / "odd.safetensors").lines()
