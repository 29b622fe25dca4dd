"""Helpers shared by the op files: input checks, the compute dtype under autocast, launch geometry, and the call
path of the custom ops (the op under torch.compile, the implementation directly in eager mode).

Kernel configurations are fastvit_kernels/configs/'s, launch modes tuning.py's, the interpreter's fixes
_interpreter.py's.
"""

import functools

import torch

from .. import tuning
from .._interpreter import interpreting
from .._intmath import cdiv, next_pow2  # noqa: F401 - the op files take them from here

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_tensor(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the Triton kernels support float32, float16 and bfloat16")
    if not t.is_cuda and not interpreting():
        raise RuntimeError(
            f"{name} is on {t.device}, but the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 set before "
            "triton is imported, to run them on the CPU under the interpreter); use backend='torch' instead"
        )


def check_same_device(**tensors) -> None:
    """All tensors of one call on one device. A kernel handed another GPU's pointer faults (or, with peer access,
    reads across the link) instead of raising a readable error. Checked first: it names the stray tensor, where the
    per-tensor checks would only say that one tensor is not on a GPU. Non-tensors are left to those checks."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise RuntimeError(f"expected every tensor on one device, got {listed}")


def check_tensors(**tensors) -> torch.device:
    """check_same_device, then check_tensor for each named tensor (None: an absent optional one). One pass with set
    lookups where all is well (an op checks its tensors on every call: this is host time of every launch); the
    per-tensor checks, and their messages, where something is not. Returns the device."""
    device = None
    for t in tensors.values():
        if t is None:
            continue
        if type(t) not in _TENSOR_TYPES or t.dtype not in SUPPORTED_DTYPES:
            return _check_each(tensors)
        if device is None:
            device = t.device
        elif t.device != device:
            return _check_each(tensors)
    if device is None or (device.type != "cuda" and not interpreting()):
        return _check_each(tensors)
    return device


def _check_each(tensors) -> torch.device:
    check_same_device(**tensors)
    for name, t in tensors.items():
        if t is not None:
            check_tensor(t, name)
    return next((t.device for t in tensors.values() if t is not None), None)


_TENSOR_TYPES = {torch.Tensor, torch.nn.Parameter}  # anything else (a subclass) takes isinstance's slower way


def on_input_device(fn):
    """Run `fn` with its first argument's GPU as the current device. Triton launches on the current device, not on the
    tensors' own: a model on cuda:1 called while cuda:0 is current would otherwise fault."""

    @functools.wraps(fn)
    def wrapper(t, *args, **kwargs):
        if t.is_cuda and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return fn(t, *args, **kwargs)
        return fn(t, *args, **kwargs)

    return wrapper


# device types autocast knows; torch.is_autocast_enabled raises for the others (the meta device, used to trace shapes)
_AUTOCAST_DEVICES = {"cuda", "cpu", "xpu", "mps", "hpu", "mtia", "xla", "ipu", "privateuseone"}


def autocast_on(device: torch.device) -> bool:
    """Whether autocast is on for device's type; False for a type autocast does not have (meta)."""
    return device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype when autocast is on for t's device, else t's own dtype.

    This is eager autocast's rule for linear/conv/matmul; the ops follow it so that switching backend never changes
    which precision a GEMM uses.
    """
    return autocast_dtype(t.device) or t.dtype


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype for device's type, None where autocast is off: an op asks once per call."""
    return torch.get_autocast_dtype(device.type) if autocast_on(device) else None


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for fp32 operands: tf32 only when PyTorch itself would use it for this matmul."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


@functools.cache
def device_properties(device: torch.device):
    """A CUDA device's properties, looked up once: torch's lookup costs microseconds of host time, and the launchers
    ask for them on every call."""
    return torch.cuda.get_device_properties(device)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits still exercise the split paths


def persistent_programs(device: torch.device, per_sm: int) -> int:
    """The grid of a kernel whose programs each walk a share of the rows: per_sm programs an SM on a GPU. The
    interpreter runs the programs one after another at about the same cost whatever rows each has (a program of one
    row took as long as one of eight): there num_sms' few programs, each looping over several rows, run the same code
    in a fraction of the time."""
    return per_sm * num_sms(device) if device.type == "cuda" else num_sms(device)


def arrival_counters(n: int, device: torch.device) -> torch.Tensor:
    """n int32 counters at zero, for a kernel whose programs count their arrivals at them (kernels/common.py
    last_to_arrive) and leave each at zero again. A step plan's replay takes them from its arena's zeroed buffer
    instead of a zero-fill a call (arena.py): only a kernel that keeps that promise may be handed them."""
    t = torch.zeros(n, device=device, dtype=torch.int32)
    if tuning.recorder is not None:
        tuning.recorder.zeroed(t)
    return t


def row_stride(t):
    """The stride between the rows of t [..., C] read as [rows, C] where its leading dims collapse to one stride (a
    contiguous tensor; a view such as x[:, 1:]), else None."""
    if t.is_contiguous():
        return t.shape[-1]
    row = expect = None
    for size, stride in zip(reversed(t.shape[:-1]), reversed(t.stride()[:-1])):  # the innermost leading dim first
        if size == 1:
            continue
        if row is None:
            row, expect = stride, stride * size
        elif stride != expect:  # these leading dims need two strides
            return None
        else:
            expect *= size
    return t.shape[-1] if row is None else row


def as_rows(t):
    """(t, the stride between its rows) for t [..., C] read as [rows, C]: t itself where its leading dims collapse to
    one stride (row_stride), else a contiguous copy, same shape."""
    rows = row_stride(t)
    return (t.contiguous(), t.shape[-1]) if rows is None else (t, rows)


def as_unit_rows(t):
    """as_rows for a kernel that reads each row's features at unit stride (a copy where they are not)."""
    return as_rows(t if t.stride(-1) == 1 else t.contiguous())


SPLIT_ALIGN = 256  # rows per split: a multiple of every BLOCK_K, so two splits never share a tile


def split_rows(rows: int, tiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, rows_per_split) for a weight-gradient GEMM that reduces over `rows` with `tiles` output tiles.

    A [384, 1536] weight is only 36 tiles of 128 x 128, far fewer than an H100's 132 SMs: splitting the reduction
    over rows gives up to two programs an SM (the 128 x 128 tile's residency without a bias, sm_90), each writing an
    fp32 partial that the last to arrive adds up. At most that many, not one more: the few programs past the places
    run as a wave of their own after the rest (CIFAR-10's qkv weight gradient on an H200: 270 programs for 264 places
    when the count was rounded up). Splits keep at least 4 * SPLIT_ALIGN rows each, so the partials stay small next
    to the activations.
    """
    splits = max(1, min(2 * num_sms(device) // tiles, cdiv(rows, 4 * SPLIT_ALIGN)))
    per_split = cdiv(cdiv(rows, splits), SPLIT_ALIGN) * SPLIT_ALIGN
    return cdiv(rows, per_split), per_split


# ------------------------------------------------------------------------------------------------------------------
# Custom ops, and the eager call path beside them
# ------------------------------------------------------------------------------------------------------------------
def custom_op(name: str):
    """torch.library.custom_op(name, mutates_args=()), keeping the Python implementation at hand for call()."""

    def wrap(fn):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.eager_impl, op.eager_autograd = fn, None
        return op

    return wrap


def register_autograd(op, backward, setup_context) -> None:
    """op.register_autograd, and the same formula as a torch.autograd.Function for call()'s eager path."""
    op.register_autograd(backward, setup_context=setup_context)

    impl = op.eager_impl

    # Both inside tuning.training_step(): a GEMM first chosen here counts its candidates' host time (tuning.py).
    def forward(ctx, *inputs):
        # forward(ctx, ...) rather than a separate setup_context: with one, Function.apply binds the arguments through
        # inspect.signature on every call (~70 us of host time per op under cProfile, torch 2.14)
        with tuning.training_step():
            output = impl(*inputs)
        ctx.set_materialize_grads(False)  # the statistics outputs get no gradient: None, not a tensor of zeros
        setup_context(ctx, inputs, output)
        return output

    def backward_in_step(ctx, *grads):
        with tuning.training_step():
            return backward(ctx, *grads)

    methods = dict(forward=staticmethod(forward), backward=staticmethod(backward_in_step))
    op.eager_autograd = type(op._name.replace("::", "_"), (torch.autograd.Function,), methods)


# argument types that let a call take the eager path: plain tensors and the scalars the ops take. Anything else (a
# FakeTensor, a FunctionalTensor while tracing) goes through the custom op. A set lookup per argument: isinstance
# checks cost ~0.15 ms of host time per CIFAR-10 inference step.
_EAGER_ARG_TYPES = {torch.Tensor, torch.nn.Parameter, int, float, bool, type(None), torch.dtype}


def call(op, *args):
    """Run one of our custom ops.

    Under torch.compile, or any tracing (fake or functional tensors), through the custom op, which Dynamo keeps as one
    opaque call with its fake implementation and autograd formula. In eager mode straight to the implementation (an
    autograd.Function when a gradient can flow): the custom op's Python dispatch took ~0.5 ms a call under cProfile on
    an H100 with torch 2.11 (`backend_impl`, 50 calls per CIFAR-10 inference step), and made the step host-bound.
    """
    if torch.compiler.is_compiling() or not _EAGER_ARG_TYPES.issuperset(map(type, args)):
        return op(*args)
    if op.eager_autograd is not None and torch.is_grad_enabled():
        return op.eager_autograd.apply(*args)
    return op.eager_impl(*args)
