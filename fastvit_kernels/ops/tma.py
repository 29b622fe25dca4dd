"""Whether a GEMM's tensors can be read and written through tensor descriptors (TMA), and the device memory Triton
builds a launch's descriptors in: the GEMM engine's (ops/gemm.py) and the step plans' (plan.py) questions."""

import torch
import triton

from ._common import device_properties, interpreting, row_stride


class Scratch:
    """Triton's allocator for the tensor descriptors that TMA kernels build on the device (128 B each, in memory
    Triton asks for at every launch): one buffer per device and stream, kept and grown as launches need, instead of
    a torch.empty a launch (a caching-allocator call of host time for each GEMM launch). Launches on one stream run
    one after another, so each finds the buffer free; during a CUDA graph capture each launch gets memory of its own
    (the graph keeps what it captured, and may be replayed on another stream)."""

    def __init__(self, device_type: str = "cuda"):
        self.device_type = device_type
        self.buffers = {}  # (device index, stream handle) -> int8 buffer

    def __call__(self, size: int, alignment: int, stream):
        if torch.cuda.is_current_stream_capturing():
            return torch.empty(size, device=self.device_type, dtype=torch.int8)
        key = (torch.cuda.current_device(), stream)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < size:  # the allocator's blocks are 512-byte aligned: >= `alignment`
            buffer = self.buffers[key] = torch.empty(size, device=self.device_type, dtype=torch.int8)
        return buffer


_scratch = Scratch()


def operands_ok(a, a_rows, weight) -> bool:
    """Whether a [..., K] (rows a_rows apart) and weight [N, K] can be read through tensor descriptors: K contiguous in
    a, K or N contiguous in the weight (nn.Linear's as stored, or untransposed, as fc2's dX GEMM with GELU' reads
    W2), the other strides and base addresses 16-byte aligned (the copy engine's rule; D = 100 in bf16 breaks it), and
    a Hopper GPU or the interpreter."""
    if a.is_cuda and device_properties(a.device).major < 9:
        return False
    es = a.element_size()
    w_row, w_col = weight.stride()
    w_major = (w_col == 1 and (w_row * es) % 16 == 0) or (w_row == 1 and (w_col * es) % 16 == 0)
    return rows_ok(a, a_rows) and w_major and weight.data_ptr() % 16 == 0


def rows_ok(t, rows) -> bool:
    """Whether t [..., C], its rows `rows` apart, can be read through a tensor descriptor: unit column stride, rows
    and base address 16-byte aligned (the copy engine's rule), and rows of their own (an expanded tensor's share
    memory: fine for pointer loads, not for a descriptor)."""
    return t.stride(-1) == 1 and rows > 0 and (rows * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def epilogue_ok(operands, N, out_dtype, res, pre) -> bool:
    """Whether the epilogue's tensors can go through tensor descriptors too, where the operands do (operands:
    operands_ok's answer): C [M, N] (made contiguous), the residual and the pre-activation as the kernel reads them,
    with 16-byte aligned rows and base addresses (where as_rows will copy one, the contiguous copy's)."""

    def ok(t):
        if t is None:
            return True
        rows = row_stride(t)
        if rows is None:  # the copy's rows: contiguous, at an allocator's aligned address
            return t.shape[-1] > 0 and (t.shape[-1] * t.element_size()) % 16 == 0
        return rows_ok(t, rows)

    return operands and (N * out_dtype.itemsize) % 16 == 0 and ok(res) and ok(pre)


def set_allocator() -> None:
    """Triton's allocator for the on-device descriptors of a TMA launch (a context variable: set where the launch
    happens)."""
    if not interpreting():
        triton.set_allocator(_scratch)
