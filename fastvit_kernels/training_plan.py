"""The training plans of plan.py (its docstring: what a step plan is, how a training step is recorded and when it is
replayed): the step as one autograd Function (_Step), its recording (_Recording) and its replay (TrainingPlan).
"""

from contextlib import nullcontext
from operator import attrgetter

import torch

from . import tuning
from .plan import _SEEN, Plan, Unplannable, _Forward, _steady
from .recording import Line, recording

_requires_grad = attrgetter("requires_grad")
_version = attrgetter("_version")


class _Step(torch.autograd.Function):
    """The model's forward as one node of the autograd graph; `step` runs it: a _Recording, or a TrainingPlan."""

    @staticmethod
    def forward(ctx, step, x, *params):
        ctx.step = step
        return step.forward(ctx, x)

    @staticmethod
    def backward(ctx, g):
        # the recorded backward read a contiguous, aligned gradient: every replay hands it the same
        g = g.contiguous()
        if g.data_ptr() % 16:
            g = g.clone()
        return (None, *ctx.step.backward(ctx, g))


def _trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def record_training(model, forward, x, amp, table, sig):
    params = _trainable(model)
    if any(p._backward_hooks for p in params):
        table[sig] = Unplannable("a trainable parameter has a gradient hook, which the recording would call twice")
        return forward(x)
    return _Step.apply(_Recording(model, forward, amp, table, sig, params), x, *params)


class _Recording:
    """A training step run and recorded: the forward with gradients inside _Step.forward, its backward
    (torch.autograd.grad) inside _Step.backward; the TrainingPlan is made when the backward has run."""

    def __init__(self, model, forward, amp, table, sig, params):
        self.model, self.model_forward, self.amp, self.table, self.sig = model, forward, amp, table, sig
        self.params = params
        self.steady = _steady()

    def forward(self, ctx, x):
        x_in = x.detach().requires_grad_(x.requires_grad)
        with torch.enable_grad():
            self.recorded = _Forward(self.model, self.model_forward, x_in)
        out, self.recorded.out = self.recorded.out, None  # the inner graph lives in ctx.inner until the backward only
        self.model = self.model_forward = None
        self.forward_lines = len(self.recorded.recorder.lines)
        ctx.inner = (x_in, out)
        return out.detach()

    def backward(self, ctx, g):
        x_in, out = ctx.inner
        ctx.inner = None
        inputs = ([x_in] if x_in.requires_grad else []) + self.params
        recorder = self.recorded.recorder
        recorder.bind(g, "g")
        # the backward's GEMMs chosen as the forward's were (the signature's variant: step_choice.py)
        with recording(recorder), tuning.gpu_time_only() if self.sig[-2] else nullcontext():
            grads = torch.autograd.grad(out, inputs, g, allow_unused=True)
        grads = ([] if x_in.requires_grad else [None]) + list(grads)
        self.table[self.sig] = self._plan(grads, x_in.device)
        return grads

    def _plan(self, grads, device):
        recorder = self.recorded.recorder
        if _steady() != self.steady:  # a first launch in the forward or the backward, or a registration
            return _SEEN
        returns = "(" + ", ".join(recorder.source(g) if g is not None else "None" for g in grads) + ",)"
        grad_reads = recorder.take_reads()
        if recorder.failure is not None:
            return Unplannable(recorder.failure)
        fwd_lines, bwd_lines = recorder.lines[: self.forward_lines], recorder.lines[self.forward_lines :]
        made_before = {n for line in fwd_lines for n in line.makes} | {"x"}
        saved = sorted({n for line in bwd_lines for n in line.reads} & made_before | set(grad_reads) & made_before)
        unpack = [Line(f"{', '.join(saved)}, = saved", ["saved"], saved), Line("saved.clear()")] if saved else []
        fwd_returns = f"({self.recorded.returns}, [{', '.join(saved)}])"
        fwd = (["x"], fwd_lines, fwd_returns, self.recorded.returned + saved)
        bwd = (["g", "saved"], unpack + bwd_lines, returns, grad_reads)
        fwd, bwd, source = recorder.step_functions(fwd, bwd, self.recorded.returned, device)
        return TrainingPlan(fwd, bwd, self.params, self.recorded, self.steady[0], device, self.amp, source)


class TrainingPlan(Plan):
    """One signature's training replay: the forward function (x -> ((the output, what the backward reads), the
    arena's Hold or None)) and the backward function ((hold, g, saved) -> the gradients of the input and of the
    trainable parameters), run as one _Step (recording.Recorder.step_functions)."""

    def __init__(self, fwd, bwd, params, recorded, epoch, device, amp, source):
        super().__init__(fwd, recorded, epoch, device, amp, source)
        self.bwd = bwd
        self.params = params  # the trainable parameters, in the order of the backward's gradients
        self.requires = list(map(_requires_grad, self.tensors))

    def valid(self) -> bool:
        """Plan.valid, and the same tensors require a gradient (a parameter frozen or unfrozen since: 10 us)."""
        return super().valid() and list(map(_requires_grad, self.tensors)) == self.requires

    def __call__(self, x):
        return _Step.apply(self, x, *self.params)

    def forward(self, ctx, x):
        # the arena's Hold (recording.Recorder.step_functions), if this step's activations are in it: let go by the
        # backward, or with ctx when the step is dropped without one
        (out, ctx.saved), ctx.hold = self.run(self.fn, x)
        # autograd refuses a backward whose saved tensors were changed in place since the forward; so does this
        ctx.versions = list(map(_version, ctx.saved)), list(map(_version, self.tensors))
        return out

    def backward(self, ctx, g):
        saved, ctx.saved = ctx.saved, None
        hold, ctx.hold = ctx.hold, None
        if saved is None:
            raise RuntimeError(
                "a replayed training step (fastvit_kernels.plan) runs its backward once; for retain_graph=True or a "
                "second backward set FASTVIT_PLAN=0"
            )
        if ctx.versions != (list(map(_version, saved)), list(map(_version, self.tensors))):
            if hold is not None:  # not left to the traceback, which may live on
                hold.release()
            raise RuntimeError(
                "a tensor this step's backward reads (the input, a parameter or an activation) was modified by an "
                "in-place operation after the forward (fastvit_kernels.plan: a replayed step)"
            )
        return self.run(self.bwd, hold, g, saved)
