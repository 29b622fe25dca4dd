"""The CPU interpreter computes as the GPU does (fastvit_kernels/_interpreter.py patches five defects).

Every bf16 kernel test here runs under the interpreter, so these are what make those tests mean the GPU's numbers.
"""

import pytest
import torch
import triton
import triton.language as tl

from fastvit_kernels._interpreter import interpreting

pytestmark = pytest.mark.skipif(not interpreting(), reason="checks the CPU interpreter; a GPU runs the real thing")


@triton.jit
def _cast_kernel(X, Y, Z, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask)
    tl.store(Y + offs, x.to(tl.bfloat16), mask=mask)  # an explicit cast
    tl.store(Z + offs, x, mask=mask)  # the implicit cast of a store into a bf16 tensor


@triton.jit
def _dot_kernel(A, B, C, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    a = tl.load(A + tl.arange(0, M)[:, None] * K + tl.arange(0, K)[None, :])
    b = tl.load(B + tl.arange(0, K)[:, None] * N + tl.arange(0, N)[None, :])
    tl.store(C + tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :], tl.dot(a, b))


def test_fp32_to_bf16_rounds_to_nearest_even_like_torch():
    x = torch.randn(4093) * torch.logspace(-30, 30, 4093)
    # ties (exactly half an ulp, odd and even neighbours), values that carry into the exponent, inf, nan, max float
    specials = torch.tensor(
        [
            1 + 2**-8,
            1 + 3 * 2**-8,
            1 - 2**-9 + 2**-24,
            2 - 2**-9,
            float("inf"),
            -float("inf"),
            float("nan"),
            3.4028234663852886e38,
            -0.0,
        ]
    )
    x = torch.cat([x, specials])
    y, z = (torch.empty(x.shape, dtype=torch.bfloat16) for _ in range(2))
    _cast_kernel[(1,)](x, y, z, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    expected = x.to(torch.bfloat16)
    for got in (y, z):
        same = (got.view(torch.int16) == expected.view(torch.int16)) | (got.isnan() & expected.isnan())
        assert same.all(), f"{(~same).sum().item()} casts differ from torch, e.g. {x[~same][:4].tolist()}"


def test_bf16_dot_accumulates_exact_products_in_fp32():
    a = torch.randn(16, 32).to(torch.bfloat16)
    b = torch.randn(32, 16).to(torch.bfloat16)
    c = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, c, M=16, N=16, K=32)
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_a_dot_gives_the_same_value_in_tiles_of_any_shape(dtype):
    # the attention backward recomputes the forward's scores in tiles of another shape: the GPU's fixed summation
    # order gives them the same bits, which numpy's BLAS (its order depends on the shape) did not
    a = (torch.randn(64, 64) * 30).to(dtype)
    b = (torch.randn(64, 64) * 30).to(dtype)
    wide, narrow, row = torch.empty(64, 64), torch.empty(64, 32), torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, wide, M=64, N=64, K=64)
    _dot_kernel[(1,)](a, b[:, :32].contiguous(), narrow, M=64, N=32, K=64)
    _dot_kernel[(1,)](a[:16].contiguous(), b[:, :16].contiguous(), row, M=16, N=16, K=64)
    assert torch.equal(wide[:, :32], narrow) and torch.equal(wide[:16, :16], row)
    exact = (a.double() @ b.double()).float()  # fp64 is exact for these sums: the correctly rounded fp32 value
    assert torch.equal(wide, exact)


@triton.jit
def _scalar_cast_kernel(X, Y):
    tl.store(Y, tl.load(X).to(tl.bfloat16))  # a 0-d value, not a block


def test_scalar_fp32_to_bf16_cast():
    for v in (1 + 3 * 2**-8, float("nan"), -2.5):
        y = torch.empty(1, dtype=torch.bfloat16)
        _scalar_cast_kernel[(1,)](torch.tensor([v]), y)
        expected = torch.tensor([v]).to(torch.bfloat16)
        assert (y.isnan() & expected.isnan()).all() or (y.view(torch.int16) == expected.view(torch.int16)).all()


@triton.jit
def _bool_cast_kernel(Y, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, (offs % 3 == 0).to(tl.bfloat16))


def test_bool_to_bf16_is_one_and_zero():
    y = torch.empty(16, dtype=torch.bfloat16)
    _bool_cast_kernel[(1,)](y, BLOCK=16)
    assert torch.equal(y, (torch.arange(16) % 3 == 0).to(torch.bfloat16))


@triton.jit
def _fma_kernel(X, Y, Z, OUT, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(OUT + offs, tl.fma(tl.load(X + offs), tl.load(Y + offs), tl.load(Z + offs)))


def test_fma_rounds_once():
    # x y - round(x y) is the product's rounding error, nonzero in general: fused it survives, unfused it is 0
    x, y = torch.randn(256) * 1000, torch.randn(256)
    z = -(x * y)
    out = torch.empty(256)
    _fma_kernel[(1,)](x, y, z, out, BLOCK=256)
    exact = (x.double() * y.double() + z.double()).float()  # the product is exact in fp64: one rounding
    assert torch.equal(out, exact)
    assert (out != 0).sum() > 200
