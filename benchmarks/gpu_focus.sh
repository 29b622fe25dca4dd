#!/usr/bin/env bash
# On a CUDA machine, before `make gpu-check`: the few minutes (at most 225 s) that show whether what changed since the
# last GPU run works there, so that the check is not spent on a failure. What it runs (each with its own limit): the
# attention tests (every tile forced, bf16 and fp32: the tensor-core code only bf16 runs) and the step plans' tests
# (CUDA tensors, autograd's device thread), then the CIFAR-10 end-to-end `ours` and eager rows at batch 8 and 512,
# with and without step plans, a few rounds each. Its tuning is kept on disk (gpu_env.sh), so `make gpu-check` on the
# same machine right after starts with those kernels tuned. Rows go to $OUT_DIR/rows.jsonl with their commit
# (FASTVIT_COMMIT=<hash> where the tree came without .git). The GEMM tests (TMA and warp-specialised tiles) passed on
# an H100 and an H200 on 2026-11-27 and are gpu-check's first stage; the GELU's, the 128 x 256 tiles' and the GEMM
# with the next LayerNorm's (every candidate) run here too, and session 20's bias-gradient passes (the LayerNorm
# backward's capped tile with dx's sums, the GELU' column sums, the dgelu candidates, the launch counts) and session
# 21's qkv_attention (the attention backward's partial rows of qkv's bias gradient, every tile forced); the check runs
# the kernels new since the last GPU run under compute-sanitizer's memcheck.
source "$(dirname "$0")/gpu_env.sh"
T=tests/test_linear.py::test_every_linear_config
WIDE=("$T[128x256x64-w8-s3-tma-gelu]" "$T[128x256x64-w8-s3-tma-residual]" "$T[128x256x64-w8-s3-tma-flat-gelu]"
  "$T[128x256x64-w8-s3-tma-flat-residual]" tests/test_linear.py::test_linear_residual_layernorm)
# the tiles new since the last GPU run: the descriptor epilogues, the warp-specialised and the flattened 128 x 128
for tile in 128x128x64-w8-s3-tma-epitma 128x64x64-w4-s3-tma-epitma 64x128x64-w4-s4-tma-epitma \
  128x128x64-w8-s2-tma-epitma 128x128x64-w4-s3-tma-warpspec 128x128x64-w8-s2-tma-flat; do
  for epilogue in gelu residual gelu_grad; do WIDE+=("$T[$tile-$epilogue]"); done
done
echo "=== the GELU's, the new, 128 x 256 and LayerNorm GEMM tiles', the attention tests (every tile forced), the plans'"
FASTVIT_WARP_SPEC=1 FASTVIT_AUTOTUNE=0 timeout 80 $PY -m pytest -v -rf --tb=short tests/test_gelu.py "${WIDE[@]}" \
  tests/test_attention.py tests/test_qkv_attention.py tests/test_arena.py tests/test_plan.py \
  tests/test_plan_training.py \
  "tests/test_linear.py::test_every_column_sum_config[0-384-torch.bfloat16]" \
  "tests/test_linear.py::test_every_column_sum_config[1-100-torch.float32]" \
  "tests/test_linear.py::test_every_gelu_grad_column_sum_config[0-384]" \
  tests/test_linear.py::test_gelu_grad_with_its_bias_sums \
  "tests/test_layernorm.py::test_every_layernorm_bwd_config[1rows-w2-s3-r80-D384]" tests/test_launch_count.py \
  tests/test_linear.py::test_weight_grad_launched_again_on_the_same_buffers \
  tests/test_direct_launch.py tests/test_recording.py $XDIST -p no:cacheprovider \
  2>&1 | tee "$OUT_DIR/focus_tests.log" | grep -E "(FAILED|ERROR) tests/|=.*(passed|failed)" | cut -c1-200 | tail -20
focus_bench() {  # focus_bench LIMIT WORKLOAD: ours (planned, indirect, unplanned, graphed) and eager SDPA, bf16
  timeout "$1" $PY -m pytest --benchmark-only -q -p no:cacheprovider --bench-rounds 5 --bench-warmup 2 \
    benchmarks/test_e2e.py -k "$2 and bf16 and (ours or eager-sdpa) and not compile and not triton" \
    2>&1 | tee -a "$OUT_DIR/focus_bench.log" | grep -E "^\| cifar10|^(FAILED|ERROR)|passed|failed" | tail -20
}
# batch 8 first: its rows (the host's time, which plans, direct launches and batched casts are about) are gpu-focus's
# alone, and the first rows of a run pay the tuning of every kernel's shapes
echo "=== CIFAR-10 bf16 at batch 8, then 512: ours and eager (host_ms: the host's issue time per step)"
focus_bench 60 "cifar10-b8"
focus_bench 60 "cifar10 and not b8"
