# Two entry points a fresh machine needs: `make bench` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.14.1 / torchvision 0.29.1 come from the local wheel cache where there is one; pip falls back to PyPI.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[test]'

venv: $(BIN)/python

test: venv
	$(BIN)/ruff check fastvit_kernels tests benchmarks
	$(BIN)/pytest -q tests

bench: venv
	$(BIN)/pytest benchmarks/ --benchmark-only -q

# On a CUDA machine: GPU tests + the benchmark suite, compact speedup table printed last (uses the system python).
gpu-check:
	bash benchmarks/gpu_check.sh

lint: venv
	$(BIN)/ruff check fastvit_kernels tests benchmarks
	$(BIN)/ruff format --check fastvit_kernels tests benchmarks

.PHONY: venv test bench gpu-check lint
