"""Record the model's kernel launches instead of running them. The recorded launches compute nothing.

Two depths of recording:
- every config (the default): each Launcher's launch is swapped for a recorder that evaluates its grid for each tile
  config it may use (the grid-limit test);
- first_config_only: each Launcher keeps its own per-call path (the config chosen per key, the grid) and only the
  kernel it would launch is swapped, as is every kernel launched directly (the host-time benchmark, which times the
  Launchers' path too).
"""

import functools

from triton.runtime import KernelInterface

from fastvit_kernels.ops import fused_attention, fused_patch_embed, gemm, layernorm, reduce
from fastvit_kernels.tuning import Launcher

OP_MODULES = [fused_attention, gemm, layernorm, reduce, fused_patch_embed]


class _KernelRecorder:
    """Stands in for a kernel: kernel[grid](...) records (name, grid), or with every_config (name, [({}, grid)]) as
    _every_config_recorder does. The first is one object a launch: the host benchmark's steps make 172, and more
    would set off the garbage collector's passes over the whole heap in its timing."""

    def __init__(self, name, launches, every_config=False):
        self.name, self.launches, self.every_config = name, launches, every_config
        self.arg_names = None

    def __getitem__(self, grid):
        return functools.partial(self._launch, tuple(grid))

    def _launch(self, grid, *args, **kwargs):
        self.launches.append((self.name, [({}, grid)] if self.every_config else grid))


def _every_config_recorder(name, launcher, launches):
    def launch(key, grid, *args, **consts):
        launches.append((name, [(cfg.kwargs, tuple(grid(cfg.kwargs))) for cfg in launcher.configs]))

    return launch


def record_launches(monkeypatch, first_config_only=False) -> list:
    """[(launcher name, [(config kwargs, grid) for each config it may use])], one entry per launch, filled as the
    model runs. first_config_only: [(kernel name, grid)], the grid the Launcher computes for its chosen config."""
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
                monkeypatch.setattr(mod, name, _KernelRecorder(name, launches, every_config=not first_config_only))
    return launches
