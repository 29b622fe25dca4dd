"""The GEMM engine (ops/gemm.py) on its own: every epilogue, through tensor descriptors (TMA) where the operands
allow them and through pointer loads where they do not, and through the cuBLAS candidate (torch's matmul and
epilogue), against float64."""

import pytest
import torch
from helpers import TwiceLaunched, assert_matches, force_config, force_gemm_candidate, gelu_grad_ref

from fastvit_kernels import configs, tuning
from fastvit_kernels.ops import gemm as lin
from fastvit_kernels.ops import tma

F = torch.nn.functional


def _reference(a, w, b, epilogue, pre, res):
    """The same function in any dtype; w is nn.Linear's [N, K]."""
    y = a @ w.t()
    if b is not None:
        y = y + b
    if epilogue == "gelu":
        return F.gelu(y)
    if epilogue == "gelu_grad":
        return y * gelu_grad_ref(pre)
    if epilogue == "residual":
        return res + y
    return y


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
    ref = _reference(args[0], args[1], args[2], epilogue, args[3], args[4])
    low = _reference(a, w, b, epilogue, pre, res)
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
    ref = _reference(a.double(), w.double(), None, "gelu_grad", pre.double(), None)
    low = _reference(a, w, None, "gelu_grad", pre, None)
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


def _first_config(pred):
    return next(i for i, c in enumerate(configs.LINEAR_FWD_CONFIGS) if pred(c.kwargs))


_SUMS_TILES = [  # a tile of each kind that sums fc1's bias gradient
    _first_config(lambda k: k["USE_TMA"] and not (k["GELU_BEHIND"] or k["EPI_TMA"] or k["WARP_SPEC"])),  # persistent
    _first_config(lambda k: not k["USE_TMA"]),  # pointer loads, a program a tile
    _first_config(lambda k: k["GELU_BEHIND"]),  # the epilogue one tile behind
]


@pytest.mark.parametrize("cfg", _SUMS_TILES, ids=lambda i: _tile_id(i))
def test_gelu_grad_sums_launched_again_on_the_same_buffers(cfg, device, monkeypatch):
    # each column block's last tile to arrive adds its partial rows up into the bias gradient and leaves the block's
    # counter at zero, so a second launch on the same buffers (the autotuner's) sums again instead of never; M = 1100
    # and N = 200: 9 row blocks, a partial column block, more tiles than the interpreter's persistent programs
    config = configs.LINEAR_FWD_CONFIGS[cfg]
    monkeypatch.setenv("FASTVIT_GEMM", "triton")
    force_config(monkeypatch, lin._fwd, config)
    twice = TwiceLaunched(lin._fwd.kernel)
    monkeypatch.setattr(lin._fwd, "kernel", twice)
    M, K, N = 1100, 64, 200
    a = torch.randn(M, K, device=device).to(torch.bfloat16)
    w = (torch.randn(K, N, device=device) * K**-0.5).to(torch.bfloat16).t()  # [N, K], N contiguous: W2.t()
    pre = torch.randn(M, N, device=device).to(torch.bfloat16)
    dpre, db = lin.linear_gelu_grad(a, w, pre, torch.bfloat16)
    assert lin._fwd.best_config is config
    arrived = twice.args[twice.arg_names.index("ARRIVED")]
    assert arrived is not None and arrived.numel() >= -(-N // config.kwargs["BLOCK_N"]) and not arrived.any()
    low = _reference(a, w, None, "gelu_grad", pre, None)
    ref = _reference(a.double(), w.double(), None, "gelu_grad", pre.double(), None)
    assert_matches(dpre, low, ref, torch.bfloat16, "d pre")
    assert_matches(db, low.sum(0, dtype=torch.float32).bfloat16(), ref.sum(0), torch.bfloat16, "bias gradient")


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


def _tile_id(i):
    """A config's test id: its tile, and `warpspec` for the warp-specialised ones (gpu_check.sh selects on it)."""
    c = configs.LINEAR_FWD_CONFIGS[i]
    k = c.kwargs
    flags = "".join(
        f"-{name}"
        for name, on in (("tma", "USE_TMA"), ("warpspec", "WARP_SPEC"), ("flat", "FLATTEN"), ("epitma", "EPI_TMA"))
        if k[on]
    )
    flags += f"-behind{k['GELU_BEHIND']}" if k["GELU_BEHIND"] else ""
    flags += f"-maxnreg{c.maxnreg}" if c.maxnreg else ""
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']}-w{c.num_warps}-s{c.num_stages}{flags}"


@pytest.mark.parametrize("epilogue", ["gelu", "residual", "gelu_grad"])
@pytest.mark.parametrize("cfg", range(len(configs.LINEAR_FWD_CONFIGS)), ids=_tile_id)
def test_every_linear_config(cfg, epilogue, device, monkeypatch):
    # each tile the tuner may pick for the GEMM with an epilogue, on the hot paths: fc1's (bias, GELU, the
    # pre-activation kept), proj's or fc2's (bias, fp32 residual, fp32 out, as under autocast) and fc2's dX in
    # training (GELU' of the pre-activation, W2 read untransposed: an N-major B, and the tiles' column sums, fc1's
    # bias gradient), the warp-specialised ones included
    # (FASTVIT_WARP_SPEC=1 offers them): K = 48 and N = 304 in bf16 keep rows 16-byte aligned (TMA); M = 520 and
    # N = 304 leave partial tiles, and more tiles than the interpreter's persistent programs (2 x 4 "SMs"), so that a
    # program walks several; on a GPU this is where a tile that fails shows first
    config = configs.LINEAR_FWD_CONFIGS[cfg]
    monkeypatch.setenv("FASTVIT_WARP_SPEC", "1")
    monkeypatch.setenv("FASTVIT_GEMM", "triton")
    force_config(monkeypatch, lin._fwd, config)
    M, K, N = 520, 48, 304
    a = torch.randn(M, K, device=device).to(torch.bfloat16)
    w = (torch.randn(N, K, device=device) * K**-0.5).to(torch.bfloat16)
    b = (0.1 * torch.randn(N, device=device)).to(torch.bfloat16)
    res = torch.randn(M, N, device=device) if epilogue == "residual" else None
    if configs._serialised(config, epilogue, res):
        pytest.skip("not offered with an fp32 residual: ptxas serialises its wgmma")
    if not configs._held_in_two_blocks(config, epilogue):
        pytest.skip(f"not offered with {epilogue}: one block an SM where others keep two")
    if config.kwargs["GELU_BEHIND"] and epilogue == "residual":
        pytest.skip("the epilogue one tile behind: not offered with the residual")
    if epilogue == "gelu_grad":
        w = w.t().contiguous().t()  # [N, K] with N contiguous, as W2.t() is
        pre = torch.randn(M, N, device=device).to(torch.bfloat16)
    else:  # the pre-activation the forward writes for the backward
        pre = torch.full((M, N), float("nan"), device=device, dtype=torch.bfloat16) if epilogue == "gelu" else None
    out_dtype = torch.float32 if epilogue == "residual" else torch.bfloat16
    tma_ok = tma.operands_ok(a, K, w)
    epi_ok = tma.epilogue_ok(tma_ok, N, out_dtype, res, pre)
    assert tma_ok and epi_ok
    c = torch.empty(M, N, device=device, dtype=out_dtype)
    named = dict(A=a, B=w, C=c, RES=res, PRE=pre, TMA_OK=tma_ok, EPI_TMA_OK=epi_ok, EPILOGUE=epilogue)
    assert configs.prune_linear_fwd([config], named) == [config]  # it runs, not a fallback tile
    ref = a.double() @ w.double().t() + b.double()
    if epilogue == "residual":
        out = lin.linear(a, w, b, epilogue="residual", residual=res, out_dtype=torch.float32)
        assert_matches(out, res + F.linear(a, w, b), res.double() + ref, torch.bfloat16)
    elif epilogue == "gelu_grad":
        ref = _reference(a.double(), w.double(), None, "gelu_grad", pre.double(), None)
        low = _reference(a, w, None, "gelu_grad", pre, None)
        # with the tiles' partial column sums (fc1's bias gradient) where the tile is offered with them
        if configs.prune_linear_fwd([config], {**named, "COLSUM": a.float()}) == [config]:
            out, db = lin.linear_gelu_grad(a, w, pre, torch.bfloat16)
            sums = low.sum(0, dtype=torch.float32).bfloat16()
            assert_matches(db, sums, ref.sum(0), torch.bfloat16, "bias gradient")
        else:
            out = lin.linear(a, w, epilogue="gelu_grad", pre=pre)
        assert_matches(out, low, ref, torch.bfloat16)
    else:
        out = lin.linear(a, w, b, epilogue="gelu", pre=pre)
        assert_matches(out, F.gelu(F.linear(a, w, b)), F.gelu(ref), torch.bfloat16)
        assert_matches(pre, F.linear(a, w, b), ref, torch.bfloat16, "pre-activation")
    assert lin._fwd.best_config is config


_BEHIND = [i for i, c in enumerate(configs.LINEAR_FWD_CONFIGS) if c.kwargs["GELU_BEHIND"]]


# 10 K steps, more than 8 chunks; 6 (CIFAR-10's fc1: 2 x 6 covers 8); 3, under half of them
@pytest.mark.parametrize("K", [640, 384, 192], ids=lambda k: f"K{k}")
@pytest.mark.parametrize("cfg", _BEHIND, ids=_tile_id)
@pytest.mark.parametrize("mode", ["inference", "training", "gelu_grad", "gelu_grad+sums"])
def test_epilogue_one_tile_behind(mode, cfg, K, device, monkeypatch):
    # the tiles that compute a tile's epilogue during its program's next tile: more K steps (10) than a tile has
    # chunks (8), fewer (6), and fewer than half as many (3: chunks left after the loop either way), partial tiles at
    # both edges, more tiles than programs (each program's epilogue follows it from tile to tile, the last after its
    # loop). GELU: in inference the pre-activation waits in C itself, in training in the buffer the backward reads;
    # GELU' (fc2's dX, W2 read untransposed) with and without the column sums (fc1's bias gradient). Of the product
    # rounded, as eager computes them
    if K != 384 and mode in ("inference", "gelu_grad"):  # the K loop's cases: with the stored pre-activation, the sums
        pytest.skip("the chunks' schedule by K is covered by the training and gelu_grad+sums cases")
    behind = [configs.LINEAR_FWD_CONFIGS[i] for i in _BEHIND]
    assert behind and all(c.kwargs["USE_TMA"] and not (c.kwargs["EPI_TMA"] or c.kwargs["FLATTEN"]) for c in behind)
    config = configs.LINEAR_FWD_CONFIGS[cfg]
    monkeypatch.setenv("FASTVIT_GEMM", "triton")
    force_config(monkeypatch, lin._fwd, config)
    M, N = 1100, 200  # 9 x 2 tiles for the interpreter's 8 programs
    a = torch.randn(M, K, device=device).to(torch.bfloat16)
    w = (torch.randn(N, K, device=device) * K**-0.5).to(torch.bfloat16)
    ref = a.double() @ w.double().t()
    if mode.startswith("gelu_grad"):
        epilogue, b = "gelu_grad", None
        w = w.t().contiguous().t()  # [N, K] with N contiguous, as W2.t() is
        pre = torch.randn(M, N, device=device).to(torch.bfloat16)
        low = F.linear(a, w)
        if mode.endswith("sums"):
            out, db = lin.linear_gelu_grad(a, w, pre, torch.bfloat16)
            sums = torch.ops.aten.gelu_backward(low, pre).sum(0, dtype=torch.float32).bfloat16()
            assert_matches(db, sums, (ref * gelu_grad_ref(pre.double())).sum(0), torch.bfloat16, "bias gradient")
        else:
            out = lin.linear(a, w, epilogue="gelu_grad", pre=pre)
        assert lin._fwd.best_config is config
        dpre = torch.ops.aten.gelu_backward(low, pre)
        assert_matches(out, dpre, ref * gelu_grad_ref(pre.double()), torch.bfloat16)
        # of the product as rounded: eager's gelu_backward of its linear output
        low_ref = low.double() * gelu_grad_ref(pre.double())
        assert_matches(out, dpre, low_ref, torch.bfloat16, "GELU' of the rounded product")
    else:
        epilogue = "gelu"
        b = (0.1 * torch.randn(N, device=device)).to(torch.bfloat16)
        ref = ref + b.double()
        pre = torch.full((M, N), float("nan"), device=device, dtype=torch.bfloat16) if mode == "training" else None
        out = lin.linear(a, w, b, epilogue="gelu", pre=pre)
        assert lin._fwd.best_config is config
        low = F.linear(a, w, b)
        assert_matches(out, F.gelu(low), F.gelu(ref), torch.bfloat16)
        if pre is not None:
            assert_matches(pre, low, ref, torch.bfloat16, "pre-activation")
            # GELU of the pre-activation as stored, rounded as eager's linear output is
            assert_matches(out, F.gelu(pre), F.gelu(pre.double()), torch.bfloat16, "GELU of the stored pre-activation")
    monkeypatch.setenv("FASTVIT_GELU_BEHIND", "0")  # the switch: the tile is not offered
    named = dict(A=a, B=w, C=out, PRE=pre, TMA_OK=True, EPI_TMA_OK=True, EPILOGUE=epilogue)
    assert not any(c.kwargs["GELU_BEHIND"] for c in configs.prune_linear_fwd(configs.LINEAR_FWD_CONFIGS, named))
    monkeypatch.delenv("FASTVIT_GELU_BEHIND")
    assert configs.prune_linear_fwd(behind, named) == behind
    assert all(configs.prune_linear_fwd(behind, dict(named, EPILOGUE=other)) == [] for other in ("none", "residual"))


def test_warp_specialised_tiles_are_offered_only_when_asked(monkeypatch):
    ws = [c for c in configs.LINEAR_FWD_CONFIGS if c.kwargs["WARP_SPEC"]]
    assert ws and all(c.num_warps == 4 and c.kwargs["USE_TMA"] for c in ws)  # Triton ignores it at 8 warps
    named = {"A": torch.empty(8, 48, dtype=torch.bfloat16), "B": torch.empty(8, 48, dtype=torch.bfloat16)}
    named.update(TMA_OK=True, EPILOGUE="gelu", RES=None)
    monkeypatch.delenv("FASTVIT_WARP_SPEC", raising=False)
    assert not any(c.kwargs["WARP_SPEC"] for c in configs.prune_linear_fwd(configs.LINEAR_FWD_CONFIGS, named))
    monkeypatch.setenv("FASTVIT_WARP_SPEC", "1")
    assert ws == [c for c in configs.prune_linear_fwd(configs.LINEAR_FWD_CONFIGS, named) if c.kwargs["WARP_SPEC"]]


def test_descriptor_epilogues_are_offered_beside_a_second_tile_only():
    # EPI_TMA tiles where the epilogue loads or stores a tile beside C (the residual, the pre-activation) and every
    # one of them allows a descriptor (16-byte aligned rows); elsewhere the tuner is not offered them
    epi = [c for c in configs.LINEAR_FWD_CONFIGS if c.kwargs["EPI_TMA"]]
    assert epi and all(c.kwargs["USE_TMA"] and not c.kwargs["WARP_SPEC"] for c in epi)
    a, w = torch.empty(8, 48, dtype=torch.bfloat16), torch.empty(304, 48, dtype=torch.bfloat16)
    res, pre = torch.empty(8, 304), torch.empty(8, 304, dtype=torch.bfloat16)
    misaligned = torch.empty(8, 306)[:, 1:305]  # rows 1,224 B apart: not a multiple of 16
    assert tma.epilogue_ok(True, 304, torch.float32, res, None)
    assert not tma.epilogue_ok(True, 304, torch.float32, misaligned, None)
    assert not tma.epilogue_ok(True, 300, torch.bfloat16, None, None)  # C's rows: 600 B
    assert not tma.epilogue_ok(False, 304, torch.bfloat16, None, pre)  # the operands' descriptors come first

    def offered(epilogue, **named):
        named = dict(dict(A=a, B=w, C=torch.empty(8, 304), TMA_OK=True, EPI_TMA_OK=True, EPILOGUE=epilogue), **named)
        return [c for c in configs.prune_linear_fwd(configs.LINEAR_FWD_CONFIGS, named) if c.kwargs["EPI_TMA"]]

    assert offered("residual", RES=res) == epi
    assert offered("gelu", PRE=pre) == epi and offered("gelu_grad", PRE=pre) == epi
    assert offered("gelu") == [] and offered("none") == []  # C alone: about as fast through pointers
    assert offered("residual", RES=res, EPI_TMA_OK=False) == []


def test_flattened_128_tile_is_offered_where_it_keeps_two_blocks_an_sm():
    # with C alone or GELU's pre-activation beside it; not with the residual or GELU' (one block an SM there)
    flat = [c for c in configs.LINEAR_FWD_CONFIGS if c.kwargs["FLATTEN"] and c.kwargs["BLOCK_N"] == 128]
    assert flat and all(c.kwargs["BLOCK_M"] == 128 for c in flat)
    a, w = torch.empty(8, 48, dtype=torch.bfloat16), torch.empty(304, 48, dtype=torch.bfloat16)
    res, pre = torch.empty(8, 304), torch.empty(8, 304, dtype=torch.bfloat16)

    def offered(epilogue, **named):
        named = dict(dict(A=a, B=w, C=torch.empty(8, 304), TMA_OK=True, EPI_TMA_OK=True, EPILOGUE=epilogue), **named)
        return [c for c in configs.prune_linear_fwd(configs.LINEAR_FWD_CONFIGS, named) if c in flat]

    assert offered("none") == flat and offered("gelu") == flat and offered("gelu", PRE=pre) == flat
    assert offered("residual", RES=res) == [] and offered("gelu_grad", PRE=pre) == []


@pytest.mark.parametrize("cfg", range(len(configs.LINEAR_LN_CONFIGS)))
def test_every_full_row_layernorm_config(cfg, device, monkeypatch):
    # each tile the tuner may pick for the LayerNorm-epilogue GEMM, the tensor-descriptor (TMA) ones included:
    # K = 48 in bf16 keeps rows 16-byte aligned; N = 200 is two chunks, the second masked (and zero-filled by TMA)
    config = configs.LINEAR_LN_CONFIGS[cfg]
    force_config(monkeypatch, lin._fwd_ln, config)
    monkeypatch.setenv("FASTVIT_GEMM", "triton")
    M, K, N = 70, 48, 200
    a = torch.randn(M, K, device=device).to(torch.bfloat16)
    w = (torch.randn(N, K, device=device) * K**-0.5).to(torch.bfloat16)
    res = torch.randn(M, N, device=device)
    nw, nb = 1 + 0.2 * torch.randn(N, device=device), 0.2 * torch.randn(N, device=device)
    assert tma.operands_ok(a, K, w)
    # the pruning keeps it at this shape (so it runs, not a fallback tile)
    assert configs.prune_linear_ln([config], {"A": a, "N_CHUNKS": 2, "BLOCK_N": 128, "TMA_OK": True}) == [config]
    x, y, _, _ = lin.linear_residual_layernorm(a, w, None, res, nw, nb, 1e-6, torch.bfloat16)
    x_ref = res.double() + a.double() @ w.double().t()
    assert_matches(x, res + (a @ w.t()).float(), x_ref, torch.bfloat16, "X")
    y_ref = F.layer_norm(x.double(), (N,), nw.double(), nb.double(), 1e-6)
    assert_matches(y, F.layer_norm(x, (N,), nw, nb, 1e-6).to(torch.bfloat16), y_ref, torch.bfloat16, "LayerNorm(X)")


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
