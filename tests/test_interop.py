"""Core's own MODEL and VAE objects in Klein nodes: klein views over the tensors core loaded. Core's objects are
stood in for by their shape (ModelPatcher.model.diffusion_model, VAE.first_stage_model, core's QK-norm names);
tools/comfyui_workflows.py runs the same graphs with real core loaders."""

import types

import pytest
import torch

import klein_nodes as kn
from klein_nodes.nodes.interop import klein_transformer, klein_vae
from klein_nodes.nodes.sampling import KleinSampler, KleinVAEDecode
from klein_nodes.testing import write_transformer, write_vae
from helpers import sample_forward


class CoreModule(torch.nn.Module):
    """A module whose state dict is core's: the given tensors under core's names."""

    def __init__(self, tensors):
        super().__init__()
        self.tensors = tensors

    def state_dict(self):
        return dict(self.tensors)


def core_model(state, patches=None):
    names = {k.replace("_norm.scale", "_norm.weight"): v for k, v in state.items()}
    return types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=CoreModule(names)), patches=patches or {})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("core")
    path, state = write_transformer(folder / "klein.safetensors", dtype=torch.float32)
    return path, state, write_vae(folder / "vae.safetensors")


def test_core_model_becomes_a_klein_transformer_over_the_same_tensors(files):
    path, state, _ = files
    core = core_model(state)
    view = klein_transformer(core)
    assert klein_transformer(core) is view  # built once per core model
    assert torch.equal(sample_forward(view), sample_forward(kn.load_transformer(path)))
    core_pointers = {t.data_ptr() for t in core.model.diffusion_model.tensors.values()}
    assert {p.data_ptr() for p in view.parameters()} <= core_pointers  # shared, not copied
    latent = {"samples": torch.zeros(1, 128, 2, 2)}
    conditioning = [[torch.randn(1, 5, 96, generator=torch.Generator().manual_seed(0)), {}]]
    from_core, = KleinSampler().sample(core, conditioning, latent, seed=3, steps=2)
    ours, = KleinSampler().sample(kn.load_transformer(path), conditioning, latent, seed=3, steps=2)
    assert torch.equal(from_core["samples"], ours["samples"])


def test_core_vae_becomes_a_klein_vae(files):
    from safetensors.torch import load_file

    *_, vae_path = files
    core_names = {k.replace("encoder.quant_conv", "quant_conv").replace("decoder.post_quant_conv", "post_quant_conv"): v
                  for k, v in load_file(str(vae_path)).items()}
    assert core_names.keys() != load_file(str(vae_path)).keys()
    core = types.SimpleNamespace(first_stage_model=CoreModule(core_names))
    latent = {"samples": torch.randn(1, 128, 2, 3, generator=torch.Generator().manual_seed(1))}
    (from_core,), (ours,) = (KleinVAEDecode().decode(core, latent),
                             KleinVAEDecode().decode(kn.load_vae(vae_path), latent))
    # the same weights; ours run NHWC (channels-last), the view over core's tensors keeps their layout
    assert (from_core - ours).abs().max() <= 1e-5 and klein_vae(core) is klein_vae(core)
    assert klein_vae(core).decoder.conv_in.weight.data_ptr() == core_names["decoder.conv_in.weight"].data_ptr()


def test_what_cannot_be_read_is_named(files):
    _, state, _ = files
    with pytest.raises(kn.KleinError, match="LoRA from Load LoRA"):
        klein_transformer(core_model(state, patches={"img_in.weight": [()]}))

    class Quantized(torch.Tensor):
        pass
    packed = dict(state, **{"img_in.weight": state["img_in.weight"].as_subclass(Quantized)})
    with pytest.raises(kn.KleinError,
                       match="quantized weights .Quantized, e.g. 'img_in.weight'.*Klein Load Transformer"):
        klein_transformer(core_model(packed))
    with pytest.raises(kn.KleinError, match="got a CLIP: connect Klein Load Transformer"):
        klein_transformer(type("CLIP", (), {})())
    sdxl = core_model({"input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)})
    with pytest.raises(kn.WrongModelError, match="ComfyUI MODEL .SimpleNamespace.: this is"):
        klein_transformer(sdxl)
