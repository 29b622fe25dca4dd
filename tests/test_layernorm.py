"""The LayerNorm row kernels (ops/layernorm.py) on their own, against float64: the forward's normalised rows in the
compute dtype with fp32 statistics, and the backward's input, weight and bias gradients with the residual gradient
added in the same pass."""

import pytest
import torch
from helpers import assert_matches, force_config

from fastvit_kernels import configs
from fastvit_kernels.ops import layernorm as ln_ops
from fastvit_kernels.ops.layernorm import add_layernorm_fwd, layernorm_bwd, layernorm_fwd

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

    # dx's column sums too (the bias gradient of the GEMM whose output gradient dx is), here from fp32 dx into bf16
    dx, dw, db, dx_sum = layernorm_bwd(dy, x, mean, rstd, w, dres=dres, dx_sum_dtype=torch.bfloat16)
    ref.backward(dy.double())
    lowp = [t.detach().requires_grad_() for t in (x, w, b)]
    F.layer_norm(*lowp[:1], (D,), lowp[1], lowp[2], 1e-6).backward(dy)
    assert_matches(dx, lowp[0].grad + dres, leaves[0].grad + dres.double(), torch.float32, "dx + residual grad")
    assert_matches(dw, lowp[1].grad, leaves[1].grad, torch.float32, "dweight")
    assert_matches(db, lowp[2].grad, leaves[2].grad, torch.float32, "dbias")
    exact = leaves[0].grad.sum(0) + dres.double().sum(0)
    assert dx_sum.dtype == torch.bfloat16
    assert_matches(dx_sum, (lowp[0].grad + dres).sum(0).bfloat16(), exact, torch.bfloat16, "dx's column sums")


def _bwd_id(i):
    c = configs.LAYERNORM_BWD_CONFIGS[i]
    cap = f"-r{c.maxnreg}" if c.maxnreg else ""
    return f"{c.kwargs['BLOCK_M']}rows-w{c.num_warps}-s{c.kwargs['LOAD_STAGES']}{cap}"


@pytest.mark.parametrize("D", [100, 384], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("cfg", range(len(configs.LAYERNORM_BWD_CONFIGS)), ids=_bwd_id)
def test_every_layernorm_bwd_config(cfg, D, device, monkeypatch):
    # each config the tuner may time, in the dtypes of a training step under bf16 autocast (dy in bf16 from the next
    # GEMM's input gradient, the fp32 stream and its gradient, and that gradient again in bf16); M = 400 rows: more than the interpreter's persistent
    # programs take in one step each, not a multiple of any row block; D = 100 masks part of a row, 384 is CIFAR-10's
    config = configs.LAYERNORM_BWD_CONFIGS[cfg]
    force_config(monkeypatch, ln_ops._bwd, config)
    M = 400
    x = torch.randn(M, D, device=device) * 3 + 1
    w = 1 + 0.1 * torch.randn(D, device=device)
    dy = torch.randn(M, D, device=device).to(torch.bfloat16)
    dres = torch.randn(M, D, device=device)
    _, mean, rstd = layernorm_fwd(x, w, torch.zeros_like(w), 1e-6, torch.bfloat16)
    dx_low = torch.full((M, D), float("nan"), device=device, dtype=torch.bfloat16)  # the next GEMMs' operand
    dx, dw, db, dx_sum = layernorm_bwd(dy, x, mean, rstd, w, dres=dres, dx_low=dx_low, dx_sum_dtype=torch.bfloat16)
    assert ln_ops._bwd.best_config is config
    assert torch.equal(dx_low, dx.to(torch.bfloat16))  # the bits a cast of dx gives (eager autocast's rounding)
    # the next GEMM's bias gradient: the sums of the rounded rows it reads, as a column sum of dx_low gives them
    sums = dx_low.float().sum(0)
    assert_matches(dx_sum, sums.bfloat16(), dx_low.double().sum(0), torch.bfloat16, "dx_low's column sums")
    leaves = [t.double().requires_grad_() for t in (x, w)]
    F.layer_norm(leaves[0], (D,), leaves[1], None, 1e-6).backward(dy.double())
    lowp = [t.detach().requires_grad_() for t in (x, w)]
    F.layer_norm(lowp[0], (D,), lowp[1], None, 1e-6).backward(dy.float())
    assert_matches(dx, lowp[0].grad + dres, leaves[0].grad + dres.double(), torch.float32, "dx + residual grad")
    assert_matches(dw, lowp[1].grad, leaves[1].grad, torch.float32, "dweight")
    assert_matches(db, dy.float().sum(0), dy.double().sum(0), torch.float32, "dbias")


def test_layernorm_bwd_gives_the_weight_grads_in_the_weights_dtype(device):
    # a LayerNorm in bf16 (a model cast to bf16): its weight and bias gradients come back in bf16, the fp32 sums
    # rounded once by the column sums, the bits a cast of the fp32 sums gives; no cast launch after them
    M, D = 45, 100
    x = (torch.randn(M, D, device=device) * 3 + 1).bfloat16()
    w = (1 + 0.1 * torch.randn(D, device=device)).bfloat16()
    dy = torch.randn(M, D, device=device).bfloat16()
    _, mean, rstd = layernorm_fwd(x, w, torch.zeros_like(w), 1e-6, torch.bfloat16)
    _, dw, db = layernorm_bwd(dy, x, mean, rstd, w)
    _, dw32, db32 = layernorm_bwd(dy, x, mean, rstd, w.float())  # the same partial sums: W is read as fp32
    assert dw.dtype == db.dtype == torch.bfloat16 and dw32.dtype == db32.dtype == torch.float32
    assert torch.equal(dw, dw32.bfloat16()) and torch.equal(db, db32.bfloat16())


def test_layernorm_bwd_configs_kept_per_width(monkeypatch):
    # 4 to 16 elements of a row tensor a thread: at CIFAR-10's 384 and ViT-B's 768 the tuner times several (pipelined
    # ones among them), at 8192 the one 16-warp row, at 16-64 the 32-row block; FASTVIT_ROW_PIPELINE=0 leaves the
    # pipelined ones out
    def kept(D):
        dy = torch.empty(0, dtype=torch.bfloat16)
        args = {"BLOCK_D": ln_ops.next_pow2(D), "DY": dy, "X": torch.empty(0), "DRES": torch.empty(0)}
        return [_bwd_id(configs.LAYERNORM_BWD_CONFIGS.index(c)) for c in configs.prune_layernorm_bwd(ALL, args)]

    ALL = configs.LAYERNORM_BWD_CONFIGS
    assert kept(384) == ["8rows-w8-s1", "4rows-w8-s1", "2rows-w2-s3", "2rows-w4-s3", "1rows-w2-s3-r80", "1rows-w4-s3"]
    assert kept(768) == ["4rows-w8-s1", "2rows-w4-s3", "1rows-w4-s3", "1rows-w8-s1"]  # 1,024 columns: past the cap
    assert kept(8192) == ["1rows-w16-s1"]
    assert kept(16) == kept(64) == ["32rows-w4-s1"]
    assert kept(8) == [_bwd_id(i) for i in range(len(ALL))]  # too narrow for 4 a thread: every one fits
    monkeypatch.setenv("FASTVIT_ROW_PIPELINE", "0")
    assert kept(384) == ["8rows-w8-s1", "4rows-w8-s1"]


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
    dx, _, _ = layernorm_bwd(dy, x, mean, rstd, w, dres=dres)
    ref.backward(dy.double())
    xl = x.detach().requires_grad_()
    F.layer_norm(xl, (D,), w, b, 1e-6).backward(dy)
    assert dx.shape == x.shape
    assert_matches(dx, xl.grad + dres, xd.grad + dres.double(), torch.float32, "dx + residual grad")


@pytest.mark.parametrize("D", [48, 100, 384, 2100], ids=lambda d: f"D{d}")
@pytest.mark.parametrize(
    "stream,branch",
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)],
    ids=["fp32+bf16", "bf16+bf16", "fp32+fp32"],
)
def test_add_layernorm_is_torchs_add_then_layernorm(D, stream, branch, device):
    # the residual GEMMs' cuBLAS candidate: the stream plus the GEMM's output in one pass, then LayerNorm of the sum as
    # torch rounds it (fp32 under autocast, bf16 for a bf16 model): the sum exactly torch's, the rows to the 2x rule
    M = 37
    residual = (torch.randn(M, D, device=device) * 3 + 1).to(stream)
    x = torch.randn(M, D, device=device).to(branch)
    w, b = 1 + 0.1 * torch.randn(D, device=device), 0.1 * torch.randn(D, device=device)
    s, y, mean, rstd = add_layernorm_fwd(x, residual, w, b, 1e-6, torch.bfloat16)
    expected = torch.add(residual, x)
    assert s.dtype == expected.dtype and torch.equal(s, expected), "the sum, as torch's add rounds it"
    ref = F.layer_norm(expected.double(), (D,), w.double(), b.double(), 1e-6)
    low = F.layer_norm(expected, (D,), w.to(expected.dtype), b.to(expected.dtype), 1e-6).to(torch.bfloat16)
    assert_matches(y, low, ref, torch.bfloat16, "normalised rows of the sum")
    torch.testing.assert_close(mean.double(), expected.double().mean(1), rtol=1e-5, atol=1e-5)
    var = expected.double().var(1, unbiased=False)
    torch.testing.assert_close(rstd.double(), 1 / torch.sqrt(var + 1e-6), rtol=1e-4, atol=0)


def test_add_layernorm_takes_rows_of_any_layout_and_refuses_unequal_shapes(device):
    B, T, D = 3, 5, 48
    base = torch.randn(B, T + 1, 2 * D, device=device)
    x, residual = base[:, 1:, :D], base[:, :T, ::2]  # sliced tokens; strided features (copied)
    w, b = torch.ones(D, device=device), torch.zeros(D, device=device)
    s, y, _, _ = add_layernorm_fwd(x, residual, w, b, 1e-6, torch.float32)
    assert s.shape == y.shape == (B, T, D) and s.is_contiguous()
    torch.testing.assert_close(s, residual + x, rtol=0, atol=0)
    assert_matches(
        y,
        F.layer_norm(residual + x, (D,), w, b, 1e-6),
        F.layer_norm((residual + x).double(), (D,)),
        torch.float32,
        "rows",
    )
    with pytest.raises(ValueError, match="differ"):
        add_layernorm_fwd(x, residual[:, :2], w, b, 1e-6, torch.float32)


def test_layernorm_bwd_refuses_a_dx_low_it_cannot_fill(device):
    x = torch.randn(6, 48, device=device)
    w, dy = torch.ones(48, device=device), torch.randn(6, 48, device=device)
    _, mean, rstd = layernorm_fwd(x, w, torch.zeros_like(w), 1e-6, torch.float32)
    bf16 = dict(device=device, dtype=torch.bfloat16)
    for bad in (torch.empty(6, 40, **bf16), torch.empty(48, 6, **bf16).t()):  # another shape; not contiguous
        with pytest.raises(ValueError, match="dx_low must be a contiguous"):
            layernorm_bwd(dy, x, mean, rstd, w, dx_low=bad)
