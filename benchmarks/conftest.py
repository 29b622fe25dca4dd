"""Benchmark harness: options, one row per measurement, and the summary written after the run.

Each benchmark calls `measure(...)`, which times with benchmark.pedantic (warm-up rounds first, so compilation and
autotuning stay out of the numbers; a CUDA synchronize inside every timed call) and stores its row in extra_info.
At the end of the session the rows become benchmarks/results/{results.json, results.md, results.png}, and a compact
speedup table is printed last.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import _PEAK, ROWS, env_info  # noqa: E402

RESULTS_DIR = Path(os.environ.get("FASTVIT_BENCH_OUT", Path(__file__).parent / "results"))


def pytest_addoption(parser):
    g = parser.getgroup("fastvit")
    g.addoption("--bench-rounds", type=int, default=30, help="timed rounds per row (median reported)")
    g.addoption("--bench-warmup", type=int, default=5, help="untimed warm-up rounds per row")


@pytest.fixture(scope="session")
def bench_opts(request):
    return dict(rounds=request.config.getoption("--bench-rounds"), warmup=request.config.getoption("--bench-warmup"))


@pytest.fixture(autouse=True)
def fresh_choices():
    """Each row's GEMM backends and configurations are decided afresh (a row may force FASTVIT_GEMM, read when a key is
    first launched: fastvit_kernels.tuning.forget). Triton's autotuner keeps its timings, so nothing is re-timed."""
    from fastvit_kernels import tuning

    tuning.forget()
    yield
    tuning.forget()


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_sessionfinish(session, exitstatus):
    if not ROWS:
        return
    from summary import write_summary

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    info = env_info()
    info["matmul_peak_tflops"] = {str(k): v for k, v in _PEAK.items()}
    info["command"] = " ".join(sys.argv)
    (RESULTS_DIR / "results.json").write_text(json.dumps(dict(env=info, rows=ROWS), indent=1))
    session.config._fastvit_table = write_summary(ROWS, info, RESULTS_DIR)


def _skip_reasons(terminalreporter):
    """{reason: count} of the skipped benchmarks."""
    reasons = {}
    for rep in terminalreporter.stats.get("skipped", []):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables: the last thing on the screen
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    table = getattr(config, "_fastvit_table", None)
    if table:
        terminalreporter.write_sep("=", "fastvit_kernels: speedups (median, same run)")
        terminalreporter.write_line(table)
        terminalreporter.write_line(f"written to {RESULTS_DIR}/results.{{json,md,png}}")
    reasons = _skip_reasons(terminalreporter)
    ran = len(terminalreporter.stats.get("passed", []))
    terminalreporter.write_sep("=", f"fastvit_kernels: {ran} rows measured, {sum(reasons.values())} skipped")
    if not torch.cuda.is_available():
        terminalreporter.write_line(
            "No CUDA GPU here: only the CPU rows ran (eager PyTorch references, and the host time to issue our steps). "
            "Our kernels' rows need a GPU: "
            "run `make gpu-check` on one. Under the Triton interpreter the kernels are for correctness, not speed."
        )
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"  skipped {n:4d}: {reason}")
