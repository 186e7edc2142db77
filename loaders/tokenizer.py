"""Qwen byte-level BPE tokenizer from `tokenizer.json`, or `vocab.json` + `merges.txt` + added tokens."""

import importlib.util
import json
import os
from pathlib import Path

from ..errors import CheckpointError

PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
COMFY_TOKENIZER = Path("comfy") / "text_encoders" / "qwen25_tokenizer"


def has_tokenizer_files(folder):
    folder = Path(folder)
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def tokenizer_candidates(weights_path):
    """Folders to look in, in order: beside the weights, a diffusers `tokenizer/` sibling, ComfyUI's bundled copy."""
    weights_path = Path(weights_path)
    base = weights_path if weights_path.is_dir() else weights_path.parent
    candidates = [base, base / "tokenizer", base.parent / "tokenizer"]
    if os.environ.get("KLEIN_TOKENIZER"):
        candidates.insert(0, Path(os.environ["KLEIN_TOKENIZER"]))
    # A file inside <ComfyUI>/models/...: ComfyUI's own bundled tokenizer.
    for parent in Path(os.path.abspath(weights_path)).parents:
        if parent.name == "models":
            candidates.append(parent.parent / COMFY_TOKENIZER)
            break
    # Running inside ComfyUI (found without importing it).
    try:
        spec = importlib.util.find_spec("comfy")
    except ValueError:  # a `comfy` module without a spec (not ComfyUI's package)
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))).parent / COMFY_TOKENIZER)
    return candidates


def find_tokenizer(weights_path, tokenizer=None):
    """The tokenizer folder (or tokenizer.json) for `weights_path`, or an error listing where we looked."""
    if tokenizer is not None:
        path = Path(tokenizer)
        if path.is_file() and path.name.endswith(".json") or path.is_dir() and has_tokenizer_files(path):
            return path
        raise CheckpointError(f"{path}: not a tokenizer (expected tokenizer.json, or a folder with vocab.json + merges.txt).")
    candidates = tokenizer_candidates(weights_path)
    for folder in candidates:
        if has_tokenizer_files(folder):
            return folder
    looked = "\n  ".join(str(c) for c in dict.fromkeys(candidates))
    raise CheckpointError(
        f"{weights_path}: no Qwen tokenizer found. Looked in:\n  {looked}\n"
        "Give the Qwen tokenizer (tokenizer.json, or a folder with vocab.json + merges.txt, e.g. from "
        "huggingface.co/Qwen/Qwen3-4B): tokenizer=... in Python, --tokenizer on the command line, KLEIN_TOKENIZER, "
        "or put it beside the weights; inside ComfyUI its bundled comfy/text_encoders/qwen25_tokenizer is used."
    )


def qwen_bpe(vocab, merges):
    """Qwen's byte-level BPE: NFC, the Qwen2 split regex, byte-level pre-tokenizer and decoder."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None, unk_token=None,
                              continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def load_tokenizer(path):
    """A `tokenizers.Tokenizer` with the Qwen2 pre-tokenizer and every added token of the folder."""
    from tokenizers import AddedToken, Tokenizer

    path = Path(path)
    if path.is_file():
        return Tokenizer.from_file(str(path))
    if (path / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
    merges = [line for line in (path / "merges.txt").read_text(encoding="utf-8").splitlines()
              if line and not line.startswith("#version")]
    tokenizer = qwen_bpe(vocab, merges)
    config_path = path / "tokenizer_config.json"
    added = json.loads(config_path.read_text(encoding="utf-8")).get("added_tokens_decoder", {}) if config_path.is_file() else {}
    for token_id, token in sorted(added.items(), key=lambda item: int(item[0])):
        if tokenizer.token_to_id(token["content"]) not in (None, int(token_id)):
            raise CheckpointError(f"{config_path}: added token {token['content']!r} has id {token_id}, vocab.json disagrees.")
        tokenizer.add_special_tokens([AddedToken(token["content"], special=token.get("special", True), normalized=False,
                                                 lstrip=token.get("lstrip", False), rstrip=token.get("rstrip", False),
                                                 single_word=token.get("single_word", False))])
        if tokenizer.token_to_id(token["content"]) != int(token_id):
            raise CheckpointError(f"{config_path}: added token {token['content']!r} does not get id {token_id}.")
    return tokenizer
