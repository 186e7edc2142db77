"""LoRA files -> adapters on klein's layers, for every published naming: BFL/ComfyUI (`diffusion_model.double_blocks
.0.img_attn.qkv.lora_A/B`, `lora_down/up`, `alpha`), diffusers/PEFT (`transformer.transformer_blocks.0.attn.to_q
.lora_A.weight`: split q/k/v land on row ranges of our fused qkv; DiffSynth's `.lora_A.default.weight`),
kohya (`lora_unet_double_blocks_0_img_attn_qkv`),
LyCORIS LoKr/LoHa (`lycoris_transformer_blocks_0_attn_to_q.lokr_w1`), DoRA (`lora_magnitude_vector`,
`dora_scale`), and Qwen3 text-encoder LoRAs
(`text_encoders.qwen3_4b.transformer.model.layers.0.self_attn.q_proj`, `text_encoder.`, `lora_te_`)."""

import copy
import json
import logging
import warnings
import math
import re
from pathlib import Path

import torch

from ..arguments import path_argument
from ..errors import CheckpointError, KleinError, KleinNote, WrongModelError
from ..models.adapters import Adapter, with_adapters
from ..models.text_encoder import KleinTextEncoder
from ..models.transformer import Flux2
from .safetensors_io import PICKLE_SUFFIXES, SafetensorsFile, refuse_pickle, sniff_format
from .transformer import BFL_FINAL_MOD, DIFFUSERS_DOUBLE, DIFFUSERS_FUSED_QKV, DIFFUSERS_GLOBAL, DIFFUSERS_SINGLE

log = logging.getLogger("klein_nodes")

# key ending -> (adapter kind, tensor role); "alpha" belongs to whichever kind the layer has
SUFFIXES = {
    "lora_A.weight": ("lora", "down"), "lora_B.weight": ("lora", "up"),
    "lora_A.default.weight": ("lora", "down"), "lora_B.default.weight": ("lora", "up"),  # DiffSynth / raw PEFT
    "lora_down.weight": ("lora", "down"), "lora_up.weight": ("lora", "up"),
    "lora_magnitude_vector": ("lora", "magnitude"), "dora_scale": ("lora", "magnitude"),  # DoRA: PEFT, LyCORIS
    **{f"lokr_{n}": ("lokr", n) for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")},
    **{f"hada_{n}": ("loha", n) for n in ("w1_a", "w1_b", "w2_a", "w2_b")},
    "diff": ("diff", "diff"),
    "alpha": (None, "alpha"),
}
COMPLETE = {"lora": {"up", "down"}, "loha": {"w1_a", "w1_b", "w2_a", "w2_b"}, "diff": {"diff"}}
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "unet.",
                        "lora_unet_", "lycoris_", "lora_transformer_")
TEXT_ENCODER_PREFIXES = ("text_encoders.qwen3_4b.transformer.", "text_encoders.qwen3_8b.transformer.",
                         "text_encoders.qwen3_4b.", "text_encoders.qwen3_8b.", "text_encoder.", "lora_te1_",
                         "lora_te_", "lycoris_te_")


def read_lora(path):
    """(tensors, header metadata) of a .safetensors LoRA file; pickles are refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such LoRA file.")
    if path.suffix.lower() in PICKLE_SUFFIXES or sniff_format(path) == "pickle":
        refuse_pickle(path)
    file = SafetensorsFile(path)
    return {name: file.get(name) for name in file.keys()}, file.metadata


def transformer_aliases(model):
    """{module path as LoRA files name it: (our layer, rows)} for a Flux2: BFL and diffusers names."""
    h, linears = model.params.hidden_size, linear_names(model)
    renames = {k: v for k, v in DIFFUSERS_GLOBAL.items()}
    for i in range(model.params.depth):
        renames.update({f"transformer_blocks.{i}.{k}": f"double_blocks.{i}.{v}" for k, v in DIFFUSERS_DOUBLE.items()})
    for i in range(model.params.depth_single_blocks):
        renames.update({f"single_transformer_blocks.{i}.{k}": f"single_blocks.{i}.{v}"
                        for k, v in DIFFUSERS_SINGLE.items()})
    aliases = {name: (name, None) for name in linears}
    aliases.update({k[: -len(".weight")]: (v[: -len(".weight")], None) for k, v in renames.items()
                    if v[: -len(".weight")] in linears})
    for i in range(model.params.depth):
        for fused, parts in DIFFUSERS_FUSED_QKV.items():
            target = f"double_blocks.{i}.{fused[: -len('.weight')]}"
            for j, part in enumerate(parts):
                aliases[f"transformer_blocks.{i}.{part[: -len('.weight')]}"] = (target, slice(j * h, (j + 1) * h))
        aliases[f"transformer_blocks.{i}.attn.to_qkv"] = (f"double_blocks.{i}.img_attn.qkv", None)
        aliases[f"transformer_blocks.{i}.attn.to_added_qkv"] = (f"double_blocks.{i}.txt_attn.qkv", None)
    # diffusers' final modulation stores (scale, shift) where BFL stores (shift, scale)
    aliases["norm_out.linear"] = (BFL_FINAL_MOD[: -len(".weight")],
                                  torch.cat((torch.arange(h, 2 * h), torch.arange(h))))
    return aliases


def text_encoder_aliases(model):
    """{module path: (our layer, None)} for a Qwen3: Hugging Face names with and without `model.`."""
    linears = linear_names(model)
    return {**{name: (name, None) for name in linears}, **{f"model.{name}": (name, None) for name in linears}}


def linear_names(model):
    return {name for name, module in model.named_modules() if hasattr(module, "adapters")}


COMPONENTS = {  # component -> (its aliases, its key prefixes, the other component's prefixes)
    "transformer": (transformer_aliases, TRANSFORMER_PREFIXES, TEXT_ENCODER_PREFIXES),
    "text_encoder": (text_encoder_aliases, TEXT_ENCODER_PREFIXES, TRANSFORMER_PREFIXES),
}


def split_key(key):
    """'prefix.module.lora_A.weight' -> ('prefix.module', kind, role), or None for a key of no known adapter."""
    for suffix, (kind, role) in SUFFIXES.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], kind, role
    return None


def resolve(path, prefixes, aliases, underscored):
    """A module path from a file -> (our layer, rows), trying each prefix, dotted and underscore spellings."""
    for prefix in ("", *prefixes):
        if prefix and not path.startswith(prefix):
            continue
        rest = path[len(prefix):]
        target = aliases.get(rest) or (underscored.get(rest) if prefix.endswith("_") else None)
        if target:
            return target
    return None


METADATA_LIMIT = 1 << 20  # characters of `lora_adapter_metadata`; diffusers writes about 2 kB
METADATA_DEPTH = 16  # how deep it may nest; peft's LoraConfig nests 3 deep
PATTERN_LIMIT = 1024  # alpha_pattern entries; klein has a few hundred layers
REGEX_SYNTAX = frozenset("^$*+?{}[]()|\\")  # all of Python's regex syntax outside a class but '.'
JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"?', re.DOTALL)  # an unterminated string runs to the end: no retries
FIX = "the LoRA's header is damaged or was written by a broken tool: re-export the LoRA (diffusers' save_lora_weights)"


def nests_deeper(text, limit):
    """True when the brackets of JSON `text` (outside its strings) nest deeper than `limit`: a linear scan that
    stops at the first level too deep, since json.loads recurses once per level."""
    depth = 0
    for c in re.sub(r"[^\[\]{}]", "", JSON_STRING.sub("", text)):
        depth += 1 if c in "[{" else -1
        if depth > limit:
            return True
    return False


def json_brief(value):
    """A JSON value in an error message, cut short."""
    if isinstance(value, (dict, list)):
        return "a JSON " + ("object" if isinstance(value, dict) else "list")
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:40] + "..."


def finite_positive(value):
    """`value` as a float when it is a finite number above 0 (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:  # an integer beyond float range
        return None
    return value if math.isfinite(value) and value > 0 else None


def adapter_config(metadata, component):
    """The `component` ("transformer", "text_encoder") part of diffusers' `lora_adapter_metadata` header, a JSON
    object of peft LoraConfig fields under the component's prefix ({"transformer.lora_alpha": 8,
    "transformer.alpha_pattern": {"to_q": 4}, ...}), checked before anything is applied: {"prefix", "alpha",
    "rslora", "pattern": [(module-name key, alpha) in file order]}, or None when it gives no lora_alpha.

    Only the fields klein reads (lora_alpha, r, use_rslora, alpha_pattern) are checked; anything the file gets
    wrong (not JSON, over METADATA_LIMIT characters, nested deeper than METADATA_DEPTH, a field of the wrong type,
    a lora_alpha that is not a finite positive number, an alpha_pattern key that is a regular expression) is one
    CheckpointError naming the field."""
    text = (metadata or {}).get("lora_adapter_metadata") or "{}"
    if len(text) > METADATA_LIMIT:
        raise CheckpointError(f"lora_adapter_metadata is {len(text)} characters, more than the {METADATA_LIMIT} a "
                              f"LoRA config can need; {FIX}.")
    if nests_deeper(text, METADATA_DEPTH):
        raise CheckpointError(f"lora_adapter_metadata nests JSON deeper than the {METADATA_DEPTH} levels a LoRA "
                              f"config can need; {FIX}.")
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"lora_adapter_metadata is not valid JSON ({str(e)[:80]}); {FIX}.") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"lora_adapter_metadata must be a JSON object of LoRA config fields, not "
                              f"{json_brief(config)}; {FIX}.")
    prefix = component + "."

    def refuse(field, what, value):
        return CheckpointError(f"lora_adapter_metadata.{prefix}{field} must be {what}, not {json_brief(value)}; {FIX}.")

    alpha, r, rslora, pattern = (config.get(prefix + field) for field in ("lora_alpha", "r", "use_rslora",
                                                                          "alpha_pattern"))
    if alpha is not None and finite_positive(alpha) is None:
        raise refuse("lora_alpha", "a finite number above 0", alpha)
    if r is not None and (type(r) is not int or r <= 0):
        raise refuse("r", "a whole number above 0", r)
    if rslora is not None and not isinstance(rslora, bool):
        raise refuse("use_rslora", "true or false", rslora)
    pattern = {} if pattern is None else pattern
    if not isinstance(pattern, dict):
        raise refuse("alpha_pattern", "an object mapping module names to numbers above 0", pattern)
    if len(pattern) > PATTERN_LIMIT:
        raise CheckpointError(f"lora_adapter_metadata.{prefix}alpha_pattern has {len(pattern)} entries, more than "
                              f"the {PATTERN_LIMIT} a klein LoRA can need (one per layer); {FIX}.")
    for key, value in pattern.items():
        if finite_positive(value) is None:
            raise refuse(f"alpha_pattern[{json_brief(key)}]", "a finite number above 0", value)
        if REGEX_SYNTAX.intersection(key):
            raise CheckpointError(f"lora_adapter_metadata.{prefix}alpha_pattern key {json_brief(key)} is a regular "
                                  f"expression; alpha_pattern keys must be module names ('to_q', "
                                  f"'transformer_blocks.0.attn.to_q'): klein runs no patterns from files. "
                                  f"Re-export the LoRA with module names as alpha_pattern keys.")
    if alpha is None:
        return None
    return {"prefix": prefix, "alpha": float(alpha), "rslora": bool(rslora),
            "pattern": [(key, float(value)) for key, value in pattern.items()]}


def pattern_matches(key, name):
    """peft's `re.match(rf"(.*\\.)?({key})$", name)` (peft.utils.other.get_pattern_key) without compiling file text:
    keys are limited to module names (adapter_config refuses every other regex syntax), in which '.' stands, as in
    peft, for any one character. So the key matches the last len(key) characters of the name, and they are the
    whole name or follow a '.'. (Names here are klein's layer names: no newline, which '.' and '$' treat apart.)
    Linear in len(key): a file cannot make it backtrack, and an ordinary key gives exactly peft's answer."""
    start = len(name) - len(key)
    if start < 0 or (start > 0 and name[start - 1] != "."):
        return False
    return all(k == "." or k == c for k, c in zip(key, name[start:]))


def peft_scale(config, module, rank):
    """lora_alpha / r (rsLoRA: / sqrt(r)) for `module` (a path from the file) under `config` (adapter_config); 1
    without one. As in peft, the FIRST alpha_pattern key (file order) that matches the module name as peft knows it
    (the path without the component's prefix: `transformer.` or `text_encoder.`) gives the alpha."""
    if config is None:
        return 1.0
    name = module.removeprefix(config["prefix"])
    alpha = next((value for key, value in config["pattern"] if pattern_matches(key, name)), config["alpha"])
    return alpha / (math.sqrt(rank) if config["rslora"] else rank)


# factor pairs whose inner dimensions (the rank) must agree: (left, right) with left (out, r) and right (r, in)
FACTORS = {"lora": (("up", "down"),), "loha": (("w1_a", "w1_b"), ("w2_a", "w2_b")),
           "lokr": (("w1_a", "w1_b"), ("w2_a", "w2_b")), "diff": ()}


def check_structure(kind, tensors, alpha, path):
    """Refuse, when the LoRA is applied rather than at the first forward, what cannot make a delta: a rank of 0,
    factors whose ranks disagree, a non-scalar or non-finite alpha, non-finite values."""
    problem = None
    if alpha is not None and (alpha.numel() != 1 or not math.isfinite(float(alpha.float().reshape(-1)[0]))):
        problem = f"its alpha is {alpha.tolist() if alpha.numel() < 8 else tuple(alpha.shape)}, not one finite number"
    for left, right in FACTORS[kind]:
        if problem or left not in tensors:
            continue
        a, b = tensors[left], tensors[right]
        if a.ndim < 2 or b.ndim < 2 or a.flatten(1).shape[1] != b.shape[0] or b.shape[0] == 0:
            problem = (f"{left} {tuple(a.shape)} and {right} {tuple(b.shape)} do not agree on a rank above 0"
                       if a.ndim >= 2 and b.ndim >= 2 else f"{left} and {right} must be matrices")
    if kind == "loha" and not problem:
        w1, w2 = ((tensors[f"{w}_a"].shape[0], tensors[f"{w}_b"].flatten(1).shape[1]) for w in ("w1", "w2"))
        if w1 != w2:
            problem = f"its two Hadamard factors make {w1} and {w2}"
    bad = next((role for role, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if not problem and bad:
        problem = f"its {bad} holds NaN or infinite values"
    if problem:
        raise CheckpointError(f"LoRA layer '{path}': {problem}; the file is damaged or not a LoRA.")


def build_adapter(kind, tensors, alpha, rows, config, module):
    """One Adapter with the scale each format defines (alpha / rank when an alpha is stored; else, for a LoRA, what
    `config`, the file's checked adapter_config, gives)."""
    if kind == "lora":
        rank = tensors["down"].shape[0]
        scale = alpha / rank if alpha is not None else peft_scale(config, module, rank)
    elif kind == "loha":
        scale = alpha / tensors["w1_b"].shape[0] if alpha is not None else 1.0
    elif kind == "lokr":
        decomposed = tensors.get("w2_b", tensors.get("w1_b"))
        scale = alpha / decomposed.shape[0] if alpha is not None and decomposed is not None else 1.0
    else:
        scale = 1.0
    return Adapter(kind, tensors, scale, rows)


def lokr_complete(roles):
    return all(f"w{i}" in roles or {f"w{i}_a", f"w{i}_b"} <= roles for i in (1, 2))


def parse(tensors, metadata, model, component):
    """({our layer: [Adapter]}, report) for the part of a LoRA file that targets `model` ("transformer" or
    "text_encoder" `component`)."""
    make_aliases, prefixes, other_prefixes = COMPONENTS[component]
    config = adapter_config(metadata, component)  # a malformed header is refused before anything is built
    aliases = make_aliases(model)
    underscored = {name.replace(".", "_"): target for name, target in aliases.items()}
    groups, unknown, other = {}, [], []
    for key, tensor in tensors.items():
        if key.startswith(other_prefixes) and not key.startswith(prefixes):
            other.append(key)  # the other model's, known or not: its own parse reports it
            continue
        parts = split_key(key)
        if parts is None:
            unknown.append(key)
            continue
        path, kind, role = parts
        target = resolve(path, prefixes, aliases, underscored)
        if target is None:
            unknown.append(key)
            continue
        group = groups.setdefault(path, {"target": target, "kinds": set(), "tensors": {}, "alpha": None, "keys": []})
        group["keys"].append(key)
        if kind is None:
            group["alpha"] = tensor
        else:
            group["kinds"].add(kind)
            group["tensors"][role] = tensor
    layers = {}
    for path, group in groups.items():
        kinds, roles = group["kinds"], set(group["tensors"])
        kind = next(iter(kinds)) if len(kinds) == 1 else None
        if kind is None or not (lokr_complete(roles) if kind == "lokr" else COMPLETE[kind] <= roles):
            unknown.extend(group["keys"])  # mixed or incomplete: nothing sensible to apply
            continue
        (layer, rows) = group["target"]
        check_structure(kind, group["tensors"], group["alpha"], path)
        alpha = None if group["alpha"] is None else float(group["alpha"].float().reshape(-1)[0])
        adapter = build_adapter(kind, group["tensors"], alpha, rows, config, path)
        check_shape(model, layer, rows, adapter, path)
        layers.setdefault(layer, []).append(adapter)
    return layers, {"layers": len(layers), "unknown": sorted(unknown), "other": sorted(other)}


def parse_file(tensors, metadata, model, component, label):
    """parse(), with the file's name (`label`) on what it refuses."""
    try:
        return parse(tensors, metadata, model, component)
    except (CheckpointError, WrongModelError) as e:
        raise type(e)(f"{label}: {e}") from None


def check_shape(model, layer, rows, adapter, path):
    module = model.get_submodule(layer)
    if rows is None:
        out_features = module.out_features
    elif isinstance(rows, slice):
        out_features = len(range(module.out_features)[rows])
    else:
        out_features = len(rows)
    expected = (out_features, module.in_features)
    magnitude = adapter.tensors.get("magnitude")
    if tuple(adapter.shape()) != expected or (magnitude is not None and magnitude.numel() not in expected):
        raise WrongModelError(f"LoRA layer '{path}' is {tuple(adapter.shape())} but klein's '{layer}' needs "
                              f"{expected}: the LoRA was made for another model (klein 4B and 9B LoRAs do not mix).")


def apply_lora(model: Flux2 | KleinTextEncoder, path: str | Path, strength: float = 1.0) -> Flux2 | KleinTextEncoder:
    """A copy of `model` (a klein transformer or text encoder) with the LoRA at `path` added at `strength`.

    The input model is left as it was and shares all its weights with the copy; LoRAs stack by calling this again.
    Keys no layer matches are listed in a warning; keys for the other model (text encoder / transformer) are
    reported, not applied.
    """
    if not isinstance(model, (Flux2, KleinTextEncoder)):
        raise KleinError(f"apply_lora takes a klein transformer or text encoder (kn.load_transformer / "
                         f"kn.load_text_encoder), not {type(model).__name__}")
    path = path_argument(path)
    tensors, metadata = read_lora(path)
    return apply_lora_tensors(model, tensors, metadata, strength, path.name)[0]


def apply_lora_pair(model, text_encoder, path, strength=1.0, text_encoder_strength=None):
    """(model, text encoder) with one LoRA file's transformer layers on the first and its text-encoder layers on the
    second (`text_encoder` may be None; strength 0 leaves a model as it is). A LoRA of which nothing can apply to
    klein (an SDXL or FLUX.1 LoRA, say) is refused, naming what it looks made for."""
    tensors, metadata = read_lora(path)
    label = Path(path).name
    has_te_keys = any(qwen3_layer(k) for k in tensors)
    if not has_te_keys and isinstance(model, Flux2):
        layers, _ = parse_file(tensors, metadata, model, "transformer", label)
        if not layers:
            raise WrongModelError(f"{label}: nothing in this LoRA applies to FLUX.2 [klein]: it looks made for "
                                  f"{lora_family(tensors)}. Use a LoRA trained on klein (4B for the 4B model)")
    if strength:
        model, _ = apply_lora_tensors(model, tensors, metadata, strength, label)
    te_strength = strength if text_encoder_strength is None else text_encoder_strength
    if has_te_keys and text_encoder is None:
        warnings.warn(f"{label}: has text-encoder layers; connect a text encoder to apply them", KleinNote,
                      stacklevel=2)
    elif has_te_keys and te_strength:
        text_encoder, _ = apply_lora_tensors(text_encoder, tensors, metadata, te_strength, label)
    return model, text_encoder


QWEN3_LAYER = re.compile(r"(model[._])?layers[._]\d+[._](self_attn[._][qkvo]_proj|mlp[._](gate|up|down)_proj)")
FAMILIES = (  # (what a key contains, the model family it points to), first match wins
    (re.compile(r"(input_blocks|output_blocks|down_blocks|up_blocks|mid_block)[._]"),
     "a Stable Diffusion UNet (SD 1.x, SD 2.x or SDXL)"),
    (re.compile(r"(double_blocks|(?<!single_)transformer_blocks)[._](\d\d|[5-9])[._]"),
     "FLUX.1 (19 double blocks; klein 4B has 5)"),
    (re.compile(r"text_model|lora_te[12]_|encoder[._]block"), "CLIP or T5 text encoders (SD, SDXL, FLUX.1)"),
)


def qwen3_layer(key):
    """True for a key of a LoRA layer on Qwen3 (klein's text encoder), by its text-encoder prefix and module name."""
    parts = split_key(key)
    prefix = next((p for p in TEXT_ENCODER_PREFIXES if key.startswith(p)), None)
    return parts is not None and prefix is not None and bool(QWEN3_LAYER.fullmatch(parts[0][len(prefix):]))


def lora_family(tensors):
    """What a LoRA's keys point to, in words, for a LoRA that matches nothing of klein's."""
    keys = " ".join(tensors)
    return next((family for pattern, family in FAMILIES if pattern.search(keys)),
                f"another model (keys look like: {', '.join(list(tensors)[:3])})")


def apply_lora_tensors(model, tensors, metadata, strength, label):
    """(patched copy, report) for already-read LoRA tensors."""
    if not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise KleinError(f"{label}: LoRA strength must be a finite number, not {strength!r}")
    is_transformer = isinstance(model, Flux2)
    target = model if is_transformer else getattr(model, "model", None)
    if target is None or not hasattr(target, "params"):
        raise WrongModelError(f"{label}: LoRAs apply to a klein transformer or text encoder, "
                              f"not {type(model).__name__}.")
    layers, report = parse_file(tensors, metadata, target, "transformer" if is_transformer else "text_encoder", label)
    what = "transformer" if is_transformer else "text encoder"
    if report["unknown"]:
        shown = ", ".join(report["unknown"][:8]) + (" ..." if len(report["unknown"]) > 8 else "")
        warnings.warn(f"{label}: {len(report['unknown'])} keys match no klein {what} layer and were not applied: "
                      f"{shown}", KleinNote, stacklevel=3)
    if report["other"]:
        log.debug("%s: %d keys are for the %s and were not applied here", label, len(report["other"]),
                 "text encoder" if is_transformer else "transformer")
    if not layers and not report["other"]:
        raise WrongModelError(f"{label}: no layer of this LoRA matches a klein {what}: it looks made for "
                              f"{lora_family(tensors)}.")
    layers = {name: [a.scaled(strength) for a in adapters] for name, adapters in layers.items()}
    log.info("%s: applied to %d %s layers at strength %g", label, len(layers), what, strength)
    if is_transformer:
        return with_adapters(model, layers, label), report
    encoder = copy_encoder(model)
    encoder.model = with_adapters(model.model, layers, label)
    return encoder, report


def copy_encoder(encoder):
    """A KleinTextEncoder sharing the tokenizer and model, with its own prompt cache."""
    clone = copy.copy(encoder)
    clone._cache = {}
    return clone
