"""`KleinPipeline`: prompt (+ references) -> images, on the engine's own components."""

import contextlib
import logging
from collections.abc import Callable

import torch

from ..arguments import device_argument, integer, number, one_of, shown, tensor_argument
from ..errors import KleinError, WrongModelError
from ..models import pages, prepacked
from ..models.autoencoder import AutoEncoder
from ..models.text_encoder import KLEIN_LAYERS, KleinTextEncoder
from ..models.transformer import Flux2
from . import memory, tiling
from .references import DEFAULT_MAX_PIXELS, image_size, prepare_image, prepare_references, to_mask
from .sampler import Conditioning, Step, denoise_latents
from .streaming import BlockStreamer, streamable_blocks
from .schedule import fit_size, initial_noise, resolve_seed

log = logging.getLogger("klein_nodes")


class KleinPipeline:
    """Text-to-image and reference editing with FLUX.2 [klein].

    Distilled klein: steps=4, guidance=1.0 (no CFG). Base klein: steps=50, guidance=4.0 (true CFG against
    `negative_prompt`, "" by default). After a call, `last_seed` holds the seed used and `notes` every size
    change that was made.
    """

    def __init__(self, transformer: Flux2, text_encoder: KleinTextEncoder | None = None, vae: AutoEncoder | None = None,
                 text_layers: tuple = KLEIN_LAYERS, device: str | torch.device | None = None, memory: str = "auto",
                 resident_blocks: int | None = None, before_turn: Callable[[object, str], None] | None = None,
                 memory_budget: int | None = None):
        """device: where to compute (components move there for their turn, as the memory plan says); None keeps
        every component where it is. memory: "auto" plans from free memory, or force "resident", "offload" or
        "stream" (with `resident_blocks` transformer blocks kept on the device). memory_budget: bytes of device
        memory the plan may use instead of what is free (a GPU shared with other work; on the CPU it makes the
        plan offload and stream as on a GPU of that size). before_turn(module, name): called before a component
        ("text_encoder", "transformer", "vae") computes; ComfyUI's nodes load it there."""
        for value, name, kind in ((transformer, "transformer", Flux2), (text_encoder, "text_encoder", KleinTextEncoder),
                                  (vae, "vae", AutoEncoder)):
            if not isinstance(value, kind) and (value is not None or name == "transformer"):
                raise KleinError(f"KleinPipeline {name}: give the model kn.load_{name} returns, not "
                                 f"{type(value).__name__}")
        if before_turn is not None and not callable(before_turn):
            raise KleinError("KleinPipeline before_turn: give a function (module, name) or None")
        self.transformer, self.text_encoder, self.vae = transformer, text_encoder, vae
        self.before_turn = before_turn
        self.device = None if device is None else device_argument(device)
        if self.device is not None and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # as parameters report it
        self.memory = one_of(memory, "memory", ("auto", "resident", "offload", "stream"))
        self.resident_blocks = None if resident_blocks is None else integer(resident_blocks, "resident_blocks", 0)
        self.memory_budget = None if memory_budget is None else integer(memory_budget, "memory_budget", 1)
        self.plan = None
        self.text_layers = tuple(text_layers)
        if text_encoder is not None:
            from ..loaders.text_encoder import ensure_text_encoder_fits

            ensure_text_encoder_fits(text_encoder, transformer, self.text_layers)
        if vae is not None and 4 * vae.params.z_channels != transformer.params.in_channels:
            raise WrongModelError(f"the VAE makes {4 * vae.params.z_channels}-channel latents but the transformer "
                                  f"takes {transformer.params.in_channels}: use the FLUX.2 VAE")
        self.last_seed = None
        self.notes = []

    @property
    def pixels_per_latent(self):
        """Image pixels per latent pixel: VAE downsampling x 2 (patchify); 16 for the real VAE."""
        return 2 * tiling.vae_factor(self.vae) if self.vae is not None else 16

    def encode_prompt(self, prompts: list[str], max_length: int | None = 512) -> torch.Tensor:
        if self.text_encoder is None:
            raise KleinError("no text encoder: pass prompt_embeds, or build the pipeline with text_encoder=")
        with self._turn("text_encoder"):
            return self.text_encoder.encode(prompts, max_length=max_length, layers=self.text_layers)

    def encode_images(self, images: list, max_pixels: int = DEFAULT_MAX_PIXELS,
                      tiled: str | bool = "auto") -> tuple[list[torch.Tensor], list[str]]:
        """Reference images -> ([(1, 128, h, w) latents], notes)."""
        if self.vae is None:
            raise KleinError("references need a VAE: build the pipeline with vae=")
        with self._turn("vae"):
            return encode_references(self.vae, images, max_pixels, tiled)

    def __call__(self, prompt: str | list[str] | None = None, width: int | None = None, height: int | None = None,
                 steps: int = 4, guidance: float = 1.0, seed: int = -1, negative_prompt: str = "",
                 references: list | None = None, noise: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 batch_size: int = 1, image: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                 denoise: float = 1.0, max_reference_pixels: int = DEFAULT_MAX_PIXELS,
                 callback: Callable[[Step], None] | None = None, tiled: str | bool = "auto", output_type: str = "image",
                 max_sequence_length: int | None = 512) -> torch.Tensor:
        """Generate (B, H, W, 3) float images in [0, 1] (or fp32 latents with output_type="latent").

        noise: initial latents (B, 128, H/16, W/16), as diffusers' `latents=`; otherwise drawn on the CPU from
        `seed` (-1: random). image (+ mask, 1 = repaint) with denoise < 1: img2img / inpainting.
        max_sequence_length: prompt tokens, as diffusers; None keeps every token (ComfyUI's behaviour).
        """
        check_call(prompt, width, height, steps, guidance, seed, negative_prompt, references, noise, prompt_embeds,
                   negative_prompt_embeds, batch_size, mask, denoise, max_reference_pixels, callback, tiled,
                   output_type, max_sequence_length)
        self._check_shapes(noise, prompt_embeds, negative_prompt_embeds, image, references)
        self.notes = []
        self.plan = self._plan(width, height, noise, references, guidance > 1.0, batch_size)
        positive = self._conditioning(prompt, prompt_embeds, max_sequence_length)
        negative = None
        if guidance > 1.0:
            count = positive.shape[0] if negative_prompt_embeds is None else None
            negative = self._conditioning([negative_prompt] * count if count else None, negative_prompt_embeds,
                                          max_sequence_length)
        reference_latents = []
        if references:
            reference_latents, notes = self.encode_images(references, max_reference_pixels, tiled)
            self.notes += notes
        if image is not None and width is None and height is None:
            width, height = image_size(image)
        width, height = self._size(width, height, noise, reference_latents)
        scale = self.pixels_per_latent
        batch = positive.shape[0] * batch_size if noise is None else noise.shape[0]
        if noise is None:
            self.last_seed = resolve_seed(seed)
            noise = initial_noise(self.last_seed, batch, self.transformer.params.in_channels, height // scale,
                                  width // scale)
        init_latents = None if image is None else self._init(image, width, height, tiled)
        latent_mask = None if image is None else to_mask(mask)
        references = tuple(reference_latents)

        def per_prompt(embeds):
            return Conditioning(embeds.repeat_interleave(batch // embeds.shape[0], 0), references)

        with self._turn("transformer"):
            latents = denoise_latents(self.transformer, noise, per_prompt(positive), steps, denoise,
                                      negative=None if negative is None else per_prompt(negative), guidance=guidance,
                                      init_latents=init_latents, mask=latent_mask, callback=callback)
        if output_type == "latent":
            return latents
        return self.decode(latents, tiled)

    def decode(self, latents: torch.Tensor, tiled: str | bool = "auto") -> torch.Tensor:
        """fp32 latents -> (B, H, W, 3) images in [0, 1]."""
        if self.vae is None:
            raise KleinError("decoding needs a VAE: build the pipeline with vae=")
        if tiled == "auto" and self.plan is not None and self.plan.vae_tiled:
            tiled = True
        with self._turn("vae"):
            return decode_images(self.vae, latents, tiled)

    def _plan(self, width, height, noise, references, cfg, batch_size):
        """The memory plan for this call (None when the pipeline computes where its components already are)."""
        if self.device is None:
            return None
        scale = self.pixels_per_latent
        latent_h, latent_w = (noise.shape[-2:] if noise is not None
                              else ((height or 1024) // scale, (width or 1024) // scale))
        text_encoder = self.text_encoder.model if self.text_encoder else None
        if self.memory != "auto":
            offload = "resident" if self.memory == "resident" else "offload"
            blocks = len(streamable_blocks(self.transformer))
            decision = memory.Plan(offload, self.memory, offload, False,
                                   resident_blocks=self.resident_blocks if self.resident_blocks is not None
                                   else blocks // 2)
        else:
            free = self.memory_budget or tiling.free_bytes(self.device)
            if self.device.type == "cuda" and self.memory_budget is None and self._on_device():
                # our own weights already hold part of the device
                free += sum(memory.module_bytes(m) for m in (text_encoder, self.transformer, self.vae) if m)
            decision = memory.plan_models(free, self.transformer, text_encoder, self.vae, latent_h, latent_w,
                                          len(references or ()), batch_size, cfg,
                                          offloads=self.device.type == "cuda" or self.memory_budget is not None,
                                          releases=self.device.type == "cpu")
        log.info("klein memory plan: %s", decision.describe())
        return decision

    def _check_shapes(self, noise, prompt_embeds, negative_prompt_embeds, image, references):
        """Given latents and embeddings fit the transformer; images have a VAE to encode them."""
        params = self.transformer.params
        if noise is not None and (noise.shape[1] != params.in_channels or min(noise.shape) == 0):
            raise KleinError(f"noise of shape {tuple(noise.shape)}: the transformer takes (B, {params.in_channels}, "
                             "H/16, W/16) latents")
        for embeds, name in ((prompt_embeds, "prompt_embeds"), (negative_prompt_embeds, "negative_prompt_embeds")):
            if embeds is not None and (embeds.shape[-1] != params.context_in_dim or min(embeds.shape) == 0):
                raise KleinError(f"{name} of shape {tuple(embeds.shape)}: the transformer takes (B, L, "
                                 f"{params.context_in_dim}) prompt embeddings (Klein Text Encode's)")
        if (image is not None or references) and self.vae is None:
            raise KleinError("image and references need a VAE: build the pipeline with vae=")

    def _on_device(self):
        return next(self.transformer.parameters()).device == self.device

    @contextlib.contextmanager
    def _turn(self, name):
        """Run component `name` on the pipeline's device for one step of the work, then offload it if the plan says
        so; `before_turn` is told first."""
        module = self.text_encoder.model if name == "text_encoder" else getattr(self, name)
        if self.before_turn is not None:
            self.before_turn(module, name)
        role = getattr(self.plan, name) if self.plan else None
        if role is None:
            yield
            return
        if role == "stream":
            resident = self.plan.text_resident_blocks if name == "text_encoder" else self.plan.resident_blocks
            with BlockStreamer(module, self.device, resident):
                yield
            module.to("cpu")
            return
        if role == "paged":  # weights in place on the CPU: their file pages go back to the OS as blocks finish
            with pages.released_as_it_runs(module, streamable_blocks(module)):
                yield
            prepacked.release_scratch()
            return
        module.to(self.device)
        try:
            yield
        finally:
            if role == "offload":
                module.to("cpu")
                prepacked.release_scratch()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _conditioning(self, prompt, embeds, max_length):
        if embeds is not None:
            return embeds
        if prompt is None:
            raise KleinError("give a prompt or prompt_embeds")
        return self.encode_prompt([prompt] if isinstance(prompt, str) else list(prompt), max_length)

    def _size(self, width, height, noise, reference_latents):
        scale = self.pixels_per_latent
        if noise is not None:
            return noise.shape[-1] * scale, noise.shape[-2] * scale
        if width is None and height is None and reference_latents:
            height, width = (s * scale for s in reference_latents[0].shape[-2:])
        width, height, notes = fit_size(width or 1024, height or 1024)
        self.notes += notes
        return width, height

    def _init(self, image, width, height, tiled):
        """The img2img / inpainting source encoded at the output size."""
        pixels, notes = prepare_image(image, width, height)
        self.notes += notes
        with self._turn("vae"):
            device = next(self.vae.parameters()).device
            return tiling.encode(self.vae, pixels.to(device), tiled)


def check_call(prompt, width, height, steps, guidance, seed, negative_prompt, references, noise, prompt_embeds,
               negative_prompt_embeds, batch_size, mask, denoise, max_reference_pixels, callback, tiled, output_type,
               max_sequence_length):
    """KleinPipeline.__call__'s arguments, each of the type and range it takes (images are checked as they are
    read)."""
    if prompt is not None and not isinstance(prompt, str) and not (
            isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt)):
        raise KleinError(f"prompt={shown(prompt)}: give a string or a list of strings")
    if not isinstance(negative_prompt, str):
        raise KleinError(f"negative_prompt={shown(negative_prompt)}: give a string")
    for value, name in ((width, "width"), (height, "height")):
        if value is not None:
            integer(value, name, 1, 65536)
    integer(steps, "steps", 1, 1000), number(guidance, "guidance", 0, 100), integer(seed, "seed", -1, 2**64 - 1)
    integer(batch_size, "batch_size", 1, 256), number(denoise, "denoise", 0, 1)
    if denoise == 0:
        raise KleinError("denoise=0 changes nothing; give a value above 0 (1: generate from noise)")
    integer(max_reference_pixels, "max_reference_pixels", 256, 2**26)
    if references is not None and not isinstance(references, (list, tuple)):
        raise KleinError(f"references={shown(references)}: give a list of images")
    tensor_argument(noise, "noise", dims=(4,), optional=True)
    tensor_argument(prompt_embeds, "prompt_embeds", dims=(3,), optional=True)
    tensor_argument(negative_prompt_embeds, "negative_prompt_embeds", dims=(3,), optional=True)
    if isinstance(mask, torch.Tensor):
        tensor_argument(mask, "mask", dims=(2, 3, 4))
    if callback is not None and not callable(callback):
        raise KleinError(f"callback={shown(callback)}: give a function of one Step, or None")
    one_of(tiled, "tiled", ("auto", True, False)), one_of(output_type, "output_type", ("image", "latent"))
    if max_sequence_length is not None:
        integer(max_sequence_length, "max_sequence_length", 1, 32768)


def encode_references(vae, images, max_pixels=DEFAULT_MAX_PIXELS, tiled="auto"):
    """Reference images -> ([(1, 128, h, w) latents], notes), each prepared by the reference rules."""
    prepared, notes = prepare_references(images, max_pixels)
    device = next(vae.parameters()).device
    return [tiling.encode(vae, image.to(device), tiled) for image in prepared], notes


def decode_images(vae, latents, tiled="auto"):
    """Latents -> (B, H, W, 3) float images in [0, 1] on the CPU (ComfyUI's IMAGE)."""
    device = next(vae.parameters()).device
    pixels = tiling.decode(vae, latents.to(device), tiled).float()
    return (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu()
