"""The linear layers' GEMMs: C = epilogue(A @ B) and the weight gradient dW = G^T @ X with the bias gradient.

Operands arrive in the compute dtype (LayerNorm, where there is one, ran before in a row kernel that wrote its output
in that dtype: a normalising prologue inside the K loop cost ~205 instructions per K step and a second resident
block on sm_90). Absent tensors are None, and the flags that depend on them are derived from that.
"""

import triton
import triton.language as tl

from .common import grouped_pid, last_to_arrive, sum_partials, tma_k_step
from .gemm_epilogue import epilogue_parts, finish_column_sums, finish_tile, stores_pre
from .gemm_gelu_behind import tiles_epilogue_behind


@triton.jit
def _mainloop_pointers(
    A,
    B,
    pid_m,
    pid_n,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Masked pointer loads (cp.async when the strides allow): any stride, any alignment, sm_80 and sm_90.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _mainloop_tma(
    a_desc,
    b_desc,
    pid_m,
    pid_n,
    K,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    B_KMAJOR: tl.constexpr,
):
    # Tensor-descriptor loads (TMA on sm_90): the copy engine computes addresses and zero-fills the edges, so a K step
    # issues no address or mask arithmetic.
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc = tma_k_step(acc, a_desc, b_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, k0, DOT_PRECISION, B_KMAJOR)
    return acc


@triton.jit
def _operand_descriptors(
    A,
    B,
    M,
    N,
    K,
    stride_am,
    stride_bk,
    stride_bn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    B_KMAJOR: tl.constexpr,
):
    """The TMA tiles' descriptors of A [M, K] and of the weight B, read as it is stored (B_KMAJOR: [N, K] blocks,
    else [K, N])."""
    a_desc = tl.make_tensor_descriptor(A, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    if B_KMAJOR:
        b_desc = tl.make_tensor_descriptor(B, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:
        b_desc = tl.make_tensor_descriptor(B, shape=[K, N], strides=[stride_bk, 1], block_shape=[BLOCK_K, BLOCK_N])
    return a_desc, b_desc


@triton.heuristics(
    {
        "HAS_BIAS": lambda args: args["BIAS"] is not None,
        "STORE_PRE": lambda args: stores_pre(args["EPILOGUE"], args["PRE"]),
        "B_KMAJOR": lambda args: args["stride_bk"] == 1,
        "HAS_COLSUM": lambda args: args["COLSUM"] is not None,
    }
)
@triton.jit
def linear_fwd_kernel(
    A,  # [M, K] activations, compute dtype
    B,  # [K, N] the weight as a transposed view of nn.Linear's [N, K], compute dtype
    C,  # [M, N] output, in the residual stream's dtype for EPILOGUE == "residual", else the compute dtype
    BIAS,  # [N] or None
    RES,  # [M, N] residual added in the epilogue (EPILOGUE == "residual"), else None
    PRE,  # [M, N] pre-activation: written by "gelu" (None in inference), read by "gelu_grad"
    COLSUM,  # [>= cdiv(M, BLOCK_M), N] fp32: row block i's column sums of C as stored in row i (fc1's bias gradient's
    #          partial rows, from "gelu_grad"), or None
    DB,  # [N] out with COLSUM: the column sums of C, added up from COLSUM's rows, in the bias's dtype
    ARRIVED,  # [>= cdiv(N, BLOCK_N)] int32, zeroed, with COLSUM: the tiles of each column block done; left zero again
    M,
    N,
    K,
    num_programs,  # the persistent TMA programs' stride through the tiles (their grid: at most this many)
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    stride_rm,
    stride_rn,
    stride_pm,
    stride_pn,
    EPILOGUE: tl.constexpr,  # "none", "gelu", "gelu_grad" or "residual"
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    WARP_SPEC: tl.constexpr,  # TMA tiles: the tile loop split into load and MMA/epilogue warps (Hopper; 4 warps only)
    FLATTEN: tl.constexpr,  # TMA tiles: the tile and K loops pipelined as one (next tile's loads under the epilogue)
    USE_TMA: tl.constexpr,  # the tile's choice: persistent programs loading through tensor descriptors...
    TMA_OK: tl.constexpr,  # ...where the operands allow it (A K-contiguous, B K- or N-contiguous, 16-byte aligned rows)
    EPI_TMA: tl.constexpr,  # TMA tiles: C stored, the residual or pre-activation loaded, through descriptors too...
    EPI_TMA_OK: tl.constexpr,  # ...where C, RES and PRE allow it (unit column stride, 16-byte aligned rows)
    HAS_BIAS: tl.constexpr,
    STORE_PRE: tl.constexpr,
    B_KMAJOR: tl.constexpr,  # B's K steps are contiguous (nn.Linear's weight as stored), else its N steps are
    HAS_COLSUM: tl.constexpr,
    GELU_BEHIND: tl.constexpr = 0,  # TMA tiles, "gelu" and "gelu_grad": each tile's epilogue under the next's MMAs,
    #                                  <= this many chunks a K step (0: off)
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    if USE_TMA and TMA_OK and GELU_BEHIND:
        tl.static_assert((EPILOGUE == "gelu" or EPILOGUE == "gelu_grad") and not (WARP_SPEC or FLATTEN or EPI_TMA))
        a_desc, b_desc = _operand_descriptors(
            A, B, M, N, K, stride_am, stride_bk, stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, B_KMAJOR
        )
        # where a tile's product waits for its epilogue: for GELU in training the backward's buffer, else C itself
        SRC = PRE if STORE_PRE else C
        tiles_epilogue_behind(
            a_desc,
            b_desc,
            C,
            BIAS,
            SRC,
            PRE,
            COLSUM,
            DB,
            ARRIVED,
            M,
            N,
            K,
            num_programs,
            stride_cm,
            stride_pm if STORE_PRE else stride_cm,
            stride_pm,
            DOT_PRECISION,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            GROUP_M,
            HAS_BIAS,
            B_KMAJOR,
            GELU_BEHIND,
            EPILOGUE == "gelu_grad",
            HAS_COLSUM,
        )
    elif USE_TMA and TMA_OK:
        a_desc, b_desc = _operand_descriptors(
            A, B, M, N, K, stride_am, stride_bk, stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, B_KMAJOR
        )
        EPI_DESC: tl.constexpr = EPI_TMA and EPI_TMA_OK
        if EPI_DESC:  # C, RES and PRE become descriptors of one epilogue part's block (the pointers' slots reused)
            PART_N: tl.constexpr = BLOCK_N // epilogue_parts(BLOCK_N, EPILOGUE, STORE_PRE, EPI_DESC)
            C = tl.make_tensor_descriptor(C, shape=[M, N], strides=[stride_cm, 1], block_shape=[BLOCK_M, PART_N])
            if EPILOGUE == "residual":
                RES = tl.make_tensor_descriptor(
                    RES, shape=[M, N], strides=[stride_rm, 1], block_shape=[BLOCK_M, PART_N]
                )
            if STORE_PRE or EPILOGUE == "gelu_grad":
                PRE = tl.make_tensor_descriptor(
                    PRE, shape=[M, N], strides=[stride_pm, 1], block_shape=[BLOCK_M, PART_N]
                )
        # num_programs (about two per SM) walk the tiles in grouped order. With WARP_SPEC, Triton splits this loop
        # into warp partitions, the loads apart from the MMAs and the epilogue (4 warps become 12; triton 3.6/3.8
        # ignore it at 8), so that the next tile's loads run under this tile's epilogue (fc1's GELU: ~1,500 SASS
        # instructions a warp a 128 x 128 tile, its main loop ~450 at K = 384). FLATTEN gets the same overlap from the
        # software pipeliner: with the loops as one, the loads of the next tile's first K steps are issued before this
        # tile's epilogue (one more stage of shared memory)
        for tile in tl.range(
            tl.program_id(0), num_pid_m * num_pid_n, num_programs, flatten=FLATTEN, warp_specialize=WARP_SPEC
        ):
            pid_m, pid_n = grouped_pid(tile, num_pid_m, num_pid_n, GROUP_M)
            acc = _mainloop_tma(a_desc, b_desc, pid_m, pid_n, K, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, B_KMAJOR)
            finish_tile(
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
                EPILOGUE,
                HAS_BIAS,
                STORE_PRE,
                HAS_COLSUM,
                BLOCK_M,
                BLOCK_N,
                EPI_DESC,
            )
            if HAS_COLSUM:
                finish_column_sums(COLSUM, DB, ARRIVED, pid_n, M, N, BLOCK_M, BLOCK_N)
    else:
        pid_m, pid_n = grouped_pid(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
        acc = _mainloop_pointers(
            A,
            B,
            pid_m,
            pid_n,
            M,
            N,
            K,
            stride_am,
            stride_ak,
            stride_bk,
            stride_bn,
            DOT_PRECISION,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
        )
        finish_tile(
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
            EPILOGUE,
            HAS_BIAS,
            STORE_PRE,
            HAS_COLSUM,
            BLOCK_M,
            BLOCK_N,
            False,
        )
        if HAS_COLSUM:
            finish_column_sums(COLSUM, DB, ARRIVED, pid_n, M, N, BLOCK_M, BLOCK_N)


@triton.heuristics(
    {
        "HAS_DBIAS": lambda args: args["DB_OUT"] is not None,
        "SPLIT": lambda args: args["DW_PART"] is not None,
    }
)
@triton.jit
def linear_dw_kernel(
    G,  # [R, NF] gradient of the layer's output, compute dtype
    X,  # [R, KF] the layer's input as the forward's GEMM read it (LayerNorm's output where there was one)
    DW_OUT,  # [NF, KF] out: the weight gradient, in the weight's dtype
    DB_OUT,  # [NF] out: the bias gradient, or None
    DW_PART,  # [splits, NF, KF] fp32 partial weight gradients, one per split of the rows; None with one split
    DB_PART,  # [splits, NF] fp32 partial bias gradients (None with one split, or without a bias)
    ARRIVED,  # [tiles] int32, zeroed: splits of each output tile done; left zero again (None with one split)
    R,
    NF,
    KF,
    rows_per_split,
    stride_gr,
    stride_gf,
    stride_xr,
    stride_xk,
    stride_dws,
    stride_dwn,
    stride_dbs,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_DBIAS: tl.constexpr,
    SPLIT: tl.constexpr,
):
    # dW[NF, KF] = G^T[NF, R] @ X[R, KF] over this program's slice of rows; the column sums of G (the bias gradient)
    # in the same pass. With 16-bit G they run on the tensor cores, as a dot against a column of ones (products by 1
    # are exact, sums in fp32 as before): summing the tile in registers cost 306 SASS instructions per K step and
    # serialised the wgmma, against 163 this way (128 x 128, 8 warps, sm_90, compiled offline).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output features
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # input features
    offs_k = tl.arange(0, BLOCK_K)  # rows (tokens): the reduction dimension
    mask_m = offs_m < NF
    mask_n = offs_n < KF
    r_start = pid_s * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, R)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_M, 16], dtype=tl.float32)  # column 0: the bias gradient; the others stay 0
    col0 = tl.arange(0, 16)[None, :] == 0  # [1, 16]
    ones = col0 & (offs_k[:, None] >= 0)  # [BLOCK_K, 16]: a column of ones
    for r0 in range(r_start, r_end, BLOCK_K):
        rows = r0 + offs_k
        mask_r = rows < r_end
        g_ptrs = G + rows[None, :].to(tl.int64) * stride_gr + offs_m[:, None] * stride_gf
        x_ptrs = X + rows[:, None].to(tl.int64) * stride_xr + offs_n[None, :] * stride_xk
        g = tl.load(g_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(g, x, acc, input_precision=DOT_PRECISION)
        if HAS_DBIAS:
            if G.dtype.element_ty == tl.float32:  # exact fp32 sums: a dot would round through tf32 or cost FMAs
                db += tl.where(col0, tl.sum(g, 1)[:, None], 0.0)
            else:
                db = tl.dot(g, ones.to(g.dtype), db)
    tile = offs_m[:, None] * KF + offs_n[None, :]  # [BLOCK_M, BLOCK_N] offsets in dW
    mask = mask_m[:, None] & mask_n[None, :]
    bias = tl.sum(db, 1)  # [BLOCK_M]; the programs of the first column block store it
    if SPLIT:
        # Split rows: each program leaves an fp32 partial, and the last of a tile's splits to arrive adds them up and
        # writes the result, so no reduction kernel (and no cast) runs after this one.
        tl.store(DW_PART + pid_s * stride_dws + offs_m[:, None] * stride_dwn + offs_n[None, :], acc, mask=mask)
        if HAS_DBIAS:
            if pid_n == 0:
                tl.store(DB_PART + pid_s * stride_dbs + offs_m, bias, mask=mask_m)
        splits = tl.num_programs(2)
        if last_to_arrive(ARRIVED + pid_m * tl.num_programs(1) + pid_n, splits):
            part = offs_m[:, None] * stride_dwn + offs_n[None, :]
            acc = sum_partials(DW_PART, stride_dws, part, mask, splits)
            tl.store(DW_OUT + tile, acc.to(DW_OUT.dtype.element_ty), mask=mask)
            if HAS_DBIAS:
                if pid_n == 0:
                    bias = sum_partials(DB_PART, stride_dbs, offs_m, mask_m, splits)
                    tl.store(DB_OUT + offs_m, bias.to(DB_OUT.dtype.element_ty), mask=mask_m)
    else:
        tl.store(DW_OUT + tile, acc.to(DW_OUT.dtype.element_ty), mask=mask)
        if HAS_DBIAS:
            if pid_n == 0:
                tl.store(DB_OUT + offs_m, bias.to(DB_OUT.dtype.element_ty), mask=mask_m)
