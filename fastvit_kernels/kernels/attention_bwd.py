"""Fused multi-head attention, backward kernels: dQ (with delta) and dK/dV, reading the packed qkv and the forward's
softmax statistics, writing the packed dqkv.

Each program owns a block of rows (dQ) or keys (dK/dV) and sweeps the other side of the scores in blocks, a last
partial block of at most TAIL rows or columns in a TAIL-wide block (N = 65 = 64 + 1: 16 of them there instead of 64).
Where the packed qkv came from a linear layer with a bias, the dK/dV kernel also leaves that bias's gradient nearly
summed: each program writes, from its registers, one partial row of the column sums of dq, dk and dv per key block of
a batch element, and a small column sum over those rows finishes it, where a column sum of dqkv would read
[B, N, 3D] again. (Reading the stored rows back after a barrier instead cost the dQ and dK/dV kernels 0.02 and
0.05 ms at CIFAR-10's training shape, H200, 2026-11-28, more than the column sum it saved.)

The launchers are ops/fused_attention.py's.
"""

import triton
import triton.language as tl

from .common import attention_probs, block_and_head, full_blocks_end, load_kv


@triton.jit
def _column_partials(COLSUM, q_sums, k_sums, v_sums, b, pid, N, D, cols, mask_cols, per_batch, BLOCK: tl.constexpr):
    """A dK/dV program's share of the column sums of dq, dk and dv (each [BLOCK_D], its head's columns `cols`) into
    COLSUM's row b * per_batch + pid; the pair's last key block also zeroes its columns of the rows after it up to
    per_batch (laid out for the smallest block any config has)."""
    base = COLSUM + b.to(tl.int64) * per_batch * 3 * D + cols
    row = base + pid * 3 * D
    tl.store(row, q_sums, mask=mask_cols)
    tl.store(row + D, k_sums, mask=mask_cols)
    tl.store(row + 2 * D, v_sums, mask=mask_cols)
    blocks = tl.cdiv(N, BLOCK)
    if pid == blocks - 1:
        zeros = tl.zeros_like(q_sums)
        for r in range(blocks, per_batch):
            for part in tl.static_range(3):
                tl.store(base + r * 3 * D + part * D, zeros, mask=mask_cols)


@triton.jit
def _dkdv_step(
    dk,
    dv,
    ds_cols,
    k,
    v,
    q_base,
    do_base,
    stats,
    DELTA,
    rows,
    offs_d,
    mask_d,
    mask_n,
    stride_qn,
    stride_don,
    N,
    qk_scale_log2,
    DOT_PRECISION: tl.constexpr,
    HAS_COLSUM: tl.constexpr,
):
    """dK and dV of the program's keys from the query rows `rows`; `stats` points at this pair's [2, N] row max and
    log2 row sum, DELTA at its [N] delta. HAS_COLSUM: each of ds_cols' 16 rows [BLOCK_N] += dS's sums over these
    rows."""
    mask_m = rows < N
    mask_q = mask_m[:, None] & mask_d[None, :]
    q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :], mask=mask_q, other=0.0)
    do = tl.load(do_base + rows[:, None] * stride_don + offs_d[None, :], mask=mask_q, other=0.0)
    m = tl.load(stats + rows, mask=mask_m, other=0.0)
    log_l = tl.load(stats + N + rows, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + rows, mask=mask_m, other=0.0)
    p = attention_probs(q, k, m, log_l, mask_m, mask_n, qk_scale_log2, DOT_PRECISION)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    if HAS_COLSUM:
        # a product with 16 rows of ones (the smallest dot) rather than tl.sum(ds, 0): that reduction across the
        # warps at every step took the 64 x 32 tile from 142 to 178 registers (sm_90, bf16, triton 3.6: three
        # blocks an SM to two); this one, dS as the dK product rounds it, 142
        ones = tl.full((16, ds.shape[0]), 1.0, tl.float32).to(q.dtype)
        ds_cols += tl.dot(ones, ds.to(q.dtype), input_precision=DOT_PRECISION)
    return dk, dv, ds_cols


@triton.heuristics({"HAS_COLSUM": lambda args: args["COLSUM"] is not None})
@triton.jit(do_not_specialize=["BH"])
def attention_bwd_dkdv_kernel(
    QKV,  # [B, N, 3 * H * d] packed q | k | v
    DO,  # [B, N, H * d] gradient of the output
    LSE,  # [B * H, 2, N] fp32 softmax statistics from the forward
    DELTA,  # [B * H, N] fp32 rowsum(dO * O): written by the dQ kernel, read by the dK/dV kernel
    DQKV,  # [B, N, 3 * H * d] packed gradient: dq from the dQ kernel, dk | dv from the dK/dV kernel
    COLSUM,  # [B * colsum_rows, 3 * H * d] fp32 or None: per batch element and key block, the column sums of dqkv's
    #          rows as computed (the qkv layer's bias gradient, once summed over all rows)
    stride_qb,
    stride_qn,
    stride_dob,
    stride_don,
    stride_gb,
    stride_gn,
    N,
    H,
    D,
    sm_scale,
    qk_scale_log2,
    colsum_rows,  # COLSUM's rows per batch element: at least this kernel's key blocks of a pair
    BH,  # B * H: not read; the tuner's key (how many programs fill the GPU decides the tile)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TAIL: tl.constexpr = 0,  # the last partial query block in a TAIL-row block where it fits (0: none)
    HAS_COLSUM: tl.constexpr = False,
):
    # One program owns a block of keys/values and sweeps all query blocks: dK and dV accumulate in registers and
    # are written once, no atomics. Non-causal: every query block contributes, none is skipped.
    pid_n, pid_bh = block_and_head(N, BLOCK_N)  # over key blocks
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_n = offs_n < N
    q_base = QKV + b.to(tl.int64) * stride_qb + h * HEAD_DIM
    do_base = DO + b.to(tl.int64) * stride_dob + h * HEAD_DIM
    stats = LSE + pid_bh * 2 * N
    delta = DELTA + pid_bh * N
    mask_kv = mask_n[:, None] & mask_d[None, :]
    k = tl.load(q_base + D + offs_n[:, None] * stride_qn + offs_d[None, :], mask=mask_kv, other=0.0)
    v = tl.load(q_base + 2 * D + offs_n[:, None] * stride_qn + offs_d[None, :], mask=mask_kv, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    ds_cols = tl.zeros([16, BLOCK_N], dtype=tl.float32)  # sum over all query rows of dS, per key, 16 times (HAS_COLSUM)
    m_full = full_blocks_end(N, BLOCK_M, TAIL)
    for start_m in range(0, m_full, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        dk, dv, ds_cols = _dkdv_step(
            dk,
            dv,
            ds_cols,
            k,
            v,
            q_base,
            do_base,
            stats,
            delta,
            rows,
            offs_d,
            mask_d,
            mask_n,
            stride_qn,
            stride_don,
            N,
            qk_scale_log2,
            DOT_PRECISION,
            HAS_COLSUM,
        )
    if TAIL > 0:
        if m_full < N:
            rows = m_full + tl.arange(0, TAIL)
            dk, dv, ds_cols = _dkdv_step(
                dk,
                dv,
                ds_cols,
                k,
                v,
                q_base,
                do_base,
                stats,
                delta,
                rows,
                offs_d,
                mask_d,
                mask_n,
                stride_qn,
                stride_don,
                N,
                qk_scale_log2,
                DOT_PRECISION,
                HAS_COLSUM,
            )
    g_base = DQKV + b.to(tl.int64) * stride_gb + h * HEAD_DIM + offs_n[:, None] * stride_gn + offs_d[None, :]
    tl.store(g_base + D, (dk * sm_scale).to(DQKV.dtype.element_ty), mask=mask_kv)
    tl.store(g_base + 2 * D, dv.to(DQKV.dtype.element_ty), mask=mask_kv)
    if HAS_COLSUM:
        # from the registers: dk and dv's sums over this block's keys, and its keys' share of dq's sum over all
        # rows, sum_i dq_i = scale * sum_j (sum_i dS_ij) k_j, which the dQ kernel would need all keys for. The sums
        # of dS go into that product rounded to the compute dtype (in fp32: 178 registers, as above): as exact as
        # summing the rounded dq rows was (tests/test_qkv_attention.py)
        q_sums = tl.sum(tl.dot(ds_cols.to(k.dtype), k, input_precision=DOT_PRECISION), 0) * (sm_scale / 16)
        k_sums = tl.sum(dk, 0) * sm_scale
        v_sums = tl.sum(dv, 0)
        cols = h * HEAD_DIM + offs_d
        _column_partials(COLSUM, q_sums, k_sums, v_sums, b, pid_n, N, D, cols, mask_d, colsum_rows, BLOCK_N)


@triton.jit(do_not_specialize=["BH"])
def attention_bwd_dq_kernel(
    QKV,  # [B, N, 3 * H * d] packed q | k | v
    DO,  # [B, N, H * d] gradient of the output
    LSE,  # [B * H, 2, N] fp32 softmax statistics from the forward
    DELTA,  # [B * H, N] fp32 rowsum(dO * O): written by the dQ kernel, read by the dK/dV kernel
    DQKV,  # [B, N, 3 * H * d] packed gradient: dq from the dQ kernel, dk | dv from the dK/dV kernel
    stride_qb,
    stride_qn,
    stride_dob,
    stride_don,
    stride_gb,
    stride_gn,
    N,
    H,
    D,
    sm_scale,
    qk_scale_log2,
    BH,  # B * H: not read; the tuner's key (how many programs fill the GPU decides the tile)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TAIL: tl.constexpr = 0,  # the last partial key block in a TAIL-column block where it fits (0: none)
):
    # One program owns a block of queries and sweeps all keys twice: first for delta_i = rowsum(P * dP), then for
    # dQ. Flash attention takes delta = rowsum(dO * O) instead, with O rounded to bf16: when the softmax saturates
    # (logits in the thousands) that rounding swamps the true, tiny gradient. This pass costs two small GEMMs per
    # key block and keeps the gradient as exact as eager's. delta is written for the dK/dV kernel, which runs next.
    # (P is not renormalised by this pass's own row sum: the forward's sum is exact enough, see the forward, and
    # dividing delta and P by a sum one ulp off 1 made saturated rows' gradients up to 20x worse than eager's.)
    pid_m, pid_bh = block_and_head(N, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_m = offs_m < N
    mask_q = mask_m[:, None] & mask_d[None, :]
    q_base = QKV + b.to(tl.int64) * stride_qb + h * HEAD_DIM
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=mask_q, other=0.0)
    do = tl.load(
        DO + b.to(tl.int64) * stride_dob + h * HEAD_DIM + offs_m[:, None] * stride_don + offs_d[None, :],
        mask=mask_q,
        other=0.0,
    )
    m = tl.load(LSE + pid_bh * 2 * N + offs_m, mask=mask_m, other=0.0)
    log_l = tl.load(LSE + pid_bh * 2 * N + N + offs_m, mask=mask_m, other=0.0)
    # two sweeps over the keys: delta first (the delta argument is read by the dQ sweep only), then dQ
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    delta = _dq_sweep(
        delta,
        delta,
        q,
        do,
        m,
        log_l,
        mask_m,
        q_base,
        offs_d,
        mask_d,
        stride_qn,
        N,
        D,
        qk_scale_log2,
        DOT_PRECISION,
        BLOCK_N,
        TAIL,
        True,
    )
    tl.store(DELTA + pid_bh * N + offs_m, delta, mask=mask_m)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _dq_sweep(
        dq,
        delta,
        q,
        do,
        m,
        log_l,
        mask_m,
        q_base,
        offs_d,
        mask_d,
        stride_qn,
        N,
        D,
        qk_scale_log2,
        DOT_PRECISION,
        BLOCK_N,
        TAIL,
        False,
    )
    g_ptrs = DQKV + b.to(tl.int64) * stride_gb + h * HEAD_DIM + offs_m[:, None] * stride_gn + offs_d[None, :]
    tl.store(g_ptrs, (dq * sm_scale).to(DQKV.dtype.element_ty), mask=mask_q)


@triton.jit
def _dq_sweep(
    acc,
    delta,
    q,
    do,
    m,
    log_l,
    mask_m,
    q_base,
    offs_d,
    mask_d,
    stride_qn,
    N,
    D,
    qk_scale_log2,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TAIL: tl.constexpr,
    DELTA_PASS: tl.constexpr,
):
    """One sweep of a dQ program over all keys, BLOCK_N at a time and a last partial block TAIL wide where it fits:
    acc += rowsum(P * dP) (DELTA_PASS: acc is delta), else acc += dS k with dS = P * (dP - delta)."""
    n_full = full_blocks_end(N, BLOCK_N, TAIL)
    for start_n in range(0, n_full, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        acc = _dq_step(
            acc,
            delta,
            q,
            do,
            m,
            log_l,
            mask_m,
            q_base,
            cols,
            offs_d,
            mask_d,
            stride_qn,
            N,
            D,
            qk_scale_log2,
            DOT_PRECISION,
            DELTA_PASS,
        )
    if TAIL > 0:
        if n_full < N:
            cols = n_full + tl.arange(0, TAIL)
            acc = _dq_step(
                acc,
                delta,
                q,
                do,
                m,
                log_l,
                mask_m,
                q_base,
                cols,
                offs_d,
                mask_d,
                stride_qn,
                N,
                D,
                qk_scale_log2,
                DOT_PRECISION,
                DELTA_PASS,
            )
    return acc


@triton.jit
def _dq_step(
    acc,
    delta,
    q,
    do,
    m,
    log_l,
    mask_m,
    q_base,
    cols,
    offs_d,
    mask_d,
    stride_qn,
    N,
    D,
    qk_scale_log2,
    DOT_PRECISION: tl.constexpr,
    DELTA_PASS: tl.constexpr,
):
    """_dq_sweep's step over the keys `cols`."""
    k, v = load_kv(q_base, cols, offs_d, mask_d, stride_qn, N, D, True)
    p = attention_probs(q, k, m, log_l, mask_m, cols < N, qk_scale_log2, DOT_PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if DELTA_PASS:
        acc += tl.sum(p * dp, 1)
    else:
        acc += tl.dot((p * (dp - delta[:, None])).to(k.dtype), k, input_precision=DOT_PRECISION)
    return acc
