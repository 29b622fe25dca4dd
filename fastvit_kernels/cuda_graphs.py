"""CUDA graphs without torch.compile: capture a whole step once, replay it for every batch.

A CIFAR-10 step issues a few hundred kernel launches; replaying them as one graph removes the host time of issuing
them (the `ours+cudagraph` benchmark rows use this function). The usual rules of CUDA graphs hold: the step reads its
inputs from the same tensors every time (copy each batch into them), allocates nothing that outlives it, does not
synchronise with the host, and takes the same shapes. The optimizer must be capturable
(`torch.optim.AdamW(..., capturable=True)`), and autocast's weight cache must be off (`torch.autocast(...,
cache_enabled=False)`), or the cached casts would be replayed from stale memory.

    x = torch.empty(512, 3, 32, 32, device="cuda"); y = torch.empty(512, dtype=torch.long, device="cuda")
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    replay = cuda_graph_step(step)
    for images, labels in loader:
        x.copy_(images); y.copy_(labels)
        replay()
"""

import torch

from . import arena, tuning


def cuda_graph_step(step, warmup: int = 3, pool=None):
    """Capture `step()` (no arguments) in a CUDA graph and return the graph's replay function.

    The step first runs `warmup` times on a side stream, so that autotuning, cuBLAS's workspace and the caching
    allocator settle outside the capture (a capture cannot autotune: it would time kernels that do not run), then
    once under capture. Those warm-up runs are real steps: with an optimizer they update the weights. The step
    plans' arena (fastvit_kernels/arena.py), which the warm-up's replays used, is let go before the capture: the
    graph replays into memory of its own."""
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA graphs need a CUDA GPU; run the step itself on this machine")
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1 (autotuning cannot run inside a capture), got {warmup}")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with tuning.gpu_time_only():  # a replay costs no host time per kernel: GEMMs chosen by their GPU time alone
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(side)
        arena.release()  # the warm-up's replays took their temporaries from it; the graph's replays use their own memory
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            step()
    return graph.replay
