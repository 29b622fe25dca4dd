"""Memory that step plans' replays reuse for their temporaries (fastvit_kernels/plan.py, recording.py).

A temporary is a tensor a step allocates and lets go before it ends, with no view of it returned: the qkv and hidden
activations of an inference step; in training the activations the forward saves for its backward, the gradient of
an activation inside the backward, a bf16 weight gradient before its cast back. A CIFAR-10 step allocates ~400 of
them in training and ~150 in inference, each a torch call of its own and a free (on the GPU box a torch call costs
the host ~15-20 us, and a training step was host-bound there: NOTES.md, sessions 13-14). Here each temporary is a
view, made once, into one buffer per device (its `Arena`), at an offset that no temporary alive at the same time
overlaps (`layout`, from the lines' live ranges); a replay then takes its temporaries as they are.

Two replays must not use the buffer at once: a replay takes the arena's lock for its call (ArenaReplay), a training
step's forward for itself and its backward (StepReplays: a Hold, let go by the backward or with the step); a replay
that finds it held allocates afresh, and on a GPU the work it queues on its stream runs after the previous user's, on
the same stream or after a wait for the other stream. During a CUDA graph capture a replay allocates afresh (the
graph would keep the buffer's addresses). The buffer is held while a plan that uses it lives, sized by the largest
plan that used it: the temporaries of one step (in training about the activations' peak), which the caching
allocator held between steps before. FASTVIT_ARENA=0 (read when a plan is recorded) allocates afresh, as eager does.

Arrival counters (ops/_common.arrival_counters: zeros that the kernels counting on them leave at zero again) come
from a second, small buffer of the arena, zeroed once when it is allocated: a replay takes them as they are instead
of a zero-fill each (a launch on a GPU: ~50 a training step where the weight gradients split their rows). They all
share its first bytes: each is zero when a launch takes it and zero again when that launch ends, and a replay's
launches run one after another on its stream.
"""

import os
import threading
import weakref
from typing import NamedTuple

import torch

ALIGN = 512  # bytes: what torch's caching allocator gives; the kernels were specialised for 16-byte aligned pointers


def arena_on() -> bool:
    return os.environ.get("FASTVIT_ARENA", "1") != "0"


class Temp(NamedTuple):
    """A temporary: the name its allocation line makes, the span of lines over which it or a view of it is read, the
    template of its allocation, and whether it is arrival counters taken from the arena's zeroed buffer (Line.zeroed)."""

    name: str
    first: int
    last: int
    template: torch.Tensor
    zeroed: bool = False


def temporaries(lines: list, keep: set) -> list:
    """[Temp]: the allocation lines (Line.alloc) whose tensor neither the function returns nor hands to a line that
    keeps it, with the span of lines over which it or a view of it is read. A line whose outputs may be views of its
    inputs (Line.views) joins them; a group that reaches a kept name is not temporary."""
    parent = {}

    def root(n):
        while parent.get(n, n) != n:
            n = parent[n]
        return n

    last = {}
    for i, line in enumerate(lines):
        for n in (*line.makes, *line.reads):
            last[n] = i
        if line.views:
            for m in line.makes:
                for r in line.reads:
                    if root(m) != root(r):
                        parent[root(m)] = root(r)
    end, escapes = {}, set()
    for n, i in last.items():
        r = root(n)
        end[r] = max(end.get(r, i), i)
        if n in keep:
            escapes.add(r)
    out = []
    for i, line in enumerate(lines):
        if line.alloc is not None and root(line.makes[0]) not in escapes:
            out.append(Temp(line.makes[0], i, end[root(line.makes[0])], line.alloc, line.zeroed))
    return out


def _nbytes(template) -> int:
    return template.numel() * template.element_size()


def layout(temps: list) -> tuple:
    """([offset in bytes of each of temps, None for the zeroed], the bytes they need): offsets ALIGN apart, two
    temporaries whose spans of lines meet never overlapping. Largest first, each at the lowest offset free over its
    span (a best fit's usual order; CIFAR-10's backward packs into its peak of live temporaries). The zeroed share
    the start of the arena's zeroed buffer instead (the module's docstring)."""
    order = sorted(range(len(temps)), key=lambda k: (-_nbytes(temps[k].template), temps[k].first))
    offsets, total = [None] * len(temps), 0
    placed = []
    for k in order:
        _, first, last, template, zeroed = temps[k]
        if zeroed:
            continue
        size = -(-max(_nbytes(template), 1) // ALIGN) * ALIGN
        taken = sorted(
            (offsets[j], offsets[j] + s) for j, s in placed if temps[j].first <= last and first <= temps[j].last
        )
        at = 0
        for lo, hi in taken:
            if at + size <= lo:
                break
            at = max(at, hi)
        offsets[k] = at
        placed.append((k, size))
        total = max(total, at + size)
    return offsets, total


def zeroed_bytes(temps: list) -> int:
    """The bytes of the arena's zeroed buffer that the zeroed of temps need (they share its start)."""
    return max((max(_nbytes(t.template), 1) for t in temps if t.zeroed), default=0)


class Arena:
    """One device's buffer for the temporaries of the replays (see the module's docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffer = None
        self.zeros = None  # the arrival counters' buffer: zero whenever no launch of a replay is running
        self.generation = 0  # bumped when the buffer grows or goes: the views into the old one are made again
        self.users = weakref.WeakSet()  # the replays holding views into the buffer (release() drops them)
        self.lock = threading.Lock()
        self.stream = None  # the CUDA stream whose work last used the buffer, and its handle
        self.handle = None

    def enter(self, nbytes: int, zeroed: int = 0) -> bool:
        """Take the buffer for one replay needing nbytes, and zeroed bytes of the zeroed buffer (False: allocate
        afresh; exit() only after True)."""
        if not self.lock.acquire(blocking=False):
            return False
        if capturing(self.device):
            self.lock.release()
            return False
        self.follow_stream()
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = None  # freed on the stream that used it, before the larger one is allocated there
            with torch.inference_mode(False):  # a normal tensor, whichever mode the first replay ran in (see _views)
                self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self.generation += 1
        if zeroed and (self.zeros is None or self.zeros.numel() < zeroed):
            self.zeros = None
            with torch.inference_mode(False):
                self.zeros = torch.zeros(zeroed, dtype=torch.uint8, device=self.device)
            self.generation += 1
        return True

    def follow_stream(self):
        """Order the work about to be queued on the current stream after the last user's (a CUDA device)."""
        if self.device.type != "cuda":
            return
        handle = torch._C._cuda_getCurrentRawStream(self.device.index)
        if handle != self.handle:
            stream = torch.cuda.current_stream(self.device)
            if self.stream is not None:
                stream.wait_stream(self.stream)  # the last user's work on its stream before this one's writes
            for held in (self.buffer, self.zeros):
                if held is not None:
                    held.record_stream(stream)  # freed, it waits for this stream's work too
            self.stream, self.handle = stream, handle

    def exit(self):
        self.lock.release()

    def release(self) -> bool:
        """Let the buffer go, and every replay's views into it, unless a replay holds it now (False then). The next
        replay that takes the arena allocates it again."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            for user in list(self.users):
                user.drop_views()
            self.buffer = self.zeros = None
            self.generation += 1
        finally:
            self.lock.release()
        return True


def capturing(device: torch.device) -> bool:
    """A CUDA graph capture on the current stream: a replay allocates afresh (the graph would keep the arena's
    addresses)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# device -> its Arena, while a plan's replay holds it: the buffer goes with the last plan that used it (a model's plans
# go with the model, or with plan.forget)
_ARENAS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def release() -> None:
    """Let every device's arena buffer go where no replay holds it now (Arena.release). A CUDA graph captured after
    warm-up steps that replayed plans replays its own copies of their kernels, into its own memory: cuda_graphs.py
    calls this before the capture, so that the buffer (in training about the activations' size) is not held idle
    beside the graph's."""
    for a in list(_ARENAS.values()):
        a.release()


def arena(device: torch.device) -> Arena:
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    a = _ARENAS.get(device)
    if a is None:
        a = _ARENAS[device] = Arena(device)
    return a


class ArenaReplay:
    """A replay function in two versions: `kept`, which takes its temporaries from `views` (a list its code reads,
    filled here with views into the device's arena), and `fresh`, which allocates them; a call runs `kept` while it
    holds the arena (Arena.enter), else `fresh`."""

    def __init__(self, fresh, kept, views: list, temps: list, device: torch.device):
        self.fresh, self.kept, self.views = fresh, kept, views
        self.offsets, self.nbytes = layout(temps)
        self.zeroed = zeroed_bytes(temps)
        self.specs = [(t.template.shape, t.template.dtype) for t in temps]
        self.arena = arena(device)
        self.arena.users.add(self)
        self.generation = None

    def drop_views(self):
        self.views.clear()
        self.generation = None

    def __call__(self, *args):
        a = self.arena
        if not a.enter(self.nbytes, self.zeroed):
            return self.fresh(*args)
        try:
            if self.generation != a.generation:
                self.views[:] = _views(a, self.offsets, self.specs)
                self.generation = a.generation
            return self.kept(*args)
        finally:
            a.exit()


class Hold:
    """The arena, taken by a training step's forward for its backward (StepReplays): let go once, by the backward,
    or when the step is dropped without one (its saved tensors, views into the arena, go with it)."""

    __slots__ = ("arena",)

    def __init__(self, a: Arena):
        self.arena = a

    def release(self):
        a, self.arena = self.arena, None
        if a is not None:
            a.exit()

    __del__ = release


class StepReplays:
    """A training step's forward and backward replays, each in two versions as ArenaReplay's, whose temporaries share
    one layout: the activations the forward allocates and its backward lets go, beside each function's own. The
    forward that takes the arena holds it until its backward has run (a Hold, which the step keeps beside its saved
    tensors); a forward that finds it held allocates afresh (a second forward before the first one's backward, as in
    gradient accumulation), and its backward then takes the arena for its own temporaries where it can."""

    def __init__(self, fwd: tuple, bwd: tuple, temps: list, split: int, device: torch.device):
        """fwd, bwd: (fresh, kept, views) of each; temps: the step's temporaries, the forward's first `split`."""
        (self.fwd_fresh, self.fwd_kept, self.fwd_views), (self.bwd_fresh, self.bwd_kept, self.bwd_views) = fwd, bwd
        self.temps = temps
        self.offsets, self.nbytes = layout(temps)
        self.zeroed = zeroed_bytes(temps)
        self.specs = [(t.template.shape, t.template.dtype) for t in temps]
        self.split = split
        self.arena = arena(device)
        self.arena.users.add(self)
        self.generation = None

    def drop_views(self):
        self.fwd_views.clear()
        self.bwd_views.clear()
        self.generation = None

    def forward(self, *args) -> tuple:
        """(the forward's result, the Hold of the arena for the backward, or None where it allocated afresh)."""
        a = self.arena
        if not a.enter(self.nbytes, self.zeroed):
            return self.fwd_fresh(*args), None
        hold = Hold(a)
        try:
            self._views(a)
            return self.fwd_kept(*args), hold
        except BaseException:
            hold.release()
            raise

    def backward(self, hold, *args):
        """The backward's result; `hold` (the forward's) is let go."""
        a = self.arena
        if hold is None and not a.enter(self.nbytes, self.zeroed):
            return self.bwd_fresh(*args)
        hold = hold or Hold(a)
        try:
            if capturing(a.device):  # a capture began after the forward: the graph must not keep the arena's addresses
                return self.bwd_fresh(*args)
            a.follow_stream()  # the backward may run on another stream than its forward
            self._views(a)
            return self.bwd_kept(*args)
        finally:
            hold.release()

    def _views(self, a: Arena):
        if self.generation != a.generation:
            views = _views(a, self.offsets, self.specs)
            self.fwd_views[:], self.bwd_views[:] = views[: self.split], views[self.split :]
            self.generation = a.generation


class FreshSteps:
    """StepReplays' two methods where nothing is taken from the arena: both functions allocate."""

    def __init__(self, fwd, bwd):
        self.fwd_fresh, self.bwd_fresh = fwd, bwd

    def forward(self, *args) -> tuple:
        return self.fwd_fresh(*args), None

    def backward(self, hold, *args):
        return self.bwd_fresh(*args)


def _views(a: Arena, offsets, specs) -> list:
    """Views into a's buffer at offsets (into its zeroed buffer's start where None), shaped as specs say."""
    # normal tensors even inside torch.inference_mode(): a view made there could not be written in place by a replay
    # outside it (a training step's after an evaluation)
    with torch.inference_mode(False):
        return [
            _view(a.zeros, 0, *spec) if at is None else _view(a.buffer, at, *spec) for at, spec in zip(offsets, specs)
        ]


def _view(buffer, at, shape, dtype):
    return buffer[at : at + _nbytes_of(shape, dtype)].view(dtype).view(shape)


def _nbytes_of(shape, dtype) -> int:
    return shape.numel() * dtype.itemsize
