"""Triton's own launch path (JITFunction.run, its binder, the heuristics wrapper) without a GPU: the active driver
answers for an sm_90 target and the kernel cache hands out a stand-in compiled kernel whose launcher records its
calls. Used by tests/test_direct_launch.py and benchmarks/test_host.py (the host time of one launch)."""

import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction


class OfflineCompiled:
    """What JITFunction.run gets from its cache on a GPU: the launcher records what it is called with."""

    function, packed_metadata = 99, (8, 1, 0)

    def __init__(self, record=True):
        self.calls = []
        self.record = record  # False: the launcher does nothing (a benchmark's)

    def launch_metadata(self, grid, stream, *args):
        return None

    def run(self, *args):
        if self.record:
            self.calls.append(args)


class OfflineDriver:
    """Triton's active driver as JITFunction.run and its binder use it (set it as triton.runtime.driver._active)."""

    target = GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 4242

    def get_current_target(self):
        return self.target


def offline_kernel(kernel, record=True):
    """(the stand-in compiled kernel, Triton's own JITFunction of `kernel` under its heuristics): `kernel` is one of
    ours as the interpreter wraps it (heuristics over an InterpretedFunction, whose .fn is the Python function)."""
    compiled = OfflineCompiled(record)
    jit = JITFunction(kernel.fn.fn)

    def compile_offline(key, signature, device, constexprs, options, attrs, warmup):
        jit.device_caches[device][0][key] = compiled
        return compiled

    jit._do_compile = compile_offline
    return compiled, triton.heuristics(kernel.values)(jit)
