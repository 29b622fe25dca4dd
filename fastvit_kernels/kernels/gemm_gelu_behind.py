"""The linear GEMM's persistent TMA tiles with GELU's epilogue one tile behind (kernels/gemm.py's linear_fwd_kernel,
GELU_BEHIND): a tile's pre-activation is stored, and its GELU computed while the program's next tile runs its main
loop, so that the epilogue's issue slots (~18 SASS instructions an element, two of them MUFU) fill the time the K
steps wait on the tensor cores and on L2 instead of following them. GELU_BEHIND says how many chunks of the tile
before a K step may take: 1, or 2 where a tile has fewer K steps than chunks (configs/gemm.py offers both).
"""

import triton
import triton.language as tl

from .common import gelu, grouped_pid, tma_k_step


@triton.jit
def _pre_chunk(SRC, m0, n0, chunk, rows_end, N, stride_sm, CHUNK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows [m0 + chunk * CHUNK_M, + CHUNK_M) (those below rows_end; none where rows_end is 0) of an earlier tile's
    pre-activation [.., BLOCK_N] at SRC (rows stride_sm apart, unit column stride), as stored."""
    rows = m0 + chunk * CHUNK_M + tl.arange(0, CHUNK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    mask = (rows < rows_end)[:, None] & (cols < N)[None, :]
    return tl.load(SRC + rows[:, None].to(tl.int64) * stride_sm + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_gelu(C, pre, m0, n0, chunk, rows_end, N, stride_cm, CHUNK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """GELU of _pre_chunk's rows `pre`, rounded to C's dtype, into the same rows of C."""
    rows = m0 + chunk * CHUNK_M + tl.arange(0, CHUNK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    mask = (rows < rows_end)[:, None] & (cols < N)[None, :]
    gelu_pre = gelu(pre.to(tl.float32)).to(C.dtype.element_ty)
    tl.store(C + rows[:, None].to(tl.int64) * stride_cm + cols[None, :], gelu_pre, mask=mask)


@triton.jit
def _gelu_chunk(SRC, C, m0, n0, chunk, rows_end, N, stride_sm, stride_cm, CHUNK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A chunk loaded and its GELU stored at once (the chunks no K step takes ahead)."""
    pre = _pre_chunk(SRC, m0, n0, chunk, rows_end, N, stride_sm, CHUNK_M, BLOCK_N)
    _store_gelu(C, pre, m0, n0, chunk, rows_end, N, stride_cm, CHUNK_M, BLOCK_N)


@triton.jit
def _mainloop_tma_gelu_behind(
    a_desc,
    b_desc,
    pid_m,
    pid_n,
    K,
    SRC,
    C,
    prev_m0,
    prev_n0,
    prev_end,
    N,
    stride_sm,
    stride_cm,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    B_KMAJOR: tl.constexpr,
    CHUNKS: tl.constexpr,
    PER_STEP: tl.constexpr,
):
    """_mainloop_tma's product, and under its asynchronous MMAs the GELU of the program's previous tile in chunks of
    BLOCK_M // CHUNKS rows (the pre-activation it stored at SRC, rows below prev_end): K step j takes chunk j, loaded
    a step ahead, and with PER_STEP = 2, where the tile has fewer K steps than chunks, also chunk steps + j
    (CIFAR-10's fc1: six steps, eight chunks), loaded on the spot. Returns the product and how many of the first
    chunks are done. The tensor cores run the product while the warps issue the exponentials of the tile before:
    the epilogue's issue slots under the main loop, not after it."""
    CHUNK_M: tl.constexpr = BLOCK_M // CHUNKS
    steps = tl.cdiv(K, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    j = 0
    pre_next = _pre_chunk(SRC, prev_m0, prev_n0, 0, prev_end, N, stride_sm, CHUNK_M, BLOCK_N)
    for k0 in range(0, K, BLOCK_K):
        acc = tma_k_step(acc, a_desc, b_desc, pid_m * BLOCK_M, pid_n * BLOCK_N, k0, DOT_PRECISION, B_KMAJOR)
        if j < CHUNKS:  # past the tile's last chunk (K steps > CHUNKS): nothing
            pre = pre_next
            end_next = tl.where((j + 1 < steps) & (j + 1 < CHUNKS), prev_end, 0)  # the next step's chunk, if any
            pre_next = _pre_chunk(SRC, prev_m0, prev_n0, j + 1, end_next, N, stride_sm, CHUNK_M, BLOCK_N)
            _store_gelu(C, pre, prev_m0, prev_n0, j, prev_end, N, stride_cm, CHUNK_M, BLOCK_N)
            if PER_STEP == 2:
                if steps + j < CHUNKS:
                    _gelu_chunk(
                        SRC, C, prev_m0, prev_n0, steps + j, prev_end, N, stride_sm, stride_cm, CHUNK_M, BLOCK_N
                    )
        j += 1
    return acc, tl.minimum(PER_STEP * steps, CHUNKS)


@triton.jit
def tiles_gelu_behind(
    a_desc,  # A [M, K] through a descriptor of [BLOCK_M, BLOCK_K] blocks
    b_desc,  # the weight through a descriptor: [N, K] blocks [BLOCK_N, BLOCK_K] (B_KMAJOR), else [K, N]
    C,  # [M, N] out: GELU of the pre-activation, in the compute dtype
    BIAS,  # [N] or None
    SRC,  # [M, N] where a tile's pre-activation waits for its GELU: the backward's PRE in training, else C itself
    M,
    N,
    K,
    num_programs,
    stride_cm,
    stride_sm,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    B_KMAJOR: tl.constexpr,
    PER_STEP: tl.constexpr,  # chunks of the tile before a K step takes at most: 1, or 2 where K steps are few
):
    """linear_fwd_kernel's persistent TMA tiles with GELU's epilogue one tile behind: a tile's bias is added and its
    pre-activation stored at SRC (rounded to SRC's dtype, as eager rounds the linear layer's output before GELU), and
    its GELU is computed from SRC into C during the program's next tile's main loop (_mainloop_tma_gelu_behind), the
    last tile's after the loop. A tile's chunks are read back by other threads than wrote them: the CTA's barrier
    after the stores orders them (bar.sync makes a block's global writes visible to the block). Where SRC is C, each
    element's GELU is stored by the thread that loaded its pre-activation (one layout for the chunk's load, GELU and
    store), after that load. GELU of the rounded pre-activation is eager's and the cuBLAS candidate's function; the
    other tiles take GELU of the fp32 sum (rounding it first cost their epilogue ~9% more instructions)."""
    CHUNKS: tl.constexpr = 8
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    prev_m0 = tl.program_id(0) * 0  # no tile before the first: prev_end 0 masks every row
    prev_n0 = prev_m0
    prev_end = prev_m0
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, num_programs):
        pid_m, pid_n = grouped_pid(tile, num_pid_m, num_pid_n, GROUP_M)
        acc, done = _mainloop_tma_gelu_behind(
            a_desc,
            b_desc,
            pid_m,
            pid_n,
            K,
            SRC,
            C,
            prev_m0,
            prev_n0,
            prev_end,
            N,
            stride_sm,
            stride_cm,
            DOT_PRECISION,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            B_KMAJOR,
            CHUNKS,
            PER_STEP,
        )
        for c in range(done, CHUNKS):  # fewer K steps than chunks (PER_STEP of them a step): the rest
            _gelu_chunk(SRC, C, prev_m0, prev_n0, c, prev_end, N, stride_sm, stride_cm, BLOCK_M // CHUNKS, BLOCK_N)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        pre_ptrs = SRC + offs_m[:, None].to(tl.int64) * stride_sm + offs_n[None, :]
        tl.store(pre_ptrs, acc.to(SRC.dtype.element_ty), mask=(offs_m < M)[:, None] & mask_n[None, :])
        tl.debug_barrier()
        prev_m0, prev_n0, prev_end = m0, n0, M
    for c in range(0, CHUNKS):  # the last tile's
        _gelu_chunk(SRC, C, prev_m0, prev_n0, c, prev_end, N, stride_sm, stride_cm, BLOCK_M // CHUNKS, BLOCK_N)
