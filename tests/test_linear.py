"""The GEMM engine (ops/gemm.py) on its own: every epilogue, through tensor descriptors (TMA) where the operands
allow them and through pointer loads where they do not, and through the cuBLAS candidate (torch's matmul and
epilogue), against float64. Each tile forced in turn: tests/test_gemm_tiles.py."""

import pytest
import torch
from helpers import TwiceLaunched, assert_matches, force_gemm_candidate, linear_ref

from fastvit_kernels import tuning
from fastvit_kernels.ops import gemm as lin
from fastvit_kernels.ops import tma

F = torch.nn.functional


@pytest.fixture(params=tuning.GEMM_BACKENDS)
def backend(request, monkeypatch):
    """Each GEMM candidate in turn, forced as FASTVIT_GEMM forces it."""
    monkeypatch.setenv("FASTVIT_GEMM", request.param)
    return request.param


@pytest.fixture(params=[*tuning.GEMM_BACKENDS, "triton+ln"])
def ln_backend(request, monkeypatch):
    """The candidates of the GEMM with the LayerNorm in turn: FASTVIT_GEMM's two families, and "triton+ln" (our
    residual GEMM, then the row kernel), which only a timing picks where the full-row tile spans the row: made to win
    it here."""
    force_gemm_candidate(monkeypatch, request.param)
    return request.param


# (M, K, N): K = 48 keeps every row 16-byte aligned (TMA); K = 100 in 16-bit dtypes does not (pointer loads)
SHAPES = [(70, 48, 40), (33, 100, 24), (130, 64, 200)]


@pytest.mark.parametrize("epilogue", lin.EPILOGUES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-K{}-N{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_epilogues(epilogue, shape, dtype, device, backend):
    M, K, N = shape
    a = torch.randn(M, K, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) * K**-0.5).to(dtype)
    b = (0.1 * torch.randn(N, device=device)).to(dtype) if epilogue != "gelu_grad" else None
    pre = torch.randn(M, N, device=device).to(dtype)
    res = torch.randn(M, N, device=device)  # the residual stream stays fp32, as under autocast
    # GELU' reads W2 untransposed: its weight is a transposed view (N contiguous), read through an N-major descriptor
    # where N's rows are 16-byte aligned too
    weight = w.t().contiguous().t() if epilogue == "gelu_grad" else w
    es = a.element_size()
    expect_tma = (K * es) % 16 == 0 and (epilogue != "gelu_grad" or (N * es) % 16 == 0)
    assert tma.operands_ok(a, K, weight) == expect_tma
    stored = torch.full((M, N), float("nan"), device=device, dtype=dtype) if epilogue == "gelu" else None
    out_dtype = torch.float32 if epilogue == "residual" else None
    ours = lin.linear(
        a, weight, b, epilogue=epilogue, pre=stored if epilogue == "gelu" else pre, residual=res, out_dtype=out_dtype
    )
    args = [t.double() if t is not None else None for t in (a, w, b, pre, res)]
    ref = linear_ref(args[0], args[1], args[2], epilogue, args[3], args[4])
    low = linear_ref(a, w, b, epilogue, pre, res)
    assert lin.last_backend == backend
    assert_matches(ours, low, ref, dtype)
    if epilogue == "gelu":  # the pre-activation written for the backward
        pre_ref = args[0] @ args[1].t() + args[2]
        assert_matches(stored, a @ w.t() + b, pre_ref, dtype, "pre-activation")


@pytest.mark.parametrize(
    "shape, dtype", [(SHAPES[0], torch.bfloat16), (SHAPES[1], torch.bfloat16), (SHAPES[0], torch.float32)], ids=str
)
def test_gelu_grad_with_its_bias_sums(shape, dtype, device, backend):
    # fc1's output gradient (dy @ W2) * GELU'(pre) and its column sums, fc1's bias gradient, from each candidate: ours
    # from its tiles' partial rows, cuBLAS's from its GELU' pass (reduce.gelu_grad_column_sum)
    M, K, N = shape
    a = torch.randn(M, K, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) * K**-0.5).to(dtype)
    pre = torch.randn(M, N, device=device).to(dtype)
    dpre, db = lin.linear_gelu_grad(a, w.t().contiguous().t(), pre, dtype)
    assert lin.last_backend == backend and dpre.dtype == dtype
    ref = linear_ref(a.double(), w.double(), None, "gelu_grad", pre.double(), None)
    low = linear_ref(a, w, None, "gelu_grad", pre, None)
    assert_matches(dpre, low, ref, dtype, "d pre")
    assert db.dtype == dtype and db.shape == (N,)
    assert_matches(db, low.sum(0, dtype=torch.float32).to(dtype), ref.sum(0), dtype, "bias gradient")


def _layouts(B, T, K, device):
    """[B, T, K] operands: contiguous; rows padded to K + 8 (the leading dims still one stride apart: read in place);
    tokens sliced out of T + 1 (two strides: copied)."""
    base = torch.randn(B, T + 1, K + 8, device=device).to(torch.bfloat16)
    return {
        "contiguous": (base[:, :T, :K].contiguous(), True),
        "padded rows": (base[:, :T].contiguous()[..., :K], True),
        "sliced tokens": (base[:, 1:, :K], False),
    }


@pytest.mark.parametrize("layout", ["contiguous", "padded rows", "sliced tokens"])
def test_leading_dims_are_read_in_place_where_they_collapse(layout, device, backend):
    # the ops hand the engine their [B, T, K] tensors as they are: rows through one stride where the leading dims
    # allow it, a copy where they do not; the output comes back [B, T, N], and so does the LayerNorm GEMM's
    B, T, K, N = 3, 5, 48, 40
    a, in_place = _layouts(B, T, K, device)[layout]
    assert (lin.as_rows(a)[0] is a) == in_place
    w = (torch.randn(N, K, device=device) * K**-0.5).to(torch.bfloat16)
    b = (0.1 * torch.randn(N, device=device)).to(torch.bfloat16)
    res = torch.randn(B, T, N, device=device)
    ref = a.double() @ w.double().t() + b.double()
    out = lin.linear(a, w, b)
    assert out.shape == (B, T, N)
    assert_matches(out, F.linear(a, w, b), ref, torch.bfloat16)
    nw, nb = torch.ones(N, device=device), torch.zeros(N, device=device)
    x, y, mean, _ = lin.linear_residual_layernorm(a, w, b, res, nw, nb, 1e-6, torch.bfloat16)
    assert x.shape == y.shape == (B, T, N) and mean.shape == (B * T,)
    assert_matches(x, res + F.linear(a, w, b), res.double() + ref, torch.bfloat16, "X")


# R = 300: one split; 2600: three splits (the interpreter counts 4 SMs), whose partials the kernel's last program adds
@pytest.mark.parametrize("R", [300, 2600])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_grad_and_bias_grad(R, dtype, device, backend):
    g = torch.randn(R, 40, device=device).to(dtype)
    x = torch.randn(R, 24, device=device).to(dtype)
    splits, _ = lin.split_rows(R, 1, torch.device(device))
    assert splits == (1 if R == 300 else 3)
    dw, db = lin.linear_weight_grad(g, x, out_dtype=dtype)  # written in the weight's dtype: no cast follows
    assert dw.dtype == db.dtype == dtype
    assert_matches(dw, g.t() @ x, g.double().t() @ x.double(), dtype, "dW")
    assert_matches(db, g.sum(0), g.double().sum(0), dtype, "db")
    dw2, none = lin.linear_weight_grad(g, x, need_bias=False, out_dtype=dtype)
    assert none is None and torch.equal(dw2, dw)  # the same sums in the same order, with or without the bias
    # bias_rows: db is their column sums, whichever candidate (rows here twice g's partial sums, so that a db summed
    # from g instead would fail), and dW as without them
    rows = 2 * g.float().view(-1, 4, 40).sum(1)  # [R / 4, 40]: each row twice the sum of four of g's
    dw3, db3 = lin.linear_weight_grad(g, x, out_dtype=dtype, bias_rows=rows)
    assert torch.equal(dw3, dw)
    assert_matches(db3, 2 * g.sum(0), rows.double().sum(0), dtype, "db from the rows")


def test_weight_grad_launched_again_on_the_same_buffers(device, monkeypatch):
    # the splits' last program adds the partials when the arrival counter says it is last; it leaves the counter at
    # zero, so a second launch on the same buffers (the autotuner's) sums again instead of never
    twice = TwiceLaunched(lin._dw.kernel)
    monkeypatch.setattr(lin._dw, "kernel", twice)
    monkeypatch.setenv("FASTVIT_GEMM", "triton")
    g = torch.randn(2600, 40, device=device).to(torch.bfloat16)
    x = torch.randn(2600, 24, device=device).to(torch.bfloat16)
    dw, db = lin.linear_weight_grad(g, x, out_dtype=torch.float32)
    arrived = twice.args[lin._dw.kernel.arg_names.index("ARRIVED")]
    assert arrived is not None and not arrived.any()  # three splits: the counters were used, and are zero again
    assert_matches(dw, (g.t() @ x).float(), g.double().t() @ x.double(), torch.bfloat16, "dW")
    assert_matches(db, g.sum(0).float(), g.double().sum(0), torch.bfloat16, "db")


def test_bad_epilogue_and_dtype_mismatch_are_refused(device):
    a = torch.randn(4, 16, device=device)
    with pytest.raises(ValueError, match="unknown epilogue"):
        lin.linear(a, torch.randn(16, 8, device=device), epilogue="relu")
    with pytest.raises(TypeError, match="compute dtype"):
        lin.linear(a, torch.randn(16, 8, device=device, dtype=torch.bfloat16))


# N = 16 and 100: one chunk (the smallest tile, a masked one); 200: two; 384: CIFAR's three; 512: all four;
# 520: past the full-row tile, the residual GEMM and the row kernel
@pytest.mark.parametrize("N", [16, 100, 200, 384, 512, 520])
@pytest.mark.parametrize(
    "dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32), (torch.float16, torch.float16)], ids=str
)
def test_linear_residual_layernorm(N, dtypes, device, ln_backend):
    # the stream (X) keeps the residual's dtype; LayerNorm sees X as stored (rounded to a 16-bit stream, as eager)
    dtype, stream = dtypes
    M, K = 67, 48
    a = torch.randn(M, K, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) * K**-0.5).to(dtype)
    b = (0.1 * torch.randn(N, device=device)).to(dtype)
    res = torch.randn(M, N, device=device).to(stream)
    nw, nb = 1 + 0.2 * torch.randn(N, device=device), 0.2 * torch.randn(N, device=device)
    x, y, mean, rstd = lin.linear_residual_layernorm(a, w, b, res, nw, nb, 1e-6, dtype)
    assert (x.dtype, y.dtype) == (stream, dtype)
    wide = N > lin.MAX_LN_EPILOGUE_DIM  # past the full-row tile, our residual GEMM and the row kernel are "triton"
    assert lin.last_backend == ("triton" if wide and ln_backend == "triton+ln" else ln_backend)
    x_ref = res.double() + a.double() @ w.double().t() + b.double()
    x_low = (res + a @ w.t() + b).to(stream)
    assert_matches(x, x_low, x_ref, dtype, "X")
    # LayerNorm is checked from the X we stored, so that its own error is what is measured
    xd = x.double()
    y_ref = F.layer_norm(xd, (N,), nw.double(), nb.double(), 1e-6)
    y_low = F.layer_norm(x.float(), (N,), nw, nb, 1e-6).to(dtype)
    assert_matches(y, y_low, y_ref, dtype, "LayerNorm(X)")
    torch.testing.assert_close(mean.double(), xd.mean(1), rtol=0, atol=1e-5 * xd.abs().max().item())
    torch.testing.assert_close(rstd.double(), (xd.var(1, unbiased=False) + 1e-6).rsqrt(), rtol=1e-4, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autotuning runs on a GPU only")
def test_weight_grad_under_the_autotuner(monkeypatch):
    # The GPU tests run with FASTVIT_AUTOTUNE=0; here a key's first launch goes through Triton's autotuner, which
    # launches each config several times on the same buffers and then the best once more: the split partials' arrival
    # counters must count from zero each time. (Two configs to time: a few seconds of compiling.)
    monkeypatch.setenv("FASTVIT_AUTOTUNE", "1")
    monkeypatch.setenv("FASTVIT_GEMM", "triton")
    tuning.forget()
    R, K, N = 3000, 384, 1152  # several splits on any GPU's SM count
    a = torch.randn(R, K, device="cuda").to(torch.bfloat16)
    g = torch.randn(R, N, device="cuda").to(torch.bfloat16)
    for _ in range(2):  # the tuned first launch, then the direct one
        dw, db = lin.linear_weight_grad(g, a, out_dtype=torch.float32)
        assert_matches(dw, (g.t() @ a).float(), g.double().t() @ a.double(), torch.bfloat16, "dW")
        assert_matches(db, g.sum(0).float(), g.double().sum(0), torch.bfloat16, "db")
    assert lin._dw.best_config is not None


def test_an_expanded_input_is_read_through_pointers(device, backend):
    # one row repeated (stride 0 between rows, as an expand leaves it): every output row the same, no descriptor
    K, N = 48, 40
    row = torch.randn(1, 1, K, device=device).to(torch.bfloat16)
    a = row.expand(3, 5, K)
    w = (torch.randn(N, K, device=device) * K**-0.5).to(torch.bfloat16)
    assert not tma.operands_ok(a, 0, w)
    out = lin.linear(a, w)
    assert out.shape == (3, 5, N)
    assert_matches(out, F.linear(a, w), a.double() @ w.double().t(), torch.bfloat16)
