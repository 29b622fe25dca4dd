import pytest
import torch
from helpers import assert_matches, check_op

from fastvit_kernels.ops import (
    _common,
    layernorm_linear,
    layernorm_linear_ref,
    layernorm_mlp,
    layernorm_mlp_ref,
    linear_residual,
    linear_residual_ref,
)

# (rows, D, hidden): rows not a multiple of any tile, D odd (100), hidden 4D and 3.5D, one row
SHAPES = [(37, 48, 192), (20, 100, 350), (1, 64, 224), (130, 192, 768)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _mlp_inputs(rows, D, hidden, device, batch_dims=()):
    def p(*shape, scale=0.2, base=0.0):
        return (base + scale * torch.randn(*shape, device=device)).requires_grad_()

    x = torch.randn(*batch_dims, rows, D, device=device, requires_grad=True)
    return [x, p(D, base=1.0), p(D), p(hidden, D), p(hidden), p(D, hidden), p(D)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "R{}-D{}-H{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layernorm_mlp_matches_reference(shape, dtype, device):
    check_op(layernorm_mlp, layernorm_mlp_ref, _mlp_inputs(*shape, device), dtype)


def test_layernorm_mlp_batched_and_non_contiguous_x(device):
    # x as a strided slice of a wider tensor, with a batch dim: [B, N, D] rows read through the row stride
    big = torch.randn(3, 7, 80, device=device, requires_grad=True)
    rest = _mlp_inputs(1, 48, 96, device)[1:]

    def op(fn):
        return lambda b, *ps: fn(b[:, :, 16:64], *ps)

    check_op(op(layernorm_mlp), op(layernorm_mlp_ref), [big] + rest, torch.float32)


@pytest.mark.parametrize("shape", SHAPES[:3] + [(21, 1024, 32), (9, 2100, 16)], ids=lambda s: "R{}-D{}-N{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layernorm_linear_matches_reference(shape, dtype, device):
    # D = 1024 and 2100: the row kernels hold fewer rows per program (4, then 1) with more warps
    x, nw, nb, w, b, _, _ = _mlp_inputs(*shape, device)
    check_op(layernorm_linear, layernorm_linear_ref, [x, nw, nb, w, b], dtype)


def test_layernorm_linear_without_bias(device):
    x, nw, nb, w, _, _, _ = _mlp_inputs(9, 32, 96, device)
    check_op(
        lambda *a: layernorm_linear(*a, None), lambda *a: layernorm_linear_ref(*a, None), [x, nw, nb, w], torch.float32
    )


@pytest.mark.parametrize("shape", [(37, 48, 64), (5, 100, 36)], ids=lambda s: "R{}-K{}-N{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_residual_matches_reference(shape, dtype, device):
    rows, K, N = shape
    x = torch.randn(2, rows, K, device=device, requires_grad=True)
    w = (0.2 * torch.randn(N, K, device=device)).requires_grad_()
    b = torch.randn(N, device=device, requires_grad=True)
    r = torch.randn(2, rows, N, device=device, requires_grad=True)
    check_op(linear_residual, linear_residual_ref, [x, w, b, r], dtype)


def test_autocast_follows_eager_autocast(device):
    # GEMMs in bf16, LayerNorm statistics in fp32, the residual stream keeps fp32, like eager autocast
    x, *params = _mlp_inputs(21, 64, 256, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        ours = layernorm_mlp(x, *params)
        eager = layernorm_mlp_ref(x, *params)
        qkv = layernorm_linear(x, *params[:4])
        qkv_eager = layernorm_linear_ref(x, *params[:4])
    assert ours.dtype == eager.dtype == torch.float32
    assert qkv.dtype == qkv_eager.dtype == torch.bfloat16
    leaves = [t.detach().double().requires_grad_() for t in [x] + params]
    ref = layernorm_mlp_ref(*leaves)
    assert_matches(ours, eager, ref, torch.bfloat16, "output under autocast")
    # every gradient against eager autocast's, by the same rule, in the parameters' own dtype (fp32)
    cot = torch.randn_like(ref)
    ref.backward(cot)
    g_ours = torch.autograd.grad(ours, [x] + params, cot.float())
    g_eager = torch.autograd.grad(eager, [x] + params, cot.float())
    for i, (a, b, r) in enumerate(zip(g_ours, g_eager, leaves)):
        assert a.dtype == torch.float32
        assert_matches(a, b, r.grad, torch.bfloat16, f"grad of input {i} under autocast")


def test_rejects_mismatched_shapes_and_dtypes(device):
    x, nw, nb, w1, b1, w2, b2 = _mlp_inputs(4, 32, 64, device)
    with pytest.raises(ValueError, match="norm_weight"):
        layernorm_mlp(x, nw[:16], nb, w1, b1, w2, b2)
    with pytest.raises(ValueError, match="fc1 weight"):
        layernorm_mlp(x, nw, nb, w1[:, :16], b1, w2, b2)
    with pytest.raises(ValueError, match="fc2 weight"):
        layernorm_mlp(x, nw, nb, w1, b1, w2[:, :10], b2)
    with pytest.raises(TypeError, match="cast one"):
        layernorm_mlp(x.half(), nw, nb, w1, b1, w2, b2)
    with pytest.raises(ValueError, match="residual"):
        linear_residual(x, w1, b1, x)


def test_rejects_tensors_on_two_devices(device, monkeypatch):
    # a weight left on another device would reach the kernel as a foreign pointer; "meta" stands in for a second GPU.
    # As on a GPU machine (no interpreter), the device check must come before "not a CUDA tensor"
    x, nw, nb, w1, b1, w2, b2 = _mlp_inputs(4, 32, 64, device)
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="fc2_weight on meta"):
        layernorm_mlp(x, nw, nb, w1, b1, w2.to("meta"), b2)
    with pytest.raises(RuntimeError, match="bias on meta"):
        layernorm_linear(x, nw, nb, w1, b1.to("meta"))
    with pytest.raises(RuntimeError, match="residual on meta"):
        linear_residual(x, w1[:32], None, x.to("meta"))
