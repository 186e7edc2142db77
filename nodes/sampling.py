"""Latent, sampler, reference and VAE nodes, and the one-node Klein Generate."""

import warnings

import torch
import torch.nn.functional as F

from ..errors import KleinError, KleinNote
from ..models.text_encoder import KleinTextEncoder
from ..sampling import tiling
from ..sampling.pipeline import KleinPipeline, decode_images, encode_references
from ..sampling.references import DEFAULT_MAX_PIXELS, prepare_batch
from ..sampling.sampler import Conditioning, denoise_latents
from ..sampling.schedule import (ASPECT_RATIOS, MAX_SEED, MEGAPIXEL, fit_size, initial_noise, preset_size,
                                 round_to_multiple)
from .conditioning import MAX_TOKENS_INPUT, max_length
from .interop import MODEL_INPUT, VAE_INPUT, klein_transformer, klein_vae
from .runtime import load_for_inference, progress_callback, verdict
from .safety import SAFETY_INPUTS, SafetyGate, check_classifier

TILED = {"auto": "auto", "enable": True, "disable": False}
TILED_INPUT = (list(TILED), {"default": "auto",
                             "tooltip": "Tiled VAE (seam-free): 'auto' tiles only when memory is short."})
SEED_INPUT = ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                      "tooltip": "Noise seed. Noise is drawn on the CPU, so a seed gives the same image on any GPU."})
STEPS_INPUT = ("INT", {"default": 4, "min": 1, "max": 200,
                       "tooltip": "4 for the distilled klein models, about 50 for the base models."})
GUIDANCE_INPUT = ("FLOAT", {"default": 1.0, "min": 1.0, "max": 20.0, "step": 0.1, "round": 0.01,
                            "tooltip": "1.0: no CFG (distilled models). Above 1: true CFG against the negative "
                                       "(base models: 4.0)."})
SIZE_INPUTS = {
    "width": ("INT", {"default": 1024, "min": 16, "max": 4096, "step": 16,
                      "tooltip": "Output width when aspect is 'custom' (multiples of 16; others are rounded and "
                                 "reported)."}),
    "height": ("INT", {"default": 1024, "min": 16, "max": 4096, "step": 16,
                       "tooltip": "Output height when aspect is 'custom'."}),
    "aspect": (["custom", *ASPECT_RATIOS],
               {"default": "custom", "tooltip": "Aspect preset of the hosted klein APIs; overrides width/height."}),
    "megapixels": ("FLOAT", {"default": 1.0, "min": 0.05, "max": 4.0, "step": 0.05,
                             "tooltip": "Size of the aspect preset (1 MP = 1024x1024). Ignored for 'custom'."}),
}
IMAGE_SLOTS = ("image_1", "image_2", "image_3", "image_4")


def output_size(width, height, aspect, megapixels):
    if aspect != "custom":
        return preset_size(aspect, megapixels)
    if (width, height) != (int(width), int(height)):  # scaled sizes: round quietly, the scaling was asked for
        width, height = round_to_multiple(width), round_to_multiple(height)
    width, height, _ = fit_size(width, height)  # a rounding is reported as a warning
    return width, height


LATENT_CHANNELS = {4: "SD 1.x/SDXL, as core's Empty Latent Image makes",
                   16: "SD3/FLUX.1, as Empty SD3 Latent Image makes"}
TEXT_FEATURES = {768: "CLIP-L (SD 1.x)", 1024: "OpenCLIP (SD 2.x)", 2048: "SDXL's CLIP", 4096: "T5-XXL (FLUX.1, SD3)",
                 3584: "Qwen2.5-VL (Qwen-Image)", 7680: "Qwen3-4B (klein 4B)", 12288: "Qwen3-8B (klein 9B)",
                 15360: "Mistral Small 3 (FLUX.2 dev)"}


def klein_latent(latent, node):
    """A LATENT's samples as a (B, 128, h, w) FLUX.2 latent. An empty latent of another family (all zeros, as core's
    Empty Latent Image gives) becomes the klein empty latent of the same pixel size, with a note; others are refused
    with what to connect instead."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        shape = "no samples" if not isinstance(samples, torch.Tensor) else f"shape {tuple(samples.shape)}"
        raise KleinError(f"{node}: the latent input has {shape}, not an image latent: connect Klein Empty Latent, "
                         "Klein VAE Encode or a Klein Sampler")
    channels = samples.shape[1]
    if channels == 128:
        return samples
    family = LATENT_CHANNELS.get(channels, "another model's latent")
    if channels in LATENT_CHANNELS and "noise_mask" not in latent and not samples.any():
        width, height = output_size(samples.shape[3] * 8, samples.shape[2] * 8, "custom", 1.0)
        warnings.warn(f"{node}: an empty {channels}-channel latent ({family}) was read as an empty {width}x{height} "
                      "klein latent; use Klein Empty Latent (or Empty Flux 2 Latent) to set klein sizes directly",
                      KleinNote)
        return samples.new_zeros(samples.shape[0], 128, height // 16, width // 16)
    raise KleinError(f"{node}: this LATENT has {channels} channels ({family}); FLUX.2 [klein] works on 128-channel "
                     "latents. For new images connect Klein Empty Latent (or core's Empty Flux 2 Latent); for an "
                     "image, encode it with Klein VAE Encode (or VAE Encode with the FLUX.2 VAE)")


def first_conditioning(conditioning, name, features=None):
    """(embeddings, reference latents) from core-format CONDITIONING: [[tensor, {"reference_latents": [...]}], ...];
    `features`: what the transformer takes per token, checked so another model's text encoding is named."""
    if not conditioning:
        raise KleinError(f"the {name} conditioning is empty")
    if len(conditioning) > 1:
        warnings.warn(f"the {name} conditioning has {len(conditioning)} entries; the first is used", KleinNote)
    embeddings, extras = conditioning[0]
    found = embeddings.shape[-1]
    if features is not None and found != features:
        source, wanted = TEXT_FEATURES.get(found, "an unknown text encoder"), TEXT_FEATURES.get(features, "its own")
        raise KleinError(f"the {name} conditioning has {found} features per token ({source}); this klein transformer "
                         f"takes {features} ({wanted}): encode the prompt with Klein Text Encode, or core's CLIP Text "
                         "Encode on a CLIP loaded with type flux2")
    return Conditioning(embeddings, tuple(extras.get("reference_latents", ())))


class KleinEmptyLatent:
    DESCRIPTION = "An empty klein latent (128 channels at 1/16 size), by size or aspect preset."
    CATEGORY = "klein"
    RETURN_TYPES = ("LATENT", "INT", "INT")
    RETURN_NAMES = ("latent", "width", "height")
    OUTPUT_TOOLTIPS = ("Empty latent for Klein Sampler.", "Output width in pixels.", "Output height in pixels.")
    FUNCTION = "create"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {**SIZE_INPUTS, "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                                               "tooltip": "Images per run."})},
            "optional": {"size_from": ("IMAGE", {"tooltip": "Take the size from this image (e.g. the reference to "
                                                            "edit), scaled to 'megapixels' when larger."})},
        }

    def create(self, width: int, height: int, aspect: str = "custom", megapixels: float = 1.0, batch_size: int = 1,
               size_from: torch.Tensor | None = None) -> tuple[dict, int, int]:
        if size_from is not None:
            height, width = size_from.shape[1:3]
            scale = min(1.0, (megapixels * MEGAPIXEL / (width * height)) ** 0.5)
            width, height, aspect = width * scale, height * scale, "custom"
        width, height = output_size(width, height, aspect, megapixels)
        return ({"samples": torch.zeros(batch_size, 128, height // 16, width // 16)}, width, height)


class KleinSampler:
    DESCRIPTION = ("Samples FLUX.2 [klein]: text-to-image, reference editing (references in the conditioning), "
                   "img2img (denoise < 1) and inpainting (a latent noise_mask).")
    CATEGORY = "klein"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent; decode it with Klein VAE Decode.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": MODEL_INPUT,
                "positive": ("CONDITIONING",
                             {"tooltip": "Prompt (and references) from Klein Text Encode / Klein References."}),
                "latent": ("LATENT",
                           {"tooltip": "Empty latent for new images; an encoded image for img2img/inpainting."}),
                "seed": SEED_INPUT,
                "steps": STEPS_INPUT,
                "guidance": GUIDANCE_INPUT,
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "Below 1: img2img, keeping that much of the input latent's "
                                                 "structure."}),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "Negative prompt for guidance > 1 (base models: encode '')."}),
            },
        }

    def sample(self, model: object, positive: list, latent: dict, seed: int, steps: int = 4, guidance: float = 1.0,
               denoise: float = 1.0, negative: list | None = None) -> tuple[dict]:
        model = klein_transformer(model)
        samples = klein_latent(latent, "Klein Sampler").float()
        batch, _, height, width = samples.shape
        mask = latent.get("noise_mask")
        init = samples if denoise < 1.0 or mask is not None else None
        if guidance > 1.0 and negative is None:
            raise KleinError("guidance > 1 needs a negative conditioning: connect a Klein Text Encode (an empty prompt "
                             "for the base models), or set guidance to 1.0 for the distilled models")
        features = model.params.context_in_dim  # both conditionings are checked before the model loads
        positive = first_conditioning(positive, "positive", features)
        negative = None if negative is None else first_conditioning(negative, "negative", features)
        load_for_inference(model, "transformer")
        latents = denoise_latents(model, initial_noise(seed, batch, samples.shape[1], height, width), positive, steps,
                                  denoise, negative=negative, guidance=guidance, init_latents=init, mask=mask,
                                  callback=progress_callback(steps))
        return ({"samples": latents.cpu()},)


class KleinReferences:
    DESCRIPTION = ("Adds 1-4 reference images to a conditioning for editing and composition (each is capped to the "
                   "megapixel limit and cropped to multiples of 16; every change is reported in the console).")
    CATEGORY = "klein"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The conditioning with reference_latents (also understood by ComfyUI's own FLUX.2 nodes).",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        image = {"tooltip": "A reference image (a batch counts as several references)."}
        return {
            "required": {
                "conditioning": ("CONDITIONING", {"tooltip": "Prompt conditioning to attach references to."}),
                "vae": VAE_INPUT,
                "image_1": ("IMAGE", image),
                "max_megapixels": ("FLOAT", {"default": 1.0, "min": 0.1, "max": 4.0, "step": 0.1,
                                             "tooltip": "Larger references are downscaled to this area "
                                                        "(diffusers: 1.0)."}),
                "tiled": TILED_INPUT,
            },
            "optional": {slot: ("IMAGE", image) for slot in IMAGE_SLOTS[1:]},
        }

    def add(self, conditioning: list, vae: object, image_1: torch.Tensor, max_megapixels: float = 1.0,
            tiled: str = "auto", **more: torch.Tensor) -> tuple[list]:
        images = [image_1] + [more[slot] for slot in IMAGE_SLOTS[1:] if more.get(slot) is not None]
        vae = klein_vae(vae)
        load_for_inference(vae, "vae")
        latents, _ = encode_references(vae, images, int(max_megapixels * DEFAULT_MAX_PIXELS), TILED[tiled])
        latents = [latent.cpu() for latent in latents]
        return ([[embeddings, {**extras, "reference_latents": list(extras.get("reference_latents", [])) + latents}]
                 for embeddings, extras in conditioning],)


class KleinVAEEncode:
    DESCRIPTION = ("Encodes images to klein latents (cropped to multiples of 16); an optional mask marks what to "
                   "repaint.")
    CATEGORY = "klein"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Latent for img2img (Klein Sampler with denoise < 1) or inpainting (with a mask).",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {"vae": VAE_INPUT,
                         "image": ("IMAGE", {"tooltip": "Images to encode."}),
                         "tiled": TILED_INPUT},
            "optional": {"mask": ("MASK", {"tooltip": "Inpainting mask, white = repaint (soft edges are kept)."})},
        }

    def encode(self, vae: object, image: torch.Tensor, tiled: str = "auto",
               mask: torch.Tensor | None = None) -> tuple[dict]:
        pixels, _ = prepare_batch(image)
        vae = klein_vae(vae)
        load_for_inference(vae, "vae")
        device = next(vae.parameters()).device
        latent = {"samples": tiling.encode(vae, pixels.to(device), TILED[tiled]).cpu()}
        if mask is not None:
            mask = mask.float().reshape(-1, 1, *mask.shape[-2:])
            height, width = pixels.shape[-2:]
            if mask.shape[-2:] == image.shape[1:3]:  # the image's own mask: crop it the way the image was cropped
                top, left = (mask.shape[-2] - height) // 2, (mask.shape[-1] - width) // 2
                latent["noise_mask"] = mask[..., top: top + height, left: left + width]
            else:
                latent["noise_mask"] = F.interpolate(mask, size=(height, width), mode="bilinear")
        return (latent,)


class KleinVAEDecode:
    DESCRIPTION = "Decodes klein latents to images (seam-free tiling when memory is short)."
    CATEGORY = "klein"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("Decoded images.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {"vae": VAE_INPUT,
                             "latent": ("LATENT", {"tooltip": "From Klein Sampler."}),
                             "tiled": TILED_INPUT}}

    def decode(self, vae: object, latent: dict, tiled: str = "auto") -> tuple[torch.Tensor]:
        samples = klein_latent(latent, "Klein VAE Decode")
        vae = klein_vae(vae)
        load_for_inference(vae, "vae")
        return (decode_images(vae, samples, TILED[tiled]),)


class KleinGenerate:
    DESCRIPTION = "The whole klein graph in one node: prompt (+ up to 4 references) -> images."
    CATEGORY = "klein"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("Generated images.",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        image = {"tooltip": "Optional reference image for editing or composition."}
        return {
            "required": {
                "model": MODEL_INPUT,
                "text_encoder": ("KLEIN_TEXT_ENCODER", {"tooltip": "From Klein Load Text Encoder."}),
                "vae": VAE_INPUT,
                "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "What to make."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "Used only when guidance > 1 (base models)."}),
                **SIZE_INPUTS,
                "seed": SEED_INPUT,
                "steps": STEPS_INPUT,
                "guidance": GUIDANCE_INPUT,
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Images per run."}),
            },
            "optional": {**{slot: ("IMAGE", image) for slot in IMAGE_SLOTS}, "max_tokens": MAX_TOKENS_INPUT,
                         **SAFETY_INPUTS()},
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def VALIDATE_INPUTS(cls, image_classifier: str | None = None) -> bool | str:
        return verdict(check_classifier, image_classifier)

    def generate(self, model: object, text_encoder: KleinTextEncoder, vae: object, prompt: str,
                 negative_prompt: str = "", width: int = 1024, height: int = 1024, aspect: str = "custom",
                 megapixels: float = 1.0, seed: int = 0, steps: int = 4, guidance: float = 1.0, batch_size: int = 1,
                 max_tokens: int = 0, safety: str = "off", image_classifier: str = "none",
                 prompt_threshold: float = 0.5, image_threshold: float = 0.85, unique_id: str | None = None,
                 **images: torch.Tensor) -> tuple[torch.Tensor]:
        width, height = output_size(width, height, aspect, megapixels)  # a size klein cannot make: before any work
        gate = SafetyGate(safety, image_classifier, prompt_threshold, image_threshold, unique_id)
        gate.check_prompt(text_encoder, prompt)
        model, vae = klein_transformer(model), klein_vae(vae)
        references = [images[slot] for slot in IMAGE_SLOTS if images.get(slot) is not None]
        pipeline = KleinPipeline(model, text_encoder, vae)
        load_for_inference(text_encoder.model, "text_encoder")
        positive = pipeline.encode_prompt([prompt], max_length(max_tokens))
        negative = pipeline.encode_prompt([negative_prompt], max_length(max_tokens)) if guidance > 1.0 else None
        if references:
            load_for_inference(vae, "vae")
        load_for_inference(model, "transformer")
        latents = pipeline(prompt_embeds=positive, negative_prompt_embeds=negative, width=width, height=height,
                           steps=steps, guidance=guidance, seed=seed, batch_size=batch_size, references=references,
                           callback=progress_callback(steps), output_type="latent")
        load_for_inference(vae, "vae")
        return (gate.check_images(decode_images(vae, latents)),)
