"""LayerNorm launchers: the forward writes the normalised rows in the compute dtype (what the next GEMM reads) with
the fp32 statistics; the backward adds the residual gradient in the same pass."""

import torch

from ..configs import (
    LAYERNORM_BWD_CONFIGS,
    LAYERNORM_BWD_PROGRAMS_PER_SM,
    LAYERNORM_FWD_PARAMS,
    prune_layernorm_bwd,
    row_kernel_params,
)
from ..kernels.layernorm import layernorm_bwd_kernel, layernorm_fwd_kernel
from ..tuning import Launcher, launch_kernel
from ._common import as_unit_rows, cdiv, next_pow2, persistent_programs
from .reduce import column_sums

MAX_LN_DIM = 8192  # the row kernels keep a whole row in registers

_bwd = Launcher(layernorm_bwd_kernel, LAYERNORM_BWD_CONFIGS, ["M", "D"], prune_layernorm_bwd)


def layernorm_fwd(x, weight, bias, eps, out_dtype):
    """(y, mean, rstd): y = LayerNorm(x) [..., D] in out_dtype, mean and rstd [M] in fp32 (M rows of x [..., D], read
    in place where its leading dims collapse to one stride: _common.as_unit_rows)."""
    return _layernorm_fwd(x, None, weight, bias, eps, out_dtype)[1:]


def add_layernorm_fwd(x, residual, weight, bias, eps, out_dtype):
    """(s, y, mean, rstd): s = residual + x in the dtype torch's add gives them (the residual stream's), then
    layernorm_fwd(s, ...), in one pass over the rows (flash-attention's layer_norm with a residual). x and residual
    are [..., D] alike."""
    if x.shape != residual.shape:
        raise ValueError(f"add_layernorm_fwd: x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
    return _layernorm_fwd(x, residual, weight, bias, eps, out_dtype)


def _layernorm_fwd(x, residual, weight, bias, eps, out_dtype):
    D = x.shape[-1]
    M = x.numel() // D
    y = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    mean = torch.empty(M, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    s = None  # the sum, contiguous, rows D apart
    if residual is not None:
        s = torch.empty(x.shape, device=x.device, dtype=torch.promote_types(residual.dtype, x.dtype))
    if M == 0:  # an empty batch: nothing to launch
        return s, y, mean, rstd
    x, x_rows = as_unit_rows(x)
    residual, res_rows = as_unit_rows(residual) if residual is not None else (None, 0)
    block_m, block_d, warps = row_kernel_params(D, **LAYERNORM_FWD_PARAMS)
    args = (x, residual, s, weight, bias, y, mean, rstd, M, D, x_rows, res_rows, D, D, eps)
    launch_kernel(
        layernorm_fwd_kernel, (cdiv(M, block_m),), args, dict(BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
    )
    return s, y, mean, rstd


def layernorm_bwd(dy, x, mean, rstd, weight, dres=None, dx_low=None, dx_sum_dtype=None):
    """(dx, dw, db) of LayerNorm, dx += dres in the same pass; dw and db [D], the weight's and the bias's gradients,
    fp32 sums rounded once to weight's dtype (one column sum adds up both). dy, x, dres and dx are [..., D] alike.
    dx_low, a contiguous tensor of x's shape in another dtype (the compute dtype of the GEMMs that read the gradient
    next), is filled with dx in its dtype by the same pass, instead of a cast that reads dx again.

    With dx_sum_dtype, also the column sums of dx as the next GEMM reads it (dx_low, else dx), rounded once to that
    dtype: the bias gradient of the GEMM whose output dx is the gradient of, from the same pass and the same column
    sums, where a column sum of its own would read the [..., D] rows again. Returned fourth."""
    D = x.shape[-1]
    M = x.numel() // D
    if dx_low is not None and (dx_low.shape != x.shape or not dx_low.is_contiguous()):
        layout = "" if dx_low.is_contiguous() else ", not contiguous"
        raise ValueError(f"dx_low must be a contiguous {tuple(x.shape)} tensor, got {tuple(dx_low.shape)}{layout}")
    if M == 0:
        dx_sum = (torch.zeros(D, device=x.device, dtype=dx_sum_dtype),) if dx_sum_dtype is not None else ()
        return torch.empty_like(x), torch.zeros_like(weight), torch.zeros_like(weight), *dx_sum
    dy, dy_rows = as_unit_rows(dy)
    x, x_rows = as_unit_rows(x)
    dres, dres_rows = as_unit_rows(dres) if dres is not None else (None, 0)
    # persistent programs, as many whichever config the tuner takes (the partial sums' rows are one a program)
    programs = min(M, persistent_programs(x.device, LAYERNORM_BWD_PROGRAMS_PER_SM))
    rows_per_program = cdiv(M, programs)
    programs = cdiv(M, rows_per_program)
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)  # contiguous, rows D apart
    # [programs, 2D or 3D]: each program's partial sums of the weight's gradient, then of the bias's (then of dx),
    # so that one column sum adds them all up
    sum_dx = dx_sum_dtype is not None
    parts = torch.empty((programs, (3 if sum_dx else 2) * D), device=x.device, dtype=torch.float32)
    args = (dy, x, mean, rstd, weight, dres, dx, dx_low, parts, M, D, rows_per_program, dy_rows, x_rows, dres_rows, D)
    low = dx_low is not None and dx_low.dtype
    key = (M, D, dy.dtype, x.dtype, dres is not None and dres.dtype, low, sum_dx, x.device)
    _bwd.launch(key, lambda cfg: (programs,), *args, BLOCK_D=next_pow2(D), SUM_DX=sum_dx)
    # our column sums rather than torch's sum(0): the same bytes (4.9 MB at 1,584 programs, D = 384), and in a step
    # plan's replay a direct launch instead of a torch reduction's host path, 25 a CIFAR-10 training step
    sums = [(D, weight.dtype), (D, weight.dtype)] + ([(D, dx_sum_dtype)] if sum_dx else [])
    return dx, *column_sums(parts, sums)
