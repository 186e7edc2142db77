"""Prompt encoding: our Qwen3 encoder vs transformers' Qwen3ForCausalLM, same weights, same CPU, one process.

Measures the klein encode (template, 512 tokens, layers 9/18/27) against diffusers' reference routine
(`Flux2KleinPipeline._get_qwen3_prompt_embeds`, which runs every layer), and against transformers cut to the
same 27 layers (so the ratio shows the kernels, not only the skipped layers). Also reports the memory that
skipping layers 28-36 saves, measured on the bench file and computed for the real Qwen3-4B.

    python bench/text_encoder.py [--repeats 5] [--layers 36]

`--cpu-paths N` instead times the ways a bf16 file can compute on this CPU, at Qwen3-4B's real widths (N decoder
layers, 512 tokens, same weights), in interleaved rounds: the default, torch's plain bf16 matmuls
(KLEIN_CPU_PREPACK=0), bf16 layers widened to fp32 per call with bf16 activations, and the weights converted to
fp32 at load (as ComfyUI does on a CPU); per-round ratios to the last, and the weights' resident size. On a CPU
whose oneDNN has bf16 the default packs bf16 weights instead (see models/prepacked.py).
"""

import argparse
import statistics
import sys
import tempfile
import types
from pathlib import Path

import torch

import klein_nodes as kn
from machine import interleaved, machine_line, paired, paired_text
from klein_nodes.models.text_encoder import Qwen3, Qwen3Params
from klein_nodes.testing import QWEN3_CHAT_TEMPLATE, qwen3_config, write_text_encoder, write_tokenizer

PROMPT = "A watercolor fox curled up in a library, warm window light, dust in the air, " * 4


def load_reference(state, params, depth):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**{**qwen3_config(params), "num_hidden_layers": depth})
    model = Qwen3ForCausalLM(config).eval()
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


def weight_bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


def cpu_paths(layers, repeats):
    """The default against the alternatives for a bf16 Qwen3-4B on this CPU (see the module docstring)."""
    from klein_nodes.models import prepacked, text_encoder

    params = Qwen3Params(num_layers=layers)
    print(f"oneDNN bf16 on this CPU: {prepacked.native(torch.bfloat16)}; Qwen3-4B widths, {layers} layers, 512 tokens, "
          f"{repeats} interleaved rounds, ratio per round to fp32 weights: median (min-max)")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tokenizer(Path(tmp) / "tokenizer")
        path, _ = write_text_encoder(Path(tmp) / "qwen3.safetensors", params, dtype=torch.bfloat16)
        bf16 = kn.load_text_encoder(path, tokenizer=tokenizer, layers=(1, layers // 2, layers))
        fp32 = kn.load_text_encoder(path, tokenizer=tokenizer, dtype=torch.float32, layers=(1, layers // 2, layers))

    def encode(encoder, enabled=True, activations=None):
        def run():
            saved = prepacked._state["enabled"], text_encoder.prepacked
            prepacked._state["enabled"] = enabled
            if activations is not None:  # the layers still widen; the model keeps its activations in this dtype
                text_encoder.prepacked = types.SimpleNamespace(compute_dtype=lambda dtype, device: activations)
            try:
                encoder._cache.clear()
                return encoder.encode([PROMPT], layers=(1, layers // 2, layers))
            finally:
                prepacked._state["enabled"], text_encoder.prepacked = saved
        return run

    runs = {"default (bf16 file)": encode(bf16), "plain bf16 matmuls (KLEIN_CPU_PREPACK=0)": encode(bf16, False),
            "widened per call, bf16 activations": encode(bf16, activations=torch.bfloat16),
            "fp32 weights (converted at load)": encode(fp32)}
    with torch.inference_mode():
        reference = runs["fp32 weights (converted at load)"]().float()
        errors = {name: (run().float() - reference).abs().max().item() for name, run in runs.items()}
        times = interleaved(list(runs.values()), repeats)
    print(f"{'run':<44}{'median s':>10}  {'x fp32 weights':<20}{'max diff':>9}")
    for (name, _), t in zip(runs.items(), times):
        print(f"{name:<44}{statistics.median(t):>10.2f}  {paired_text(t, times[-1]):<20}{errors[name]:>9.1e}")
    print(f"weights resident: bf16 {weight_bytes(bf16.model) / 1e9:.2f} GB (+ {prepacked.PIECE_BYTES >> 20} MB of "
          f"scratch where it widens), fp32 {weight_bytes(fp32.model) / 1e9:.2f} GB")
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=36, help="decoder layers in the bench file (Qwen3-4B: 36)")
    parser.add_argument("--cpu-paths", type=int, metavar="N", help="time the CPU compute paths of a bf16 file instead")
    args = parser.parse_args()
    print(machine_line())
    if args.cpu_paths:
        return cpu_paths(args.cpu_paths, args.repeats)
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen2Tokenizer

    params = Qwen3Params(hidden_size=512, intermediate_size=1536, num_layers=args.layers, num_heads=8, num_kv_heads=4,
                         head_dim=64)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tokenizer(Path(tmp) / "tokenizer")
        path, state = write_text_encoder(Path(tmp) / "qwen3.safetensors", params, dtype=torch.float32)
        ours = kn.load_text_encoder(path, tokenizer=tokenizer)
        file_bytes = path.stat().st_size
        hf_tokenizer = Qwen2Tokenizer.from_pretrained(str(tokenizer))
        hf_tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
        full = load_reference(state, params, args.layers)
        cut = load_reference(state, params, 27)

        def encode_ours():
            ours._cache.clear()
            return ours.encode([PROMPT])

        def encode_with(model):
            return lambda: Flux2KleinPipeline._get_qwen3_prompt_embeds(model, hf_tokenizer, [PROMPT],
                                                                       dtype=torch.float32)

        with torch.inference_mode():
            error = (encode_ours() - encode_with(full)()).abs().max().item()
            t_ours, t_full, t_cut = interleaved([encode_ours, encode_with(full), encode_with(cut)], args.repeats)

    print(f"config: hidden {params.hidden_size}, {args.layers} layers, 512 tokens, fp32; {args.repeats} interleaved "
          "rounds, ratio per round: median (min-max)")
    print(f"max |ours - diffusers| = {error:.2e}")
    print(f"{'run':<42}{'median s':>10}  ours/ref")
    print(f"{'ours (27 layers)':<42}{statistics.median(t_ours):>10.3f}")
    print(f"{'diffusers routine, transformers (all layers)':<42}{statistics.median(t_full):>10.3f}  "
          f"{paired_text(t_ours, t_full)}")
    print(f"{'diffusers routine, transformers cut to 27':<42}{statistics.median(t_cut):>10.3f}  "
          f"{paired_text(t_ours, t_cut)}")
    ratio = paired(t_ours, t_full)[1]
    print(f"goal: ratio <= 1.0 vs the reference routine -> {ratio:.2f} ({'met' if ratio <= 1.0 else 'NOT met'})")

    loaded = weight_bytes(ours.model)
    print(f"bench file: {file_bytes / 2**20:.1f} MiB, loaded {loaded / 2**20:.1f} MiB "
          f"(saved {(file_bytes - loaded) / 2**20:.1f} MiB by skipping layers 28-{args.layers} and the final norm)")
    with torch.device("meta"):
        real_full, real_needed = Qwen3(Qwen3Params(num_layers=36)), Qwen3(Qwen3Params(num_layers=27))
    saved = (weight_bytes(real_full) - weight_bytes(real_needed)) // 2  # meta params are fp32; the file is bf16
    print(f"Qwen3-4B bf16: skipping layers 28-36 saves {saved / 1e9:.2f} GB of {weight_bytes(real_full) / 2e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
