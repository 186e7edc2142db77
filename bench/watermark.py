"""Robust FLUX watermark vs BFL's standard embedding (imwatermark dwtDct) on natural photos: bits imwatermark's own
decoder reads after PNG, JPEG (4:2:0 as most sites save, 4:4:4 as the pack saves) and WebP at quality 60-95 and after
resizes, PSNR/SSIM of each mark, and the embedding time as a ratio, side by side in one process.

    python bench/watermark.py [--size 1024] [--photos astronaut,coffee]
"""

import argparse
import io
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.metrics import structural_similarity

from klein_nodes.provenance import watermark
from machine import interleaved, machine_line

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # for helpers.py
from helpers import PHOTOS, natural_photo  # noqa: E402

SAVES = [(f"JPEG 4:2:0 q{q}", "JPEG", q, {"subsampling": 2}) for q in (60, 75, 90, 95)] + \
        [(f"JPEG 4:4:4 q{q}", "JPEG", q, {"subsampling": 0}) for q in (60, 75, 90, 95)] + \
        [(f"WebP q{q}", "WEBP", q, {"method": 4}) for q in (60, 75, 80, 90, 95)]
RESIZES = (0.5, 0.75, 1.5, 2.0)


def library_bits(rgb):
    from imwatermark import WatermarkDecoder

    decoded = WatermarkDecoder("bits", len(watermark.FLUX_BITS)).decode(rgb[..., ::-1].copy(), "dwtDct")
    return sum(int(a) == b for a, b in zip(decoded, watermark.FLUX_BITS))


def conditions(rgb):
    yield "PNG (lossless)", rgb
    for label, fmt, quality, options in SAVES:
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, fmt, quality=quality, **options)
        yield label, np.asarray(Image.open(buffer).convert("RGB"))
    for factor in RESIZES:
        size = (round(rgb.shape[1] * factor), round(rgb.shape[0] * factor))
        yield f"resize {factor}x", np.asarray(Image.fromarray(rgb).resize(size, Image.BICUBIC))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--photos", default=",".join(PHOTOS))
    args = parser.parse_args()
    print(machine_line())
    print(f"{args.size}x{args.size}; embedding times of each photo's two marks taken in turns")
    names = args.photos.split(",")
    table, quality, ratios = {}, [], []
    for name in names:
        rgb = natural_photo(name, args.size)
        robust = watermark.robust_mark(rgb)
        marks = {"standard": watermark.embed(rgb), "robust": robust.image}
        standard_s, robust_s = interleaved([lambda: watermark.embed(rgb), lambda: watermark.embed_robust(rgb)], 1, 0)
        ratios.append(robust_s[0] / standard_s[0])
        quality.append((name, robust.plan, robust.share, *(f(rgb, marks[m]) for m in ("standard", "robust")
                                for f in (watermark.psnr, lambda a, b: structural_similarity(a, b, channel_axis=2)))))
        for mode in ("standard", "robust"):
            for label, image in conditions(marks[mode]):
                table.setdefault(label, {}).setdefault(mode, []).append(library_bits(image))
    print(f"\nbits read by imwatermark's dwtDct decoder (46 = all, >= {watermark.DETECTED_AT} detected), over "
          f"{len(names)} photos: detected on / min bits")
    print(f"{'after':18} {'standard (BFL)':>16} {'robust (ours)':>16}")
    for label, modes in table.items():
        cells = [f"{sum(b >= watermark.DETECTED_AT for b in modes[m])}/{len(names)} (min {min(modes[m])})"
                 for m in ("standard", "robust")]
        print(f"{label:18} {cells[0]:>16} {cells[1]:>16}")
    headline = ("JPEG 4:2:0 q75", "JPEG 4:2:0 q90", "WebP q75", "WebP q80", "WebP q90")
    print("\nrobust (ours), bits per photo: " + ", ".join(headline))
    for i, name in enumerate(names):
        print(f"{name:18} " + " ".join(f"{table[label]['robust'][i]:>4}" for label in headline))
    print(f"\n{'photo':18} {'PSNR std':>9} {'SSIM std':>9} {'PSNR ours':>10} {'SSIM ours':>10}  plan (blocks moved)")
    for name, plan, share, p_std, s_std, p_ours, s_ours in quality:
        print(f"{name:18} {p_std:9.2f} {s_std:9.4f} {p_ours:10.2f} {s_ours:10.4f}  {plan} ({share:.2f})")
    low, mid, high = sorted(ratios)[0], statistics.median(ratios), sorted(ratios)[-1]
    print(f"\nembedding time robust/standard over the photos: median {mid:.1f}x ({low:.1f}-{high:.1f}x)")


if __name__ == "__main__":
    main()
