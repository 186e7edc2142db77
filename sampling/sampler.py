"""The klein denoising loop: Euler on the predicted velocity, fp32 latents, optional true CFG, references,
img2img start and inpainting blend (klein-spec §6-7)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import KleinError
from ..models.adapters import prepare_device, release_adapters
from ..models.offload import compute_device
from .packing import image_ids, pack, pack_references, text_ids, unpack
from .schedule import get_schedule


class Cancelled(KleinError):
    """Raised by a progress callback (or a ComfyUI interrupt) to stop sampling between steps."""


@dataclass
class Step:
    """What a progress callback receives after each step."""

    index: int  # 1-based
    total: int
    sigma: float
    denoised: torch.Tensor  # current x0 estimate, (B, 128, h, w)

    def preview(self):
        from .preview import latent_preview

        return latent_preview(self.denoised)


@dataclass
class Conditioning:
    """Prompt embeddings (B or 1, Lt, C) and optional reference latents [(1, 128, h, w), ...]."""

    embeddings: torch.Tensor
    references: tuple = ()


def denoise_latents(transformer, noise, positive, steps, denoise=1.0, negative=None, guidance=1.0, init_latents=None,
                    mask=None, callback=None):
    """The sampling step Klein Sampler and KleinPipeline share: klein's schedule for `noise`'s latent grid (shifted
    by its size, cut short by `denoise` < 1), then `sample` along it."""
    sigmas = get_schedule(steps, noise.shape[-2] * noise.shape[-1], denoise)
    return sample(transformer, noise, positive, sigmas, negative, guidance, init_latents, mask, callback)


@torch.inference_mode()
def sample(transformer, noise, positive, sigmas, negative=None, guidance=1.0, init_latents=None, mask=None,
           callback=None):
    """Denoise `noise` (B, 128, h, w) along `sigmas` and return fp32 latents (B, 128, h, w).

    guidance > 1 runs true CFG against `negative` (required then). `init_latents` (img2img / inpainting) start the
    run at sigmas[0] mixed with the noise; `mask` ((B,) H, W at any resolution, bilinearly resized to the latent
    grid; 1 = repaint) keeps the rest of
    `init_latents` by blending after every step.
    """
    batch, _, height, width = noise.shape
    device = compute_device(transformer)
    dtype = transformer.dtype
    use_cfg = guidance > 1.0
    if use_cfg and negative is None:
        raise KleinError("guidance > 1 needs a negative conditioning (the base model's default is the empty prompt)")
    noise_tokens = pack(noise.float()).to(device)
    ids = image_ids(height, width).to(device)
    x0_tokens = None if init_latents is None else pack(init_latents.float().expand(batch, -1, -1, -1)).to(device)
    if mask is not None:
        mask = torch.as_tensor(mask, dtype=torch.float32)
        mask = F.interpolate(mask.reshape(-1, 1, *mask.shape[-2:]), size=(height, width), mode="bilinear")
    mask_tokens = None if mask is None else pack(mask.expand(batch, 1, height, width)).to(device)
    if mask_tokens is not None and x0_tokens is None:
        raise KleinError("an inpainting mask needs the image latents to keep (init_latents)")
    x = noise_tokens if x0_tokens is None else sigmas[0] * noise_tokens + (1 - sigmas[0]) * x0_tokens

    branches = [prepare_branch(positive, batch, ids, device, dtype)]
    if use_cfg:
        branches.append(prepare_branch(negative, batch, ids, device, dtype))
    try:
        prepare_device(transformer, device, transformer.dtype)  # no copy to the device inside the loop
        for index, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:]), start=1):
            timesteps = torch.full((batch,), sigma, device=device)
            velocities = [predict(transformer, x, timesteps, branch) for branch in branches]
            velocity = velocities[0] if not use_cfg else velocities[1] + guidance * (velocities[0] - velocities[1])
            x = x + (sigma_next - sigma) * velocity
            if mask_tokens is not None:
                kept = sigma_next * noise_tokens + (1 - sigma_next) * x0_tokens
                x = (1 - mask_tokens) * kept + mask_tokens * x
            if callback is not None:
                denoised = x if sigma_next == 0 else x - sigma_next * velocity
                callback(Step(index, len(sigmas) - 1, sigma_next, unpack(denoised, height, width)))
    finally:
        release_adapters(transformer)  # their device copies were for this run
    return unpack(x, height, width)


def prepare_branch(conditioning, batch, ids, device, dtype):
    """Context, ids and reference tokens for one CFG branch, already batched and on the device."""
    context = conditioning.embeddings.to(device=device, dtype=dtype)
    if context.shape[0] not in (1, batch):
        raise KleinError(f"conditioning has batch {context.shape[0]} but the latents have batch {batch}")
    context = context.expand(batch, -1, -1)
    if conditioning.references:
        ref_tokens, ref_ids = pack_references([r.float() for r in conditioning.references])
        ref_tokens = ref_tokens.to(device=device, dtype=dtype).expand(batch, -1, -1)
        all_ids = torch.cat((ids, ref_ids.to(device)))
    else:
        ref_tokens, all_ids = None, ids
    return context, text_ids(context.shape[1]).to(device), ref_tokens, all_ids


def predict(transformer, x, timesteps, branch):
    """Velocity for the image tokens (reference tokens are fed, then dropped), fp32."""
    context, context_ids, ref_tokens, ids = branch
    tokens = x.to(transformer.dtype)
    if ref_tokens is not None:
        tokens = torch.cat((tokens, ref_tokens), dim=1)
    batch = x.shape[0]
    out = transformer(tokens, ids.expand(batch, -1, -1), timesteps, context, context_ids.expand(batch, -1, -1))
    return out[:, : x.shape[1]].float()
