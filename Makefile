# Two set-up commands for a fresh machine: `make demo` (install + run the pipeline on bundled data)
# and `make test` (install + run the test suite). Both create/refresh the virtual environment.
CMFT_VENV ?= .venv
PY := $(CMFT_VENV)/bin/python
PIP := $(PY) -m pip
CMFT := $(CMFT_VENV)/bin/cmft
# Extra key=value overrides for both training commands of `make demo`; CI runs the same target with fewer steps:
#   make demo DEMO_PRETRAIN="training.max_steps=20" DEMO_FINETUNE="training.max_steps=20"
DEMO_PRETRAIN ?=
DEMO_FINETUNE ?=

.PHONY: install install-dev demo test lint bench

$(PY):
	python3 -m venv $(CMFT_VENV)

install: $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[cpu]"

install-dev: $(PY)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"

demo: install
	$(CMFT) pretrain $(DEMO_PRETRAIN)
	$(CMFT) finetune note_classification $(DEMO_FINETUNE)
	$(CMFT) evaluate runs/finetune/latest

test: install-dev
	$(CMFT_VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q -x --durations=15

lint:
	$(CMFT_VENV)/bin/ruff check src tests benchmarks
	$(CMFT_VENV)/bin/ruff format --check src tests benchmarks

bench: install-dev
	$(PY) benchmarks/pretrain_throughput.py
