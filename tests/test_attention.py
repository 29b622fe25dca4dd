import pytest
import torch
from helpers import assert_matches, check_op, force_config

from fastvit_kernels.configs import (
    ATTENTION_BWD_DKDV_CONFIGS,
    ATTENTION_BWD_DQ_CONFIGS,
    ATTENTION_FWD_CONFIGS,
    prune_attention,
)
from fastvit_kernels.ops import _common, attention, attention_ref, fused_attention

# (B, N, H, d): odd lengths, the model's 65 and 197, head dims that are not powers of two, batch 1, one token
SHAPES = [(2, 65, 2, 64), (1, 17, 3, 80), (1, 1, 1, 16), (2, 33, 2, 96), (1, 197, 1, 32), (1, 5, 2, 128)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-N{}-H{}-d{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_attention_matches_reference(shape, dtype, device):
    if dtype != torch.float32 and shape[1] > 100 and device == "cpu":
        pytest.skip("long sequences run in fp32 only under the interpreter (time)")
    B, N, H, d = shape
    qkv = torch.randn(B, N, 3 * H * d, device=device, requires_grad=True)
    check_op(lambda t: attention(t, H), lambda t: attention_ref(t, H), [qkv], dtype)


def test_attention_non_contiguous_qkv(device):
    # qkv as a slice of a larger projection (row stride 400, batch stride 7 * 400): read through strides, no copy
    B, N, H, d = 2, 7, 2, 32
    big = torch.randn(B, N + 3, 400, device=device, requires_grad=True)

    def op(fn):
        return lambda t: fn(t[:, 2 : 2 + N, 10 : 10 + 3 * H * d], H)

    check_op(op(attention), op(attention_ref), [big], torch.float32)


def test_attention_custom_scale_and_sdpa_reference(device):
    qkv = torch.randn(2, 9, 3 * 2 * 16, device=device, requires_grad=True)
    check_op(
        lambda t: attention(t, 2, scale=0.3),
        lambda t: attention_ref(t, 2, scale=0.3, impl="sdpa"),
        [qkv],
        torch.float32,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_large_logits_are_stable(dtype, device):
    # logits in the thousands: a naive exp overflows; the online softmax must stay finite and right. Most rows are
    # saturated (one-hot); the few whose top two logits lie within a few units carry the error's norm, and there the
    # fp32 rounding of q.k (~1e-4 at 1,400) decides it, ours or eager's by the luck of the summation order. Sixteen
    # (batch, head) pairs, so that no one row decides: with four, one row put ours at 3.4x eager's error (fp32,
    # FASTVIT_TEST_SEED=1994066395; ours 0.03-0.6x eager's over 12 other seeds), with sixteen 0.08-0.55x over 16 seeds
    qkv = (torch.randn(8, 40, 3 * 2 * 64, device=device) * 30).requires_grad_()
    check_op(lambda t: attention(t, 2), lambda t: attention_ref(t, 2), [qkv], dtype)


@pytest.mark.parametrize("N", [40, 65])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_saturated_rows_have_zero_score_gradient(N, dtype, device):
    # k = q: each query's score with its own key is ~50,000 above the others, so every softmax row is one-hot in any
    # precision and the gradient of q and k is exactly zero (eager's is). The backward's dS = P (dP - delta) is
    # exactly zero only where P is exactly one-hot: the max's exponent exactly 0 and the row sum exactly 1
    q = torch.randn(2, N, 2 * 64, device=device) * 30
    qkv = torch.cat([q, q, torch.randn_like(q)], -1).to(dtype).requires_grad_()
    go = torch.randn(2, N, 2 * 64, device=device, dtype=dtype)
    for fn in (attention_ref, attention):
        (grad,) = torch.autograd.grad(fn(qkv, 2), qkv, go)
        dqk, dv = grad.split([4 * 64, 2 * 64], -1)
        assert torch.equal(dqk, torch.zeros_like(dqk)), f"{fn.__name__}: dq, dk up to {dqk.abs().max():.3e}"
        torch.testing.assert_close(dv, go)  # P^T dO with P the identity


def test_attention_under_autocast_matches_eager_autocast(device):
    qkv = torch.randn(2, 11, 3 * 2 * 32, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        ours = attention(qkv, 2)
        eager = attention_ref(qkv.to(torch.bfloat16), 2, impl="sdpa")
    assert ours.dtype == eager.dtype == torch.bfloat16
    ref = attention_ref(qkv.double(), 2)
    assert (ours.double() - ref).norm() <= 2 * (eager.double() - ref).norm() + 1e-3 * ref.norm()


def test_attention_rejects_bad_input(device, monkeypatch):
    with pytest.raises(ValueError, match="head dim 272"):
        attention(torch.randn(1, 4, 3 * 272, device=device), 1)
    with pytest.raises(ValueError, match="not 3 \\* num_heads"):
        attention(torch.randn(1, 4, 100, device=device), 3)
    with pytest.raises(ValueError, match="\\[B, N, 3\\*D\\]"):
        attention(torch.randn(4, 96, device=device), 1)
    with pytest.raises(TypeError, match="float64"):
        attention(torch.randn(1, 4, 96, device=device, dtype=torch.float64), 1)
    for bad in (0.0, -0.125, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="scale must be positive"):
            attention(torch.randn(1, 4, 96, device=device), 1, scale=bad)
    monkeypatch.setattr(_common, "interpreting", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        attention(torch.randn(1, 4, 96), 1)


@pytest.mark.parametrize("impl", ["math", "sdpa"])
def test_reference_dropout_drops_probabilities_as_the_eager_model_trains(impl):
    # the eager model's training path: dropout on the attention probabilities, seeded, and none at p = 0
    qkv = torch.randn(2, 9, 48)
    torch.manual_seed(0)
    a = attention_ref(qkv, 2, impl=impl, dropout_p=0.5)
    torch.manual_seed(0)
    b = attention_ref(qkv, 2, impl=impl, dropout_p=0.5)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, attention_ref(qkv, 2, impl=impl))
    torch.testing.assert_close(attention_ref(qkv, 2, impl=impl, dropout_p=0.0), attention_ref(qkv, 2, impl=impl))


@pytest.mark.parametrize("length", ["partial", "whole blocks"])
@pytest.mark.parametrize("cfg", range(len(ATTENTION_FWD_CONFIGS)))
def test_every_forward_config_matches_reference(cfg, length, device, monkeypatch):
    # each tile the tuner may pick, the whole-sequence (WHOLE) ones included, at a length it takes: 65 (64 + 1,
    # CIFAR-10's) for a whole-sequence tile with a 16-row tail, 60 for the 64-row one, else 70 (64 + 6: a 16-wide
    # last key block where the tile has one, a masked full-width one where not) and 128 (whole key blocks only: the
    # loop's unmasked steps and no last block)
    config = ATTENTION_FWD_CONFIGS[cfg]
    whole, tail = config.kwargs["WHOLE"], config.kwargs["TAIL"]
    if whole and length != "partial":
        pytest.skip("a whole-sequence tile has no key blocks")
    if config.kwargs.get("ROW_TAIL") and length != "partial":
        pytest.skip("a row tail takes a partial last block: test_row_tail_tiles_match_reference")
    force_config(monkeypatch, fused_attention._fwd, config)
    n = 65 if whole and tail else 60 if whole and config.kwargs["BLOCK_M"] == 64 else 70 if length == "partial" else 128
    qkv = torch.randn(3, n, 3 * 2 * 64, device=device)
    # in fp32 where it fits shared memory there, else in bf16 (a three-stage tile of 80 fp32 rows does not)
    dtype = next(
        dt
        for dt in (torch.float32, torch.bfloat16)
        if prune_attention([config], {"QKV": qkv.to(dt), "N": n, "BLOCK_D": 64}) == [config]
    )
    ours = attention(qkv.to(dtype), 2)
    assert_matches(ours, attention_ref(qkv.to(dtype), 2), attention_ref(qkv.to(dtype).double(), 2), dtype)
    # the softmax statistics the backward reads are the same function of the input whichever tile wrote them
    check_op(lambda t: attention(t, 2), lambda t: attention_ref(t, 2), [qkv.requires_grad_()], dtype)


@pytest.mark.parametrize("n", [65, 71, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_whole_tail_tiles_match_reference(n, dtype, device, monkeypatch):
    # every length a 64 + 16-row tile holds, with a head dim that is not a power of two (48: a masked 64-wide tile)
    config = next(c for c in ATTENTION_FWD_CONFIGS if c.kwargs["WHOLE"] and c.kwargs["TAIL"])
    force_config(monkeypatch, fused_attention._fwd, config)
    qkv = torch.randn(2, n, 3 * 2 * 48, device=device, requires_grad=True)
    assert prune_attention([config], {"QKV": qkv.to(dtype), "N": n, "BLOCK_D": 64}) == [config]
    check_op(lambda t: attention(t, 2), lambda t: attention_ref(t, 2), [qkv], dtype)


def test_whole_tail_tiles_take_only_the_lengths_they_hold():
    # 64 < N <= 80: below, a tail-less tile does the same work; above, the sequence does not fit
    config = next(c for c in ATTENTION_FWD_CONFIGS if c.kwargs["WHOLE"] and c.kwargs["TAIL"])
    qkv = torch.empty(1, 1, 3 * 64, dtype=torch.bfloat16)
    kept = [
        n
        for n in (1, 64, 65, 80, 81, 128)
        if prune_attention([config], {"QKV": qkv, "N": n, "BLOCK_D": 64}) == [config]
    ]
    assert kept == [65, 80]


@pytest.mark.parametrize("n,d", [(70, 64), (80, 48), (134, 64), (197, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_tail_tiles_match_reference(n, d, dtype, device, monkeypatch):
    # a pair's last rows (6, 16, 6 and 5 of them) taken by its last full block's program: after one block (70, 80),
    # two (134) and three (197, ViT-B/16's length), with head dims that are not the tile's (48, 32: masked)
    config = next(c for c in ATTENTION_FWD_CONFIGS if c.kwargs.get("ROW_TAIL"))
    force_config(monkeypatch, fused_attention._fwd, config)
    qkv = torch.randn(2, n, 3 * 2 * d, device=device, requires_grad=True)
    assert prune_attention([config], {"QKV": qkv.to(dtype), "N": n, "BLOCK_D": max(64, d)}) == [config]
    check_op(lambda t: attention(t, 2), lambda t: attention_ref(t, 2), [qkv], dtype)


def test_row_tail_tiles_take_only_the_lengths_they_hold():
    # a last partial block of 1 to 16 rows after at least one full block; else the tile without it does the same
    config = next(c for c in ATTENTION_FWD_CONFIGS if c.kwargs.get("ROW_TAIL"))
    qkv = torch.empty(1, 1, 3 * 64, dtype=torch.bfloat16)
    lengths = (1, 16, 64, 65, 80, 81, 128, 129, 144, 145, 197, 210)
    kept = [n for n in lengths if prune_attention([config], {"QKV": qkv, "N": n, "BLOCK_D": 64}) == [config]]
    assert kept == [65, 80, 129, 144, 197]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", range(len(ATTENTION_BWD_DKDV_CONFIGS)))
def test_every_backward_config_matches_reference(cfg, dtype, device, monkeypatch):
    # each tile the tuner may pick for dQ and for dK/dV, at CIFAR-10's 65 tokens (64 + 1: a 64-row tile leaves a
    # one-row second tile, which a tile with a tail sweeps 16 wide; the 128 x 128 one holds the whole sequence), in
    # fp32 and in bf16: on a GPU only bf16 runs the tensor-core (wgmma) code that the model's training runs
    dq, dkdv = ATTENTION_BWD_DQ_CONFIGS[cfg], ATTENTION_BWD_DKDV_CONFIGS[cfg]
    assert (dq.kwargs["BLOCK_M"], dq.kwargs["BLOCK_N"]) == (dkdv.kwargs["BLOCK_M"], dkdv.kwargs["BLOCK_N"])
    force_config(monkeypatch, fused_attention._bwd_dq, dq)
    force_config(monkeypatch, fused_attention._bwd_dkdv, dkdv)
    qkv = torch.randn(2, 65, 3 * 2 * 64, device=device, requires_grad=True)
    for config in (dq, dkdv):  # it runs, not the fallback
        assert prune_attention([config], {"QKV": qkv.to(dtype), "N": 65, "BLOCK_D": 64}) == [config]
    check_op(lambda t: attention(t, 2), lambda t: attention_ref(t, 2), [qkv], dtype)


@pytest.mark.parametrize("switch", ["FASTVIT_ATTN_WHOLE", "FASTVIT_ATTN_TAIL"])
def test_whole_sequence_and_tail_tiles_are_left_out_when_switched_off(switch, device, monkeypatch):
    # FASTVIT_ATTN_WHOLE=0 (the benchmarks' A/B switch), FASTVIT_ATTN_TAIL=0 (with it, the GPU check's fallback when
    # the attention tests fail there): the tiles without that feature only, forward and backward, same results
    flag = {"FASTVIT_ATTN_WHOLE": "WHOLE", "FASTVIT_ATTN_TAIL": "TAIL"}[switch]
    qkv = torch.randn(2, 65, 3 * 2 * 64, device=device, requires_grad=True)
    lists = (ATTENTION_FWD_CONFIGS, ATTENTION_BWD_DQ_CONFIGS, ATTENTION_BWD_DKDV_CONFIGS)
    args = {"QKV": qkv, "N": 65, "BLOCK_D": 64}
    assert any(c.kwargs.get(flag) for configs in lists for c in prune_attention(configs, args))
    monkeypatch.setenv(switch, "0")
    for configs in lists:
        kept = prune_attention(configs, args)
        assert kept and not any(c.kwargs.get(flag) for c in kept)
    check_op(lambda t: attention(t, 2), lambda t: attention_ref(t, 2), [qkv], torch.float32)


def test_a_switch_that_changes_the_candidates_is_timed_apart(device, monkeypatch):
    # On a GPU the first launch of a key times its candidates with Triton's autotuner, which keeps its choice per tuner
    # key for the process's life: the benchmarks' A/B row (FASTVIT_ATTN_WHOLE=0 after the default) must get a tuner
    # of its own, not the whole-sequence tile timed before. Triton's autotuner stood in for (it needs a GPU).
    from fastvit_kernels import tuning

    made = []

    class Tuner:  # times nothing: launches the first candidate, as the autotuner launches its best
        def __init__(self, kernel, configs):
            self.kernel, self.configs, self.best_config = kernel, configs, None
            made.append(self)

        def __getitem__(self, grid):
            def run(*args, **consts):
                self.best_config = self.configs[0]
                self.kernel[grid(self.best_config.kwargs)](*args, **consts, **self.best_config.kwargs)

            return run

    monkeypatch.setattr(tuning, "tuning_on", lambda: True)
    monkeypatch.setattr(tuning.triton, "autotune", lambda configs, key: lambda kernel: Tuner(kernel, configs))
    qkv = torch.randn(2, 65, 3 * 2 * 64, device=device)
    expected = attention_ref(qkv, 2)
    for whole in ("1", "0", "1"):
        monkeypatch.setenv("FASTVIT_ATTN_WHOLE", whole)
        tuning.forget()
        assert_matches(attention(qkv, 2), expected, attention_ref(qkv.double(), 2), torch.float32)
    assert len(made) == 2  # the third launch's candidates are the first's: its tuner, timed once
    assert made[0].configs[0].kwargs["WHOLE"] and not any(c.kwargs["WHOLE"] for c in made[1].configs)
    assert fused_attention._fwd.best_config is made[0].best_config


def test_the_tile_is_timed_per_batch_size_bucket(device, monkeypatch):
    # The grid's size decides which tile is fastest: a batch of 8 timed the N = 65 tiles for batch 512 when the
    # tuner's key held only the length and the head dim (H200, 2026-11-28). Each power-of-two bucket of (batch,
    # head) pairs gets its own timing, in the process (the launchers' keys) and on disk (Triton's key: BH).
    from fastvit_kernels import tuning

    timed = []  # (kernel, its tuner key's values) per timing

    class Tuner:  # times nothing: launches the first candidate, as the autotuner launches its best
        def __init__(self, kernel, configs, key):
            self.kernel, self.configs, self.key, self.best_config = kernel, configs, key, None

        def __getitem__(self, grid):
            def run(*args, **consts):
                values = {**dict(zip(self.kernel.arg_names, args)), **consts}
                timed.append((self.kernel.fn.__name__, tuple(values[k] for k in self.key)))
                self.best_config = self.configs[0]
                self.kernel[grid(self.best_config.kwargs)](*args, **consts, **self.best_config.kwargs)

            return run

    monkeypatch.setattr(tuning, "tuning_on", lambda: True)
    monkeypatch.setattr(tuning.triton, "autotune", lambda configs, key: lambda kernel: Tuner(kernel, configs, key))
    tuning.forget()
    H, N, d = 2, 9, 16
    for B in (2, 64, 60):  # 4, 128 and 120 pairs: 120 shares 128's bucket
        qkv = torch.randn(B, N, 3 * H * d, device=device, requires_grad=True)
        attention(qkv, H).sum().backward()
    kernels = ("attention_fwd_kernel", "attention_bwd_dq_kernel", "attention_bwd_dkdv_kernel")
    for name in kernels:
        assert [values for kernel, values in timed if kernel == name] == [(N, 4, d, "ieee"), (N, 128, d, "ieee")]
    tuning.forget()
