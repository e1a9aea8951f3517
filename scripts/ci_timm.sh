#!/usr/bin/env bash
# Test the timm host of unipruner.vit in its own environment.
#
# timm needs torchvision, and PyPI's torchvision cannot live next to the CPU torch build of the
# main venv (it breaks transformers there), so timm gets .venv-timm with torch 2.14.1 +
# torchvision 0.29.1. Idempotent: the venv is built once (a marker file records success) and
# unipruner is reinstalled editable (cheap) every run. Fails, never skips, if timm is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-timm
MARKER="$VENV/.unipruner-timm-ready"
PY="${PYTHON:-python3}"

if [ ! -f "$MARKER" ]; then
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 timm pytest
    "$VENV/bin/pip" install -q numpy typer rich safetensors matplotlib
    "$VENV/bin/pip" install -q --no-deps -e .
    touch "$MARKER"
fi
"$VENV/bin/python" -c "import timm, torchvision, unipruner.adapters.vit; print('timm', timm.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests_envs/timm "$@"
