"""Every launch grid of the model stays inside CUDA's limits at batch sizes people evaluate with.

The interpreter runs any grid; a GPU refuses grid.y or grid.z above 65535 (and grid.x above 2**31 - 1) at launch.
The launches are recorded, not run: every kernel launcher of the three op modules is swapped for a recorder that
evaluates its grid for each tile config it may use, and a forward and backward of the whole model go through.
"""

import importlib

import torch
from triton.runtime import KernelInterface

from fastvit_kernels import ViT
from fastvit_kernels.ops._common import _FirstConfig

CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)
OP_MODULES = [
    importlib.import_module(f"fastvit_kernels.ops.{m}") for m in ("attention", "linear", "layernorm", "patch_embed")
]


class _Recorder:
    def __init__(self, name, configs, grids):
        self.name, self.configs, self.grids = name, configs, grids

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            for cfg in self.configs:
                meta = dict(kwargs, **cfg.kwargs)
                self.grids.append((self.name, cfg.kwargs, tuple(grid(meta) if callable(grid) else grid)))

        return launch


def test_every_grid_fits_cuda_limits_at_batch_70000(monkeypatch, device):
    grids = []
    for mod in OP_MODULES:
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, (_FirstConfig, KernelInterface)):
                configs = getattr(obj, "configs", None) or [type("Cfg", (), {"kwargs": {}})()]
                monkeypatch.setattr(mod, name, _Recorder(name, configs, grids))
    # 2 heads x 70k images = 140k (batch, head) pairs; 5 tokens each, so the whole thing is a few hundred MB
    model = ViT(image_size=8, patch_size=4, num_classes=3, dim=32, depth=1, heads=2, mlp_dim=64, backend="triton").to(
        device
    )
    images = torch.randn(70_000, 3, 8, 8, device=device)
    model(images).sum().backward()  # the recorded launches computed nothing: only the grids matter
    names = {name for name, _, _ in grids}
    expected = {"_fwd", "_bwd_dq", "_bwd_dkdv", "_dw", "layernorm_fwd_kernel", "layernorm_bwd_kernel"}
    assert expected <= names, names
    too_big = [
        (name, cfg, g)
        for name, cfg, g in grids
        if any(n > limit for n, limit in zip(g, CUDA_GRID_LIMITS)) or min(g) < 1
    ]
    assert not too_big, too_big[:5]
