"""Timing and bookkeeping shared by the benchmark files."""

import functools
import gc
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from fastvit_kernels.tuning import gpu_ms  # the per-kernel rows time as the GEMM chooser does

ROWS: list[dict] = []  # every measured row of this session, turned into the summary at the end
_PEAK: dict = {}


def env_info():
    import triton

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return dict(
        card=card,
        torch=torch.__version__,
        triton=triton.__version__,
        date=time.strftime("%Y-%m-%d"),
        python=platform.python_version(),
        commit=_commit(),
        **_switches(),
    )


_BOOKKEEPING = {"FASTVIT_COMMIT", "FASTVIT_BENCH_ROWS", "FASTVIT_BENCH_OUT"}


def _switches() -> dict:
    """The FASTVIT_* switches set when the row was measured (a row's own, or a fallback the GPU check chose), as
    `switches`: a row measured with FASTVIT_PLAN=0 or FASTVIT_TMA=0 says so."""
    on = {k: v for k, v in sorted(os.environ.items()) if k.startswith("FASTVIT_") and k not in _BOOKKEEPING}
    return {"switches": " ".join(f"{k.removeprefix('FASTVIT_')}={v}" for k, v in on.items())} if on else {}


@functools.lru_cache(maxsize=1)  # one git call per run, not per row
def _commit() -> str:
    """The commit measured: FASTVIT_COMMIT (set it where the tree travels without .git, as to a lent GPU), else git's
    HEAD, with '+dirty' when the tree has uncommitted changes."""
    if os.environ.get("FASTVIT_COMMIT"):
        return os.environ["FASTVIT_COMMIT"]
    root = Path(__file__).parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def matmul_peak_tflops(dtype):
    """The card's measured dense matmul rate (8192^3 through cuBLAS, median of 10): the MFU denominator."""
    if not torch.cuda.is_available():
        return None
    if dtype not in _PEAK:
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(10):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        _PEAK[dtype] = 2 * n**3 / sorted(times)[len(times) // 2] / 1e12
    return _PEAK[dtype]


def host_ms(fn, reps=3):
    """Host time to issue one call of fn while the GPU is kept busy (a ~0.1 s spin kernel queued first), so the host
    never waits on the GPU: the launch overhead a CUDA graph removes. Median of reps, in ms. A call that
    synchronises shows up as ~100 ms."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # clock cycles: ~0.1 s at ~2 GHz
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        torch.cuda.synchronize()
    return 1e3 * sorted(times)[len(times) // 2]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(
    benchmark,
    fn,
    *,
    device,
    opts,
    group,
    row,
    items=None,
    item_name="img",
    flops=None,
    peak_dtype=None,
    warmup=None,
    describe=None,
    host=False,
    kernel_time=False,
):
    """Time fn() (one call = one step) and record a row: median ms, items/s, TFLOP/s, MFU, peak memory, and with
    host=True the host's share (host_ms: the time to issue one step while the GPU is busy).

    A round is one call and a synchronisation, timed on the host: what a user waits for, host time included. With
    kernel_time=True (the per-kernel rows, on a GPU) a round is gpu_ms(): the GPU time of one call with the host kept
    ahead, and host_ms is recorded beside it.

    describe() (optional) is called after the timing and its dict joins the row: what an autotuner chose, say.
    A per-kernel row's GEMMs are chosen by their GPU time, which it measures, even in a backward (tuning.py: a
    training step's choices count host time too; the e2e rows run as a user's step does)."""
    if kernel_time:
        fn = _gpu_time_only(fn)

    def timed():
        fn()
        sync(device)

    for _ in range(opts["warmup"] if warmup is None else warmup):
        timed()  # compile, autotune, cudnn/cublas heuristics: all before the clock starts
    if device.type == "cuda":
        gc.collect()  # an earlier row's model, optimizer and plans, kept by reference cycles, are not this row's peak
        torch.cuda.reset_peak_memory_stats()
    benchmark.group = group
    gpu_rounds = []
    if kernel_time and device.type == "cuda":
        host = True
        benchmark.pedantic(lambda: gpu_rounds.append(gpu_ms(fn)), rounds=opts["rounds"], iterations=1, warmup_rounds=1)
        gpu_rounds = sorted(gpu_rounds[1:])  # the first is the warm-up round
        median_s = gpu_rounds[len(gpu_rounds) // 2] / 1e3
    else:
        benchmark.pedantic(timed, rounds=opts["rounds"], iterations=1, warmup_rounds=1)
        median_s = benchmark.stats.stats.median
    info = dict(group=group, row=row, median_ms=median_s * 1e3, **env_info())
    if gpu_rounds:
        info["timing"] = "gpu"  # GPU time per call; rows without this key are host-timed calls (call + sync)
    if items:
        info[f"{item_name}_per_s"] = items / median_s
        info["items_per_s"] = items / median_s
        info["item_name"] = item_name
    if flops:
        info["tflops"] = flops / median_s / 1e12
        peak = matmul_peak_tflops(peak_dtype) if peak_dtype is not None else None
        if peak:
            info["mfu"] = info["tflops"] / peak
            info["peak_tflops_measured"] = peak
    if device.type == "cuda":
        info["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if host and device.type == "cuda":
        info["host_ms"] = host_ms(fn)
    if describe is not None:
        info.update(describe())
    benchmark.extra_info.update(info)
    ROWS.append(benchmark.extra_info)  # the same dict pytest-benchmark saves at the end of the session
    from summary import add_speedups

    add_speedups(ROWS)  # every row of the group so far gets speedup_vs_<eager row>; later rows update earlier ones
    stream = os.environ.get("FASTVIT_BENCH_ROWS")
    if stream:  # one JSON line per row as it is measured: a run cut short by a time limit keeps what it measured
        with open(stream, "a") as f:
            f.write(json.dumps(info) + "\n")
    return info


def _config_name(cfg):
    """A config as the rows name it, e.g. "64x64 w4 s3 tail16"."""
    k = cfg.kwargs
    flags = " tma" if k.get("USE_TMA") else ""
    flags += " warpspec" if k.get("WARP_SPEC") else ""
    flags += " flat" if k.get("FLATTEN") else ""
    flags += " epitma" if k.get("EPI_TMA") else ""  # the epilogue through tensor descriptors: the same tile otherwise
    flags += f" behind{k['GELU_BEHIND']}" if k.get("GELU_BEHIND") else ""  # GELU one tile behind: chunks a K step
    flags += " whole" if k.get("WHOLE") else ""  # attention: a (batch, head) pair per tile
    flags += f" tail{k['TAIL']}" if k.get("TAIL") else ""
    flags += f" rows{k['ROW_TAIL']}" if k.get("ROW_TAIL") else ""  # attention: a pair's last rows in its last block
    flags += f" loads{k['LOAD_STAGES']}" if "LOAD_STAGES" in k else ""  # the LayerNorm backward's pipelined loads
    flags += f" maxnreg{cfg.maxnreg}" if getattr(cfg, "maxnreg", None) else ""  # registers capped: the same tile else
    tile = "x".join(str(k[n]) for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if n in k)
    return f"{tile} w{cfg.num_warps} s{cfg.num_stages}{flags}"


def chosen_configs(**launchers):
    """A describe() for measure(): the config each autotuned launcher picked, as `config` in the row, read after
    the timing (e.g. "fwd 64x64 w4 s3"): the tuner's choice, or the first config where launches do not tune; and
    `tuned_ms`, the autotuner's time of every candidate it timed for that launch's key ("fwd 64x64 w4 s3": ms)."""

    def describe():
        parts, tuned = [], {}
        for name, launcher in launchers.items():
            cfg = getattr(launcher, "best_config", None)
            if cfg is not None:
                parts.append(f"{name} {_config_name(cfg)}")
                times = launcher.timings.get(launcher.last_key, {})
                tuned.update({f"{name} {_config_name(c)}": round(ms, 5) for c, ms in times.items()})
        return ({"config": ", ".join(parts)} if parts else {}) | ({"tuned_ms": tuned} if tuned else {})

    return describe


def settle_training_step(step, model, device, limit=40):
    """step() and a synchronisation, as a measured round runs them, until the model's training steps have their
    GEMM variant chosen (fastvit_kernels/step_choice.py times the first ~25 replays both ways; at most `limit`
    steps): the rows and profiles measure the step a user runs after that. Where it is not chosen by then (the plan
    never replays), the row measures what runs, and its `plan` says why."""
    from fastvit_kernels import step_choice

    for _ in range(limit):
        step()
        sync(device)
        if step_choice.settled(model):
            return


def _gpu_time_only(fn):
    from fastvit_kernels import tuning

    def call():
        with tuning.gpu_time_only():
            return fn()

    return call


def gemm_backends(training=None):
    """A describe() for the rows that run the model: which GEMM candidate ran for each shape (tuning.pick_gemm_backend:
    Triton or cuBLAS, measured per shape on a GPU), as `gemm` in the row and in its table label when cuBLAS ran any,
    and the candidates' times where they were measured (`gemm_ms`). training: the model of a training step issued
    from Python, whose GEMMs ran as chosen with their host time counted (tuning.py) unless the step ran faster with
    them chosen by GPU time alone (step_choice.py); else None: by GPU time alone (inference, CUDA graphs,
    torch.compile's ops, the per-kernel rows)."""

    def describe():
        from fastvit_kernels import step_choice
        from fastvit_kernels.tuning import gemm_choices

        host = training is not None and not any(c.gpu_only for c in step_choice.choices(training).values())
        choices = gemm_choices(training=host)
        cublas = sorted(f"{k[0]} {k[2]}x{k[3]}" for k, v in choices.items() if v == "cublas")
        info = {"gemm": {" ".join(map(str, k[:-1])): v for k, v in choices.items()}, **gemm_candidate_ms()}
        if host:
            info["gemm_chosen_for"] = "a training step's GPU and host time"
        elif training is not None:
            info["gemm_chosen_for"] = "GPU time: the training step ran faster so (step_choice.py)"
        if cublas:
            info["config"] = f"cuBLAS ran {len(cublas)} of {len(choices)} GEMM shapes"
        return info

    return describe


def gemm_candidate_ms():
    """{"gemm_ms": {GEMM key: {candidate: GPU ms}}} for the GEMMs whose backend was chosen by timing (the chooser's
    own side-by-side measurement: tuning.gemm_times), or nothing where none was."""
    from fastvit_kernels.tuning import gemm_times

    times = {" ".join(map(str, k[:-1])): {n: round(ms, 4) for n, ms in t.items()} for k, t in gemm_times().items()}
    return {"gemm_ms": times} if times else {}


def need_cuda(device, what="this row"):
    import pytest

    if device.type != "cuda":
        pytest.skip(f"{what} needs a CUDA GPU (the Triton interpreter is for correctness, not speed)")
