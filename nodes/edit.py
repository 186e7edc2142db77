"""Edit Composite, Outpaint Canvas and Tiled Refine: edits that keep what was not asked for, outpainting, and
images beyond klein's 4 MP."""

import torch

from ..errors import KleinError
from ..sampling.composite import composite_edit, describe
from ..sampling.outpaint import FILLS, outpaint_canvas
from ..sampling.pipeline import KleinPipeline
from ..sampling.refine import MAX_TILE, MIN_TILE, tile_sizes, tiled_refine
from ..sampling.schedule import ASPECT_RATIOS
from .interop import MODEL_INPUT, VAE_INPUT, klein_transformer, klein_vae
from .runtime import load_for_inference, tile_progress, verdict
from .sampling import SEED_INPUT, STEPS_INPUT, first_conditioning


class KleinEditComposite:
    DESCRIPTION = ("Puts an edit back into the original: undoes the edit's drift (sub-pixel shift) and colour shift, "
                   "finds what changed (or takes a mask) and keeps every other pixel of the original exactly.")
    CATEGORY = "klein"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    OUTPUT_TOOLTIPS = ("The original with the edit put in.", "Where the result comes from the edit (1).")
    FUNCTION = "composite"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "original": ("IMAGE", {"tooltip": "The image before the edit (what Load Image gave the edit)."}),
                "edited": ("IMAGE", {"tooltip": "The edit (VAE Decode); another size is resized to the original's."}),
                "align": ("BOOLEAN", {"default": True, "tooltip": "Find and undo the edit's shift (up to 16 px)."}),
                "match_colors": ("BOOLEAN", {"default": True, "tooltip": "Fit the edit's colour and tone to the "
                                                                         "original on the unchanged area."}),
                "feather": ("INT", {"default": 8, "min": 0, "max": 128,
                                    "tooltip": "Soft edge, in pixels, around a found change."}),
            },
            "optional": {"mask": ("MASK", {"tooltip": "Where to take the edit (white); without it the change is "
                                                      "found."})},
        }

    def composite(self, original: torch.Tensor, edited: torch.Tensor, align: bool = True, match_colors: bool = True,
                  feather: int = 8, mask: torch.Tensor | None = None) -> dict:
        originals, edits = batch_of(original, "original"), batch_of(edited, "edited")
        if len(originals) not in (1, len(edits)):
            raise KleinError(f"{len(originals)} originals for {len(edits)} edits: give one original, or one per edit")
        masks = None if mask is None else batch_of(mask, "mask")
        images, found, lines = [], [], []
        for index, edit in enumerate(edits):
            given = None if masks is None else masks[min(index, len(masks) - 1)]
            image, used, info = composite_edit(originals[min(index, len(originals) - 1)], edit, given, align,
                                               match_colors, feather)
            images.append(image)
            found.append(used)
            lines.append(describe(info))
        return {"ui": {"text": lines}, "result": (torch.stack(images), torch.stack(found))}


def batch_of(images, name):
    if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4):
        raise KleinError(f"{name}: expected an IMAGE or MASK batch, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    return list(images) if images.ndim == 4 or name == "mask" else [images]


class KleinOutpaintCanvas:
    DESCRIPTION = ("Grows an image for outpainting: pads it (by pixels or to an aspect), fills the new area so klein "
                   "continues the picture, and gives the mask to repaint (with a soft band into the image).")
    CATEGORY = "klein"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("canvas", "mask")
    OUTPUT_TOOLTIPS = ("The grown image (multiples of 16): encode it with Klein VAE Encode and the mask.",
                       "1 on the new area, fading into the image over 'feather' pixels.")
    FUNCTION = "canvas"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        def pad(side):
            return ("INT", {"default": 0, "min": 0, "max": 4096, "step": 16,
                            "tooltip": f"Pixels to add on the {side} (ignored with an aspect)."})

        return {"required": {
            "image": ("IMAGE", {"tooltip": "The image to extend."}),
            "left": pad("left"), "top": pad("top"), "right": pad("right"), "bottom": pad("bottom"),
            "aspect": (["custom", *ASPECT_RATIOS], {"default": "custom",
                                                    "tooltip": "Extend evenly to this aspect instead of by pixels."}),
            "fill": (list(FILLS), {"default": "edge", "tooltip": "edge: the border's colours continued and softened "
                                                                 "(the best start); mean colour; or noise."}),
            "feather": ("INT", {"default": 32, "min": 0, "max": 512, "step": 8,
                                "tooltip": "Pixels of the image repainted softly along the new edges."}),
        }}

    def canvas(self, image: torch.Tensor, left: int = 0, top: int = 0, right: int = 0, bottom: int = 0,
               aspect: str = "custom", fill: str = "edge", feather: int = 32) -> dict:
        canvas, mask = outpaint_canvas(image, left, top, right, bottom, fill, feather,
                                       None if aspect == "custom" else aspect)
        line = (f"canvas {canvas.shape[2]}x{canvas.shape[1]} from {image.shape[2]}x{image.shape[1]}; "
                f"{(mask == 1).float().mean().item():.0%} new")
        return {"ui": {"text": [line]}, "result": (canvas, mask[None])}


class KleinTiledRefine:
    DESCRIPTION = ("Enlarges an image beyond klein's 4 MP: Lanczos upscale, then img2img tile by tile (about 1 MP "
                   "each) with the prompt, blended without seams. Progress per tile; Interrupt stops between tiles.")
    CATEGORY = "klein"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The refined image, upscale_by times larger.",)
    FUNCTION = "refine"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": MODEL_INPUT,
                "positive": ("CONDITIONING", {"tooltip": "The prompt (Klein Text Encode): what the picture shows."}),
                "vae": VAE_INPUT,
                "image": ("IMAGE", {"tooltip": "The image: as it is, or already enlarged by any upscaler."}),
                "upscale_by": ("FLOAT", {"default": 2.0, "min": 1.0, "max": 8.0, "step": 0.25,
                                         "tooltip": "Lanczos enlargement first; 1 refines the image at its size."}),
                "tile_size": ("INT", {"default": 1024, "min": MIN_TILE, "max": MAX_TILE, "step": 16,
                                      "tooltip": "Tile side; about 1024 (1 MP) suits klein best."}),
                "overlap": ("INT", {"default": 128, "min": 0, "max": 512, "step": 16,
                                    "tooltip": "Pixels neighbouring tiles share, blended smoothly."}),
                "denoise": ("FLOAT", {"default": 0.35, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "How much each tile is redrawn: 0.3-0.4 adds detail, keeps the "
                                                 "picture."}),
                "seed": SEED_INPUT,
                "steps": STEPS_INPUT,
                "tile_as_reference": ("BOOLEAN", {"default": False,
                                                  "tooltip": "Give each tile to klein as a reference image too "
                                                             "(closer to the input, slower)."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, tile_size: int | None = None, overlap: int | None = None) -> bool | str:
        return verdict(lambda tile, band: tile_sizes(MAX_TILE, MAX_TILE, tile, band), tile_size, overlap)

    def refine(self, model: object, positive: list, vae: object, image: torch.Tensor, upscale_by: float = 2.0,
               tile_size: int = 1024, overlap: int = 128, denoise: float = 0.35, seed: int = 0, steps: int = 4,
               tile_as_reference: bool = False) -> tuple[torch.Tensor]:
        model, vae = klein_transformer(model), klein_vae(vae)
        embeddings = first_conditioning(positive, "positive", model.params.context_in_dim).embeddings
        pipeline = KleinPipeline(model, None, vae, before_turn=load_for_inference)
        refined = tiled_refine(pipeline, image, scale=upscale_by, tile=tile_size, overlap=overlap, denoise=denoise,
                               seed=seed, steps=steps, reference=tile_as_reference, prompt_embeds=embeddings,
                               progress=tile_progress())
        return (refined,)
