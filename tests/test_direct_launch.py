"""Direct launches (fastvit_kernels/direct_launch.py): a plan's recorded launch replays as a call of the compiled
kernel's launcher with what Triton's JITFunction.run passed it. On a GPU the plan tests (test_plan*.py) run them for
real; here Triton's own JITFunction.run runs with only the driver and the compiled kernel stood in for
(tests/offline_triton.py)."""

import pytest
import torch
from launches import _KernelRecorder
from offline_triton import LN_BWD_CONSTS, ln_bwd_args, offline_kernel, record_launch, tensors, use_offline_driver
from plans import calls, small_model
from triton import knobs

from fastvit_kernels import direct_launch, plan, recording
from fastvit_kernels.kernels.layernorm import layernorm_bwd_kernel


@pytest.fixture
def offline(monkeypatch):
    """(stand-in compiled kernel, Triton's JITFunction of the LayerNorm backward under its heuristics)."""
    use_offline_driver(monkeypatch)
    return offline_kernel(layernorm_bwd_kernel)


def test_the_installed_triton_launches_as_direct_launches_assume():
    """JITFunction.run binds with its device cache's binder and calls kernel.run with the bound arguments (triton 3.6,
    the lent GPUs', and 3.8): else plans would launch through Triton, and this says so."""
    assert direct_launch.supported()
    assert not direct_launch.hooks_set()


def test_direct_launches_pass_what_tritons_own_run_passes(offline):
    """A recorded launch replays as the call of the launcher that JITFunction.run itself makes for the same
    arguments (Triton's binder, the heuristics wrapper, None for DRES, the constexprs), each tensor as its address."""
    compiled, kernel = offline
    rec, fn, source = record_launch(kernel, ln_bwd_args())
    assert rec.direct and "[(3,)]" not in source
    fresh = ln_bwd_args()
    fn(*tensors(fresh))
    kernel[(3,)](*fresh, **LN_BWD_CONSTS)  # Triton's own launch of the same arguments
    assert len(compiled.calls) == 3
    replayed, by_triton = compiled.calls[1:]
    assert replayed[:6] == by_triton[:6] == (3, 1, 1, 4242, 99, (8, 1, 0))
    assert replayed[6:9] == (None, None, None)  # no metadata, no hooks: Triton's hook chains are empty
    # the replay's tensors as their addresses (the launcher takes an integer as the pointer, with no driver call)
    addresses = [b.data_ptr() if isinstance(b, torch.Tensor) else b for b in by_triton[9:]]
    assert len(replayed) == len(by_triton) and all(a is b or a == b for a, b in zip(replayed[9:], addresses))
    assert not any(isinstance(a, torch.Tensor) for a in replayed)
    assert replayed[9] == fresh[0].data_ptr() and replayed[9 + 5] is None  # DRES stays None
    # the compiled kernel (whose __del__ unloads the function the line launches) lives as long as the replay
    assert any(v is compiled for v in fn.__globals__.values())


def test_launches_go_through_triton_where_hooks_or_stand_ins_are(offline, monkeypatch):
    """Launch hooks installed (a profiler reads their metadata), or a kernel that is not Triton's (the interpreter's,
    the test suite's launch recorders): the replay launches through kernel[grid] as recorded."""
    compiled, kernel = offline
    hook = lambda metadata: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert direct_launch.hooks_set()
        rec, fn, source = record_launch(kernel, ln_bwd_args())
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert not rec.direct and "[(3,)](a0, a1, a2, a3, a4, None, a6, None, a8, 40, 96" in source
    fn(*tensors(ln_bwd_args()))
    assert len(compiled.calls) == 2 and compiled.calls[1][7] is knobs.runtime.launch_enter_hook  # through run()
    launched = []
    rec, fn, source = record_launch(_KernelRecorder("k", launched), ln_bwd_args())
    assert not rec.direct and "[(3,)](a0" in source


def test_fastvit_plan_triton_records_launches_through_triton(offline, monkeypatch):
    """FASTVIT_PLAN=triton: plans whose launches go through JITFunction.run (the fallback should a direct launch
    misbehave on some Triton)."""
    compiled, kernel = offline
    rec, fn, source = record_launch(kernel, ln_bwd_args(), launch_directly=False)
    assert not rec.direct and "[(3,)](a0" in source
    fn(*tensors(ln_bwd_args()))
    assert len(compiled.calls) == 2 and compiled.calls[1][7] is knobs.runtime.launch_enter_hook  # through run()


def test_fastvit_plan_picks_the_recording_mode(device, monkeypatch):
    """FASTVIT_PLAN=1 records with direct launches, =triton without; another value is refused in one line."""
    made = []
    monkeypatch.setattr(plan, "Recorder", lambda *a, **kw: made.append(kw) or recording.Recorder(*a, **kw))
    x = torch.randn(2, 3, 8, 8, device=device)
    for mode, direct in (("1", True), ("triton", False)):
        monkeypatch.setenv("FASTVIT_PLAN", mode)
        calls(small_model(device), x, 3)
        assert made.pop()["launch_directly"] is direct and not made
    monkeypatch.setenv("FASTVIT_PLAN", "yes")
    with pytest.raises(ValueError, match="FASTVIT_PLAN='yes': expected one of 1, 0, triton"):
        small_model(device)(x)


def test_tma_descriptor_memory_is_kept_per_device_and_stream(monkeypatch):
    """Triton asks for the on-device descriptors' memory at every TMA launch: the allocator hands each device and
    stream its own buffer, grown where a launch needs more, and fresh memory to a launch captured into a CUDA graph."""
    from fastvit_kernels.ops import tma

    device, capturing = [0], [False]
    monkeypatch.setattr(torch.cuda, "current_device", lambda: device[0])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    scratch = tma.Scratch("cpu")
    first = scratch(256, 128, 7)
    assert first.numel() >= 256 and scratch(128, 128, 7) is first  # the same stream: the same memory
    other_stream = scratch(256, 128, 8)
    device[0] = 1
    other_device = scratch(256, 128, 7)
    assert len({id(first), id(other_stream), id(other_device)}) == 3
    device[0] = 0
    grown = scratch(1024, 128, 7)
    assert grown.numel() >= 1024 and grown is not first and scratch(512, 128, 7) is grown
    capturing[0] = True
    captured = [scratch(256, 128, 7) for _ in range(2)]
    assert captured[0] is not captured[1] and all(c is not grown for c in captured)
