"""The FLUX watermark is byte-compatible with invisible-watermark (imwatermark) and OpenCV's conversions."""

import io

import numpy as np
import pytest
from PIL import Image

from klein_nodes.provenance import watermark as wm
from helpers import PHOTOS, natural_photo

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


# Robust mode, on natural photos (scikit-image's test data) at klein's default 1024x1024 output.
SHARING_SAVES = [("JPEG", 75, {"subsampling": 2}), ("JPEG", 75, {"subsampling": 0}), ("WEBP", 80, {})]


def photo(name, size=1024):
    pytest.importorskip("skimage")
    return natural_photo(name, size)


def reencoded(rgb, fmt, quality, options):
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, fmt, quality=quality, **options)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def library_bits(rgb):
    """Bits imwatermark's own dwtDct decoder reads that match the FLUX message."""
    decoded = imwatermark.WatermarkDecoder("bits", len(wm.FLUX_BITS)).decode(rgb[..., ::-1].copy(), "dwtDct")
    return sum(int(a) == b for a, b in zip(decoded, wm.FLUX_BITS))


def psnr(a, b):
    return 10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


@pytest.mark.parametrize("name", PHOTOS)
def test_robust_mark_survives_jpeg_and_webp_for_the_standard_decoder(name):
    rgb = photo(name)
    robust, standard = wm.embed_robust(rgb), wm.embed(rgb)
    assert psnr(rgb, robust) >= 35
    assert library_bits(robust) == 46
    for fmt, quality, options in SHARING_SAVES:
        assert library_bits(reencoded(robust, fmt, quality, options)) >= wm.DETECTED_AT, (fmt, quality, options)
    assert library_bits(reencoded(standard, "JPEG", 75, {"subsampling": 2})) < wm.DETECTED_AT  # what it fixes


def test_dark_photos_get_the_lift_plan_and_keep_the_mark():
    rgb = photo("hubble_deep_field", 512)  # half near black: the keep-y plan affords too few of its blocks
    mark = wm.robust_mark(rgb)
    assert mark.plan == "lift" and psnr(rgb, mark.image) >= 35 and library_bits(mark.image) == 46
    for fmt, quality, options in [("WEBP", 80, {}), ("JPEG", 75, {"subsampling": 2})]:
        assert library_bits(reencoded(mark.image, fmt, quality, options)) >= wm.DETECTED_AT, (fmt, quality)


def test_a_mark_that_cannot_hold_says_why():
    black = np.zeros((512, 512, 3), dtype=np.uint8)  # blue at 0 everywhere: U falls only by lifting luminance
    mark = wm.robust_mark(black)
    assert psnr(black, mark.image) >= 35 and library_bits(reencoded(mark.image, "WEBP", 80, {})) < wm.DETECTED_AT
    assert "quality budget moves only" in mark.limit and "100% near black" in mark.limit


@pytest.mark.parametrize("fmt,quality", [("jpeg", 75), ("webp", 80)])
def test_the_packs_lossy_saves_keep_the_mark(tmp_path, fmt, quality):
    from klein_nodes.provenance.save import save_image_records

    for name in ("astronaut", "rocket", "retina"):
        rgb = photo(name, 768)
        image = torch_image(rgb)
        (record,) = save_image_records(image, tmp_path, prefix=name, format=fmt, quality=quality, c2pa=False)
        written = np.asarray(Image.open(record.path).convert("RGB"))
        assert record.watermark_bits == library_bits(written) >= wm.DETECTED_AT and record.notes == []


def test_standard_mode_writes_exactly_imwatermarks_embedding(tmp_path):
    from klein_nodes.provenance.save import save_image_records

    rgb = photo("coffee", 512)
    (record,) = save_image_records(torch_image(rgb), tmp_path, watermark_mode="standard", c2pa=False)
    encoder = imwatermark.WatermarkEncoder()
    encoder.set_watermark("bits", list(wm.FLUX_BITS))
    expected = encoder.encode(rgb[..., ::-1].copy(), "dwtDct")[..., ::-1]
    assert np.array_equal(np.asarray(Image.open(record.path).convert("RGB")), expected)


def test_unknown_watermark_mode_is_refused_before_saving(tmp_path):
    from klein_nodes.errors import KleinError
    from klein_nodes.provenance.save import save_image_records

    with pytest.raises(KleinError, match="watermark_mode='strong'.*robust.*standard"):
        save_image_records(torch_image(photo("coffee", 256)), tmp_path, watermark_mode="strong", c2pa=False)
    with pytest.raises(KleinError, match="watermark='standard': use True or False .*watermark_mode"):
        save_image_records(torch_image(photo("coffee", 256)), tmp_path, watermark="standard", c2pa=False)
    assert list(tmp_path.iterdir()) == []


def torch_image(rgb):
    import torch

    return torch.from_numpy(rgb[None].astype(np.float32) / 255)
