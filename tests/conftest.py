"""Test harness: the Triton interpreter on machines without CUDA, fresh seeds, and the shared error rule."""

import os
import sys

import torch

if not torch.cuda.is_available():
    # must happen before triton is imported: Triton picks the interpreter when a kernel is decorated
    assert "triton" not in sys.modules, "triton was imported before conftest could set TRITON_INTERPRET"
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Fresh inputs every run; FASTVIT_TEST_SEED=<n> replays a run (the header prints the one in use).
BASE_SEED = int(os.environ.get("FASTVIT_TEST_SEED", random.SystemRandom().randrange(2**31)))
# pytest-xdist's workers start after this import, from this environment: they draw the controller's seed, so the
# one printed replays the whole run
os.environ["FASTVIT_TEST_SEED"] = str(BASE_SEED)


def pytest_report_header(config):
    return (
        f"fastvit_kernels: device={DEVICE}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
        f"FASTVIT_TEST_SEED={BASE_SEED}"
    )


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # also under -q, which hides the header: a failure can always be replayed
    terminalreporter.write_line(f"fastvit_kernels: FASTVIT_TEST_SEED={BASE_SEED} replays this run's inputs")


@pytest.fixture(autouse=True)
def seed(request):
    s = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31)
    torch.manual_seed(s)
    return s


@pytest.fixture(autouse=True)
def fresh_choices():
    """Each test chooses its own configurations and GEMM backends: the environment switches a test sets
    (FASTVIT_GEMM, FASTVIT_ATTN_WHOLE, ...) are read when a key is first launched (fastvit_kernels.tuning.forget)."""
    from fastvit_kernels import tuning

    tuning.forget()
    yield
    tuning.forget()


@pytest.fixture
def device():
    return DEVICE
