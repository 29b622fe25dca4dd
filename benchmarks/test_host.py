"""Host time to issue one vit_cifar10 step, without a GPU: what a step costs the CPU before any kernel runs.

Every kernel launch is a no-op here: the kernel each tuning.Launcher would launch is swapped for a recorder
(tests/launches.py), so the Launchers' own path (the configuration per key, the grid) is timed and Triton's is not;
the cuBLAS calls of our backward (dx = dy @ W, torch.matmul) return an empty tensor of the right shape, and the step
plans' batched casts (torch._foreach_copy_, ops/cast.py) copy nothing. The tensors
are CPU tensors, batch 1, bf16 weights: torch's ops around our kernels (allocations, casts, autograd) are dispatched
as on a GPU and compute next to nothing. What is timed: our Python (checks, the custom-op bypass, autograd, the
launchers' argument lists) and torch's dispatch, per step. Not timed: Triton's own launcher (JITFunction.run: argument
binding and specialisation) and the CUDA driver (the e2e rows' `host_ms` on a GPU has them all). Rows measured
before commit 44f8e85 swapped whole launchers and so timed less of ours (NOTES.md, session 5). Without autocast (bf16
weights), the casts of fp32 weights that autocast adds (one per linear per step, on a GPU) are not in these numbers.
glibc is told to keep the blocks a step frees (_keep_freed_memory), as the CUDA caching allocator does: rows before
2026-11-28 (session 17) also timed glibc giving freed gradient-sized blocks back to the OS, ~2 ms of a training step.

(The meta device was the first choice and is wrong for this: torch runs many meta shape functions in Python, 0.65 ms
for one F.linear and 0.1 ms for a sum on this box, so the figure measured meta, not us.)

Rows (backend='triton'): `ours` in `host/cifar10/infer` and `host/cifar10/train` (the optimizer's zero_grad,
forward, backward; no optimizer step), replayed from the model's step plans (fastvit_kernels/plan.py), `ours-fresh`
the same with FASTVIT_ARENA=0 (each temporary allocated afresh, not taken from the arena: fastvit_kernels/arena.py),
and `ours-unplanned` in both, FASTVIT_PLAN=0: the model's forward (and backward) on every call. All rows launch the
same kernels (counted in the rows).

`host/cifar10+triton-run/{infer,train}`: the same steps with Triton's own JITFunction.run in every launch (argument
binding and specialisation, the cache key, launch metadata: ~13-20 us a launch on the CPU box), only the compiled
kernel's launcher a no-op (tests/offline_triton.py); rows `ours` (plans with direct launches, which skip run),
`ours-indirect` (FASTVIT_PLAN=triton: plans launching through run) and `ours-unplanned`. Nearer a GPU's host time
than the groups above, less the launcher's C code and the CUDA driver. Rows before 2026-11-27 timed nn.Module.zero_grad (0.22 ms of the training step:
it walks the modules; an optimizer's walks its list) and let the launch recorder's list grow during the timing.
The issue's goals on the 2-core CPU box: 1.0 ms and 3 ms.

`host/launch/layernorm_bwd` (rows `triton`, `direct`): the host time of one kernel launch through Triton's own
JITFunction.run against a step plan's direct launch of it (fastvit_kernels/direct_launch.py), the launcher itself a
no-op: what the plans' direct launches save per launch, the part of a GPU step's host time the step rows above do not
time.
"""

import ctypes
import ctypes.util
import sys
from pathlib import Path

import pytest
import torch
from common import measure

from fastvit_kernels import plan, vit_cifar10
from fastvit_kernels.kernels.layernorm import layernorm_bwd_kernel
from fastvit_kernels.ops import _common

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from launches import record_launches  # noqa: E402
from offline_triton import (  # noqa: E402
    LN_BWD_CONSTS,
    ln_bwd_args,
    offline_kernel,
    offline_kernels,
    record_launch,
    tensors,
    use_offline_driver,
)

CPU = torch.device("cpu")


def _keep_freed_memory():
    """glibc keeps the blocks a step frees for the next step's allocations, as the CUDA caching allocator keeps a GPU
    step's: by default it gave freed weight-sized blocks back to the OS (munmap, and trimming the heap's top), which
    made the optimizer's zero_grad 0.7-1.1 ms of the training row on this box (0.17 ms without), a cost of the CPU
    stand-in that a GPU's host path does not have. Process-wide, from the first host row on (mallopt: M_TRIM_THRESHOLD
    1 GiB, M_MMAP_THRESHOLD its 32 MiB maximum); a libc without mallopt is left as it is."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


@pytest.fixture(params=["no-op", "triton-run"])
def stand_ins(request, monkeypatch):
    """Our kernel launches, the backward's matmuls and the plans' batched casts (torch._foreach_copy_: on a GPU a
    launch or a few a batch, here the CPU's own ~4 ms copy of the weights) as no-ops; CPU tensors accepted as under
    the interpreter.
    no-op: each kernel a recorder (tests/launches.py); triton-run: Triton's own JITFunction.run of each kernel, with
    a no-op launcher (tests/offline_triton.py). (the kind, the list each launch appends to)"""
    _keep_freed_memory()
    if request.param == "no-op":
        launches = record_launches(monkeypatch, first_config_only=True)
    else:
        launches = offline_kernels(monkeypatch)
    monkeypatch.setenv("FASTVIT_AUTOTUNE", "0")  # configs chosen without timing them: the no-op kernels have no time
    monkeypatch.setattr(_common, "interpreting", lambda: True)
    monkeypatch.setattr(torch, "matmul", lambda a, b: a.new_empty((*a.shape[:-1], b.shape[-1])))
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dsts, srcs: None)
    return request.param, launches


@pytest.mark.parametrize("row", ["ours", "ours-autocast", "ours-fresh", "ours-indirect", "ours-unplanned"])
@pytest.mark.parametrize("mode", ["infer", "train"])
def test_host_time(benchmark, bench_opts, stand_ins, monkeypatch, mode, row):
    kind, launches_made = stand_ins
    if row == "ours-indirect" and kind == "no-op":
        pytest.skip("with recorders for kernels every plan launches through kernel[grid]: the same as `ours`")
    if row in ("ours-autocast", "ours-fresh") and kind != "no-op":
        pytest.skip("autocast's casts and the arena's allocations are timed in the no-op group")
    monkeypatch.setenv("FASTVIT_PLAN", {"ours": "1", "ours-indirect": "triton", "ours-unplanned": "0"}.get(row, "1"))
    if row == "ours-fresh":  # the plans allocating their temporaries afresh (fastvit_kernels/arena.py): its A/B
        monkeypatch.setenv("FASTVIT_ARENA", "0")
    # ours-autocast: fp32 weights under bf16 autocast, as the GPU's e2e rows run (the weights' casts, batched, and
    # the gradients' casts back are in the step); the other rows: bf16 weights, no casts
    amp = row == "ours-autocast"
    model = vit_cifar10(backend="triton").to(CPU, torch.float32 if amp else torch.bfloat16)
    model.train(mode == "train")
    x = torch.empty(1, 3, 32, 32, dtype=torch.float32 if amp else torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # its zero_grad, as a training loop calls it

    def step():
        # the recorder's list would grow by a step's launches every step, and the garbage collector's passes over it
        # (~3 ms a training step by step 300) would be timed as ours
        launches_made.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            if mode == "train":
                opt.zero_grad(set_to_none=True)
                model(x).float().sum().backward()
            else:
                with torch.no_grad():
                    model(x)

    step()
    step()  # the plan is recorded
    launches_made.clear()
    step()
    launches = len(launches_made)
    measure(
        benchmark,
        step,
        device=CPU,
        opts=dict(bench_opts, rounds=max(bench_opts["rounds"], 100)),
        group=f"host/cifar10/{mode}" if kind == "no-op" else f"host/cifar10+triton-run/{mode}",
        row=row,
        items=1,
        item_name="step",
        warmup=3,
        describe=lambda: {"our_launches_per_step": launches, "plan": _plan_state(model)},
    )


def _plan_state(model) -> str:
    """What the row's calls ran: 'replayed' (an inference plan), 'none' (the forward), or why not (Unplannable)."""
    states = list(plan.plans(model).values())
    if any(isinstance(p, plan.Plan) for p in states):
        return "replayed"
    return next((p.reason for p in states if isinstance(p, plan.Unplannable)), "none")


LAUNCHES = 100  # per round: one launch is a few microseconds, below the timer's resolution for a round of its own


@pytest.mark.parametrize("row", ["triton", "direct"])
def test_launch_host_time(benchmark, bench_opts, monkeypatch, row):
    """One launch of the LayerNorm backward kernel (18 arguments, a heuristics wrapper): `triton` through Triton's
    own JITFunction.run (binding, specialisation, cache key, launch metadata), `direct` as a step plan replays it
    (fastvit_kernels/direct_launch.py). Triton's real JITFunction.run runs, for an sm_90 target; the driver answers
    without a GPU and the compiled kernel's launcher is a no-op (tests/offline_triton.py), so what a launcher and the
    CUDA driver cost is in neither row: on a GPU both pay it alike."""
    use_offline_driver(monkeypatch)
    _, kernel = offline_kernel(layernorm_bwd_kernel, record=False)
    args = ln_bwd_args()
    rec, replay, _ = record_launch(kernel, args, times=LAUNCHES)  # a replay of LAUNCHES lines, as a plan's
    assert rec.direct
    inputs = tensors(args)

    def step():
        if row == "direct":
            replay(*inputs)
        else:
            for _ in range(LAUNCHES):
                kernel[(3,)](*args, **LN_BWD_CONSTS)

    measure(
        benchmark,
        step,
        device=CPU,
        opts=dict(bench_opts, rounds=max(bench_opts["rounds"], 100)),
        group="host/launch/layernorm_bwd",
        row=row,
        items=LAUNCHES,
        item_name="launch",
        warmup=3,
    )
