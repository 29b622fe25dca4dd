"""Where the GPU time of one CIFAR-10 step goes, per kernel: ours against eager SDPA, inference and training, bf16.

    python benchmarks/profile_step.py [OUT_DIR]          # the model's steps: OUT_DIR/profile.md
    python benchmarks/profile_step.py --qkv [OUT_DIR]    # qkv_attention's rows: OUT_DIR/profile-qkv.md

Prints (and writes to OUT_DIR) every kernel that takes at least 0.5% of a step's GPU time, with launches per step,
from torch.profiler over a few steps after warm-up (autotuning excluded). The benchmark rows say how fast a step is;
this says which kernels to work on. `--qkv`: the qkv projection and attention at CIFAR-10's training shape, forward and
backward, as `benchmarks/test_kernels.py::test_qkv_attention` times it: our one op (qkv's bias gradient from the dK/dV
kernel's rows) and the linear and attention ops composed, whose difference the rows alone do not explain (H200,
2026-11-28: 0.429 against 0.416 ms, where the tuner's kernel times added up to the one op ~0.04 ms ahead).
"""

import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from common import settle_training_step

from fastvit_kernels import ops, vit_cifar10

BATCH, STEPS = 512, 3
MIN_SHARE, MAX_ROWS = 0.005, 40  # the kernels listed: each with at least this share of the step, at most this many


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
    if mode == "train":
        settle_training_step(lambda: _step(model, mode, x, y, opt), model, x.device)
    return _kernel_table(f"{backend} / {mode}", lambda: _step(model, mode, x, y, opt))


def profile_qkv(row):
    """qkv_attention forward and backward at CIFAR-10's shape (B 512, 6 heads, 65 tokens, d 64), bf16: `ours` the one
    op, `ours-composed` linear then attention."""
    torch.manual_seed(0)
    B, H, N, d = 512, 6, 65, 64
    h = torch.randn(B, N, H * d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (0.02 * torch.randn(3 * H * d, H * d, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    b = (0.02 * torch.randn(3 * H * d, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    do = torch.randn(B, N, H * d, device="cuda", dtype=torch.bfloat16)

    def step():
        o = ops.qkv_attention(h, w, b, H) if row == "ours" else ops.attention(ops.linear(h, w, b), H)
        torch.autograd.grad(o, (h, w, b), do)

    return _kernel_table(f"qkv_attention / {row}", step)


def _kernel_table(title, step):
    """The kernels of step() by GPU time, per call of it, after three calls that tune."""
    for _ in range(3):
        step()  # autotuning and cuBLAS heuristics happen here
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(STEPS):
            step()
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
        f"### {title}: {total:.2f} ms of GPU time per step, "
        f"{sum(n for _, n in per_kernel.values()) // STEPS} kernels per step",
        "",
        "| kernel | ms/step | share | launches/step |",
        "|---|---:|---:|---:|",
    ]
    listed = [row for row in rows[:MAX_ROWS] if row[1][0] >= MIN_SHARE * total]
    for name, (ms, n) in listed:
        lines.append(f"| `{name[:90]}` | {ms:.3f} | {100 * ms / total:.1f}% | {n // STEPS} |")
    rest = sum(ms for _, (ms, _) in rows[len(listed) :])
    lines.append(
        f"| (the other {len(rows) - len(listed)} kernels) | {rest:.3f} | {100 * rest / max(total, 1e-9):.1f}% | |"
    )
    return "\n".join(lines)


def main():
    if not torch.cuda.is_available():
        print("profile_step.py needs a CUDA GPU")
        return
    args = sys.argv[1:]
    qkv = "--qkv" in args
    args = [a for a in args if a != "--qkv"]
    out = [f"card: {torch.cuda.get_device_name()} | torch {torch.__version__} | batch {BATCH} | bf16 autocast"]
    tables = (
        [lambda r=r: profile_qkv(r) for r in ("ours", "ours-composed")]
        if qkv
        else [lambda m=m, b=b: profile(b, m) for m in ("infer", "train") for b in ("triton", "torch")]
    )
    for table in tables:
        out.append(table())
        print(out[-1] + "\n", flush=True)
    if args:
        Path(args[0]).mkdir(parents=True, exist_ok=True)
        (Path(args[0]) / ("profile-qkv.md" if qkv else "profile.md")).write_text("\n\n".join(out) + "\n")


if __name__ == "__main__":
    main()
