"""Dtype casts of several tensors in one launch (kernels/cast.py): what a step plan's batch of autocast's casts runs
instead of torch._foreach_copy_, which launches a kernel per tensor when the dtypes differ.

  copy_cast(dsts, srcs)        dsts[i].copy_(srcs[i]) for every i, CAST_PAIRS pairs a launch
  copy_cast_unchecked(...)     the same without the checks: what a step plan's replay calls
  copy_cast_ref(dsts, srcs)    torch._foreach_copy_(dsts, srcs)

Only step plans call it, inside their replays, which neither autograd nor torch.compile see: a plain function, no
custom op.
"""

import torch

from ..configs import CAST_BLOCK, CAST_WARPS, cast_kernel_on
from ..kernels.cast import CAST_PAIRS, cast_pairs_kernel
from ..tuning import launch_kernel
from . import _common  # _common.interpreting read per call: the host benchmark stands CPU tensors in for a GPU's
from ._common import cdiv

CAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def copy_cast(dsts, srcs) -> None:
    """dsts[i].copy_(srcs[i]) for each pair: contiguous tensors of the same shape on one device, the sources of one
    float dtype and the destinations of one (as a batch of casts is). On a GPU and under the interpreter our kernel,
    CAST_PAIRS pairs a launch; elsewhere (a CPU without the interpreter), or with FASTVIT_CAST_KERNEL=0,
    torch._foreach_copy_."""
    dsts, srcs = list(dsts), list(srcs)
    if len(dsts) != len(srcs):
        raise ValueError(f"copy_cast: {len(dsts)} destinations but {len(srcs)} sources")
    if not dsts:
        return
    device, src_dtype, dst_dtype = srcs[0].device, srcs[0].dtype, dsts[0].dtype
    for i, (d, s) in enumerate(zip(dsts, srcs)):
        if d.shape != s.shape or d.device != device or s.device != device:
            raise ValueError(
                f"copy_cast: pair {i} has {tuple(d.shape)} on {d.device} from {tuple(s.shape)} on {s.device}"
            )
        if s.dtype != src_dtype or d.dtype != dst_dtype:
            raise TypeError(f"copy_cast: pair {i} casts {s.dtype} to {d.dtype}, the first {src_dtype} to {dst_dtype}")
        if not (d.is_contiguous() and s.is_contiguous()):
            raise ValueError(f"copy_cast: pair {i} is not contiguous")
    copy_cast_unchecked(dsts, srcs)


def copy_cast_unchecked(dsts, srcs) -> None:
    """copy_cast without its checks (~1 us a pair of host time): for a step plan's batches, whose pairs are what
    copy_cast accepts by construction (recording._batch: contiguous casts to a new tensor of the same shape, grouped
    by dtypes and device)."""
    device, src_dtype, dst_dtype = srcs[0].device, srcs[0].dtype, dsts[0].dtype
    ours = (device.type == "cuda" or _common.interpreting()) and src_dtype in CAST_DTYPES and dst_dtype in CAST_DTYPES
    if not ours or not cast_kernel_on():
        torch._foreach_copy_(dsts, srcs)
        return
    pairs = [(s, d) for d, s in zip(dsts, srcs) if s.numel() > 0]
    opts = {} if _common.interpreting() else {"num_warps": CAST_WARPS}
    for first in range(0, len(pairs), CAST_PAIRS):
        group = pairs[first : first + CAST_PAIRS]
        args = [a for s, d in group for a in (s, d, s.numel())]
        args += [None, None, 0] * (CAST_PAIRS - len(group))
        chunks = cdiv(max(s.numel() for s, _ in group), CAST_BLOCK)
        launch_kernel(cast_pairs_kernel, (chunks, len(group)), args, {"BLOCK": CAST_BLOCK, **opts})


def copy_cast_ref(dsts, srcs) -> None:
    torch._foreach_copy_(list(dsts), list(srcs))
