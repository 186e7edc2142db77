"""Qwen byte-level BPE tokenizer from `tokenizer.json`, or `vocab.json` + `merges.txt` + added tokens."""

import importlib.util
import json
import os
import warnings
from pathlib import Path

from ..errors import CheckpointError, KleinNote

PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+"""
)
COMFY_TOKENIZER = Path("comfy") / "text_encoders" / "qwen25_tokenizer"
QWEN3_FIRST_ADDED = 151643
# Qwen3's added tokens from id 151643 on, (text, special), as its tokenizer_config.json lists them. ComfyUI up to
# 0.3.x bundles other tokens at 151665-151668 (<|img|>, <|endofimg|>, <|meta|>, <|endofmeta|>), which would encode
# klein's empty <think></think> block as plain text: these are used whatever a folder says.
QWEN3_ADDED_TOKENS = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
)


def has_tokenizer_files(folder):
    folder = Path(folder)
    return ((folder / "tokenizer.json").is_file()
            or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()))


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
        raise CheckpointError(f"{path}: not a tokenizer "
                              "(expected tokenizer.json, or a folder with vocab.json + merges.txt).")
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
    """A `tokenizers.Tokenizer` with the Qwen2 pre-tokenizer, Qwen3's added tokens at their ids (a folder or file
    that puts other tokens there is corrected, with a note) and the folder's further added tokens."""
    from tokenizers import Tokenizer

    path = Path(path)
    file = path if path.is_file() else path / "tokenizer.json"
    if file.is_file():
        tokenizer = Tokenizer.from_file(str(file))
        if not wrong_added_tokens({i: tokenizer.id_to_token(i) for i in qwen3_ids()}):
            return tokenizer
        data = json.loads(file.read_text(encoding="utf-8"))  # rebuilt from its vocabulary with Qwen3's tokens
        vocab, merges = (data["model"]["vocab"],
                         [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
        added = {str(t["id"]): t for t in data.get("added_tokens", [])}
    else:
        vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
        merges = [line for line in (path / "merges.txt").read_text(encoding="utf-8").splitlines()
                  if line and not line.startswith("#version")]
        config = path / "tokenizer_config.json"
        added = (json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
                 if config.is_file() else {})
    return with_added_tokens(qwen_bpe(vocab, merges), added, file if file.is_file() else path)


def qwen3_ids():
    return range(QWEN3_FIRST_ADDED, QWEN3_FIRST_ADDED + len(QWEN3_ADDED_TOKENS))


def wrong_added_tokens(found):
    """[(id, found text, Qwen3's text)] where `found` ({id: text or None}) differs from Qwen3's added tokens."""
    return [(i, found[i], text) for i, (text, _) in zip(qwen3_ids(), QWEN3_ADDED_TOKENS)
            if found.get(i) is not None and found[i] != text]


def with_added_tokens(tokenizer, added, source):
    """`tokenizer` with Qwen3's added tokens and then the other entries of `added` ({id: {"content", "special",
    ...}}, as tokenizer_config.json's added_tokens_decoder), each checked to land on its id."""
    from tokenizers import AddedToken

    wrong = wrong_added_tokens({int(i): token["content"] for i, token in added.items()})
    if wrong:
        warnings.warn(f"{source}: Qwen3's tokens used at ids {wrong[0][0]}-{wrong[-1][0]} ("
                      + ", ".join(f"{theirs} for {found}" for _, found, theirs in wrong)
                      + "), so prompts encode as diffusers and BFL's code encode them", KleinNote, stacklevel=3)
    tokens = {**{int(i): token for i, token in added.items()},
              **{i: {"content": text, "special": special}
                 for i, (text, special) in zip(qwen3_ids(), QWEN3_ADDED_TOKENS)}}
    for token_id, token in sorted(tokens.items()):
        if tokenizer.token_to_id(token["content"]) not in (None, token_id):
            raise CheckpointError(f"{source}: added token {token['content']!r} has id {token_id}, the vocabulary "
                                  "disagrees.")
        tokenizer.add_special_tokens([AddedToken(token["content"], special=token.get("special", True), normalized=False,
                                                 lstrip=token.get("lstrip", False), rstrip=token.get("rstrip", False),
                                                 single_word=token.get("single_word", False))])
        if tokenizer.token_to_id(token["content"]) != token_id:
            raise CheckpointError(f"{source}: added token {token['content']!r} does not get id {token_id}: not "
                                  f"Qwen3's tokenizer ({QWEN3_FIRST_ADDED} tokens and {len(QWEN3_ADDED_TOKENS)} added)")
    return tokenizer


def gguf_vocabulary_problem(tokens, vocab, merges, types):
    """What makes well-typed GGUF tokenizer metadata unusable (the BPE library would fail or panic on it), or None:
    a duplicated token, a merge of or into a token not in the vocabulary, token types not one per token."""
    if len(types) != len(tokens):
        return f"tokenizer.ggml.token_type holds {len(types)} values for {len(tokens)} tokens"
    if len(vocab) != len(tokens):
        seen = set()
        index, token = next((i, t) for i, t in enumerate(tokens) if t in seen or seen.add(t))
        return f"token {token[:40]!r} appears twice in tokenizer.ggml.tokens (ids {tokens.index(token)} and {index})"
    for number, merge in enumerate(merges):
        left, right = merge.split(" ")
        missing = next((t for t in (left, right, left + right) if t not in vocab), None)
        if missing is not None:
            return (f"merge {number} ({merge[:40]!r}) needs the token {missing[:40]!r}, which tokenizer.ggml.tokens "
                    "does not hold")
    return None


def tokenizer_from_gguf(file):
    """A byte-level BPE tokenizer from a GGUFFile's metadata (tokens, merges, control tokens)."""
    from tokenizers import AddedToken

    tokens = file.field("tokenizer.ggml.tokens")
    merges = file.field("tokenizer.ggml.merges")
    if not tokens or not merges:
        raise CheckpointError(f"{file.path}: no tokenizer files were found and the GGUF has no tokenizer metadata; "
                              "pass tokenizer=<folder with vocab.json + merges.txt>")
    types = file.field("tokenizer.ggml.token_type")
    types = [1] * len(tokens) if types is None else types
    malformed = [key for key, values, kind in (("tokens", tokens, str), ("merges", merges, str),
                                               ("token_type", types, int))
                 if not isinstance(values, list) or not all(isinstance(v, kind) for v in values)]
    malformed += ["merges"] * any(len(m.split(" ")) != 2 for m in merges if "merges" not in malformed)
    if malformed:
        raise CheckpointError(f"{file.path}: the tokenizer metadata is malformed (tokenizer.ggml.{malformed[0]}); pass "
                              "tokenizer=<folder with vocab.json + merges.txt>")
    vocab = {token: i for i, token in enumerate(tokens)}
    problem = gguf_vocabulary_problem(tokens, vocab, merges, types)
    if problem:
        raise CheckpointError(f"{file.path}: the tokenizer metadata is inconsistent: {problem}; the file is damaged. "
                              "Pass tokenizer=<folder with vocab.json + merges.txt>.")
    tokenizer = qwen_bpe(vocab, merges)
    # control (3) and user-defined (4) tokens such as <|im_start|> and <think> are matched whole, at their own ids
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token, kind in zip(tokens, types) if kind in (3, 4)])
    return tokenizer
