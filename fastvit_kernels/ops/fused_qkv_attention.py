"""The qkv projection and the attention as one op, so that the backward takes qkv's bias gradient from the attention
backward's own pass:

  qkv_attention(h, weight, bias, num_heads, scale)   = attention(linear(h, weight, bias), num_heads, scale)

The forward is linear's GEMM, then the attention kernel: the two launches the two ops made. The backward runs the
attention backward, whose dK/dV programs also leave the column sums of dqkv from their registers (a partial row per
key block of a batch element), then qkv's weight gradient, which sums those few rows for the bias gradient where a
column sum read dqkv again ([B, N, 3D]: 77 MB a block at CIFAR-10's training shape), and dh = dqkv @ W.

Per op: custom ops (torch.library) with fake implementations and autograd formulas, the checked public function and
the eager reference.
"""

import torch

from ._common import autocast_dtype, call, check_tensors, custom_op, on_input_device, register_autograd
from .fused_attention import attention_bwd, attention_fwd, attention_ref, attention_scale, check_heads
from .fused_linear import NO_BIAS, Tensor, bias_grad, cast, check_linear, check_same_dtype, grad_or_none
from .gemm import linear, linear_weight_grad


@custom_op("fastvit::qkv_attention_fwd")
@on_input_device
def _qkv_attention_fwd(
    h: Tensor, w: Tensor, b: Tensor | None, num_heads: int, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    o, lse, qkv = attention_fwd(linear(h, w, b), num_heads, scale)  # qkv [B, N, 3D] as the attention read it
    return o, qkv, lse


@_qkv_attention_fwd.register_fake
def _(h, w, b, num_heads, scale):
    B, N, _ = h.shape
    qkv = h.new_empty((B, N, w.shape[0]), dtype=w.dtype)
    lse = h.new_empty((B * num_heads, 2, N), dtype=torch.float32)
    return qkv.new_empty((B, N, w.shape[0] // 3)), qkv, lse


@custom_op("fastvit::qkv_attention_bwd")
@on_input_device
def _qkv_attention_bwd(
    do: Tensor, h: Tensor, w: Tensor, qkv: Tensor, lse: Tensor, num_heads: int, scale: float, has_b: bool
) -> tuple[Tensor, Tensor, Tensor]:
    dqkv, rows = attention_bwd(do, qkv, lse, num_heads, scale, bias_rows=has_b)  # [B, N, 3D], [B * blocks, 3D]
    dw, db = linear_weight_grad(dqkv, h, need_bias=has_b, out_dtype=w.dtype, bias_rows=rows)
    dh = torch.matmul(dqkv, w)  # plain GEMM, nothing to fuse
    return dh, dw, bias_grad(db, has_b, w)


@_qkv_attention_bwd.register_fake
def _(do, h, w, qkv, lse, num_heads, scale, has_b):
    return torch.empty_like(h), torch.empty_like(w), w.new_empty(w.shape[0] if has_b else NO_BIAS)


def _qkv_attention_setup(ctx, inputs, output):
    h, w, b, ctx.num_heads, ctx.scale = inputs
    _, qkv, lse = output
    ctx.save_for_backward(h, w, qkv, lse)
    ctx.has_b = b is not None


def _qkv_attention_backward(ctx, do, *unused):
    dh, dw, db = call(_qkv_attention_bwd, do, *ctx.saved_tensors, ctx.num_heads, ctx.scale, ctx.has_b)
    return dh, dw, grad_or_none(db), None, None


register_autograd(_qkv_attention_fwd, _qkv_attention_backward, _qkv_attention_setup)


def qkv_attention(h, weight, bias, num_heads, scale=None):
    """attention(linear(h, weight, bias), num_heads, scale): h [B, N, dim], weight [3 * D, dim] packed q | k | v with
    heads contiguous in each (timm's qkv Linear); returns [B, N, D], heads concatenated. The GEMM and the attention
    run in the compute dtype (autocast's), as eager autocast runs them."""
    amp = autocast_dtype(check_tensors(h=h, weight=weight, bias=bias))
    if h.dim() != 3:
        raise ValueError(f"h must be [B, N, dim], got shape {tuple(h.shape)}")
    check_linear(h, weight, bias, "qkv")
    check_same_dtype(h, weight, amp)
    scale = attention_scale(check_heads(weight.shape[0], num_heads, "the qkv weight's rows"), scale)
    cdt = amp or weight.dtype
    return call(_qkv_attention_fwd, cast(h, cdt), cast(weight, cdt), cast(bias, cdt), num_heads, scale)[0]


def qkv_attention_ref(h, weight, bias, num_heads, scale=None, impl="math"):
    return attention_ref(torch.nn.functional.linear(h, weight, bias), num_heads, scale, impl)
