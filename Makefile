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

# again whenever pyproject.toml's dependencies change (an older .venv gets pytest-xdist, which `make test` uses)
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# one pytest worker a core (pytest-xdist): 2 on the CI box
test: venv
	$(BIN)/ruff check fastvit_kernels tests benchmarks
	$(BIN)/pytest -q -n auto tests

bench: venv
	$(BIN)/pytest benchmarks/ --benchmark-only -q

# On a CUDA machine: GPU tests + the benchmark suite, compact speedup table printed last (uses the system python).
gpu-check:
	bash benchmarks/gpu_check.sh

# On the machine gpu-check left warm, with the device time left (~200 s): the rows its stage limits leave out.
gpu-second:
	bash benchmarks/gpu_second.sh

# On a CUDA machine, first: ~3 minutes of the attention and step-plan tests and the CIFAR-10 e2e rows, to catch a
# failure early (its tuning stays on disk for gpu-check).
gpu-focus:
	bash benchmarks/gpu_focus.sh

# The lent GPUs run triton 3.6 (with torch 2.11); `make test` runs triton 3.8. This builds a second environment with
# triton 3.6 (torch 2.13 for the CPU from this machine's wheels; numpy < 2.3, which triton 3.6's interpreter needs)
# and runs the kernel tests under its interpreter and the compile check with its compiler (~5 min).
VENV36 := .venv36
TORCH36 ?= $(firstword $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl) torch==2.13.0)
KERNEL_TESTS := tests/test_attention.py tests/test_qkv_attention.py tests/test_layernorm_mlp.py \
	tests/test_fused_linear.py tests/test_layernorm.py tests/test_linear.py tests/test_gemm_tiles.py \
	tests/test_column_sums.py tests/test_gelu.py \
	tests/test_patch_embed.py tests/test_interpreter.py tests/test_launch_count.py tests/test_launch_limits.py \
	tests/test_torch_compile.py tests/test_compile_targets.py tests/test_plan.py tests/test_plan_training.py \
	tests/test_direct_launch.py tests/test_recording.py tests/test_arena.py tests/test_gemm_choice.py \
	tests/test_step_choice.py

$(VENV36)/bin/python:
	$(PY) -m venv $(VENV36)
	$(VENV36)/bin/pip install -q $(TORCH36) triton==3.6.0 "numpy<2.3" pytest

test-triton36: $(VENV36)/bin/python
	PYTHONPATH=. $(VENV36)/bin/pytest -q -p no:cacheprovider $(KERNEL_TESTS)

# The offline performance report (tests/sass_report.py): each GEMM configuration's SASS per K step and per tile,
# wgmma wait depth, loads, registers, blocks per SM and ptxas's C7515, for sm_90 with triton 3.8 and with 3.6.
report: venv $(VENV36)/bin/python
	env -u TRITON_INTERPRET $(BIN)/python tests/compile_kernels.py 90 --report benchmarks/offline_report_triton38.md >/dev/null
	env -u TRITON_INTERPRET PYTHONPATH=. $(VENV36)/bin/python tests/compile_kernels.py 90 \
		--report benchmarks/offline_report_triton36.md >/dev/null

lint: venv
	$(BIN)/ruff check fastvit_kernels tests benchmarks
	$(BIN)/ruff format --check fastvit_kernels tests benchmarks

.PHONY: venv test bench gpu-check gpu-second gpu-focus test-triton36 report lint
