"""Wrong argument types and ranges at the public API: one KleinError naming the argument, before any work."""

import numpy as np
import pytest
import torch

import klein_nodes as kn
from klein_nodes.testing import write_transformer


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path, _ = write_transformer(tmp_path_factory.mktemp("model") / "klein.safetensors", dtype=torch.float32)
    return kn.load_transformer(path)


@pytest.mark.parametrize("call, named", [
    (lambda m: kn.load_transformer(5), "path=5"),
    (lambda m: kn.load_transformer("a\0b"), "not a usable path"),
    (lambda m: kn.load_transformer("x.safetensors", dtype="fp64"), "dtype='fp64'"),
    (lambda m: kn.load_transformer("x.safetensors", device="gpu"), "device='gpu'"),
    (lambda m: kn.load_vae(None), "path=None"),
    (lambda m: kn.load_text_encoder("x", layers="9,18"), "layers='9,18'"),
    (lambda m: kn.load_text_encoder("x", layers=(9, "x")), "layers='x'"),
    (lambda m: kn.load_image_safety(b"folder"), "path=b'folder'"),
    (lambda m: kn.load_prompt_safety(3.5), "path_or_text_encoder=3.5"),
    (lambda m: kn.apply_lora("model", "l.safetensors"), "not str"),
    (lambda m: kn.compile_blocks(None), "not NoneType"),
    (lambda m: kn.quant.dequantize(torch.zeros(34, dtype=torch.uint8), "Q8_0", (32,), "cpu"), "dtype must be"),
    (lambda m: kn.composite_edit(torch.rand(64, 64, 3), torch.rand(64, 64, 3), align="yes"), "align='yes'"),
    (lambda m: kn.composite_edit(torch.zeros(1, 64, 64, 3, device="meta"), torch.rand(64, 64, 3)), "original"),
    (lambda m: kn.outpaint_canvas(torch.rand(64, 64, 3), left=16, fill=np.zeros(3)), "fill="),
    (lambda m: kn.outpaint_canvas(torch.rand(64, 64, 3), left=16, feather="wide"), "feather='wide'"),
    (lambda m: kn.tiled_refine(m, torch.rand(64, 64, 3), "x"), "not Flux2"),
    (lambda m: kn.KleinPipeline(m, memory=[]), r"memory=\[\]"),
    (lambda m: kn.KleinPipeline(m, vae="ae.safetensors"), "vae"),
    (lambda m: kn.KleinPipeline(m)(prompt_embeds=torch.randn(1, 3, 96), steps=0), "steps=0"),
    (lambda m: kn.KleinPipeline(m)(prompt_embeds=torch.randn(1, 3, 96), seed="x"), "seed='x'"),
    (lambda m: kn.KleinPipeline(m)(prompt_embeds=torch.randn(1, 3, 96), width=float("nan")), "width=nan"),
    (lambda m: kn.KleinPipeline(m)(prompt_embeds=torch.randn(1, 3, 96), tiled=1), "tiled=1"),
    (lambda m: kn.KleinPipeline(m)(prompt_embeds=torch.randn(1, 3, 95)), "prompt_embeds of shape \\(1, 3, 95\\)"),
    (lambda m: kn.KleinPipeline(m)(prompt_embeds=torch.randn(1, 3, 96), noise=torch.randn(1, 16, 2, 2)), "noise"),
    (lambda m: kn.KleinPipeline(m)(prompt_embeds=torch.randn(1, 3, 96), image=torch.rand(64, 64, 3)), "need a VAE"),
])
def test_a_wrong_argument_is_refused_by_name(model, call, named):
    with pytest.raises(kn.KleinError, match=named):
        call(model)
