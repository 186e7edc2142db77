"""The module contract against real ComfyUI core code (not the stand-in of conftest.py). ComfyUI is not on PyPI, so
this runs where a ComfyUI source folder is given: KLEIN_COMFYUI=/path/to/ComfyUI, and KLEIN_COMFYUI_PYTHON its
Python (default: this one). tools/comfyui_contract.py does the work in that Python."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CORE = os.environ.get("KLEIN_COMFYUI")
SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "comfyui_contract.py"


@pytest.mark.skipif(not CORE, reason="set KLEIN_COMFYUI to a ComfyUI source folder to test against its core")
def test_klein_models_follow_the_real_cores_module_contract():
    python = os.environ.get("KLEIN_COMFYUI_PYTHON", sys.executable)
    run = subprocess.run([python, str(SCRIPT), CORE], capture_output=True, text=True, timeout=600)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    assert run.stdout.count("ok  ") >= 5  # one per model format, and dynamic VRAM where the core has it
