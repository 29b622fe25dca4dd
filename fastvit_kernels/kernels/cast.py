"""Dtype casts of several tensors in one launch: the batches of autocast's casts that a step plan replays (the weights
to the compute dtype in the forward, their gradients back in the backward). torch._foreach_copy_ runs a kernel per
tensor when the dtypes differ (torch 2.11): ~100 launches a batch in a ViT-S step.

A launch takes up to CAST_PAIRS (source, destination, length) triples as arguments, so it needs no table of addresses
on the device; a pair left None is compiled out. Program (c, p) casts chunk c of pair p; a chunk past a pair's length
loads and stores nothing.
"""

import triton
import triton.language as tl

CAST_PAIRS = 8  # pairs a launch takes: the kernel's signature below spells them out


@triton.jit
def _cast_chunk(SRC, DST, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(SRC + offs, mask=mask)
    tl.store(DST + offs, x.to(DST.dtype.element_ty), mask=mask)  # narrowing rounds to nearest even, as torch's cast


@triton.heuristics({f"HAS{i}": (lambda args, i=i: args[f"S{i}"] is not None) for i in range(1, CAST_PAIRS)})
@triton.jit
def cast_pairs_kernel(
    S0,  # pair 0's source: contiguous, any float dtype (every source of a launch has the same dtype)
    D0,  # pair 0's destination: contiguous, as many elements, any float dtype (the same for every pair)
    N0,  # pair 0's length in elements
    S1,  # pairs 1-7 as pair 0, or None
    D1,
    N1,
    S2,
    D2,
    N2,
    S3,
    D3,
    N3,
    S4,
    D4,
    N4,
    S5,
    D5,
    N5,
    S6,
    D6,
    N6,
    S7,
    D7,
    N7,
    BLOCK: tl.constexpr,
    HAS1: tl.constexpr,
    HAS2: tl.constexpr,
    HAS3: tl.constexpr,
    HAS4: tl.constexpr,
    HAS5: tl.constexpr,
    HAS6: tl.constexpr,
    HAS7: tl.constexpr,
):
    pair = tl.program_id(1)
    if pair == 0:
        _cast_chunk(S0, D0, N0, BLOCK)
    if HAS1:
        if pair == 1:
            _cast_chunk(S1, D1, N1, BLOCK)
    if HAS2:
        if pair == 2:
            _cast_chunk(S2, D2, N2, BLOCK)
    if HAS3:
        if pair == 3:
            _cast_chunk(S3, D3, N3, BLOCK)
    if HAS4:
        if pair == 4:
            _cast_chunk(S4, D4, N4, BLOCK)
    if HAS5:
        if pair == 5:
            _cast_chunk(S5, D5, N5, BLOCK)
    if HAS6:
        if pair == 6:
            _cast_chunk(S6, D6, N6, BLOCK)
    if HAS7:
        if pair == 7:
            _cast_chunk(S7, D7, N7, BLOCK)
