"""The step plans' batched casts (ops/cast.py): the same bits as torch's casts, CAST_PAIRS pairs a launch."""

import pytest
import torch

from fastvit_kernels.kernels.cast import CAST_PAIRS
from fastvit_kernels.ops import cast

# lengths around the kernel's block (4,096) and the chunking, one empty: more pairs than one launch takes
SIZES = (1, 17, 4095, 4096, 4097, 0, 9000, 384, 3, 12289, 2, 65)


def _special_fp32(device):
    """fp32 values whose rounding to 16 bits is easy to get wrong: exact ties (to even, up and down), one past and
    one short of a tie, subnormals, the largest finite values (some round to inf), infinities, NaNs whose payload
    would carry into the exponent, signed zeros."""
    upper = torch.randint(0, 1 << 16, (4096,), dtype=torch.int64)
    low = torch.tensor([0x8000, 0x7FFF, 0x8001, 0x0000, 0xFFFF], dtype=torch.int64)
    bits = (upper[:, None] << 16 | low[None, :]).flatten()
    fixed = [0x7F7F8000, 0x7F7FFFFF, 0x7F7F7FFF, 0x00000001, 0x00400000, 0x80008000, 0x7F800000, 0xFF800000]
    fixed += [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x7F800001, 0x00000000, 0x80000000, 0x477FF000, 0x477FE000]
    bits = torch.cat([bits, torch.tensor(fixed, dtype=torch.int64)])
    return bits.to(torch.int32).view(torch.float32).to(device)  # int64 -> int32 wraps: the same 32 bits


def _assert_same_bits(ours, torch_cast):
    nan = torch_cast.isnan()
    assert torch.equal(ours.isnan(), nan)
    int_view = {2: torch.int16, 4: torch.int32}[ours.element_size()]
    assert torch.equal(ours[~nan].view(int_view), torch_cast[~nan].view(int_view))  # -0.0 and 0.0 told apart


@pytest.mark.parametrize(
    "src_dtype,dst_dtype",
    [
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
    ],
)
def test_copy_cast_gives_torchs_bits_for_every_pair(device, src_dtype, dst_dtype):
    srcs = [(torch.randn(n, device=device) * 100).to(src_dtype) for n in SIZES]
    srcs[1] = torch.randn(4, 3, 5, device=device).to(src_dtype)  # any shape, contiguous
    if src_dtype == torch.float32:
        srcs[6] = _special_fp32(device)
    dsts = [torch.full_like(s, float("nan"), dtype=dst_dtype) for s in srcs]
    cast.copy_cast(dsts, srcs)
    for d, s in zip(dsts, srcs):
        _assert_same_bits(d, s.to(dst_dtype))


def test_every_special_value_rounds_as_torch_rounds_it(device):
    special = _special_fp32(device)
    for dst_dtype in (torch.bfloat16, torch.float16):
        out = torch.empty_like(special, dtype=dst_dtype)
        cast.copy_cast([out], [special])
        _assert_same_bits(out, special.to(dst_dtype))


def test_copy_cast_launches_once_per_cast_pairs_pairs(device, monkeypatch):
    launches = []
    real = cast.launch_kernel
    monkeypatch.setattr(
        cast, "launch_kernel", lambda k, grid, args, consts: launches.append(grid) or real(k, grid, args, consts)
    )
    srcs = [torch.randn(n, device=device) for n in SIZES]
    dsts = [torch.empty_like(s, dtype=torch.bfloat16) for s in srcs]
    cast.copy_cast(dsts, srcs)
    nonempty = sum(n > 0 for n in SIZES)
    assert len(launches) == -(-nonempty // CAST_PAIRS)
    assert [g[1] for g in launches] == [CAST_PAIRS, nonempty - CAST_PAIRS]  # pairs a launch: the grid's second axis


@pytest.mark.parametrize("why", ["a CPU without the interpreter", "FASTVIT_CAST_KERNEL=0"])
def test_copy_cast_without_our_kernel_is_torchs_foreach_copy(device, monkeypatch, why):
    if why == "FASTVIT_CAST_KERNEL=0":
        monkeypatch.setenv("FASTVIT_CAST_KERNEL", "0")
    else:
        monkeypatch.setattr(cast._common, "interpreting", lambda: False)
        device = "cpu"
    monkeypatch.setattr(cast, "launch_kernel", lambda *a: pytest.fail(f"launched our kernel with {why}"))
    srcs = [torch.randn(n, device=device) for n in (5, 300)]
    dsts = [torch.empty(n, device=device, dtype=torch.bfloat16) for n in (5, 300)]
    cast.copy_cast(dsts, srcs)
    for d, s in zip(dsts, srcs):
        assert torch.equal(d, s.bfloat16())


def test_copy_cast_refuses_what_a_batch_of_casts_never_is(device):
    a, b = torch.randn(8, device=device), torch.randn(8, device=device)
    out = [torch.empty(8, device=device, dtype=torch.bfloat16) for _ in range(2)]
    with pytest.raises(ValueError, match="2 destinations but 1 sources"):
        cast.copy_cast(out, [a])
    with pytest.raises(ValueError, match="pair 1 has"):
        cast.copy_cast(out, [a, torch.randn(9, device=device)])
    with pytest.raises(TypeError, match="pair 1 casts torch.float16"):
        cast.copy_cast(out, [a, b.half()])
    with pytest.raises(ValueError, match="pair 0 is not contiguous"):
        cast.copy_cast([torch.empty(4, 2, device=device, dtype=torch.bfloat16)], [torch.randn(2, 4, device=device).t()])


def test_a_cast_batch_casts_into_each_calls_outputs_and_keeps_none_of_them(device, monkeypatch):
    """CastBatch makes its launches once while the same sources come: each call's outputs get the casts (the
    sources' values at that call), the next call's too, and none stays referenced by the batch after its call."""
    launches = []
    real = cast.launch_kernel
    monkeypatch.setattr(
        cast, "launch_kernel", lambda k, grid, args, consts: launches.append(grid) or real(k, grid, args, consts)
    )
    srcs = [torch.randn(n, device=device, dtype=torch.bfloat16) for n in SIZES]
    batch = cast.CastBatch()
    for _ in range(3):
        dsts = [torch.full(s.shape, float("nan"), device=device) for s in srcs]
        batch(tuple(dsts), tuple(srcs))
        for d, s in zip(dsts, srcs):
            _assert_same_bits(d, s.float())
        assert not any(a is d for _, args, _ in batch.launches for a in args for d in dsts)
        for s in srcs:
            s.normal_()  # new values in the same sources: the next call casts them
    assert len(launches) == 3 * -(-sum(n > 0 for n in SIZES) // CAST_PAIRS)
    other = [s.clone() for s in srcs]  # other source objects: their launches are made anew
    dsts = [torch.empty(s.shape, device=device) for s in other]
    batch(tuple(dsts), tuple(other))
    assert all(torch.equal(d, s.float()) for d, s in zip(dsts, other))
