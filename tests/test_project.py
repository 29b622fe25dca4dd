"""What a fresh clone promises: the README's quick start runs as written, `make test` and `make bench` say what a
user needs to replay or read a run, and the package carries its license."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent


def test_readme_quick_start_runs_as_written():
    # in a fresh interpreter, as a user runs it: on a GPU through our kernels, on a CPU through eager PyTorch
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\s+```python\n(.*?)```", text, re.S).group(1)
    check = "\nassert logits.shape == (8, 10) and torch.isfinite(logits.float()).all()\nprint('quick start ok')\n"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", block + check], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "quick start ok" in proc.stdout, proc.stderr[-3000:]


def test_the_seed_is_shown_even_under_q():
    env = dict(os.environ, FASTVIT_TEST_SEED="12345")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_gelu.py::test_nan_propagates_and_erf_of_infinity",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "FASTVIT_TEST_SEED=12345" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU prints")
def test_bench_without_a_gpu_says_what_ran_and_why_the_rest_did_not(tmp_path):
    # not as an xdist worker: pytest-benchmark reads PYTEST_XDIST_WORKER and then refuses --benchmark-only
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env["FASTVIT_BENCH_OUT"] = str(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "benchmarks/",
            "--benchmark-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "--bench-rounds",
            "2",
            "--bench-warmup",
            "1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    tail = proc.stdout[-2000:]
    assert "No CUDA GPU here: only the CPU rows ran" in tail and "rows measured" in tail
    assert re.search(r"skipped +\d+: kernel benchmarks needs a CUDA GPU", tail)
    assert (tmp_path / "results.png").is_file() and (tmp_path / "results.md").is_file()


def test_license_and_ignores():
    assert "Permission is hereby granted" in (ROOT / "LICENSE").read_text()
    assert 'license = { file = "LICENSE" }' in (ROOT / "pyproject.toml").read_text()
    assert "build/" in (ROOT / ".gitignore").read_text().splitlines()
