"""Qwen3's added tokens whatever ComfyUI bundles: klein's template encodes as transformers' Qwen3 tokenizer does with
the added-token tables of ComfyUI 0.3.64 (other tokens at 151665-151668) and 0.25/0.33 (Qwen3's)."""

import json
import os
import warnings
from pathlib import Path

import pytest

import klein_nodes as kn
from klein_nodes.loaders.tokenizer import QWEN3_FIRST_ADDED, load_tokenizer
from klein_nodes.models.text_encoder import KLEIN_TEMPLATE
from klein_nodes.testing import write_tokenizer

transformers = pytest.importorskip("transformers")
SHARED = Path(os.environ.get("KLEIN_TEST_TOKENIZER",
                             Path(__file__).resolve().parents[2] / "shared/data/qwen25_tokenizer"))
needs_real_vocab = pytest.mark.skipif(not (SHARED / "vocab.json").is_file(),
                                      reason="the real Qwen vocabulary is absent")
# what ComfyUI 0.3.64's comfy/text_encoders/qwen25_tokenizer/tokenizer_config.json lists at these ids
COMFY_0364 = {151665: "<|img|>", 151666: "<|endofimg|>", 151667: "<|meta|>", 151668: "<|endofmeta|>"}
PROMPTS = ["A lighthouse keeper feeding a cat", "ünï 🐱 <think> inside </think>\n\nthe prompt", ""]


def bundled(folder, replaced):
    """The real vocabulary with a tokenizer_config.json whose added tokens are Qwen3's except `replaced`."""
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (folder / name).symlink_to(SHARED / name)
    config = json.loads((SHARED / "tokenizer_config.json").read_text())
    for token_id, text in replaced.items():
        config["added_tokens_decoder"][str(token_id)].update(content=text, special=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@needs_real_vocab
@pytest.mark.parametrize("core, replaced", [("0.3.64", COMFY_0364), ("0.25 and 0.33", {})])
def test_klein_template_encodes_as_qwen3_with_every_bundled_table(tmp_path, core, replaced):
    reference = transformers.Qwen2Tokenizer.from_pretrained(str(SHARED))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = load_tokenizer(bundled(tmp_path / "qwen25_tokenizer", replaced))
    notes = [str(w.message) for w in caught if issubclass(w.category, kn.KleinNote)]
    assert len(notes) == bool(replaced)
    if replaced:
        assert "Qwen3's tokens used at ids 151665-151668 (<tool_response> for <|img|>" in notes[0]
    for prompt in PROMPTS:
        text = KLEIN_TEMPLATE.format(prompt)
        assert ours.encode(text, add_special_tokens=False).ids == reference(text)["input_ids"], (core, prompt)
    ids = ours.encode(KLEIN_TEMPLATE.format(PROMPTS[0]), add_special_tokens=False).ids
    assert ids[-4:] == [151667, 271, 151668, 271]


def test_a_tokenizer_json_with_other_added_tokens_is_rebuilt(tmp_path):
    good = load_tokenizer(write_tokenizer(tmp_path / "tiny"))
    data = json.loads(good.to_str())
    for token in data["added_tokens"]:
        token["content"] = COMFY_0364.get(token["id"], token["content"])
    for token_id, text in COMFY_0364.items():
        del data["model"]["vocab"][{v: k for k, v in data["model"]["vocab"].items()}[token_id]]
        data["model"]["vocab"][text] = token_id
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.warns(kn.KleinNote, match="Qwen3's tokens used at ids 151665-151668"):
        fixed = load_tokenizer(tmp_path / "tokenizer.json")
    text = KLEIN_TEMPLATE.format("a cat")
    assert fixed.encode(text, add_special_tokens=False).ids == good.encode(text, add_special_tokens=False).ids


def test_a_tokenizer_of_another_model_is_refused(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
    with pytest.raises(kn.KleinError, match=f"not Qwen3's tokenizer \\({QWEN3_FIRST_ADDED} tokens"):
        load_tokenizer(tmp_path)
