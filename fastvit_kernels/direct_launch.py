"""Direct launches for step plans (fastvit_kernels/plan.py): a compiled Triton kernel called as Triton's
JITFunction.run calls it, without the work run does before that on every call (binding and specialising the
arguments, the cache key and lookup, the launch hooks' metadata).

A plan's recorded launch goes through Triton once (`launch`); what JITFunction.run then handed the compiled kernel's
launcher (its bound arguments, in order) is what the replay hands it on every later call, each tensor as its address
(recording.Recorder._address). That is the same launch as long as the compiled kernel is the one Triton would pick: its
cache key depends on the arguments' specialisation (the integers, written into the plan; the tensors' 16-byte alignment,
guarded by the plan or fixed by the allocator) and on Triton's options, which a plan records with its configuration. Not
direct: the interpreter (no compiled kernel), the test suite's launch recorders (not Triton's kernels), a kernel with
pre-run hooks, launch hooks installed (a profiler reads the metadata the direct launch does not build; `hooks_set`), a
Triton whose JITFunction.run launches otherwise (`supported`).
"""

import functools
import inspect
import threading

from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

# The statements of JITFunction.run (triton 3.6 and 3.8) that `launch` relies on: its binder, and the launch a direct
# one repeats (the launch metadata and hooks passed as None: no hooks, `hooks_set`).
_RUN = (
    "kernel_cache, kernel_key_cache, target, backend, binder = self.device_caches[device]",
    "bound_args, specialization, options = binder(*args, **kwargs)",
    """kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata,
    knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())""",
)


@functools.cache
def supported() -> bool:
    """Whether the installed Triton's JITFunction.run binds and launches as `_RUN` says (else plans launch through
    it)."""
    try:
        source = "".join(inspect.getsource(JITFunction.run).split())
    except (OSError, TypeError):
        return False
    return all("".join(statement.split()) in source for statement in _RUN)


def hooks_set() -> bool:
    """Launch hooks are installed (a profiler's): launches then go through Triton, which builds their metadata."""
    return any(
        getattr(h, "calls", h is not None) for h in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)
    )


def _jit(kernel):
    """The JITFunction under Triton's wrappers (heuristics), or None (the interpreter's function, a test's stand-in)."""
    while not isinstance(kernel, JITFunction):
        kernel = getattr(kernel, "fn", None)
        if kernel is None:
            return None
    return kernel


class Direct:
    """What a direct launch passes the compiled kernel's launcher besides the grid, the stream and the arguments."""

    def __init__(self, compiled, device: int, args: tuple):
        self.compiled = compiled  # whoever launches `function` holds it: its __del__ unloads the function's module
        self.run = compiled.run  # the launcher, initialised by the launch that made this
        self.function, self.packed_metadata = compiled.function, compiled.packed_metadata
        self.stream = driver.active.get_current_stream  # called with the device at each launch: the caller's stream
        self.device = device
        self.args = args  # every parameter of the kernel in order, constexprs included, as JITFunction.run passes them


def launch(kernel, grid, args, consts):
    """kernel[grid](*args, **consts) through Triton; a Direct for later launches of it, or None (the module's
    docstring says where)."""
    jit = _jit(kernel)
    if jit is None or jit.pre_run_hooks or not supported() or hooks_set():
        kernel[grid](*args, **consts)
        return None
    me = threading.get_ident()
    seen = []

    def hook(*a, **kw):  # JITFunction.run calls it with what its binder then binds
        if threading.get_ident() == me:
            seen.append((a, kw))

    jit.pre_run_hooks.append(hook)
    try:
        compiled = kernel[grid](*args, **consts)
    finally:
        jit.pre_run_hooks.remove(hook)
    compiled = compiled.result() if hasattr(compiled, "result") else compiled  # an asynchronous compilation's future
    ((a, kw),) = seen
    device = driver.active.get_current_device()
    bound, _, _ = jit.device_caches[device][4](*a, **kw)  # JITFunction.run's binder for the device
    return Direct(compiled, device, tuple(bound.values()))
