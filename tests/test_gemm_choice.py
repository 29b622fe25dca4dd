"""The choice between our GEMM and cuBLAS's per shape (tuning.pick_gemm_backend): timed once per shape, kept, within
FASTVIT_GEMM's family; two choices from the same times, by GPU time alone and in a training step with the host time
each candidate adds; the contexts that decide which, per thread and per process."""

import contextlib
import threading
import types

import pytest
import torch
import triton

from fastvit_kernels import configs, ops, tuning
from fastvit_kernels.ops import gemm as lin


def test_the_faster_candidate_is_measured_once_per_shape_and_kept(monkeypatch):
    # on a GPU (timed=True) the chooser times each candidate once per key and keeps the faster; FASTVIT_GEMM wins, read
    # when a key is first seen
    monkeypatch.delenv("FASTVIT_GEMM", raising=False)
    monkeypatch.delenv("FASTVIT_AUTOTUNE", raising=False)
    monkeypatch.setattr(tuning, "_GEMM_CHOICE", {})
    cost = {"triton": 2.0, "cublas": 1.0}
    timed = []
    monkeypatch.setattr(
        tuning, "_gpu_times", lambda cands: {n: timed.append(fn()) or cost[fn()] for n, fn in cands.items()}
    )
    candidates = {name: (lambda name=name: name) for name in cost}
    assert tuning.pick_gemm_backend("k1", candidates, timed=True) == "cublas"
    assert tuning.pick_gemm_backend("k1", candidates, timed=True) == "cublas" and len(timed) == 2  # kept
    assert tuning.gemm_choices() == {"k1": "cublas"}
    assert tuning.pick_gemm_backend("k2", candidates, timed=False) == "triton"  # the interpreter: our kernels
    monkeypatch.setenv("FASTVIT_AUTOTUNE", "0")  # the GPU tests: our kernels, nothing timed
    assert tuning.pick_gemm_backend("k3", candidates, timed=True) == "triton" and len(timed) == 2
    monkeypatch.delenv("FASTVIT_AUTOTUNE")
    monkeypatch.setenv("FASTVIT_GEMM", "triton")
    assert tuning.pick_gemm_backend("k1", candidates, timed=True) == "cublas"  # decided: the switch is read once
    tuning.forget()
    assert tuning.pick_gemm_backend("k1", candidates, timed=True) == "triton" and len(timed) == 2
    assert tuning.gemm_choices() == {"k1": "triton"}  # what the rows record: forced choices too
    monkeypatch.setenv("FASTVIT_GEMM", "cuda")
    tuning.forget()
    with pytest.raises(ValueError, match="FASTVIT_GEMM"):
        tuning.pick_gemm_backend("k1", candidates, timed=True)


def test_a_backend_family_is_timed_among_its_own_candidates(monkeypatch):
    # the full-row GEMM with the LayerNorm has two candidates of ours: FASTVIT_GEMM=triton (the benchmarks' `ours`)
    # times those two and never cuBLAS; =cublas takes cuBLAS's untimed; untimed, the first (the full-row kernel)
    monkeypatch.delenv("FASTVIT_AUTOTUNE", raising=False)
    cost = {"triton": 3.0, "triton+ln": 2.0, "cublas": 1.0}
    timed = []
    monkeypatch.setattr(
        tuning, "_gpu_times", lambda cands: {n: timed.append(fn()) or cost[fn()] for n, fn in cands.items()}
    )
    candidates = {name: (lambda name=name: name) for name in cost}
    cases = (
        ("auto", "cublas", ["triton", "triton+ln", "cublas"]),
        ("triton", "triton+ln", ["triton", "triton+ln"]),
        ("cublas", "cublas", []),  # one candidate left: nothing to time
    )
    for mode, expect, timings in cases:
        monkeypatch.setenv("FASTVIT_GEMM", mode)
        tuning.forget()
        timed.clear()
        assert tuning.pick_gemm_backend("k", candidates, timed=True) == expect
        assert timed == timings
        assert tuning.gemm_times() == ({"k": {name: cost[name] for name in timings}} if timings else {})
        tuning.forget()
        assert tuning.pick_gemm_backend("k", candidates, timed=False) == ("cublas" if mode == "cublas" else "triton")


def test_the_candidates_are_timed_in_turn_and_their_least_round_counts(monkeypatch):
    # each candidate called once untimed (the autotuning call), then rounds of all of them in turn; a candidate's time
    # is its least round, so that one slow round (a slow spell of the GPU or the host) does not decide the backend
    calls, queued = [], []
    rounds = {"triton": iter([0.30, 0.20, 0.25]), "cublas": iter([0.15, 0.40, 0.16])}

    def gpu_ms(fn, calls=10, spin_cycles=0):
        name = fn()
        queued.append(name)
        return next(rounds[name])

    monkeypatch.setattr(tuning, "gpu_ms", gpu_ms)
    candidates = {name: (lambda name=name: calls.append(name) or name) for name in rounds}
    assert tuning._gpu_times(candidates) == {"triton": 0.20, "cublas": 0.15}
    assert queued == ["triton", "cublas"] * tuning.CHOICE_ROUNDS
    assert calls[:2] == ["triton", "cublas"]  # the untimed first calls, before any round


def test_the_autotuners_times_are_kept_only_for_the_key_it_chose_for():
    # Triton's autotuner keeps the timings of its last tuning ([median, p20, p80] per config); a launcher records them
    # for its key, unless they belong to another tuner key: the tuner timed nothing in this launch (the key was in its
    # cache), or the fastest there is not the config chosen now
    fast, slow = triton.Config({"BLOCK_M": 64}), triton.Config({"BLOCK_M": 32})
    timed = {fast: [0.5, 0.4, 0.6], slow: [0.9, 0.8, 1.0]}
    tuner = types.SimpleNamespace(configs_timings=timed, best_config=fast)
    assert tuning._tuner_ms(tuner, before=None) == {fast: 0.5, slow: 0.9}
    assert tuning._tuner_ms(tuner, before=timed) == {}  # the same object as before the launch: not timed now
    tuner.best_config = slow
    assert tuning._tuner_ms(tuner) == {}
    assert tuning._tuner_ms(types.SimpleNamespace(best_config=fast)) == {}  # one candidate: nothing timed


def test_a_training_step_counts_the_host_time_a_candidate_adds(monkeypatch):
    # the same GPU times, measured once per key, decide twice: by GPU time alone (inference, CUDA graphs, the
    # per-kernel rows) and in a training step with each candidate's host time added (configs.GEMM_HOST_EXTRA_MS):
    # there our one launch wins over a cuBLAS call less than that much faster, and over our own two-launch candidate
    monkeypatch.delenv("FASTVIT_GEMM", raising=False)
    monkeypatch.delenv("FASTVIT_AUTOTUNE", raising=False)
    tuning.forget()
    extra = configs.GEMM_HOST_EXTRA_MS
    cost = {"triton": 1.0, "triton+ln": 1.0 - extra["triton+ln"] / 2, "cublas": 1.0 - extra["cublas"] / 2}
    timed = []
    monkeypatch.setattr(
        tuning, "_gpu_times", lambda cands: {n: timed.append(fn()) or cost[fn()] for n, fn in cands.items()}
    )
    candidates = {name: (lambda name=name: name) for name in cost}
    assert not tuning.host_counts()
    assert tuning.pick_gemm_backend("k", candidates, timed=True) == "cublas"
    with tuning.training_step():
        assert tuning.host_counts() and tuning.known_gemm_backend("k") is None  # not decided in this context yet
        assert tuning.pick_gemm_backend("k", candidates, timed=True) == "triton"
        assert tuning.known_gemm_backend("k") == "triton"
        with tuning.gpu_time_only():  # a CUDA graph's warm-up inside a training loop: GPU time alone
            assert not tuning.host_counts() and tuning.known_gemm_backend("k") == "cublas"
    assert len(timed) == 3  # each candidate timed once for both choices
    assert tuning.gemm_choices() == {"k": "cublas"} and tuning.gemm_choices(training=True) == {"k": "triton"}
    cost["cublas"] = 1.0 - 2 * extra["cublas"]  # faster by more than its host time: cuBLAS in training too
    tuning.forget()
    with tuning.training_step():
        assert tuning.pick_gemm_backend("k", candidates, timed=True) == "cublas"
    with tuning.training_step():  # untimed (the interpreter): the first, whatever the context
        assert tuning.pick_gemm_backend("k2", candidates, timed=False) == "triton"
    tuning.forget()
    assert tuning.gemm_choices(training=True) == {} and tuning.gemm_times() == {}


@pytest.mark.parametrize("grad", [False, True])
def test_the_ops_choose_gemms_in_a_training_step_only_with_a_gradient(grad, device, monkeypatch):
    # the forward of a linear with a gradient to record and its backward choose with host time counted; a forward
    # without one, or inside gpu_time_only (cuda_graph_step's warm-up and capture), by GPU time alone
    seen = []

    def pick(key, candidates, timed):
        seen.append((key[0], tuning.host_counts()))
        return "triton"

    monkeypatch.setattr(lin, "pick_gemm_backend", pick)
    monkeypatch.setattr(lin, "known_gemm_backend", lambda key: None)  # every call asks
    x = torch.randn(5, 32, device=device, requires_grad=grad)
    layer = torch.nn.Linear(32, 16, device=device)
    for gpu_only in (False, True):
        seen.clear()
        with tuning.gpu_time_only() if gpu_only else contextlib.nullcontext(), torch.set_grad_enabled(grad):
            y = ops.linear(x, layer.weight, layer.bias)
            if grad:
                y.sum().backward()
        assert seen and {key for key, _ in seen} >= ({"linear", "weight_grad"} if grad else {"linear"})
        assert all(host == (grad and not gpu_only) for _, host in seen), seen
    assert not tuning.host_counts()


def test_a_training_step_is_its_threads_and_gpu_time_only_the_process(monkeypatch):
    # a training step's ops run on the thread that calls them (DataParallel's replicas, one each) and its backward on
    # autograd's thread for the device, which sets its own context; a CUDA graph's warm-up (gpu_time_only) must reach
    # that backward thread too
    seen = {}

    def other(name):
        seen[name] = tuning.host_counts(), tuning.in_gpu_time_only()

    with tuning.training_step():
        worker = threading.Thread(target=other, args=("in a step",))
        worker.start()
        worker.join()
        assert tuning.host_counts()
    with tuning.gpu_time_only():
        worker = threading.Thread(target=other, args=("gpu only",))
        worker.start()
        worker.join()
    assert seen == {"in a step": (False, False), "gpu only": (False, True)}
    assert not tuning.host_counts() and not tuning.in_gpu_time_only()


def test_host_time_changes_a_choice_reads_the_timed_candidates(monkeypatch):
    extra = tuning.GEMM_HOST_EXTRA_MS["cublas"]
    monkeypatch.setattr(tuning, "_GEMM_TIMES", {"k": {"triton": 0.10, "cublas": 0.10 + 2 * extra}})
    assert not tuning.host_time_changes_a_choice()  # ours is faster either way
    monkeypatch.setattr(tuning, "_GEMM_TIMES", {"k": {"triton": 0.10, "cublas": 0.10 - extra / 2}})
    assert tuning.host_time_changes_a_choice()  # cuBLAS by GPU time, ours with cuBLAS's host time counted
    monkeypatch.setattr(tuning, "_GEMM_TIMES", {})
    assert not tuning.host_time_changes_a_choice()
