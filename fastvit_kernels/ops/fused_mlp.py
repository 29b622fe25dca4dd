"""Fused LayerNorm + linear layers: the MLP half of a block, and the same machinery for the attention half.

  layernorm_mlp(x, ...)    = x + fc2(gelu(fc1(layer_norm(x))))
  layernorm_linear(x, ...) = linear(layer_norm(x))          (norm1 -> qkv)
  linear_residual(x, ...)  = residual + linear(x)           (attention proj + residual)

Per op: custom ops (torch.library) with fake implementations and autograd formulas, the checked public function and
the eager reference. LayerNorm runs as a row kernel that writes its output in the compute dtype (ops/layernorm.py);
the GEMMs with their epilogues (bias, GELU, GELU', residual) and the weight gradients are ops/linear.py's.
"""

import torch

from ._common import (
    call,
    check_same_device,
    check_tensor,
    compute_dtype,
    custom_op,
    on_input_device,
    register_autograd,
)
from .layernorm import MAX_LN_DIM, layernorm_bwd, layernorm_fwd
from .linear import linear, linear_weight_grad


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [rows, D] without a copy when the layout allows; otherwise one copy (non-viewable strides)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Custom ops (torch.library) and their autograd formulas. Opaque to torch.compile (no graph break, fake
# implementations give shapes); inputs arrive in the compute dtype (the public wrappers apply autocast's casts), except
# x / residual, which stay in the residual stream's dtype (fp32 under autocast, as in eager).
# ----------------------------------------------------------------------------------------------------------------
Tensor = torch.Tensor
NO_BIAS = 0  # a bias gradient that does not exist comes back from an op as an empty tensor (ops cannot return None)


def _grad_or_none(t):
    return t if t.numel() else None


@custom_op("fastvit::layernorm_mlp_fwd")
@on_input_device
def _layernorm_mlp_fwd(
    x: Tensor,
    norm_w: Tensor,
    norm_b: Tensor,
    w1: Tensor,
    b1: Tensor | None,
    w2: Tensor,
    b2: Tensor | None,
    eps: float,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    x2 = _rows(x)  # [M, D], the residual stream's dtype
    xn, mean, rstd = layernorm_fwd(x2, norm_w, norm_b, eps, w1.dtype)  # [M, D] in the compute dtype
    # the pre-activation is kept only when a backward can follow (inference writes just the GELU output)
    pre = torch.empty((x2.shape[0], w1.shape[0]), device=x.device, dtype=w1.dtype) if training else None
    h = linear(xn, w1.t(), b1, epilogue="gelu", pre=pre)  # [M, hidden]
    out = linear(h, w2.t(), b2, epilogue="residual", residual=x2, out_dtype=torch.promote_types(x.dtype, w2.dtype))
    return out.view(x.shape), xn, h, pre if training else h.new_empty(0), mean, rstd


@_layernorm_mlp_fwd.register_fake
def _(x, norm_w, norm_b, w1, b1, w2, b2, eps, training):
    M = x.numel() // x.shape[-1]
    xn = x.new_empty((M, x.shape[-1]), dtype=w1.dtype)
    h = x.new_empty((M, w1.shape[0]), dtype=w1.dtype)
    stats = x.new_empty(M, dtype=torch.float32)
    out = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, w2.dtype))
    return out, xn, h, torch.empty_like(h) if training else h.new_empty(0), stats, torch.empty_like(stats)


@custom_op("fastvit::layernorm_mlp_bwd")
@on_input_device
def _layernorm_mlp_bwd(
    dout: Tensor,
    x: Tensor,
    norm_w: Tensor,
    w1: Tensor,
    w2: Tensor,
    xn: Tensor,
    h: Tensor,
    pre: Tensor,
    mean: Tensor,
    rstd: Tensor,
    has_b1: bool,
    has_b2: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    x2, dy = _rows(x), _rows(dout)
    dy_c = dy.to(w2.dtype)  # the GEMMs run in the compute dtype, as eager autocast's backward does
    dw2, db2 = linear_weight_grad(dy_c, h, need_bias=has_b2)
    # d(pre-activation) = (dy @ W2) * GELU'(pre): GELU's derivative in the GEMM epilogue
    dpre = linear(dy_c, w2, epilogue="gelu_grad", pre=pre)
    dw1, db1 = linear_weight_grad(dpre, xn, need_bias=has_b1)  # the saved normalised rows, as eager autocast saves
    dxn = torch.matmul(dpre, w1)  # plain GEMM, nothing to fuse: the LayerNorm backward needs whole rows
    dx, dnw, dnb = layernorm_bwd(dxn, x2, mean, rstd, norm_w, dres=dy)
    return (
        dx.view(x.shape),
        dnw.to(norm_w.dtype),
        dnb.to(norm_w.dtype),
        dw1.to(w1.dtype),
        db1.to(w1.dtype) if has_b1 else w1.new_empty(NO_BIAS),
        dw2.to(w2.dtype),
        db2.to(w2.dtype) if has_b2 else w2.new_empty(NO_BIAS),
    )


@_layernorm_mlp_bwd.register_fake
def _(dout, x, norm_w, w1, w2, xn, h, pre, mean, rstd, has_b1, has_b2):
    return (
        torch.empty_like(x),
        torch.empty_like(norm_w),
        torch.empty_like(norm_w),
        torch.empty_like(w1),
        w1.new_empty(w1.shape[0] if has_b1 else NO_BIAS),
        torch.empty_like(w2),
        w2.new_empty(w2.shape[0] if has_b2 else NO_BIAS),
    )


def _layernorm_mlp_setup(ctx, inputs, output):
    x, norm_w, _, w1, b1, w2, b2, _, _ = inputs
    _, xn, h, pre, mean, rstd = output
    ctx.save_for_backward(x, norm_w, w1, w2, xn, h, pre, mean, rstd)
    ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None


def _layernorm_mlp_backward(ctx, dout, *unused):
    grads = call(_layernorm_mlp_bwd, dout, *ctx.saved_tensors, ctx.has_b1, ctx.has_b2)
    dx, dnw, dnb, dw1, db1, dw2, db2 = grads
    return dx, dnw, dnb, dw1, _grad_or_none(db1), dw2, _grad_or_none(db2), None, None


register_autograd(_layernorm_mlp_fwd, _layernorm_mlp_backward, _layernorm_mlp_setup)


@custom_op("fastvit::layernorm_linear_fwd")
@on_input_device
def _layernorm_linear_fwd(
    x: Tensor, norm_w: Tensor, norm_b: Tensor, w: Tensor, b: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    xn, mean, rstd = layernorm_fwd(_rows(x), norm_w, norm_b, eps, w.dtype)  # [M, D] in the compute dtype
    out = linear(xn, w.t(), b)
    return out.view(*x.shape[:-1], w.shape[0]), xn, mean, rstd


@_layernorm_linear_fwd.register_fake
def _(x, norm_w, norm_b, w, b, eps):
    M = x.numel() // x.shape[-1]
    stats = x.new_empty(M, dtype=torch.float32)
    xn = x.new_empty((M, x.shape[-1]), dtype=w.dtype)
    return x.new_empty((*x.shape[:-1], w.shape[0]), dtype=w.dtype), xn, stats, torch.empty_like(stats)


@custom_op("fastvit::layernorm_linear_bwd")
@on_input_device
def _layernorm_linear_bwd(
    dout: Tensor, x: Tensor, norm_w: Tensor, w: Tensor, xn: Tensor, mean: Tensor, rstd: Tensor, has_b: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    x2 = _rows(x)
    dy = _rows(dout).to(w.dtype)
    dw, db = linear_weight_grad(dy, xn, need_bias=has_b)
    dxn = torch.matmul(dy, w)  # plain GEMM, nothing to fuse: the LayerNorm backward needs whole rows
    dx, dnw, dnb = layernorm_bwd(dxn, x2, mean, rstd, norm_w)
    return (
        dx.view(x.shape),
        dnw.to(norm_w.dtype),
        dnb.to(norm_w.dtype),
        dw.to(w.dtype),
        db.to(w.dtype) if has_b else w.new_empty(NO_BIAS),
    )


@_layernorm_linear_bwd.register_fake
def _(dout, x, norm_w, w, xn, mean, rstd, has_b):
    return (
        torch.empty_like(x),
        torch.empty_like(norm_w),
        torch.empty_like(norm_w),
        torch.empty_like(w),
        w.new_empty(w.shape[0] if has_b else NO_BIAS),
    )


def _layernorm_linear_setup(ctx, inputs, output):
    x, norm_w, _, w, b, _ = inputs
    ctx.save_for_backward(x, norm_w, w, *output[1:])
    ctx.has_b = b is not None


def _layernorm_linear_backward(ctx, dout, *unused):
    dx, dnw, dnb, dw, db = call(_layernorm_linear_bwd, dout, *ctx.saved_tensors, ctx.has_b)
    return dx, dnw, dnb, dw, _grad_or_none(db), None


register_autograd(_layernorm_linear_fwd, _layernorm_linear_backward, _layernorm_linear_setup)


@custom_op("fastvit::linear_residual_fwd")
@on_input_device
def _linear_residual_fwd(x: Tensor, w: Tensor, b: Tensor | None, residual: Tensor) -> Tensor:
    out_dtype = torch.promote_types(residual.dtype, w.dtype)
    out = linear(_rows(x), w.t(), b, epilogue="residual", residual=_rows(residual), out_dtype=out_dtype)
    return out.view(residual.shape)


@_linear_residual_fwd.register_fake
def _(x, w, b, residual):
    return residual.new_empty(residual.shape, dtype=torch.promote_types(residual.dtype, w.dtype))


@custom_op("fastvit::linear_residual_bwd")
@on_input_device
def _linear_residual_bwd(dout: Tensor, x: Tensor, w: Tensor, has_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    dy = _rows(dout).to(w.dtype)
    dw, db = linear_weight_grad(dy, _rows(x), need_bias=has_b)
    dx = torch.matmul(dy, w)  # plain GEMM, nothing to fuse
    return dx.view(x.shape), dw.to(w.dtype), db.to(w.dtype) if has_b else w.new_empty(NO_BIAS)


@_linear_residual_bwd.register_fake
def _(dout, x, w, has_b):
    return torch.empty_like(x), torch.empty_like(w), w.new_empty(w.shape[0] if has_b else NO_BIAS)


def _linear_residual_setup(ctx, inputs, output):
    x, w, b, _ = inputs
    ctx.save_for_backward(x, w)
    ctx.has_b = b is not None


def _linear_residual_backward(ctx, dout):
    dx, dw, db = call(_linear_residual_bwd, dout, *ctx.saved_tensors, ctx.has_b)
    return dx, dw, _grad_or_none(db), dout


register_autograd(_linear_residual_fwd, _linear_residual_backward, _linear_residual_setup)


# ----------------------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------------------
def _check_linear(x, weight, bias, name):
    check_tensor(x, "x")
    check_tensor(weight, f"{name} weight")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"{name} weight has shape {tuple(weight.shape)}; expected [out, {x.shape[-1]}] for x {tuple(x.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{name} bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},)")


def _check_norm(x, norm_weight, norm_bias):
    D = x.shape[-1]
    for t, n in ((norm_weight, "norm_weight"), (norm_bias, "norm_bias")):
        check_tensor(t, n)
        if t.shape != (D,):
            raise ValueError(f"{n} has shape {tuple(t.shape)}; expected ({D},) for x {tuple(x.shape)}")
    if D > MAX_LN_DIM:
        raise ValueError(f"LayerNorm over {D} features is not supported (at most {MAX_LN_DIM})")


def _check_same_dtype(x, weight):
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != weight.dtype:
        raise TypeError(f"input is {x.dtype} but the weights are {weight.dtype}: cast one, or run under autocast")


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def layernorm_mlp(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps=1e-6):
    """x + fc2(gelu(fc1(layer_norm(x)))), exact-erf GELU. Under autocast the GEMMs run in the autocast dtype,
    LayerNorm statistics in fp32, and the output keeps the residual stream's dtype, as in eager autocast."""
    check_same_device(
        x=x,
        norm_weight=norm_weight,
        norm_bias=norm_bias,
        fc1_weight=fc1_weight,
        fc1_bias=fc1_bias,
        fc2_weight=fc2_weight,
        fc2_bias=fc2_bias,
    )
    _check_norm(x, norm_weight, norm_bias)
    _check_linear(x, fc1_weight, fc1_bias, "fc1")
    check_tensor(fc2_weight, "fc2 weight")
    if fc2_weight.shape != (x.shape[-1], fc1_weight.shape[0]):
        raise ValueError(
            f"fc2 weight has shape {tuple(fc2_weight.shape)}; expected {(x.shape[-1], fc1_weight.shape[0])}"
        )
    if fc2_bias is not None and fc2_bias.shape != (x.shape[-1],):
        raise ValueError(f"fc2 bias has shape {tuple(fc2_bias.shape)}; expected ({x.shape[-1]},)")
    _check_same_dtype(x, fc1_weight)
    cdt = compute_dtype(fc1_weight)
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    )
    return call(
        _layernorm_mlp_fwd,
        x,
        norm_weight,
        norm_bias,
        fc1_weight.to(cdt),
        _cast(fc1_bias, cdt),
        fc2_weight.to(cdt),
        _cast(fc2_bias, cdt),
        eps,
        training,
    )[0]


def layernorm_linear(x, norm_weight, norm_bias, weight, bias, eps=1e-6):
    """linear(layer_norm(x)): norm1 -> qkv with the LayerNorm applied in the GEMM's prologue."""
    check_same_device(x=x, norm_weight=norm_weight, norm_bias=norm_bias, weight=weight, bias=bias)
    _check_norm(x, norm_weight, norm_bias)
    _check_linear(x, weight, bias, "linear")
    _check_same_dtype(x, weight)
    cdt = compute_dtype(weight)
    return call(_layernorm_linear_fwd, x, norm_weight, norm_bias, weight.to(cdt), _cast(bias, cdt), eps)[0]


def linear_residual(x, weight, bias, residual):
    """residual + linear(x): the attention projection with its bias and the residual add in the GEMM epilogue."""
    check_same_device(x=x, weight=weight, bias=bias, residual=residual)
    _check_linear(x, weight, bias, "linear")
    check_tensor(residual, "residual")
    if residual.shape[:-1] != x.shape[:-1] or residual.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"residual has shape {tuple(residual.shape)}; expected {tuple(x.shape[:-1]) + (weight.shape[0],)}"
        )
    _check_same_dtype(x, weight)
    _check_same_dtype(residual, weight)
    cdt = compute_dtype(weight)
    return call(_linear_residual_fwd, x.to(cdt), weight.to(cdt), _cast(bias, cdt), residual)


# ----------------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------------
def layernorm_mlp_ref(x, norm_weight, norm_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps=1e-6):
    F = torch.nn.functional
    h = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    return x + F.linear(F.gelu(F.linear(h, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)


def layernorm_linear_ref(x, norm_weight, norm_bias, weight, bias, eps=1e-6):
    F = torch.nn.functional
    return F.linear(F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps), weight, bias)


def linear_residual_ref(x, weight, bias, residual):
    return residual + torch.nn.functional.linear(x, weight, bias)
