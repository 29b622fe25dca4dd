"""Every launch grid of the model stays inside CUDA's limits at batch sizes people evaluate with.

The interpreter runs any grid; a GPU refuses grid.y or grid.z above 65535 (and grid.x above 2**31 - 1) at launch.
The launches are recorded, not run: every kernel launcher of the three op modules is swapped for a recorder that
evaluates its grid for each tile config it may use, and a forward and backward of the whole model go through.
"""

import torch
from launches import record_launches

from fastvit_kernels import ViT

CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)


def test_every_grid_fits_cuda_limits_at_batch_70000(monkeypatch, device):
    launches = record_launches(monkeypatch)
    # 2 heads x 70k images = 140k (batch, head) pairs; 5 tokens each, so the whole thing is a few hundred MB
    model = ViT(image_size=8, patch_size=4, num_classes=3, dim=32, depth=1, heads=2, mlp_dim=64, backend="triton").to(
        device
    )
    images = torch.randn(70_000, 3, 8, 8, device=device)
    model(images).sum().backward()  # the recorded launches computed nothing: only the grids matter
    grids = [(name, cfg, g) for name, per_config in launches for cfg, g in per_config]
    names = {name for name, _, _ in grids}
    expected = {"_fwd", "_bwd_dq", "_bwd_dkdv", "_dw", "layernorm_fwd_kernel", "_bwd"}  # _bwd: the LayerNorm backward
    assert expected <= names, names
    too_big = [
        (name, cfg, g)
        for name, cfg, g in grids
        if any(n > limit for n, limit in zip(g, CUDA_GRID_LIMITS)) or min(g) < 1
    ]
    assert not too_big, too_big[:5]
