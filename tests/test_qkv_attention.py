"""qkv_attention: the qkv projection and the attention as one op, its backward taking qkv's bias gradient from the
partial rows the attention's dK/dV kernel leaves, whichever weight-gradient candidate runs."""

import math

import pytest
import torch
from helpers import check_op, force_config, force_gemm_candidate

from fastvit_kernels import tuning
from fastvit_kernels.configs import (
    ATTENTION_BWD_DKDV_CONFIGS,
    ATTENTION_BWD_MIN_BLOCK,
    ATTENTION_FALLBACK_CONFIG,
    prune_attention,
)
from fastvit_kernels.configs.attention import DKDV_WHOLE_PAIR
from fastvit_kernels.ops import fused_attention, qkv_attention, qkv_attention_ref


@pytest.fixture(params=tuning.GEMM_BACKENDS)
def backend(request, monkeypatch):
    """Each GEMM family in turn (both take the bias gradient from the attention backward's rows)."""
    force_gemm_candidate(monkeypatch, request.param)
    return request.param


def _inputs(B, N, dim, H, d, bias, device):
    h = torch.randn(B, N, dim, device=device, requires_grad=True)
    w = (torch.randn(3 * H * d, dim, device=device) * dim**-0.5).requires_grad_()
    b = (0.5 * torch.randn(3 * H * d, device=device)).requires_grad_() if bias else None
    return [h, w, b]


# (B, N, dim, H, d): CIFAR-10's 65 tokens (64 + 1), a length under one block, one token, a head dim of 80 (not a power
# of two), and dim = 40 (rows that are not 16-byte aligned in 16-bit dtypes: pointer loads, no TMA)
SHAPES = [(2, 65, 48, 2, 16), (3, 17, 32, 1, 80), (2, 1, 48, 3, 16), (1, 33, 40, 2, 32)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-dim{}-H{}-d{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_qkv_attention_matches_reference(shape, dtype, device, backend):
    B, N, dim, H, d = shape
    check_op(lambda *t: qkv_attention(*t, H), lambda *t: qkv_attention_ref(*t, H), _inputs(*shape, True, device), dtype)


def test_qkv_attention_without_bias(device, backend):
    check_op(
        lambda *t: qkv_attention(*t, 2, 0.3),
        lambda *t: qkv_attention_ref(*t, 2, 0.3),
        _inputs(2, 65, 48, 2, 16, False, device),
        torch.bfloat16,
    )


def test_qkv_attention_under_autocast_matches_eager_autocast(device):
    # fp32 parameters and input, bf16 GEMMs and attention: the eager model's sequence under autocast
    h, w, b = _inputs(2, 20, 32, 2, 16, True, device)
    ref64 = qkv_attention_ref(*(t.detach().bfloat16().double() for t in (h, w, b)), 2)
    with torch.autocast(device, dtype=torch.bfloat16):
        ours, eager = qkv_attention(h, w, b, 2), qkv_attention_ref(h, w, b, 2)
    assert ours.dtype == eager.dtype == torch.bfloat16
    g = torch.randn_like(ours)
    grads = [torch.autograd.grad(out, (h, w, b), g) for out in (ours, eager)]
    for ours_g, eager_g in zip(*grads):
        assert ours_g.dtype == eager_g.dtype == torch.float32
        assert torch.isfinite(ours_g).all()
        # both round the same bf16 products: ours within twice eager's distance of the other
        assert (ours_g - eager_g).norm() <= 0.05 * eager_g.norm()
    assert (ours.double() - ref64).norm() <= 2 * (eager.double() - ref64).norm() + 4e-3 * ref64.norm()


def _poisoned_empty(monkeypatch):
    """torch.empty filled with NaN while the test runs: a partial row the kernels leave unwritten reads as NaN."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.mark.parametrize("N", [65, 17])
@pytest.mark.parametrize("cfg", range(len(ATTENTION_BWD_DKDV_CONFIGS)))
def test_every_backward_config_leaves_the_column_sums_of_dqkv(cfg, N, device, monkeypatch):
    # each dK/dV tile the tuner may pick: the rows' column sums are dqkv's, as exact as the column sums of the bf16
    # dqkv (what the bias gradient was before: eager autocast's too) against fp64, per batch element; the rows past
    # the kernel's key blocks are zeroed, not left as they were
    dkdv = ATTENTION_BWD_DKDV_CONFIGS[cfg]
    force_config(monkeypatch, fused_attention._bwd_dkdv, dkdv)
    B, H, d = 3, 2, 64
    qkv = torch.randn(B, N, 3 * H * d, device=device).bfloat16()
    # it runs, not the fallback (but for the whole-pair tile, not offered with the rows)
    args = {"QKV": qkv, "N": N, "BLOCK_D": 64, "COLSUM": qkv.float()}
    expected = ATTENTION_FALLBACK_CONFIG if dkdv is DKDV_WHOLE_PAIR else dkdv
    assert prune_attention([dkdv], args) == [expected]
    do = torch.randn(B, N, H * d, device=device).bfloat16()
    _, lse, _ = fused_attention.attention_fwd(qkv, H, d**-0.5)
    with monkeypatch.context() as m:
        _poisoned_empty(m)
        dqkv, rows = fused_attention.attention_bwd(do, qkv, lse, H, d**-0.5, bias_rows=True)
    assert rows.shape == (B * math.ceil(N / ATTENTION_BWD_MIN_BLOCK), 3 * H * d)
    assert torch.isfinite(dqkv).all() and torch.isfinite(rows).all()
    qkv64 = qkv.double().requires_grad_()
    fused_attention.attention_ref(qkv64, H, d**-0.5).backward(do.double())
    exact = qkv64.grad.sum(1)  # [B, 3D]: each batch element's sums
    ours = rows.view(B, -1, 3 * H * d).double().sum(1)
    stored = dqkv.double().sum(1)
    for part in range(3):  # q, k, v: dq's sums come from dS and K, not from dq's rows
        cols = slice(part * H * d, (part + 1) * H * d)
        err, base = (ours - exact)[:, cols].norm(), (stored - exact)[:, cols].norm()
        assert err <= 2 * base + 1e-5 * exact[:, cols].norm(), (part, err.item(), base.item())


def test_bias_rows_are_only_made_when_asked(device):
    qkv = torch.randn(2, 9, 96, device=device)
    _, lse, _ = fused_attention.attention_fwd(qkv, 2, 0.25)
    dqkv, rows = fused_attention.attention_bwd(torch.randn(2, 9, 32, device=device), qkv, lse, 2, 0.25)
    assert rows is None and dqkv.shape == qkv.shape


def test_qkv_attention_rejects_bad_input(device):
    h, w, b = _inputs(2, 5, 16, 2, 8, True, device)
    with pytest.raises(ValueError, match=r"h must be \[B, N, dim\]"):
        qkv_attention(h[0], w, b, 2)
    with pytest.raises(ValueError, match="not 3 \\* num_heads"):
        qkv_attention(h, w, b, 5)
    with pytest.raises(ValueError, match="qkv weight has shape"):
        qkv_attention(h, w[:, :8], b, 2)
    with pytest.raises(ValueError, match="scale must be positive"):
        qkv_attention(h, w, b, 2, scale=0.0)
    with pytest.raises(TypeError, match="float16"):
        qkv_attention(h.half(), w, b, 2)
