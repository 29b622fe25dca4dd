"""Fused multi-head attention, backward: delta and dQ of a whole (batch, head) pair at once, for short sequences
(N <= BLOCK + TAIL): the dQ kernel's WHOLE path (kernels/attention_bwd.py). Every row sees all its keys in one step,
so delta = rowsum(P * dP) and dS come from one P and one dP, where the query-block path sweeps the keys twice.

Tokens [0, BLOCK) form the main tile and tokens [BLOCK, BLOCK + TAIL) a tail tile (N = 65 = 64 + 1). The tail rows'
products are computed transposed (keys by rows) so that their M is 64 (the main keys or the head dim), as wgmma needs;
only the tail-by-tail blocks use mma.sync.
"""

import triton
import triton.language as tl

from .attention import _load_qkv
from .common import attention_probs, attention_probs_t


@triton.jit
def _load_tile(base, offs, offs_d, mask_n, mask_d, stride_n):
    mask = mask_n[:, None] & mask_d[None, :]
    return tl.load(base + offs[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(base, x, offs, offs_d, mask_n, mask_d, stride_n):
    mask = mask_n[:, None] & mask_d[None, :]
    tl.store(base + offs[:, None] * stride_n + offs_d[None, :], x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def dq_pair(
    QKV,
    DO,
    LSE,
    DELTA,
    DQKV,
    pid_bh,
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
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK: tl.constexpr,
    TAIL: tl.constexpr,
):
    """delta = rowsum(P * dP) and dQ of one pair, each row against all its keys at once (no second pass)."""
    b = pid_bh // H
    h = pid_bh % H
    base = QKV + b.to(tl.int64) * stride_qb + h * HEAD_DIM
    do_base = DO + b.to(tl.int64) * stride_dob + h * HEAD_DIM
    g_base = DQKV + b.to(tl.int64) * stride_gb + h * HEAD_DIM
    offs = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs < N
    mask_d = offs_d < HEAD_DIM
    stats = LSE + pid_bh * 2 * N
    q, k, v = _load_qkv(base, offs, offs_d, mask_n, mask_d, stride_qn, D)
    do = _load_tile(do_base, offs, offs_d, mask_n, mask_d, stride_don)
    m = tl.load(stats + offs, mask=mask_n, other=0.0)
    log_l = tl.load(stats + N + offs, mask=mask_n, other=0.0)
    p = attention_probs(q, k, m, log_l, mask_n, mask_n, qk_scale_log2, DOT_PRECISION)  # [rows, keys]
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    delta = tl.sum(p * dp, 1)
    if TAIL > 0:
        offs_t = BLOCK + tl.arange(0, TAIL)
        mask_t = offs_t < N
        q_t, k_t, v_t = _load_qkv(base, offs_t, offs_d, mask_t, mask_d, stride_qn, D)
        p_t = attention_probs(q, k_t, m, log_l, mask_n, mask_t, qk_scale_log2, DOT_PRECISION)  # [rows, tail keys]
        dp_t = tl.dot(do, tl.trans(v_t), input_precision=DOT_PRECISION)
        delta += tl.sum(p_t * dp_t, 1)
    tl.store(DELTA + pid_bh * N + offs, delta, mask=mask_n)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    if TAIL > 0:
        ds_t = p_t * (dp_t - delta[:, None])
        dq = tl.dot(ds_t.to(k_t.dtype), k_t, dq, input_precision=DOT_PRECISION)
    _store_tile(g_base, dq * sm_scale, offs, offs_d, mask_n, mask_d, stride_gn)
    if TAIL > 0:  # the tail rows, transposed: keys by rows
        do_t = _load_tile(do_base, offs_t, offs_d, mask_t, mask_d, stride_don)
        m_t = tl.load(stats + offs_t, mask=mask_t, other=0.0)
        log_l_t = tl.load(stats + N + offs_t, mask=mask_t, other=0.0)
        pt = attention_probs_t(k, q_t, m_t, log_l_t, mask_n, mask_t, qk_scale_log2, DOT_PRECISION)  # [keys, tail rows]
        pt_t = attention_probs_t(k_t, q_t, m_t, log_l_t, mask_t, mask_t, qk_scale_log2, DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do_t), input_precision=DOT_PRECISION)
        dpt_t = tl.dot(v_t, tl.trans(do_t), input_precision=DOT_PRECISION)
        delta_t = tl.sum(pt * dpt, 0) + tl.sum(pt_t * dpt_t, 0)
        tl.store(DELTA + pid_bh * N + offs_t, delta_t, mask=mask_t)
        dst = pt * (dpt - delta_t[None, :])
        dst_t = pt_t * (dpt_t - delta_t[None, :])
        dq_t = tl.dot(tl.trans(k), dst.to(k.dtype), input_precision=DOT_PRECISION)  # [d, tail rows]
        dq_t = tl.dot(tl.trans(k_t), dst_t.to(k_t.dtype), dq_t, input_precision=DOT_PRECISION)
        _store_tile(g_base, tl.trans(dq_t) * sm_scale, offs_t, offs_d, mask_t, mask_d, stride_gn)
