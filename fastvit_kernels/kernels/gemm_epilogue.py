"""The GEMM tiles' epilogues (kernels/gemm.py): bias, GELU, GELU', the residual, and the store of a finished tile
of C, through pointers or tensor descriptors, picked by constexprs.
"""

import triton
import triton.language as tl

from .common import gelu, gelu_grad, last_to_arrive


# A second tile beside C (the residual, GELU's pre-activation) through pointers, or through a descriptor (DESC: T is
# a tensor descriptor of one [BLOCK_M, BLOCK_N] part, at (m0, n0), whose copy engine clips the edges).
@triton.jit
def _load_tile(T, m0, n0, rows, cols, stride_m, stride_n, mask, DESC: tl.constexpr):
    if DESC:
        tile = T.load([m0, n0])
    else:
        tile = tl.load(T + rows * stride_m + cols * stride_n, mask=mask, other=0.0)
    return tile.to(tl.float32)


@triton.jit
def _store_tile(T, value, m0, n0, rows, cols, stride_m, stride_n, mask, DESC: tl.constexpr):
    if DESC:
        T.store([m0, n0], value.to(T.dtype))
    else:
        tl.store(T + rows * stride_m + cols * stride_n, value.to(T.dtype.element_ty), mask=mask)


@triton.jit
def _finish_cols(
    acc,
    pid_m,
    pid_n,
    C,
    BIAS,
    RES,
    PRE,
    COLSUM,
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
    HAS_COLSUM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DESC: tl.constexpr,
):
    """Bias, the epilogue, and the store of one [BLOCK_M, BLOCK_N] block of C (the `pid_n`-th of that width): acc
    fp32 in. DESC: C, RES and PRE are tensor descriptors of that block (the epilogue computes no addresses or masks
    but the bias's, and its stores leave through shared memory in bulk)."""
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    rows = offs_m[:, None].to(tl.int64)  # M * stride can pass 2**31 (ViT-B's hidden at batch 1024)
    cols = offs_n[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == "gelu":
        if STORE_PRE:  # the pre-activation, only when a backward will need it (training)
            _store_tile(PRE, acc, m0, n0, rows, cols, stride_pm, stride_pn, mask, DESC)
        acc = gelu(acc)
    elif EPILOGUE == "gelu_grad":  # the backward of GELU in the GEMM that produces dGELU: d(pre) = dGELU * GELU'(pre)
        acc = acc * gelu_grad(_load_tile(PRE, m0, n0, rows, cols, stride_pm, stride_pn, mask, DESC))
    elif EPILOGUE == "residual":
        acc = acc + _load_tile(RES, m0, n0, rows, cols, stride_rm, stride_rn, mask, DESC)
    _store_tile(C, acc, m0, n0, rows, cols, stride_cm, stride_cn, mask, DESC)
    if HAS_COLSUM:  # the stored tile's column sums, one partial row a row block (d pre: fc1's bias gradient)
        tl.static_assert(not DESC, "the column sums are not offered with a descriptor epilogue (configs/gemm.py)")
        kept = tl.where(mask, acc.to(C.dtype.element_ty).to(tl.float32), 0.0)
        tl.store(COLSUM + pid_m * N + offs_n, tl.sum(kept, 0), mask=mask_n)


@triton.jit
def finish_column_sums(COLSUM, DB, ARRIVED, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """After a tile stored its partial row of C's column sums (COLSUM row pid_m, columns of block pid_n): its arrival
    counted at ARRIVED[pid_n]; the column block's last tile to arrive adds the block's cdiv(M, BLOCK_M) partial rows up,
    in row-block order, and writes their columns of DB in its dtype (fc1's bias gradient: no column-sum launch after
    the GEMM). 16 rows a load, .cg: written by other SMs, past this SM's L1."""
    rows_done = tl.cdiv(M, BLOCK_M)
    if last_to_arrive(ARRIVED + pid_n, rows_done):
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = cols < N
        total = tl.zeros([16, BLOCK_N], dtype=tl.float32)
        for r0 in range(0, rows_done, 16):
            rows = r0 + tl.arange(0, 16)
            mask = (rows < rows_done)[:, None] & mask_n[None, :]
            ptrs = COLSUM + rows[:, None] * N + cols[None, :]
            total += tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(DB + cols, tl.sum(total, 0).to(DB.dtype.element_ty), mask=mask_n)


def stores_pre(epilogue, pre) -> bool:
    """STORE_PRE: GELU's epilogue writes the pre-activation too (given only when a backward will read it)."""
    return epilogue == "gelu" and pre is not None


@triton.constexpr_function  # epilogue_parts calls it: a compiled function may only reach constexpr_functions
def second_tile(epilogue, store_pre) -> bool:
    """The epilogue reads or writes a tile beside C: the residual, GELU's pre-activation (stored, or read by GELU')."""
    return epilogue == "residual" or epilogue == "gelu_grad" or store_pre


@triton.constexpr_function
def epilogue_parts(BLOCK_N, EPILOGUE, STORE_PRE, EPI_DESC):
    """How many column parts a tile's epilogue runs in, one after another (the kernel and the shared-memory estimate
    in configs/gemm.py ask it). Through pointers a 256-wide tile whose epilogue reads or writes a second tile (the
    residual, the pre-activation) runs in 128-column halves: whole, the fp32 residual (128 more registers a thread)
    spilled 728 B at 255 registers, GELU' 64 B and the stored pre-activation 8 B; in halves none spills (128 x 256,
    8 warps, sm_90, triton 3.6, compiled offline); the others stay whole (halving costs ~70-90 instructions a warp a
    tile). Through descriptors every tile from 128 columns on runs in halves: each part's stores (and the residual's
    load) are staged in shared memory, and halves halve that."""
    return 2 if (BLOCK_N >= 256 and second_tile(EPILOGUE, STORE_PRE)) or (EPI_DESC and BLOCK_N >= 128) else 1


@triton.jit
def finish_tile(
    acc,
    pid_m,
    pid_n,
    C,
    BIAS,
    RES,
    PRE,
    COLSUM,
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
    HAS_COLSUM: tl.constexpr,
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
        _finish_cols(
            parts[part],
            pid_m,
            PARTS * pid_n + part,
            C,
            BIAS,
            RES,
            PRE,
            COLSUM,
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
            HAS_COLSUM,
            BLOCK_M,
            BLOCK_N // PARTS,
            EPI_DESC,
        )
