"""LayerNorm row kernels: a block of whole rows in registers per program (D <= 8192)."""

import triton
import triton.language as tl


@triton.heuristics({"HAS_RES": lambda args: args["RES"] is not None})
@triton.jit
def layernorm_fwd_kernel(
    X,  # [M, D] input rows, any float dtype (the residual stream: fp32 under autocast); with RES, the branch added to it
    RES,  # [M, D] the residual stream X is added to (flash-attention's add + LayerNorm), or None
    S,  # [M, D] RES + X in the stream's dtype, written for the next residual (and the backward); None without RES
    W,  # [D] LayerNorm weight
    B,  # [D] LayerNorm bias
    Y,  # [M, D] normalised rows in the compute dtype: what the next GEMM reads, and its weight gradient later
    MEAN,  # [M] fp32 row means, for the backward
    RSTD,  # [M] fp32 1 / std, for the backward
    M,
    D,
    stride_xm,
    stride_rm,
    stride_sm,
    stride_ym,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_RES: tl.constexpr,
):
    # Statistics and the affine map in fp32, as eager autocast runs layer_norm; rounded to the compute dtype once, at
    # the store, where eager rounds when the following linear casts its input. Two passes over registers (mean,
    # then centred squares) avoid the cancellation of E[x^2] - E[x]^2 at no memory cost.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask_r = rows < M
    mask_d = cols < D
    mask = mask_r[:, None] & mask_d[None, :]
    rows64 = rows[:, None].to(tl.int64)
    x = tl.load(X + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        # the sum in fp32, rounded once to the stream's dtype as eager's add rounds it; the statistics are those of
        # the rounded sum, the tensor eager's layer_norm reads
        res = tl.load(RES + rows64 * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = (res + x).to(S.dtype.element_ty)
        tl.store(S + rows64 * stride_sm + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    mean = tl.sum(x, 1) / D
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / D + eps)
    w = tl.load(W + cols, mask=mask_d, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask_d, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows64 * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=mask_r)
    tl.store(RSTD + rows, rstd, mask=mask_r)


@triton.heuristics(
    {"HAS_DRES": lambda args: args["DRES"] is not None, "HAS_DX_LOW": lambda args: args["DX_LOW"] is not None}
)
@triton.jit
def layernorm_bwd_kernel(
    DY,  # [M, D] gradient of LayerNorm's output
    X,  # [M, D] LayerNorm's input
    MEAN,  # [M] fp32, from the forward
    RSTD,  # [M] fp32, from the forward
    W,  # [D] LayerNorm weight
    DRES,  # [M, D] residual gradient added to dx in the same pass, or None
    DX,  # [M, D] input gradient, in X's dtype
    DX_LOW,  # [M, D] dx again in the compute dtype, rows stride_dxm apart (the next GEMMs read it), or None
    PART,  # [programs, 2D] fp32, contiguous: per program the weight gradient's partial sums, then the bias's
    #        ([programs, 3D] with SUM_DX: then dx's, as the next GEMM reads it: DX_LOW's values, else DX's)
    M,
    D,
    rows_per_program,
    stride_dym,
    stride_xm,
    stride_rm,
    stride_dxm,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_DRES: tl.constexpr,
    HAS_DX_LOW: tl.constexpr,
    SUM_DX: tl.constexpr,  # dx's column sums too: the bias gradient of the GEMM whose output gradient dx is
    LOAD_STAGES: tl.constexpr = 1,  # > 1: the next row blocks' loads in flight (cp.async into shared memory)
):
    # Per-program partial sums of the weight and bias gradients, so no separate reduction kernel reads the
    # activations again (eager's weight-gradient reduction is 12% of a ViT training step). Without LOAD_STAGES a
    # program's loads wait for its previous row block's reductions and stores: with 8 rows a program and two programs
    # an SM (D = 384, 128 registers) the H200 ran this kernel at a quarter of its bytes' time (183 us for ~41 at
    # 33,280 x 384, 2026-11-27); pipelined, smaller programs keep several row blocks of loads in flight per SM.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    w = tl.load(W + cols, mask=mask_d, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dx_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r0 in tl.range(row_start, row_end, BLOCK_M, num_stages=LOAD_STAGES):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask_r = rows < row_end
        mask = mask_r[:, None] & mask_d[None, :]
        rows64 = rows[:, None].to(tl.int64)
        dy = tl.load(DY + rows64 * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=mask_r, other=0.0)
        rstd = tl.load(RSTD + rows, mask=mask_r, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = w[None, :] * dy
        c1 = tl.sum(xhat * wdy, 1) / D
        c2 = tl.sum(wdy, 1) / D
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DRES:
            dx += tl.load(DRES + rows64 * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dx_out = dx.to(DX.dtype.element_ty)
        tl.store(DX + rows64 * stride_dxm + cols[None, :], dx_out, mask=mask)
        if HAS_DX_LOW:  # rounded from the fp32 value, as a cast of the stored fp32 DX rounds it: the same bits
            dx_out = dx.to(DX_LOW.dtype.element_ty)
            tl.store(DX_LOW + rows64 * stride_dxm + cols[None, :], dx_out, mask=mask)
        dw_acc += tl.sum(dy * xhat, 0)
        db_acc += tl.sum(dy, 0)
        if SUM_DX:  # the values the GEMM reads, summed as a column sum of them would (padding rows hold zeros)
            dx_acc += tl.sum(dx_out.to(tl.float32), 0)
    part = PART + pid * (3 if SUM_DX else 2) * D + cols
    tl.store(part, dw_acc, mask=mask_d)
    tl.store(part + D, db_acc, mask=mask_d)
    if SUM_DX:
        tl.store(part + 2 * D, dx_acc, mask=mask_d)
