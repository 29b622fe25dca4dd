#!/usr/bin/env bash
# The second call of 2026-11-27 (H100, commit 52ff442), as it ran (from a scratch folder; paths here as committed):
# what crashed in the first call (an illegal address in attention's backward, bf16), then rows with FASTVIT_ATTN_WHOLE=0
source "$(dirname "$0")/../gpu_env.sh"
: > "$FASTVIT_BENCH_ROWS"
export FASTVIT_WARP_SPEC=1 PATH="$PATH:/usr/local/cuda/bin"
echo "=== compute-sanitizer: the whole-pair dQ test, bf16, N = 65"
FASTVIT_AUTOTUNE=0 timeout 45 compute-sanitizer --tool memcheck --print-limit 3 --show-backtrace no \
  $PY -m pytest -q -x -p no:cacheprovider tests/test_attention.py -k "whole_dq_tiles and bfloat16 and 65" \
  > "$OUT_DIR/sanitizer.log" 2>&1
grep -E "^=========|passed|failed" "$OUT_DIR/sanitizer.log" | cut -c1-220 | head -24
echo "=== forward only, bf16, each forward config forced"
FASTVIT_AUTOTUNE=0 PYTHONPATH="$PYTHONPATH:$PWD/tests" timeout 25 $PY benchmarks/h100-2026-11-27/fwd_check.py 64 2>&1 | sed "s/, num_ctas: 1//; s/maxnreg: None//" | tail -14
export FASTVIT_ATTN_WHOLE=0
echo "=== attention tests with FASTVIT_ATTN_WHOLE=0: bf16 default tiles, every backward tile but the whole dQ"
FASTVIT_AUTOTUNE=0 timeout 30 $PY -m pytest -q -rf --tb=line tests/test_attention.py $XDIST -p no:cacheprovider \
  -k "(matches_reference and bfloat16 and not whole and not every) or every_backward_config" \
  --deselect "tests/test_attention.py::test_every_backward_config_matches_reference[0]" 2>&1 \
  | tee "$OUT_DIR/tests.log" | grep -E "^FAILED|passed|failed" | tail -8
bench() {  # bench LIMIT PYTEST-ARGS...
  local limit=$1; shift
  timeout "$limit" $PY -m pytest --benchmark-only -q -p no:cacheprovider --bench-rounds 10 \
    --bench-warmup 3 "$@" 2>&1 | tee -a "$OUT_DIR/bench.log" | grep -E "^(FAILED|ERROR)|passed|failed" | tail -6
}
echo "=== benchmarks, FASTVIT_ATTN_WHOLE=0"
bench 75 benchmarks/test_e2e.py -k "cifar10 and bf16 and (ours or eager-sdpa) and not compile and not b8 and not unplanned and not indirect and not triton"
bench 70 benchmarks/test_kernels.py -k "(ours or flash or cudnn or eager) and not no-whole"
bench 35 benchmarks/test_gemms.py -k cifar10
$PY benchmarks/summary.py "$FASTVIT_BENCH_ROWS" "$OUT_DIR" | grep -v "^$"
