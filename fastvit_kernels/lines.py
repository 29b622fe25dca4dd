"""The lines a step plan's recorder writes (recording.py) and its passes rewrite (cast_batches.py, arena.py)."""

import torch


class Line:
    """One line of a replay: its text, the names it reads and the names it makes; pure: an operation without effects
    beyond its outputs (no mutation, no random numbers), which a replay may leave out where nothing reads them; cast:
    for a dtype cast that a batch of casts may replace (cast_batches.py), the Cast; alloc: for a fresh allocation, its
    template (the arena may hold it instead: arena.py); views: its outputs may be views of what it reads; zeroed: an
    allocation of zeros that the launches reading it leave at zero again (ops/_common.arrival_counters), which a
    replay may take from memory kept at zero instead of filling it."""

    def __init__(self, text, reads=(), makes=(), pure=False, cast=None, alloc=None, views=False):
        self.text, self.reads, self.makes, self.pure = text, list(reads), list(makes), pure
        self.cast, self.alloc, self.views = cast, alloc, views
        self.zeroed = False


class Cast:
    """A cast line's parts: the name of its input (read: a name of the function's, not one of its globals such as a
    parameter), the allocation of its output (a line's text, empty_like of `template`) and its size in bytes, and
    the (source dtype, destination dtype, device) that one copy of a batch shares."""

    def __init__(self, src: str, read: bool, alloc: str, template: torch.Tensor, nbytes: int, key: tuple):
        self.src, self.read, self.alloc, self.template, self.nbytes, self.key = src, read, alloc, template, nbytes, key
