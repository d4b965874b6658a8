#!/usr/bin/env bash
# From a fresh CPU machine: install rtkit, draw the sample dataset, convert its render style
# with the bundled engine, print the summary and write a before/after contact sheet.
set -euo pipefail
cd "$(dirname "$0")"
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e .
rt-sample demo/sample --style both --identities 50 --per-identity 8
rt-convert --engine engines/bundled/render2photo.onnx demo/sample/render demo/converted \
    --sheet demo/before_after.png
