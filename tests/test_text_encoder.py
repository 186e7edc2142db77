"""Qwen3 text encoder vs transformers' Qwen3ForCausalLM and diffusers' klein prompt embedding."""

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

import klein_nodes as kn
from klein_nodes.models.text_encoder import KLEIN_TEMPLATE
from klein_nodes.models.transformer import Flux2Params
from klein_nodes.testing import (QWEN3_CHAT_TEMPLATE, TINY_QWEN3, TINY_TRANSFORMER, qwen3_config, write_text_encoder,
                                 write_tokenizer)

transformers = pytest.importorskip("transformers")

SHARED_TOKENIZER = Path(os.environ.get("KLEIN_TEST_TOKENIZER",
                                       Path(__file__).resolve().parents[2] / "shared/data/qwen25_tokenizer"))
needs_real_vocab = pytest.mark.skipif(not (SHARED_TOKENIZER / "vocab.json").is_file(),
                                      reason=f"real Qwen vocabulary not found at {SHARED_TOKENIZER}")
LAYERS = (1, 2, 3)  # the tiny model has 4 layers; klein reads (9, 18, 27) of 36 (HF norms the last one)
PROMPTS = ["a cat on a mat", "", "Ünïcödé — ß, 東京の夜景, emoji 🐱🚀👩‍👩‍👧\nsecond line\n\n\tand a tab",
           "the   dog\r\nsaid \"hi\" (word:1.2) <|im_end|> it's 3.14159"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same random Qwen3 as a ComfyUI single file and a diffusers repo (text_encoder/ + tokenizer/)."""
    root = tmp_path_factory.mktemp("qwen")
    tokenizer = write_tokenizer(root / "repo" / "tokenizer")
    comfy, state = write_text_encoder(root / "qwen_3_4b.safetensors", dtype=torch.float32)
    write_text_encoder(root / "repo" / "text_encoder", layout="hf", dtype=torch.float32)
    reference = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**qwen3_config(TINY_QWEN3))).eval()
    reference.load_state_dict(state, strict=False)
    reference.tie_weights()
    return {"comfy": comfy, "repo": root / "repo", "text_encoder": root / "repo" / "text_encoder",
            "tokenizer": tokenizer, "reference": reference}


def hf_tokenizer(folder):
    tokenizer = transformers.Qwen2Tokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


@pytest.mark.parametrize("layout", ["comfy", "text_encoder", "repo"])
def test_hidden_states_match_transformers(files, layout):
    te = kn.load_text_encoder(files[layout], tokenizer=files["tokenizer"], layers=LAYERS)
    ids = torch.randint(0, TINY_QWEN3.vocab_size, (3, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    mask[2, 17:] = 0
    with torch.inference_mode():
        expected = files["reference"](input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        got = te.model(ids, mask, (0, 1, 2, 3))
    for layer in range(4):
        assert (got[layer] - expected[layer]).abs().max() <= 1e-5, f"layer {layer}"


def diffusers_embeds(files, prompts, tokenizer, max_length):
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline._get_qwen3_prompt_embeds(files["reference"], tokenizer, prompts, dtype=torch.float32,
                                                       max_sequence_length=max_length, hidden_states_layers=LAYERS)


@pytest.mark.parametrize("layout", ["comfy", "repo"])
def test_prompt_embeds_match_diffusers(files, layout):
    te = kn.load_text_encoder(files[layout], tokenizer=files["tokenizer"], layers=LAYERS)
    with torch.inference_mode(), pytest.warns(UserWarning, match="tokens were cut"):  # 64 tokens: truncation too
        expected = diffusers_embeds(files, PROMPTS, hf_tokenizer(files["tokenizer"]), 64)
        got = te.encode(PROMPTS, max_length=64, layers=LAYERS)
    assert got.shape == (len(PROMPTS), 64, 3 * TINY_QWEN3.hidden_size)
    assert (got - expected).abs().max() <= 1e-5


@needs_real_vocab
def test_prompt_embeds_match_diffusers_with_real_vocabulary(files):
    te = kn.load_text_encoder(files["comfy"], tokenizer=SHARED_TOKENIZER, layers=LAYERS)
    with torch.inference_mode():
        expected = diffusers_embeds(files, PROMPTS, hf_tokenizer(SHARED_TOKENIZER), 96)
        got = te.encode(PROMPTS, max_length=96, layers=LAYERS)
    assert (got - expected).abs().max() <= 1e-5


def long_prompt(words=600):
    return " ".join(f"word{i % 37} and more" for i in range(words))


def check_token_ids(te, reference, prompts, max_length):
    for prompt in prompts:
        text = KLEIN_TEMPLATE.format(prompt)
        expected = reference(text, padding="max_length", truncation=True, max_length=max_length)
        ids, mask = te.tokenize(prompt, max_length)
        assert ids == expected["input_ids"], prompt[:30]
        assert mask == expected["attention_mask"]


@needs_real_vocab
def test_token_ids_match_transformers_real_vocabulary(files):
    te = kn.load_text_encoder(files["comfy"], tokenizer=SHARED_TOKENIZER, layers=LAYERS)
    reference = transformers.Qwen2Tokenizer.from_pretrained(str(SHARED_TOKENIZER))
    with pytest.warns(UserWarning, match="tokens were cut"):
        check_token_ids(te, reference, PROMPTS + [long_prompt()], 512)
    ids, _ = te.tokenize("a cat", 512)
    # klein-spec §3.2: <|im_start|> user \n ... <|im_end|> \n <|im_start|> assistant \n <think> \n\n </think> \n\n
    assert ids[:3] == [151644, 872, 198] and ids[5:16] == [151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271,
                                                           151643, 151643]


def test_token_ids_match_transformers(files):
    te = kn.load_text_encoder(files["comfy"], tokenizer=files["tokenizer"], layers=LAYERS)
    with pytest.warns(UserWarning, match="tokens were cut"):
        check_token_ids(te, transformers.Qwen2Tokenizer.from_pretrained(str(files["tokenizer"])),
                        PROMPTS + [long_prompt()], 512)


def test_truncation_warning_counts_cut_tokens(files):
    te = kn.load_text_encoder(files["comfy"], tokenizer=files["tokenizer"], layers=LAYERS)
    full = len(te.tokenizer.encode(KLEIN_TEMPLATE.format(long_prompt(200))).ids)
    with pytest.warns(UserWarning, match=f"the last {full - 512} tokens were cut"):
        ids, mask = te.tokenize(long_prompt(200), 512)
    assert len(ids) == 512 and all(mask)


def test_keeping_every_token_as_comfyui_does(files):
    """max_length=None: no prompt is cut and every prompt is padded to 512 or to the longest prompt's length
    (ComfyUI's Qwen3 tokenizer: min_length 512, no maximum); equal to diffusers' embeddings at that length."""
    te = kn.load_text_encoder(files["comfy"], tokenizer=files["tokenizer"], layers=LAYERS)
    tokenizer = hf_tokenizer(files["tokenizer"])
    prompts = ["a cat on a mat", long_prompt(300)]
    longest = max(len(tokenizer(KLEIN_TEMPLATE.format(p))["input_ids"]) for p in prompts)
    assert longest > 512
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is cut, so nothing is reported
        got = te.encode(prompts, max_length=None, layers=LAYERS)
        short = te.encode(prompts[:1], max_length=None, layers=LAYERS)
    with torch.inference_mode():
        expected = diffusers_embeds(files, prompts, tokenizer, longest)
    assert got.shape[1] == longest and short.shape[1] == 512
    assert (got - expected).abs().max() <= 1e-5
    assert (short[0] - expected[0, :512]).abs().max() <= 1e-5  # causal: padding further leaves the start unchanged


def test_only_needed_layers_are_read(files, monkeypatch):
    from klein_nodes.loaders.checkpoint import Checkpoint

    read = []  # layers=(1, 2): layers 2 and 3 (0-based), the final norm and lm_head must stay unread
    original = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, name: read.append(name) or original(self, name))
    te = kn.load_text_encoder(files["comfy"], tokenizer=files["tokenizer"], layers=(1, 2))
    assert len(te.model.layers) == 2
    assert read and not [n for n in read
                         if n.startswith(("model.layers.2.", "model.layers.3.", "model.norm", "lm_head"))]


def test_embeddings_are_cached(files):
    te = kn.load_text_encoder(files["comfy"], tokenizer=files["tokenizer"], layers=LAYERS)
    calls = []
    te.model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    first = te.encode(["a cat", "a dog"], max_length=32, layers=LAYERS)
    again = te.encode(["a dog", "a cat", "a cat", "a bird"], max_length=32, layers=LAYERS)
    assert calls == [2, 1]  # only "a bird" was new
    assert torch.equal(again[0], first[1]) and torch.equal(again[1], first[0]) and torch.equal(again[2], first[0])


def test_empty_prompt_is_valid(files):
    te = kn.load_text_encoder(files["comfy"], tokenizer=files["tokenizer"], layers=LAYERS)
    ids, mask = te.tokenize("", 512)
    template_only = transformers.Qwen2Tokenizer.from_pretrained(str(files["tokenizer"]))(KLEIN_TEMPLATE.format(""))
    assert ids[: sum(mask)] == template_only["input_ids"]
    assert te.encode("", max_length=512, layers=LAYERS).shape == (1, 512, 96)


def test_tokenizer_json_beside_weights(files, tmp_path):
    """A diffusers repo whose tokenizer/ holds only tokenizer.json is found automatically."""
    hf_tokenizer(files["tokenizer"]).save_pretrained(str(tmp_path / "tokenizer"))
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "tokenizer" / name).unlink(missing_ok=True)
    (tmp_path / "text_encoder").symlink_to(files["text_encoder"])
    te = kn.load_text_encoder(tmp_path, layers=LAYERS)
    reference = kn.load_text_encoder(files["comfy"], tokenizer=files["tokenizer"], layers=LAYERS)
    assert te.tokenize(PROMPTS[2], 256) == reference.tokenize(PROMPTS[2], 256)


def test_missing_tokenizer_says_where_it_looked(files, tmp_path):
    lonely = tmp_path / "models" / "text_encoders" / "qwen_3_4b.safetensors"
    lonely.parent.mkdir(parents=True)
    lonely.symlink_to(files["comfy"])
    with pytest.raises(kn.CheckpointError) as info:
        kn.load_text_encoder(lonely, layers=LAYERS)
    message = str(info.value)
    assert "no Qwen tokenizer found" in message
    assert str(tmp_path / "comfy" / "text_encoders" / "qwen25_tokenizer") in message
    assert str(lonely.parent / "tokenizer") in message


def test_comfyui_bundled_tokenizer_is_used(files, tmp_path):
    comfy_root = tmp_path / "ComfyUI"
    write_tokenizer(comfy_root / "comfy" / "text_encoders" / "qwen25_tokenizer")
    weights = comfy_root / "models" / "text_encoders" / "qwen_3_4b.safetensors"
    weights.parent.mkdir(parents=True)
    weights.symlink_to(files["comfy"])
    assert kn.load_text_encoder(weights, layers=LAYERS).tokenize("a cat", 64)[0][0] == 151644


def test_qwen25_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    state = {"model.embed_tokens.weight": torch.zeros(16, 32), "model.layers.0.input_layernorm.weight": torch.zeros(32),
             "model.layers.0.self_attn.q_proj.weight": torch.zeros(32, 32),
             "model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}
    save_file(state, str(tmp_path / "qwen2.5.safetensors"))
    with pytest.raises(kn.WrongModelError, match="not Qwen3"):
        kn.load_text_encoder(tmp_path / "qwen2.5.safetensors")


def test_transformer_file_in_text_encoder_slot(tmp_path):
    from klein_nodes.testing import write_transformer

    path, _ = write_transformer(tmp_path / "flux-2-klein-4b.safetensors")
    with pytest.raises(kn.WrongModelError, match="transformer, not a Qwen3 text encoder"):
        kn.load_text_encoder(path)


def test_layer_beyond_the_file(files):
    with pytest.raises(kn.CheckpointError, match="layer 27 was requested but the file has only 4"):
        kn.load_text_encoder(files["comfy"], tokenizer=files["tokenizer"])


def test_encoder_must_fit_the_transformer(files):
    te = kn.load_text_encoder(files["comfy"], tokenizer=files["tokenizer"], layers=LAYERS)
    with torch.device("meta"):
        fits = kn.models.transformer.Flux2(TINY_TRANSFORMER)  # context 96 = 3 x 32
        too_wide = kn.models.transformer.Flux2(Flux2Params(**{**TINY_TRANSFORMER.__dict__, "context_in_dim": 12288}))
    kn.ensure_text_encoder_fits(te, fits)
    with pytest.raises(kn.WrongModelError, match="use Qwen3-8B"):
        kn.ensure_text_encoder_fits(te, too_wide)


def test_rope_theta_read_from_config(files, tmp_path):
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    for item in files["text_encoder"].iterdir():
        (folder / item.name).symlink_to(item)
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps({**qwen3_config(TINY_QWEN3), "rope_theta": 5000.0}))
    assert kn.load_text_encoder(folder, tokenizer=files["tokenizer"], layers=LAYERS).model.params.rope_theta == 5000.0


def test_text_encode_node_keeps_every_token_unless_told(files):
    from klein_nodes.nodes.conditioning import KleinTextEncode

    te = kn.load_text_encoder(files["comfy"], tokenizer=files["tokenizer"], layers=LAYERS)
    te.encode = lambda prompts, max_length: (
        kn.models.text_encoder.KleinTextEncoder.encode(te, prompts, max_length, LAYERS))
    node = KleinTextEncode()
    ((kept, _),), = node.encode(te, long_prompt(300))
    cut_run = node.encode(te, long_prompt(300), max_tokens=512)
    ((cut, _),), = cut_run["result"]
    (note,) = cut_run["ui"]["text"]  # shown under the node
    assert "tokens with the chat template; the last" in note and "tokens were cut to fit max_length=512" in note
    assert kept.shape[1] > 512 and cut.shape[1] == 512
    assert (kept[:, :512] - cut).abs().max() <= 1e-5  # the same tokens up to the cut
    with pytest.raises(kn.KleinError, match="max_length must be a positive number of tokens or None"):
        node.encode(te, "a cat", max_tokens=-1)


def test_bf16_encoder_computes_in_fp32_where_the_cpu_has_no_bf16_matmul(tmp_path, monkeypatch):
    """Forced through the capability check: a bf16 file's encoder keeps fp32 activations and widens each layer
    (models/prepacked.py), so it matches transformers in fp32 on the same bf16 weights up to the final rounding,
    much nearer than torch's bf16 matmuls; outputs stay bf16."""
    from klein_nodes.models import prepacked

    path, state = write_text_encoder(tmp_path / "qwen.safetensors", dtype=torch.bfloat16)
    reference = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**qwen3_config(TINY_QWEN3))).eval()
    reference.load_state_dict({k: v.bfloat16().float() for k, v in state.items()}, strict=False)
    reference.tie_weights()
    te = kn.load_text_encoder(path, tokenizer=write_tokenizer(tmp_path / "tok"), layers=LAYERS)
    ids = torch.randint(0, TINY_QWEN3.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    seen = []
    te.model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    monkeypatch.setitem(prepacked._state, "enabled", None)
    monkeypatch.delenv("KLEIN_CPU_PREPACK", raising=False)
    with torch.inference_mode():
        expected = reference(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        monkeypatch.setitem(prepacked._state, "native", {torch.bfloat16: False})
        widened = te.model(ids, mask, (0, *LAYERS))
        embeds = te.encode(PROMPTS[:2], max_length=32, layers=LAYERS)
        monkeypatch.setitem(prepacked._state, "enabled", False)  # KLEIN_CPU_PREPACK=0: torch's bf16 matmuls
        plain = te.model(ids, mask, (0, *LAYERS))
        te._cache.clear()
        plain_embeds = te.encode(PROMPTS[:2], max_length=32, layers=LAYERS)
    assert seen == [torch.float32, torch.float32, torch.bfloat16, torch.bfloat16]
    assert embeds.dtype == plain_embeds.dtype == torch.bfloat16
    for layer in (0, *LAYERS):
        assert widened[layer].dtype == torch.bfloat16
        torch.testing.assert_close(widened[layer].float(), expected[layer], rtol=2 ** -8, atol=1e-5)
        error, plain_error = ((got[layer].float() - expected[layer]).abs().max() for got in (widened, plain))
        assert error <= plain_error
    assert (widened[3].float() - expected[3]).abs().max() < 0.5 * (plain[3].float() - expected[3]).abs().max()
    scale = plain_embeds.float().abs().max()
    assert (embeds.float() - plain_embeds.float()).abs().max() <= 0.05 * scale
