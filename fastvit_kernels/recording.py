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
from .ops.cast import KeptCasts, copy_cast_unchecked

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


def _contiguous(shape) -> tuple:
    """The strides torch gives a contiguous tensor of `shape` (a dim of size 0 counts as 1, as c10 counts it)."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def _view_key(t):
    return (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)


class Line:
    """One line of a replay: its text, the names it reads and the names it makes; pure: an operation without effects
    beyond its outputs (no mutation, no random numbers), which a replay may leave out where nothing reads them; cast:
    for a dtype cast that a batch of casts may replace (_batch_casts), the Cast."""

    def __init__(self, text, reads=(), makes=(), pure=False, cast=None):
        self.text, self.reads, self.makes, self.pure = text, list(reads), list(makes), pure
        self.cast = cast


class Cast:
    """A cast line's parts: the name of its input (read: a name of the function's, not one of its globals such as a
    parameter), the allocation of its output (a line's text, empty_like of `template`) and its size in bytes, and
    the (source dtype, destination dtype, device) that one copy of a batch shares."""

    def __init__(self, src: str, read: bool, alloc: str, template: torch.Tensor, nbytes: int, key: tuple):
        self.src, self.read, self.alloc, self.template, self.nbytes, self.key = src, read, alloc, template, nbytes, key


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
            self._bind_outputs(out, call, str(func), _pure(func), self._cast(func, args, kwargs, out))
            self.counts["torch"] += 1
        return out

    def _cast(self, func, args, kwargs, out):
        """The Cast of a dtype conversion that a batch may do instead (a contiguous tensor to a new one of the same
        shape: autocast's casts of the weights, and of their gradients back), else None."""
        if func is not _aten._to_copy.default or len(args) != 1 or not isinstance(out, torch.Tensor):
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
        return f"{head}, {self._call_args(direct.args, {})})"

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
    def _line(self, text, makes=(), pure=False, cast=None):
        self.lines.append(Line(text, self.take_reads(), makes, pure, cast))

    def _call_args(self, args, kwargs):
        parts = [self.source(a) for a in args] + [f"{k}={self.source(v)}" for k, v in kwargs.items()]
        return ", ".join(parts)

    def _bind_outputs(self, out, call, what, pure, cast=None):
        if out is None:
            self._line(call)
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
        self._line(f"{lhs} = {call}", [n for n in targets if n != "_"], pure, cast)

    # -- the code -----------------------------------------------------------------------------------------------------
    def function(self, params: list, lines: list, returns: str, returned: list):
        """(the function of `lines` taking `params` and returning the expression `returns` (which reads the names
        `returned`), its source): each name a line made or an input deleted after the line that reads it last, and the
        pure lines whose results nothing reads left out (the placeholders an op returns for a gradient that does not
        exist, the pre-activation slot of an inference MLP)."""
        needed = set(returned)
        kept = []
        for line in reversed(lines):
            if not line.pure or needed.intersection(line.makes):
                kept.append(line)
                needed.update(line.reads)
        lines = _batch_casts(kept[::-1], set(returned), self._const)
        last = {}
        for i, line in enumerate(lines):
            for n in (*line.makes, *line.reads):
                last[n] = i
        keep = set(returned) | set(params)
        dead_after = {}
        for n, i in last.items():
            if n not in keep:
                dead_after.setdefault(i, []).append(n)
        body = []
        for i, line in enumerate(lines):
            body.append(line.text)
            if i in dead_after:
                body.append(f"del {', '.join(dead_after[i])}")
        body.append(f"return {returns}")
        source = f"def replay({', '.join(params)}):\n" + "".join(f"    {t}\n" for t in body)
        scope = dict(self.consts)
        exec(compile(source, "<fastvit_kernels.plan>", "exec"), scope)
        return scope["replay"], source


def _batch_casts(lines: list, returned: set, const) -> list:
    """lines with their casts in batches, one ops.cast.copy_cast_unchecked each (a launch for CAST_PAIRS casts on a
    GPU, where each cast is a launch of its own: ~100 casts of weights in an autocast forward, ~100 of their gradients
    in the backward; torch._foreach_copy_ launches one a tensor when the dtypes differ). Two kinds move, the values
    they compute unchanged:
    - casts of the model's tensors and the function's inputs (names no line makes) run together where the first of a
      batch ran; a line with effects that reads the input of a later one ends the batch before it (an input written
      in place keeps its name; a weight written in place is named by that line from then on, so its later casts read
      a name a line makes and do not move);
    - casts whose output only the function's return reads, and whose input no later line reads, run together where
      the last of a batch ran (the gradients' casts to the weights' dtype).
    A batch holds at most CAST_BATCH_BYTES of outputs: what it makes early (or keeps late) lives that much longer.
    An early batch of the model's tensors alone casts into outputs the replay keeps from call to call (KeptCasts: no
    allocation a cast); `const` names an object for the code (Recorder._const).
    """
    made = {n for line in lines for n in line.makes}
    readers = {}
    for i, line in enumerate(lines):
        for n in line.reads:
            readers.setdefault(n, []).append(i)
    early, late = [[]], [[]]
    for i, line in enumerate(lines):
        cast = line.cast
        if cast is None:
            continue
        if cast.src not in made:
            batch = early[-1]
            if batch and any(not other.pure and cast.src in other.reads for other in lines[batch[0] + 1 : i]):
                early.append(batch := [])
            _add(early, batch, i, lines)
        elif line.makes[0] in returned and i == readers[cast.src][-1] and line.makes[0] not in readers:
            _add(late, late[-1], i, lines)
    at = {ids[0]: ids for ids in early if len(ids) > 1} | {ids[-1]: ids for ids in late if len(ids) > 1}
    if not at:
        return lines
    moved = {i for ids in at.values() for i in ids}
    kept = {ids[0] for ids in early if len(ids) > 1 and not any(lines[j].cast.read for j in ids)}
    out = []
    for i, line in enumerate(lines):
        if i not in moved:
            out.append(line)
        if i in kept:  # an early batch of the model's tensors: cast into the outputs of the call before
            out.append(_kept_batch(lines, at[i], const))
        elif i in at:  # an early batch's first line or a late batch's last: the batch instead
            out += _batch(lines, at[i], const(copy_cast_unchecked))
    return out


# The bytes of cast outputs one batch holds: the casts it runs early (or keeps late) live that much longer than
# unbatched. 16 MiB: a ViT-S's ~100 weight casts (42 MB in bf16) in 3 batches, a ViT-B's (172 MB) in 11.
CAST_BATCH_BYTES = 16 << 20


def _add(batches: list, batch: list, i: int, lines: list):
    """lines[i]'s cast into `batch`, the last of `batches`, or into a new one where it would pass CAST_BATCH_BYTES."""
    if batch and sum(lines[j].cast.nbytes for j in batch) + lines[i].cast.nbytes > CAST_BATCH_BYTES:
        batches.append(batch := [])
    batch.append(i)


def _batch(lines: list, ids: list, copy: str) -> list:
    """The lines that do the casts of lines[ids]: their outputs' allocations, then one copy per dtype pair."""
    out, groups = [], {}
    for i in ids:
        line = lines[i]
        out.append(Line(f"{line.makes[0]} = {line.cast.alloc}", [], line.makes, pure=True))
        groups.setdefault(line.cast.key, []).append((line.makes[0], line.cast))
    for pairs in groups.values():
        dsts, srcs = [d for d, _ in pairs], [c.src for _, c in pairs]
        reads = dsts + [c.src for _, c in pairs if c.read]
        out.append(Line(f"{copy}(({', '.join(dsts)},), ({', '.join(srcs)},))", reads))
    return out


def _kept_batch(lines: list, ids: list, const) -> Line:
    """The line that does the casts of lines[ids], all of the model's tensors, into outputs kept between calls."""
    casts = [lines[i].cast for i in ids]
    dsts = [lines[i].makes[0] for i in ids]
    kept = const(KeptCasts([c.template for c in casts], [c.key for c in casts]))
    return Line(f"{', '.join(dsts)}, = {kept}({', '.join(c.src for c in casts)})", [], dsts)


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
