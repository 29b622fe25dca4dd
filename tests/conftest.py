"""Test harness: the Triton interpreter on machines without CUDA, fresh seeds, and the shared error rule."""

import os
import sys

import torch

if not torch.cuda.is_available():
    # must happen before triton is imported: Triton picks the interpreter when a kernel is decorated
    assert "triton" not in sys.modules, "triton was imported before conftest could set TRITON_INTERPRET"
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hashlib  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def _inductor_cache_for_this_source():
    """Inductor's on-disk caches keyed by our source: torch's AOTAutograd cache keys a compiled training graph by the
    forward graph, which names our ops but holds neither their autograd formulas nor their backward ops' fake
    implementations (pytorch/pytorch#144344): after one of those changes, a shared cache dir served the old compiled
    backward (wrong output count, a failed size assert). Unchanged sources keep a warm cache between runs."""
    package = Path(__file__).parent.parent / "fastvit_kernels"
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    user = os.environ.get("USER", "user")
    return str(Path(tempfile.gettempdir()) / f"torchinductor_{user}" / f"fastvit-{digest.hexdigest()[:16]}")


# before Inductor first reads it; pytest-xdist's workers inherit it
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", _inductor_cache_for_this_source())

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
