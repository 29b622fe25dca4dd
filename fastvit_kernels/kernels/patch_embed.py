"""Patch-embedding kernels: im2col inside the GEMM (the A operand gathered from the image through its strides), bias,
position embedding and the CLS row; the weight and image gradients. The launchers are ops/fused_patch_embed.py's.
"""

import triton
import triton.language as tl

from .common import last_to_arrive, sum_partials


@triton.jit
def _patch_offsets(rows, P, GW, stride_ib, stride_ih, stride_iw, PH: tl.constexpr, PW: tl.constexpr):
    # image offset of each patch's top-left pixel: row m = b * P + gy * GW + gx
    b = rows // P
    p = rows % P
    return b.to(tl.int64) * stride_ib + (p // GW) * PH * stride_ih + (p % GW) * PW * stride_iw


@triton.jit
def _pixel_offsets(ks, stride_ic, stride_ih, stride_iw, PH: tl.constexpr, PW: tl.constexpr):
    # offset of pixel k = (c, i, j) inside a patch
    return (ks // (PH * PW)) * stride_ic + ((ks // PW) % PH) * stride_ih + (ks % PW) * stride_iw


@triton.heuristics({"HAS_CLS": lambda args: args["CLS"] is not None})
@triton.jit
def patch_embed_fwd_kernel(
    IMG,  # [B, C, H, W] images, any strides (NCHW, channels-last, views)
    W,  # [D, C * PH * PW] the Conv2d weight, flattened as Conv2d flattens it
    BIAS,  # [D]
    POS,  # [T, D] position embedding, T = P (+ 1 with a class token)
    CLS,  # [D] class token, or None (no class token)
    OUT,  # [B, T, D] tokens
    B,
    P,
    GW,
    K,
    N,
    stride_ib,
    stride_ic,
    stride_ih,
    stride_iw,
    stride_wn,
    stride_wk,
    stride_pt,
    stride_ob,
    stride_ot,
    PH: tl.constexpr,
    PW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_CLS: tl.constexpr,
):
    pid = tl.program_id(0)
    M = B * P
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    offs_bn = tl.arange(0, BLOCK_N)
    if pid < num_pid_m * num_pid_n:
        group = GROUP_M * num_pid_n
        first_m = (pid // group) * GROUP_M
        group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % group_m
        pid_n = (pid % group) // group_m
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + offs_bn
        mask_m = rows < M
        mask_n = offs_n < N
        row_off = _patch_offsets(rows, P, GW, stride_ib, stride_ih, stride_iw, PH, PW)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            mask_k = ks < K
            col_off = _pixel_offsets(ks, stride_ic, stride_ih, stride_iw, PH, PW)
            a = tl.load(IMG + row_off[:, None] + col_off[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(
                W + ks[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            acc = tl.dot(a.to(w.dtype), w, acc, input_precision=DOT_PRECISION)  # image cast to the compute dtype
        b = rows // P
        t = rows % P + HAS_CLS
        mask = mask_m[:, None] & mask_n[None, :]
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        acc += tl.load(POS + t[:, None] * stride_pt + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        out_ptrs = OUT + b[:, None].to(tl.int64) * stride_ob + t[:, None] * stride_ot + offs_n[None, :]
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=mask)
    else:
        if HAS_CLS:
            # the programs past the GEMM's write row 0 of BLOCK_M images each: cls_token + pos_embed[0]
            cid = pid - num_pid_m * num_pid_n
            bs = (cid // num_pid_n) * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = (cid % num_pid_n) * BLOCK_N + offs_bn
            mask_n = offs_n < N
            row0 = tl.load(CLS + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            row0 += tl.load(POS + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            out_ptrs = OUT + bs[:, None].to(tl.int64) * stride_ob + offs_n[None, :]
            val = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32) + row0[None, :]
            tl.store(out_ptrs, val.to(OUT.dtype.element_ty), mask=(bs[:, None] < B) & mask_n[None, :])


@triton.heuristics({"SPLIT": lambda args: args["DW_PART"] is not None})
@triton.jit
def patch_embed_bwd_dw_kernel(
    G,  # [B, P, D] gradient of the patch tokens (a view that skips the class row)
    IMG,  # [B, C, H, W] images, any strides
    DW_OUT,  # [D, C * PH * PW] fp32 weight gradient
    DW_PART,  # [splits, D, C * PH * PW] fp32 partials, one per split of the rows (None with one split)
    ARRIVED,  # [tiles] int32, zeroed: splits of each output tile done; left zero again (None with one split)
    B,
    P,
    GW,
    K,
    N,
    rows_per_split,
    stride_gb,
    stride_gp,
    stride_ib,
    stride_ic,
    stride_ih,
    stride_iw,
    stride_dws,
    PH: tl.constexpr,
    PW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
):
    # dW[N, K] = dTokens^T[N, rows] @ patches[rows, K], the patches gathered from the image again (im2col in the load)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # embedding dim
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # pixel within a patch
    mask_m = offs_m < N
    mask_n = offs_n < K
    col_off = _pixel_offsets(offs_n, stride_ic, stride_ih, stride_iw, PH, PW)
    r_start = pid_s * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, B * P)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        mask_r = rows < r_end
        g_off = (rows // P).to(tl.int64) * stride_gb + (rows % P) * stride_gp
        g = tl.load(G + g_off[None, :] + offs_m[:, None], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        row_off = _patch_offsets(rows, P, GW, stride_ib, stride_ih, stride_iw, PH, PW)
        a = tl.load(IMG + row_off[:, None] + col_off[None, :], mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(g, a.to(g.dtype), acc, input_precision=DOT_PRECISION)
    tile = offs_m[:, None] * K + offs_n[None, :]  # [BLOCK_M, BLOCK_N] offsets in dW
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT:  # the last split of the tile to arrive adds the partials up: no sum kernel after this one
        tl.store(DW_PART + pid_s * stride_dws + tile, acc, mask=mask)
        splits = tl.num_programs(2)
        if last_to_arrive(ARRIVED + pid_m * tl.num_programs(1) + pid_n, splits):
            tl.store(DW_OUT + tile, sum_partials(DW_PART, stride_dws, tile, mask, splits), mask=mask)
    else:
        tl.store(DW_OUT + tile, acc, mask=mask)


@triton.jit
def patch_embed_bwd_dx_kernel(
    G,  # [B, P, D] gradient of the patch tokens
    W,  # [D, C * PH * PW] the flattened Conv2d weight
    DIMG,  # [B, C, H, W] image gradient (patches do not overlap: each pixel written once)
    B,
    P,
    GW,
    K,
    N,
    stride_gb,
    stride_gp,
    stride_wn,
    stride_wk,
    stride_ib,
    stride_ic,
    stride_ih,
    stride_iw,
    PH: tl.constexpr,
    PW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # dPatches[rows, K] = dTokens[rows, N] @ W[N, K], scattered straight into the image: patches do not overlap,
    # so every pixel is written exactly once (no atomics, no zero-fill).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows < B * P
    mask_k = ks < K
    g_off = (rows // P).to(tl.int64) * stride_gb + (rows % P) * stride_gp
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_K):
        ns = n0 + tl.arange(0, BLOCK_K)
        mask_r = ns < N
        g = tl.load(G + g_off[:, None] + ns[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        w = tl.load(
            W + ns[:, None] * stride_wn + ks[None, :] * stride_wk, mask=mask_r[:, None] & mask_k[None, :], other=0.0
        )
        acc = tl.dot(g, w, acc, input_precision=DOT_PRECISION)
    row_off = _patch_offsets(rows, P, GW, stride_ib, stride_ih, stride_iw, PH, PW)
    col_off = _pixel_offsets(ks, stride_ic, stride_ih, stride_iw, PH, PW)
    tl.store(
        DIMG + row_off[:, None] + col_off[None, :],
        acc.to(DIMG.dtype.element_ty),
        mask=mask_m[:, None] & mask_k[None, :],
    )
