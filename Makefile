# The two commands a new user needs (both create .venv on first use):
#   make demo   - install exoalign (+ the demo extra) and run `exoalign demo`   (DEMO_ARGS="--quick" for 2 minutes)
#   make test   - install exoalign with the dev extras, then ruff + pytest
# torch is installed first when missing, from TORCH_SPEC (override e.g. TORCH_SPEC="torch==2.5.1").
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed-demo: pyproject.toml | $(VENV)/.torch
	$(BIN)/pip install -e ".[demo]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/.torch
	$(BIN)/pip install -e ".[dev]"
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/exoalign demo $(DEMO_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check exoalign tests benchmarks

test: lint
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
