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


def column_sum(g, out_dtype=torch.float32):
    """The fp32 sums over the rows of g [..., N] (kernels/reduce.py), [N] in out_dtype (rounded once): each program's
    partial row, added up by the last program of its column strip."""
    return column_sums(g, [(g.shape[-1], out_dtype)])[0]


def column_sums(g, parts):
    """column_sum's sums as consecutive column ranges, one tensor each: parts [(width, dtype), ...], one to three,
    widths adding up to N. Several gradients from one pass (the LayerNorm backward's weight and bias gradients and
    the next GEMM's bias gradient), each rounded once to its own dtype, and no views of one tensor to make, which
    would cost a step plan's replay a line each."""
    return _column_sums(g, parts, None)[1:]


def gelu_grad_column_sum(g, pre, out_dtype):
    """(dg, its column sums): dg = g * GELU'(pre) [..., N] in g's dtype (torch's gelu_backward, exact GELU), and the
    fp32 sums of its rounded rows [N] in out_dtype: fc1's d pre-activation and its bias gradient in one pass, where
    gelu_backward and a column sum read and wrote [..., N] three times and read it again."""
    if pre.shape != g.shape:
        raise ValueError(f"gelu_grad_column_sum: g {tuple(g.shape)} and pre {tuple(pre.shape)} differ")
    dg, db = _column_sums(g, [(g.shape[-1], out_dtype)], pre)
    return dg, db


def _column_sums(g, parts, pre):
    """(dg or None, *sums): column_sums of g, or with pre of dg = g * GELU'(pre) (gelu_grad_column_sum)."""
    N = g.shape[-1]
    R = g.numel() // N
    widths = [w for w, _ in parts]
    if not 1 <= len(parts) <= 3 or sum(widths) != N or min(widths) < 1:
        raise ValueError(f"column_sums: parts of widths {widths} do not split {N} columns into one to three")
    starts = [sum(widths[:i]) for i in range(len(parts))]
    if R == 0 or not column_sum_kernel_on():  # FASTVIT_COLUMN_SUM=0: torch's gelu_backward, sum and casts
        dg = torch.ops.aten.gelu_backward(g, pre) if pre is not None else None
        sums = (g if dg is None else dg).reshape(R, N).sum(0, dtype=torch.float32)  # [..., N] -> [R, N] -> [N]
        return dg, *(sums[s : s + w].to(dt, copy=True) for s, (w, dt) in zip(starts, parts))
    g, g_rows = as_unit_rows(g)
    pre, pre_rows = as_unit_rows(pre) if pre is not None else (None, 0)
    dg = torch.empty(g.shape, device=g.device, dtype=g.dtype) if pre is not None else None  # contiguous, rows N apart
    strips = cdiv(N, COLUMN_SUM_BLOCK_N)
    programs = max(1, min(cdiv(R, 32), COLUMN_SUM_PROGRAMS_PER_SM * num_sms(g.device) // strips))
    rows_per_program = cdiv(R, programs)
    programs = cdiv(R, rows_per_program)
    partials = torch.empty((programs, N), device=g.device, dtype=torch.float32)
    outs = [torch.empty(w, device=g.device, dtype=dt) for w, dt in parts]
    out, out2, out3 = (*outs, None, None)[:3]
    split2, split3 = (*starts[1:], 0, 0)[:2]
    arrived = arrival_counters(strips, g.device)
    key = ("column_sum", R, N, g.dtype, tuple(parts), pre is not None and pre.dtype, g.device)
    _colsum.launch(
        key,
        lambda cfg: (strips, programs),
        g,
        pre,
        dg,
        partials,
        out,
        out2,
        out3,
        arrived,
        R,
        N,
        rows_per_program,
        g_rows,
        pre_rows,
        split2,
        split3,
        BLOCK_N=COLUMN_SUM_BLOCK_N,
    )
    return dg, *outs
