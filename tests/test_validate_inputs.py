"""Mistakes reported when ComfyUI validates the queued graph (VALIDATE_INPUTS), not after the generation before them."""

import json

from klein_nodes.nodes.edit import KleinTiledRefine
from klein_nodes.nodes.safety import KleinImageCheck
from klein_nodes.nodes.sampling import KleinGenerate
from klein_nodes.nodes.save import KleinSave
from klein_nodes.testing import write_tiny_vit


def test_a_prefix_outside_the_output_folder_is_refused_when_queued(comfyui):
    assert KleinSave.VALIDATE_INPUTS(filename_prefix="portraits/klein") is True
    assert KleinSave.VALIDATE_INPUTS(filename_prefix=None) is True  # fed by a link: checked when it runs
    for prefix in ("../outside/klein", "/etc/klein", ""):
        answer = KleinSave.VALIDATE_INPUTS(filename_prefix=prefix)
        assert isinstance(answer, str) and ("outside the output folder" in answer or "not a usable" in answer), prefix


def test_classifier_folders_are_checked_from_their_headers_when_queued(comfyui):
    write_tiny_vit(comfyui / "safety" / "nsfw_image_detection")
    assert KleinImageCheck.VALIDATE_INPUTS(classifier="nsfw_image_detection") is True
    assert KleinGenerate.VALIDATE_INPUTS(image_classifier="none") is True
    assert "no classifier folder of that name" in KleinImageCheck.VALIDATE_INPUTS(classifier="deleted_since")
    broken = write_tiny_vit(comfyui / "safety" / "clip")
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "clip", "architectures": ["CLIPModel"]}))
    assert ("holds clip (CLIPModel), not a ViT image classifier"
            in KleinGenerate.VALIDATE_INPUTS(image_classifier="clip"))


def test_tile_and_overlap_are_checked_when_queued():
    assert KleinTiledRefine.VALIDATE_INPUTS(tile_size=1024, overlap=128) is True
    assert "overlap must be 0 to half the tile (128 pixels), got 200" in KleinTiledRefine.VALIDATE_INPUTS(
        tile_size=256, overlap=200)
    assert "tile must be a multiple of 16" in KleinTiledRefine.VALIDATE_INPUTS(tile_size=1000, overlap=128)
