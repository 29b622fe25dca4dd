"""Column sums of a tall matrix (kernels/reduce.py): the bias gradient beside cuBLAS's weight gradient, and the
LayerNorm backward's weight and bias gradients from its programs' partial rows. One launch where torch's `sum(0)`
and a cast were two, and in a step plan's replay a direct launch of ours instead of a torch reduction's host path."""

import torch

from ..configs import (
    COLUMN_SUM_BLOCK_N,
    COLUMN_SUM_CONFIGS,
    COLUMN_SUM_PROGRAMS_PER_SM,
    column_sum_kernel_on,
    prune_column_sum,
)
from ..kernels.reduce import column_sum_kernel
from ..tuning import Launcher
from ._common import arrival_counters, as_unit_rows, cdiv, num_sms

_colsum = Launcher(column_sum_kernel, COLUMN_SUM_CONFIGS, ["R", "N"], prune_column_sum)


def column_sum(g, out_dtype=torch.float32, split=None):
    """The fp32 sums over the rows of g [..., N] (kernels/reduce.py), [N] in out_dtype (rounded once): each program's
    partial row, added up by the last program of its column strip. With `split`, the sums of columns [0, split) and
    [split, N) as two tensors (the LayerNorm backward's weight and bias gradients: one pass, and no views of one
    tensor to make, which would cost a step plan's replay a line each)."""
    N = g.shape[-1]
    R = g.numel() // N
    if split is not None and not 0 < split < N:
        raise ValueError(f"column_sum: split {split} outside (0, {N})")
    if R == 0:
        out = torch.zeros(N, device=g.device, dtype=out_dtype)
        return out if split is None else (out[:split].clone(), out[split:].clone())
    if not column_sum_kernel_on():  # FASTVIT_COLUMN_SUM=0: torch's sum and cast
        out = g.reshape(R, N).sum(0, dtype=torch.float32).to(out_dtype)  # [..., N] -> [R, N] -> [N]
        return out if split is None else (out[:split].clone(), out[split:].clone())
    g, g_rows = as_unit_rows(g)
    strips = cdiv(N, COLUMN_SUM_BLOCK_N)
    programs = max(1, min(cdiv(R, 32), COLUMN_SUM_PROGRAMS_PER_SM * num_sms(g.device) // strips))
    rows_per_program = cdiv(R, programs)
    programs = cdiv(R, rows_per_program)
    parts = torch.empty((programs, N), device=g.device, dtype=torch.float32)
    out = torch.empty(N if split is None else split, device=g.device, dtype=out_dtype)
    out2 = None if split is None else torch.empty(N - split, device=g.device, dtype=out_dtype)
    arrived = arrival_counters(strips, g.device)
    key = ("column_sum", R, N, split, g.dtype, out_dtype, g.device)
    _colsum.launch(
        key,
        lambda cfg: (strips, programs),
        g,
        parts,
        out,
        out2,
        arrived,
        R,
        N,
        rows_per_program,
        g_rows,
        split or 0,
        BLOCK_N=COLUMN_SUM_BLOCK_N,
    )
    return out if split is None else (out, out2)
