"""The GEMM engine of the linear layers: where a GEMM with a fused epilogue, and a weight gradient, are launched.

  linear(a, weight_t, bias, epilogue=..., ...)   C = epilogue(a @ weight_t + bias)
  linear_weight_grad(g, x, need_bias)            (dW, db) of y = x @ W^T + b

Every fused linear of the model goes through these two functions: another GEMM (a TMA kernel, cuBLAS plus an
epilogue kernel) plugs in here, and nowhere else.
"""

import os

import torch
import triton

from ..kernels.gemm import linear_dw_kernel, linear_fwd_kernel
from ._common import autotuned, cdiv, dot_precision, interpreting, num_sms, prune_gemm_configs, split_rows

EPILOGUES = ("none", "gelu", "gelu_grad", "residual")


def _gemm_cfg(bm, bn, bk, warps, stages, tma=False):
    kwargs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    if tma is not None:
        kwargs["USE_TMA"] = tma
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


# No tile here spills registers in bf16 on sm_90 (tests/test_compile_targets.py checks it): 128 x 256 x 64 with 8 warps
# and 128 x 128 x 32 with 4 warps hit ptxas's 255-register cap with the residual epilogue or GELU'. The 4-warp tiles
# with 3 stages fit two blocks per SM, so one block's epilogue overlaps the other's main loop: with K = 384 (qkv, fc1)
# a block has only 6 K steps to hide it behind. The TMA tiles come first, so that the interpreter's tests and
# FASTVIT_AUTOTUNE=0 run them wherever the operands allow (the first config is the one those launch).
FWD_CONFIGS = [
    _gemm_cfg(128, 128, 64, 8, 3, tma=True),
    _gemm_cfg(128, 64, 64, 4, 4, tma=True),
    _gemm_cfg(64, 128, 64, 4, 4, tma=True),
    _gemm_cfg(128, 128, 64, 8, 3),
    _gemm_cfg(128, 64, 64, 4, 4),
    _gemm_cfg(64, 128, 64, 4, 4),
    _gemm_cfg(64, 64, 64, 4, 4),
    _gemm_cfg(128, 64, 64, 4, 3),
    _gemm_cfg(64, 128, 64, 4, 3),
]
# 128 x 64 and 64 x 64 with 4 warps serialise every wgmma of the weight gradient under ptxas 12.9 (triton 3.8, C7515,
# compiled offline); the tuner kept 64 x 128 for every weight gradient on the H100 (2026-11-26).
DW_CONFIGS = [_gemm_cfg(*c, tma=None) for c in ((128, 128, 64, 8, 3), (64, 128, 64, 4, 4))]
GROUP_M = 8

_smem_prune = prune_gemm_configs("A", "B")


def _serialised(cfg, epilogue, res) -> bool:
    """The tile whose wgmma ptxas 12.8 (triton 3.6, the lent GPUs') serialises, C7515 compiled offline: 128 x 128
    with 8 warps and pointer loads when the epilogue adds an fp32 residual (proj and fc2 under autocast)."""
    tile = (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, bool(cfg.kwargs.get("USE_TMA")))
    return epilogue == "residual" and res is not None and res.element_size() == 4 and tile == (128, 128, 8, False)


def _fwd_prune(configs, named_args, **kwargs):
    """Shared memory as for every GEMM; the TMA tiles only where the operands allow descriptors (TMA_OK), and not
    with FASTVIT_TMA=0 (which leaves the tuner the pointer-load tiles alone: the A/B switch of the benchmarks); no
    tile that ptxas serialises."""
    args = {**named_args, **kwargs}  # the launch keywords are in kwargs when tuning
    if not args.get("TMA_OK", False) or os.environ.get("FASTVIT_TMA", "1") == "0":
        configs = [c for c in configs if not c.kwargs.get("USE_TMA")]
    configs = [c for c in configs if not _serialised(c, args.get("EPILOGUE"), args.get("RES"))]
    return _smem_prune(configs, named_args, **kwargs)


_dw_prune = prune_gemm_configs("G", "X")
_fwd = autotuned(linear_fwd_kernel, FWD_CONFIGS, ["M", "N", "K", "EPILOGUE", "DOT_PRECISION", "TMA_OK"], _fwd_prune)
_dw = autotuned(linear_dw_kernel, DW_CONFIGS, ["R", "NF", "KF", "DOT_PRECISION"], _dw_prune)


def _tma_scratch(size: int, alignment: int, stream):
    """Global memory for the tensor descriptors that TMA kernels build on the device (128 B each)."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _tma_ok(a, weight_t) -> bool:
    """Whether a [M, K] and weight_t [K, N] can be read through tensor descriptors: K contiguous in both, row strides
    and base addresses 16-byte aligned (the copy engine's rule; D = 100 in bf16 breaks it), and a Hopper GPU or the
    interpreter."""
    if a.is_cuda and torch.cuda.get_device_capability(a.device)[0] < 9:
        return False
    es = a.element_size()
    return (
        a.stride(1) == 1
        and weight_t.stride(0) == 1
        and (a.stride(0) * es) % 16 == 0
        and (weight_t.stride(1) * es) % 16 == 0
        and a.data_ptr() % 16 == 0
        and weight_t.data_ptr() % 16 == 0
    )


def linear(a, weight_t, bias=None, *, epilogue="none", pre=None, residual=None, out_dtype=None):
    """C [M, N] = epilogue(a [M, K] @ weight_t [K, N] + bias), a and weight_t in the compute dtype (a transposed view
    of an nn.Linear weight is fine).

    epilogue: "none"; "gelu" (exact erf GELU; writes the pre-activation into `pre` when given, for the backward);
    "gelu_grad" (multiplies by GELU'(pre), `pre` read); "residual" (adds `residual`, C in out_dtype).
    """
    if epilogue not in EPILOGUES:
        raise ValueError(f"unknown epilogue {epilogue!r}: expected one of {', '.join(EPILOGUES)}")
    if a.dtype != weight_t.dtype:
        raise TypeError(f"linear: a is {a.dtype} but the weight is {weight_t.dtype}; both must be the compute dtype")
    M, K = a.shape
    N = weight_t.shape[1]
    c = torch.empty((M, N), device=a.device, dtype=out_dtype or weight_t.dtype)
    res = residual if epilogue == "residual" else None
    pre = pre if epilogue in ("gelu", "gelu_grad") else None
    if M == 0:  # an empty batch: nothing to launch
        return c
    tma_ok = _tma_ok(a, weight_t)
    if tma_ok and not interpreting():
        triton.set_allocator(_tma_scratch)  # a context variable, so set where the launch happens
    sms = num_sms(a.device)

    def grid(meta):
        tiles = cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"])
        return (min(tiles, sms),) if meta["USE_TMA"] and meta["TMA_OK"] else (tiles,)

    _fwd[grid](
        a,
        weight_t,
        c,
        bias,
        res,
        pre,
        M,
        N,
        K,
        sms,
        a.stride(0),
        a.stride(1),
        weight_t.stride(0),
        weight_t.stride(1),
        c.stride(0),
        c.stride(1),
        res.stride(0) if res is not None else 0,
        res.stride(1) if res is not None else 0,
        pre.stride(0) if pre is not None else 0,
        pre.stride(1) if pre is not None else 0,
        EPILOGUE=epilogue,
        DOT_PRECISION=dot_precision(weight_t.dtype),
        GROUP_M=GROUP_M,
        TMA_OK=tma_ok,
    )
    return c


def linear_weight_grad(g, x, need_bias=True):
    """(dW [NF, KF], db [NF] or None) for y = x @ W^T + b with dL/dy = g [R, NF], x [R, KF] as the forward's GEMM
    read it. fp32 sums (callers cast to the parameter dtype); the reduction over rows is split (see split_rows)."""
    R, NF = g.shape
    KF = x.shape[1]
    if R == 0:  # an empty batch: the sums over no rows
        zeros = torch.zeros(NF, device=g.device, dtype=torch.float32)
        return torch.zeros((NF, KF), device=g.device, dtype=torch.float32), (zeros if need_bias else None)
    splits, rows_per_split = split_rows(R, cdiv(NF, 128) * cdiv(KF, 128), g.device)
    dw = torch.empty((splits, NF, KF), device=g.device, dtype=torch.float32)
    db = torch.empty((splits, NF), device=g.device, dtype=torch.float32) if need_bias else None

    def grid(meta):
        return (cdiv(NF, meta["BLOCK_M"]), cdiv(KF, meta["BLOCK_N"]), splits)

    _dw[grid](
        g,
        x,
        dw,
        db,
        R,
        NF,
        KF,
        rows_per_split,
        g.stride(0),
        g.stride(1),
        x.stride(0),
        x.stride(1),
        dw.stride(0),
        dw.stride(1),
        db.stride(0) if db is not None else 0,
        DOT_PRECISION=dot_precision(g.dtype),
    )
    return dw.sum(0), (db.sum(0) if need_bias else None)
