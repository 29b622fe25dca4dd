"""The LayerNorm row kernels (ops/layernorm.py) on their own, against float64: the forward's normalised rows in the
compute dtype with fp32 statistics, and the backward's input, weight and bias gradients with the residual gradient
added in the same pass."""

import pytest
import torch
from helpers import assert_matches

from fastvit_kernels.ops.layernorm import layernorm_bwd, layernorm_fwd

F = torch.nn.functional


@pytest.mark.parametrize("D", [48, 100, 384, 1024], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layernorm_forward_and_backward(D, out_dtype, device):
    M = 37  # not a multiple of any row block
    x = torch.randn(M, D, device=device) * 3 + 1
    w = 1 + 0.1 * torch.randn(D, device=device)
    b = 0.1 * torch.randn(D, device=device)
    dy = torch.randn(M, D, device=device)
    dres = torch.randn(M, D, device=device)

    y, mean, rstd = layernorm_fwd(x, w, b, 1e-6, out_dtype)
    leaves = [t.double().requires_grad_() for t in (x, w, b)]
    ref = F.layer_norm(leaves[0], (D,), leaves[1], leaves[2], 1e-6)
    assert y.dtype == out_dtype and mean.dtype == rstd.dtype == torch.float32
    assert_matches(y, F.layer_norm(x, (D,), w, b, 1e-6).to(out_dtype), ref, out_dtype, "normalised rows")
    torch.testing.assert_close(mean.double(), x.double().mean(1), rtol=1e-6, atol=1e-6)
    var = x.double().var(1, unbiased=False)
    torch.testing.assert_close(rstd.double(), 1 / torch.sqrt(var + 1e-6), rtol=1e-5, atol=0)

    dx, (dw, db) = layernorm_bwd(dy, x, mean, rstd, w, dres=dres)  # [2, D]: the weight's row, then the bias's
    ref.backward(dy.double())
    lowp = [t.detach().requires_grad_() for t in (x, w, b)]
    F.layer_norm(*lowp[:1], (D,), lowp[1], lowp[2], 1e-6).backward(dy)
    assert_matches(dx, lowp[0].grad + dres, leaves[0].grad + dres.double(), torch.float32, "dx + residual grad")
    assert_matches(dw, lowp[1].grad, leaves[1].grad, torch.float32, "dweight")
    assert_matches(db, lowp[2].grad, leaves[2].grad, torch.float32, "dbias")


@pytest.mark.parametrize("layout", ["padded rows", "sliced tokens", "strided features"])
def test_layernorm_rows_of_any_layout(layout, device):
    # the launchers take [..., D] as the ops hold it: rows in place where the leading dims collapse to one stride,
    # a copy where they do not or where the features are not at unit stride; outputs come back in x's shape
    B, T, D = 3, 5, 48
    base = torch.randn(B, T + 1, 2 * D, device=device)
    x = {
        "padded rows": base[:, :T].contiguous()[..., :D],
        "sliced tokens": base[:, 1:, :D],
        "strided features": base[:, :T, ::2],
    }[layout]
    w, b = 1 + 0.1 * torch.randn(D, device=device), 0.1 * torch.randn(D, device=device)
    dy, dres = torch.randn(B, T, D, device=device), torch.randn(B, T, 2 * D, device=device)[..., :D]
    y, mean, rstd = layernorm_fwd(x, w, b, 1e-6, torch.float32)
    assert y.shape == x.shape and mean.shape == (B * T,)
    xd = x.double().requires_grad_()
    ref = F.layer_norm(xd, (D,), w.double(), b.double(), 1e-6)
    assert_matches(y, F.layer_norm(x, (D,), w, b, 1e-6), ref, torch.float32, "normalised rows")
    dx, _ = layernorm_bwd(dy, x, mean, rstd, w, dres=dres)
    ref.backward(dy.double())
    xl = x.detach().requires_grad_()
    F.layer_norm(xl, (D,), w, b, 1e-6).backward(dy)
    assert dx.shape == x.shape
    assert_matches(dx, xl.grad + dres, xd.grad + dres.double(), torch.float32, "dx + residual grad")
