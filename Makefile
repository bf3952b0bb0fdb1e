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

# The whole suite as two pytest processes side by side: the end-to-end runs.py of tests/test_end_to_end.py and
# tests/test_resume.py (their session fixtures: the default run, the mesh sweep, the resumes) and everything
# else. Most of an end-to-end test is Ray starting workers, which leaves the cores idle half the time.
E2E := tests/test_end_to_end.py tests/test_resume.py

test: setup
	@$(BIN)/python -m pytest -q -p no:cacheprovider $(E2E) > .pytest-e2e.log 2>&1 & e2e=$$!; \
	$(BIN)/python -m pytest -q $(addprefix --ignore=,$(E2E)); rest=$$?; \
	wait $$e2e; e2e_rc=$$?; echo "== $(E2E)"; cat .pytest-e2e.log; rm -f .pytest-e2e.log; \
	exit $$(( rest || e2e_rc ))

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf outputs/runs outputs/multirun outputs/ray outputs/wandb outputs/cache
