"""Fused multi-head attention, forward and backward, straight from the packed qkv projection.

qkv is [B, N, 3*D] laid out as timm's qkv Linear writes it: [B, N, 3, H, d] (q | k | v, heads contiguous inside
each). The kernels read q, k and v through strides (no permute, no .contiguous()), write the output as
[B, N, H, d] = [B, N, D] so the projection GEMM reads it as is, and write the gradient into one packed dqkv.

Non-causal, any sequence length: every tile masks rows and columns past N, so N = 65 or 197 needs no padding copy.
"""

import math

import torch
import triton
import triton.language as tl

from ._common import (
    autotuned,
    call,
    cdiv,
    check_tensor,
    compute_dtype,
    custom_op,
    dot_precision,
    next_pow2,
    on_input_device,
    register_autograd,
)

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256  # BLOCK_D = 256 already fills the register file with a 64-row tile


@triton.jit
def _block_and_head(N, BLOCK: tl.constexpr):
    # One flat grid, sequence blocks fastest: the blocks of one head run side by side and share its K/V in L2. (A
    # second grid axis for batch x heads would cap it at 65535, which a CIFAR-10 evaluation batch of 11k images
    # exceeds.) Every attention kernel decodes its program id here, so the launchers' grids all read the same way.
    num_blocks = tl.cdiv(N, BLOCK)
    return tl.program_id(0) % num_blocks, tl.program_id(0) // num_blocks


@triton.jit
def _attention_fwd_kernel(
    QKV,
    OUT,
    LSE,
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
):
    pid_m, pid_bh = _block_and_head(N, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM  # head dims such as 80 or 96 run in a power-of-two tile, masked
    q_base = QKV + b.to(tl.int64) * stride_qb + h * HEAD_DIM
    k_base = q_base + D
    v_base = q_base + 2 * D

    mask_m = offs_m < N
    q = tl.load(
        q_base + offs_m[:, None] * stride_qn + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0
    )
    # Online softmax with exp2, the fast instruction, on the raw scores qk = q.k: the row max is subtracted first and
    # the scale (times log2(e)) applied after, P = exp2((qk - m) * qk_scale_log2). With logits in the thousands,
    # scaling first costs ulp(s) ~ 1e-4 relative in P, while qk - m is exact near the max. And no multiply precedes
    # the subtraction, so no compiler can contract it into an FMA in one kernel and not in another: the backward
    # recomputes the max element's P as exactly exp2(0 - log2(l)), which keeps sum(P) = 1 in saturated rows.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # accumulate in fp32 whatever the input dtype
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_kv = (cols[:, None] < N) & mask_d[None, :]
        k = tl.load(k_base + cols[:, None] * stride_qn + offs_d[None, :], mask=mask_kv, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        qk = tl.where(cols[None, :] < N, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # finite: every tile holds at least one real column
        p = tl.exp2((qk - m_new[:, None]) * qk_scale_log2)
        alpha = tl.exp2((m_i - m_new) * qk_scale_log2)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_qn + offs_d[None, :], mask=mask_kv, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_ptrs = OUT + b.to(tl.int64) * stride_ob + offs_m[:, None] * stride_on + h * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    # the row max of the raw scores and log2 of the row sum, kept apart: P = exp2((qk - m) * qk_scale_log2 - log2(l))
    # in the backward. Folding them into one log-sum-exp loses the low bits of qk - m when logits are in the thousands.
    tl.store(LSE + pid_bh * 2 * N + offs_m, m_i, mask=mask_m)
    tl.store(LSE + pid_bh * 2 * N + N + offs_m, tl.log2(l_i), mask=mask_m)


@triton.jit
def _probs(q, k, m, log_l, mask_m, mask_n, qk_scale_log2, DOT_PRECISION: tl.constexpr):
    # P rebuilt from the forward's row statistics, as the forward computed it (see there). One helper for every
    # recomputation, so the dQ kernel's two passes and the dK/dV kernel evaluate the very same expression. Padded rows
    # and columns contribute exactly zero (exp2(0 - 0) would be 1).
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    p = tl.exp2((qk - m[:, None]) * qk_scale_log2 - log_l[:, None])
    return tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)


@triton.jit
def _attention_bwd_dkdv_kernel(
    QKV,
    DO,
    LSE,
    DELTA,
    DQKV,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program owns a block of keys/values and sweeps all query blocks: dK and dV accumulate in registers and
    # are written once, no atomics. Non-causal: every query block contributes, none is skipped.
    pid_n, pid_bh = _block_and_head(N, BLOCK_N)  # over key blocks
    b = pid_bh // H
    h = pid_bh % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_n = offs_n < N
    q_base = QKV + b.to(tl.int64) * stride_qb + h * HEAD_DIM
    do_base = DO + b.to(tl.int64) * stride_dob + h * HEAD_DIM
    mask_kv = mask_n[:, None] & mask_d[None, :]
    k = tl.load(q_base + D + offs_n[:, None] * stride_qn + offs_d[None, :], mask=mask_kv, other=0.0)
    v = tl.load(q_base + 2 * D + offs_n[:, None] * stride_qn + offs_d[None, :], mask=mask_kv, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < N
        mask_q = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qn + offs_d[None, :], mask=mask_q, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_don + offs_d[None, :], mask=mask_q, other=0.0)
        m = tl.load(LSE + pid_bh * 2 * N + rows, mask=mask_m, other=0.0)
        log_l = tl.load(LSE + pid_bh * 2 * N + N + rows, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + pid_bh * N + rows, mask=mask_m, other=0.0)
        p = _probs(q, k, m, log_l, mask_m, mask_n, qk_scale_log2, DOT_PRECISION)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    g_base = DQKV + b.to(tl.int64) * stride_gb + h * HEAD_DIM + offs_n[:, None] * stride_gn + offs_d[None, :]
    tl.store(g_base + D, (dk * sm_scale).to(DQKV.dtype.element_ty), mask=mask_kv)
    tl.store(g_base + 2 * D, dv.to(DQKV.dtype.element_ty), mask=mask_kv)


@triton.jit
def _attention_bwd_dq_kernel(
    QKV,
    DO,
    LSE,
    DELTA,
    DQKV,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One program owns a block of queries and sweeps all keys twice: first for delta_i = rowsum(P * dP), then for
    # dQ. Flash attention takes delta = rowsum(dO * O) instead, with O rounded to bf16: when the softmax saturates
    # (logits in the thousands) that rounding swamps the true, tiny gradient. This pass costs two small GEMMs per
    # key block and keeps the gradient as exact as eager's. delta is written for the dK/dV kernel, which runs next.
    # (P is not renormalised by this pass's own row sum: the forward's sum is exact enough, see the forward, and
    # dividing delta and P by a sum one ulp off 1 made saturated rows' gradients up to 20x worse than eager's.)
    pid_m, pid_bh = _block_and_head(N, BLOCK_M)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
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
    delta = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        mask_kv = mask_n[:, None] & mask_d[None, :]
        k = tl.load(q_base + D + cols[:, None] * stride_qn + offs_d[None, :], mask=mask_kv, other=0.0)
        v = tl.load(q_base + 2 * D + cols[:, None] * stride_qn + offs_d[None, :], mask=mask_kv, other=0.0)
        p = _probs(q, k, m, log_l, mask_m, mask_n, qk_scale_log2, DOT_PRECISION)
        delta += tl.sum(p * tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION), 1)
    tl.store(DELTA + pid_bh * N + offs_m, delta, mask=mask_m)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N
        mask_kv = mask_n[:, None] & mask_d[None, :]
        k = tl.load(q_base + D + cols[:, None] * stride_qn + offs_d[None, :], mask=mask_kv, other=0.0)
        v = tl.load(q_base + 2 * D + cols[:, None] * stride_qn + offs_d[None, :], mask=mask_kv, other=0.0)
        p = _probs(q, k, m, log_l, mask_m, mask_n, qk_scale_log2, DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    g_ptrs = DQKV + b.to(tl.int64) * stride_gb + h * HEAD_DIM + offs_m[:, None] * stride_gn + offs_d[None, :]
    tl.store(g_ptrs, (dq * sm_scale).to(DQKV.dtype.element_ty), mask=mask_q)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _cfg(bm, bn, warps, stages, maxnreg=None):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages, maxnreg=maxnreg)


# Short sequences are the normal case (65 tokens for CIFAR-10, 197 for ImageNet): small tiles keep N = 65 from
# paying for a 128 x 128 tile of padding, and the tuner's key holds N so each length picks its own.
# At N = 65 the forward is memory-latency bound (5x above its byte floor on an H200): the 64 x 64 tile capped at 128
# registers (ptxas: 128, no stack, bf16, head dim 64; 134 uncapped) fits 4 blocks per SM instead of 3, more loads in
# flight. Offered to the tuner, unmeasured.
FWD_CONFIGS = [
    _cfg(64, 64, 4, 3),
    _cfg(32, 32, 4, 2),
    _cfg(32, 64, 4, 3),
    _cfg(64, 32, 4, 3),
    _cfg(128, 64, 8, 3),
    _cfg(128, 32, 8, 3),
    _cfg(16, 32, 4, 2),
    _cfg(64, 64, 4, 3, maxnreg=128),
]
BWD_CONFIGS = [
    _cfg(64, 64, 4, 2),
    _cfg(32, 32, 4, 2),
    _cfg(32, 64, 4, 2),
    _cfg(64, 32, 4, 2),
    _cfg(16, 32, 4, 2),
    _cfg(128, 64, 8, 2),
]
FALLBACK_CONFIG = _cfg(16, 16, 4, 1)  # fits any head dim <= 256 in fp32 on sm_80 and sm_90
SMEM_BUDGET = 160 * 1024  # under sm_80's 164 KB and sm_90's 228 KB per block


def _smem_estimate(cfg, block_d, elem):
    # pipelined K/V (or Q/dO) tiles per stage plus the resident tile; checked against the compiler's own numbers
    # by tests/test_compile_targets.py
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    return (cfg.num_stages * 2 * max(bm, bn) + min(bm, bn)) * block_d * elem


def _prune(configs, named_args, **kwargs):
    # fp32 with big head dims: the tiles outgrow shared memory, so only the smaller ones stay
    # triton passes the launch's keyword arguments (BLOCK_D here) apart from the positional ones
    block_d = kwargs["BLOCK_D"] if "BLOCK_D" in kwargs else named_args["BLOCK_D"]
    elem = named_args["QKV"].element_size()
    kept = [c for c in configs if _smem_estimate(c, block_d, elem) <= SMEM_BUDGET]
    # a register cap fits 16-bit tiles of head dim <= 64 only; wider heads and fp32 tiles would spill under it
    kept = [c for c in kept if c.maxnreg is None or (elem == 2 and block_d <= 64)]
    return kept or [FALLBACK_CONFIG]


_KEY = ["N", "HEAD_DIM", "DOT_PRECISION"]
_fwd = autotuned(_attention_fwd_kernel, FWD_CONFIGS, _KEY, _prune)
_bwd_dkdv = autotuned(_attention_bwd_dkdv_kernel, BWD_CONFIGS, _KEY, _prune)
_bwd_dq = autotuned(_attention_bwd_dq_kernel, BWD_CONFIGS, _KEY, _prune)


def _check_qkv(qkv: torch.Tensor, num_heads: int) -> int:
    check_tensor(qkv, "qkv")
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be [B, N, 3*D], got shape {tuple(qkv.shape)}")
    if qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv's last dimension {qkv.shape[-1]} is not 3 * num_heads ({num_heads}) * head_dim")
    head_dim = qkv.shape[-1] // (3 * num_heads)
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} is not supported (at most {MAX_HEAD_DIM})")
    return head_dim


def attention_fwd(qkv, num_heads, scale):
    B, N, three_d = qkv.shape
    D = three_d // 3
    d = D // num_heads
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()  # the kernels need unit stride along the feature dim; B and N strides are free
    o = torch.empty((B, N, D), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((B * num_heads, 2, N), device=qkv.device, dtype=torch.float32)  # (row max, log2 row sum)
    if B * N == 0:  # an empty batch: nothing to launch
        return o, lse, qkv
    block_d = max(16, next_pow2(d))  # tl.dot needs every dim >= 16

    def grid(meta):
        return (cdiv(N, meta["BLOCK_M"]) * B * num_heads,)

    _fwd[grid](
        qkv,
        o,
        lse,
        qkv.stride(0),
        qkv.stride(1),
        o.stride(0),
        o.stride(1),
        N,
        num_heads,
        D,
        scale * LOG2E,
        HEAD_DIM=d,
        BLOCK_D=block_d,
        DOT_PRECISION=dot_precision(qkv.dtype),
    )
    return o, lse, qkv


def attention_bwd(do, qkv, lse, num_heads, scale):
    B, N, three_d = qkv.shape
    D = three_d // 3
    d = D // num_heads
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if do.stride(-1) != 1:
        do = do.contiguous()
    block_d = max(16, next_pow2(d))
    delta = torch.empty((B * num_heads, N), device=qkv.device, dtype=torch.float32)  # written by dQ, read by dK/dV
    dqkv = torch.empty((B, N, three_d), device=qkv.device, dtype=qkv.dtype)
    if B * N == 0:
        return dqkv
    args = (
        qkv,
        do,
        lse,
        delta,
        dqkv,
        qkv.stride(0),
        qkv.stride(1),
        do.stride(0),
        do.stride(1),
        dqkv.stride(0),
        dqkv.stride(1),
        N,
        num_heads,
        D,
        scale,
        scale * LOG2E,
    )
    meta = dict(HEAD_DIM=d, BLOCK_D=block_d, DOT_PRECISION=dot_precision(qkv.dtype))
    _bwd_dq[lambda m: (cdiv(N, m["BLOCK_M"]) * B * num_heads,)](*args, **meta)  # first: it writes delta
    _bwd_dkdv[lambda m: (cdiv(N, m["BLOCK_N"]) * B * num_heads,)](*args, **meta)
    return dqkv


# ----------------------------------------------------------------------------------------------------------------
# Custom ops (torch.library): opaque to torch.compile, so a compiled model traces through them with no graph break,
# with fake implementations for shape propagation and the backward registered as autograd formula.
# ----------------------------------------------------------------------------------------------------------------
@custom_op("fastvit::attention_fwd")
@on_input_device
def _attention_fwd_op(qkv: torch.Tensor, num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse, _ = attention_fwd(qkv, num_heads, scale)
    return o, lse


@_attention_fwd_op.register_fake
def _(qkv, num_heads, scale):
    B, N, three_d = qkv.shape
    return qkv.new_empty((B, N, three_d // 3)), qkv.new_empty((B * num_heads, 2, N), dtype=torch.float32)


@custom_op("fastvit::attention_bwd")
@on_input_device
def _attention_bwd_op(
    do: torch.Tensor, qkv: torch.Tensor, lse: torch.Tensor, num_heads: int, scale: float
) -> torch.Tensor:
    return attention_bwd(do, qkv, lse, num_heads, scale)


@_attention_bwd_op.register_fake
def _(do, qkv, lse, num_heads, scale):
    return qkv.new_empty(qkv.shape)


def _attention_setup(ctx, inputs, output):
    qkv, ctx.num_heads, ctx.scale = inputs
    ctx.save_for_backward(qkv, output[1])


def _attention_backward(ctx, do, dlse):
    qkv, lse = ctx.saved_tensors
    return call(_attention_bwd_op, do, qkv, lse, ctx.num_heads, ctx.scale), None, None


register_autograd(_attention_fwd_op, _attention_backward, _attention_setup)


def attention(qkv: torch.Tensor, num_heads: int, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v per head, from packed qkv [B, N, 3*D]; returns [B, N, D] (heads concatenated).

    Under autocast qkv is cast to the autocast dtype first, as eager autocast does for attention.
    """
    head_dim = _check_qkv(qkv, num_heads)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not 0.0 < scale < math.inf:  # the kernels subtract the raw scores' max: it is the scaled max for scale > 0
        raise ValueError(f"scale must be positive and finite, got {scale}")
    qkv = qkv.to(compute_dtype(qkv))
    return call(_attention_fwd_op, qkv, num_heads, scale)[0]


def attention_ref(qkv: torch.Tensor, num_heads: int, scale: float | None = None, impl: str = "math") -> torch.Tensor:
    """Eager PyTorch attention from packed qkv: explicit softmax(QK^T)V ('math') or F.scaled_dot_product_attention."""
    B, N, three_d = qkv.shape
    d = three_d // (3 * num_heads)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q, k, v = qkv.reshape(B, N, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d)
    if impl == "sdpa":
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    elif impl == "math":
        attn = (q @ k.transpose(-2, -1)) * scale
        o = attn.softmax(dim=-1) @ v
    else:
        raise ValueError(f"unknown attention impl {impl!r}: expected 'math' or 'sdpa'")
    return o.transpose(1, 2).reshape(B, N, num_heads * d)  # (B, N, D)
