"""The GEMM tiles one by one (kernels/gemm.py, gemm_gelu_behind.py, gemm_layernorm.py): every configuration the
tuner may pick, forced, on each epilogue of the hot path; the tiles with the epilogue one tile behind; the column
sums' arrival counters; and which tiles the prune offers for which launch (configs/gemm.py), against float64."""

import pytest
import torch
from helpers import TwiceLaunched, assert_matches, force_config, gelu_grad_ref, linear_ref

from fastvit_kernels import configs
from fastvit_kernels.ops import gemm as lin
from fastvit_kernels.ops import tma

F = torch.nn.functional


def _two_sms(device):
    """ops/gemm.py's num_sms for these tests: the persistent tiles' grid is 2 x 2 programs, so that with ~10 tiles
    a program walks two or three of them (the behind tiles' epilogue follows a program from tile to tile), on a GPU
    as under the interpreter."""
    return 2


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
    # counter at zero, so a second launch on the same buffers (the autotuner's) sums again instead of never; M = 600
    # and N = 200: 5 row blocks of 128 (10 of 64), partial at the edges, 2-3 tiles a persistent program
    config = configs.LINEAR_FWD_CONFIGS[cfg]
    monkeypatch.setenv("FASTVIT_GEMM", "triton")
    force_config(monkeypatch, lin._fwd, config)
    monkeypatch.setattr(lin, "num_sms", _two_sms)  # 4 persistent programs, on a GPU too: each walks several tiles
    twice = TwiceLaunched(lin._fwd.kernel)
    monkeypatch.setattr(lin._fwd, "kernel", twice)
    M, K, N = 600, 64, 200
    a = torch.randn(M, K, device=device).to(torch.bfloat16)
    w = (torch.randn(K, N, device=device) * K**-0.5).to(torch.bfloat16).t()  # [N, K], N contiguous: W2.t()
    pre = torch.randn(M, N, device=device).to(torch.bfloat16)
    dpre, db = lin.linear_gelu_grad(a, w, pre, torch.bfloat16)
    assert lin._fwd.best_config is config
    arrived = twice.args[twice.arg_names.index("ARRIVED")]
    assert arrived is not None and arrived.numel() >= -(-N // config.kwargs["BLOCK_N"]) and not arrived.any()
    low = linear_ref(a, w, None, "gelu_grad", pre, None)
    ref = linear_ref(a.double(), w.double(), None, "gelu_grad", pre.double(), None)
    assert_matches(dpre, low, ref, torch.bfloat16, "d pre")
    assert_matches(db, low.sum(0, dtype=torch.float32).bfloat16(), ref.sum(0), torch.bfloat16, "bias gradient")


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
    # N = 304 leave partial tiles, and more tiles than the 4 persistent programs (_two_sms, on a GPU too), so that a
    # program walks several; on a GPU this is where a tile that fails shows first
    config = configs.LINEAR_FWD_CONFIGS[cfg]
    monkeypatch.setenv("FASTVIT_WARP_SPEC", "1")
    monkeypatch.setenv("FASTVIT_GEMM", "triton")
    force_config(monkeypatch, lin._fwd, config)
    monkeypatch.setattr(lin, "num_sms", _two_sms)  # 4 persistent programs, on a GPU too: each walks several tiles
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
    if not configs._behind_fits(config, epilogue):
        pytest.skip(f"not offered with {epilogue}: at the register file's limit")
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
        ref = linear_ref(a.double(), w.double(), None, "gelu_grad", pre.double(), None)
        low = linear_ref(a, w, None, "gelu_grad", pre, None)
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
    if mode.startswith("gelu_grad") and not configs._behind_fits(config, "gelu_grad"):
        pytest.skip("not offered with GELU': at the register file's limit")
    monkeypatch.setenv("FASTVIT_GEMM", "triton")
    force_config(monkeypatch, lin._fwd, config)
    monkeypatch.setattr(lin, "num_sms", _two_sms)  # 4 persistent programs, on a GPU too: each walks several tiles
    # 5 x 2 tiles for 4 programs (_two_sms), partial at the far edges
    M, N = 600, config.kwargs["BLOCK_N"] + 72
    a = torch.randn(M, K, device=device).to(torch.bfloat16)
    w = (torch.randn(N, K, device=device) * K**-0.5).to(torch.bfloat16)
    ref = a.double() @ w.double().t()
    if mode.startswith("gelu_grad"):
        epilogue, b = "gelu_grad", None
        w = w.t().contiguous().t()  # [N, K] with N contiguous, as W2.t() is
        pre = torch.randn(M, N, device=device).to(torch.bfloat16)
        low = F.linear(a, w)
        dpre = torch.ops.aten.gelu_backward(low, pre)  # eager's, of its rounded linear output
        if mode.endswith("sums"):
            out, db = lin.linear_gelu_grad(a, w, pre, torch.bfloat16)
            sums = dpre.sum(0, dtype=torch.float32).bfloat16()
            assert_matches(db, sums, (ref * gelu_grad_ref(pre.double())).sum(0), torch.bfloat16, "bias gradient")
        else:
            out = lin.linear(a, w, epilogue="gelu_grad", pre=pre)
        assert lin._fwd.best_config is config
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
    assert configs.prune_linear_fwd(behind, named) == [c for c in behind if configs._behind_fits(c, epilogue)]
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
