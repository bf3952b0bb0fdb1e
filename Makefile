# Set-up installs into .venv at the repo root. torch is pinned first to the CPU build that lies on this
# kind of machine's disk (an unpinned torch pulls a multi-GB CUDA build); on a GPU machine install your
# CUDA build of torch>=2.13 into .venv before `make setup`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test test-fast clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/python run.py

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf outputs/runs outputs/multirun outputs/ray outputs/wandb outputs/cache
