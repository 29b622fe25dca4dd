"""The linear layers of the attention half of a block, and the LayerNorm that feeds the first block.

  layer_norm(x, ...)                     = LayerNorm(x), written in the compute dtype      (norm1 of the first block)
  linear(x, ...)                         = x @ W^T + b                                      (qkv)
  linear_residual(x, ..., residual)      = residual + x @ W^T + b                          (proj)
  linear_residual_layernorm(x, ...)      = (that sum, LayerNorm(that sum))                 (proj + norm2)

The residual stream keeps its dtype (fp32 under autocast, as in eager); LayerNorm's output is written in the dtype the
next GEMM reads (eager rounds at the same place: where the following linear casts its input). With the LayerNorm in
the GEMM's epilogue, the stream's gradient gets the LayerNorm backward and the residual gradient in one row kernel.

Per op: custom ops (torch.library) with fake implementations and autograd formulas, the checked public function and
the eager reference. The GEMMs are ops/gemm.py's, the LayerNorm row kernels ops/layernorm.py's.
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
from .gemm import linear as gemm
from .gemm import linear_residual_layernorm as gemm_residual_layernorm
from .gemm import linear_weight_grad
from .layernorm import MAX_LN_DIM, layernorm_bwd, layernorm_fwd

Tensor = torch.Tensor
NO_BIAS = 0  # a gradient that does not exist comes back from an op as an empty tensor (ops cannot return None)


def grad_or_none(t):
    return t if t.numel() else None


def bias_grad(db, has_b, w):
    return db if has_b else w.new_empty(NO_BIAS)


def stream_grad(dout, dnormed, out, mean, rstd, norm_w):
    """(d stream, d norm weight, d norm bias) where the stream `out` [..., D] feeds the next residual add (gradient
    dout) and LayerNorm (gradient dnormed): the LayerNorm backward adds dout in the same pass. The LayerNorm's
    gradients are [D] (zeros when dnormed did not flow), empty without a LayerNorm. A gradient that did not flow is
    None; an op without LayerNorm has an empty norm_w, and its d stream is dout itself."""
    if dnormed is None or not norm_w.numel():
        dx = dout if dout is not None else torch.zeros_like(out)
        return dx, *norm_grad_zeros(norm_w)
    return layernorm_bwd(dnormed, out, mean, rstd, norm_w, dres=dout)


def norm_grad_zeros(norm_w):
    """(d norm weight, d norm bias) where dnormed did not flow: zeros, or empty tensors without a LayerNorm (ops may
    not return one tensor twice)."""
    if norm_w.numel():
        return torch.zeros_like(norm_w), torch.zeros_like(norm_w)
    return norm_w.new_empty(NO_BIAS), norm_w.new_empty(NO_BIAS)


def stream_grads(dout, dnormed, out, mean, rstd, norm_w, dtype, bias_sum=False):
    """stream_grad's gradients with d stream in `dtype` after d stream, the operand of the GEMMs' backward (eager
    autocast's rounding of the fp32 gradient): where a LayerNorm backward runs, its pass writes it beside the fp32 one,
    instead of a cast reading that again (at CIFAR-10's shape 77 MB, ~26 us at 3 TB/s, two a block). Then d norm
    weight, d norm bias, and db: with bias_sum where a LayerNorm backward runs, the column sums of d stream in `dtype`
    (the bias gradient of the GEMM that wrote `out`, rounded to dtype) from the same pass, else None (the caller sums
    them: linear_weight_grad)."""
    if dnormed is None or not norm_w.numel():
        dx, dnw, dnb = stream_grad(dout, dnormed, out, mean, rstd, norm_w)
        return dx, cast(dx, dtype), dnw, dnb, None
    dx_low = None if out.dtype == dtype else torch.empty(out.shape, device=out.device, dtype=dtype)
    sum_dtype = dtype if bias_sum else None
    dx, dnw, dnb, *db = layernorm_bwd(dnormed, out, mean, rstd, norm_w, dout, dx_low, sum_dtype)
    return dx, dx if dx_low is None else dx_low, dnw, dnb, (db[0] if db else None)


def norm_grad_fake(norm_w):
    """The fake (d norm weight, d norm bias) of an op: [D] each, or empty without a LayerNorm."""
    shape = norm_w.shape if norm_w.numel() else NO_BIAS
    return norm_w.new_empty(shape), norm_w.new_empty(shape)


def stream_norm_fake(stream, norm_w, normed_dtype):
    """The fake (out-of-LayerNorm) outputs of an op whose stream [..., D] may feed a LayerNorm: normed, mean, rstd."""
    if not norm_w.numel():
        empty = stream.new_empty(0, dtype=torch.float32)
        return stream.new_empty(0, dtype=normed_dtype), empty, torch.empty_like(empty)
    stats = stream.new_empty(stream.numel() // stream.shape[-1], dtype=torch.float32)
    return stream.new_empty(stream.shape, dtype=normed_dtype), stats, torch.empty_like(stats)


def residual_then_norm(a, w, b, residual, norm_w, norm_b, eps, normed_dtype):
    """(out, normed, mean, rstd) of residual + a @ w^T + b and its LayerNorm (empty without norm_w): the stream
    tail shared by proj and fc2."""
    if not norm_w.numel():
        out = gemm(a, w, b, epilogue="residual", residual=residual, out_dtype=residual_dtype(residual, w))
        empty = out.new_empty(0, dtype=torch.float32)
        return out, out.new_empty(0, dtype=normed_dtype), empty, empty.clone()
    return gemm_residual_layernorm(a, w, b, residual, norm_w, norm_b, eps, normed_dtype)


def stream_grad_out(dstream, norm_w):
    """d stream as an op returns it: without a LayerNorm it is the incoming gradient itself, which an op may not return
    (it would alias an input), so the op returns an empty tensor and its autograd formula passes dout on."""
    return dstream if norm_w.numel() else dstream.new_empty(0)


def residual_dtype(residual, w):
    return torch.promote_types(residual.dtype, w.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Custom ops: inputs arrive in the compute dtype (the public functions apply autocast's casts), except the stream
# (x / residual, its own dtype) and LayerNorm's parameters (fp32 under autocast, as eager keeps them).
# ----------------------------------------------------------------------------------------------------------------
@custom_op("fastvit::layer_norm_fwd")
@on_input_device
def _layer_norm_fwd(
    x: Tensor, w: Tensor, b: Tensor, eps: float, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    return layernorm_fwd(x, w, b, eps, out_dtype)  # y [..., D] in out_dtype, mean, rstd


@_layer_norm_fwd.register_fake
def _(x, w, b, eps, out_dtype):
    stats = x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype), stats, torch.empty_like(stats)


def _layer_norm_setup(ctx, inputs, output):
    x, w, _, _, _ = inputs
    ctx.save_for_backward(x, w, *output[1:])


def _layer_norm_backward(ctx, dy, *unused):
    x, w, mean, rstd = ctx.saved_tensors
    dx, dw, db = call(_layer_norm_bwd, dy, x, w, mean, rstd)
    return dx, dw, db, None, None


@custom_op("fastvit::layer_norm_bwd")
@on_input_device
def _layer_norm_bwd(dy: Tensor, x: Tensor, w: Tensor, mean: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return stream_grad(None, dy, x, mean, rstd, w)


@_layer_norm_bwd.register_fake
def _(dy, x, w, mean, rstd):
    return torch.empty_like(x), *norm_grad_fake(w)


register_autograd(_layer_norm_fwd, _layer_norm_backward, _layer_norm_setup)


@custom_op("fastvit::linear_fwd")
@on_input_device
def _linear_fwd(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return gemm(x, w, b)  # [..., out]


@_linear_fwd.register_fake
def _(x, w, b):
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=w.dtype)


@custom_op("fastvit::linear_bwd")
@on_input_device
def _linear_bwd(dout: Tensor, x: Tensor, w: Tensor, has_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    dy = cast(dout, w.dtype)  # the GEMMs run in the compute dtype, as eager autocast's backward does
    dw, db = linear_weight_grad(dy, x, need_bias=has_b, out_dtype=w.dtype)
    dx = torch.matmul(dy, w)  # plain GEMM, nothing to fuse
    return dx, dw, bias_grad(db, has_b, w)


@_linear_bwd.register_fake
def _(dout, x, w, has_b):
    return torch.empty_like(x), torch.empty_like(w), w.new_empty(w.shape[0] if has_b else NO_BIAS)


def _linear_setup(ctx, inputs, output):
    x, w, b = inputs
    ctx.save_for_backward(x, w)
    ctx.has_b = b is not None


def _linear_backward(ctx, dout):
    dx, dw, db = call(_linear_bwd, dout, *ctx.saved_tensors, ctx.has_b)
    return dx, dw, grad_or_none(db)


register_autograd(_linear_fwd, _linear_backward, _linear_setup)


@custom_op("fastvit::linear_residual_fwd")
@on_input_device
def _linear_residual_fwd(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    residual: Tensor,
    norm_w: Tensor,
    norm_b: Tensor,
    eps: float,
    normed_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return residual_then_norm(x, w, b, residual, norm_w, norm_b, eps, normed_dtype)


@_linear_residual_fwd.register_fake
def _(x, w, b, residual, norm_w, norm_b, eps, normed_dtype):
    out = residual.new_empty(residual.shape, dtype=residual_dtype(residual, w))
    return (out, *stream_norm_fake(out, norm_w, normed_dtype))


@custom_op("fastvit::linear_residual_bwd")
@on_input_device
def _linear_residual_bwd(
    x: Tensor,
    w: Tensor,
    norm_w: Tensor,
    out: Tensor,
    mean: Tensor,
    rstd: Tensor,
    dout: Tensor | None,
    dnormed: Tensor | None,
    has_b: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dstream, dy, dnw, dnb, db = stream_grads(dout, dnormed, out, mean, rstd, norm_w, w.dtype, bias_sum=has_b)
    dw, db_gemm = linear_weight_grad(dy, x, need_bias=has_b and db is None, out_dtype=w.dtype)
    dx = torch.matmul(dy, w)  # plain GEMM, nothing to fuse
    db = db if db is not None else db_gemm
    return dx, dw, bias_grad(db, has_b, w), stream_grad_out(dstream, norm_w), dnw, dnb


@_linear_residual_bwd.register_fake
def _(x, w, norm_w, out, mean, rstd, dout, dnormed, has_b):
    bias = w.new_empty(w.shape[0] if has_b else NO_BIAS)
    dres = torch.empty_like(out) if norm_w.numel() else out.new_empty(0)
    return torch.empty_like(x), torch.empty_like(w), bias, dres, *norm_grad_fake(norm_w)


def _linear_residual_setup(ctx, inputs, output):
    x, w, b, _, norm_w, _, _, _ = inputs
    out, _, mean, rstd = output
    ctx.save_for_backward(x, w, norm_w, out, mean, rstd)
    ctx.has_b, ctx.has_norm = b is not None, norm_w.numel() > 0


def _linear_residual_backward(ctx, dout, dnormed, *unused):
    dx, dw, db, dres, dnw, dnb = call(_linear_residual_bwd, *ctx.saved_tensors, dout, dnormed, ctx.has_b)
    dres = dres if ctx.has_norm else dout
    return dx, dw, grad_or_none(db), dres, grad_or_none(dnw), grad_or_none(dnb), None, None


register_autograd(_linear_residual_fwd, _linear_residual_backward, _linear_residual_setup)


# ----------------------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------------------
# The shape and dtype checks of the public ops; check_tensors (ops/_common.py) has checked each tensor already.
def check_linear(x, weight, bias, name):
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{name} weight has shape {tuple(weight.shape)}; expected [out, {x.shape[-1]}] for x {tuple(x.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{name} bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},)")


def check_norm(D, norm_weight, norm_bias, what="x"):
    for t, n in ((norm_weight, "norm_weight"), (norm_bias, "norm_bias")):
        if t is None:
            raise TypeError(f"{n} must be a torch.Tensor, got None")
        if t.shape != (D,):
            raise ValueError(f"{n} has shape {tuple(t.shape)}; expected ({D},) for {what}")
    if D > MAX_LN_DIM:
        raise ValueError(f"LayerNorm over {D} features is not supported (at most {MAX_LN_DIM})")


def check_residual(residual, lead, width):
    if residual.shape != (*lead, width):
        raise ValueError(f"residual has shape {tuple(residual.shape)}; expected {(*lead, width)}")


def check_same_dtype(x, weight, amp):
    """amp: the autocast dtype, None without autocast (autocast_dtype)."""
    if amp is None and x.dtype != weight.dtype:
        raise TypeError(f"input is {x.dtype} but the weights are {weight.dtype}: cast one, or run under autocast")


def cast(t, dtype):
    """t in dtype (None stays None). The dtype test first: a `.to` that changes nothing still costs a dispatch, ~1.5 us
    of host time, and a step makes ~150 of them."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def norm_or_empty(norm_weight, norm_bias, like):
    """(norm_weight, norm_bias) for an op's schema: the given pair, or two empty tensors (like's device and dtype) for
    a call without a LayerNorm (ops take no None where they branch on the LayerNorm's presence by numel)."""
    if norm_weight is not None:
        return norm_weight, norm_bias
    return like.new_empty(0), like.new_empty(0)


def layer_norm(x, weight, bias, eps=1e-6, out_dtype=None):
    """LayerNorm over the last dim, statistics in fp32, the output in `out_dtype` (default: the compute dtype, what
    the next linear reads; eager autocast rounds to it at the same place, when that linear casts its input)."""
    device = check_tensors(x=x, weight=weight, bias=bias)
    check_norm(x.shape[-1], weight, bias, f"x {tuple(x.shape)}")
    return call(_layer_norm_fwd, x, weight, bias, eps, out_dtype or autocast_dtype(device) or weight.dtype)[0]


def linear(x, weight, bias=None):
    """x @ weight^T + bias (nn.Linear), in the compute dtype (autocast's rule)."""
    amp = autocast_dtype(check_tensors(x=x, weight=weight, bias=bias))
    check_linear(x, weight, bias, "linear")
    check_same_dtype(x, weight, amp)
    cdt = amp or weight.dtype
    return call(_linear_fwd, cast(x, cdt), cast(weight, cdt), cast(bias, cdt))


def _linear_residual(x, weight, bias, residual, norm_weight, norm_bias, eps, normed_dtype):
    device = check_tensors(
        x=x, weight=weight, bias=bias, residual=residual, norm_weight=norm_weight, norm_bias=norm_bias
    )
    amp = autocast_dtype(device)
    check_linear(x, weight, bias, "linear")
    check_residual(residual, x.shape[:-1], weight.shape[0])
    check_same_dtype(x, weight, amp)
    check_same_dtype(residual, weight, amp)
    if norm_weight is not None:
        check_norm(weight.shape[0], norm_weight, norm_bias, "the linear's output")
    cdt = amp or weight.dtype
    nw, nb = norm_or_empty(norm_weight, norm_bias, weight)
    args = (cast(x, cdt), cast(weight, cdt), cast(bias, cdt), residual, nw, nb, eps, normed_dtype or cdt)
    return call(_linear_residual_fwd, *args)


def linear_residual(x, weight, bias, residual):
    """residual + linear(x): the attention projection with its bias and the residual add in the GEMM epilogue. The
    output keeps the residual stream's dtype (fp32 under autocast, as eager)."""
    return _linear_residual(x, weight, bias, residual, None, None, 0.0, None)[0]


def linear_residual_layernorm(x, weight, bias, residual, norm_weight, norm_bias, eps=1e-6, normed_dtype=None):
    """(out, LayerNorm(out)) with out = residual + linear(x): proj and the block's norm2 in one launch where the
    model is at most 512 wide. LayerNorm's output is in `normed_dtype` (default: the compute dtype)."""
    out, normed, _, _ = _linear_residual(x, weight, bias, residual, norm_weight, norm_bias, eps, normed_dtype)
    return out, normed


# ----------------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------------
def layer_norm_ref(x, weight, bias, eps=1e-6, out_dtype=None):
    F = torch.nn.functional
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps).to(out_dtype or compute_dtype(weight))


def linear_ref(x, weight, bias=None):
    return torch.nn.functional.linear(x, weight, bias)


def linear_residual_ref(x, weight, bias, residual):
    return residual + torch.nn.functional.linear(x, weight, bias)


def linear_residual_layernorm_ref(x, weight, bias, residual, norm_weight, norm_bias, eps=1e-6, normed_dtype=None):
    out = linear_residual_ref(x, weight, bias, residual)
    return out, layer_norm_ref(out, norm_weight, norm_bias, eps, normed_dtype or compute_dtype(weight))
