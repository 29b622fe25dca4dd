"""Column sums of a tall matrix: the bias gradient of a linear layer whose weight gradient cuBLAS computes (fc1's
with GELU's backward in the same pass: its d pre-activation written and summed), and the LayerNorm backward's weight
and bias gradients (and the next GEMM's bias gradient) from its programs' partial rows: up to three outputs of one
pass, each in its own dtype.

torch's `g.sum(0)` over a linear layer's output gradient ([33,280, N] bf16 in a CIFAR-10 training step) ran at about a
quarter of its bytes' speed on an H200 (48 launches, 46 us each, 2.2 ms of a 21.4 ms step, 2026-11-27). Here each
program sums a strip of BLOCK_N columns over its share of the rows into a [BLOCK_R, BLOCK_N] fp32 accumulator (no
reduction inside the loop), with the next row blocks' loads in flight (LOAD_STAGES), and writes one partial row; the
strip's last program to arrive adds the partial rows up (tens to hundreds) and writes the sums in the output's dtype:
no torch sum and cast after it (two launches a bias gradient, 96 a CIFAR-10 training step).
"""

import triton
import triton.language as tl

from .common import gelu_grad, last_to_arrive


@triton.jit
def _store_columns(OUT, sums, cols, start, end):
    """sums of columns [start, end) of the strip `cols` into OUT [end - start], rounded once to OUT's dtype."""
    tl.store(OUT + (cols - start), sums.to(OUT.dtype.element_ty), mask=(cols >= start) & (cols < end))


@triton.heuristics(
    {
        "HAS_OUT2": lambda args: args["OUT2"] is not None,
        "HAS_OUT3": lambda args: args["OUT3"] is not None,
        "HAS_PRE": lambda args: args["PRE"] is not None,
    }
)
@triton.jit
def column_sum_kernel(
    G,  # [R, N], rows stride_gr apart, unit stride along N: any float dtype (with PRE: GELU's output gradient)
    PRE,  # [R, N] GELU's pre-activation, rows stride_pr apart, or None: then the rows summed are G * GELU'(PRE)...
    DG,  # [R, N], contiguous: ...written here in its dtype, and summed as rounded (fc1's d pre-activation, whose
    #      column sums are fc1's bias gradient), with PRE
    PART,  # [programs along R, N] fp32: each program's column sums over its rows
    OUT,  # [N], or [split2] with OUT2: the sums of the first columns, rounded once to its dtype
    OUT2,  # [split3 - split2] (or [N - split2]) in its own dtype: the next columns' sums (another gradient), or None
    OUT3,  # [N - split3] in its own dtype: the last columns' sums (with OUT2), or None
    ARRIVED,  # [strips] int32, zeroed: the programs of each strip done; left zero again
    R,
    N,
    rows_per_program,
    stride_gr,
    stride_pr,
    split2,  # the first column whose sum goes to OUT2 (with OUT2)
    split3,  # the first column whose sum goes to OUT3 (with OUT3)
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    LOAD_STAGES: tl.constexpr,
    HAS_OUT2: tl.constexpr,
    HAS_OUT3: tl.constexpr,
    HAS_PRE: tl.constexpr,
):
    pid_n, pid_r = tl.program_id(0), tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    row_start = pid_r * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, R)
    acc = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
    for r0 in tl.range(row_start, row_end, BLOCK_R, num_stages=LOAD_STAGES):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & mask_n[None, :]
        rows64 = rows[:, None].to(tl.int64)
        g = tl.load(G + rows64 * stride_gr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_PRE:  # torch's gelu_backward, rounded where it rounds; padding stays 0 (0 * GELU'(0))
            pre = tl.load(PRE + rows64 * stride_pr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dg = (g * gelu_grad(pre)).to(DG.dtype.element_ty)
            tl.store(DG + rows64 * N + cols[None, :], dg, mask=mask)
            g = dg.to(tl.float32)
        acc += g
    tl.store(PART + pid_r * N + cols, tl.sum(acc, 0), mask=mask_n)
    programs = tl.num_programs(1)
    if last_to_arrive(ARRIVED + pid_n, programs):  # the strip's partial rows, in program order whichever is last
        # BLOCK_R rows a load, not sum_partials' one tile a load: up to hundreds of rows here, each load waited for
        total = tl.zeros([BLOCK_R, BLOCK_N], dtype=tl.float32)
        for p0 in range(0, programs, BLOCK_R):
            parts = p0 + tl.arange(0, BLOCK_R)
            mask = (parts < programs)[:, None] & mask_n[None, :]
            # .cg: written by other SMs, past this SM's L1
            total += tl.load(PART + parts[:, None] * N + cols[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        sums = tl.sum(total, 0)
        if HAS_OUT3:
            _store_columns(OUT, sums, cols, 0, split2)
            _store_columns(OUT2, sums, cols, split2, split3)
            _store_columns(OUT3, sums, cols, split3, N)
        elif HAS_OUT2:
            _store_columns(OUT, sums, cols, 0, split2)
            _store_columns(OUT2, sums, cols, split2, N)
        else:
            _store_columns(OUT, sums, cols, 0, N)
