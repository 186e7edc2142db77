"""composite_edit on natural photos: a known sub-pixel shift, a per-channel gain/offset/gamma change and a local
change of 5-30 % (another photo's content or the photo inverted, in an irregular blob) are made as in
tests/test_composite.py; the found shift, the found change (IoU with the truth), the PSNR of the result against the
truth inside the change, whether everything beyond feather + margins is the original bit for bit, and the time.

    python bench/composite.py [--size 1024] [--photos astronaut,coffee] [--repeats 5]
"""

import argparse
import sys
from pathlib import Path

import torch
from klein_nodes.sampling.composite import composite_edit
from machine import machine_line, median_time

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # for helpers.py
from helpers import EDIT_SHIFTS, PHOTOS, edit_case, edit_colours, edit_scores  # noqa: E402

FRACTIONS = (0.05, 0.30, 0.12, 0.20, 0.08, 0.25, 0.15)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--photos", default=",".join(PHOTOS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(machine_line())
    print(f"{args.size}x{args.size}, no mask given, feather 8; time: median of {args.repeats} runs after a warm-up")
    print(f"{'photo':<18} {'change':<13} {'true shift':>15} {'found shift':>15} {'error':>11} {'IoU':>6} "
          f"{'PSNR in':>8} {'outside':>8} {'changed':>8} {'time':>8}")
    for name in args.photos.split(","):
        index = PHOTOS.index(name)
        shift, fraction, kind = EDIT_SHIFTS[index], FRACTIONS[index], ("paste", "invert")[index % 2]
        original, edited, truth, change = edit_case(name, args.size, shift, fraction, kind, edit_colours(index), index)
        result, mask, info = composite_edit(original, edited)
        error, iou, psnr, exact = edit_scores(result, mask, info, original, truth, change, shift)
        seconds = median_time(lambda o=original, e=edited: composite_edit(o, e), args.repeats)
        found = info["shift"]
        print(f"{name:<18} {f'{kind} {fraction:.0%}':<13} {f'({shift[0]:+.2f}, {shift[1]:+.2f})':>15} "
              f"{f'({found[0]:+.2f}, {found[1]:+.2f})':>15} {f'{error[0]:.3f} {error[1]:.3f}':>11} {iou:>6.3f} "
              f"{f'{psnr:.1f} dB':>8} {'exact' if exact else 'DIFFERS':>8} {info['changed']:>8.1%} "
              f"{seconds * 1000:>6.0f} ms")
    print(f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
