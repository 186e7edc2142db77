"""bench/gpu_check.py's steps at tiny widths on the CPU (the GPU machine runs the same code at klein's widths):
its latency rows compare the pack with diffusers, its budget rows plan, run and compare with the resident image,
and it writes a dated RESULTS section."""

import datetime
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
pytest.importorskip("diffusers")
import gpu_check  # noqa: E402


def test_tiny_steps_write_a_dated_section(tmp_path, capsys):
    assert gpu_check.main(["--tiny", "--steps", "triton,latency,budgets", "--repeats", "1",
                           "--out", str(tmp_path)]) == 0
    text = (tmp_path / "gpu_check.md").read_text()
    assert text.startswith(f"## GPU check ({datetime.date.today().isoformat()}, ")
    assert "tiny widths" in text.splitlines()[0]
    assert re.search(r"- latency 64², 4 steps, .*: diffusers \w+ \d+\.\d+ s", text)
    ratios = re.findall(r"  - ours (\w+): \d+\.\d+ s, ours/diffusers (\d+\.\d+) \(", text)
    assert [fmt for fmt, _ in ratios] == ["float32", "fp8", "Q4_0"] and all(float(r) > 0 for _, r in ratios)
    budget_rows = [line for line in text.splitlines() if " under " in line]
    assert len(budget_rows) == 6, text
    assert all("same image" in line and "one component at a time" in line for line in budget_rows), text
    assert "- triton: skipped (needs CUDA and Triton)" in text  # no GPU here


def test_steps_past_the_time_limit_are_skipped_and_said(tmp_path):
    assert gpu_check.main(["--tiny", "--minutes", "0", "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "gpu_check.md").read_text().splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("- ")] == [
        "- tests", "- triton", "- latency", "- budgets"]
    assert all("skipped, 0.0 of 0 minutes spent" in line for line in lines if line.startswith("- "))


def test_without_a_gpu_the_full_size_check_says_how_to_run_here(capsys):
    if gpu_check.torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert gpu_check.main([]) == 0
    assert "run with --tiny" in capsys.readouterr().out
