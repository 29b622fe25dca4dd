"""The recorder of fastvit_kernels/plan.py: what a forward (and its backward) did, as lines of Python to replay.

While it is active, every torch operation reaches it as it reaches the kernels (a TorchDispatchMode: below autograd and
autocast) and every launch of ours through tuning's launch hook; each becomes one line, its tensor arguments named by
where they came from: an input of the function (x, g), a parameter or buffer of the model (read at replay, never
copied), or an earlier line. A launch's line calls the compiled kernel's launcher where direct_launch.py allows it,
and a fresh contiguous allocation's is empty_like of a template. `function` turns a run of lines into a Python
function that deletes each intermediate after the line that reads it last, as eager frees it.

What a replay cannot repeat makes `failure` say why, and no plan is made: an operation whose result Python reads
(.item(), a shape that depends on the data), a tensor from outside (neither an input, the model's, nor made by a line).
"""

import threading
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import direct_launch, tuning
from .arena import ArenaReplay, FreshSteps, StepReplays, arena_on, temporaries
from .cast_batches import batch_casts
from .lines import Cast, Line

_aten = torch.ops.aten
# The allocations (~160 of a CIFAR-10 inference step's ~170 operations) and the views and sums of a backward through
# torch's own bindings, which take the same arguments and resolve to the same overload: 0.5-3 us a call on the CPU
# box against 1.3-5 us through the operator object.
_BINDINGS = {
    _aten.empty.memory_format: torch.empty,
    _aten.empty_like.default: torch.empty_like,
    _aten.new_empty.default: torch.Tensor.new_empty,
    _aten.select.int: torch.select,
    _aten.t.default: torch.t,
    _aten.view.default: torch.Tensor.view,
    _aten.sum.dim_IntList: torch.sum,
}
# Fresh contiguous allocations replay as torch.empty_like of a template: a one-element tensor of the dtype and device
# expanded to the shape (no memory of that size; all strides 0, so empty_like makes it contiguous). 1.3 us a call on
# the CPU box against 2.1 us for torch.empty with its keywords: ~300 allocations of a training step.
_ALLOCATIONS = {_aten.empty.memory_format, _aten.new_empty.default, _aten.empty_like.default}
# the same memory and values under another tensor object (autograd detaches what it saves): the replay reads the
# original, with no line
_ALIASES = {_aten.detach.default, _aten.alias.default}
_INLINE = (int, bool, str, type(None))  # constants written into the code as they are (repr)


def _callable(func):
    """What a replay calls for an operation: a binding of torch's, else the operator itself (past
    OpOverload.__call__'s Python frame)."""
    return _BINDINGS.get(func) or getattr(func, "_op", func)


def _has_tensor(tree) -> bool:
    return any(isinstance(leaf, torch.Tensor) for leaf in tree_leaves(tree))


def _shares_memory(out, inputs) -> bool:
    """An output is a view of an input (the same storage): by what ran, not by the schema, which does not say it for
    aten._unsafe_view (reshape's view of a fresh product)."""
    storages = {t.untyped_storage().data_ptr() for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)}
    storages.discard(0)  # no memory (an empty tensor): nothing to share
    return any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in storages for t in tree_leaves(out))


def _contiguous(shape) -> tuple:
    """The strides torch gives a contiguous tensor of `shape` (a dim of size 0 counts as 1, as c10 counts it)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _view_key(t):
    return (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


def _pure(func) -> bool:
    return not func._schema.is_mutable and torch.Tag.nondeterministic_seeded not in func.tags


class Recorder(TorchDispatchMode):
    """Lines for what runs while it is active (`with recording(recorder):`)."""

    def __init__(self, externals: dict, launch_directly: bool = True):
        """externals: id -> the model's parameters and buffers; launch_directly: lines call compiled kernels'
        launchers where direct_launch allows it (else every launch line goes through Triton's JITFunction.run)."""
        super().__init__()
        self.launch_directly = launch_directly
        self.lines: list[Line] = []
        self.consts, self._const_names = {}, {}  # name -> object the lines refer to
        self._names = {}  # id(tensor) -> (name, weakref): a tensor a line made (weak: ids are reused)
        # (address, shape, strides, dtype, device) -> name: autograd hands its saved tensors back as new objects
        self._views = {}
        self._externals = externals  # id -> the model's parameters and buffers
        self._external_names = {}
        self._templates = {}  # (shape, dtype, device) -> the template an allocation replays from, or None
        self.read = []  # the model's tensors the lines read, in order of first use
        self.failure = None
        self.tma = False  # a launch may read through tensor descriptors
        # what was recorded (plan.summary): launches that call a compiled kernel's launcher (direct_launch) or go
        # through Triton, torch operations
        self.counts = {"direct": 0, "triton": 0, "torch": 0}
        self._count = 0
        self._launching = False  # inside a launch: the operations there are the launcher's (the interpreter's)
        self._reads = []  # the names the line being written reads
        self.thread = None

    @property
    def direct(self) -> bool:
        """A launch calls a compiled kernel's launcher: a replay is valid only while no launch hooks are set."""
        return self.counts["direct"] > 0

    def __enter__(self):
        self.thread = threading.get_ident()  # the backward may run on autograd's thread for the device
        return super().__enter__()

    # -- what runs ----------------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._launching or self.failure is not None:
            return out
        if not _has_tensor(out) and not _has_tensor((args, kwargs)):
            return out  # a function of constants (torch.promote_types): its result is in the code already
        if torch.Tag.data_dependent_output in func.tags or torch.Tag.dynamic_output_shape in func.tags:
            self.fail(f"{func} computes a result that depends on the data")
            return out
        if func in _ALIASES:
            name = self._name(args[0]) or self._external(args[0])
            if name is not None:
                self._names[id(out)] = (name, weakref.ref(out))
                return out
        template = self._template(out, kwargs) if func in _ALLOCATIONS else None
        if template is not None:
            call = f"{self._const(torch.empty_like)}({self._const(template)})"
        else:
            call = f"{self._const(_callable(func))}({self._call_args(args, kwargs)})"
        if self.failure is None:
            views = _shares_memory(out, (args, kwargs))
            line = Line(call, pure=_pure(func), cast=self._cast(func, args, kwargs, out), alloc=template, views=views)
            self._bind_outputs(out, line, str(func))
            self.counts["torch"] += 1
        return out

    def _cast(self, func, args, kwargs, out):
        """The Cast of a dtype conversion that a batch may do instead (a contiguous tensor to a new one of the same
        shape: autocast's casts of the weights, and of their gradients back), else None."""
        if not isinstance(out, torch.Tensor):
            return None
        if func is _aten.to.dtype and len(args) == 2 and not kwargs and out.dtype != args[0].dtype:
            # under inference_mode autocast's casts reach the recorder undecomposed, as to(src, dtype) (to() in the
            # tensor's own dtype returns the tensor: no cast)
            args, kwargs = args[:1], {"dtype": args[1]}
        elif func is not _aten._to_copy.default or len(args) != 1:
            return None
        src = args[0]
        if src.shape != out.shape or src.device != out.device or not src.is_contiguous():
            return None
        plain = {"layout": torch.strided, "pin_memory": False, "non_blocking": False}
        memory_format = kwargs.get("memory_format")
        if any(kwargs[k] not in (None, plain[k]) for k in kwargs.keys() & plain.keys()) or (
            kwargs.keys() - plain.keys() - {"dtype", "device", "memory_format"}
            or memory_format not in (None, torch.preserve_format, torch.contiguous_format)
        ):
            return None
        template = self._template(out, {})
        name = self._name(src) or self._external(src)
        if template is None or name is None:
            return None
        alloc = f"{self._const(torch.empty_like)}({self._const(template)})"
        key = (src.dtype, out.dtype, out.device)
        return Cast(name, name not in self.consts, alloc, template, out.numel() * out.element_size(), key)

    def launch(self, kernel, grid, args, consts):
        """tuning's launch hook: the launch (through direct_launch, which says how a replay may repeat it), then its
        line. (Another thread's launches are its own.)"""
        if threading.get_ident() != self.thread:
            kernel[grid](*args, **consts)
            return
        self._launching = True
        try:
            direct = None
            if self.launch_directly:
                direct = direct_launch.launch(kernel, grid, args, consts)
            else:
                kernel[grid](*args, **consts)
        finally:
            self._launching = False
        if self.failure is None:
            self.tma = self.tma or bool(consts.get("TMA_OK"))
            self.counts["direct" if direct is not None else "triton"] += 1
            self._line(self._launch_text(kernel, grid, args, consts, direct))

    def _launch_text(self, kernel, grid, args, consts, direct):
        if direct is None:
            return f"{self._const(kernel)}[{self.source(tuple(grid))}]({self._call_args(args, consts)})"
        self._const(direct.compiled)  # in the function's globals, unread: the compiled kernel lives as long as the plan
        grid3 = (*grid, 1, 1)[:3]
        head = f"{self._const(direct.run)}({self._call_args(grid3, {})}, {self._const(direct.stream)}({direct.device})"
        head += f", {self.source(direct.function)}, {self._const(direct.packed_metadata)}, None, None, None"
        return f"{head}, {', '.join(map(self._address, direct.args))})"

    def _address(self, v) -> str:
        """A direct launch's argument as the code writes it, a tensor as its address: Triton's launcher takes an
        integer as the pointer itself, where for a tensor it calls data_ptr() and asks the driver to translate the
        address (cuPointerGetAttribute: a driver call for every tensor argument of every launch). A device tensor's
        address is the device pointer already, and the plan only replays launches on the device it recorded."""
        return f"{self.source(v)}.data_ptr()" if isinstance(v, torch.Tensor) else self.source(v)

    def zeroed(self, t):
        """t, the zeros the last line made, are arrival counters that the launches reading them leave at zero
        (ops/_common.arrival_counters): a replay may take them from the arena's zeroed buffer (arena.py)."""
        if threading.get_ident() != self.thread or self.failure is not None or not self.lines:
            return
        line = self.lines[-1]
        template = self._template(t, {})
        if line.makes == [self._name(t)] and template is not None:
            line.alloc, line.zeroed = template, True

    # -- names --------------------------------------------------------------------------------------------------------
    def bind(self, t, name=None):
        """Name t (an input of a function, or what a line made); returns the name."""
        if name is None:
            name = f"t{self._count}"
            self._count += 1
        self._names[id(t)] = (name, weakref.ref(t))
        self._views[_view_key(t)] = name
        return name

    def source(self, v) -> str:
        """v as the code writes it: a tensor by its name, a constant inline or by a name of its own."""
        if isinstance(v, torch.Tensor):
            name = self._name(v)
            if name is not None:
                if name not in self.consts:  # an alias of a parameter reads the parameter, a global of the code
                    self._reads.append(name)
                return name
            name = self._external(v)
            if name is None:
                self.fail("a tensor from outside the model (neither an input, a parameter or buffer, nor made here)")
                return "None"
            return name
        if isinstance(v, (list, tuple)):  # a list as a tuple too: torch takes either, and a tuple of ints is a constant
            inner = ", ".join(self.source(i) for i in v)
            return f"({inner}{',' if len(v) == 1 else ''})"
        if type(v) in _INLINE:
            return repr(v)
        return self._const(v)

    def fail(self, reason):
        self.failure = self.failure or reason  # the first reason: what followed it was not recorded

    def take_reads(self) -> list:
        """The names read by the sources written since the last line (for a return expression)."""
        reads, self._reads = self._reads, []
        return reads

    def _same_object(self, t) -> bool:
        entry = self._names.get(id(t))
        return entry is not None and entry[1]() is t

    def _name(self, t):
        if self._same_object(t):
            return self._names[id(t)][0]
        return self._views.get(_view_key(t))

    def _external(self, t):
        if self._externals.get(id(t)) is not t:
            return None
        name = self._external_names.get(id(t))
        if name is None:
            name = self._external_names[id(t)] = f"p{len(self._external_names)}"
            self.consts[name] = t
            self.read.append(t)
        return name

    def _template(self, out, kwargs):
        """The template for an allocation `out` (see _ALLOCATIONS), or None where empty_like of it would not make the
        same tensor (pinned memory, strides other than contiguous ones)."""
        if kwargs.get("pin_memory") or not isinstance(out, torch.Tensor) or out.layout != torch.strided:
            return None
        key = (tuple(out.shape), out.dtype, out.device)
        if key not in self._templates:
            template = torch.empty((), dtype=out.dtype, device=out.device).expand(out.shape)
            if out.numel() == 1:  # expanded, it reads as dense and empty_like keeps its zero strides: a real one
                template = torch.empty(out.shape, dtype=out.dtype, device=out.device)
            self._templates[key] = template if torch.empty_like(template).stride() == _contiguous(out.shape) else None
        template = self._templates[key]
        return template if template is not None and out.stride() == _contiguous(out.shape) else None

    def _const(self, v):
        name = self._const_names.get(id(v))
        if name is None:
            name = self._const_names[id(v)] = f"c{len(self.consts)}"
            self.consts[name] = v  # held: the id stays this object's
        return name

    # -- lines --------------------------------------------------------------------------------------------------------
    def _line(self, text):
        self.lines.append(Line(text, self.take_reads()))

    def _call_args(self, args, kwargs):
        parts = [self.source(a) for a in args] + [f"{k}={self.source(v)}" for k, v in kwargs.items()]
        return ", ".join(parts)

    def _bind_outputs(self, out, line, what):
        """line (its text the call) as the line that makes out."""
        if out is None:
            self._line(line.text)
            return
        outs = out if isinstance(out, (tuple, list)) else (out,)
        targets = []
        for t in outs:
            if t is None:
                targets.append("_")
            elif not isinstance(t, torch.Tensor):
                self.fail(f"{what} returns {type(t).__name__}, which Python reads")
                return
            elif self._same_object(t):  # an in-place operation hands back its input
                targets.append("_")
            else:
                targets.append(self.bind(t))
        lhs = ", ".join(targets) + ("," if isinstance(out, (tuple, list)) else "")
        line.text, line.reads, line.makes = f"{lhs} = {line.text}", self.take_reads(), [n for n in targets if n != "_"]
        self.lines.append(line)

    # -- the code -----------------------------------------------------------------------------------------------------
    def function(self, params: list, lines: list, returns: str, returned: list, device=None):
        """(the function of `lines` taking `params` and returning the expression `returns` (which reads the names
        `returned`), its source): each name a line made or an input deleted after the line that reads it last, and the
        pure lines whose results nothing reads left out (the placeholders an op returns for a gradient that does not
        exist, the pre-activation slot of an inference MLP). With a device (and FASTVIT_ARENA not 0), an
        arena.ArenaReplay where the lines allocate temporaries: the same code taking them from the device's arena."""
        code = self._code(params, lines, returns, returned)
        temps = temporaries(code.lines, code.keep) if device is not None and arena_on() else []
        if not temps:
            return code.fn, code.source
        views = []  # ArenaReplay fills it
        return ArenaReplay(code.fn, self._kept(code, temps, views), views, temps, device), code.source

    def step_functions(self, fwd: tuple, bwd: tuple, outputs: list, device):
        """(forward, backward, their source) of a training step: fwd and bwd are function()'s (params, lines, returns,
        returned) of each, `outputs` the names the forward's caller gets (the others it returns are for the backward:
        its saved tensors). As arena.StepReplays' methods: forward(x) -> (its result, a Hold or None), backward(hold,
        g, saved). With the arena on, the allocations that die inside the step, in either function (the saved
        activations included), share one layout of the arena; else both allocate."""
        f, b = self._code(*fwd), self._code(*bwd)
        keep = set(outputs) | set(f.params) | b.keep
        temps = temporaries(f.lines + b.lines, keep) if arena_on() else []
        if not temps:
            steps = FreshSteps(f.fn, b.fn)
            return steps.forward, steps.backward, f.source + b.source
        split = sum(1 for t in temps if t.first < len(f.lines))
        shift = len(f.lines)
        b_temps = [t._replace(first=t.first - shift, last=t.last - shift) for t in temps[split:]]
        f_views, b_views = [], []  # StepReplays fills them
        fwd_versions = (f.fn, self._kept(f, temps[:split], f_views), f_views)
        bwd_versions = (b.fn, self._kept(b, b_temps, b_views), b_views)
        steps = StepReplays(fwd_versions, bwd_versions, temps, split, device)
        return steps.forward, steps.backward, f.source + b.source

    def _code(self, params, lines, returns, returned) -> "_Code":
        needed = set(returned)
        kept = []
        for line in reversed(lines):
            if not line.pure or needed.intersection(line.makes):
                kept.append(line)
                needed.update(line.reads)
        lines = batch_casts(kept[::-1], set(returned), self._const)
        last = {}
        for i, line in enumerate(lines):
            for n in (*line.makes, *line.reads):
                last[n] = i
        keep = set(returned) | set(params)
        dead_after = {}
        for n, i in last.items():
            if n not in keep:
                dead_after.setdefault(i, []).append(n)
        code = _Code(params, lines, keep, dead_after, returns)
        code.source = _source(params, code.texts, dead_after, returns)
        code.fn = self._compile(code.source)
        return code

    def _kept(self, code: "_Code", temps: list, views: list):
        """code's function with each of `temps` (temporaries() of its lines) read from `views` instead of allocated."""
        if not temps:
            return code.fn
        texts = list(code.texts)
        name = self._const(views)
        for k, t in enumerate(temps):
            texts[t.first] = f"{t.name} = {name}[{k}]"
        return self._compile(_source(code.params, texts, code.dead_after, code.returns))

    def _compile(self, source):
        scope = dict(self.consts)
        exec(compile(source, "<fastvit_kernels.plan>", "exec"), scope)
        return scope["replay"]


class _Code:
    """A function's lines after the recorder's passes: what its code is made of (Recorder._code)."""

    def __init__(self, params, lines, keep, dead_after, returns):
        self.params, self.lines, self.keep, self.dead_after, self.returns = params, lines, keep, dead_after, returns
        self.texts = [line.text for line in lines]
        self.source = self.fn = None


def _source(params, texts, dead_after, returns) -> str:
    body = []
    for i, text in enumerate(texts):
        body.append(text)
        if i in dead_after:
            body.append(f"del {', '.join(dead_after[i])}")
    body.append(f"return {returns}")
    return f"def replay({', '.join(params)}):\n" + "".join(f"    {t}\n" for t in body)


class recording:
    """with recording(recorder): the recorder sees the operations (its dispatch mode) and our launches (tuning).

    Autocast's cache of cast weights is off inside: under a long-lived autocast context a weight cast by an earlier
    call would reach the recording as a tensor from outside; uncached, its cast is a line like any other."""

    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    def __enter__(self):
        self._cache = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)
        self.recorder.__enter__()
        tuning.recorder = self.recorder

    def __exit__(self, *exc):
        tuning.recorder = None
        torch.set_autocast_cache_enabled(self._cache)
        return self.recorder.__exit__(*exc)
