import pytest
import torch
from helpers import assert_matches, check_op

from fastvit_kernels.ops import (
    _common,
    layer_norm,
    layernorm_mlp,
    layernorm_mlp_ref,
    mlp_residual,
    mlp_residual_layernorm,
    mlp_residual_layernorm_ref,
    mlp_residual_ref,
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


# the MLP as a block runs it: h = LayerNorm's output in the compute dtype (the previous op wrote it), the residual
# stream in its own dtype; with the next LayerNorm in fc2's epilogue where D <= 512 (48, 100, 192), after it (640)
@pytest.mark.parametrize("shape", SHAPES + [(7, 640, 96)], ids=lambda s: "R{}-D{}-H{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mlp_residual_layernorm_matches_reference(shape, dtype, device):
    x, nw, nb, w1, b1, w2, b2 = _mlp_inputs(*shape, device)
    h = torch.randn_like(x).requires_grad_()
    check_op(mlp_residual_layernorm, mlp_residual_layernorm_ref, [h, x, w1, b1, w2, b2, nw, nb], dtype)


def test_mlp_residual_without_biases(device):
    x, _, _, w1, _, w2, _ = _mlp_inputs(37, 48, 192, device)
    h = torch.randn_like(x).requires_grad_()
    check_op(
        lambda *a: mlp_residual(*a[:3], None, a[3], None),
        lambda *a: mlp_residual_ref(*a[:3], None, a[3], None),
        [h, x, w1, w2],
        torch.float32,
    )


def test_autocast_follows_eager_autocast(device):
    # GEMMs in bf16, LayerNorm statistics in fp32, the residual stream keeps fp32, like eager autocast
    x, *params = _mlp_inputs(21, 64, 256, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        ours = layernorm_mlp(x, *params)
        eager = layernorm_mlp_ref(x, *params)
        h = layer_norm(x, *params[:2])
        h_eager = torch.nn.functional.layer_norm(x, (64,), *params[:2], 1e-6)
    assert ours.dtype == eager.dtype == torch.float32
    assert h.dtype == torch.bfloat16 and h_eager.dtype == torch.float32  # what eager's fc1 casts its input to
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
        mlp_residual(x, x[:2], w1, b1, w2, b2)


def test_rejects_tensors_on_two_devices(device, monkeypatch):
    # a weight left on another device would reach the kernel as a foreign pointer; "meta" stands in for a second GPU.
    # As on a GPU machine (no interpreter), the device check must come before "not a CUDA tensor"
    x, nw, nb, w1, b1, w2, b2 = _mlp_inputs(4, 32, 64, device)
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="fc2_weight on meta"):
        layernorm_mlp(x, nw, nb, w1, b1, w2.to("meta"), b2)
    with pytest.raises(RuntimeError, match="fc1_bias on meta"):
        mlp_residual(x, x, w1, b1.to("meta"), w2, b2)
    with pytest.raises(RuntimeError, match="norm_weight on meta"):
        mlp_residual_layernorm(x, x, w1, b1, w2, b2, nw.to("meta"), nb)
