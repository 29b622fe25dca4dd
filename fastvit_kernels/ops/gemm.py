"""The GEMM engine of the linear layers: where a GEMM with a fused epilogue, and a weight gradient, are launched.

  linear(a, weight, bias, epilogue=..., ...)     C = epilogue(a @ weight^T + bias)
  linear_gelu_grad(a, weight, pre, bias_dtype)   (C = (a @ weight^T) * GELU'(pre), the column sums of C)
  linear_residual_layernorm(a, weight, ...)     X = residual + a @ weight^T + bias, Y = LayerNorm(X)
  linear_weight_grad(g, x, need_bias)            (dW, db) of y = x @ W^T + b

a is [..., K] (any leading dims, read as rows without a copy where they collapse to one stride, as in every
contiguous tensor: _common.as_rows), weight [N, K] as nn.Linear keeps it (any strides), and C comes back as [..., N]:
the ops pass their tensors as they are, no reshape or transpose per call (each is ~1.5 us of host time).

Every fused linear of the model goes through these functions: another GEMM backend plugs in here, and nowhere else.
Each has at least two candidates, our Triton kernel and cuBLAS (torch's matmul) with the epilogue as torch ops or our
row kernel; the GEMM with the next LayerNorm has a second of ours ("triton+ln": the _LAYERNORM_* tables at the
end). fastvit_kernels.tuning.pick_gemm_backend says which runs (measured per shape on a GPU, the first elsewhere).
"""

import torch
import torch.nn.functional as F

from ..configs import (
    GROUP_M,
    LINEAR_DW_CONFIGS,
    LINEAR_FWD_CONFIGS,
    LINEAR_LN_CONFIGS,
    TMA_PROGRAMS_PER_SM,
    prune_linear_dw,
    prune_linear_fwd,
    prune_linear_ln,
)
from ..kernels.gemm import linear_dw_kernel, linear_fwd_kernel
from ..kernels.gemm_layernorm import linear_residual_layernorm_kernel
from ..tuning import Launcher, known_gemm_backend, pick_gemm_backend
from . import tma
from ._common import (
    arrival_counters,
    as_rows,
    as_unit_rows,
    cdiv,
    dot_precision,
    next_pow2,
    num_sms,
    split_rows,
)
from .layernorm import add_layernorm_fwd, layernorm_fwd
from .reduce import column_sum, gelu_grad_column_sum

EPILOGUES = ("none", "gelu", "gelu_grad", "residual")
LINEAR_FWD_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in LINEAR_FWD_CONFIGS)  # the most row blocks a config makes
LINEAR_FWD_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in LINEAR_FWD_CONFIGS)  # and column blocks


_fwd = Launcher(
    linear_fwd_kernel,
    LINEAR_FWD_CONFIGS,
    ["M", "N", "K", "EPILOGUE", "DOT_PRECISION", "TMA_OK", "EPI_TMA_OK"],
    prune_linear_fwd,
)
_fwd_ln = Launcher(
    linear_residual_layernorm_kernel, LINEAR_LN_CONFIGS, ["M", "N", "K", "DOT_PRECISION", "TMA_OK"], prune_linear_ln
)
_dw = Launcher(linear_dw_kernel, LINEAR_DW_CONFIGS, ["R", "NF", "KF", "DOT_PRECISION"], prune_linear_dw)


def linear(a, weight, bias=None, *, epilogue="none", pre=None, residual=None, out_dtype=None):
    """C [..., N] = epilogue(a [..., K] @ weight [N, K]^T + bias), a and weight in the compute dtype.

    epilogue: "none"; "gelu" (exact erf GELU; writes the pre-activation into `pre` [..., N] when given, for the
    backward); "gelu_grad" (multiplies by GELU'(pre), `pre` read); "residual" (adds `residual` [..., N], C in
    out_dtype).
    """
    if epilogue not in EPILOGUES:
        raise ValueError(f"unknown epilogue {epilogue!r}: expected one of {', '.join(EPILOGUES)}")
    _check_compute_dtype(a, weight)
    K = a.shape[-1]
    M = a.numel() // K
    N = weight.shape[0]
    out_dtype = out_dtype or weight.dtype
    res = residual if epilogue == "residual" else None
    pre = pre if epilogue in ("gelu", "gelu_grad") else None
    if M == 0:  # an empty batch: nothing to launch
        return torch.empty((*a.shape[:-1], N), device=a.device, dtype=out_dtype)
    args = _linear_args(a, weight, bias, epilogue, pre, res, out_dtype)
    return _run(args[-1], a.is_cuda, _LINEAR, args)


def linear_gelu_grad(a, weight, pre, bias_dtype):
    """(d pre, db): d pre [..., N] = (a [..., K] @ weight [N, K]^T) * GELU'(pre), linear's "gelu_grad" (fc2's input
    gradient through GELU: fc1's output gradient), and its column sums [N] in bias_dtype, fc1's bias gradient, each
    candidate summing where it already holds d pre, so that no pass reads it again for them: ours in its tiles'
    epilogue (a partial row a row block, which the last tile of each column block adds up: one launch), cuBLAS's in
    the pass that applies GELU' (reduce.gelu_grad_column_sum). Each candidate is timed with its sums."""
    _check_compute_dtype(a, weight)
    if pre.shape != (*a.shape[:-1], weight.shape[0]):
        raise ValueError(f"pre has shape {tuple(pre.shape)}; expected {(*a.shape[:-1], weight.shape[0])}")
    if a.numel() == 0:  # an empty batch: nothing to launch
        return torch.empty_like(pre, dtype=weight.dtype), torch.zeros(
            weight.shape[0], device=a.device, dtype=bias_dtype
        )
    args = _linear_args(a, weight, None, "gelu_grad", pre, None, weight.dtype)
    key = args[-1]  # ("linear", M, N, K, ..., device): the same shape, with the bias sums' dtype
    return _run(("linear+bias", *key[1:-1], bias_dtype, key[-1]), a.is_cuda, _GELU_GRAD_BIAS, (args, bias_dtype))


def _check_compute_dtype(a, weight):
    if a.dtype != weight.dtype:
        raise TypeError(f"linear: a is {a.dtype} but the weight is {weight.dtype}; both must be the compute dtype")


def _linear_args(a, weight, bias, epilogue, pre, res, out_dtype):
    """The candidates' arguments of a linear (a read as rows in place where it can be), its key last."""
    K = a.shape[-1]
    M, N = a.numel() // K, weight.shape[0]
    a, a_rows = as_rows(a)
    tma_ok = tma.operands_ok(a, a_rows, weight)
    epi_ok = tma.epilogue_ok(tma_ok, N, out_dtype, res, pre)
    key = _linear_key(M, N, K, epilogue, a, weight, bias, pre, res, out_dtype, tma_ok, epi_ok)
    return (a, a_rows, weight, bias, epilogue, pre, res, out_dtype, tma_ok, epi_ok, key)


def _gelu_grad_bias_triton(args, bias_dtype):
    return _linear_triton(*args, sums_dtype=bias_dtype)


def _gelu_grad_bias_cublas(args, bias_dtype):
    a, _, weight, _, _, pre = args[:6]
    return gelu_grad_column_sum(F.linear(a, weight), pre, bias_dtype)  # F.linear rounds as eager's GEMM does


def _linear_key(M, N, K, epilogue, a, weight, bias, pre, res, out_dtype, tma_ok, epi_ok):
    """Everything a linear's backend, configuration and launch grid depend on."""
    key = ("linear", M, N, K, epilogue, a.dtype, out_dtype, res is not None and res.dtype, bias is not None)
    return key + (pre is not None, weight.stride(1), tma_ok, epi_ok, dot_precision(a.dtype), a.device)


def _run(key, timed, candidates: dict, args):
    """The chosen candidate's result (candidates: backend name -> function of args, ours first):
    fastvit_kernels.tuning.pick_gemm_backend decides at the key's first GEMM."""
    global last_backend
    backend = known_gemm_backend(key)
    if backend is None:
        backend = pick_gemm_backend(key, {name: (lambda fn=fn: fn(*args)) for name, fn in candidates.items()}, timed)
    last_backend = backend
    return candidates[backend](*args)


last_backend = None  # the backend of the latest GEMM: the per-GEMM benchmark rows record it


def _linear_cublas(a, a_rows, weight, bias, epilogue, pre, res, out_dtype, tma_ok, epi_ok, key):
    """torch's GEMM (cuBLAS on a GPU) rounding to the compute dtype, then the epilogue as torch ops: eager autocast's
    sequence, so it rounds the product before the epilogue where eager does."""
    if epilogue == "gelu" and pre is not None:  # the pre-activation straight into the buffer the backward reads
        a2, pre2 = a.reshape(-1, a.shape[-1]), pre.view(-1, pre.shape[-1])  # [M, K], [M, N]
        if bias is not None:
            torch.addmm(bias, a2, weight.t(), out=pre2)
        else:
            torch.mm(a2, weight.t(), out=pre2)
        y = pre
    else:
        y = F.linear(a, weight, bias)
    if epilogue == "gelu":
        return F.gelu(y)
    if epilogue == "gelu_grad":
        return torch.ops.aten.gelu_backward(y, pre)
    if epilogue == "residual":
        return torch.add(res, y).to(out_dtype)
    return y


def _linear_triton(a, a_rows, weight, bias, epilogue, pre, res, out_dtype, tma_ok, epi_ok, key, sums_dtype=None):
    """C, or with sums_dtype (C, its column sums in that dtype): the tiles leave one partial row a row block, and each
    column block's last tile adds them up (kernels/gemm_epilogue.py finish_column_sums)."""
    K = a.shape[-1]
    M = a.numel() // K
    N = weight.shape[0]
    c = torch.empty((*a.shape[:-1], N), device=a.device, dtype=out_dtype)  # [..., N], contiguous
    # the column sums' partial rows: [row blocks of the smallest BLOCK_M any config has, N], each config fills its
    # first cdiv(M, BLOCK_M), and the kernel adds them up into db (its arrival counters: one a column block)
    colsum = db = arrived = None
    if sums_dtype is not None:
        colsum = torch.empty((cdiv(M, LINEAR_FWD_MIN_BLOCK_M), N), device=a.device, dtype=torch.float32)
        db = torch.empty(N, device=a.device, dtype=sums_dtype)
        arrived = arrival_counters(cdiv(N, LINEAR_FWD_MIN_BLOCK_N), a.device)
        key = key + ("sums",)
    programs = TMA_PROGRAMS_PER_SM * num_sms(a.device)  # the persistent TMA tiles' grid, at most
    if tma_ok:
        tma.set_allocator()
    res, res_rows = as_rows(res) if res is not None else (None, 0)
    pre_rows = _output_rows(pre) if pre is not None else 0

    def grid(cfg):
        tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
        return (min(tiles, programs),) if cfg["USE_TMA"] and tma_ok else (tiles,)

    w_row, w_col = weight.stride()
    _fwd.launch(
        key,
        grid,
        a,
        weight,
        c,
        bias,
        res,
        pre,
        colsum,
        db,
        arrived,
        M,
        N,
        K,
        programs,
        a_rows,
        a.stride(-1),
        w_col,  # B = weight^T [K, N]: K steps along the weight's columns
        w_row,
        N,
        1,
        res_rows,
        res.stride(-1) if res is not None else 0,
        pre_rows,
        pre.stride(-1) if pre is not None else 0,
        EPILOGUE=epilogue,
        DOT_PRECISION=dot_precision(a.dtype),
        GROUP_M=GROUP_M,
        TMA_OK=tma_ok,
        EPI_TMA_OK=epi_ok,
    )
    return c if db is None else (c, db)


def _output_rows(t):
    """The row stride of a buffer a kernel writes (its rows cannot be copied elsewhere)."""
    t2, rows = as_rows(t)
    if t2 is not t:
        raise ValueError(f"an output buffer's rows must be one stride apart, got strides {t.stride()}")
    return rows


LN_CHUNK = 128  # columns per accumulator of the full-row GEMM
MAX_LN_EPILOGUE_DIM = 4 * LN_CHUNK  # wider rows: the residual GEMM, then the LayerNorm row kernel


def linear_residual_layernorm(a, weight, bias, residual, norm_weight, norm_bias, eps, norm_dtype):
    """(X, Y, mean, rstd) with X [..., N] = residual + a @ weight^T + bias in the residual stream's dtype,
    Y = LayerNorm(X) in norm_dtype (what the next GEMM reads), the fp32 row statistics of X [M]. Ours: the full-row
    tile (N <= 512, one launch) and the residual GEMM followed by the row kernel; against cuBLAS's GEMM and the row
    kernel adding the residual (timed once per shape: _run). residual: [..., N] as a."""
    K = a.shape[-1]
    M = a.numel() // K
    N = weight.shape[0]
    out_dtype = torch.promote_types(residual.dtype, weight.dtype)
    if M == 0:  # an empty batch: nothing to launch
        stats = torch.empty(0, device=a.device, dtype=torch.float32)
        shape = (*a.shape[:-1], N)
        return a.new_empty(shape, dtype=out_dtype), a.new_empty(shape, dtype=norm_dtype), stats, stats.clone()
    a, a_rows = as_rows(a)
    tma_ok = tma.operands_ok(a, a_rows, weight)
    key = ("layernorm", M, N, K, a.dtype, residual.dtype, norm_dtype, bias is not None, tma_ok, dot_precision(a.dtype))
    key += (a.device,)
    args = (a, a_rows, weight, bias, residual, norm_weight, norm_bias, eps, norm_dtype, out_dtype, tma_ok, key)
    return _run(key, a.is_cuda, _LAYERNORM_FULL_ROW if N <= MAX_LN_EPILOGUE_DIM else _LAYERNORM_WIDE, args)


def _residual_then_layernorm_triton(
    a, a_rows, weight, bias, residual, norm_weight, norm_bias, eps, norm_dtype, out_dtype, tma_ok, key
):
    """Our residual GEMM, then the LayerNorm row kernel: beside the full-row tile, and for rows wider than it spans."""
    K = a.shape[-1]
    M, N = a.numel() // K, weight.shape[0]
    epi_ok = tma.epilogue_ok(tma_ok, N, out_dtype, residual, None)
    gemm_key = _linear_key(M, N, K, "residual", a, weight, bias, None, residual, out_dtype, tma_ok, epi_ok)
    x = _linear_triton(a, a_rows, weight, bias, "residual", None, residual, out_dtype, tma_ok, epi_ok, gemm_key)
    return (x, *layernorm_fwd(x, norm_weight, norm_bias, eps, norm_dtype))


def _residual_layernorm_cublas(
    a, a_rows, weight, bias, residual, norm_weight, norm_bias, eps, norm_dtype, out_dtype, *_
):
    """cuBLAS's GEMM, then the residual add and the LayerNorm in our row kernel (one pass over the rows)."""
    branch = F.linear(a, weight, bias)
    if torch.promote_types(residual.dtype, branch.dtype) != out_dtype:  # a sum eager would round twice
        x = torch.add(residual, branch).to(out_dtype)
        return (x, *layernorm_fwd(x, norm_weight, norm_bias, eps, norm_dtype))
    return add_layernorm_fwd(branch, residual, norm_weight, norm_bias, eps, norm_dtype)


def _residual_layernorm_triton(
    a, a_rows, weight, bias, residual, norm_weight, norm_bias, eps, norm_dtype, out_dtype, tma_ok, key
):
    K = a.shape[-1]
    M = a.numel() // K
    N = weight.shape[0]
    shape = (*a.shape[:-1], N)
    x = torch.empty(shape, device=a.device, dtype=out_dtype)  # the stream, contiguous
    y = torch.empty(shape, device=a.device, dtype=norm_dtype)
    mean = torch.empty(M, device=a.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    residual, res_rows = as_unit_rows(residual)  # the kernel reads the residual's rows at unit stride
    block_n = min(LN_CHUNK, max(16, next_pow2(N)))  # tl.dot takes no dimension under 16
    if tma_ok:
        tma.set_allocator()
    w_row, w_col = weight.stride()
    _fwd_ln.launch(
        key,
        lambda cfg: (cdiv(M, cfg["BLOCK_M"]),),
        a,
        weight,
        bias,
        residual,
        x,
        norm_weight,
        norm_bias,
        y,
        mean,
        rstd,
        M,
        N,
        K,
        a_rows,
        a.stride(-1),
        w_col,  # B = weight^T [K, N]
        w_row,
        res_rows,
        N,
        N,
        eps,
        DOT_PRECISION=dot_precision(a.dtype),
        BLOCK_N=block_n,
        N_CHUNKS=cdiv(N, block_n),
        TMA_OK=tma_ok,
    )
    return x, y, mean, rstd


def linear_weight_grad(g, x, need_bias=True, out_dtype=torch.float32, bias_rows=None):
    """(dW [NF, KF], db [NF] or None) for y = x @ W^T + b with dL/dy = g [..., NF], x [..., KF] as the forward's GEMM
    read it (R rows each): fp32 sums, written in out_dtype (the weight's, so that no cast follows). The reduction over
    rows is split (see split_rows); the kernel adds the splits' partials itself (a zero-fill of its arrival counters
    and one launch a call; a step plan's replay takes the counters zeroed: arrival_counters).

    bias_rows: fp32 rows [P, NF] whose column sums are g's, left by the pass that wrote g (the attention backward's,
    for qkv): then db is their column sum, and the candidates run without a bias (cuBLAS's would read g again for
    it, ours sum g with a ones-dot in its K loop)."""
    NF, KF = g.shape[-1], x.shape[-1]
    R = g.numel() // NF
    if R == 0:  # an empty batch: the sums over no rows
        zeros = torch.zeros(NF, device=g.device, dtype=out_dtype)
        return torch.zeros((NF, KF), device=g.device, dtype=out_dtype), (zeros if need_bias else None)
    if need_bias and bias_rows is not None:  # the candidates without a bias, the bias from those rows
        dw, _ = linear_weight_grad(g, x, need_bias=False, out_dtype=out_dtype)
        return dw, column_sum(bias_rows, out_dtype)
    key = ("weight_grad", R, NF, KF, g.dtype, x.dtype, out_dtype, need_bias, dot_precision(g.dtype), g.device)
    return _run(key, g.is_cuda, _WEIGHT_GRAD, (g, x, need_bias, out_dtype, key))


def _weight_grad_cublas(g, x, need_bias, out_dtype, key):
    """G^T @ X through cuBLAS (fp32 accumulation, rounded to G's dtype as eager's backward rounds), the bias as our
    column sums (fp32, rounded once to out_dtype)."""
    g, x = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])  # [R, NF], [R, KF]
    db = column_sum(g, out_dtype) if need_bias else None
    return (g.t() @ x).to(out_dtype), db


def _weight_grad_triton(g, x, need_bias, out_dtype, key):
    NF, KF = g.shape[-1], x.shape[-1]
    R = g.numel() // NF
    g, g_rows = as_rows(g)
    x, x_rows = as_rows(x)
    dw = torch.empty((NF, KF), device=g.device, dtype=out_dtype)
    db = torch.empty(NF, device=g.device, dtype=out_dtype) if need_bias else None
    splits, rows_per_split = split_rows(R, cdiv(NF, 128) * cdiv(KF, 128), g.device)
    dw_part = db_part = arrived = None
    if splits > 1:
        dw_part = torch.empty((splits, NF, KF), device=g.device, dtype=torch.float32)
        db_part = torch.empty((splits, NF), device=g.device, dtype=torch.float32) if need_bias else None
        arrived = arrival_counters(cdiv(NF, 16) * cdiv(KF, 16), g.device)  # any tile >= 16

    _dw.launch(
        key,
        lambda cfg: (cdiv(NF, cfg["BLOCK_M"]), cdiv(KF, cfg["BLOCK_N"]), splits),
        g,
        x,
        dw,
        db,
        dw_part,
        db_part,
        arrived,
        R,
        NF,
        KF,
        rows_per_split,
        g_rows,
        g.stride(-1),
        x_rows,
        x.stride(-1),
        NF * KF if splits > 1 else 0,
        KF if splits > 1 else 0,
        NF if db_part is not None else 0,
        DOT_PRECISION=dot_precision(g.dtype),
    )
    return dw, db


# Each GEMM's candidates for _run, ours first (the one that runs where nothing is timed): backend name -> function.
_LINEAR = {"triton": _linear_triton, "cublas": _linear_cublas}
# Where the full-row tile spans the row, our residual GEMM followed by the row kernel is a second of ours: on the H200
# (2026-11-27) it ran proj + norm in 0.075 ms and fc2 + norm in 0.122 against the full-row tile's 0.078 and 0.137.
_LAYERNORM_FULL_ROW = {
    "triton": _residual_layernorm_triton,
    "triton+ln": _residual_then_layernorm_triton,
    "cublas": _residual_layernorm_cublas,
}
_LAYERNORM_WIDE = {"triton": _residual_then_layernorm_triton, "cublas": _residual_layernorm_cublas}
_WEIGHT_GRAD = {"triton": _weight_grad_triton, "cublas": _weight_grad_cublas}
_GELU_GRAD_BIAS = {"triton": _gelu_grad_bias_triton, "cublas": _gelu_grad_bias_cublas}
