"""The GEMM tiles' epilogues (kernels/gemm.py): bias, GELU, GELU', the residual, and the store of a finished tile
of C, through pointers or tensor descriptors, picked by constexprs.
"""

import triton
import triton.language as tl

from .common import gelu, gelu_grad


# Epilogues: acc [BLOCK_M, BLOCK_N] fp32 in, fp32 out; `rows` (int64) and `cols` index the tile, PTR's strides map
# them to memory.
@triton.jit
def _gelu_epilogue(acc, PRE, rows, cols, stride_m, stride_n, mask, STORE_PRE: tl.constexpr):
    # the pre-activation is written only when a backward will need it (training)
    if STORE_PRE:
        tl.store(PRE + rows * stride_m + cols * stride_n, acc.to(PRE.dtype.element_ty), mask=mask)
    return gelu(acc)


@triton.jit
def _gelu_grad_epilogue(acc, PRE, rows, cols, stride_m, stride_n, mask):
    # the backward of GELU in the GEMM that produces dGELU: d(pre) = dGELU * GELU'(pre)
    pre = tl.load(PRE + rows * stride_m + cols * stride_n, mask=mask, other=0.0).to(tl.float32)
    return acc * gelu_grad(pre)


@triton.jit
def _residual_epilogue(acc, RES, rows, cols, stride_m, stride_n, mask):
    return acc + tl.load(RES + rows * stride_m + cols * stride_n, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _finish_cols(
    acc,
    pid_m,
    pid_n,
    C,
    BIAS,
    RES,
    PRE,
    M,
    N,
    stride_cm,
    stride_cn,
    stride_rm,
    stride_rn,
    stride_pm,
    stride_pn,
    EPILOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Bias, the epilogue, and the store of one [BLOCK_M, BLOCK_N] block of C (the `pid_n`-th of that width)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    rows = offs_m[:, None].to(tl.int64)  # M * stride can pass 2**31 (ViT-B's hidden at batch 1024)
    cols = offs_n[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == "gelu":
        acc = _gelu_epilogue(acc, PRE, rows, cols, stride_pm, stride_pn, mask, STORE_PRE)
    elif EPILOGUE == "gelu_grad":
        acc = _gelu_grad_epilogue(acc, PRE, rows, cols, stride_pm, stride_pn, mask)
    elif EPILOGUE == "residual":
        acc = _residual_epilogue(acc, RES, rows, cols, stride_rm, stride_rn, mask)
    tl.store(C + rows * stride_cm + cols * stride_cn, acc.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _finish_cols_desc(
    acc,
    m0,
    n0,
    c_desc,
    BIAS,
    res_desc,
    pre_desc,
    N,
    EPILOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_PRE: tl.constexpr,
):
    """_finish_cols through tensor descriptors (TMA): the copy engine clips the tile at M and N, so the epilogue
    computes no addresses or masks, and the stores leave through shared memory in bulk."""
    if HAS_BIAS:
        offs_n = n0 + tl.arange(0, acc.shape[1])
        acc += tl.load(BIAS + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == "gelu":
        if STORE_PRE:
            pre_desc.store([m0, n0], acc.to(pre_desc.dtype))
        acc = gelu(acc)
    elif EPILOGUE == "gelu_grad":
        acc = acc * gelu_grad(pre_desc.load([m0, n0]).to(tl.float32))
    elif EPILOGUE == "residual":
        acc = acc + res_desc.load([m0, n0]).to(tl.float32)
    c_desc.store([m0, n0], acc.to(c_desc.dtype))


@triton.constexpr_function
def epilogue_parts(BLOCK_N, EPILOGUE, STORE_PRE, EPI_DESC):
    """How many column parts a tile's epilogue runs in, one after another (the kernel and the shared-memory estimate
    in configs/gemm.py ask it). Through pointers a 256-wide tile whose epilogue reads or writes a second tile (the
    residual, the pre-activation) runs in 128-column halves: whole, the fp32 residual (128 more registers a thread)
    spilled 728 B at 255 registers, GELU' 64 B and the stored pre-activation 8 B; in halves none spills (128 x 256,
    8 warps, sm_90, triton 3.6, compiled offline); the others stay whole (halving costs ~70-90 instructions a warp a
    tile). Through descriptors every tile from 128 columns on runs in halves: each part's stores (and the residual's
    load) are staged in shared memory, and halves halve that."""
    second_tile = EPILOGUE == "residual" or EPILOGUE == "gelu_grad" or STORE_PRE
    return 2 if (BLOCK_N >= 256 and second_tile) or (EPI_DESC and BLOCK_N >= 128) else 1


@triton.jit
def finish_tile(
    acc,
    pid_m,
    pid_n,
    C,
    BIAS,
    RES,
    PRE,
    M,
    N,
    stride_cm,
    stride_cn,
    stride_rm,
    stride_rn,
    stride_pm,
    stride_pn,
    EPILOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_PRE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EPI_DESC: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of C, in epilogue_parts column parts. With EPI_DESC, C, RES and PRE are tensor
    descriptors of [BLOCK_M, BLOCK_N // parts] blocks (the stride arguments unread)."""
    PARTS: tl.constexpr = epilogue_parts(BLOCK_N, EPILOGUE, STORE_PRE, EPI_DESC)
    if PARTS == 2:
        # [BLOCK_M, BLOCK_N // 2, 2] split: columns [0, BLOCK_N / 2) and [BLOCK_N / 2, BLOCK_N) of the tile
        parts = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    else:
        parts = (acc,)
    for part in tl.static_range(PARTS):
        if EPI_DESC:
            m0 = pid_m * BLOCK_M
            n0 = pid_n * BLOCK_N + part * (BLOCK_N // PARTS)
            _finish_cols_desc(parts[part], m0, n0, C, BIAS, RES, PRE, N, EPILOGUE, HAS_BIAS, STORE_PRE)
        else:
            _finish_cols(
                parts[part],
                pid_m,
                PARTS * pid_n + part,
                C,
                BIAS,
                RES,
                PRE,
                M,
                N,
                stride_cm,
                stride_cn,
                stride_rm,
                stride_rn,
                stride_pm,
                stride_pn,
                EPILOGUE,
                HAS_BIAS,
                STORE_PRE,
                BLOCK_M,
                BLOCK_N // PARTS,
            )
