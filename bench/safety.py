"""Cost of the safety checks next to one klein generation, side by side in one process (random weights at the real
widths: Qwen3-4B with all 36 layers, a ViT-Base classifier as Falconsai/nsfw_image_detection's, the full FLUX.2 VAE,
and klein 4B's blocks, timed one double and one single block and scaled to 5 + 20).

    python bench/safety.py --models DIR [--tokenizer DIR] [--size 512] [--repeats 2]

DIR holds text_encoders/qwen-bench.safetensors, diffusion_models/klein-bench.safetensors and vae/flux2-vae.safetensors
(bench/native_vs_pack.py writes them); the tokenizer is the real Qwen vocabulary (tokenizer.json or vocab + merges).
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import klein_nodes as kn
from machine import interleaved, machine_line, paired_text
from klein_nodes.models.vit import ViTParams
from klein_nodes.sampling.packing import image_ids, pack, text_ids
from klein_nodes.testing import write_tiny_vit

PROMPT = "A lighthouse keeper feeding a ginger cat on the rocks at dusk, warm light, watercolor on cream paper"


def block_times(transformer, size):
    """Seconds of one double and one single block in a forward at size x size with 512 text tokens."""
    side = size // 16
    x = pack(torch.randn(1, 128, side, side))
    ctx = torch.randn(1, 512, transformer.params.context_in_dim)
    spent = {}

    def hook(name):
        def before(module, args):
            spent[name] = -time.perf_counter()

        def after(module, args, output):
            spent[name] += time.perf_counter()
        return before, after

    for name, block in (("double", transformer.double_blocks[0]), ("single", transformer.single_blocks[0])):
        before, after = hook(name)
        block.register_forward_pre_hook(before)
        block.register_forward_hook(after)
    with torch.inference_mode():
        transformer(x, image_ids(side, side)[None], torch.tensor([1.0]), ctx, text_ids(512)[None])  # warm-up
        start = time.perf_counter()
        transformer(x, image_ids(side, side)[None], torch.tensor([1.0]), ctx, text_ids(512)[None])
        total = time.perf_counter() - start
    return spent["double"], spent["single"], total - spent["double"] - spent["single"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared/data/qwen25_tokenizer")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(machine_line())
    print(f"{args.size}x{args.size}, 4 steps, CPU; medians of {args.repeats} interleaved rounds, per-round ratios: "
          "median (min-max)")
    qwen = args.models / "text_encoders" / "qwen-bench.safetensors"
    encoder = kn.load_text_encoder(qwen, tokenizer=args.tokenizer)  # klein's 27 layers
    checker = kn.load_prompt_safety(encoder)  # + layers 28-36, final norm, tied head from the same file
    chat_tokens = checker.token_ids([PROMPT])[0].shape[1]
    encodes, checks = interleaved([lambda: encoder.encode([PROMPT + f" {time.time()}"], max_length=512),  # uncached
                                   lambda: checker([PROMPT])], args.repeats)
    encode_s, prompt_s = statistics.median(encodes), statistics.median(checks)
    vae = kn.load_vae(args.models / "vae" / "flux2-vae.safetensors", dtype=torch.float32)
    latent = torch.randn(1, 128, args.size // 16, args.size // 16)
    with tempfile.TemporaryDirectory() as tmp:
        image_checker = kn.load_image_safety(write_tiny_vit(Path(tmp) / "vit-base",
                                                            params=ViTParams()))  # Falconsai's size
    images = torch.rand(1, args.size, args.size, 3)
    with torch.inference_mode():
        decodes, image_checks = interleaved([lambda: vae.decode(latent), lambda: image_checker.classify(images)],
                                            args.repeats)
    decode_s, image_s = statistics.median(decodes), statistics.median(image_checks)
    transformer = kn.load_transformer(args.models / "diffusion_models" / "klein-bench.safetensors")
    double_s, single_s, rest_s = block_times(transformer, args.size)
    step_s = rest_s + 5 * double_s + 20 * single_s
    generation_s = encode_s + 4 * step_s + decode_s
    print(f"klein text encode (27 layers, 512 tokens) {encode_s:.2f} s; "
          f"transformer step (5 double x {double_s:.2f} s + "
          f"20 single x {single_s:.2f} s + {rest_s:.2f} s) {step_s:.1f} s; VAE decode {decode_s:.2f} s; one generation "
          f"{generation_s:.1f} s")
    print(f"prompt check (36 layers, {chat_tokens} chat tokens, {len(checker.yes + checker.no)} answer rows): "
          f"{prompt_s:.2f} s = "
          f"{paired_text(checks, encodes)}x the text encode, {prompt_s / generation_s:.3f}x one generation")
    print(f"image check (ViT-Base, 224x224): {image_s:.3f} s = "
          f"{paired_text(image_checks, decodes, 3)}x the VAE decode, "
          f"{image_s / generation_s:.4f}x one generation")


if __name__ == "__main__":
    main()
