#!/usr/bin/env bash
# From a fresh CPU machine: make a virtual environment (.venv, so a system python that refuses
# global installs, PEP 668, works too), install rtkit with its test extra, draw the sample
# dataset, convert its render style with the bundled engine, print the summary and write a
# before/after contact sheet. Safe to run again: finished work is not redone.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
    if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
        rm -rf "$VENV"
        if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
            # Debian/Ubuntu ship venv's pip bootstrap separately.
            { apt-get update -q && apt-get install -y -q python3-venv; } >/dev/null
            "$PYTHON" -m venv "$VENV"
        else
            echo "demo.sh: '$PYTHON -m venv' failed; install your distribution's python3-venv package" >&2
            exit 1
        fi
    fi
fi
PY="$VENV/bin/python"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The local CPU build first: an unpinned torch would pull several GB of CUDA packages.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q torch==2.13.0
"$PY" -m pip install -q -e ".[test]"
"$VENV/bin/rt-sample" demo/sample --style both --identities 50 --per-identity 8
"$VENV/bin/rt-convert" --engine engines/bundled/render2photo.onnx demo/sample/render demo/converted \
    --sheet demo/before_after.png
