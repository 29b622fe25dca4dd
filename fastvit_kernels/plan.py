"""Inference plans: a no-grad forward of the model, recorded once per input signature and replayed as straight-line
code, so that a call costs the host little more than its allocations and launches.

Why: a call of the fused ViT passes each of its ~60 launches through ~8 Python frames (checks, autocast, the
custom-op bypass, the GEMM's key, the launcher): ~1.9 ms of host time per CIFAR-10 inference step on the 2-core CPU
box (benchmarks/test_host.py), more than a small batch takes on the GPU. None of it changes between two calls with the
same input signature.

How: the first call with a signature runs as usual (it chooses configurations and GEMM backends); the second runs
under a recorder that notes every torch operation as it reaches the kernels (a TorchDispatchMode: below autograd and
autocast, so autocast's casts are operations like any other) and every launch of ours (tuning.launch_kernel and
Launcher.launch), each tensor argument by where it came from: the input, a parameter or buffer of the model, or an
earlier step. The steps become one generated Python function that deletes each intermediate after its last use, as
eager frees it; later calls with the signature run it: the same operations and the same kernels with the same
arguments, without the Python around them.

A call runs the model's own forward instead when: gradients are enabled; torch.compile traces it; a CUDA graph is
being captured; FASTVIT_PLAN=0; or the recording saw what a replay cannot repeat (an operation whose result Python
reads, such as .item(); a tensor from outside the model, such as autocast's cache of a cast weight kept from an earlier
call: `Unplannable.reason` says which). Before each replay, the guards: the input's shape, strides, dtype, device and
16-byte alignment, the model's training flag and backend, autocast and float32 matmul precision (the signature); the
addresses of the parameters and buffers the plan reads, and where one has moved, their shapes, strides, dtypes,
devices and alignment (Plan.valid); no parameter, buffer or submodule registered anywhere, and no tuning decision made
or forgotten, since the recording. Not seen: a plain attribute of a module changed after the recording (a LayerNorm's
eps, an Attention's scale), or a parameter's .data replaced by another view of its own memory: forget(model) after
such a change.
"""

import os
import threading
import weakref

import torch
from torch.nn.modules import module as _module
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import tuning
from ._interpreter import interpreting
from .ops._common import autocast_dtype
from .ops.gemm import _tma_allocator

_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {signature: Plan or a state}
_SEEN = "seen"  # a signature's first call ran as usual; the next records

_registrations = 0  # parameters, buffers and submodules registered anywhere in the process


def _registered(*_):
    global _registrations
    _registrations += 1


for _hook in (
    _module.register_module_parameter_registration_hook,
    _module.register_module_buffer_registration_hook,
    _module.register_module_module_registration_hook,
):
    _hook(_registered)


def plans_on() -> bool:
    """FASTVIT_PLAN=0 turns the plans off (every call runs the model's forward)."""
    return os.environ.get("FASTVIT_PLAN", "1") != "0"


def forget(model) -> None:
    """Drop the model's plans: the next calls run its forward and record again."""
    _PLANS.pop(model, None)


def plans(model) -> dict:
    """{signature: Plan, Unplannable or 'seen'}: what the model has, for tests and for asking why a call is not
    replayed."""
    return dict(_PLANS.get(model, {}))


class Unplannable:
    """A signature whose recording saw something a replay cannot repeat; its calls run the forward."""

    def __init__(self, reason: str):
        self.reason = reason

    def __repr__(self):
        return f"Unplannable({self.reason!r})"


def run(model, forward, x):
    """forward(x), replayed from the model's plan for x's signature where there is one (see the module's docstring)."""
    if torch.is_grad_enabled() or type(x) is not torch.Tensor or torch.compiler.is_compiling() or not plans_on():
        return forward(x)
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return forward(x)
    device = x.device
    amp = autocast_dtype(device)
    sig = (x.shape, x.stride(), x.dtype, device, x.data_ptr() % 16, model.training, model.backend, amp)
    sig += (torch.get_float32_matmul_precision(),)
    table = _PLANS.get(model)
    if table is None:
        table = _PLANS[model] = {}
    plan = table.get(sig)
    if plan is None:  # the first call with this signature: it makes the choices
        table[sig] = _SEEN
        return forward(x)
    if plan is _SEEN:
        plan, out = _record(model, forward, x, amp)
        table[sig] = plan
        return out
    if type(plan) is Plan:
        if plan.valid():
            return plan(x)
        table[sig] = _SEEN  # something it depends on changed: this call runs as usual, the next records again
    return forward(x)


def _epoch():
    return (tuning.epoch(), _registrations)


def _meta(t):
    """What the recorded launches depend on in a tensor the plan reads from the model (its values may change)."""
    return (t.dtype, t.shape, t.stride(), t.device, t.data_ptr() % 16)


_address = torch.Tensor.data_ptr


class Plan:
    """One signature's replay: the generated function, the model's tensors it reads, the state of the tuning decisions
    and module registrations it was recorded under."""

    def __init__(self, fn, tensors, epoch, device, amp, tma, source):
        self.fn, self.epoch, self.source = fn, epoch, source
        self.device, self.amp, self.tma = device, amp, tma
        self.tensors = tensors  # the model's parameters and buffers that the replay reads
        self.metas = [_meta(t) for t in tensors]
        self.addresses = list(map(_address, tensors))

    def valid(self) -> bool:
        """Nothing the replay depends on has changed. Each call compares the tensors' addresses (13 us for
        CIFAR-10's 152 on the CPU box, against 88 us for all of _meta): a tensor moved, cast or given new .data has
        a new one, and then all of _meta is compared (the same tensors elsewhere in memory: the replay goes on).
        Not seen: .data replaced by another view of the same memory (p.data = p.data.t()); forget(model) then."""
        if self.epoch != _epoch():
            return False
        addresses = list(map(_address, self.tensors))
        if addresses != self.addresses:
            if [_meta(t) for t in self.tensors] != self.metas:
                return False
            self.addresses = addresses
        return True

    def __call__(self, x):
        if self.tma:
            _tma_allocator()  # a context variable: the thread that replays may not be the one that recorded
        if self.device.type == "cuda" and self.device.index != torch.cuda.current_device():
            with torch.cuda.device(self.device):
                return self._replay(x)
        return self._replay(x)

    def _replay(self, x):
        if self.amp is None:
            return self.fn(x)
        # the recorded operations are autocast's output already: replayed under it, they would be cast again
        kind = self.device.type
        torch.set_autocast_enabled(kind, False)
        try:
            return self.fn(x)
        finally:
            torch.set_autocast_enabled(kind, True)


def _record(model, forward, x, amp):
    """(Plan or Unplannable, forward(x)): the forward run once under the recorder."""
    externals = {id(t): t for t in (*model.parameters(), *model.buffers())}
    recorder = _Recorder(x, externals)
    epoch = _epoch()
    tuning.recorder = recorder
    try:
        with recorder:
            out = forward(x)
    finally:
        tuning.recorder = None
    if _epoch() != epoch:  # a first launch or a registration during the call: not the steady state
        return _SEEN, out
    if recorder.failure is None:
        recorder.finish(out)
    if recorder.failure is not None:
        return Unplannable(recorder.failure), out
    fn, source = recorder.compile()
    plan = Plan(fn, recorder.read, epoch, x.device, amp, recorder.tma and not interpreting(), source)
    return plan, out


_aten = torch.ops.aten
# The allocations (~160 of a CIFAR-10 step's ~170 operations) through torch's own bindings, which take the same
# arguments: 1.2-1.9 us a call on the CPU box against 3-5 us through the operator object.
_BINDINGS = {
    _aten.empty.memory_format: torch.empty,
    _aten.empty_like.default: torch.empty_like,
    _aten.new_empty.default: torch.Tensor.new_empty,
}


def _callable(func):
    """What a replay calls for an operation: a binding of torch's, else the operator itself (past
    OpOverload.__call__'s Python frame)."""
    return _BINDINGS.get(func) or getattr(func, "_op", func)


def _has_tensor(tree) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in tree_leaves(tree))


_INLINE = (int, bool, str, type(None))  # constants written into the code as they are (repr)


class _Recorder(TorchDispatchMode):
    """Writes the replay function's lines while the forward runs: one per torch operation, one per kernel launch."""

    def __init__(self, x, externals):
        super().__init__()
        self.lines, self.consts, self.const_names = [], {}, {}
        self.names = {}  # id(tensor) -> (name, weakref): a tensor an earlier step made (weak: ids are reused)
        self.last_use = {}  # name -> the line that reads it last
        self.externals, self.external_names, self.read = externals, {}, []  # read: the model's tensors used
        self.failure = None
        self.launching = False  # inside a launch: the operations there are the launcher's (the interpreter's)
        self.tma = False
        self.thread = threading.get_ident()
        self._bind(x, "x")

    # -- what the forward does --------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.launching or self.failure is not None:
            return out
        if not _has_tensor(out) and not _has_tensor((args, kwargs)):
            return out  # a function of constants (torch.promote_types): its result is in the code already
        if torch.Tag.data_dependent_output in func.tags or torch.Tag.dynamic_output_shape in func.tags:
            self.failure = f"{func} computes a result that depends on the data"
            return out
        call = f"{self._const(_callable(func))}({self._call_args(args, kwargs)})"
        if self.failure is None:
            self._bind_outputs(out, call, str(func))
        return out

    def launch(self, kernel, grid, args, consts):
        """tuning's launch hook: the launch's line, then the launch itself. (Another thread's launches are its own.)"""
        if threading.get_ident() != self.thread:
            kernel[grid](*args, **consts)
            return
        if self.failure is None:
            self.tma = self.tma or bool(consts.get("TMA_OK"))
            self._line(f"{self._const(kernel)}[{self._source(tuple(grid))}]({self._call_args(args, consts)})")
        self.launching = True
        try:
            kernel[grid](*args, **consts)
        finally:
            self.launching = False

    def finish(self, out):
        if not isinstance(out, torch.Tensor):
            self.failure = f"the forward returned {type(out).__name__}, not a tensor"
            return
        self._line(f"return {self._source(out)}")

    # -- the code ---------------------------------------------------------------------------------------------------
    def compile(self):
        """(the replay function, its source): the lines, each intermediate deleted after the line that reads it last."""
        body = []
        dead_after = {}
        for name, i in self.last_use.items():
            dead_after.setdefault(i, []).append(name)
        for i, line in enumerate(self.lines):
            body.append(line)
            dead = [n for n in dead_after.get(i, ()) if n != "x" and n not in self.external_names.values()]
            if dead and not line.startswith("return"):
                body.append(f"del {', '.join(dead)}")
        source = "def replay(x):\n" + "".join(f"    {line}\n" for line in body)
        scope = dict(self.consts)
        exec(compile(source, "<fastvit_kernels.plan>", "exec"), scope)
        return scope["replay"], source

    def _line(self, line):
        self.lines.append(line)

    def _bind(self, t, name):
        self.names[id(t)] = (name, weakref.ref(t))
        self.last_use[name] = len(self.lines)  # a tensor nothing reads dies after the line that made it

    def _bind_outputs(self, out, call, what):
        if out is None:
            self._line(call)
            return
        outs = out if isinstance(out, (tuple, list)) else (out,)
        targets = []
        for t in outs:
            if t is None:
                targets.append("_")
            elif not isinstance(t, torch.Tensor):
                self.failure = f"{what} returns {type(t).__name__}, which Python reads"
                return
            elif self._name(t) is not None:  # an in-place operation hands back its input
                targets.append("_")
            else:
                targets.append(f"t{len(self.last_use)}")
                self._bind(t, targets[-1])
        lhs = ", ".join(targets) + ("," if isinstance(out, (tuple, list)) else "")
        self._line(f"{lhs} = {call}")

    def _name(self, t):
        entry = self.names.get(id(t))
        if entry is not None and entry[1]() is t:
            return entry[0]
        return None

    def _call_args(self, args, kwargs):
        parts = [self._source(a) for a in args] + [f"{k}={self._source(v)}" for k, v in kwargs.items()]
        return ", ".join(parts)

    def _source(self, v):
        if isinstance(v, torch.Tensor):
            name = self._name(v) or self._external(v)
            if name is None:
                self.failure = (
                    "a tensor from outside the model (neither the input, a parameter or buffer, nor made here)"
                )
                return "None"
            self.last_use[name] = len(self.lines)
            return name
        if isinstance(v, (list, tuple)):
            inner = ", ".join(self._source(i) for i in v)
            return f"[{inner}]" if isinstance(v, list) else f"({inner}{',' if len(v) == 1 else ''})"
        if type(v) in _INLINE:
            return repr(v)
        return self._const(v)

    def _external(self, t):
        if id(t) not in self.externals or self.externals[id(t)] is not t:
            return None
        name = self.external_names.get(id(t))
        if name is None:
            name = self.external_names[id(t)] = f"p{len(self.external_names)}"
            self.consts[name] = t
            self.read.append(t)
        return name

    def _const(self, v):
        name = self.const_names.get(id(v))
        if name is None:
            name = self.const_names[id(v)] = f"c{len(self.consts)}"
            self.consts[name] = v  # held: the id stays this object's
        return name
