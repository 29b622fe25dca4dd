"""A training step's GEMM variant timed both ways (fastvit_kernels/step_choice.py): the host-counting choices first,
then the GPU-time ones recorded under tuning.gpu_time_only (forward and backward), the faster kept and the other's
plan dropped; nothing timed where the variants would not differ, on the CPU, or inside gpu_time_only."""

import pytest
import torch
from plans import small_model

from fastvit_kernels import plan, step_choice, tuning


class _Clock:
    """step_choice's clock: each reading `step` seconds after the last, `step` set by the test per phase."""

    def __init__(self):
        self.now, self.step = 0.0, 1.0

    def __call__(self):
        self.now += self.step
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(step_choice, "_clock", c)
    monkeypatch.setattr(step_choice, "WARMUP", 1)
    monkeypatch.setattr(step_choice, "SAMPLES", 3)
    return c


def _time_variant(choice, clock, seconds, warmup_seconds=100.0):
    """Replays of the present variant until its steps are timed: the warm-up steps slow, the sampled ones `seconds`.
    Returns what the last replay returned."""
    clock.step = warmup_seconds
    assert choice.replayed() is None  # the first replay: no step before it to time
    out = None
    for i in range(step_choice.WARMUP + step_choice.SAMPLES):
        clock.step = warmup_seconds if i < step_choice.WARMUP else seconds
        out = choice.replayed()
    return out


@pytest.mark.parametrize("gpu_seconds,keep_gpu", [(0.8, True), (1.2, False)])
def test_the_variant_with_the_faster_median_step_is_kept(gpu_seconds, keep_gpu, clock, monkeypatch):
    monkeypatch.setattr(tuning, "host_time_changes_a_choice", lambda: True)
    choice = step_choice.StepChoice()
    assert not choice.gpu_only
    assert _time_variant(choice, clock, 1.0) is None  # the warm-up's 100 s steps are not in the median
    assert choice.gpu_only and not choice.settled
    dropped = _time_variant(choice, clock, gpu_seconds)
    assert choice.settled and choice.gpu_only == keep_gpu
    assert dropped is (not keep_gpu)  # the slower variant's plan, by its gpu_only flag
    assert choice.medians == pytest.approx({False: 1.0, True: gpu_seconds})
    assert choice.report() == {
        "kept": "GPU" if keep_gpu else "host",
        "host_counted_ms": 1e3,
        "gpu_time_ms": gpu_seconds * 1e3,
    }
    clock.step = 1e-3
    assert choice.replayed() is None and choice.gpu_only == keep_gpu  # settled: no more timing


class _Event:
    """torch.cuda.Event as step_choice uses it, on a GPU timeline where each step takes `gpu.step` seconds however
    fast the host issues it (the launch queue full: a step the GPU bounds, in a loop that never waits)."""

    def __init__(self, gpu, enable_timing):
        assert enable_timing
        self.gpu, self.at, self.synchronized = gpu, None, False

    def record(self, stream):
        assert stream == "stream of cuda:0"
        self.gpu.now += self.gpu.step
        self.at = self.gpu.now

    def synchronize(self):
        self.synchronized = True

    def elapsed_time(self, end):
        assert end.synchronized and self.at is not None
        return (end.at - self.at) * 1e3  # ms, as torch's


def test_a_gpu_step_is_timed_on_the_gpus_timeline(clock, monkeypatch):
    # the host issues each step in 1 s (its clock) and the GPU runs it in 3 s: the median step is the GPU's
    gpu = _Clock()
    monkeypatch.setattr(torch.cuda, "Event", lambda enable_timing: _Event(gpu, enable_timing))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: f"stream of {device}")
    monkeypatch.setattr(tuning, "host_time_changes_a_choice", lambda: True)
    choice = step_choice.StepChoice(torch.device("cuda", 0))
    gpu.step = 3.0
    _time_variant(choice, clock, 1.0)
    assert choice.medians == {False: pytest.approx(3.0)}


def test_nothing_is_timed_where_both_variants_choose_alike(clock, monkeypatch):
    monkeypatch.setattr(tuning, "host_time_changes_a_choice", lambda: False)
    choice = step_choice.StepChoice()
    assert choice.replayed() is None
    assert choice.settled and not choice.gpu_only and choice.steps == []


def test_no_step_is_timed_across_a_call_that_did_not_replay(clock, monkeypatch):
    monkeypatch.setattr(tuning, "host_time_changes_a_choice", lambda: True)
    choice = step_choice.StepChoice()
    choice.replayed()
    clock.step = 50.0
    assert choice.not_replayed() is False  # the host variant is never given up
    choice.replayed()  # after the call that did not replay: the first of a new run of replays
    assert choice.steps == []


def test_a_gpu_time_variant_that_never_replays_is_given_up(clock, monkeypatch):
    monkeypatch.setattr(tuning, "host_time_changes_a_choice", lambda: True)
    choice = step_choice.StepChoice()
    _time_variant(choice, clock, 1.0)
    assert choice.gpu_only
    given_up = [choice.not_replayed() for _ in range(step_choice.NOT_REPLAYED_LIMIT + 1)]
    assert given_up == [False] * step_choice.NOT_REPLAYED_LIMIT + [True]
    assert choice.settled and not choice.gpu_only


def test_no_choice_on_the_cpu_or_inside_gpu_time_only(monkeypatch):
    model, x = torch.nn.Linear(1, 1), torch.zeros(1)
    assert step_choice.lookup(model, ("sig",), x) is None  # not a GPU
    monkeypatch.setattr(step_choice, "_timed_here", lambda x: True)
    with tuning.gpu_time_only():  # a CUDA graph's capture: GPU time alone, untimed
        assert step_choice.lookup(model, ("sig",), x) is None
    choice = step_choice.lookup(model, ("sig",), x)
    assert step_choice.lookup(model, ("sig",), x) is choice
    tuning.forget()  # a switch changed: the choice starts over
    assert step_choice.lookup(model, ("sig",), x) is not choice


def test_steps_of_another_signature_in_between_are_not_timed(clock, monkeypatch):
    # a period from one replay to the next spans the other signature's step: it times neither
    monkeypatch.setattr(step_choice, "_timed_here", lambda x: True)
    monkeypatch.setattr(tuning, "host_time_changes_a_choice", lambda: True)
    model, x = torch.nn.Linear(1, 1), torch.zeros(1)
    for _ in range(4):
        for sig in (("a",), ("b",)):
            step_choice.lookup(model, sig, x).replayed()
    assert [c.steps for c in step_choice.choices(model).values()] == [[], []]
    step_choice.lookup(model, ("b",), x).replayed()  # b twice in a row: one step
    assert [len(c.steps) for c in step_choice.choices(model).values()] == [0, 1]


def _step(model, x, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    out.float().square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("keep_gpu", [True, False])
def test_a_model_records_and_times_both_variants_then_replays_the_faster(keep_gpu, clock, device, monkeypatch):
    # the interpreter's GEMMs are ours whichever context chooses them, so both variants replay the same kernels here;
    # what the test reads is that the second was recorded with its choices (forward and backward) made by GPU time
    # alone, that the slower plan is dropped, and that replays still compute the step
    monkeypatch.setattr(step_choice, "_timed_here", lambda x: True)
    monkeypatch.setattr(tuning, "host_time_changes_a_choice", lambda: True)
    tuning.forget()
    model = small_model(device, depth=1).train()
    x = torch.randn(1, 3, 8, 8, device=device)
    seed = 0

    def steps_until(done, limit=12):
        nonlocal seed
        for _ in range(limit):
            if done():
                return
            seed += 1
            _step(model, x, seed)
        raise AssertionError(f"not reached in {limit} steps: {step_choice.choices(model)}")

    clock.step = 1.0
    steps_until(lambda: any(c.gpu_only for c in step_choice.choices(model).values()))
    (choice,) = step_choice.choices(model).values()
    assert tuning.gemm_choices(training=False) == {}  # so far every GEMM was chosen in a host-counted step
    clock.step = 0.5 if keep_gpu else 2.0
    steps_until(lambda: choice.settled)
    assert choice.gpu_only == keep_gpu
    # the GPU-time variant's first call and recording chose every GEMM of the step again, by GPU time alone
    assert tuning.gemm_choices(training=False).keys() == tuning.gemm_choices(training=True).keys() != set()
    (kept,) = plan.plans(model).items()  # the slower variant's plan dropped
    assert kept[0][-2] == keep_gpu and isinstance(kept[1], plan.TrainingPlan)
    assert ("GPU" if keep_gpu else "host") in plan.summary(model)
    out, grads = _step(model, x, seed)  # replayed
    with monkeypatch.context() as m:
        m.setenv("FASTVIT_PLAN", "0")
        ref, ref_grads = _step(model, x, seed)
    assert torch.equal(out, ref) and all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    tuning.forget()
