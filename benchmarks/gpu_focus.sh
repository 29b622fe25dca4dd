#!/usr/bin/env bash
# On a CUDA machine, before `make gpu-check`: the few minutes (at most 240 s) that show whether what changed since the
# last GPU run works there, so that the check is not spent on a failure, and that tune the CIFAR-10 step's kernels at
# batch 512 for it. What it runs (each with its own limit): the epilogue-behind GEMM tiles' tests at K = 384 (GELU,
# GELU'), the attention tests
# (every tile forced, bf16 and fp32: the tensor-core code only bf16 runs; the dK/dV kernel's partial rows of qkv's bias
# gradient, new in session 22), the step plans' tests (CUDA tensors, autograd's device thread) and the launch counts,
# then the CIFAR-10 end-to-end `ours` and eager rows at batch 512, inference and training, a few rounds each. Its tuning
# is kept on disk (gpu_env.sh), so `make gpu-check` on the same machine right after starts with those kernels tuned: on
# a fresh H200 (2026-11-28) the check's 100 s of `ours` rows covered inference and not training's tuning. Rows go to
# $OUT_DIR/rows.jsonl with their commit (FASTVIT_COMMIT=<hash> where the tree came without .git). Batch 8's rows (the
# host's time) are `make bench`'s: they tune the attention tiles of their own batch size.
source "$(dirname "$0")/gpu_env.sh"
echo "=== the GEMM tiles with GELU or GELU' one tile behind (sessions 26-27): if they fail, the rows run without"
# (in parallel where pytest-xdist is there: ten tile variants to compile)
FASTVIT_AUTOTUNE=0 timeout 50 $PY -m pytest -q -rf --tb=short -p no:cacheprovider $XDIST tests/test_gemm_tiles.py \
  -k "one_tile_behind and K384" 2>&1 | tee "$OUT_DIR/focus_behind.log" \
  | grep -E "(FAILED|ERROR) tests/|passed|failed" | tail -5
grep -qE "[0-9]+ passed" "$OUT_DIR/focus_behind.log" && ! grep -qE "[0-9]+ (failed|error)" "$OUT_DIR/focus_behind.log" \
  || { export FASTVIT_GELU_BEHIND=0; echo "!!! epilogue-behind tiles failed or did not finish: FASTVIT_GELU_BEHIND=0"; }
echo "=== the attention tests (every tile forced), the plans', the launch counts"
FASTVIT_AUTOTUNE=0 timeout 60 $PY -m pytest -v -rf --tb=short tests/test_attention.py tests/test_qkv_attention.py \
  tests/test_plan.py tests/test_plan_training.py tests/test_launch_count.py $XDIST -p no:cacheprovider \
  2>&1 | tee "$OUT_DIR/focus_tests.log" | grep -E "(FAILED|ERROR) tests/|=.*(passed|failed)" | cut -c1-200 | tail -20
echo "=== CIFAR-10 bf16 at batch 512: ours and eager (host_ms: the host's issue time per step)"
timeout 130 $PY -m pytest --benchmark-only -q -p no:cacheprovider --bench-rounds 5 --bench-warmup 2 \
  benchmarks/test_e2e.py -k "cifar10 and not b8 and bf16 and (ours or eager-sdpa) and not compile and not triton" \
  2>&1 | tee "$OUT_DIR/focus_bench.log" | grep -E "^\| cifar10|^(FAILED|ERROR)|passed|failed" | tail -20
