"""The attention half's linear ops (ops/fused_linear.py): LayerNorm to the compute dtype, the plain linear (qkv), and
the residual linear (proj) with and without the next LayerNorm in its epilogue; outputs and every gradient."""

import pytest
import torch
from helpers import assert_matches, check_op

from fastvit_kernels.ops import (
    _common,
    layer_norm,
    layer_norm_ref,
    linear,
    linear_ref,
    linear_residual,
    linear_residual_layernorm,
    linear_residual_layernorm_ref,
    linear_residual_ref,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _p(*shape, device, base=0.0, scale=0.2):
    return (base + scale * torch.randn(*shape, device=device)).requires_grad_()


# (rows, D): rows not a multiple of any tile, D odd (100), D = 1024 and 2100 (fewer rows per program, more warps)
@pytest.mark.parametrize(
    "shape", [(37, 48), (20, 100), (1, 64), (21, 1024), (9, 2100)], ids=lambda s: "R{}-D{}".format(*s)
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm(shape, dtype, device):
    rows, D = shape
    x = torch.randn(2, rows, D, device=device, requires_grad=True)
    check_op(layer_norm, layer_norm_ref, [x, _p(D, device=device, base=1.0), _p(D, device=device)], dtype)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear(bias, dtype, device):
    x = torch.randn(3, 13, 48, device=device, requires_grad=True)
    w = _p(144, 48, device=device)
    b = _p(144, device=device) if bias else None
    check_op(linear, linear_ref, [x, w, b], dtype)


@pytest.mark.parametrize("shape", [(37, 48, 64), (5, 100, 36)], ids=lambda s: "R{}-K{}-N{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_residual(shape, dtype, device):
    rows, K, N = shape
    x = torch.randn(2, rows, K, device=device, requires_grad=True)
    r = torch.randn(2, rows, N, device=device, requires_grad=True)
    check_op(linear_residual, linear_residual_ref, [x, _p(N, K, device=device), _p(N, device=device), r], dtype)


# N = 100: one masked chunk of the full-row tile; 384: three chunks (CIFAR); 640: the GEMM then the row kernel
@pytest.mark.parametrize("shape", [(37, 48, 100), (30, 64, 384), (9, 32, 640)], ids=lambda s: "R{}-K{}-N{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_residual_layernorm(shape, dtype, device):
    rows, K, N = shape
    x = torch.randn(2, rows, K, device=device, requires_grad=True)
    r = torch.randn(2, rows, N, device=device, requires_grad=True)
    w, b = _p(N, K, device=device), _p(N, device=device)
    nw, nb = _p(N, device=device, base=1.0), _p(N, device=device)
    check_op(linear_residual_layernorm, linear_residual_layernorm_ref, [x, w, b, r, nw, nb], dtype)


@pytest.mark.parametrize("keep", [0, 1], ids=["stream", "normed"])
def test_only_one_output_used(keep, device):
    # the last block's stream is not used when the model reads the final norm's output, and a LayerNorm output may go
    # unused: each backward then sees one gradient, the other None
    x = torch.randn(2, 7, 48, device=device, requires_grad=True)
    r = torch.randn(2, 7, 64, device=device, requires_grad=True)
    params = [_p(64, 48, device=device), _p(64, device=device), _p(64, device=device, base=1.0), _p(64, device=device)]
    check_op(
        lambda *a: linear_residual_layernorm(*a)[keep],
        lambda *a: linear_residual_layernorm_ref(*a)[keep],
        [x, params[0], params[1], r, params[2], params[3]],
        torch.float32,
    )


def test_autocast_dtypes_follow_eager(device):
    # GEMMs in bf16, the stream fp32, LayerNorm's output in bf16 (what the next linear would cast it to)
    x = torch.randn(2, 9, 48, device=device)
    r = torch.randn(2, 9, 64, device=device)
    w, b, nw, nb = (
        t.detach()
        for t in (_p(64, 48, device=device), _p(64, device=device), _p(64, device=device), _p(64, device=device))
    )
    with torch.autocast(device, dtype=torch.bfloat16):
        out, normed = linear_residual_layernorm(x, w, b, r, nw, nb)
        out_e, normed_e = linear_residual_layernorm_ref(x, w, b, r, nw, nb)
        wq = torch.randn(96, 64, device=device)
        qkv, qkv_e = linear(normed, wq, None), linear_ref(normed_e, wq, None)
        ln, ln_e = layer_norm(r, nw, nb), layer_norm_ref(r, nw, nb)
    assert (out.dtype, normed.dtype, qkv.dtype, ln.dtype) == (out_e.dtype, normed_e.dtype, qkv_e.dtype, ln_e.dtype)
    assert (out.dtype, normed.dtype) == (torch.float32, torch.bfloat16)
    ref = linear_residual_layernorm_ref(*(t.double() for t in (x, w.bfloat16(), b.bfloat16(), r, nw, nb)))
    assert_matches(out, out_e, ref[0], torch.bfloat16, "stream under autocast")
    assert_matches(normed, normed_e, ref[1], torch.bfloat16, "LayerNorm under autocast")


def test_autocast_gradients_through_stream_and_layernorm_follow_eager(device):
    # the backward of the GEMM with the next LayerNorm under autocast: the LayerNorm backward's pass writes the fp32
    # stream gradient and the bf16 operand of the GEMMs' backward beside it (rounded as eager's cast rounds it)
    x, r = torch.randn(2, 9, 48, device=device), torch.randn(2, 9, 64, device=device)
    params = [_p(64, 48, device=device), _p(64, device=device), 1 + _p(64, device=device), _p(64, device=device)]
    inputs = [x, params[0], params[1], r, params[2], params[3]]
    leaves = [t.detach().requires_grad_() for t in inputs]
    eager_leaves = [t.detach().requires_grad_() for t in inputs]
    with torch.autocast(device, dtype=torch.bfloat16):
        outs = linear_residual_layernorm(*leaves)
        outs_e = linear_residual_layernorm_ref(*eager_leaves)
    cots = [torch.randn(o.shape, device=device) for o in outs]
    torch.autograd.backward(outs, [c.to(o.dtype) for c, o in zip(cots, outs)])
    torch.autograd.backward(outs_e, [c.to(o.dtype) for c, o in zip(cots, outs_e)])
    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref_in = [t.to(torch.bfloat16).double() if i in (1, 2) else t for i, t in enumerate(ref_leaves)]  # the GEMM's bf16
    refs = linear_residual_layernorm_ref(*ref_in)
    torch.autograd.backward(refs, [c.to(o.dtype).double() for c, o in zip(cots, outs)])
    for i, (a, e, rl) in enumerate(zip(leaves, eager_leaves, ref_leaves)):
        assert a.grad.dtype == torch.float32
        assert_matches(a.grad, e.grad, rl.grad, torch.bfloat16, f"grad of input {i} under autocast")


def test_rejects_bad_inputs(device, monkeypatch):
    x = torch.randn(4, 32, device=device)
    w, nw = torch.randn(16, 32, device=device), torch.ones(16, device=device)
    with pytest.raises(ValueError, match="residual"):
        linear_residual(x, w, None, x)
    with pytest.raises(ValueError, match="norm_weight"):
        linear_residual_layernorm(x, w, None, x[:, :16], nw[:8], nw)
    with pytest.raises(ValueError, match="linear weight"):
        linear(x, w.t())
    with pytest.raises(TypeError, match="cast one"):
        linear(x.half(), w)
    with pytest.raises(ValueError, match="norm_bias"):
        layer_norm(x, torch.ones(32, device=device), nw)
    monkeypatch.setattr(_common, "interpreting", lambda: False)  # as on a GPU machine: the device check comes first
    with pytest.raises(RuntimeError, match="residual on meta"):
        linear_residual(x, w, None, x[:, :16].to("meta"))
