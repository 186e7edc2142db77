"""Data the tests (and some benches and tools) share beyond the model files of klein_nodes.testing: the diffusers
VAE oracle and its BFL twin, one transformer forward on seeded inputs, natural photos (scikit-image), known edits
with their scores, and graph tweaks for random weights. Test dependencies only; never shipped with the pack.
Benches and tools import it by putting this folder on sys.path."""

import math
import time

import torch

from klein_nodes.models.autoencoder import AutoEncoderParams
from klein_nodes.testing import random_state_dict, vae_diffusers_config


TINY_VAE = AutoEncoderParams(ch=32, ch_mult=(1, 2), num_res_blocks=1, decoder_ch=32, decoder_ch_mult=(1, 2),
                             decoder_num_res_blocks=2)


def vae_diffusers_to_bfl(state, params):
    """A diffusers AutoencoderKLFlux2 state dict in BFL names (the layout of `ae.safetensors`), spelled out."""
    out = {}

    def move(src, dst, to_conv=False):
        for suffix in ("weight", "bias"):
            if f"{src}.{suffix}" in state:
                tensor = state[f"{src}.{suffix}"]
                out[f"{dst}.{suffix}"] = tensor[:, :, None, None] if to_conv and suffix == "weight" else tensor

    def resnet(src, dst):
        for name in ("norm1", "conv1", "norm2", "conv2"):
            move(f"{src}.{name}", f"{dst}.{name}")
        move(f"{src}.conv_shortcut", f"{dst}.nin_shortcut")

    def mid(src, dst):
        resnet(f"{src}.mid_block.resnets.0", f"{dst}.mid.block_1")
        resnet(f"{src}.mid_block.resnets.1", f"{dst}.mid.block_2")
        move(f"{src}.mid_block.attentions.0.group_norm", f"{dst}.mid.attn_1.norm")
        for q in ("q", "k", "v"):
            move(f"{src}.mid_block.attentions.0.to_{q}", f"{dst}.mid.attn_1.{q}", to_conv=True)
        move(f"{src}.mid_block.attentions.0.to_out.0", f"{dst}.mid.attn_1.proj_out", to_conv=True)

    for side in ("encoder", "decoder"):
        move(f"{side}.conv_in", f"{side}.conv_in")
        move(f"{side}.conv_norm_out", f"{side}.norm_out")
        move(f"{side}.conv_out", f"{side}.conv_out")
        mid(side, side)
    for level in range(len(params.ch_mult)):
        for block in range(params.num_res_blocks):
            resnet(f"encoder.down_blocks.{level}.resnets.{block}", f"encoder.down.{level}.block.{block}")
        move(f"encoder.down_blocks.{level}.downsamplers.0.conv", f"encoder.down.{level}.downsample.conv")
    levels = len(params.decoder_ch_mult)
    for k in range(levels):
        for block in range(params.decoder_num_res_blocks):
            resnet(f"decoder.up_blocks.{k}.resnets.{block}", f"decoder.up.{levels - 1 - k}.block.{block}")
        move(f"decoder.up_blocks.{k}.upsamplers.0.conv", f"decoder.up.{levels - 1 - k}.upsample.conv")
    move("quant_conv", "encoder.quant_conv")
    move("post_quant_conv", "decoder.post_quant_conv")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        out[f"bn.{name}"] = state[f"bn.{name}"]
    return out


def diffusers_vae(params=TINY_VAE, seed=0):
    """A random diffusers AutoencoderKLFlux2 with non-trivial batch-norm statistics (test dependency)."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(**vae_diffusers_config(params)).eval()
    state = random_state_dict(vae, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    state["bn.running_mean"] = 0.3 * torch.randn(state["bn.running_mean"].shape, generator=generator)
    state["bn.running_var"] = 0.5 + torch.rand(state["bn.running_var"].shape, generator=generator)
    state["bn.num_batches_tracked"] = torch.tensor(100)
    vae.load_state_dict(state)
    return vae


def sample_forward(model, height=2, width=3, text_tokens=5, sigma=0.5, seed=0):
    """One transformer forward on seeded random tokens (image grid height x width, `text_tokens` of context)."""
    from klein_nodes.sampling.packing import image_ids, text_ids

    generator = torch.Generator().manual_seed(seed)
    params = model.params
    x = torch.randn(1, height * width, params.in_channels, generator=generator)
    ctx = torch.randn(1, text_tokens, params.context_in_dim, generator=generator)
    with torch.inference_mode():
        return model(x, image_ids(height, width)[None], torch.tensor([sigma]), ctx, text_ids(text_tokens)[None])


PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "motorcycle", "rocket", "retina")


def natural_photo(name, size=1024):
    """One of scikit-image's colour test photos (a test dependency), centre-cropped and resized to size x size."""
    import numpy as np
    from PIL import Image
    from skimage import data

    pixels = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    image = Image.fromarray(pixels).convert("RGB")
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)))


def random_weight_thresholds(graph):
    """An API graph with its safety checks' thresholds at 0.99: random tiny models give arbitrary scores, so runs
    on them test the wiring, not the verdict."""
    for node in graph.values():
        if node.get("class_type") in ("KleinPromptCheck", "KleinImageCheck"):
            node["inputs"]["threshold"] = 0.99
    return graph


EDIT_BORDER = 24  # px of picture around the crop, for the shift to pull in


EDIT_COLOURS = {"gain": (1.06, 0.95, 0.92), "offset": (-0.02, 0.04, 0.02), "gamma": (0.9, 1.1, 1.05)}


EDIT_SHIFTS = [(2.37, -4.61), (-5.8, 3.15), (0.45, 0.7), (6.0, -5.5), (-1.25, -3.9), (4.6, 5.95), (-3.3, 1.8)]


def edit_blob(size, fraction, rng):
    """An irregular one-piece blob (a circle with random wobbles of its radius) covering `fraction` of the square."""
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx = rng.uniform(0.42, 0.58, 2)
    angle, radius = np.arctan2(yy - cy, xx - cx), np.hypot(yy - cy, xx - cx)
    wobble = sum(rng.uniform(0.08, 0.2) / k * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in range(2, 7))
    field = radius / (1 + wobble)
    return field <= np.quantile(field, fraction)


def edit_case(name, size=512, shift=(2.37, -4.61), fraction=0.15, kind="paste", colours=EDIT_COLOURS, seed=0):
    """A known edit of a natural photo: (original, edited, truth) as (size, size, 3) float32 tensors and the true
    change (bool array). The truth is the photo with a local change pasted in, with a soft edge: kind 'paste'
    (another photo's content), 'invert' (the photo itself, inverted) or 'none'. The edit is the truth moved by
    `shift` (content right by dx, down by dy) with scipy's order-5 spline on a larger crop (no border or wraparound
    enters, and it is not the bicubic the undo uses), put through a per-channel gain, offset and gamma and rounded
    to 8 bits, as a saved edit would be. Test dependencies: scipy, scikit-image."""
    import numpy as np
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    big = size + 2 * EDIT_BORDER
    photo = natural_photo(name, big).astype(np.float64) / 255
    if kind == "paste":
        content = natural_photo(PHOTOS[(PHOTOS.index(name) + 1) % len(PHOTOS)], big).astype(np.float64) / 255
    else:
        content = 1 - photo
    region = edit_blob(big, fraction * size**2 / big**2, rng) if kind != "none" else np.zeros((big, big), bool)
    alpha = ndimage.gaussian_filter(region.astype(np.float64), 1.0)[..., None]
    truth = photo * (1 - alpha) + content * alpha
    dx, dy = shift
    moved = np.stack([ndimage.shift(truth[..., c], (dy, dx), order=5, mode="nearest") for c in range(3)], -1)
    crop = (slice(EDIT_BORDER, EDIT_BORDER + size), slice(EDIT_BORDER, EDIT_BORDER + size))
    gain, offset, gamma = (np.asarray(colours[k]) for k in ("gain", "offset", "gamma"))
    edited = np.round(np.clip(gain * moved[crop].clip(0, 1) ** gamma + offset, 0, 1) * 255) / 255
    tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    return tensor(photo[crop]), tensor(edited), tensor(truth[crop]), alpha[crop][..., 0] > 0.5


def edit_scores(result, mask, info, original, truth, change, shift, feather=8):
    """Shift error per axis, IoU of mask > 0.5 with the change, PSNR inside the change (eroded by 3 px) against the
    truth, and whether everything farther than feather + 4 px from the change is the original, bit for bit."""
    import numpy as np
    from scipy import ndimage

    error = (abs(info["shift"][0] - shift[0]), abs(info["shift"][1] - shift[1]))
    found = mask.numpy() > 0.5
    iou = (found & change).sum() / max((found | change).sum(), 1)
    inner = ndimage.binary_erosion(change, iterations=3)
    mse = float(((result.numpy()[inner] - truth.numpy()[inner]) ** 2).mean())
    psnr = 10 * math.log10(1 / max(mse, 1e-12))
    reach = feather + 4  # the feather, the 1 px margin, 1 px of smoothing, the soft edge of the pasted blob
    far = ~ndimage.maximum_filter(change, size=2 * reach + 1)
    exact = np.array_equal(result.numpy()[far], original.numpy()[far])
    return error, iou, psnr, exact


def edit_colours(seed):
    """A per-channel tone change: gain 0.9-1.1, offset ±0.04, gamma 0.85-1.15."""
    import numpy as np

    rng = np.random.default_rng(100 + seed)
    return {"gain": rng.uniform(0.9, 1.1, 3), "offset": rng.uniform(-0.04, 0.04, 3),
            "gamma": rng.uniform(0.85, 1.15, 3)}


def refused_by_name(path, *fragments):
    """kn.load_transformer(path) raises one CheckpointError within 2 s: a single line starting with the path and
    holding every fragment. Returns the message."""
    import pytest  # here: the tools that read this module run in ComfyUI's Python, which has no pytest

    import klein_nodes as kn

    began = time.monotonic()
    with pytest.raises(kn.CheckpointError) as info:
        kn.load_transformer(path)
    assert time.monotonic() - began < 2
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message
