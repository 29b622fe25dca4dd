"""Record the model's kernel launches instead of running them. The recorded launches compute nothing.

Two depths of recording:
- every config (the default): each Launcher's launch is swapped for a recorder that evaluates its grid for each tile
  config it may use (the grid-limit test);
- first_config_only: each Launcher keeps its own per-call path (the config chosen per key, the grid) and only the
  kernel it would launch is swapped, as is every kernel launched directly (the host-time benchmark, which times the
  Launchers' path too).
"""

from triton.runtime import KernelInterface

from fastvit_kernels.ops import fused_attention, fused_patch_embed, gemm, layernorm
from fastvit_kernels.tuning import Launcher

OP_MODULES = [fused_attention, gemm, layernorm, fused_patch_embed]


class _KernelRecorder:
    """Stands in for a kernel: kernel[grid](...) records (name, [({}, grid)])."""

    def __init__(self, name, launches):
        self.name, self.launches = name, launches
        self.arg_names = None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, [({}, tuple(grid))]))

        return launch


def _every_config_recorder(name, launcher, launches):
    def launch(key, grid, *args, **consts):
        launches.append((name, [(cfg.kwargs, tuple(grid(cfg.kwargs))) for cfg in launcher.configs]))

    return launch


def record_launches(monkeypatch, first_config_only=False) -> list:
    """[(launcher name, [(config kwargs, grid) for each config it may use])], one entry per launch, filled as the
    model runs. first_config_only: one grid per launch, the one the Launcher computes for its chosen config."""
    launches = []
    if not first_config_only:  # Launcher.launch itself is replaced: an inference plan would record no launch
        monkeypatch.setenv("FASTVIT_PLAN", "0")
    for mod in OP_MODULES:
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, Launcher):
                if first_config_only:
                    recorder = _KernelRecorder(name, launches)
                    recorder.arg_names = obj.kernel.arg_names
                    monkeypatch.setattr(obj, "kernel", recorder)
                    monkeypatch.setattr(obj, "chosen", {})
                else:
                    monkeypatch.setattr(obj, "launch", _every_config_recorder(name, obj, launches))
            elif isinstance(obj, KernelInterface):
                monkeypatch.setattr(mod, name, _KernelRecorder(name, launches))
    return launches
