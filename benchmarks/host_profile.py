"""Where the host time of one CIFAR-10 step goes (Python functions, cProfile), inference and training, bf16.

    python benchmarks/host_profile.py [OUT_DIR] [--backend triton|torch]

On a GPU the `host_ms` column of the e2e rows says how long issuing a step takes; this says which Python functions
take that time. Prints the top functions by own time for 5 steps after warm-up (autotuning excluded).
"""

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
from profile_step import _step  # the same inference and training steps as the GPU profile

from fastvit_kernels import vit_cifar10

BATCH, STEPS, TOP = 512, 5, 25


def main():
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 and not sys.argv[1].startswith("--") else None
    backend = sys.argv[sys.argv.index("--backend") + 1] if "--backend" in sys.argv else "triton"
    torch.manual_seed(0)
    model = vit_cifar10(backend=backend).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(BATCH, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (BATCH,), device="cuda")
    report = []
    for name in ("infer", "train"):
        model.train(name == "train")

        def step(name=name):
            _step(model, name, x, y, opt)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(STEPS):
            step()
        prof.disable()
        host = (time.perf_counter() - t0) / STEPS * 1e3
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(TOP)
        report.append(f"### {backend} / {name}: {host:.2f} ms of host time per step (under cProfile)\n{s.getvalue()}")
    text = "\n".join(report)
    print(text)
    if out_dir is not None:
        (out_dir / f"host_profile_{backend}.txt").write_text(text)


if __name__ == "__main__":
    main()
