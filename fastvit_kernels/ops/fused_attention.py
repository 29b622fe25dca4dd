"""Fused multi-head attention, forward and backward, straight from the packed qkv projection.

qkv is [B, N, 3*D] laid out as timm's qkv Linear writes it: [B, N, 3, H, d] (q | k | v, heads contiguous inside
each). The kernels read q, k and v through strides (no permute, no .contiguous()), write the output as
[B, N, H, d] = [B, N, D] so the projection GEMM reads it as is, and write the gradient into one packed dqkv.

Non-causal, any sequence length: every tile masks rows and columns past N, so N = 65 or 197 needs no padding copy.
"""

import math

import torch

from ..configs import (
    ATTENTION_BWD_DKDV_CONFIGS,
    ATTENTION_BWD_DQ_CONFIGS,
    ATTENTION_BWD_MIN_BLOCK,
    ATTENTION_FWD_CONFIGS,
    prune_attention,
    row_blocks,
    whole_programs_per_sm,
)
from ..kernels.attention import attention_fwd_kernel
from ..kernels.attention_bwd import attention_bwd_dkdv_kernel, attention_bwd_dq_kernel
from ..tuning import Launcher
from ._common import (
    call,
    cdiv,
    check_tensor,
    compute_dtype,
    custom_op,
    dot_precision,
    next_pow2,
    num_sms,
    on_input_device,
    register_autograd,
)

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256  # BLOCK_D = 256 already fills the register file with a 64-row tile


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
# Triton's autotuner times the candidates per these arguments (and keeps the timings on disk where asked): BH, the
# (batch, head) pairs, is among them because the grid's size decides the tile; a batch of 8 chose the tile for
# batch 512 without it (H200, 2026-11-28: the N = 65 forward 0.046 -> 0.061 ms)
_KEY = ["N", "BH", "HEAD_DIM", "DOT_PRECISION"]
_fwd = Launcher(attention_fwd_kernel, ATTENTION_FWD_CONFIGS, _KEY, prune_attention)
_bwd_dkdv = Launcher(attention_bwd_dkdv_kernel, ATTENTION_BWD_DKDV_CONFIGS, _KEY, prune_attention)
_bwd_dq = Launcher(attention_bwd_dq_kernel, ATTENTION_BWD_DQ_CONFIGS, _KEY, prune_attention)


def _check_qkv(qkv: torch.Tensor, num_heads: int) -> int:
    check_tensor(qkv, "qkv")
    if qkv.dim() != 3:
        raise ValueError(f"qkv must be [B, N, 3*D], got shape {tuple(qkv.shape)}")
    return check_heads(qkv.shape[-1], num_heads, "qkv's last dimension")


def check_heads(width: int, num_heads: int, what: str) -> int:
    """The head dim of a packed q | k | v `width` wide (what: its name in the message)."""
    if width % (3 * num_heads):
        raise ValueError(f"{what} {width} is not 3 * num_heads ({num_heads}) * head_dim")
    head_dim = width // (3 * num_heads)
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} is not supported (at most {MAX_HEAD_DIM})")
    return head_dim


def attention_scale(head_dim: int, scale: float | None) -> float:
    """The scores' scale: 1 / sqrt(head_dim) by default; positive and finite (the kernels subtract the raw scores'
    max, which is the scaled max only for scale > 0)."""
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not 0.0 < scale < math.inf:
        raise ValueError(f"scale must be positive and finite, got {scale}")
    return scale


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

    pairs = B * num_heads
    sms = num_sms(qkv.device)

    def grid(cfg):
        if cfg.get("WHOLE"):  # persistent: each program walks (batch, head) pairs
            return (min(pairs, whole_programs_per_sm(cfg["BLOCK_M"]) * sms),)
        return (row_blocks(N, cfg["BLOCK_M"], cfg.get("ROW_TAIL", 0)) * pairs,)

    dot = dot_precision(qkv.dtype)
    # everything the configuration depends on (prune_attention: the length, the head dim, the element size; the
    # grid's size: pairs_bucket)
    key = (N, pairs_bucket(pairs), d, qkv.dtype, dot, qkv.device)
    _fwd.launch(
        key,
        grid,
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
        pairs,
        scale * LOG2E,
        HEAD_DIM=d,
        BLOCK_D=block_d,
        DOT_PRECISION=dot,
    )
    return o, lse, qkv


def attention_bwd(do, qkv, lse, num_heads, scale, bias_rows=False):
    """(dqkv [B, N, 3D], rows): with bias_rows, rows [B * bias_row_count(N), 3D] fp32 whose column sums are those of
    dqkv as stored (the bias gradient of the linear layer that wrote qkv, left to linear_weight_grad), else None."""
    B, N, three_d = qkv.shape
    D = three_d // 3
    d = D // num_heads
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    if do.stride(-1) != 1:
        do = do.contiguous()
    block_d = max(16, next_pow2(d))
    dqkv = torch.empty((B, N, three_d), device=qkv.device, dtype=qkv.dtype)
    per_batch = bias_row_count(N)
    rows = torch.empty((B * per_batch, three_d), device=qkv.device, dtype=torch.float32) if bias_rows else None
    if B * N == 0:
        return dqkv, rows
    delta = torch.empty((B * num_heads, N), device=qkv.device, dtype=torch.float32)  # written by dQ, read by dK/dV
    pairs = B * num_heads
    strides = (qkv.stride(0), qkv.stride(1), do.stride(0), do.stride(1), dqkv.stride(0), dqkv.stride(1))
    scales = (scale, scale * LOG2E)
    dot = dot_precision(qkv.dtype)
    key = (N, pairs_bucket(pairs), d, qkv.dtype, dot, qkv.device)
    meta = dict(HEAD_DIM=d, BLOCK_D=block_d, DOT_PRECISION=dot)

    def dq_grid(cfg):
        return (cdiv(N, cfg["BLOCK_M"]) * pairs,)

    def dkdv_grid(cfg):
        return (cdiv(N, cfg["BLOCK_N"]) * pairs,)

    tensors = (qkv, do, lse, delta, dqkv)
    scalars = (N, num_heads, D, *scales)
    _bwd_dq.launch(key, dq_grid, *tensors, *strides, *scalars, pairs, **meta)  # first: writes delta
    # the configs differ with the bias rows (prune_attention)
    dkdv_key = (*key, bias_rows)
    _bwd_dkdv.launch(dkdv_key, dkdv_grid, *tensors, rows, *strides, *scalars, per_batch, pairs, **meta)
    return dqkv, rows


def bias_row_count(N: int) -> int:
    """The partial rows per batch element of attention_bwd's bias rows: the most key blocks the dK/dV kernel may cut
    a pair of length N into."""
    return cdiv(N, ATTENTION_BWD_MIN_BLOCK)


def pairs_bucket(pairs: int) -> int:
    """The (batch, head) pairs as the launchers' keys hold them: the next power of two, so that an epoch's last,
    smaller batch mostly reuses the tile chosen for the full ones instead of timing the candidates again."""
    return next_pow2(pairs)


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
    return attention_bwd(do, qkv, lse, num_heads, scale)[0]


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
    scale = attention_scale(_check_qkv(qkv, num_heads), scale)
    cdt = compute_dtype(qkv)
    return call(_attention_fwd_op, qkv if qkv.dtype == cdt else qkv.to(cdt), num_heads, scale)[0]


def attention_ref(
    qkv: torch.Tensor, num_heads: int, scale: float | None = None, impl: str = "math", dropout_p: float = 0.0
) -> torch.Tensor:
    """Eager PyTorch attention from packed qkv: explicit softmax(QK^T)V ('math') or F.scaled_dot_product_attention,
    with dropout on the attention probabilities (the eager model's training path)."""
    B, N, three_d = qkv.shape
    d = three_d // (3 * num_heads)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q, k, v = qkv.reshape(B, N, 3, num_heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d)
    if impl == "sdpa":
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    elif impl == "math":
        attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)  # (B, H, N, N)
        o = torch.nn.functional.dropout(attn, dropout_p) @ v if dropout_p > 0 else attn @ v
    else:
        raise ValueError(f"unknown attention impl {impl!r}: expected 'math' or 'sdpa'")
    return o.transpose(1, 2).reshape(B, N, num_heads * d)  # (B, N, D)
