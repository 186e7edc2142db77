"""bench/sdcpp.py end to end at tiny widths, with a stand-in for sd-cli that prints stable-diffusion.cpp's log lines:
the pack's side generates through its Python API in a fresh process, and the report pairs the stages per round."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
pytest.importorskip("gguf")  # the GGUF transformers come from the pack's quantizer
import sdcpp  # noqa: E402

FAKE_SD_CLI = '''#!{python}
import sys
from PIL import Image
out = sys.argv[sys.argv.index("-o") + 1]
size = int(sys.argv[sys.argv.index("-W") + 1])
print("[INFO ] model.cpp:993  - loading tensors completed, taking 2.00s (process: 0.00s, read: 1.50s)")
print("[INFO ] stable-diffusion.cpp:3168 - get_learned_condition completed, taking 4.00s")
print("[INFO ] stable-diffusion.cpp:3432 - sampling completed, taking 8.00s")
print("[INFO ] stable-diffusion.cpp:3212 - decode_first_stage completed, taking 16.00s")
Image.new("RGB", (size, size)).save(out)
'''


def test_tiny_bench_pairs_each_stage(tmp_path, capsys):
    fake = tmp_path / "sd-cli"
    fake.write_text(FAKE_SD_CLI.format(python=sys.executable))
    fake.chmod(0o755)
    assert sdcpp.main(["--tiny", "--sd-cli", str(fake), "--models", str(tmp_path / "models"), "--sizes", "64",
                       "--types", "Q8_0", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    rounds = re.findall(r"round (\d) 64² Q8_0 (ours|sdcpp): load [\d.]+, text ([\d.]+), sampling [\d.]+", out)
    assert sorted((r, side) for r, side, _ in rounds) == [("1", "ours"), ("1", "sdcpp"), ("2", "ours"), ("2", "sdcpp")]
    assert [text for _, side, text in rounds if side == "sdcpp"] == ["4.0", "4.0"]  # read from its log
    report = re.search(r"64² Q8_0 \(2 rounds\), ours/sd.cpp: load (.*), text (.*), sampling (.*), decode (.*), "
                       r"whole (.*); peak RSS ours ([\d.]+) GiB, sd.cpp ([\d.]+) GiB", out)
    assert report, out
    assert all(re.fullmatch(r"\d+\.\d\d \(\d+\.\d\d-\d+\.\d\d\)", cell) for cell in report.groups()[:5]), out
    assert (tmp_path / "models" / "images" / "ours-Q8_0-64.png").stat().st_size > 0
