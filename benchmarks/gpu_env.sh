# Sourced by gpu_check.sh and gpu_focus.sh: the repository root as working directory and on PYTHONPATH, PY (the
# python to run: $PYTHON, default python3), OUT_DIR (where rows and logs go: $OUT, default benchmarks/results) with the
# rows streamed to $OUT_DIR/rows.jsonl, and XDIST, pytest-xdist's option where the image has it.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
export FASTVIT_BENCH_ROWS="$OUT_DIR/rows.jsonl" FASTVIT_BENCH_OUT="$OUT_DIR"
# Triton's autotuner keeps its timings on disk (per kernel, tuner key and candidate list), so that a stage in a new
# process compiles only the tile an earlier stage chose instead of compiling and timing every candidate again: on a
# fresh H100 (2026-11-27) the first CIFAR-10 training row was still tuning after 75 s
export TRITON_CACHE_AUTOTUNING=1
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 8"  # each worker compiles its own kernels: ~35 in test_linear and test_gemm_tiles alone
