"""Step plans: a forward of the model (and in training its backward), recorded once per input signature and replayed
as straight-line code, so that a step costs the host little more than its launches.

Why: a call of the fused ViT passes each of its ~60 launches through ~8 Python frames (checks, autocast, the
custom-op bypass, the GEMM's key, the launcher), and a training step's backward its ~110 more: ~1.9 ms of host time
per CIFAR-10 inference step and ~7 ms per training step on the 2-core CPU box (benchmarks/test_host.py), more than
a small batch takes on the GPU. None of it changes between two steps with the same input signature.

How: the first call with a signature runs as usual (it chooses configurations and GEMM backends); the second runs
under a recorder (fastvit_kernels/recording.py) that notes every torch operation below autograd and autocast and
every launch of ours. Inference: the lines become one function; later calls run it. Training: the second call runs
the forward inside one autograd Function (_Step) whose backward runs the model's own backward (torch.autograd.grad)
under the recorder; the lines become two functions, the forward (returning what the backward reads) and the
backward (returning the gradients of the input and of every trainable parameter, which autograd accumulates as
usual). Both replays run the same operations and the same kernels with the same arguments as the steps they were
recorded from, without the Python around them; on a GPU each launch calls the compiled kernel's launcher with the
arguments Triton passed it when recording (fastvit_kernels/direct_launch.py), without Triton's per-call binding. The
tensors a replay allocates and lets go before it returns are views made once into one buffer per device
(fastvit_kernels/arena.py): ~400 allocations of a CIFAR-10 training step (the activations its forward saves for its
backward among them: the forward holds the buffer until its backward), ~150 of an inference step.

A call runs the model's own forward instead when: torch.compile traces it; a CUDA graph is being captured; gradient
checkpointing is on (its recomputation restores RNG state outside the operations); FASTVIT_PLAN=0; a trainable
parameter has a gradient hook (the recording's backward would call it once more); or the recording saw what a replay
cannot repeat (an operation whose result Python reads, such as .item(); a tensor from outside the model, such as a
global the forward adds): `plans(model)` says which.

Before each replay, the guards: the input's shape, strides, dtype, device and 16-byte alignment, whether gradients are
on and the input needs one, the model's training flag, autocast, float32 matmul precision and whether the step's GPU
time alone counts (tuning.gpu_time_only, or in training as step_choice.py timed it: its GEMM choices) (the signature;
the model calls run() only on its fused path); the addresses of the parameters and buffers the plan reads, and where one
has moved, their shapes, strides, dtypes, devices and alignment, and in training which of them require a gradient (the
plans' valid()); no parameter, buffer or submodule registered on the model, and no tuning.forget(), since the recording;
no Triton launch hooks installed since (a profiler's), where the plan launches directly. Not seen: a plain attribute of
a module changed after the recording (a LayerNorm's eps, an Attention's scale), or a parameter's .data replaced by
another view of its own memory: forget(model) after such a change. A replayed training step's backward runs once
(retain_graph=True and a second backward raise; FASTVIT_PLAN=0 allows them).
"""

import os
import weakref
from contextlib import nullcontext

import torch
from torch.nn.modules import module as _module

from . import direct_launch, step_choice, tuning
from ._interpreter import interpreting
from .arena import ArenaReplay, StepReplays
from .ops import tma
from .ops._common import autocast_dtype
from .recording import Recorder, recording

_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {signature: Plan or a state}
_SEEN = "seen"  # a signature's first call ran as usual (or its recording did not finish); the next records
# Signatures a model keeps plans for: enough for every batch size of a serving loop's dynamic batching; past it a new
# signature runs the forward (a plan is small, but each costs a recorded call and its code)
MAX_PLANS = 64

_registrations = 0  # parameters, buffers and submodules registered on the modules of models with plans
# those modules (a loss module built every step registers a buffer: that must not send the plans back to recording)
_watched: "weakref.WeakSet" = weakref.WeakSet()


def _registered(module, name, value):
    global _registrations
    if module in _watched:
        _registrations += 1
        if isinstance(value, _module.Module):
            _watched.update(value.modules())


for _hook in (
    _module.register_module_parameter_registration_hook,
    _module.register_module_buffer_registration_hook,
    _module.register_module_module_registration_hook,
):
    _hook(_registered)


_PLAN_MODES = ("1", "0", "triton")


def plan_mode() -> str:
    """FASTVIT_PLAN: 1 (the default) plans with direct launches where Triton allows them (direct_launch.py); triton:
    plans whose launches go through Triton's JITFunction.run as the model's own calls do; 0: no plans (every call
    runs the model's forward). Read at each call (0) and at each recording (triton)."""
    mode = os.environ.get("FASTVIT_PLAN", "1")
    if mode not in _PLAN_MODES:
        raise ValueError(f"FASTVIT_PLAN={mode!r}: expected one of {', '.join(_PLAN_MODES)}")
    return mode


def plans_on() -> bool:
    return plan_mode() != "0"


def forget(model) -> None:
    """Drop the model's plans: the next calls run its forward and record again (and time their steps again)."""
    _PLANS.pop(model, None)
    step_choice.forget(model)


def plans(model) -> dict:
    """{signature: Plan, Unplannable or 'seen'}: what the model has, for tests and for asking why a call is not
    replayed."""
    return dict(_PLANS.get(model, {}))


def summary(model) -> str:
    """One line on what the model's calls replay, for the benchmark rows beside their host time: per signature, the
    recorded launches (how many call the compiled kernel directly) and torch operations (of which the temporaries the
    arena holds, which a replay does not allocate: arena.py), or why it is not replayed."""
    if not plans_on():
        return f"off (FASTVIT_PLAN={plan_mode()})"
    parts = []
    for p in plans(model).values():
        if isinstance(p, Plan):
            c = p.counts
            kind = "train" if isinstance(p, TrainingPlan) else "infer"
            ops = f"{c['torch']} torch ops ({arena_temporaries(p)} temporaries in the arena)"
            parts.append(f"{kind}: {c['direct'] + c['triton']} launches ({c['direct']} direct), {ops}")
        else:
            parts.append(f"not replayed: {p!r}")
    parts += [f"a training step's GEMMs: {c!r}" for c in step_choice.choices(model).values()]
    return "; ".join(parts) or "none recorded"


def arena_temporaries(p) -> int:
    """How many of a plan's allocations its replays take from the arena (arena.py)."""
    fns = [p.fn, getattr(p, "bwd", None)]
    steps = {id(r): r for f in fns if isinstance(r := getattr(f, "__self__", None), StepReplays)}
    return sum(len(f.views) for f in fns if isinstance(f, ArenaReplay)) + sum(len(r.specs) for r in steps.values())


class Unplannable:
    """A signature whose recording saw something a replay cannot repeat; its calls run the forward."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self):
        return f"Unplannable({self.reason!r})"


def run(model, forward, x, what="logits"):
    """forward(x), replayed from the model's plan for x's signature where there is one (see the module's docstring);
    `what` names the function (the model's logits, its features): each has plans of its own."""
    if type(x) is not torch.Tensor or torch.compiler.is_compiling() or not plans_on():
        return forward(x)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return forward(x)
    grad = torch.is_grad_enabled()
    if grad and model.grad_checkpointing:
        return forward(x)
    device = x.device
    amp = autocast_dtype(device)
    sig = (x.shape, x.stride(), x.dtype, device, x.data_ptr() % 16, grad, grad and x.requires_grad, model.training)
    sig += (amp, torch.get_float32_matmul_precision())
    # the GEMMs a recording replays were chosen for a step whose host time counts or not (tuning.gpu_time_only); in
    # training that is timed both ways (step_choice.py)
    choice = step_choice.lookup(model, sig + (what,), x) if grad else None
    gpu_only = tuning.in_gpu_time_only() or (choice is not None and choice.gpu_only)
    sig += (gpu_only, what)
    table = _PLANS.get(model)
    if table is None:
        table = _PLANS[model] = {}
        _watched.update(model.modules())
    plan = table.get(sig)
    if isinstance(plan, Plan) and plan.valid():
        if choice is not None and (dropped := choice.replayed()) is not None:
            table.pop(sig[:-2] + (dropped, what), None)  # timed both ways: the slower variant's plan
        return plan(x)
    if choice is not None and choice.not_replayed():  # the GPU-time variant was never replayed: the host-counting one
        table.pop(sig, None)
        return run(model, forward, x, what)
    with tuning.gpu_time_only() if choice is not None and gpu_only else nullcontext():
        return _unreplayed(model, forward, x, amp, table, sig, plan, grad)


def _unreplayed(model, forward, x, amp, table, sig, plan, grad):
    """A call that replays nothing: its signature's first (it makes the choices), its recording, or the forward
    where the plan is no longer valid or cannot be made."""
    if plan is None:  # the first call with this signature: it makes the choices
        if len(table) < MAX_PLANS:
            table[sig] = _SEEN
        return forward(x)
    if plan is _SEEN:
        if grad:
            return record_training(model, forward, x, amp, table, sig)
        plan, out = _record(model, forward, x, amp)
        table[sig] = plan
        return out
    if isinstance(plan, Plan):
        table[sig] = _SEEN  # something it depends on changed: this call runs as usual, the next records again
    return forward(x)


def _epoch():
    """What a plan stays valid under: no forget() (switches may have changed), no registration on the model."""
    return (tuning.forgets(), _registrations)


def _steady():
    """What must not move while a step is recorded: _epoch, and no first launch (a decision) inside it."""
    return (_epoch(), tuning.decisions())


def _meta(t):
    """What the recorded launches depend on in a tensor the plan reads from the model (its values may change)."""
    return (t.dtype, t.shape, t.stride(), t.device, t.data_ptr() % 16)


_address = torch.Tensor.data_ptr


class Plan:
    """One signature's inference replay: the generated function, the model's tensors it reads, the state of the
    tuning decisions and module registrations it was recorded under."""

    def __init__(self, fn, recorded, epoch, device, amp, source):
        """recorded: the _Forward whose recorder wrote fn."""
        self.fn, self.epoch, self.source = fn, epoch, source
        self.device, self.amp = device, amp
        self.tma = recorded.recorder.tma and not interpreting()
        self.direct = recorded.recorder.direct  # compiled kernels launched directly: valid while no launch hooks
        self.counts = dict(recorded.recorder.counts)  # what the replay repeats (plan.summary)
        self.tensors = recorded.recorder.read  # the model's parameters and buffers that the replay reads
        self.metas = [_meta(t) for t in self.tensors]
        self.addresses = list(map(_address, self.tensors))
        self.modules = recorded.modules  # the modules whose __call__ the recorded forward ran (their hooks: _hooked)

    def valid(self) -> bool:
        """Nothing the replay depends on has changed. Each call compares the tensors' addresses (13 us for
        CIFAR-10's 152 on the CPU box, against 88 us for all of _meta): a tensor moved, cast or given new .data has
        a new one, and then all of _meta is compared (the same tensors elsewhere in memory: the replay goes on).
        Not seen: .data replaced by another view of the same memory (p.data = p.data.t()); forget(model) then."""
        if self.epoch != _epoch() or _hooked(self.modules) or (self.direct and direct_launch.hooks_set()):
            return False
        addresses = list(map(_address, self.tensors))
        if addresses != self.addresses:
            if [_meta(t) for t in self.tensors] != self.metas:
                return False
            self.addresses = addresses
        return True

    def __call__(self, x):
        return self.run(self.fn, x)

    def run(self, fn, *args):
        """fn(*args) on the device the recording ran on, with autocast off: the recorded operations are autocast's
        output already (replayed under it, they would be cast again)."""
        if self.tma:
            tma.set_allocator()  # a context variable: the thread that replays may not be the one that recorded
        if self.device.type == "cuda" and self.device.index != torch.cuda.current_device():
            with torch.cuda.device(self.device):
                return self._without_autocast(fn, args)
        return self._without_autocast(fn, args)

    def _without_autocast(self, fn, args):
        kind = self.device.type
        if self.amp is None or not torch.is_autocast_enabled(kind):
            return fn(*args)
        torch.set_autocast_enabled(kind, False)
        try:
            return fn(*args)
        finally:
            torch.set_autocast_enabled(kind, True)


class _Forward:
    """The model's forward run once under a recorder (x named "x"): its output, the source of that output in the
    recorder's code and the names it reads (`returns`, `returned`), the modules whose __call__ ran; the recorder
    fails where one of them has hooks."""

    def __init__(self, model, forward, x):
        self.recorder = recorder = Recorder(_model_tensors(model), launch_directly=plan_mode() == "1")
        recorder.bind(x, "x")
        with recording(recorder), _called_modules() as called:
            self.out = forward(x)
        self.modules = list(called.modules.values())
        if _hooked(self.modules):
            recorder.fail(_HOOKED)
        self.returns = _output_source(recorder, self.out)
        self.returned = recorder.take_reads()


def _record(model, forward, x, amp):
    """(Plan or Unplannable or _SEEN, forward(x)): a no-grad forward run once under the recorder."""
    steady = _steady()
    recorded = _Forward(model, forward, x)
    recorder = recorded.recorder
    if _steady() != steady:  # a first launch or a registration during the call: not the steady state
        return _SEEN, recorded.out
    if recorder.failure is not None:
        return Unplannable(recorder.failure), recorded.out
    fn, source = recorder.function(["x"], recorder.lines, recorded.returns, recorded.returned, x.device)
    return Plan(fn, recorded, steady[0], x.device, amp, source), recorded.out


class _called_modules:
    """with _called_modules() as called: the modules whose __call__ ran inside (a global pre-hook, for the recording
    only). Their hooks are Python a replay would not run: a plan is not made, or not replayed, while they have any."""

    def __enter__(self):
        self.modules = {}
        self._handle = _module.register_module_forward_pre_hook(self._called)
        return self

    def _called(self, module, args):
        self.modules[id(module)] = module  # and None: a pre-hook's result would replace the arguments

    def __exit__(self, *exc):
        self._handle.remove()


def _hooked(modules) -> bool:
    """Whether a forward calls module hooks: a global one, or one on a module it calls."""
    g = _module
    if (
        g._global_forward_pre_hooks
        or g._global_forward_hooks
        or g._global_backward_pre_hooks
        or g._global_backward_hooks
    ):
        return True
    return any(m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks or m._backward_hooks for m in modules)


_HOOKED = "a module the forward calls has hooks (or a global module hook is set), which a replay would not call"


def _model_tensors(model) -> dict:
    return {id(t): t for t in (*model.parameters(), *model.buffers())}


def _output_source(recorder, out) -> str:
    if not isinstance(out, torch.Tensor):
        recorder.fail(f"the forward returned {type(out).__name__}, not a tensor")
        return "None"
    return recorder.source(out)


# the training plans build on the classes above (training_plan.py)
from .training_plan import TrainingPlan, record_training  # noqa: E402
