"""Fused multi-head attention, forward kernel, reading q, k and v from the packed qkv (the backward's kernels are in
attention_bwd.py).

qkv is [B, N, 3*D] laid out as timm's qkv Linear writes it: [B, N, 3, H, d]. The launchers are ops/fused_attention.py's.
"""

import triton
import triton.language as tl

from .common import block_and_head, load_kv, row_blocks


@triton.jit
def _attend_rows(
    QKV,
    OUT,
    LSE,
    pid_m,
    pid_bh,
    stride_qb,
    stride_qn,
    stride_ob,
    stride_on,
    N,
    H,
    D,
    qk_scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TAIL: tl.constexpr,
    ROW_TAIL: tl.constexpr,
):
    """One block of query rows of one (batch, head) pair against all keys, BLOCK_N at a time, and a last partial
    block of at most TAIL keys TAIL at a time (N = 197 = 3 x 64 + 5: 16 columns of scores there instead of 64).
    ROW_TAIL > 0: also the pair's last rows after the block, at most ROW_TAIL of them, against the same K/V loads
    (197 = 3 x 64 + 5: three programs a pair instead of four, the fourth of which computed 64 rows for 5 and read all
    of K and V again): their scores transposed, keys by rows, so that the products keep 64-row operands (wgmma)."""
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM  # head dims such as 80 or 96 run in a power-of-two tile, masked
    q_base = QKV + b.to(tl.int64) * stride_qb + h * HEAD_DIM

    mask_m = offs_m < N
    q = tl.load(
        q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0
    )
    # Online softmax with exp2, the fast instruction, on the raw scores qk = q.k: P = exp2((qk - m) c) with
    # c = qk_scale_log2 and m the row max. Subtracting before scaling costs an FADD and an FMUL a score where
    # fma(qk, c, -m c) is one FFMA, but it is exact where it matters: qk - m is exact for scores near the max
    # (Sterbenz), so the max's exponent is exactly 0 and a saturated row's P is exactly one-hot with l exactly 1, as
    # eager's softmax computes it. The FFMA left the max's exponent at the rounding of m c (~1e-4 with logits in the
    # thousands), log2(l) then missed it by an ulp, and the backward's dS = P (dP - delta) = dP (1 - P), ~1e-7 dP
    # where the true gradient is ~0, was up to 1e12 times eager's error in fp32 (tests: large logits).
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # accumulate in fp32 whatever the input dtype
    if ROW_TAIL > 0:
        offs_t = (pid_m + 1) * BLOCK_M + tl.arange(0, ROW_TAIL)
        mask_t = offs_t < N
        mask_td = mask_t[:, None] & mask_d[None, :]
        q_t = tl.load(q_base + offs_t[:, None] * stride_qn + offs_d[None, :], mask=mask_td, other=0.0)
        m_t = tl.full([ROW_TAIL], float("-inf"), dtype=tl.float32)
        l_t = tl.zeros([ROW_TAIL], dtype=tl.float32)
        acc_t = tl.zeros([BLOCK_D, ROW_TAIL], dtype=tl.float32)  # transposed: head dim by rows
    # The blocks that hold BLOCK_N real keys run without the column mask (its compare and select on every score);
    # the last, partial block after them with it, TAIL wide where it holds at most TAIL keys.
    n_full = N - N % BLOCK_N
    for start_n in range(0, n_full, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k, v = load_kv(q_base, cols, offs_d, mask_d, stride_qn, N, D, False)
        acc, m_i, l_i = _online_step(q, k, v, acc, m_i, l_i, cols, N, qk_scale_log2, DOT_PRECISION, False)
        if ROW_TAIL > 0:
            acc_t, m_t, l_t = _online_step_t(q_t, k, v, acc_t, m_t, l_t, cols, N, qk_scale_log2, DOT_PRECISION, False)
    last = N - n_full  # keys in the last, partial block (0: none)
    if TAIL > 0:
        if (last > 0) & (last <= TAIL):
            cols = n_full + tl.arange(0, TAIL)
            k, v = load_kv(q_base, cols, offs_d, mask_d, stride_qn, N, D, True)
            acc, m_i, l_i = _online_step(q, k, v, acc, m_i, l_i, cols, N, qk_scale_log2, DOT_PRECISION, True)
            if ROW_TAIL > 0:
                acc_t, m_t, l_t = _online_step_t(
                    q_t, k, v, acc_t, m_t, l_t, cols, N, qk_scale_log2, DOT_PRECISION, True
                )
            last = 0
    if last > 0:
        cols = n_full + tl.arange(0, BLOCK_N)
        k, v = load_kv(q_base, cols, offs_d, mask_d, stride_qn, N, D, True)
        acc, m_i, l_i = _online_step(q, k, v, acc, m_i, l_i, cols, N, qk_scale_log2, DOT_PRECISION, True)
        if ROW_TAIL > 0:
            acc_t, m_t, l_t = _online_step_t(q_t, k, v, acc_t, m_t, l_t, cols, N, qk_scale_log2, DOT_PRECISION, True)
    _store_rows(
        OUT, LSE, acc, m_i, l_i, b, h, pid_bh, offs_m, offs_d, mask_m, mask_d, stride_ob, stride_on, N, HEAD_DIM
    )
    if ROW_TAIL > 0:
        acc_t = tl.trans(acc_t)
        _store_rows(
            OUT, LSE, acc_t, m_t, l_t, b, h, pid_bh, offs_t, offs_d, mask_t, mask_d, stride_ob, stride_on, N, HEAD_DIM
        )


@triton.jit
def _online_step(q, k, v, acc, m_i, l_i, cols, N, qk_scale_log2, DOT_PRECISION: tl.constexpr, MASK_COLS: tl.constexpr):
    """The online softmax's update of (acc, m_i, l_i) with the keys `cols` (their k and v), at least one of them < N;
    MASK_COLS where some are not."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if MASK_COLS:
        qk = tl.where(cols[None, :] < N, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: every block holds at least one real column
    p = tl.exp2((qk - m_new[:, None]) * qk_scale_log2)
    alpha = tl.exp2((m_i - m_new) * qk_scale_log2)  # exactly 1 while the max stays
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _online_step_t(
    q_t, k, v, acc_t, m_t, l_t, cols, N, qk_scale_log2, DOT_PRECISION: tl.constexpr, MASK_COLS: tl.constexpr
):
    """_online_step for a few rows q_t, transposed as _tail_rows computes them: scores keys by rows, acc_t head dim
    by rows, the softmax along axis 0."""
    st = tl.dot(k, tl.trans(q_t), input_precision=DOT_PRECISION)  # [keys, rows]
    if MASK_COLS:
        st = tl.where(cols[:, None] < N, st, float("-inf"))
    m_new = tl.maximum(m_t, tl.max(st, 0))
    p = tl.exp2((st - m_new[None, :]) * qk_scale_log2)
    alpha = tl.exp2((m_t - m_new) * qk_scale_log2)
    l_t = l_t * alpha + tl.sum(p, 0)
    acc_t = acc_t * alpha[None, :] + tl.dot(tl.trans(v), p.to(v.dtype), input_precision=DOT_PRECISION)
    return acc_t, m_new, l_t


@triton.jit
def _attend_sequence(
    QKV,
    OUT,
    LSE,
    pid_bh,
    stride_qb,
    stride_qn,
    stride_ob,
    stride_on,
    N,
    H,
    D,
    qk_scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL: tl.constexpr,
):
    """A whole (batch, head) pair, N <= BLOCK + TAIL: tokens [0, BLOCK) in one tile and, where TAIL > 0, the rest in
    a TAIL-row tile, so that N = 65 = 64 + 1 computes 80 x 80 scores instead of 128 x 128. No loop: the softmax of
    every row over all its keys at once (the backward recomputes P from the statistics either path stores)."""
    b = pid_bh // H
    h = pid_bh % H
    offs = tl.arange(0, BLOCK)  # the query rows, and the key columns
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs < N
    mask_d = offs_d < HEAD_DIM
    base = QKV + b.to(tl.int64) * stride_qb + h * HEAD_DIM
    q, k, v = _load_qkv(base, offs, offs_d, mask_n, mask_d, stride_qn, D)
    if TAIL == 0:
        acc, m_i, l_i = _softmax_pv(q, k, v, k, v, mask_n, mask_n, qk_scale_log2, DOT_PRECISION, False)
        _store_rows(
            OUT, LSE, acc, m_i, l_i, b, h, pid_bh, offs, offs_d, mask_n, mask_d, stride_ob, stride_on, N, HEAD_DIM
        )
    else:
        offs_t = BLOCK + tl.arange(0, TAIL)
        mask_t = offs_t < N
        q_t, k_t, v_t = _load_qkv(base, offs_t, offs_d, mask_t, mask_d, stride_qn, D)
        acc, m_i, l_i = _softmax_pv(q, k, v, k_t, v_t, mask_n, mask_t, qk_scale_log2, DOT_PRECISION, True)
        _store_rows(
            OUT, LSE, acc, m_i, l_i, b, h, pid_bh, offs, offs_d, mask_n, mask_d, stride_ob, stride_on, N, HEAD_DIM
        )
        acc, m_i, l_i = _tail_rows(q_t, k, v, k_t, v_t, mask_n, mask_t, qk_scale_log2, DOT_PRECISION)
        _store_rows(
            OUT, LSE, acc, m_i, l_i, b, h, pid_bh, offs_t, offs_d, mask_t, mask_d, stride_ob, stride_on, N, HEAD_DIM
        )


@triton.jit
def _tail_rows(q_t, k, v, k_t, v_t, mask_n, mask_t, qk_scale_log2, DOT_PRECISION: tl.constexpr):
    """_softmax_pv for the TAIL rows, computed transposed (keys by rows) so that the matrix products over the main
    keys have the head dim or the BLOCK keys as their M, as wgmma needs (64 rows per warp group); only the small
    tail-by-tail block of scores takes the older mma."""
    st = tl.dot(k, tl.trans(q_t), input_precision=DOT_PRECISION)  # [BLOCK keys, TAIL rows]
    st = tl.where(mask_n[:, None], st, float("-inf"))
    st_t = tl.dot(k_t, tl.trans(q_t), input_precision=DOT_PRECISION)  # [TAIL keys, TAIL rows]
    st_t = tl.where(mask_t[:, None], st_t, float("-inf"))
    m_i = tl.maximum(tl.max(st, 0), tl.max(st_t, 0))
    p = tl.exp2((st - m_i[None, :]) * qk_scale_log2)
    p_t = tl.exp2((st_t - m_i[None, :]) * qk_scale_log2)
    l_i = tl.sum(p, 0) + tl.sum(p_t, 0)
    acc = tl.dot(tl.trans(v), p.to(v.dtype), input_precision=DOT_PRECISION)  # [BLOCK_D, TAIL rows]
    acc = tl.dot(tl.trans(v_t), p_t.to(v_t.dtype), acc, input_precision=DOT_PRECISION)
    return tl.trans(acc), m_i, l_i


@triton.jit
def _load_qkv(base, offs, offs_d, mask_n, mask_d, stride_qn, D):
    """q, k and v of the tokens `offs` of one (batch, head) pair; `base` points at its q of token 0."""
    ptrs = base + offs[:, None] * stride_qn + offs_d[None, :]
    mask = mask_n[:, None] & mask_d[None, :]
    q = tl.load(ptrs, mask=mask, other=0.0)
    k = tl.load(ptrs + D, mask=mask, other=0.0)
    v = tl.load(ptrs + 2 * D, mask=mask, other=0.0)
    return q, k, v


@triton.jit
def _softmax_pv(q, k, v, k_t, v_t, mask_n, mask_t, qk_scale_log2, DOT_PRECISION: tl.constexpr, WITH_TAIL: tl.constexpr):
    """Unnormalised softmax(q k^T) v of q's rows over the keys k (and, WITH_TAIL, also the keys k_t), with the row
    max of the raw scores and the row sum: the online softmax of _attend_rows in one step (see there)."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    qk = tl.where(mask_n[None, :], qk, float("-inf"))
    m_i = tl.max(qk, 1)
    if WITH_TAIL:
        qk_t = tl.dot(q, tl.trans(k_t), input_precision=DOT_PRECISION)
        qk_t = tl.where(mask_t[None, :], qk_t, float("-inf"))
        m_i = tl.maximum(m_i, tl.max(qk_t, 1))
    p = tl.exp2((qk - m_i[:, None]) * qk_scale_log2)
    l_i = tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    if WITH_TAIL:
        p_t = tl.exp2((qk_t - m_i[:, None]) * qk_scale_log2)
        l_i += tl.sum(p_t, 1)
        acc = tl.dot(p_t.to(v_t.dtype), v_t, acc, input_precision=DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def _store_rows(
    OUT,
    LSE,
    acc,
    m_i,
    l_i,
    b,
    h,
    pid_bh,
    offs_m,
    offs_d,
    mask_m,
    mask_d,
    stride_ob,
    stride_on,
    N,
    HEAD_DIM: tl.constexpr,
):
    acc = acc / l_i[:, None]
    o_ptrs = OUT + b.to(tl.int64) * stride_ob + offs_m[:, None] * stride_on + h * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    # the row max of the raw scores and log2 of the row sum: the backward's P = exp2((qk - m) c - log2(l))
    tl.store(LSE + pid_bh * 2 * N + offs_m, m_i, mask=mask_m)
    tl.store(LSE + pid_bh * 2 * N + N + offs_m, tl.log2(l_i), mask=mask_m)


@triton.jit
def attention_fwd_kernel(
    QKV,  # [B, N, 3 * H * d] packed q | k | v, read through its batch and token strides
    OUT,  # [B, N, H * d] output, heads side by side (what the projection GEMM reads)
    LSE,  # [B * H, 2, N] fp32 softmax statistics per row (max, log2 sum) for the backward
    stride_qb,
    stride_qn,
    stride_ob,
    stride_on,
    N,
    H,
    D,
    BH,  # B * H, the (batch, head) pairs
    qk_scale_log2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WHOLE: tl.constexpr = False,  # a config's choice where N <= BLOCK_M + TAIL: one tile per (batch, head)
    TAIL: tl.constexpr = 0,  # the last partial block in a TAIL-wide tile where it fits (0: none); WHOLE: its rows
    ROW_TAIL: tl.constexpr = 0,  # a pair's last rows, at most ROW_TAIL past a full block, taken by that block's program
):
    if WHOLE:
        # Short sequences (65 tokens): a few persistent programs per SM walk the (batch, head) pairs. The loop has
        # no inner loop, so Triton's pipeliner keeps the next pairs' q/k/v loads in flight while this one computes:
        # at N = 65 a pair is ~25 KB of loads for two small dots, and one pair at a time left the SM waiting.
        for pid_bh in tl.range(tl.program_id(0), BH, tl.num_programs(0)):
            _attend_sequence(
                QKV,
                OUT,
                LSE,
                pid_bh,
                stride_qb,
                stride_qn,
                stride_ob,
                stride_on,
                N,
                H,
                D,
                qk_scale_log2,
                HEAD_DIM,
                BLOCK_D,
                DOT_PRECISION,
                BLOCK_M,
                TAIL,
            )
    else:
        if ROW_TAIL > 0:
            blocks = row_blocks(N, BLOCK_M, ROW_TAIL)  # the launcher's grid: ops/fused_attention.py's row_blocks
            pid_m = tl.program_id(0) % blocks
            pid_bh = tl.program_id(0) // blocks
            takes_rows = (pid_m == blocks - 1) & (blocks * BLOCK_M < N)  # the pair's last rows are past its blocks
        else:
            pid_m, pid_bh = block_and_head(N, BLOCK_M)
            takes_rows = False  # a constant: the branch below compiles away
        if takes_rows:
            _attend_rows(
                QKV,
                OUT,
                LSE,
                pid_m,
                pid_bh,
                stride_qb,
                stride_qn,
                stride_ob,
                stride_on,
                N,
                H,
                D,
                qk_scale_log2,
                HEAD_DIM,
                BLOCK_D,
                DOT_PRECISION,
                BLOCK_M,
                BLOCK_N,
                TAIL,
                ROW_TAIL,
            )
        else:
            _attend_rows(
                QKV,
                OUT,
                LSE,
                pid_m,
                pid_bh,
                stride_qb,
                stride_qn,
                stride_ob,
                stride_on,
                N,
                H,
                D,
                qk_scale_log2,
                HEAD_DIM,
                BLOCK_D,
                DOT_PRECISION,
                BLOCK_M,
                BLOCK_N,
                TAIL,
                0,
            )
