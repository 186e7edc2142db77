"""ComfyUI's low-VRAM contract. When a model does not fit, ComfyUI's ModelPatcher leaves the modules that have a
`comfy_cast_weights` attribute in CPU memory and sets it to True; such a module must bring its weights to the
input's device for each call. Every klein module that holds weights follows it, so ComfyUI can load part of a klein
model (bf16, fp8, nvfp4 or GGUF) and feed the rest layer by layer, as it does for its own models."""

from contextlib import contextmanager

# ComfyUI's dynamic VRAM loader (core 0.25 on NVIDIA) gives each module it streams a `_v` slot in its VBAR, a GPU
# cache of weights it evicts under memory pressure. Such a module must fetch its weight and bias through core's
# caster to use that cache; nodes/runtime.py installs it here (this package never imports comfy).
vbar_caster = None


class Offloadable:
    """Mixin for modules with weights: ComfyUI sets `comfy_cast_weights` on the ones it leaves offloaded.

    ComfyUI's loaders (core 0.3.76 and later, the dynamic VRAM patcher included) read `.weight` and `.bias` of
    every such module: a module that does not store one declares it None at class level (GGUF blocks, a norm's
    `scale`). Not here, because torch refuses to register a parameter over an existing attribute."""

    comfy_cast_weights = False


@contextmanager
def weights_on(module, device):
    """For one call, `module`'s own tensors on `device` when ComfyUI left them elsewhere; put back afterwards."""
    if not module.comfy_cast_weights:
        yield
        return
    if (vbar_caster is not None and hasattr(module, "_v") and module.weight is not None
            and module.weight.device != device):
        with vbar_caster(module, device):
            yield
        return
    moved = []
    for registry in (module._parameters, module._buffers):
        for name, tensor in registry.items():
            if tensor is not None and tensor.device != device:
                moved.append((registry, name, tensor))
                registry[name] = tensor.to(device, non_blocking=True)
    try:
        yield
    finally:
        for registry, name, tensor in moved:
            registry[name] = tensor


def compute_device(module):
    """Where `module` computes: the device ComfyUI loads it on (recorded by the nodes), else where its weights are."""
    base = getattr(module, "lora_base", module)
    return getattr(base, "klein_device", None) or next(module.parameters()).device
