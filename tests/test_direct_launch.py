"""Direct launches (fastvit_kernels/direct_launch.py): a plan's recorded launch replays as a call of the compiled
kernel's launcher with what Triton's JITFunction.run passed it. On a GPU the plan tests (test_plan*.py) run them for
real; here Triton's side is a stand-in that follows the convention `supported()` reads in Triton's own source."""

import pytest
import torch
from plans import calls, small_model

from fastvit_kernels import direct_launch, plan, recording, tuning


def test_the_installed_triton_launches_as_direct_launches_assume():
    """JITFunction.run binds with its device cache's binder and calls kernel.run with the bound arguments (triton 3.6,
    the lent GPUs', and 3.8): else plans would launch through Triton, and this says so."""
    assert direct_launch.supported()
    assert not direct_launch.hooks_set()


class _Compiled:
    """A compiled kernel: its launcher records what it is called with."""

    function, packed_metadata = 1234, (4, 1, 0)

    def __init__(self):
        self.calls = []

    def run(self, *args):
        self.calls.append(args)


class _Jit:
    """JITFunction as run() uses it: pre-run hooks, then its binder (all parameters, defaults filled in), then
    kernel.run; returns the compiled kernel."""

    arg_names = ["X", "OUT", "n", "BLOCK"]

    def __init__(self):
        self.pre_run_hooks = []
        self.compiled = _Compiled()
        self.device_caches = {0: (None, None, None, None, self._binder)}

    @staticmethod
    def _binder(X, OUT, n, BLOCK=16, **options):
        return {"X": X, "OUT": OUT, "n": n, "BLOCK": BLOCK}, [], options

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            kwargs["debug"] = False
            for hook in self.pre_run_hooks:
                hook(*args, **kwargs)
            bound, _, _ = self._binder(*args, **kwargs)
            self.compiled.run(*(*grid, 1, 1)[:3], "stream0", 1234, (4, 1, 0), None, None, None, *bound.values())
            return self.compiled

        return run


class _Driver:
    class active:
        get_current_device = staticmethod(lambda: 0)
        get_current_stream = staticmethod(lambda device: f"stream{device}")


def test_a_recorded_launch_replays_as_a_call_of_the_compiled_launcher(monkeypatch):
    jit = _Jit()
    monkeypatch.setattr(direct_launch, "_jit", lambda kernel: jit)
    monkeypatch.setattr(direct_launch, "driver", _Driver)
    rec = recording.Recorder({})
    x = torch.randn(8)
    rec.bind(x, "x")
    with recording.recording(rec):
        out = torch.empty_like(x)
        tuning.launch_kernel(jit, (3,), (x, out, 8), {"num_warps": 4})
    assert rec.direct and not jit.pre_run_hooks  # the capturing hook is gone
    fn, source = rec.function(["x"], rec.lines, rec.source(out), rec.take_reads())
    assert "[(3,)]" not in source  # not through Triton's launch
    x2 = torch.randn(8)
    out2 = fn(x2)
    recorded, replayed = jit.compiled.calls
    assert replayed[:9] == recorded[:9] == (3, 1, 1, "stream0", 1234, (4, 1, 0), None, None, None)
    assert replayed[9] is x2 and replayed[10] is out2 and replayed[11:] == recorded[11:] == (8, 16)
    # the compiled kernel (whose __del__ unloads the function the line launches) lives as long as the replay
    assert any(v is jit.compiled for v in fn.__globals__.values())


def test_launches_go_through_triton_where_hooks_or_stand_ins_are(monkeypatch):
    """A kernel that is not Triton's (the interpreter's, a test's stand-in) or launch hooks (a profiler): the replay
    launches through kernel[grid] as recorded."""
    jit = _Jit()
    monkeypatch.setattr(direct_launch, "driver", _Driver)
    for hooked in (False, True):
        monkeypatch.setattr(direct_launch, "_jit", lambda kernel, hooked=hooked: jit if hooked else None)
        monkeypatch.setattr(direct_launch, "hooks_set", lambda hooked=hooked: hooked)
        rec = recording.Recorder({})
        x = torch.randn(8)
        rec.bind(x, "x")
        with recording.recording(rec):
            tuning.launch_kernel(jit, (2,), (x, x, 8), {})
        assert not rec.direct
        fn, source = rec.function(["x"], rec.lines, "None", [])
        assert "[(2,)](x, x, 8)" in source
        fn(x)
        assert len(jit.compiled.calls) == 2
        jit.compiled.calls.clear()


def test_fastvit_plan_triton_records_launches_through_triton(monkeypatch):
    """FASTVIT_PLAN=triton: plans whose launches go through JITFunction.run (the fallback should a direct launch
    misbehave on some Triton); another value is refused in one line."""
    jit = _Jit()
    monkeypatch.setattr(direct_launch, "_jit", lambda kernel: jit if kernel is jit else None)
    monkeypatch.setattr(direct_launch, "driver", _Driver)
    made = []
    monkeypatch.setattr(plan, "Recorder", lambda *a, **kw: made.append(kw) or recording.Recorder(*a, **kw))
    for mode, direct in (("1", True), ("triton", False)):
        monkeypatch.setenv("FASTVIT_PLAN", mode)
        model = small_model("cpu")
        calls(model, torch.randn(2, 3, 8, 8), 3)
        assert made.pop()["launch_directly"] is direct and not made
        rec = recording.Recorder({}, launch_directly=direct)
        x = torch.randn(8)
        rec.bind(x, "x")
        with recording.recording(rec):
            tuning.launch_kernel(jit, (3,), (x, x, 8), {})
        assert rec.direct is direct
    monkeypatch.setenv("FASTVIT_PLAN", "yes")
    with pytest.raises(ValueError, match="FASTVIT_PLAN='yes': expected one of 1, 0, triton"):
        small_model("cpu")(torch.randn(2, 3, 8, 8))
