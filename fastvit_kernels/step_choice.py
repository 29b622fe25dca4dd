"""Which GEMM choices a replayed training step runs: those that count its host time, or those by GPU time alone,
decided by timing the step both ways.

Why: tuning.py makes two choices per GEMM shape from the candidates' measured GPU times, one by GPU time alone and
one by GPU time plus the host time a candidate adds (configs.GEMM_HOST_EXTRA_MS: a cuBLAS call through torch costs
the host more than one launch of ours). Which of the two a step should run is the step's question, not the GEMM's:
a step whose host issues it slower than the GPU runs it (CIFAR-10 at batch 512 on an H200: 18.8 ms of host time for
15.8 ms of GPU work, RESULTS.md, session 23) gains every microsecond of host time saved, and a step the GPU bounds
(ViT-B/16 at batch 64 there: 13.8 against 21.9) only pays the GPU time that counting the host gives away. Neither a
GEMM nor the plan sees the user's loop (its optimizer, data, waits), so the step is timed as the user runs it.

How: a training plan (plan.py) first runs the host-counting choices. Its replays note the time from one replay's start
to the next one's: the user's whole step, optimizer and synchronisation included. On a GPU that time is read on the
GPU's timeline (an event recorded where each replay starts), which spaces the starts by the host's time where the GPU
waits for it and by the GPU's where the host runs ahead: the step as it runs whether or not the user's loop waits for
each step (the host's clock alone would see only the host's time until the launch queue fills). After WARMUP + SAMPLES
of them the signature switches to the GPU-time choices (recorded again: plan.run) and is timed the same way; the variant
with the lower median step is kept, and the other's plan dropped. Nothing is timed where the two variants choose alike
for every GEMM shape timed so far (no GPU; FASTVIT_GEMM naming one family; FASTVIT_AUTOTUNE=0), or inside
tuning.gpu_time_only() (a CUDA graph's capture, the per-kernel benchmark rows), which runs the GPU-time choices anyway.
Where the GPU-time variant is not replayed within NOT_REPLAYED_LIMIT calls (it could not be recorded), the host-counting
one is kept. tuning.forget() (a switch changed) starts every choice over.
"""

import statistics
import time
import weakref

import torch

from . import tuning
from ._interpreter import interpreting

WARMUP = 2  # replays of a variant not timed: the first ones after a recording warm the caches and the allocator
SAMPLES = 8  # replays timed per variant; the median decides
NOT_REPLAYED_LIMIT = 6  # calls of the GPU-time variant that may run unreplayed (its first call, recordings) before
# it is given up
_HOST, _GPU, _KEEP_HOST, _KEEP_GPU = "timing host-counting choices", "timing GPU-time choices", "host", "GPU"
_CHOICES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {signature: StepChoice}
_LATEST: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> the StepChoice of its latest call
_clock = time.perf_counter


def _mark(device):
    """Where a replay starts: an event on the device's current stream on a GPU, else the host's clock."""
    if device is not None and device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event
    return _clock()


def _seconds(start, end) -> float:
    """The time between two marks: on a GPU once the later event has been reached (a wait of at most a step, made
    twice a signature, when a variant's steps are all marked)."""
    if isinstance(end, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1e3


class StepChoice:
    """The choice for one training signature of one model: its phase, the steps marked so far, each variant's
    median step once timed."""

    def __init__(self, device=None):
        """device: where the signature's steps run (a GPU's steps are timed on its timeline; None: the host's clock)."""
        self.device = device
        self.epoch = tuning.forgets()  # tuning.forget() (a switch changed) starts the choice over
        self.phase = _HOST
        self.steps, self.last, self.unreplayed = [], None, 0  # steps: (start mark, next start mark) pairs
        self.medians = {}  # variant (True: GPU-time choices) -> median step in seconds

    @property
    def gpu_only(self) -> bool:
        """Whether the signature's calls run the GEMM choices by GPU time alone."""
        return self.phase in (_GPU, _KEEP_GPU)

    @property
    def settled(self) -> bool:
        return self.phase in (_KEEP_HOST, _KEEP_GPU)

    def replayed(self):
        """A replay of the present variant starts. Returns the variant whose plan is no longer wanted (True: the
        GPU-time one) once the choice is made, else None."""
        if self.settled:
            return None
        if self.phase == _HOST and self.last is None and not self.steps and not tuning.host_time_changes_a_choice():
            self.phase = _KEEP_HOST  # both variants would replay the same GEMMs: nothing to time
            return None
        now = _mark(self.device)
        if self.last is not None:
            self.steps.append((self.last, now))
        self.last = now
        if len(self.steps) < WARMUP + SAMPLES:
            return None
        gpu = self.gpu_only
        self.medians[gpu] = statistics.median(_seconds(*step) for step in self.steps[WARMUP:])
        self.steps, self.last = [], None
        if not gpu:
            self.phase = _GPU
            return None
        keep_gpu = self.medians[True] < self.medians[False]
        self.phase = _KEEP_GPU if keep_gpu else _KEEP_HOST
        return not keep_gpu

    def not_replayed(self):
        """A call of the signature that did not replay its plan (a first call, a recording, a plan made invalid):
        no step is timed across it. Returns True where the GPU-time variant is given up (then kept: the host one)."""
        self.last = None
        if self.phase != _GPU:
            return False
        self.unreplayed += 1
        if self.unreplayed <= NOT_REPLAYED_LIMIT:
            return False
        self.phase, self.steps = _KEEP_HOST, []
        return True

    def report(self) -> dict:
        """What the benchmark rows record: the variant kept (or the phase) and each timed variant's median step."""
        steps = {("gpu_time_ms" if v else "host_counted_ms"): round(t * 1e3, 3) for v, t in self.medians.items()}
        return {"kept": self.phase, **steps}

    def __repr__(self):
        if not self.medians:
            return self.phase
        times = ", ".join(f"{'GPU time' if v else 'host counted'} {ms * 1e3:.2f} ms" for v, ms in self.medians.items())
        return f"{self.phase} (a step: {times})"


def _timed_here(x) -> bool:
    """Whether a step on x's device can be timed for a choice: on a GPU (the interpreter runs one candidate)."""
    return x.is_cuda and not interpreting()


def lookup(model, signature, x):
    """The StepChoice of a training call's signature (made at its first call), or None where nothing is timed: not
    on a GPU, inside tuning.gpu_time_only()."""
    if tuning.in_gpu_time_only() or not _timed_here(x):
        return None
    table = _CHOICES.get(model)
    if table is None:
        table = _CHOICES[model] = {}
    choice = table.get(signature)
    if choice is None or choice.epoch != tuning.forgets():
        choice = table[signature] = StepChoice(x.device)
    latest = _LATEST.get(model)
    if latest is not choice:  # a step of another signature in between (an epoch's smaller last batch): not timed
        if latest is not None:
            latest.last = None
        _LATEST[model] = choice
    return choice


def forget(model) -> None:
    _CHOICES.pop(model, None)
    _LATEST.pop(model, None)


def settled(model) -> bool:
    """Whether every training signature of the model has its variant chosen (or none is timed)."""
    return all(c.settled for c in _CHOICES.get(model, {}).values())


def choices(model) -> dict:
    """{training signature: StepChoice} of the model, for plan.summary and the tests."""
    return dict(_CHOICES.get(model, {}))
