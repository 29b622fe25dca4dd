"""Where the GPU time of one CIFAR-10 step goes, per kernel: ours against eager SDPA, inference and training, bf16.

    python benchmarks/profile_step.py [OUT_DIR]

Prints (and writes to OUT_DIR/profile.md) the kernels that take the most GPU time per step, with launches per step,
from torch.profiler over a few steps after warm-up (autotuning excluded). The benchmark rows say how fast a step is;
this says which kernels to work on.
"""

import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from fastvit_kernels import vit_cifar10

BATCH, STEPS, TOP = 512, 3, 12


def _step(model, mode, x, y, opt):
    amp = torch.autocast("cuda", dtype=torch.bfloat16)
    if mode == "infer":
        with torch.inference_mode(), amp:
            model(x)
        return
    opt.zero_grad(set_to_none=True)
    with amp:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def profile(backend, mode):
    torch.manual_seed(0)
    model = vit_cifar10(backend=backend, attn_impl="sdpa").cuda().train(mode == "train")
    x = torch.randn(BATCH, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (BATCH,), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for _ in range(3):
        _step(model, mode, x, y, opt)  # autotuning and cuBLAS heuristics happen here
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(STEPS):
            _step(model, mode, x, y, opt)
        torch.cuda.synchronize()
    per_kernel = defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            entry = per_kernel[ev.name]
            entry[0] += ev.time_range.elapsed_us() / 1e3 / STEPS  # ms per step
            entry[1] += 1
    total = sum(ms for ms, _ in per_kernel.values())
    rows = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])
    lines = [
        f"### {backend} / {mode}: {total:.2f} ms of GPU time per step, "
        f"{sum(n for _, n in per_kernel.values()) // STEPS} kernels per step",
        "",
        "| kernel | ms/step | share | launches/step |",
        "|---|---:|---:|---:|",
    ]
    for name, (ms, n) in rows[:TOP]:
        lines.append(f"| `{name[:90]}` | {ms:.3f} | {100 * ms / total:.0f}% | {n // STEPS} |")
    rest = sum(ms for _, (ms, _) in rows[TOP:])
    lines.append(
        f"| (the other {max(0, len(rows) - TOP)} kernels) | {rest:.3f} | {100 * rest / max(total, 1e-9):.0f}% | |"
    )
    return "\n".join(lines)


def main():
    if not torch.cuda.is_available():
        print("profile_step.py needs a CUDA GPU")
        return
    out = [f"card: {torch.cuda.get_device_name()} | torch {torch.__version__} | batch {BATCH} | bf16 autocast"]
    for mode in ("infer", "train"):
        for backend in ("triton", "torch"):
            out.append(profile(backend, mode))
            print(out[-1] + "\n", flush=True)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
        (Path(sys.argv[1]) / "profile.md").write_text("\n\n".join(out) + "\n")


if __name__ == "__main__":
    main()
