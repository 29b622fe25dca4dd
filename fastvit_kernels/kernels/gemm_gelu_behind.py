"""The linear GEMM's persistent TMA tiles with the epilogue of GELU or of its derivative one tile behind
(kernels/gemm.py's linear_fwd_kernel, GELU_BEHIND): a tile's product is stored, and its epilogue computed while the
program's next tile runs its main loop, so that the epilogue's issue slots (~18 SASS instructions an element for
GELU, two of them MUFU; GELU' about as many) fill the time the K steps wait on the tensor cores and on L2 instead of
following them. EPILOGUE "gelu": fc1's forward (the pre-activation stored); "gelu_grad": fc2's dX, d pre = dX *
GELU'(pre) (the product stored, rounded as eager's GEMM output is), with its column sums, fc1's bias gradient.
GELU_BEHIND says how many chunks of the tile before a K step may take: 1, or 2 where a tile has fewer K steps than
chunks (configs/gemm.py offers both).
"""

import triton
import triton.language as tl

from .common import gelu, gelu_grad, grouped_pid, tma_k_step
from .gemm_epilogue import finish_column_sums


@triton.jit
def _chunk_rows(m0, n0, chunk, rows_end, N, CHUNK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows [m0 + chunk * CHUNK_M, + CHUNK_M) of a tile at (m0, n0): (rows, cols, mask), rows below rows_end (none
    where rows_end is 0)."""
    rows = m0 + chunk * CHUNK_M + tl.arange(0, CHUNK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    return rows, cols, (rows < rows_end)[:, None] & (cols < N)[None, :]


@triton.jit
def _load_chunk(T, m0, n0, chunk, rows_end, N, stride_m, CHUNK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A chunk of an earlier tile's rows of T [.., BLOCK_N] (rows stride_m apart, unit column stride), as stored;
    0 where masked."""
    rows, cols, mask = _chunk_rows(m0, n0, chunk, rows_end, N, CHUNK_M, BLOCK_N)
    return tl.load(T + rows[:, None].to(tl.int64) * stride_m + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _load_inputs(SRC, PRE, m0, n0, chunk, rows_end, N, stride_sm, stride_pm, GRAD: tl.constexpr, CHUNK_M, BLOCK_N):
    """A chunk's epilogue inputs: (the stored tile's rows, GELU's pre-activation's with GRAD, else 0)."""
    x = _load_chunk(SRC, m0, n0, chunk, rows_end, N, stride_sm, CHUNK_M, BLOCK_N)
    if GRAD:
        p = _load_chunk(PRE, m0, n0, chunk, rows_end, N, stride_pm, CHUNK_M, BLOCK_N)
    else:
        p = 0.0
    return x, p


@triton.jit
def _store_chunk(C, x, p, sums, m0, n0, chunk, rows_end, N, stride_cm, GRAD: tl.constexpr, CHUNK_M, BLOCK_N):
    """The epilogue of _load_inputs' chunk (x, p), rounded to C's dtype, into the same rows of C: GELU(x), or with GRAD
    x * GELU'(p), added to the column sums `sums` [CHUNK_M, BLOCK_N] fp32 as rounded (masked elements are 0 and stay
    0: 0 * GELU'(0)). Returns the sums."""
    rows, cols, mask = _chunk_rows(m0, n0, chunk, rows_end, N, CHUNK_M, BLOCK_N)
    if GRAD:  # torch's gelu_backward, rounded where it rounds
        y = (x.to(tl.float32) * gelu_grad(p.to(tl.float32))).to(C.dtype.element_ty)
        sums += y.to(tl.float32)
    else:
        y = gelu(x.to(tl.float32)).to(C.dtype.element_ty)
    tl.store(C + rows[:, None].to(tl.int64) * stride_cm + cols[None, :], y, mask=mask)
    return sums


@triton.jit
def _chunk_at_once(
    SRC, PRE, C, sums, m0, n0, chunk, rows_end, N, stride_sm, stride_pm, stride_cm, GRAD: tl.constexpr, CHUNK_M, BLOCK_N
):
    """A chunk loaded and its epilogue stored at once (the chunks no K step takes ahead)."""
    x, p = _load_inputs(SRC, PRE, m0, n0, chunk, rows_end, N, stride_sm, stride_pm, GRAD, CHUNK_M, BLOCK_N)
    return _store_chunk(C, x, p, sums, m0, n0, chunk, rows_end, N, stride_cm, GRAD, CHUNK_M, BLOCK_N)


@triton.jit
def _mainloop_tma_behind(
    a_desc,
    b_desc,
    pid_m,
    pid_n,
    K,
    SRC,
    PRE,
    C,
    sums,
    prev_m0,
    prev_n0,
    prev_end,
    N,
    stride_sm,
    stride_pm,
    stride_cm,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    B_KMAJOR: tl.constexpr,
    CHUNKS: tl.constexpr,
    PER_STEP: tl.constexpr,
    GRAD: tl.constexpr,
):
    """_mainloop_tma's product, and under its asynchronous MMAs the epilogue of the program's previous tile in chunks
    of BLOCK_M // CHUNKS rows (what it stored at SRC, rows below prev_end): K step j takes chunk j, loaded a step
    ahead, and with PER_STEP = 2, where the tile has fewer K steps than chunks, also chunk steps + j (CIFAR-10's fc1
    and fc2's dX: six steps, eight chunks), loaded on the spot. Returns the product, how many of the first chunks are
    done, and the column sums (GRAD). The tensor cores run the product while the warps issue the exponentials of the
    tile before: the epilogue's issue slots under the main loop, not after it."""
    CHUNK_M: tl.constexpr = BLOCK_M // CHUNKS
    steps = tl.cdiv(K, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    j = 0
    x_next, p_next = _load_inputs(
        SRC, PRE, prev_m0, prev_n0, 0, prev_end, N, stride_sm, stride_pm, GRAD, CHUNK_M, BLOCK_N
    )
    for k0 in range(0, K, BLOCK_K):
        acc = tma_k_step(acc, a_desc, b_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, k0, DOT_PRECISION, B_KMAJOR)
        if j < CHUNKS:  # past the tile's last chunk (K steps > CHUNKS): nothing
            x, p = x_next, p_next
            end_next = tl.where((j + 1 < steps) & (j + 1 < CHUNKS), prev_end, 0)  # the next step's chunk, if any
            x_next, p_next = _load_inputs(
                SRC, PRE, prev_m0, prev_n0, j + 1, end_next, N, stride_sm, stride_pm, GRAD, CHUNK_M, BLOCK_N
            )
            sums = _store_chunk(C, x, p, sums, prev_m0, prev_n0, j, prev_end, N, stride_cm, GRAD, CHUNK_M, BLOCK_N)
            if PER_STEP == 2:
                if steps + j < CHUNKS:
                    sums = _chunk_at_once(
                        SRC,
                        PRE,
                        C,
                        sums,
                        prev_m0,
                        prev_n0,
                        steps + j,
                        prev_end,
                        N,
                        stride_sm,
                        stride_pm,
                        stride_cm,
                        GRAD,
                        CHUNK_M,
                        BLOCK_N,
                    )
        j += 1
    return acc, tl.minimum(PER_STEP * steps, CHUNKS), sums


@triton.jit
def _finish_previous(
    SRC,
    PRE,
    C,
    COLSUM,
    sums,
    done,
    prev_m0,
    prev_n0,
    prev_end,
    N,
    stride_sm,
    stride_pm,
    stride_cm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNKS: tl.constexpr,
    GRAD: tl.constexpr,
    HAS_COLSUM: tl.constexpr,
):
    """The previous tile's chunks from `done` on (those no K step took), and with HAS_COLSUM its column sums as its
    row block's partial row of COLSUM (none where prev_end is 0: no tile before)."""
    for c in range(done, CHUNKS):
        sums = _chunk_at_once(
            SRC,
            PRE,
            C,
            sums,
            prev_m0,
            prev_n0,
            c,
            prev_end,
            N,
            stride_sm,
            stride_pm,
            stride_cm,
            GRAD,
            BLOCK_M // CHUNKS,
            BLOCK_N,
        )
    if HAS_COLSUM:
        cols = prev_n0 + tl.arange(0, BLOCK_N)
        tl.store(COLSUM + (prev_m0 // BLOCK_M) * N + cols, tl.sum(sums, 0), mask=(cols < N) & (prev_end > 0))


@triton.jit
def tiles_epilogue_behind(
    a_desc,  # A [M, K] through a descriptor of [BLOCK_M, BLOCK_K] blocks
    b_desc,  # the weight through a descriptor: [N, K] blocks [BLOCK_N, BLOCK_K] (B_KMAJOR), else [K, N]
    C,  # [M, N] out: GELU of the pre-activation, or GELU' times the product (GRAD), in the compute dtype
    BIAS,  # [N] or None
    SRC,  # [M, N] where a tile's product waits for its epilogue: the backward's PRE for GELU in training, else C itself
    PRE,  # [M, N] with GRAD: GELU's pre-activation, read (else unread)
    COLSUM,  # [>= cdiv(M, BLOCK_M), N] fp32: row block i's column sums of C as stored in row i (with GRAD), or None
    DB,  # [N] out with COLSUM: the column sums of C, from COLSUM's rows (gemm_epilogue.finish_column_sums)
    ARRIVED,  # [>= cdiv(N, BLOCK_N)] int32, zeroed, with COLSUM: the tiles of each column block done; left zero again
    M,
    N,
    K,
    num_programs,
    stride_cm,
    stride_sm,
    stride_pm,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    B_KMAJOR: tl.constexpr,
    PER_STEP: tl.constexpr,  # chunks of the tile before a K step takes at most: 1, or 2 where K steps are few
    GRAD: tl.constexpr,  # the epilogue: GELU' (fc2's dX), else GELU
    HAS_COLSUM: tl.constexpr,
):
    """linear_fwd_kernel's persistent TMA tiles with the epilogue one tile behind: a tile's bias is added and its
    product stored at SRC (rounded to SRC's dtype, as eager rounds the linear layer's output before GELU or
    gelu_backward), and its epilogue is computed from SRC into C during the program's next tile's main loop
    (_mainloop_tma_behind), the last tile's after the loop. A tile's chunks are read back by other threads than wrote
    them: the CTA's barrier after the stores orders them (bar.sync makes a block's global writes visible to the
    block). Where SRC is C, each element's result is stored by the thread that loaded its input (one layout for the
    chunk's load, epilogue and store), after that load. The rounded product is what eager and the cuBLAS candidate
    take GELU or GELU' of; the other tiles take it of the fp32 sum (rounding it first cost their GELU epilogue ~9%
    more instructions). With HAS_COLSUM a tile's partial row of the column sums is stored with its last chunk, and
    its arrival counted after the next tile's product is stored, where the accumulator is no longer live and the
    column block's final sum (gemm_epilogue.finish_column_sums) has registers to spare under the 128-register cap."""
    CHUNKS: tl.constexpr = 8
    CHUNK_M: tl.constexpr = BLOCK_M // CHUNKS
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    prev_m0 = tl.program_id(0) * 0  # no tile before the first: prev_end 0 masks every row
    prev_n0 = prev_m0
    prev_end = prev_m0
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, num_programs):
        pid_m, pid_n = grouped_pid(tile, num_pid_m, num_pid_n, GROUP_M)
        sums = tl.zeros([CHUNK_M, BLOCK_N], dtype=tl.float32)  # the previous tile's column sums, a chunk's shape
        acc, done, sums = _mainloop_tma_behind(
            a_desc,
            b_desc,
            pid_m,
            pid_n,
            K,
            SRC,
            PRE,
            C,
            sums,
            prev_m0,
            prev_n0,
            prev_end,
            N,
            stride_sm,
            stride_pm,
            stride_cm,
            DOT_PRECISION,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            B_KMAJOR,
            CHUNKS,
            PER_STEP,
            GRAD,
        )
        _finish_previous(
            SRC,
            PRE,
            C,
            COLSUM,
            sums,
            done,
            prev_m0,
            prev_n0,
            prev_end,
            N,
            stride_sm,
            stride_pm,
            stride_cm,
            BLOCK_M,
            BLOCK_N,
            CHUNKS,
            GRAD,
            HAS_COLSUM,
        )
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        src_ptrs = SRC + offs_m[:, None].to(tl.int64) * stride_sm + offs_n[None, :]
        tl.store(src_ptrs, acc.to(SRC.dtype.element_ty), mask=(offs_m < M)[:, None] & mask_n[None, :])
        tl.debug_barrier()
        if HAS_COLSUM:  # the previous tile's partial row is stored: its arrival (this tile's product no longer live)
            if prev_end > 0:
                finish_column_sums(COLSUM, DB, ARRIVED, prev_n0 // BLOCK_N, M, N, BLOCK_M, BLOCK_N)
        prev_m0, prev_n0, prev_end = m0, n0, M
    _finish_previous(  # the last tile's
        SRC,
        PRE,
        C,
        COLSUM,
        tl.zeros([CHUNK_M, BLOCK_N], dtype=tl.float32),
        0,
        prev_m0,
        prev_n0,
        prev_end,
        N,
        stride_sm,
        stride_pm,
        stride_cm,
        BLOCK_M,
        BLOCK_N,
        CHUNKS,
        GRAD,
        HAS_COLSUM,
    )
    if HAS_COLSUM:
        if prev_end > 0:
            finish_column_sums(COLSUM, DB, ARRIVED, prev_n0 // BLOCK_N, M, N, BLOCK_M, BLOCK_N)
