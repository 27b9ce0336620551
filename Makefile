# streamq: `make run` serves the tiny demo model; `make test` runs lint, types and the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Installed before the project so that the `worker` extra's torch requirement is already met
# (a plain `torch` requirement on a machine without it pulls a multi-GB CUDA build).
# On a GPU machine, set TORCH to the build you want, e.g. TORCH='torch --index-url ...'.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.streamq-installed
ARGS ?=

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[worker,test]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/streamq up $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
