"""Triton's own launch path (JITFunction.run, its binder, the heuristics wrapper) without a GPU: the active driver
answers for an sm_90 target and the kernel cache hands out a stand-in compiled kernel whose launcher records its
calls. Used by tests/test_direct_launch.py and benchmarks/test_host.py (the host time of a step and of one launch)."""

import torch
import triton
from launches import OP_MODULES
from triton.backends.compiler import GPUTarget
from triton.runtime import KernelInterface, driver
from triton.runtime.autotuner import Heuristics
from triton.runtime.jit import JITFunction

from fastvit_kernels import recording, tuning
from fastvit_kernels.tuning import Launcher


class OfflineCompiled:
    """What JITFunction.run gets from its cache on a GPU: the launcher records what it is called with (record), or
    appends the kernel's name to a shared list (launches: a step's launch count), or does nothing."""

    function, packed_metadata = 99, (8, 1, 0)

    def __init__(self, record=True, name=None, launches=None):
        self.calls = []
        self.record, self.name, self.launches = record, name, launches

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        if self.record:
            self.calls.append(args)
        if self.launches is not None:
            self.launches.append(self.name)


class OfflineDriver:
    """Triton's active driver as JITFunction.run and its binder use it (set it as triton.runtime.driver._active)."""

    target = GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 4242

    def get_current_target(self):
        return self.target


def offline_kernel(kernel, record=True, name=None, launches=None):
    """(the stand-in compiled kernel, Triton's own JITFunction of `kernel` under its heuristics): `kernel` is one of
    ours as the interpreter wraps it (heuristics, or none, over an InterpretedFunction, whose .fn is the Python
    function). record/name/launches: OfflineCompiled's."""
    if isinstance(kernel, Heuristics):
        compiled, inner = offline_kernel(kernel.fn, record, name, launches)
        return compiled, triton.heuristics(kernel.values)(inner)
    compiled = OfflineCompiled(record, name, launches)
    jit = JITFunction(kernel.fn)

    def compile_offline(key, signature, device, constexprs, options, attrs, warmup):
        jit.device_caches[device][0][key] = compiled
        return compiled

    jit._do_compile = compile_offline
    return compiled, jit


def use_offline_driver(monkeypatch):
    monkeypatch.setattr(driver, "_active", OfflineDriver())  # driver.active (reset_active would look for a GPU)


# The LayerNorm backward kernel's launch of 40 rows of 96 without a residual gradient (DRES None: HAS_DRES by the
# heuristic): 18 arguments, a heuristics wrapper.
LN_BWD_CONSTS = dict(BLOCK_M=8, BLOCK_D=128, SUM_DX=False, num_warps=4)


def ln_bwd_args() -> tuple:
    t = [torch.randn(40, 96), torch.randn(40, 96), torch.randn(40), torch.randn(40), torch.randn(96)]
    return (*t, None, torch.empty(40, 96), None, torch.empty(3, 2, 96), 40, 96, 16, 96, 96, 0, 96)  # no DRES, no DX_LOW


def tensors(args) -> list:
    return [a for a in args if isinstance(a, torch.Tensor)]


def record_launch(kernel, args, times=1, launch_directly=True):
    """(recorder, replay function taking tensors(args), its source): kernel[(3,)](*args, **LN_BWD_CONSTS) launched
    `times` times under a recorder."""
    rec = recording.Recorder({}, launch_directly=launch_directly)
    names = [rec.bind(a, f"a{i}") for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    with recording.recording(rec):
        for _ in range(times):
            tuning.launch_kernel(kernel, (3,), args, LN_BWD_CONSTS)
    fn, source = rec.function(names, rec.lines, "None", [])
    return rec, fn, source


def offline_kernels(monkeypatch) -> list:
    """Every kernel of ours (tests/launches.py's OP_MODULES) swapped for Triton's own JITFunction of it, compiled
    offline, with the offline driver active; returns the list each launch appends its kernel's name to."""
    use_offline_driver(monkeypatch)
    launches, copies = [], {}

    def copy(name, kernel):
        if id(kernel) not in copies:  # a Launcher's kernel is also its module's: one copy for both
            copies[id(kernel)] = offline_kernel(kernel, record=False, name=name, launches=launches)[1]
        return copies[id(kernel)]

    for mod in OP_MODULES:
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, Launcher):
                monkeypatch.setattr(obj, "kernel", copy(name, obj.kernel))
                monkeypatch.setattr(obj, "chosen", {})
            elif isinstance(obj, KernelInterface):
                monkeypatch.setattr(mod, name, copy(name, obj))
    return launches
