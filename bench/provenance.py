"""Watermark & Save at 1024²: the cost of each step per format, and our watermark vs imwatermark as a ratio.

    python bench/provenance.py [--repeats 5]
"""

import argparse
import io
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from machine import interleaved, machine_line, median_time, paired_text
from klein_nodes.provenance import c2pa_sign, metadata, watermark
from klein_nodes.provenance.formats import IMAGE_FORMATS
from klein_nodes.provenance.save import to_uint8, write_new
from klein_nodes.version import __version__


def timed(fn, repeats):
    """(median ms, the result of a run)."""
    return median_time(fn, repeats) * 1e3, fn()


def test_image(size=1024, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([0.5 + 0.3 * np.sin(6 * x + 2 * c) * np.cos(4 * y - c) for c in range(3)], -1)
    return np.clip(image + rng.normal(0, 0.04, image.shape), 0, 1).astype(np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(machine_line())
    image = test_image()
    items = metadata.metadata_items({"3": {"inputs": {"seed": 1}}},
                                    {"workflow": {"nodes": [{"id": i} for i in range(200)]}})
    with tempfile.TemporaryDirectory() as tmp:
        credentials = c2pa_sign.load_credentials(Path(tmp) / "credentials")
        convert_ms, rgb = timed(lambda: to_uint8(image, []), args.repeats)
        ours_ms, marked = timed(lambda: watermark.embed(rgb), args.repeats)
        print(f"1024x1024, {args.repeats} runs (median ms)")
        print(f"tensor -> uint8 {convert_ms:.1f}   watermark (ours) {ours_ms:.1f}")
        try:
            import imwatermark

            encoder = imwatermark.WatermarkEncoder()
            encoder.set_watermark("bits", list(watermark.FLUX_BITS))
            reference = encoder.encode(rgb[..., ::-1].copy(), "dwtDct")
            assert np.array_equal(reference[..., ::-1], marked)
            library, own = interleaved([lambda: encoder.encode(rgb[..., ::-1].copy(), "dwtDct"),
                                        lambda: watermark.embed(rgb)], args.repeats)
            print(f"watermark (imwatermark) {statistics.median(library) * 1e3:.1f}   time imwatermark/ours per round "
                  f"{paired_text(library, own)} (identical output)")
        except ImportError:
            print("imwatermark not installed: ratio skipped")
        print(f"{'format':<8}{'encode+meta':>12}{'sign':>8}{'write':>8}{'verify':>8}{'total':>8}{'KiB':>8}{'bits':>6}")
        for fmt, spec in IMAGE_FORMATS.items():
            encode_ms, data = timed(lambda: metadata.encode(marked, fmt, 90, items), args.repeats)
            sign_ms, signed = timed(lambda: c2pa_sign.sign(data, spec.mime, "bench", credentials, __version__),
                                    args.repeats)
            counter = iter(range(1, 10**6))
            write_ms, (path, _) = timed(lambda: write_new(tmp, f"bench_{fmt}", next(counter), spec.extension, signed),
                                        args.repeats)
            verify_ms, report = timed(lambda: c2pa_sign.verify(path, credentials["root"]), args.repeats)
            bits = watermark.matched_bits(np.asarray(Image.open(io.BytesIO(signed)).convert("RGB")))
            total = convert_ms + ours_ms + encode_ms + sign_ms + write_ms
            print(f"{fmt:<8}{encode_ms:>12.1f}{sign_ms:>8.1f}{write_ms:>8.1f}{verify_ms:>8.1f}{total:>8.1f}"
                  f"{len(signed) / 1024:>8.0f}{bits:>6}  ({report['state']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
