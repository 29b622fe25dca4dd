"""Memory that step plans' replays reuse for their temporaries (fastvit_kernels/plan.py, recording.py).

A temporary is a tensor a replay allocates and lets go before it returns, with no view of it returned or saved: the
gradient of an activation inside the backward, a bf16 weight gradient before its cast back, the qkv and hidden
activations of an inference step. A replay allocates ~250 of them a CIFAR-10 training step and ~150 an inference
step, each a torch call of its own and a free (on the GPU box a torch call costs the host ~15-20 us, and a training
step was host-bound there: NOTES.md, sessions 13-14). Here each temporary is a view, made once, into one buffer per
device (its `Arena`), at an offset that no temporary alive at the same time overlaps (`layout`, from the lines' live
ranges); a replay then takes its temporaries as they are.

Two replays must not use the buffer at once: a replay takes the arena's lock for its call (another thread's replay
meanwhile allocates afresh), and on a GPU the work it queues on its stream runs after the previous user's, on the same
stream or after a wait for the other stream. During a CUDA graph capture a replay allocates afresh (the graph would
keep the buffer's addresses). The buffer is held while a plan that uses it lives, sized by the largest plan that
used it: the temporaries of one step, which the caching allocator held between steps before. FASTVIT_ARENA=0 (read
when a plan is recorded) allocates afresh, as eager does.
"""

import os
import threading
import weakref

import torch

ALIGN = 512  # bytes: what torch's caching allocator gives; the kernels were specialised for 16-byte aligned pointers


def arena_on() -> bool:
    return os.environ.get("FASTVIT_ARENA", "1") != "0"


def temporaries(lines: list, keep: set) -> list:
    """[(name, first line, last line, template)]: the allocation lines (Line.alloc) whose tensor neither the function
    returns nor hands to a line that keeps it, with the span of lines over which it or a view of it is read. A line
    whose outputs may be views of its inputs (Line.views) joins them; a group that reaches a kept name is not
    temporary."""
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
            out.append((line.makes[0], i, end[root(line.makes[0])], line.alloc))
    return out


def _nbytes(template) -> int:
    return template.numel() * template.element_size()


def layout(temps: list) -> tuple:
    """([offset in bytes of each of temps], the bytes they need): offsets ALIGN apart, two temporaries whose spans of
    lines meet never overlapping. Largest first, each at the lowest offset free over its span (a best fit's usual
    order; CIFAR-10's backward packs into its peak of live temporaries)."""
    order = sorted(range(len(temps)), key=lambda k: (-_nbytes(temps[k][3]), temps[k][1]))
    offsets, total = [0] * len(temps), 0
    placed = []
    for k in order:
        _, first, last, template = temps[k]
        size = -(-max(_nbytes(template), 1) // ALIGN) * ALIGN
        taken = sorted((offsets[j], offsets[j] + s) for j, s in placed if temps[j][1] <= last and first <= temps[j][2])
        at = 0
        for lo, hi in taken:
            if at + size <= lo:
                break
            at = max(at, hi)
        offsets[k] = at
        placed.append((k, size))
        total = max(total, at + size)
    return offsets, total


class Arena:
    """One device's buffer for the temporaries of the replays (see the module's docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffer = None
        self.generation = 0  # bumped when the buffer grows: the views into the old one are made again
        self.lock = threading.Lock()
        self.stream = None  # the CUDA stream whose work last used the buffer, and its handle
        self.handle = None

    def enter(self, nbytes: int) -> bool:
        """Take the buffer for one replay needing nbytes (False: allocate afresh; exit() only after True)."""
        if not self.lock.acquire(blocking=False):
            return False
        if self.device.type == "cuda":
            if torch.cuda.is_current_stream_capturing():
                self.lock.release()
                return False
            handle = torch._C._cuda_getCurrentRawStream(self.device.index)
            if handle != self.handle:
                stream = torch.cuda.current_stream(self.device)
                if self.stream is not None:
                    stream.wait_stream(self.stream)  # the last user's work on its stream before this one's writes
                if self.buffer is not None:
                    self.buffer.record_stream(stream)  # freed, it waits for this stream's work too
                self.stream, self.handle = stream, handle
        if self.buffer is None or self.buffer.numel() < nbytes:
            self.buffer = None  # freed on the stream that used it, before the larger one is allocated there
            with torch.inference_mode(False):  # a normal tensor, whichever mode the first replay ran in (see _view)
                self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self.generation += 1
        return True

    def exit(self):
        self.lock.release()


# device -> its Arena, while a plan's replay holds it: the buffer goes with the last plan that used it (a model's plans
# go with the model, or with plan.forget)
_ARENAS: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


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
        self.specs = [(t[3].shape, t[3].dtype) for t in temps]
        self.arena = arena(device)
        self.generation = None

    def __call__(self, *args):
        a = self.arena
        if not a.enter(self.nbytes):
            return self.fresh(*args)
        try:
            if self.generation != a.generation:
                self._view(a.buffer)
                self.generation = a.generation
            return self.kept(*args)
        finally:
            a.exit()

    def _view(self, buffer):
        # normal tensors even inside torch.inference_mode(): a view made there could not be written in place by a
        # replay outside it (a training step's after an evaluation)
        with torch.inference_mode(False):
            self.views[:] = [
                buffer[at : at + _nbytes_of(shape, dtype)].view(dtype).view(shape)
                for at, (shape, dtype) in zip(self.offsets, self.specs)
            ]


def _nbytes_of(shape, dtype) -> int:
    return shape.numel() * dtype.itemsize
