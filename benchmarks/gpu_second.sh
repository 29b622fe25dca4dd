#!/usr/bin/env bash
# A second call on the machine `gpu_check.sh` left warm (its tuning on disk): the rows the check's stage limits leave
# out, 10 rounds each, at most 225 s (a lent GPU's 15 minutes left ~145 s after the focus and the check on the H200,
# 2026-11-28: give the call what is left; its stages stream their rows, so a cut keeps what ran). In priority
# order: the per-kernel profile of qkv_attention's two rows (profile-qkv.md: why the one op lost to its two parts on
# the H200, 2026-11-28, where the tuner's kernel times had it ahead), torch.compile with CUDA graphs over our model's
# training step (the issue's row; it compiles for a minute or more), ViT-B/16 end to end, the attention rows with
# SDPA's backends, CIFAR-10's GEMMs with the next LayerNorm and the weight gradients. Rows go to $OUT_DIR/rows.jsonl
# with their commit, as the check's (FASTVIT_COMMIT=<hash> where the tree came without .git).
source "$(dirname "$0")/gpu_env.sh"
: > "$FASTVIT_BENCH_ROWS"
b() {  # b LIMIT PYTEST-ARGS...
  local limit=$1; shift
  timeout "$limit" $PY -m pytest --benchmark-only -q -p no:cacheprovider --bench-rounds 10 --bench-warmup 3 "$@" \
    2>&1 | tee -a "$OUT_DIR/bench.log" | grep -E "^(FAILED|ERROR)|passed|failed" | tail -4
}
timeout 30 $PY benchmarks/profile_step.py --qkv "$OUT_DIR" 2>&1 | grep -E "^(###|\| \`)" | head -30
# training first: the inference row ran in two earlier runs, the training row never within its stage's limit
b 80 benchmarks/test_e2e.py -k "cifar10 and bf16 and ours-compile-reduce-overhead and train"
b 45 benchmarks/test_e2e.py -k "vitb16 and (ours or sdpa) and not compile"
b 50 benchmarks/test_kernels.py::test_attention -k "(ours or flash or cudnn) and not no-whole"
b 20 benchmarks/test_gemms.py -k "cifar10 and (norm or dW)"
$PY benchmarks/summary.py "$FASTVIT_BENCH_ROWS" "$OUT_DIR" | grep "^|"
