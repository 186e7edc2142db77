"""Write quantized klein files: GGUF (Q8_0, Q6_K, Q5_K, Q4_K, Q4_0, ...) or fp8 safetensors, from a
BFL/ComfyUI transformer or a Qwen3 text encoder. Like the published files, only the large block linears are
quantized; embeddings, modulation, input/output projections stay BF16 and norms F32."""

import json
import os
from pathlib import Path

import torch

from ..errors import KleinError
from ..quant.dequant import BLOCK_SIZES
from ..quant.quantize import quantize
from .checkpoint import MODEL_PREFIXES, open_checkpoint
from .detect import identify
from .gguf import hf_to_llama
from .tokenizer import find_tokenizer

GGUF_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
OUTPUT_TYPES = GGUF_TYPES + ("fp8",)
KEEP_BF16 = ("img_in.", "txt_in.", "time_in.", "guidance_in.", "final_layer.", "double_stream_modulation",
             "single_stream_modulation")
def tensor_type(name, tensor, qtype, text_encoder):
    """The GGML type a tensor is written in."""
    if tensor.ndim == 1:
        return "F32"
    if not text_encoder and name.startswith(KEEP_BF16):
        return "BF16"
    if text_encoder and "embed_tokens" in name and qtype not in ("Q8_0", "Q6_K"):
        qtype = "Q6_K"  # token embeddings are sensitive: at least 6 bits, as published encoders do
    for candidate in (qtype, "Q8_0"):  # rows that don't fit the type's blocks fall back to Q8_0, then BF16
        if tensor.shape[-1] % BLOCK_SIZES[candidate][0] == 0:
            return candidate
    return "BF16"


def read_model(path):
    """(kind, {name: tensor}) from a transformer (BFL names) or a Qwen3 encoder (HF names) safetensors file."""
    ckpt = open_checkpoint(path, "transformer", "diffusion_pytorch_model", MODEL_PREFIXES)
    kind = identify(ckpt.shapes())
    if (kind.kind, kind.family) == ("transformer", "flux2") and kind.layout == "bfl":
        return "transformer", {name: ckpt.get(name) for name in ckpt.keys()}
    if (kind.kind, kind.family) == ("text_encoder", "qwen3"):
        return "text_encoder", {name: ckpt.get(name) for name in ckpt.keys() if name != "lm_head.weight"}
    raise KleinError(f"{path}: this is {kind.description}; the quantizer takes a FLUX.2 transformer in the BFL/ComfyUI "
                     "layout or a Qwen3 text encoder (safetensors)")


def text_encoder_metadata(writer, tensors, tokenizer_dir):
    head_dim = tensors["model.layers.0.self_attn.q_norm.weight"].shape[0]
    hidden = tensors["model.embed_tokens.weight"].shape[1]
    layers = 1 + max(int(n.split(".")[2]) for n in tensors if n.startswith("model.layers."))
    writer.add_block_count(layers)
    writer.add_context_length(40960)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(tensors["model.layers.0.mlp.gate_proj.weight"].shape[0])
    writer.add_head_count(tensors["model.layers.0.self_attn.q_proj.weight"].shape[0] // head_dim)
    writer.add_head_count_kv(tensors["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "vocab.json").is_file():
        vocab = json.loads((Path(tokenizer_dir) / "vocab.json").read_text(encoding="utf-8"))
        config_path = Path(tokenizer_dir) / "tokenizer_config.json"
        added = (json.loads(config_path.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
                 if config_path.exists() else {})
        for index, token in added.items():
            vocab[token["content"]] = int(index)
        size = tensors["model.embed_tokens.weight"].shape[0]
        tokens = [f"[PAD{i}]" for i in range(size)]
        for token, index in vocab.items():
            tokens[index] = token
        special = {int(i) for i in added}
        merges = [line for line in (Path(tokenizer_dir) / "merges.txt").read_text(encoding="utf-8").splitlines()
                  if line and not line.startswith("#version")]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(tokens)
        writer.add_token_types([3 if i in special else (5 if t.startswith("[PAD") else 1)
                                for i, t in enumerate(tokens)])
        writer.add_token_merges(merges)


def write_gguf(path, kind, tensors, qtype, tokenizer_dir):
    import gguf

    writer = gguf.GGUFWriter(str(path), "flux" if kind == "transformer" else "qwen3")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if kind == "text_encoder":
        text_encoder_metadata(writer, tensors, tokenizer_dir)
    for name, tensor in tensors.items():
        kind_type = tensor_type(name, tensor, qtype, kind == "text_encoder")
        values = tensor.float().numpy()
        data = values if kind_type == "F32" else quantize(values, kind_type)
        target = hf_to_llama(name) if kind == "text_encoder" else name
        if target is None:
            raise KleinError(f"'{name}' has no llama.cpp name; is this a plain Qwen3 text encoder?")
        writer.add_tensor(target, data,
                          raw_dtype=None if kind_type == "F32" else gguf.GGMLQuantizationType[kind_type])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


FP8_MARKER = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)


def in_fp8(kind, name, tensor):
    """Whether a tensor of a `kind` ("transformer" or "text_encoder") model is quantized in scaled (fp8, nvfp4)
    files: the 2-D weights of the block linears, as the published files choose."""
    return (tensor.ndim == 2 and name.endswith(".weight") and "embed_tokens" not in name
            and not (kind == "transformer" and name.startswith(KEEP_BF16)))


def fp8_tensors(kind, tensors):
    """Quantized 2-D weights as float8_e4m3fn with a per-tensor `weight_scale` (amax/448), and ComfyUI's
    `comfy_quant` marker per layer, so that ComfyUI's own loaders apply the scale too (without the marker they
    would read the fp8 values unscaled)."""
    out = {}
    for name, tensor in tensors.items():
        if not in_fp8(kind, name, tensor):
            out[name] = tensor.float() if tensor.ndim == 1 else tensor.bfloat16()
            continue
        scale = (tensor.float().abs().max() / 448).clamp_min(1e-12)
        out[name] = (tensor.float() / scale).to(torch.float8_e4m3fn)
        layer = name[: -len(".weight")]
        out[layer + ".weight_scale"] = scale.reshape(())
        out[layer + ".comfy_quant"] = FP8_MARKER.clone()
    return out


def quantize_file(source, output, qtype, tokenizer=None):
    """Quantize `source` into `output` (never overwritten; written to a temporary file, then renamed)."""
    if qtype not in OUTPUT_TYPES:
        raise KleinError(f"unknown quantization type {qtype!r}; choose one of {', '.join(OUTPUT_TYPES)}")
    output = Path(output)
    expected_suffix = ".safetensors" if qtype == "fp8" else ".gguf"
    if output.suffix != expected_suffix:
        raise KleinError(f"{output}: a {qtype} file must end in {expected_suffix}")
    if output.exists():
        raise KleinError(f"{output} already exists; choose another output name")
    kind, tensors = read_model(source)
    if tokenizer is None and kind == "text_encoder":
        try:
            tokenizer = find_tokenizer(source)
        except KleinError:
            tokenizer = None
    temp = output.with_name(f".{output.name}.tmp")
    try:
        if qtype == "fp8":
            from safetensors.torch import save_file

            save_file(fp8_tensors(kind, tensors), str(temp))
        else:
            write_gguf(temp, kind, tensors, qtype, tokenizer)
        os.replace(temp, output)
    finally:
        temp.unlink(missing_ok=True)
    return output, kind
