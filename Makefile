# Set-up and the two commands a new user needs.
#   make demo   - create .venv, install, run `exoalign demo`
#   make test   - create .venv, install with dev extras, run ruff and pytest
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO_ARGS ?=

.PHONY: venv demo test lint clean

$(BIN)/exoalign: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[dev]"
	touch $(BIN)/exoalign

venv: $(BIN)/exoalign

demo: venv
	$(BIN)/exoalign demo $(DEMO_ARGS)

lint: venv
	$(BIN)/ruff check exoalign tests benchmarks

test: venv lint
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) build *.egg-info
