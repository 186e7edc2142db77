"""Bad input to the transformer loader: each case gets a clear error naming the file and the problem."""

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

import klein_nodes as kn
from klein_nodes.testing import TINY_TRANSFORMER, transformer_state_dict, write_transformer


@pytest.fixture(scope="module")
def state():
    return transformer_state_dict(TINY_TRANSFORMER)


@pytest.fixture()
def good_file(tmp_path, state):
    path = tmp_path / "flux-2-klein-4b.safetensors"
    save_file(state, str(path))
    return path


def rewrite_header(path, edit):
    """Apply `edit` to the parsed header and write it back, keeping the data bytes."""
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + length :])


def expect_error(path, error, *fragments):
    with pytest.raises(error) as info:
        kn.load_transformer(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_text_file_is_not_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are not weights, just some text that is long enough")
    expect_error(path, kn.CheckpointError, "not a valid safetensors file")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    expect_error(path, kn.CheckpointError, "empty or truncated")


def test_truncated_file(good_file):
    data = good_file.read_bytes()
    good_file.write_bytes(data[: len(data) - 1000])
    expect_error(good_file, kn.CheckpointError, "truncated", "Download it again")


def test_header_lies_about_size(good_file):
    rewrite_header(good_file, lambda h: h["img_in.weight"].update(shape=[64, 129]))
    expect_error(good_file, kn.CheckpointError, "header lies", "img_in.weight")


def test_header_overlapping_offsets(good_file):
    def overlap(header):
        first, second = [k for k in header if k != "__metadata__" and header[k]["shape"] == [64, 64]][:2]
        header[second]["data_offsets"] = header[first]["data_offsets"]

    rewrite_header(good_file, overlap)
    expect_error(good_file, kn.CheckpointError, "overlap")


def test_header_length_starting_with_pickle_byte_is_still_safetensors(tmp_path, state):
    """A header of 0x..80 bytes begins with the byte a pickle begins with; the file must still load."""
    path = tmp_path / "padded.safetensors"
    save_file(state, str(path))

    def pad_to_0x80(header):
        header["__metadata__"] = {"pad": ""}
        base = len(json.dumps(header))
        header["__metadata__"]["pad"] = "x" * ((0x80 - base) % 256)

    rewrite_header(path, pad_to_0x80)
    assert path.read_bytes()[0] == 0x80
    assert kn.load_transformer(path).params == TINY_TRANSFORMER


def test_header_length_beyond_file(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}" + b" " * 30)
    expect_error(path, kn.CheckpointError, "header claims")


def test_unsupported_dtype_in_header(good_file):
    rewrite_header(good_file, lambda h: h["img_in.weight"].update(dtype="F4"))
    expect_error(good_file, kn.CheckpointError, "unsupported dtype 'F4'")


def test_integer_weights_refused(tmp_path, state):
    bad = dict(state)
    bad["img_in.weight"] = torch.zeros(state["img_in.weight"].shape, dtype=torch.int8)
    save_file(bad, str(tmp_path / "int.safetensors"))
    expect_error(tmp_path / "int.safetensors", kn.CheckpointError, "img_in.weight", "must be F32/F16/BF16, or fp8")


def test_missing_keys_are_listed(tmp_path, state):
    bad = {k: v for k, v in state.items() if not k.startswith("single_blocks.1.")}
    bad["single_blocks.1.linear1.weight"] = state["single_blocks.1.linear1.weight"]
    save_file(bad, str(tmp_path / "missing.safetensors"))
    expect_error(tmp_path / "missing.safetensors", kn.CheckpointError, "missing", "single_blocks.1.linear2.weight")


def test_unexpected_keys_are_listed(tmp_path, state):
    save_file({**state, "img_in.bias": torch.zeros(64)}, str(tmp_path / "extra.safetensors"))
    expect_error(tmp_path / "extra.safetensors", kn.CheckpointError, "unexpected", "img_in.bias")


def test_wrong_shapes_are_listed(tmp_path, state):
    bad = {**state, "double_blocks.1.txt_mlp.2.weight": torch.zeros(64, 100)}
    save_file(bad, str(tmp_path / "shape.safetensors"))
    expect_error(tmp_path / "shape.safetensors", kn.CheckpointError, "wrong shape", "double_blocks.1.txt_mlp.2.weight")


def write_keys(path, shapes):
    save_file({k: torch.zeros(s) for k, s in shapes.items()}, str(path))
    return path


QWEN3 = {
    "model.embed_tokens.weight": (32, 16),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.layers.0.post_attention_layernorm.weight": (16,),
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.self_attn.q_norm.weight": (8,),
    "model.layers.0.self_attn.k_norm.weight": (8,),
    "model.norm.weight": (16,),
}
FLUX2_VAE = {
    "encoder.conv_in.weight": (8, 3, 3, 3),
    "decoder.conv_in.weight": (8, 32, 3, 3),
    "bn.running_mean": (128,),
    "bn.running_var": (128,),
}
FLUX1 = {
    "img_in.weight": (64, 64),
    "txt_in.weight": (64, 4096),
    "double_blocks.0.img_mod.lin.weight": (384, 64),
    "double_blocks.0.img_attn.norm.key_norm.scale": (32,),
}
SD_UNET = {"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
           "first_stage_model.decoder.conv_in.weight": (8, 4, 3, 3)}


@pytest.mark.parametrize("keys,fragments", [
    (QWEN3, ["Qwen3", "text encoder slot"]),
    (FLUX2_VAE, ["FLUX.2 VAE", "VAE slot"]),
    (FLUX1, ["FLUX.1 transformer"]),
    (SD_UNET, ["Stable Diffusion"]),
])
def test_other_models_are_named(tmp_path, keys, fragments):
    path = write_keys(tmp_path / "other.safetensors", keys)
    expect_error(path, kn.WrongModelError, "not a FLUX.2 klein transformer", *fragments)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_suffixes_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"anything")
    expect_error(path, kn.CheckpointError, "pickle", "refused")


class Payload:
    """Unpickling this would create a marker file: proof that nothing was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_disguised_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "flux-2-klein-4b.safetensors"
    path.write_bytes(pickle.dumps(Payload(str(marker))))
    expect_error(path, kn.CheckpointError, "pickle")
    assert not marker.exists()


def test_missing_path(tmp_path):
    expect_error(tmp_path / "nope.safetensors", kn.CheckpointError, "no such file")


def test_diffusers_folder_with_missing_shard(tmp_path):
    folder, _ = write_transformer(tmp_path / "transformer", layout="diffusers")
    shard = sorted(folder.glob("*-of-*.safetensors"))[0]
    os.remove(shard)
    expect_error(folder, kn.CheckpointError, "missing", shard.name)


def test_folder_without_weights(tmp_path):
    (tmp_path / "transformer").mkdir()
    expect_error(tmp_path, kn.CheckpointError, "no diffusion_pytorch_model.safetensors")


def test_header_length_a_few_bytes_short_is_refused(good_file):
    """A length that cuts only the header's padding still parses; every tensor would then be read shifted."""
    raw = good_file.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = raw[8: 8 + length]
    padded = header.rstrip() + b" " * 7
    good_file.write_bytes(struct.pack("<Q", len(padded) - 5) + padded + raw[8 + length:])
    expect_error(good_file, kn.CheckpointError, "its tensors end 5 bytes before the file does")


def test_appended_bytes_are_refused(good_file):
    good_file.write_bytes(good_file.read_bytes() + b"\0" * 16)
    expect_error(good_file, kn.CheckpointError, "its tensors end 16 bytes before the file does")


@pytest.mark.parametrize("edit,fragment", [
    (lambda h: h.update(__metadata__=["not", "a", "map"]), "__metadata__ must map names to strings"),
    (lambda h: h.update(__metadata__={"_quantization_metadata": {"layers": {}}}), "__metadata__ must map names"),
    (lambda h: h["img_in.weight"].update(dtype=["F32"]), "unsupported dtype ['F32']"),
    (lambda h: h["img_in.weight"].update(shape="128x64"), "malformed shape '128x64'"),
])
def test_header_fields_of_the_wrong_type_are_refused(good_file, edit, fragment):
    rewrite_header(good_file, edit)
    expect_error(good_file, kn.CheckpointError, fragment)


def test_deeply_nested_header_is_refused(tmp_path):
    nested = b"[" * 100_000 + b"]" * 100_000
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(nested)) + nested)
    expect_error(path, kn.CheckpointError, "nests JSON too deeply")


@pytest.mark.parametrize("name,tensor,fragment", [
    ("img_in.weight", torch.zeros(0, 128), "'img_in.weight' has shape (0, 128); a FLUX.2 transformer needs a 2-D"),
    ("double_blocks.0.img_attn.norm.query_norm.scale", torch.tensor(1.0), "query_norm.scale' has shape ()"),
    ("txt_in.weight", torch.zeros(64, 96, 1), "'txt_in.weight' has shape (64, 96, 1)"),
])
def test_config_tensors_of_the_wrong_rank_or_empty_are_refused(tmp_path, state, name, tensor, fragment):
    save_file({**state, name: tensor}, str(tmp_path / "odd.safetensors"))
    expect_error(tmp_path / "odd.safetensors", kn.CheckpointError, fragment, "no empty dimension")
