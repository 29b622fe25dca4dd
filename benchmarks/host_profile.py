"""Where the host time of one CIFAR-10 step goes, inference and training, bf16 autocast, ours and eager SDPA.

    python benchmarks/host_profile.py [OUT_FILE]

Three views, each after warm-up (autotuning and the step plans' recording excluded):
- phases: the host time of each part of a step (zero_grad, forward with the loss, backward, the optimizer's step)
  while the GPU is kept busy by a spin kernel queued first, so that the host never waits for it: what a CUDA graph
  removes, part by part, for ours and for the eager model in the same process;
- operations: torch.profiler's CPU-side self time per operation and its calls per step (ours, training): which
  torch operations and launches the host time is spent in;
- functions: cProfile's top Python functions by own time (ours, training).
The e2e rows' `host_ms` says how long issuing a step takes; this says where. Printed, and appended to OUT_FILE.
"""

import cProfile
import io
import pstats
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from common import settle_training_step

from fastvit_kernels import vit_cifar10

BATCH, REPS, TOP = 512, 5, 20
SPIN_CYCLES = 400_000_000  # ~0.2 s at ~2 GHz: longer than a step's host time, so the GPU is never idle-waiting


def _model(backend):
    torch.manual_seed(0)
    model = vit_cifar10(backend=backend, attn_impl="sdpa").cuda()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def _phases(model, opt, mode, x, y) -> dict:
    """{phase: host ms} of one step, the clock read between phases (no synchronisation inside the step)."""
    amp = torch.autocast("cuda", dtype=torch.bfloat16)
    marks = [("start", time.perf_counter())]
    if mode == "infer":
        with torch.inference_mode(), amp:
            model(x)
        marks.append(("forward", time.perf_counter()))
    else:
        opt.zero_grad(set_to_none=True)
        marks.append(("zero_grad", time.perf_counter()))
        with amp:
            loss = F.cross_entropy(model(x), y)
        marks.append(("forward + loss", time.perf_counter()))
        loss.backward()
        marks.append(("backward", time.perf_counter()))
        opt.step()
        marks.append(("optimizer step", time.perf_counter()))
    return {name: 1e3 * (t - marks[i][1]) for i, (name, t) in enumerate(marks[1:])}


def phase_table(x, y) -> str:
    lines = ["| step | phase | ours ms | eager SDPA ms |", "|---|---|---:|---:|"]
    medians = {}
    for backend in ("triton", "torch"):
        model, opt = _model(backend)
        for mode in ("infer", "train"):
            model.train(mode == "train")
            if mode == "train":
                settle_training_step(lambda m=model, o=opt: _phases(m, o, "train", x, y), model, x.device)
            for _ in range(3):
                _phases(model, opt, mode, x, y)
            runs = []
            for _ in range(REPS):
                torch.cuda.synchronize()
                torch.cuda._sleep(SPIN_CYCLES)
                runs.append(_phases(model, opt, mode, x, y))
            torch.cuda.synchronize()
            for phase in runs[0]:
                medians[mode, phase, backend] = statistics.median(r[phase] for r in runs)
            medians[mode, "**step**", backend] = statistics.median(sum(r.values()) for r in runs)
    for mode, phase, backend in list(medians):
        if backend == "triton":
            lines.append(
                f"| {mode} | {phase} | {medians[mode, phase, 'triton']:.2f} | {medians[mode, phase, 'torch']:.2f} |"
            )
    return "\n".join(lines)


def operation_table(step) -> str:
    """The CPU-side operations of ours' training step by self time, per step."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]  # CUDA: the runtime's launches
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(REPS):
            step()
        torch.cuda.synchronize()
    ops = prof.key_averages()
    rows = sorted(ops, key=lambda e: -e.self_cpu_time_total)[:TOP]
    total = sum(e.self_cpu_time_total for e in ops) / REPS / 1e3
    lines = [f"self CPU time under the profiler: {total:.2f} ms a step (the profiler adds its own)", ""]
    lines += ["| operation | self ms/step | calls/step |", "|---|---:|---:|"]
    for e in rows:
        lines.append(f"| `{e.key[:90]}` | {e.self_cpu_time_total / REPS / 1e3:.3f} | {e.count / REPS:.0f} |")
    return "\n".join(lines)


def function_table(step) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(REPS):
        step()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(TOP)
    return s.getvalue()


def main():
    x = torch.randn(BATCH, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (BATCH,), device="cuda")
    report = [f"### host time per phase of a step (GPU kept busy; median of {REPS})", "", phase_table(x, y), ""]
    model, opt = _model("triton")
    model.train()

    def step():
        _phases(model, opt, "train", x, y)

    settle_training_step(step, model, x.device)
    for _ in range(3):
        step()
    report += ["### ours / train: CPU time per operation (torch.profiler)", "", operation_table(step), ""]
    report += ["### ours / train: Python functions by own time (cProfile)", "", function_table(step)]
    text = "\n".join(report)
    print(text)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "a") as f:
            f.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
