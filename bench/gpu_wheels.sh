#!/usr/bin/env bash
# The wheels a bare GPU machine (Python 3.12 with torch, transformers and Triton, no network) needs beside its own
# packages to run bench/gpu_check.py, downloaded into .whl/ (kept out of git). On the GPU machine, from the repo:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/klein_nodes
#   PYTHONPATH=/tmp/pkg:/tmp/site python3 bench/gpu_check.py --out DIR
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    diffusers==0.42.1 gguf==0.19.0 c2pa-python==0.38.1 cryptography==51.0.1 cffi==2.1.1 pycparser==3.12
ls -la .whl
