"""The FLUX watermark is byte-compatible with invisible-watermark (imwatermark) and OpenCV's conversions."""

import io

import numpy as np
import pytest
from PIL import Image

from klein_nodes.provenance import watermark as wm

cv2 = pytest.importorskip("cv2")
imwatermark = pytest.importorskip("imwatermark")


def images():
    rng = np.random.default_rng(0)
    smooth = cv2.resize(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8), (642, 518), interpolation=cv2.INTER_CUBIC)
    dark = (smooth // 8).astype(np.uint8)
    return {"noise": rng.integers(0, 256, (512, 640, 3), dtype=np.uint8), "smooth odd size": smooth, "dark": dark,
            "flat": np.full((300, 300, 3), 128, dtype=np.uint8)}


def test_colour_conversions_match_opencv_for_every_colour():
    codes = np.arange(1 << 24, dtype=np.uint32)
    every = np.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255], -1).astype(np.uint8).reshape(4096, 4096, 3)
    assert np.array_equal(wm.bgr_to_yuv(every), cv2.cvtColor(every, cv2.COLOR_BGR2YUV))
    assert np.array_equal(wm.yuv_to_bgr(every), cv2.cvtColor(every, cv2.COLOR_YUV2BGR))


def test_haar_matches_pywt():
    pywt = pytest.importorskip("pywt")
    x = np.random.default_rng(1).integers(0, 256, (40, 24)).astype(np.uint8)
    ll, details = wm.dwt2(x)
    ref_ll, ref_details = pywt.dwt2(x, "haar")
    assert np.array_equal(ll, ref_ll) and all(np.array_equal(a, b) for a, b in zip(details, ref_details))
    assert np.array_equal(wm.idwt2(ll, details), pywt.idwt2((ref_ll, ref_details), "haar"))


@pytest.mark.parametrize("name", list(images()))
def test_embedding_is_byte_identical_to_imwatermark(name):
    rgb = images()[name]
    encoder = imwatermark.WatermarkEncoder()
    encoder.set_watermark("bits", list(wm.FLUX_BITS))
    expected = encoder.encode(rgb[..., ::-1].copy(), "dwtDct")[..., ::-1]
    assert np.array_equal(wm.embed(rgb), expected)


@pytest.mark.parametrize("name", list(images()))
def test_detector_agrees_with_imwatermark(name):
    decoder = imwatermark.WatermarkDecoder("bits", len(wm.FLUX_BITS))
    marked = wm.embed(images()[name])
    buffer = io.BytesIO()
    Image.fromarray(marked).save(buffer, "JPEG", quality=80)  # lossy: partial bits, decoded identically
    jpeg = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    for rgb in (images()[name], marked, jpeg):
        assert wm.decode(rgb) == tuple(int(b) for b in decoder.decode(rgb[..., ::-1].copy(), "dwtDct"))


def test_marked_images_are_detected_and_unmarked_are_not():
    noise = images()["noise"]
    assert len(wm.FLUX_BITS) == 46 and wm.matched_bits(wm.embed(noise)) == 46
    assert wm.matched_bits(noise) < wm.DETECTED_AT


def test_small_images_are_refused():
    with pytest.raises(ValueError, match="below the watermark's minimum"):
        wm.embed(np.zeros((200, 300, 3), dtype=np.uint8))
