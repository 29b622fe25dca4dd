"""The column sums (ops/reduce.py): the bias gradient beside cuBLAS's weight gradient, the LayerNorm backward's
gradients from its partial rows, and GELU's backward with fc1's bias gradient in one pass, against float64."""

import pytest
import torch
from helpers import TwiceLaunched, assert_matches, force_config, gelu_grad_ref

from fastvit_kernels import configs
from fastvit_kernels.ops import reduce as red


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N", [100, 384])
@pytest.mark.parametrize("cfg", range(len(configs.COLUMN_SUM_CONFIGS)))
def test_every_column_sum_config(cfg, N, out_dtype, device, monkeypatch):
    # the bias gradient beside cuBLAS's weight gradient (bf16 rows, bf16 sums) and the LayerNorm backward's gradients
    # (fp32 partial rows: its weight's and bias's sums in fp32, then the next GEMM's bias gradient in bf16, three
    # tensors, here where column strips straddle the parts' edges): each config forced, on rows with a padded stride
    # (the leading dims read in place) and a row count no row block divides; N = 100 leaves a partial column strip.
    # The kernel launched twice on the same buffers, as the autotuner launches it: each strip's last program adds the
    # partial rows up, rounds them to each part's dtype, and leaves its arrival counter at zero for the next launch
    force_config(monkeypatch, red._colsum, configs.COLUMN_SUM_CONFIGS[cfg])
    twice = TwiceLaunched(red._colsum.kernel)
    monkeypatch.setattr(red._colsum, "kernel", twice)
    g = torch.randn(3, 177, N + 8, device=device).to(out_dtype)[..., :N]  # [3, 177, N], rows N + 8 apart
    if out_dtype == torch.float32:
        parts = [(N // 3 + 1, torch.float32), (N // 3 + 2, torch.float32), (N - 2 * (N // 3) - 3, torch.bfloat16)]
    else:
        parts = [(N, out_dtype)]
    outs = red.column_sums(g, parts)
    assert red._colsum.best_config is configs.COLUMN_SUM_CONFIGS[cfg]
    partials, arrived = (twice.args[twice.arg_names.index(name)] for name in ("PART", "ARRIVED"))
    assert partials.shape[0] > 1 and arrived.numel() == -(-N // configs.COLUMN_SUM_BLOCK_N) and not arrived.any()
    rows = g.reshape(-1, N)
    ref, exact = rows.sum(0, dtype=torch.float32), rows.double().sum(0)
    assert len({out.untyped_storage().data_ptr() for out in outs}) == len(parts)  # tensors of their own
    start = 0
    for out, (width, dtype) in zip(outs, parts):
        assert out.shape == (width,) and out.dtype == dtype
        cols = slice(start, start + width)
        assert_matches(out, ref[cols].to(dtype), exact[cols], dtype, f"column sums {start}..{start + width}")
        start += width


@pytest.mark.parametrize("N", [100, 384])
@pytest.mark.parametrize("cfg", range(len(configs.COLUMN_SUM_CONFIGS)))
def test_every_gelu_grad_column_sum_config(cfg, N, device, monkeypatch):
    # fc1's bias gradient on cuBLAS's path: GELU's backward in the column sums' pass, d pre written (rounded to bf16,
    # as torch's gelu_backward rounds it) and its rounded rows summed; each config forced, G's rows padded, twice on
    # the same buffers (the autotuner's launches)
    force_config(monkeypatch, red._colsum, configs.COLUMN_SUM_CONFIGS[cfg])
    twice = TwiceLaunched(red._colsum.kernel)
    monkeypatch.setattr(red._colsum, "kernel", twice)
    g = torch.randn(3, 177, N + 8, device=device).to(torch.bfloat16)[..., :N]  # [3, 177, N], rows N + 8 apart
    pre = (2 * torch.randn(3, 177, N, device=device)).to(torch.bfloat16)
    dg, db = red.gelu_grad_column_sum(g, pre, torch.bfloat16)
    assert red._colsum.best_config is configs.COLUMN_SUM_CONFIGS[cfg] and dg.shape == g.shape and dg.is_contiguous()
    low = torch.ops.aten.gelu_backward(g, pre)
    exact = g.double() * gelu_grad_ref(pre.double())
    assert_matches(dg, low, exact, torch.bfloat16, "d pre")
    rows = dg.reshape(-1, N)  # its sums are of the rounded rows, as a column sum of d pre would add them
    ref = rows.sum(0, dtype=torch.float32).bfloat16()
    assert_matches(db, ref, rows.double().sum(0), torch.bfloat16, "bias gradient")


def test_column_sums_switched_off_are_torchs(device, monkeypatch):
    # FASTVIT_COLUMN_SUM=0 (the GPU check's way out if the kernel fails there): torch's sum and casts, bit for bit,
    # and no launch of ours
    monkeypatch.setenv("FASTVIT_COLUMN_SUM", "0")
    monkeypatch.setattr(red._colsum, "launch", lambda *a, **k: pytest.fail("the column-sum kernel launched"))
    g = torch.randn(5, 33, 100, device=device).to(torch.bfloat16)
    ref = g.view(-1, 100).sum(0, dtype=torch.float32)
    assert torch.equal(red.column_sum(g, torch.bfloat16), ref.bfloat16())
    first, rest = red.column_sums(g, [(40, torch.float32), (60, torch.bfloat16)])
    assert torch.equal(first, ref[:40]) and torch.equal(rest, ref[40:].bfloat16())
    assert first._base is None is rest._base
    pre = torch.randn(5, 33, 100, device=device).to(torch.bfloat16)
    dg, db = red.gelu_grad_column_sum(g, pre, torch.bfloat16)
    torch_dg = torch.ops.aten.gelu_backward(g, pre)
    assert torch.equal(dg, torch_dg) and torch.equal(db, torch_dg.view(-1, 100).sum(0, dtype=torch.float32).bfloat16())


@pytest.mark.parametrize("widths", [[], [50, 51], [0, 100], [10, 20, 30, 40]], ids=str)
def test_column_sums_parts_must_split_the_row(widths):
    with pytest.raises(ValueError, match="do not split 100 columns"):
        red.column_sums(torch.ones(4, 100), [(w, torch.float32) for w in widths])
