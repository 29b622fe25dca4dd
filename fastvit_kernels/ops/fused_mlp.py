"""The MLP half of a block, with the residual add and the next block's LayerNorm in fc2's epilogue.

  mlp_residual(h, residual, ...)             = residual + fc2(gelu(fc1(h)))
  mlp_residual_layernorm(h, residual, ...)   = (that sum, LayerNorm(that sum))      (fc2 + the next norm1)
  layernorm_mlp(x, ...)                      = x + fc2(gelu(fc1(LayerNorm(x))))    (the two ops above, composed)

h is LayerNorm's output in the compute dtype, as the previous op wrote it; the residual stream keeps its own dtype.
Per op: custom ops (torch.library) with fake implementations and autograd formulas, the checked public function and
the eager reference. The GEMMs with their epilogues (bias, GELU, GELU', residual, LayerNorm) and the weight gradients
are ops/gemm.py's; the shared stream helpers ops/fused_linear.py's.
"""

import torch

from ._common import (
    autocast_dtype,
    call,
    check_tensors,
    compute_dtype,
    custom_op,
    on_input_device,
    register_autograd,
)
from .fused_linear import (
    NO_BIAS,
    Tensor,
    bias_grad,
    cast,
    check_linear,
    check_norm,
    check_residual,
    check_same_dtype,
    grad_or_none,
    layer_norm,
    layer_norm_ref,
    norm_grad_fake,
    norm_or_empty,
    residual_dtype,
    residual_then_norm,
    stream_grad_out,
    stream_grads,
    stream_norm_fake,
)
from .gemm import linear, linear_gelu_grad, linear_weight_grad


@custom_op("fastvit::mlp_fwd")
@on_input_device
def _mlp_fwd(
    h: Tensor,
    residual: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    norm_w: Tensor,
    norm_b: Tensor,
    eps: float,
    normed_dtype: torch.dtype,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # the pre-activation is kept only when a backward can follow (inference writes just the GELU output)
    pre = torch.empty((*h.shape[:-1], w1.shape[0]), device=h.device, dtype=w1.dtype) if training else None
    act = linear(h, w1, b1, epilogue="gelu", pre=pre)  # [..., hidden]
    out, normed, mean, rstd = residual_then_norm(act, w2, b2, residual, norm_w, norm_b, eps, normed_dtype)
    return out, normed, mean, rstd, act, pre if training else act.new_empty(0)


@_mlp_fwd.register_fake
def _(h, residual, w1, b1, w2, b2, norm_w, norm_b, eps, normed_dtype, training):
    out = residual.new_empty(residual.shape, dtype=residual_dtype(residual, w2))
    normed, mean, rstd = stream_norm_fake(out, norm_w, normed_dtype)
    act = h.new_empty((*h.shape[:-1], w1.shape[0]), dtype=w1.dtype)
    return out, normed, mean, rstd, act, torch.empty_like(act) if training else act.new_empty(0)


@custom_op("fastvit::mlp_bwd")
@on_input_device
def _mlp_bwd(
    h: Tensor,
    w1: Tensor,
    w2: Tensor,
    norm_w: Tensor,
    out: Tensor,
    mean: Tensor,
    rstd: Tensor,
    act: Tensor,
    pre: Tensor,
    dout: Tensor | None,
    dnormed: Tensor | None,
    has_b1: bool,
    has_b2: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    # [..., D] twice (the GEMMs run in the compute dtype, as eager autocast's backward does), [D] twice, and fc2's
    # bias gradient where the LayerNorm backward summed it (else None)
    dstream, dy, dnw, dnb, db2 = stream_grads(dout, dnormed, out, mean, rstd, norm_w, w2.dtype, bias_sum=has_b2)
    dw2, db2_gemm = linear_weight_grad(dy, act, need_bias=has_b2 and db2 is None, out_dtype=w2.dtype)
    db2 = db2 if db2 is not None else db2_gemm
    # d(pre-activation) = (dy @ W2) * GELU'(pre): GELU's derivative in the GEMM epilogue (ours) or in the pass after
    # cuBLAS's GEMM, fc1's bias gradient summed where d pre is at hand (linear_gelu_grad)
    if has_b1:
        dpre, db1 = linear_gelu_grad(dy, w2.t(), pre, w1.dtype)  # [..., hidden], [hidden]
    else:
        dpre, db1 = linear(dy, w2.t(), epilogue="gelu_grad", pre=pre), None
    dw1, _ = linear_weight_grad(dpre, h, need_bias=False, out_dtype=w1.dtype)
    dh = torch.matmul(dpre, w1)  # plain GEMM, nothing to fuse: the LayerNorm backward before it needs whole rows
    db1, db2 = bias_grad(db1, has_b1, w1), bias_grad(db2, has_b2, w2)
    return dh, stream_grad_out(dstream, norm_w), dw1, db1, dw2, db2, dnw, dnb


@_mlp_bwd.register_fake
def _(h, w1, w2, norm_w, out, mean, rstd, act, pre, dout, dnormed, has_b1, has_b2):
    return (
        torch.empty_like(h),
        torch.empty_like(out) if norm_w.numel() else out.new_empty(0),
        torch.empty_like(w1),
        w1.new_empty(w1.shape[0] if has_b1 else NO_BIAS),
        torch.empty_like(w2),
        w2.new_empty(w2.shape[0] if has_b2 else NO_BIAS),
        *norm_grad_fake(norm_w),
    )


def _mlp_setup(ctx, inputs, output):
    h, _, w1, b1, w2, b2, norm_w, _, _, _, _ = inputs
    out, _, mean, rstd, act, pre = output
    ctx.save_for_backward(h, w1, w2, norm_w, out, mean, rstd, act, pre)
    ctx.has_b1, ctx.has_b2, ctx.has_norm = b1 is not None, b2 is not None, norm_w.numel() > 0


def _mlp_backward(ctx, dout, dnormed, *unused):
    grads = call(_mlp_bwd, *ctx.saved_tensors, dout, dnormed, ctx.has_b1, ctx.has_b2)
    dh, dres, dw1, db1, dw2, db2, dnw, dnb = grads
    return (
        dh,
        dres if ctx.has_norm else dout,
        dw1,
        grad_or_none(db1),
        dw2,
        grad_or_none(db2),
        grad_or_none(dnw),
        grad_or_none(dnb),
        None,
        None,
        None,
    )


register_autograd(_mlp_fwd, _mlp_backward, _mlp_setup)


# ----------------------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------------------
def _mlp(h, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, norm_weight, norm_bias, eps, normed_dtype):
    params = dict(fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias)
    device = check_tensors(h=h, residual=residual, norm_weight=norm_weight, norm_bias=norm_bias, **params)
    amp = autocast_dtype(device)
    check_linear(h, fc1_weight, fc1_bias, "fc1")
    D = h.shape[-1]
    if fc2_weight is None or fc2_weight.shape != (D, fc1_weight.shape[0]):
        shape = None if fc2_weight is None else tuple(fc2_weight.shape)
        raise ValueError(f"fc2 weight has shape {shape}; expected {(D, fc1_weight.shape[0])}")
    if fc2_bias is not None and fc2_bias.shape != (D,):
        raise ValueError(f"fc2 bias has shape {tuple(fc2_bias.shape)}; expected ({D},)")
    check_residual(residual, h.shape[:-1], D)
    check_same_dtype(h, fc1_weight, amp)
    check_same_dtype(residual, fc1_weight, amp)
    if norm_weight is not None:
        check_norm(D, norm_weight, norm_bias, "the MLP's output")
    cdt = amp or fc1_weight.dtype
    # the pre-activation is kept only when a backward can follow
    training = torch.is_grad_enabled() and (
        h.requires_grad or any(t is not None and t.requires_grad for t in params.values())
    )
    nw, nb = norm_or_empty(norm_weight, norm_bias, fc1_weight)
    w1, b1, w2, b2 = cast(fc1_weight, cdt), cast(fc1_bias, cdt), cast(fc2_weight, cdt), cast(fc2_bias, cdt)
    return call(_mlp_fwd, cast(h, cdt), residual, w1, b1, w2, b2, nw, nb, eps, normed_dtype or cdt, training)


def mlp_residual(h, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    """residual + fc2(gelu(fc1(h))), exact-erf GELU; the GEMMs in the compute dtype (autocast's), the output in the
    residual stream's dtype, as in eager autocast."""
    return _mlp(h, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, None, None, 0.0, None)[0]


def mlp_residual_layernorm(
    h, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, norm_weight, norm_bias, eps=1e-6, normed_dtype=None
):
    """(out, LayerNorm(out)) with out = residual + fc2(gelu(fc1(h))): the MLP with the next block's norm1 in fc2's
    epilogue (one launch where the model is at most 512 wide). LayerNorm's output is in `normed_dtype` (default: the
    compute dtype)."""
    args = (fc1_weight, fc1_bias, fc2_weight, fc2_bias, norm_weight, norm_bias, eps, normed_dtype)
    out, normed, *_ = _mlp(h, residual, *args)
    return out, normed


def layernorm_mlp(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps=1e-6):
    """x + fc2(gelu(fc1(layer_norm(x)))): a pre-norm MLP on its own, as layer_norm then mlp_residual."""
    params = dict(fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias)
    check_tensors(x=x, norm_weight=norm_weight, norm_bias=norm_bias, **params)
    h = layer_norm(x, norm_weight, norm_bias, eps, compute_dtype(fc1_weight))
    return mlp_residual(h, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)


# ----------------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------------
def mlp_residual_ref(h, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    F = torch.nn.functional
    return residual + F.linear(F.gelu(F.linear(h, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)


def mlp_residual_layernorm_ref(
    h, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias, norm_weight, norm_bias, eps=1e-6, normed_dtype=None
):
    out = mlp_residual_ref(h, residual, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    return out, layer_norm_ref(out, norm_weight, norm_bias, eps, normed_dtype or compute_dtype(fc1_weight))


def layernorm_mlp_ref(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps=1e-6):
    F = torch.nn.functional
    h = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    return x + F.linear(F.gelu(F.linear(h, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)
