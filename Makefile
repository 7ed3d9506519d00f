# Two entry points (see README): `make demo` and `make test`. Both set up .venv from scratch.
# torch is pinned to the CPU wheel 2.13.0 before the package, so pip never pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install demo test lint clean

install: $(VENV)/.installed

# what `collabedit demo` needs: the package and its dependencies, no dev or Flower extras
$(VENV)/.core: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed: $(VENV)/.core
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.core
	$(BIN)/collabedit demo

test: install
	$(BIN)/python -m ruff check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

clean:
	rm -rf $(VENV) build *.egg-info
