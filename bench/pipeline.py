"""End to end (encode prompt + 4 steps + decode): our KleinPipeline vs diffusers' Flux2KleinPipeline.

Both load the same random tiny-mid components from one diffusers repo folder and run interleaved in one
process, same latents and prompt; outputs are compared first. Our prompt cache is cleared before every run so
both encode the prompt each time (a second column shows a re-run with the cache, as in ComfyUI re-runs).

    python bench/pipeline.py [--repeats 5] [--size 256]
"""

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import klein_nodes as kn
from machine import interleaved, machine_line, paired_text
from klein_nodes.models.autoencoder import AutoEncoderParams
from klein_nodes.models.text_encoder import Qwen3Params
from klein_nodes.models.transformer import Flux2Params
from klein_nodes.testing import (QWEN3_CHAT_TEMPLATE, bfl_to_diffusers, diffusers_config, qwen3_config,
                                 qwen3_state_dict, transformer_state_dict, write_tokenizer)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # for helpers.py
from helpers import diffusers_vae  # noqa: E402

TRANSFORMER = Flux2Params(context_in_dim=768, hidden_size=384, num_heads=3, depth=2, depth_single_blocks=4,
                          mlp_hidden_dim=1152)
TEXT_ENCODER = Qwen3Params(hidden_size=256, intermediate_size=768, num_layers=28, num_heads=4, num_kv_heads=2,
                           head_dim=64)
VAE = AutoEncoderParams(ch=64, ch_mult=(1, 2, 2, 2), num_res_blocks=1, decoder_ch=64, decoder_ch_mult=(1, 2, 2, 2),
                        decoder_num_res_blocks=2)
PROMPT = "A paper boat on a puddle after the rain, reflections of street lights, 35mm photo"


def build_repo(root):
    import diffusers
    import transformers

    transformer = diffusers.Flux2Transformer2DModel(**{k: v for k, v in diffusers_config(TRANSFORMER).items()
                                                       if not k.startswith("_")})
    transformer.load_state_dict(bfl_to_diffusers(transformer_state_dict(TRANSFORMER, seed=1)))
    transformer.save_pretrained(root / "transformer")
    text_encoder = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**qwen3_config(TEXT_ENCODER)))
    text_encoder.load_state_dict(qwen3_state_dict(TEXT_ENCODER, seed=2), strict=False)
    text_encoder.save_pretrained(root / "text_encoder")
    write_tokenizer(root / "tokenizer")
    diffusers_vae(VAE, seed=3).save_pretrained(root / "vae")
    diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential").save_pretrained(
        root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline", "is_distilled": True}))


def load_reference(root):
    import diffusers
    import transformers

    tokenizer = transformers.Qwen2Tokenizer.from_pretrained(str(root / "tokenizer"))
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    pipeline = diffusers.Flux2KleinPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
        vae=diffusers.AutoencoderKLFlux2.from_pretrained(root / "vae"),
        text_encoder=transformers.Qwen3ForCausalLM.from_pretrained(root / "text_encoder"), tokenizer=tokenizer,
        transformer=diffusers.Flux2Transformer2DModel.from_pretrained(root / "transformer"), is_distilled=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, default=256, help="output side in pixels (multiple of 16)")
    args = parser.parse_args()
    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="klein-pipeline-bench-") as tmp:
        root = Path(tmp)
        build_repo(root)
        reference = load_reference(root)
        ours = kn.KleinPipeline(kn.load_transformer(root), kn.load_text_encoder(root), kn.load_vae(root))
    latents = torch.randn(1, 128, args.size // 16, args.size // 16, generator=torch.Generator().manual_seed(0))

    def run_reference():
        return reference(prompt=PROMPT, height=args.size, width=args.size, num_inference_steps=4, guidance_scale=1.0,
                         latents=latents, output_type="pt").images

    def run_ours(cached=False):
        if not cached:
            ours.text_encoder._cache.clear()
        return ours(PROMPT, width=args.size, height=args.size, steps=4, noise=latents).permute(0, 3, 1, 2)

    runs = {"ours": run_ours, "diffusers": run_reference, "ours, prompt cached": lambda: run_ours(cached=True)}
    with torch.inference_mode():
        error = (run_ours() - run_reference()).abs().max().item()
        times = dict(zip(runs, interleaved(list(runs.values()), args.repeats, warmup=0)))
    print(f"{args.size}x{args.size}, 4 steps, fp32; transformer hidden {TRANSFORMER.hidden_size}, Qwen3 hidden "
          f"{TEXT_ENCODER.hidden_size} x {TEXT_ENCODER.num_layers} layers, VAE ch {VAE.ch}; {args.repeats} interleaved "
          "rounds; ratio to diffusers per round: median (min-max)")
    print(f"max |ours - diffusers| = {error:.2e}")
    for name, samples in times.items():
        print(f"{name:<22}{statistics.median(samples):>8.3f} s   ratio {paired_text(samples, times['diffusers'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
