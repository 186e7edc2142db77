"""GGUF transformers and Qwen3 encoders load with weights kept packed and match their dequantized twins."""

import dataclasses
import time
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import klein_nodes as kn
from klein_nodes.models.transformer import Flux2Params
from klein_nodes.quant.linear import QuantizedEmbedding, QuantizedLinear
from klein_nodes.loaders.gguf import hf_to_llama
from klein_nodes.testing import (TINY_QWEN3, qwen3_config, qwen3_state_dict, transformer_state_dict, write_gguf,
                                 write_tokenizer)
from helpers import sample_forward

gguf = pytest.importorskip("gguf")
# rows of 256 so every K-quant fits; 2 heads of 128 as in klein; 14 block linears, one per type in CYCLE
PARAMS = Flux2Params(in_channels=128, out_channels=128, context_in_dim=96, hidden_size=256, num_heads=2, depth=1,
                     depth_single_blocks=3, mlp_hidden_dim=512, axes_dim=(32, 32, 32, 32))
CYCLE = ["Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_1", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS", "Q4_1", "Q5_0", "MXFP4",
         "NVFP4"]


def transformer_types(name, tensor, counter=iter(range(10**6))):
    """Norms F32, the small/sensitive matrices BF16 (as published files), every other linear a rotating GGML type."""
    if tensor.ndim == 1:
        return "F32"
    if name.startswith(("img_in", "txt_in", "time_in", "final_layer")) or "modulation" in name:
        return "BF16"
    return CYCLE[next(counter) % len(CYCLE)]


@pytest.mark.parametrize("prefix,arch", [("", "flux"), ("model.diffusion_model.", "flux")])
def test_transformer_gguf_matches_its_float_twin(tmp_path, prefix, arch):
    state = transformer_state_dict(PARAMS, seed=4)
    twin = write_gguf(tmp_path / "klein.gguf", state, transformer_types, arch, rename=lambda n: prefix + n)
    save_file(twin, str(tmp_path / "twin.safetensors"))
    quantized = kn.load_transformer(tmp_path / "klein.gguf", dtype=torch.float32)
    reference = kn.load_transformer(tmp_path / "twin.safetensors")
    used = {m.qtype for m in quantized.modules() if isinstance(m, QuantizedLinear)}
    assert used == set(CYCLE)
    assert "GGUF" in quantized.description
    assert (sample_forward(quantized, 3, 4, 7, 0.6) - sample_forward(reference, 3, 4, 7, 0.6)).abs().max() <= 1e-5
    packed = sum(m.packed.numel() for m in quantized.modules() if isinstance(m, QuantizedLinear))
    assert packed < sum(v.numel() for k, v in state.items() if v.ndim == 2) * 0.6  # stayed packed (≤ ~4.5 bits here)


def test_sd_cpp_file_without_architecture(tmp_path):
    """stable-diffusion.cpp writes no general.architecture: the keys decide."""
    state = transformer_state_dict(PARAMS, seed=5)
    write_gguf(tmp_path / "sdcpp.gguf", state, lambda n, t: "F32" if t.ndim == 1 else "Q8_0", "")
    assert kn.load_transformer(tmp_path / "sdcpp.gguf", dtype=torch.float32).params == PARAMS


def test_bf16_compute_and_memory(tmp_path):
    state = transformer_state_dict(PARAMS, seed=6)
    write_gguf(tmp_path / "klein.gguf", state, lambda n, t: "F32" if t.ndim == 1 else "Q4_0", "flux")
    model = kn.load_transformer(tmp_path / "klein.gguf")
    assert model.dtype == torch.bfloat16
    out = sample_forward(model, 3, 4, 7, 0.6)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_wrong_arch_and_unsupported_type(tmp_path):
    state = transformer_state_dict(PARAMS, seed=7)
    write_gguf(tmp_path / "qwen.gguf", {"x.weight": torch.zeros(4, 32)}, lambda n, t: "Q8_0", "qwen3")
    with pytest.raises(kn.WrongModelError, match="'qwen3' model, not a FLUX.2 klein transformer"):
        kn.load_transformer(tmp_path / "qwen.gguf")
    path = tmp_path / "odd.gguf"
    write_gguf(path, state, lambda n, t: "F32" if t.ndim == 1 else "Q8_0", "flux")
    data = bytearray(path.read_bytes())
    reader = gguf.GGUFReader(str(path))
    target = next(t for t in reader.tensors if t.name == "single_blocks.0.linear1.weight")
    # patch the tensor's type field in its info record to IQ2_XXS (a type we do not run)
    info_offset = target.field.offset + sum(p.nbytes for p in target.field.parts[:-2])
    data[info_offset: info_offset + 4] = np.uint32(gguf.GGMLQuantizationType.IQ2_XXS).tobytes()
    (tmp_path / "iq2.gguf").write_bytes(bytes(data))
    with pytest.raises(kn.KleinError, match="IQ2_XXS is not supported"):
        kn.load_transformer(tmp_path / "iq2.gguf")
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:5000])
    with pytest.raises(kn.CheckpointError, match="not a valid GGUF file: tensor '.*' .* past the end of the file "
                                                 r"\(5000 bytes\); it may be truncated"):
        kn.load_transformer(tmp_path / "cut.gguf")


def write_qwen_gguf(path, tokenizer_dir, params=TINY_QWEN3):
    import json

    state = qwen3_state_dict(params, seed=8)
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    tokens = [None] * params.vocab_size  # padded to the embedding rows, as Qwen's GGUF files are
    for token, index in vocab.items():
        tokens[index] = token
    tokens = [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)]
    specials = {i for i in range(151643, 151669)}
    merges = [line for line in (tokenizer_dir / "merges.txt").read_text().splitlines()
              if line and not line.startswith("#")]
    metadata = {"block_count": params.num_layers, "context_length": 4096, "embedding_length": params.hidden_size,
                "feed_forward_length": params.intermediate_size, "head_count": params.num_heads,
                "head_count_kv": params.num_kv_heads, "key_length": params.head_dim, "value_length": params.head_dim,
                "rope_freq_base": params.rope_theta, "layer_norm_rms_eps": params.rms_norm_eps,
                "tokenizer_model": "gpt2", "tokenizer_pre": "qwen2", "token_list": tokens,
                "token_types": [3 if i in specials else 1 for i in range(len(tokens))], "token_merges": merges}

    def types(n, t):
        return "F32" if t.ndim == 1 else ("Q8_0" if "embed" in n else ["Q4_0", "IQ4_NL", "BF16", "Q5_1"][hash(n) % 4])

    return state, write_gguf(path, state, types, "qwen3", rename=hf_to_llama, metadata=metadata)


def test_qwen3_gguf_matches_transformers_reading_the_same_file(tmp_path):
    """transformers' own GGUF reader (its llama.cpp name map, gguf-py dequantization) is the oracle."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF
    tokenizer_dir = write_tokenizer(tmp_path / "tok")
    write_qwen_gguf(tmp_path / "qwen3.gguf", tokenizer_dir)
    ours = kn.load_text_encoder(tmp_path / "qwen3.gguf", tokenizer=tokenizer_dir, dtype=torch.float32, layers=(1, 2, 3))
    assert isinstance(ours.model.embed_tokens, QuantizedEmbedding)
    reference = transformers.Qwen3ForCausalLM.from_pretrained(
        str(tmp_path), gguf_file="qwen3.gguf", config=transformers.Qwen3Config(**qwen3_config(TINY_QWEN3)),
        dtype=torch.float32).eval()
    ids = torch.randint(0, TINY_QWEN3.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.inference_mode():
        expected = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        got = ours.model(ids, mask, (0, 1, 2, 3))
    for layer in range(4):
        assert (got[layer] - expected[layer]).abs().max() <= 1e-5, layer


def test_qwen3_gguf_rebuilds_its_tokenizer(tmp_path):
    tokenizer_dir = write_tokenizer(tmp_path / "tok")
    (tmp_path / "lonely").mkdir()
    write_qwen_gguf(tmp_path / "lonely" / "qwen3.gguf", tokenizer_dir)
    from_files = kn.load_text_encoder(tmp_path / "lonely" / "qwen3.gguf", tokenizer=tokenizer_dir, layers=(1, 2, 3))
    from_metadata = kn.load_text_encoder(tmp_path / "lonely" / "qwen3.gguf", layers=(1, 2, 3))
    for prompt in ("a cat", "the dog\n\n<think> ünï 🐱", ""):
        assert from_metadata.tokenize(prompt, 64) == from_files.tokenize(prompt, 64)


def test_resident_weights_are_the_file_bytes(tmp_path):
    """A quantized model holds about the file's tensor bytes in memory, not the float size."""
    state = transformer_state_dict(PARAMS, seed=9)
    path = tmp_path / "klein-q4.gguf"
    write_gguf(path, state, lambda n, t: "F32" if t.ndim == 1 else ("BF16" if "modulation" in n else "Q4_K"
                                                                    if t.shape[-1] % 256 == 0 else "Q8_0"), "flux")
    model = kn.load_transformer(path, dtype=torch.float32)
    resident = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    file_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)
    bf16_to_f32 = sum(v.numel() * 2 for k, v in state.items() if "modulation" in k)  # BF16 tensors computed in fp32
    assert abs(resident - (file_bytes + bf16_to_f32)) <= 0.01 * file_bytes
    assert resident < 0.45 * sum(v.numel() * 4 for v in state.values())


@pytest.mark.parametrize("fields,fragment", [
    ({"tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": [3]}, "tokenizer.ggml.merges"),
    ({"tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": ["a b c"]}, "tokenizer.ggml.merges"),
    ({"tokenizer.ggml.tokens": "ab", "tokenizer.ggml.merges": ["a b"]}, "tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.token_type": ["x"]},
     "tokenizer.ggml.token_type"),
])
def test_malformed_tokenizer_metadata_is_refused(fields, fragment):
    from klein_nodes.loaders.tokenizer import tokenizer_from_gguf

    file = types.SimpleNamespace(path="q.gguf", field=lambda key, default=None: fields.get(key, default))
    with pytest.raises(kn.CheckpointError, match=f"q.gguf: the tokenizer metadata is malformed .{fragment}."):
        tokenizer_from_gguf(file)


ABC = {"tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}


@pytest.mark.parametrize("fields,fragment", [
    ({**ABC, "tokenizer.ggml.merges": ["a c"]}, "merge 0 ('a c') needs the token 'c', which tokenizer.ggml.tokens"),
    ({**ABC, "tokenizer.ggml.tokens": ["a", "b"]}, "merge 0 ('a b') needs the token 'ab'"),  # was a Rust panic
    ({**ABC, "tokenizer.ggml.merges": ["a "]}, "merge 0 ('a ') needs the token ''"),
    ({**ABC, "tokenizer.ggml.tokens": ["a", "b", "a", "ab"]}, "token 'a' appears twice in tokenizer.ggml.tokens "
                                                            "(ids 0 and 2)"),
    ({**ABC, "tokenizer.ggml.token_type": [1]}, "tokenizer.ggml.token_type holds 1 values for 3 tokens"),
    ({**ABC, "tokenizer.ggml.token_type": [1, 1, 3, 1]}, "tokenizer.ggml.token_type holds 4 values for 3 tokens"),
    ({**ABC, "tokenizer.ggml.token_type": []}, "tokenizer.ggml.token_type holds 0 values for 3 tokens"),
])
def test_inconsistent_tokenizer_metadata_is_refused(fields, fragment):
    """Well-typed metadata the BPE library cannot build (it raised a bare Exception, or panicked) is named."""
    from klein_nodes.loaders.tokenizer import tokenizer_from_gguf

    file = types.SimpleNamespace(path="q.gguf", field=lambda key, default=None: fields.get(key, default))
    with pytest.raises(kn.CheckpointError) as info:
        tokenizer_from_gguf(file)
    message = str(info.value)
    assert message.startswith("q.gguf: the tokenizer metadata is inconsistent: ") and fragment in message
    assert "tokenizer=<folder" in message and "\n" not in message


def write_small_qwen_gguf(path, tokenizer_dir, edit=lambda tokens, merges: None):
    """A Qwen3 GGUF whose embedding has one row per token of the small test tokenizer (quick to read), with that
    tokenizer in its metadata after `edit(tokens, merges)` changed the lists in place."""
    import json

    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [line for line in (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#")]
    edit(tokens, merges)
    metadata = {"tokenizer_model": "gpt2", "tokenizer_pre": "qwen2", "token_list": tokens,
                "token_types": [3 if token.startswith("<|") else 1 for token in tokens], "token_merges": merges}
    state = qwen3_state_dict(dataclasses.replace(TINY_QWEN3, vocab_size=len(tokens)), seed=8)
    write_gguf(path, state, lambda n, t: "F32" if t.ndim == 1 else "Q8_0", "qwen3", rename=hf_to_llama,
               metadata=metadata)


@pytest.mark.parametrize("edit,fragment", [
    (lambda tokens, merges: tokens.__setitem__(tokens.index("he"), "hx"), "merge 2 ('h e') needs the token 'he'"),
    (lambda tokens, merges: tokens.__setitem__(tokens.index("he"), "a"), "token 'a' appears twice"),
    (lambda tokens, merges: merges.append("Ġ zz"), "merge 12 ('Ġ zz') needs the token 'zz'"),
])
def test_gguf_with_an_edited_tokenizer_is_refused_before_its_weights_load(tmp_path, monkeypatch, edit, fragment):
    from klein_nodes.loaders.gguf import GGUFFile

    tokenizer_dir = write_tokenizer(tmp_path / "tok")
    (tmp_path / "lonely").mkdir()  # no tokenizer files beside it: the GGUF's own metadata is used
    path = tmp_path / "lonely" / "qwen3.gguf"
    write_small_qwen_gguf(path, tokenizer_dir, edit)

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the tokenizer was checked")

    monkeypatch.setattr(GGUFFile, "load", no_loading)
    monkeypatch.delenv("KLEIN_TOKENIZER", raising=False)
    began = time.monotonic()
    with pytest.raises(kn.CheckpointError) as info:
        kn.load_text_encoder(path, layers=(1, 2, 3))
    assert time.monotonic() - began < 5
    message = str(info.value)
    assert message.startswith(f"{path}: the tokenizer metadata is inconsistent: ") and fragment in message


def test_rope_base_of_the_wrong_type_is_refused(tmp_path, monkeypatch):
    from klein_nodes.loaders.gguf import GGUFFile

    tokenizer_dir = write_tokenizer(tmp_path / "tok")
    write_qwen_gguf(tmp_path / "qwen3.gguf", tokenizer_dir)
    field = GGUFFile.field
    monkeypatch.setattr(GGUFFile, "field", lambda self, key, default=None:
                        "abc" if key == "qwen3.rope.freq_base" else field(self, key, default))
    with pytest.raises(kn.CheckpointError, match="qwen3.rope.freq_base is 'abc', not a positive number"):
        kn.load_text_encoder(tmp_path / "qwen3.gguf", tokenizer=tokenizer_dir, layers=(1, 2, 3))


def test_misnamed_files_are_called_what_they_are(tmp_path):
    (tmp_path / "notes.gguf").write_text("these are my notes, not a model")
    with pytest.raises(kn.CheckpointError, match="named .gguf but it does not start with the GGUF magic"):
        kn.load_transformer(tmp_path / "notes.gguf")
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x80" + bytes(range(40)))
    with pytest.raises(kn.CheckpointError) as info:
        kn.load_transformer(tmp_path / "corrupt.safetensors")
    assert "pickle" not in str(info.value)
