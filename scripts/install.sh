#!/usr/bin/env bash
# Create a virtual environment and install longvid with its test extras.
# Without a GPU the CPU build of torch is installed first (an unpinned torch pulls several GB of CUDA
# packages); with one, the normal CUDA build. Override with TORCH_SPEC / TORCH_INDEX_URL.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    index=()
    [ -n "${TORCH_INDEX_URL:-}" ] && index=(--index-url "$TORCH_INDEX_URL")
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        "${PIP[@]}" "${index[@]}" "${TORCH_SPEC:-torch}"
    else
        # torch 2.13.0 resolves to the CPU build here; elsewhere set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
        "${PIP[@]}" "${index[@]}" "${TORCH_SPEC:-torch==2.13.0}"
    fi
fi
"${PIP[@]}" -e ".[test]"
touch "$VENV/.installed"
