"""The kernels' erf, GELU and GELU' (kernels/common.py) against float64 over the whole float range.

nn.GELU() is the exact (erf) GELU; ours replaces libdevice's erff with a short fit, which must stay exact to fp32
accuracy: at most 1e-6 absolute error in erf, everywhere, and NaN in for NaN out.
"""

import pytest
import torch
import triton
import triton.language as tl

from fastvit_kernels.kernels.common import erf, gelu, gelu_grad


@triton.jit
def _pointwise_kernel(X, ERF, GELU, GELU_GRAD, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask)
    tl.store(ERF + offs, erf(x), mask=mask)
    tl.store(GELU + offs, gelu(x), mask=mask)
    tl.store(GELU_GRAD + offs, gelu_grad(x), mask=mask)


def _sweep(device):
    dense = torch.linspace(-12, 12, 240_001)  # every region of the fit, steps of 1e-4
    mags = torch.logspace(-38, 38, 20_001)  # tiny to huge magnitudes, both signs
    rnd = torch.randn(100_000) * 3  # fresh points each run
    special = torch.tensor([0.0, -0.0, torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max])
    return torch.cat([dense, mags, -mags, rnd, special]).float().to(device)


def _run(x):
    outs = [torch.full_like(x, float("nan")) for _ in range(3)]
    _pointwise_kernel[(triton.cdiv(x.numel(), 4096),)](x, *outs, x.numel(), BLOCK=4096)
    return outs


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, under the interpreter: inf * 0 and huge x squared
def test_erf_gelu_and_gelu_grad_match_float64_everywhere(device):
    x = _sweep(device)
    e, g, d = _run(x)
    xd = x.double()
    cdf = 0.5 * torch.erfc(-xd / 2**0.5)
    pdf = torch.exp(-0.5 * xd * xd) / (2 * torch.pi) ** 0.5
    checks = {
        "erf": (e, torch.erf(xd), 1e-6 * torch.ones_like(xd)),
        # GELU = x * Phi(x): an absolute error of Phi scales with |x|; torch's own fp32 GELU is 3.3e-7 |x| off
        "gelu": (g, xd * cdf, 1e-6 * xd.abs().clamp_min(1)),
        "gelu'": (d, cdf + xd * pdf, 1e-6 * torch.ones_like(xd)),
    }
    for name, (ours, ref, tol) in checks.items():
        err = (ours.double() - ref).abs()
        assert torch.isfinite(ours).all(), f"{name}: non-finite at x = {x[~torch.isfinite(ours)][:5].tolist()}"
        worst = int((err / tol).argmax())
        assert err[worst] <= tol[worst], f"{name}({x[worst].item():.9g}) is off by {err[worst].item():.3g}"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_propagates_and_erf_of_infinity(device):
    x = torch.tensor([float("nan"), 1.0, float("inf"), float("-inf")], device=device)
    e, g, d = _run(x)
    for out in (e, g, d):
        assert out[0].isnan() and out[1].isfinite()
    assert e[2:].tolist() == [1.0, -1.0]
