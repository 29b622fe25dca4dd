"""Record the model's kernel launches instead of running them: every launcher of the op modules is swapped for a
recorder that evaluates its grid for each tile config it may use. The recorded launches compute nothing."""

from triton.runtime import KernelInterface

from fastvit_kernels.ops import fused_attention, fused_patch_embed, gemm, layernorm
from fastvit_kernels.tuning import _FirstConfig

OP_MODULES = [fused_attention, gemm, layernorm, fused_patch_embed]


class _Recorder:
    def __init__(self, name, configs, launches, first_only):
        self.name, self.configs, self.launches = name, configs[:1] if first_only else configs, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            grids = []
            for cfg in self.configs:
                meta = dict(kwargs, **cfg.kwargs)
                grids.append((cfg.kwargs, tuple(grid(meta) if callable(grid) else grid)))
            self.launches.append((self.name, grids))

        return launch


def record_launches(monkeypatch, first_config_only=False) -> list:
    """[(launcher name, [(config kwargs, grid) for each config it may use])], one entry per launch, filled as the
    model runs. first_config_only: one grid per launch, as a real launch evaluates (the host-time benchmark)."""
    launches = []
    for mod in OP_MODULES:
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, (_FirstConfig, KernelInterface)):
                configs = getattr(obj, "configs", None) or [type("Cfg", (), {"kwargs": {}})()]
                monkeypatch.setattr(mod, name, _Recorder(name, configs, launches, first_config_only))
    return launches
