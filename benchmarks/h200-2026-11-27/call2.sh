#!/usr/bin/env bash
# The second call of 2026-11-27 (H200, commit 4cd4755), on the machine still warm from `gpu_check.sh` (its tuning on
# disk): the rows the check's stage limits left out, 10 rounds each. As it ran, one line, spelled out here.
source "$(dirname "$0")/../gpu_env.sh"
export FASTVIT_COMMIT=4cd4755
: > "$FASTVIT_BENCH_ROWS"
b() {  # b LIMIT PYTEST-ARGS...
  local limit=$1; shift
  timeout "$limit" $PY -m pytest --benchmark-only -q -p no:cacheprovider --bench-rounds 10 --bench-warmup 3 "$@" \
    2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | tail -4
}
b 70 benchmarks/test_e2e.py -k "vitb16 and (ours or sdpa) and not compile"
b 50 benchmarks/test_gemms.py -k "norm"
b 50 benchmarks/test_kernels.py::test_attention -k "N257 or no-whole"
$PY benchmarks/summary.py "$FASTVIT_BENCH_ROWS" "$OUT" | grep "^|"
