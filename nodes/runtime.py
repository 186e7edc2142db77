"""ComfyUI services for the nodes: memory manager, progress bar with latent previews, interrupt.

Everything imports `comfy` lazily and degrades to plain behaviour outside ComfyUI (tests, scripts).
"""

import logging
from contextlib import contextmanager

import numpy as np
import torch

from ..errors import KleinError
from ..models import offload

log = logging.getLogger("klein_nodes")
PREVIEW_MAX_SIZE = 512
DEVICE_ROLES = {  # model_management functions giving (load device, offload device) per component
    "transformer": ("get_torch_device", "unet_offload_device"),
    "text_encoder": ("text_encoder_device", "text_encoder_offload_device"),
    "vae": ("vae_device", "vae_offload_device"),
}


def comfy_modules():
    try:
        import comfy.model_management as mm
        import comfy.model_patcher as patcher
        import comfy.utils as utils
    except ImportError:
        return None
    return mm, patcher, utils


def load_for_inference(module, role):
    """Inside ComfyUI: register `module` with the memory manager (a ModelPatcher, created once) and load it on
    ComfyUI's device for `role`, evicting other models as needed; when it does not fit, ComfyUI keeps part of it in
    CPU memory (see models/offload.py) and the module still computes on that device. Outside ComfyUI: nothing."""
    comfy = comfy_modules()
    if comfy is None:
        return
    mm, model_patcher, _ = comfy
    module = getattr(module, "lora_base", module)  # a LoRA'd copy shares the base's weights, so also its patcher
    patcher = getattr(module, "klein_patcher", None)
    if patcher is None:
        load_device, offload_device = (getattr(mm, name)() for name in DEVICE_ROLES[role])
        # as core's own models: the dynamic VRAM patcher where core enabled it (0.25, NVIDIA), else ModelPatcher
        patcher_class = getattr(model_patcher, "CoreModelPatcher", model_patcher.ModelPatcher)
        patcher = patcher_class(module, load_device=load_device, offload_device=offload_device)
        if getattr(patcher, "is_dynamic", lambda: False)():
            offload.vbar_caster = vbar_weights
        object.__setattr__(module, "klein_patcher", patcher)  # plain attributes, not submodules
        object.__setattr__(module, "klein_device", torch.device(load_device))
    mm.load_models_gpu([patcher])


@contextmanager
def vbar_weights(module, device):
    """For one call, a streamed module's weight and bias from ComfyUI's VBAR cache, fetched by core's own caster
    as its layers do (then released to it); if core refuses, plain copies from then on, with a warning."""
    import comfy.ops

    bias = module.bias
    try:
        weight, bias, stream = comfy.ops.cast_bias_weight(module, device=device, dtype=module.weight.dtype,
                                                          bias_dtype=None if bias is None else bias.dtype,
                                                          offloadable=True)
    except Exception as e:  # noqa: BLE001 (core internals: any failure means "use the plain path")
        log.warning("klein: ComfyUI's dynamic VRAM cast failed for %s (%s); copying weights per call instead",
                    type(module).__name__, e)
        offload.vbar_caster = None
        with offload.weights_on(module, device):
            yield
        return
    saved = dict(module._parameters)
    module._parameters.update({name: tensor for name, tensor in (("weight", weight), ("bias", bias)) if name in saved})
    try:
        yield
    finally:
        module._parameters.update(saved)
        comfy.ops.uncast_bias_weight(module, weight, bias, stream)


def progress_callback(total):
    """A sampler callback driving ComfyUI's progress bar with latent previews; it raises on interrupt."""
    comfy = comfy_modules()
    if comfy is None:
        return None
    mm, _, utils = comfy
    bar = utils.ProgressBar(total)
    previews = previews_enabled()

    def callback(step):
        mm.throw_exception_if_processing_interrupted()
        preview = ("JPEG", to_pil(step.preview()[0]), PREVIEW_MAX_SIZE) if previews else None
        bar.update_absolute(step.index, step.total, preview)

    return callback


def verdict(check, *args):
    """A VALIDATE_INPUTS answer: True when `check(*args)` passes, else the message the run would fail with, so a
    mistake is reported when the graph is queued instead of after the generation before it."""
    if any(arg is None for arg in args):  # an input fed by a link: checked when the node runs
        return True
    try:
        check(*args)
    except (KleinError, OSError, ValueError) as e:
        return str(e)
    return True


def tile_progress():
    """A tiled_refine progress callback: ComfyUI's progress bar counts tiles, Interrupt stops between them."""
    comfy = comfy_modules()
    if comfy is None:
        return None
    mm, _, utils = comfy
    bar = None

    def progress(done, total):
        nonlocal bar
        bar = bar or utils.ProgressBar(total)
        bar.update_absolute(done, total)
        mm.throw_exception_if_processing_interrupted()

    return progress


def previews_enabled():
    try:
        from comfy.cli_args import LatentPreviewMethod, args
    except ImportError:
        return True
    return getattr(args, "preview_method", None) != LatentPreviewMethod.NoPreviews


def to_pil(image):
    from PIL import Image

    return Image.fromarray((image.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))
