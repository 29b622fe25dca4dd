"""How a kernel's configuration is chosen and launched: the launch modes (autotuning on a GPU; the first surviving
configuration under the interpreter or with FASTVIT_AUTOTUNE=0), the Launcher that decides once per key, forget(),
and the choice between Triton and cuBLAS per GEMM. The candidates and their pruning are configs/'s.
"""

import os
import threading

import torch
import triton

from ._interpreter import interpreting
from .configs import GEMM_HOST_EXTRA_MS


# ------------------------------------------------------------------------------------------------------------------
# The launch modes
# ------------------------------------------------------------------------------------------------------------------
def tuning_on() -> bool:
    """Whether launches time their candidate configs: on a GPU, unless FASTVIT_AUTOTUNE=0. The interpreter runs each
    config at interpreter speed, so tuning there would only cost time; FASTVIT_AUTOTUNE=0 makes GPU test runs fast and
    deterministic in what they launch. Benchmarks keep tuning on."""
    return not interpreting() and autotune_allowed()


def autotune_allowed() -> bool:
    """FASTVIT_AUTOTUNE is not 0: what anything that would time candidates asks (configs, GEMM backends)."""
    return os.environ.get("FASTVIT_AUTOTUNE", "1") != "0"


_LAUNCHERS: list = []  # every Launcher, for forget()

# Counted for the step plans (fastvit_kernels/plan.py): the decisions (a configuration or GEMM backend chosen for a
# new key) and the forget()s. A plan recorded while a decision was made saw a first launch (autotuning, candidate
# timings), not the steady state; one recorded before a forget() would replay choices made under old switches.
# Decisions for other keys leave a plan as it is.
_decisions = _forgets = 0


def decisions() -> int:
    return _decisions


def forgets() -> int:
    return _forgets


def _decided() -> None:
    global _decisions
    _decisions += 1


# While a step plan is recorded: its recorder (fastvit_kernels/recording.py), told of every kernel launch; else None.
recorder = None


def launch_kernel(kernel, grid, args, consts):
    """kernel[grid](*args, **consts): every launch of ours goes through here or Launcher.launch, so that a plan's
    recorder sees it."""
    if recorder is not None:
        return recorder.launch(kernel, grid, args, consts)
    kernel[grid](*args, **consts)


class Launcher:
    """The launches of one kernel. Its configuration for a key is chosen at the key's first launch: timed by Triton's
    autotuner on a GPU (tuning_on), else the first config the prune function keeps. Every later launch with the key
    goes straight to the kernel with that configuration.

    Why not Triton's autotuner on every call: it rebuilds its key from all the arguments on each launch (a dict of
    them, str() of every tensor's dtype), host time spent again on every one of a step's ~60-400 launches. Here the
    caller passes a key it has at hand. That key must hold everything the prune function and the choice depend on
    (shapes, dtypes, feature flags, the device): configurations are chosen per key, never re-checked. `grid` takes the
    configuration's keyword arguments (BLOCK_M, ...) and nothing else."""

    def __init__(self, kernel, configs, tuner_key, prune=None):
        self.kernel, self.configs, self.prune = kernel, configs, prune
        self.tuner_key = tuner_key  # the argument names Triton's autotuner keys its timings on (first launches only)
        self.chosen = {}  # key -> (config, the keyword arguments its launches take)
        self.best_config = None  # the configuration of the latest launch (the benchmark rows record it)
        self.last_key = None  # the key of the latest launch
        self.timings = {}  # key -> {config: GPU ms} where Triton's autotuner timed the candidates (or its disk cache)
        self._tuners = {}  # the candidates the prune kept (their ids) -> the Triton autotuner that times them
        _LAUNCHERS.append(self)

    def launch(self, key, grid, *args, **consts):
        chosen = self.chosen.get(key)
        if chosen is None:
            return self._first_launch(key, grid, args, consts)
        self.best_config, opts = chosen
        self.last_key = key
        if recorder is not None:
            return recorder.launch(self.kernel, grid(opts), args, {**consts, **opts})
        self.kernel[grid(opts)](*args, **consts, **opts)

    def _first_launch(self, key, grid, args, consts):
        configs = self.configs
        if self.prune is not None:
            configs = self.prune(configs, {**dict(zip(self.kernel.arg_names, args)), **consts})
        if tuning_on():
            # One Triton autotuner per list of candidates: it keeps its timings per tuner key for the life of the
            # process, so a switch that changes what the prune keeps (FASTVIT_ATTN_WHOLE, FASTVIT_TMA) gets a tuner
            # of its own instead of the choice timed without it.
            tuner = self._tuners.get(tuple(map(id, configs)))
            if tuner is None:
                tuner = triton.autotune(configs=configs, key=self.tuner_key)(self.kernel)
                self._tuners[tuple(map(id, configs))] = tuner
            before = getattr(tuner, "configs_timings", None)
            tuner[grid](*args, **consts)  # times the configs (once per tuner key), then launches the best
            self._remember(key, tuner.best_config)
            self.timings[key] = _tuner_ms(tuner, before)
            return
        opts = self._remember(key, configs[0])
        launch_kernel(self.kernel, grid(opts), args, {**consts, **opts})

    def _remember(self, key, cfg):
        # launch options (warps, stages, register cap) only on a GPU: the interpreter takes none
        opts = cfg.kwargs if interpreting() else cfg.all_kwargs()
        self.chosen[key] = (cfg, opts)
        self.best_config, self.last_key = cfg, key
        _decided()
        return opts


def _tuner_ms(tuner, before=None) -> dict:
    """{config: median GPU ms} of the candidates Triton's autotuner timed in the launch just made (its
    `configs_timings`: [median, p20, p80] per config, or a number; `before` is that attribute before the launch);
    empty where it timed nothing (one candidate), or nothing now: for a tuner key timed earlier in the process it
    leaves the timings of its last key in place, whose fastest may be the same config."""
    timed = getattr(tuner, "configs_timings", None)
    if timed is None or timed is before:
        return {}
    timings = {cfg: (t[0] if isinstance(t, (list, tuple)) else t) for cfg, t in timed.items()}
    if not timings or str(min(timings, key=timings.get)) != str(tuner.best_config):
        return {}
    return timings


def forget() -> None:
    """Forget every per-key decision (configurations, GEMM backends): the environment switches (FASTVIT_GEMM,
    FASTVIT_AUTOTUNE, FASTVIT_TMA, FASTVIT_WARP_SPEC, FASTVIT_FLATTEN, FASTVIT_EPI_TMA, FASTVIT_ATTN_WHOLE,
    FASTVIT_ROW_PIPELINE) are read when a key is first launched, so a process that changes one mid-run calls this after
    it. Triton's timings are kept (each list of candidates a switch leaves has its own autotuner, which times a tuner key once). Step plans
    recorded before it are not replayed."""
    global _forgets
    for launcher in _LAUNCHERS:
        launcher.chosen.clear()
        launcher.timings.clear()
    _GEMM_CHOICE.clear()
    _GEMM_HOST_CHOICE.clear()
    _GEMM_TIMES.clear()
    _forgets += 1


# Triton or cuBLAS, per GEMM (ops/gemm.py): each GEMM of the linear layers has a second candidate, torch's matmul
# (cuBLAS) with the epilogue as torch ops or our row kernel, and the GEMM with the next LayerNorm a second of ours
# ("triton+ln": ops/gemm.py). On a GPU each candidate's GPU time is measured once per shape and the choice kept;
# FASTVIT_GEMM=triton or =cublas keeps one family (the benchmarks' rows for the Triton path force triton, since the
# fast-path goals are for our kernels). Elsewhere (the interpreter) the first, "triton", which the tests check.
#
# Two choices per shape from the same times. Inference, and any step replayed as a CUDA graph, costs its GPU time: the
# fastest. A training step issued from Python costs its host time too, and at CIFAR-10's shapes on an H200 its host
# time exceeded its GPU time (RESULTS.md, session 23): there a candidate costs its GPU time plus the host time it
# adds (configs.GEMM_HOST_EXTRA_MS), so that our one launch wins over a cuBLAS call a few us faster on the GPU.
GEMM_BACKENDS = ("triton", "cublas")
_GEMM_CHOICE: dict = {}  # key -> the backend that runs it where GPU time alone counts
_GEMM_HOST_CHOICE: dict = {}  # key -> the backend that runs it in a training step (host time counted)
_GEMM_TIMES: dict = {}  # key -> {candidate: GPU ms} where the choice was timed (the benchmark rows record them)
# How deep this thread is in a training step's ops (their autograd forward and backward, each on the thread that
# runs it: ops/_common.register_autograd), and the process in a step whose GPU time alone counts (gpu_time_only:
# process-wide, since a graph's warm-up runs its backward on autograd's thread for the device).
_thread = threading.local()
_gpu_only = 0


class _TrainingStep:
    __slots__ = ()

    def __enter__(self):
        _thread.training = getattr(_thread, "training", 0) + 1

    def __exit__(self, *exc):
        _thread.training -= 1


class _GpuTimeOnly:
    __slots__ = ()

    def __enter__(self):
        global _gpu_only
        _gpu_only += 1

    def __exit__(self, *exc):
        global _gpu_only
        _gpu_only -= 1


_TRAINING_STEP, _GPU_TIME_ONLY = _TrainingStep(), _GpuTimeOnly()  # counts: the contexts nest


def training_step():
    """Context of the ops' forward with a gradient to record and of their backward: a GEMM chosen inside counts the
    host time its candidates add, unless inside gpu_time_only()."""
    return _TRAINING_STEP


def gpu_time_only():
    """Context where a step's GPU time alone counts, training or not: a CUDA graph's warm-up and capture (a replay
    costs no host time per kernel: cuda_graphs.py), the per-kernel benchmark rows (they time the GPU)."""
    return _GPU_TIME_ONLY


def in_gpu_time_only() -> bool:
    return _gpu_only > 0


def host_counts() -> bool:
    """Whether a GEMM chosen now counts the host time of its candidates (a training step, not in gpu_time_only())."""
    return _gpu_only == 0 and getattr(_thread, "training", 0) > 0


def gemm_backend_mode() -> str:
    mode = os.environ.get("FASTVIT_GEMM", "auto")
    if mode not in ("auto", *GEMM_BACKENDS):
        raise ValueError(f"FASTVIT_GEMM={mode!r}: expected auto, {' or '.join(GEMM_BACKENDS)}")
    return mode


def pick_gemm_backend(key, candidates: dict, timed: bool) -> str:
    """The backend that runs the GEMM `key`, decided at the key's first GEMM in its context (host_counts) and kept
    (forget() starts over): the cheapest of the candidates (of FASTVIT_GEMM's family when it names one) by their GPU
    times, measured once per key where timing means something (timed: a CUDA device) and not inside a CUDA graph
    capture, plus in a training step the host time each adds; else the first, Triton. FASTVIT_AUTOTUNE=0 (the GPU
    tests) also means the first: those runs are there to check our kernels."""
    host = host_counts()
    chosen = _GEMM_HOST_CHOICE if host else _GEMM_CHOICE
    choice = chosen.get(key)
    if choice is None:
        times = _GEMM_TIMES.get(key)
        if times is None:
            choice, times = _choose_gemm_backend(candidates, timed)
            if choice is None:  # inside a capture: Triton, undecided
                return "triton"
            if times:
                _GEMM_TIMES[key] = times
        if times:
            choice = _cheapest(times, host)
        chosen[key] = choice
        _decided()
    return choice


def _cheapest(times: dict, host: bool) -> str:
    """The candidate of least GPU time, with host: plus the host time it adds."""
    return min(times, key=lambda name: times[name] + (GEMM_HOST_EXTRA_MS.get(name, 0.0) if host else 0.0))


def host_time_changes_a_choice() -> bool:
    """Whether counting host time chooses another candidate than GPU time alone for some GEMM shape timed so far
    (step_choice.py: else a training step has one variant, and nothing to time)."""
    return any(_cheapest(times, True) != _cheapest(times, False) for times in _GEMM_TIMES.values())


def _choose_gemm_backend(candidates, timed):
    """(the candidate chosen, {candidate: GPU ms} where they were timed, else empty); (None, {}) inside a capture."""
    mode = gemm_backend_mode()
    if mode != "auto":  # that family's candidates only
        candidates = {name: fn for name, fn in candidates.items() if backend_family(name) == mode}
    if len(candidates) == 1 or not timed or not autotune_allowed():
        return next(iter(candidates)), {}
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return None, {}
    times = _gpu_times(candidates)
    return _cheapest(times, host=False), times


def backend_family(name: str) -> str:
    """triton or cublas: our second candidates ("triton+ln": ops/gemm.py) are ours."""
    return name.split("+")[0]


# Rounds of the GEMM chooser's timing: each candidate's GPU time is the least of this many, the candidates timed in
# turn. One round each, the H200's training row timed cuBLAS + our GELU' pass at 0.36 ms a call where the profile's
# process, same commit and card, ran that candidate (2026-11-28): a round that something slows decides a shape's
# backend for the life of the process, and interleaving keeps a slow spell from falling on one candidate's rounds.
CHOICE_ROUNDS = 3


def _gpu_times(candidates) -> dict:
    """{name: GPU ms of one call}: each candidate called once untimed (Triton autotunes, cuBLAS settles its
    heuristics), then CHOICE_ROUNDS rounds of gpu_ms of each in turn; the least of a candidate's rounds (interference
    only ever adds time)."""
    for fn in candidates.values():
        fn()
    rounds = {name: [] for name in candidates}
    for _ in range(CHOICE_ROUNDS):
        for name, fn in candidates.items():
            rounds[name].append(gpu_ms(fn, calls=5, spin_cycles=2_000_000))
    return {name: min(ms) for name, ms in rounds.items()}


def gpu_ms(fn, calls=10, spin_cycles=200_000_000):
    """GPU time of one call of fn: `calls` calls issued behind a spin kernel (spin_cycles clock cycles: 2e8 is ~0.1 s)
    so that they are all queued before the first starts and the GPU never waits on the host, with events around
    them, divided by `calls`. Kernel time, not the Python that launches it. (The benchmarks' per-kernel rows and the
    GEMM chooser both time this way.)"""
    torch.cuda.synchronize()
    torch.cuda._sleep(spin_cycles)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def known_gemm_backend(key):
    """The backend decided for `key` in the present context, or None: the engine's per-call lookup."""
    return (_GEMM_HOST_CHOICE if host_counts() else _GEMM_CHOICE).get(key)


def gemm_choices(training: bool = False) -> dict:
    """{key: backend} of the GEMMs decided so far where GPU time alone counts, or with training those decided in
    training steps: what the benchmark rows record as having run."""
    return dict(_GEMM_HOST_CHOICE if training else _GEMM_CHOICE)


def gemm_times() -> dict:
    """{key: {candidate: GPU ms}} of the GEMMs whose choice was timed: every candidate, measured side by side."""
    return {key: dict(times) for key, times in _GEMM_TIMES.items()}
