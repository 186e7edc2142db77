"""Tiny random models written in the real file layouts: for `generate --tiny-random`, the tests, the benches and
the real-server tools (tests/helpers.py holds what only those need beyond model files).

Key names, dtypes and file formats are those of the published klein files (BFL/ComfyUI single files, diffusers
folders, GGUF, tokenizer files, the safety classifier's folder); only the sizes are small. The diffusers layout is
produced with diffusers' own converter (a test dependency), not with ours.
"""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from .loaders.tokenizer import QWEN3_ADDED_TOKENS
from .models.autoencoder import AutoEncoder, AutoEncoderParams
from .models.text_encoder import Qwen3, Qwen3Params
from .models.transformer import Flux2, Flux2Params
from .models.vit import ViTParams


TINY_TRANSFORMER = Flux2Params(
    in_channels=128,
    out_channels=128,
    context_in_dim=96,
    hidden_size=64,
    num_heads=2,
    depth=2,
    depth_single_blocks=2,
    mlp_hidden_dim=192,
    axes_dim=(8, 8, 8, 8),
)


# the smallest transformer ComfyUI's own klein detection accepts: heads of 128, mlp ratio 3
CORE_TINY_TRANSFORMER = Flux2Params(**{**TINY_TRANSFORMER.__dict__, "hidden_size": 256, "num_heads": 2,
                                       "mlp_hidden_dim": 768, "axes_dim": (32, 32, 32, 32)})


def random_state_dict(module, seed=0, dtype=torch.float32):
    """Random weights for every tensor of `module` (meta is fine): matrices ~ N(0, 1/fan_in), norms ~ 1 ± 0.1."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, ref in module.state_dict().items():
        if ref.ndim >= 2:
            fan_in = math.prod(ref.shape[1:])
            tensor = torch.randn(ref.shape, generator=generator) / math.sqrt(fan_in)
        else:
            tensor = 1 + 0.1 * torch.randn(ref.shape, generator=generator)
        state[name] = tensor.to(dtype)
    return state


def transformer_state_dict(params=TINY_TRANSFORMER, seed=0, dtype=torch.float32):
    """A random FLUX.2 transformer in the BFL/ComfyUI layout."""
    with torch.device("meta"):
        model = Flux2(params)
    return random_state_dict(model, seed, dtype)


def bfl_to_diffusers(state):
    """BFL -> diffusers names through diffusers' single-file converter (the reference mapping)."""
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    return convert_flux2_transformer_checkpoint_to_diffusers(dict(state))


def vae_diffusers_config(params):
    """diffusers' AutoencoderKLFlux2 arguments for a VAE of these params."""
    return {"block_out_channels": [params.ch * m for m in params.ch_mult],
            "decoder_block_out_channels": [params.decoder_ch * m for m in params.decoder_ch_mult],
            "down_block_types": ["DownEncoderBlock2D"] * len(params.ch_mult),
            "up_block_types": ["UpDecoderBlock2D"] * len(params.decoder_ch_mult),
            "layers_per_block": params.num_res_blocks, "latent_channels": params.z_channels,
            "norm_num_groups": params.norm_groups, "batch_norm_eps": params.bn_eps}


def diffusers_config(params):
    return {
        "_class_name": "Flux2Transformer2DModel",
        "patch_size": 1,
        "in_channels": params.in_channels,
        "out_channels": params.out_channels,
        "num_layers": params.depth,
        "num_single_layers": params.depth_single_blocks,
        "attention_head_dim": params.head_dim,
        "num_attention_heads": params.num_heads,
        "joint_attention_dim": params.context_in_dim,
        "timestep_guidance_channels": params.time_dim,
        "mlp_ratio": params.mlp_hidden_dim / params.hidden_size,
        "axes_dims_rope": list(params.axes_dim),
        "rope_theta": params.theta,
        "guidance_embeds": params.use_guidance_embed,
    }


def write_sharded(folder, state, weights_name, num_shards=2, config=None):
    """Write a diffusers component folder: `<name>-0000i-of-0000n.safetensors` + index json (+ config.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    weight_map = {}
    for i in range(num_shards):
        shard = f"{weights_name}-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: state[n].clone() for n in names[i::num_shards]}
        save_file(part, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{weights_name}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def write_transformer(path, params=TINY_TRANSFORMER, layout="bfl", dtype=torch.bfloat16, seed=0, prefix=""):
    """Write a random transformer: layout 'bfl' (single file, optional `model.diffusion_model.` prefix) or
    'diffusers' (a sharded `transformer/` folder at `path`). Returns (path, BFL-named fp32 state dict)."""
    state = transformer_state_dict(params, seed)
    path = Path(path)
    if layout == "bfl":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({prefix + k: v.to(dtype) for k, v in state.items()}, str(path))
    elif layout == "diffusers":
        converted = {k: v.to(dtype) for k, v in bfl_to_diffusers(state).items()}
        write_sharded(path, converted, "diffusion_pytorch_model", config=diffusers_config(params))
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return path, state


TINY_QWEN3 = Qwen3Params(vocab_size=151936, hidden_size=32, intermediate_size=64, num_layers=4, num_heads=4,
                         num_kv_heads=2, head_dim=16)


QWEN_ADDED_TOKENS = [text for text, _ in QWEN3_ADDED_TOKENS]


QWEN3_CHAT_TEMPLATE = (  # the part of Qwen3's template klein uses: user turn, generation prompt, empty think block
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def qwen3_state_dict(params=TINY_QWEN3, seed=0, dtype=torch.float32):
    """A random Qwen3 in Hugging Face names (`model.` prefix, no lm_head: klein's encoders tie it)."""
    with torch.device("meta"):
        model = Qwen3(params)
    return {"model." + k: v for k, v in random_state_dict(model, seed, dtype).items()} | {
        "model.norm.weight": torch.ones(params.hidden_size, dtype=dtype)}


def qwen3_config(params):
    return {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": params.vocab_size,
            "hidden_size": params.hidden_size, "intermediate_size": params.intermediate_size,
            "num_hidden_layers": params.num_layers, "num_attention_heads": params.num_heads,
            "num_key_value_heads": params.num_kv_heads, "head_dim": params.head_dim, "rope_theta": params.rope_theta,
            "rms_norm_eps": params.rms_norm_eps, "tie_word_embeddings": True, "attention_bias": False}


def write_tokenizer(folder):
    """A small byte-level BPE in the Qwen file layout (vocab.json, merges.txt, tokenizer_config.json), with the
    real added-token ids 151643-151668, for tests that must not depend on the full vocabulary."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = [chr(c) for c in range(ord("!"), ord("~") + 1)] + [chr(c) for c in range(ord("¡"), ord("¬") + 1)]
    alphabet += [chr(c) for c in range(ord("®"), ord("ÿ") + 1)]
    alphabet += [chr(256 + n) for n in range(256 - len(alphabet))]  # byte-level stand-ins for unprintable bytes
    merges = ["Ġ a", "Ġ t", "h e", "Ġt he", "i n", "Ġ c", "a t", "Ġc at", "Ċ Ċ", "o n", "Ġ d", "o g"]
    vocab = {token: i for i, token in enumerate(alphabet)}
    for merge in merges:
        vocab["".join(merge.split(" "))] = len(vocab)
    vocab.update({token: 151643 + i for i, token in enumerate(QWEN_ADDED_TOKENS)})
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    added = {str(151643 + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                               "single_word": False, "special": True} for i, t in enumerate(QWEN_ADDED_TOKENS)}
    config = {"added_tokens_decoder": added, "tokenizer_class": "Qwen2Tokenizer", "pad_token": "<|endoftext|>",
              "eos_token": "<|im_end|>", "chat_template": QWEN3_CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    return folder


def write_text_encoder(path, params=TINY_QWEN3, layout="comfy", dtype=torch.bfloat16, seed=0):
    """Write a random Qwen3: 'comfy' (single `qwen_3_4b.safetensors`-style file) or 'hf' (a sharded
    `text_encoder/` folder at `path` with config.json). Returns (path, fp32 state dict in HF names)."""
    state = qwen3_state_dict(params, seed)
    path = Path(path)
    if layout == "comfy":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.to(dtype) for k, v in state.items()}, str(path))
    elif layout == "hf":
        write_sharded(path, {k: v.to(dtype) for k, v in state.items()}, "model", config=qwen3_config(params))
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return path, state


# The real four VAE levels (16 image pixels per latent pixel) with narrow channels: for end-to-end runs at real sizes.
TINY_VAE16 = AutoEncoderParams(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, decoder_ch=32,
                               decoder_ch_mult=(1, 1, 1, 1), decoder_num_res_blocks=2)


def write_vae(path, params=TINY_VAE16, seed=0, dtype=torch.float32):
    """A random FLUX.2 VAE in the BFL layout (`ae.safetensors`), with positive batch-norm variances."""
    with torch.device("meta"):
        model = AutoEncoder(params)
    state = random_state_dict(model, seed, dtype)
    state["bn.running_var"] = state["bn.running_var"].abs().float() + 0.5
    state["bn.running_mean"] = state["bn.running_mean"].float() - 1
    state["bn.num_batches_tracked"] = torch.tensor(0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return Path(path)


def write_tiny_model_set(folder, seed=0):
    """Transformer, Qwen3 (28 layers, so klein's layer 27 exists), VAE and tokenizer, all tiny and random, in
    ComfyUI's folder layout under `folder`. Returns the three weight paths."""
    folder = Path(folder)
    models = folder / "models"
    transformer, _ = write_transformer(models / "diffusion_models" / "flux-2-klein-tiny.safetensors", seed=seed)
    text_encoder, _ = write_text_encoder(models / "text_encoders" / "qwen3-tiny.safetensors",
                                         Qwen3Params(**{**TINY_QWEN3.__dict__, "num_layers": 28}), seed=seed)
    bundled = folder / "comfy" / "text_encoders" / "qwen25_tokenizer"
    if not (bundled / "vocab.json").exists():  # a real ComfyUI already has the real one
        write_tokenizer(bundled)
    vae = write_vae(models / "vae" / "flux2-vae-tiny.safetensors", seed=seed)
    return transformer, text_encoder, vae


def write_workflow_models(root):
    """Tiny models under the file names the example workflows use, in ComfyUI's layout under `root` (models/...
    and the bundled tokenizer at comfy/text_encoders/qwen25_tokenizer): bf16 files, our own Q4_K GGUF quantizations
    of them, and two LoRAs."""
    from .loaders.convert import quantize_file

    root = Path(root)
    models = root / "models"
    write_transformer(models / "diffusion_models" / "flux-2-klein-4b.safetensors")
    write_transformer(models / "diffusion_models" / "flux-2-klein-base-4b.safetensors", seed=1)
    write_text_encoder(models / "text_encoders" / "qwen_3_4b.safetensors",
                       params=Qwen3Params(**{**TINY_QWEN3.__dict__, "num_layers": 28}))
    write_tokenizer(root / "comfy" / "text_encoders" / "qwen25_tokenizer")
    write_vae(models / "vae" / "flux2-vae.safetensors")
    for folder, name in (("diffusion_models", "flux-2-klein-4b"), ("text_encoders", "qwen_3_4b")):
        quantize_file(models / folder / f"{name}.safetensors", models / folder / f"{name}-Q4_K.gguf", "Q4_K")
    write_workflow_loras(models / "loras")
    write_tiny_vit(models / "safety" / "nsfw_image_detection")
    return root


def write_workflow_loras(folder):
    """A ComfyUI-named LoRA on transformer and text encoder layers, and a BFL-named LoKr."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=generator) * 0.2  # noqa: E731
    style = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": randn(4, 64),
             "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": randn(192, 4),
             "text_encoders.qwen3_4b.transformer.model.layers.3.mlp.down_proj.lora_A.weight": randn(4, 64),
             "text_encoders.qwen3_4b.transformer.model.layers.3.mlp.down_proj.lora_B.weight": randn(32, 4)}
    save_file(style, str(Path(folder) / "klein_style_lora.safetensors"))
    save_file({"diffusion_model.single_blocks.1.linear1.lokr_w1": randn(4, 4),
               "diffusion_model.single_blocks.1.linear1.lokr_w2": randn(144, 16)},
              str(Path(folder) / "klein_detail_lokr.safetensors"))


def write_workflow_inputs(folder):
    """The images the example workflows load: four references, an RGBA inpainting source (right half transparent:
    repaint it), and the outpainting and upscaling sources."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(folder / f"reference_{k + 1}.png")
    rgba = rng.integers(0, 255, (64, 64, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:, 32:, 3] = 0
    Image.fromarray(rgba, "RGBA").save(folder / "inpaint_source.png")
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(folder / "outpaint_source.png")
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / "upscale_source.png")


# byte offsets of the fp16 scale fields per GGML block: random blocks get small finite scales there
GGML_HALF_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "IQ4_NL": (0,),
                    "IQ4_XS": (0,), "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def ggml_pack(tensor, qtype, seed=0):
    """fp32 tensor -> GGML bytes of `qtype` (gguf-py quantizes what it can; other types get random blocks with
    small scales, whose dequantized values then define the weight). Test dependency: gguf."""
    import gguf
    import numpy as np

    values = tensor.float().numpy()
    kind = gguf.GGMLQuantizationType[qtype]
    try:
        return gguf.quants.quantize(values, kind)
    except NotImplementedError:
        from .quant.dequant import BLOCK_SIZES

        block_size, type_size = BLOCK_SIZES[qtype]
        rng = np.random.default_rng(seed)
        blocks = rng.integers(0, 256, (values.size // block_size, type_size), dtype=np.uint8)
        for offset in GGML_HALF_FIELDS.get(qtype, ()):
            halves = (rng.standard_normal(len(blocks)) * 3e-4).astype(np.float16)
            blocks[:, offset: offset + 2] = halves[:, None].view(np.uint8)
        if qtype == "NVFP4":  # small unsigned e4m3 sub-scales (2^-6 .. 2^-5)
            blocks[:, :4] = rng.integers(0x08, 0x10, (len(blocks), 4), dtype=np.uint8)
        return blocks.reshape(*values.shape[:-1], -1)


def write_gguf(path, state, types, arch, rename=lambda name: name, metadata=None):
    """Write `state` (fp32, our/HF names) as GGUF: `types(name, tensor)` gives each tensor's GGML type name.
    Returns the dequantized fp32 twin (what the file holds), keyed like `state`. Test dependency: gguf."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in (metadata or {}).items():
        getattr(writer, f"add_{key}")(value)
    twin = {}
    for seed, (name, tensor) in enumerate(state.items()):
        qtype = types(name, tensor)
        kind = gguf.GGMLQuantizationType[qtype]
        if qtype == "F32":
            data = tensor.float().numpy()
            writer.add_tensor(rename(name), data)
        else:
            data = ggml_pack(tensor, qtype, seed)
            writer.add_tensor(rename(name), data, raw_dtype=kind)
        twin[name] = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, kind)).astype(np.float32)
                                      .reshape(tensor.shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return twin


TINY_VIT = ViTParams(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, image_size=32, patch_size=8)


def write_tiny_vit(folder, seed=0, params=TINY_VIT):
    """A random ViT image classifier in Falconsai/nsfw_image_detection's file layout: config.json (labels normal /
    nsfw), preprocessor_config.json (ViTImageProcessor, bilinear resize, mean/std 0.5) and model.safetensors."""
    from .models.vit import ViT

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    p = params
    with torch.device("meta"):
        model = ViT(p)
    state = random_state_dict(model, seed)
    save_file(state, str(folder / "model.safetensors"))
    config = {"architectures": ["ViTForImageClassification"], "model_type": "vit", "hidden_size": p.hidden_size,
              "num_hidden_layers": p.num_layers, "num_attention_heads": p.num_heads,
              "intermediate_size": p.intermediate_size, "hidden_act": "gelu", "image_size": p.image_size,
              "patch_size": p.patch_size, "num_channels": 3, "layer_norm_eps": p.layer_norm_eps, "qkv_bias": True,
              "id2label": {"0": "normal", "1": "nsfw"}, "label2id": {"normal": 0, "nsfw": 1},
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    processor = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "resample": 2, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
                 "image_std": [0.5, 0.5, 0.5], "size": {"height": p.image_size, "width": p.image_size}}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=1))
    return folder
