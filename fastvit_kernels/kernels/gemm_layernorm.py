"""GEMMs that finish the residual add and run the next LayerNorm: X = residual + A @ B + bias in the residual
stream's dtype, Y = LayerNorm(X) in the dtype the next GEMM reads, with the fp32 mean and rstd for the backward.
Two ways, both measured by the GEMM chooser (ops/gemm.py):

- linear_residual_layernorm_kernel: a tile spans whole output rows (D <= 512), its epilogue normalises them.
- linear_residual_norm_rows_kernel: ordinary tiles (up to 128 x 256, any D); each writes X and its rows' partial
  statistics, and the last tile of a row block to finish reads that block of X back (from L2, just written) and
  normalises it.

The full-row kernel. This is how the GEMMs that write the residual stream (attention's proj, the MLP's fc2) absorb
the LayerNorm that follows them, for D <= 4 * BLOCK_N (512): a ViT-S block is then five launches, none of them a
standalone LayerNorm, and X is not read back from memory to be normalised. Wider models use the rows kernel, or the
plain GEMM and the row kernel.

Triton blocks are powers of two, so a D = 384 row is N_CHUNKS = 3 accumulators of BLOCK_N = 128 columns that share
each K step's A tile; the constexpr `if`s below compile only the chunks a launch has.
"""

import triton
import triton.language as tl

from .common import last_to_arrive
from .gemm import _column_parts, _mainloop_pointers, _mainloop_tma, _tma_descriptors


@triton.jit
def _b_tile(B, k0, chunk, N, K, stride_bk, stride_bn, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_k = k0 + tl.arange(0, BLOCK_K)
    offs_n = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    return tl.load(B + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn, mask=mask, other=0.0)


@triton.jit
def _stream_chunk(acc, chunk, rows, mask_m, C, BIAS, RES, N, stride_cm, stride_rm, HAS_BIAS, BLOCK_N: tl.constexpr):
    """Bias and residual on one chunk of columns, stored in the stream's dtype; returns the stored values in fp32
    (zero outside the row), which is what LayerNorm must see when the stream is 16-bit, as eager's does."""
    cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    acc += tl.load(RES + rows * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x = acc.to(C.dtype.element_ty)
    tl.store(C + rows * stride_cm + cols[None, :], x, mask=mask)
    return tl.where(mask, x.to(tl.float32), 0.0)


@triton.jit
def _centred(x, chunk, mean, N, BLOCK_N: tl.constexpr):
    cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.where((cols < N)[None, :], x - mean[:, None], 0.0)


@triton.jit
def _norm_chunk(xc, rstd, chunk, rows, mask_m, Y, LN_W, LN_B, N, stride_ym, BLOCK_N: tl.constexpr):
    cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    w = tl.load(LN_W + cols, mask=mask_n, other=0.0).to(tl.float32)
    b = tl.load(LN_B + cols, mask=mask_n, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.heuristics({"HAS_BIAS": lambda args: args["BIAS"] is not None})
@triton.jit
def linear_residual_layernorm_kernel(
    A,  # [M, K] activations, compute dtype
    B,  # [K, N] the weight as a transposed view of nn.Linear's [N, K], compute dtype
    BIAS,  # [N] or None
    RES,  # [M, N] residual (unit column stride), the stream's dtype
    C,  # [M, N] out: residual + A @ B + bias, the stream's dtype (unit column stride)
    LN_W,  # [N] the next LayerNorm's weight
    LN_B,  # [N] the next LayerNorm's bias
    Y,  # [M, N] out: LayerNorm(C), in the dtype the next GEMM reads (unit column stride)
    MEAN,  # [M] out: fp32 row means of C
    RSTD,  # [M] out: fp32 1 / std of C's rows
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_rm,
    stride_cm,
    stride_ym,
    eps,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # columns per accumulator
    BLOCK_K: tl.constexpr,
    N_CHUNKS: tl.constexpr,  # accumulators per row, 1 to 4: N <= N_CHUNKS * BLOCK_N
    TMA_OK: tl.constexpr,  # the launcher's: the operands can be read through tensor descriptors (16-byte rows)
    HAS_BIAS: tl.constexpr,
    USE_TMA: tl.constexpr = False,  # the config's: load A and B through tensor descriptors where TMA_OK
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    acc0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if N_CHUNKS > 1:
        acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if N_CHUNKS > 2:
        acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if N_CHUNKS > 3:
        acc3 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if USE_TMA and TMA_OK:
        # The copy engine computes the addresses and zero-fills past M, N and K: a K step issues no address or mask
        # arithmetic (fc2's 24 K steps per tile are most of its main loop). B's chunks are read K-major, as
        # nn.Linear stores its weight, and transposed in shared memory for the dot.
        row0 = tl.program_id(0) * BLOCK_M
        a_desc = tl.make_tensor_descriptor(A, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(B, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([row0, k0])
            acc0 = tl.dot(a, b_desc.load([0, k0]).T, acc0, input_precision=DOT_PRECISION)
            if N_CHUNKS > 1:
                acc1 = tl.dot(a, b_desc.load([BLOCK_N, k0]).T, acc1, input_precision=DOT_PRECISION)
            if N_CHUNKS > 2:
                acc2 = tl.dot(a, b_desc.load([2 * BLOCK_N, k0]).T, acc2, input_precision=DOT_PRECISION)
            if N_CHUNKS > 3:
                acc3 = tl.dot(a, b_desc.load([3 * BLOCK_N, k0]).T, acc3, input_precision=DOT_PRECISION)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptrs, mask=mask_m[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
            b0 = _b_tile(B, k0, 0, N, K, stride_bk, stride_bn, BLOCK_K, BLOCK_N)
            acc0 = tl.dot(a, b0, acc0, input_precision=DOT_PRECISION)
            if N_CHUNKS > 1:
                b1 = _b_tile(B, k0, 1, N, K, stride_bk, stride_bn, BLOCK_K, BLOCK_N)
                acc1 = tl.dot(a, b1, acc1, input_precision=DOT_PRECISION)
            if N_CHUNKS > 2:
                b2 = _b_tile(B, k0, 2, N, K, stride_bk, stride_bn, BLOCK_K, BLOCK_N)
                acc2 = tl.dot(a, b2, acc2, input_precision=DOT_PRECISION)
            if N_CHUNKS > 3:
                b3 = _b_tile(B, k0, 3, N, K, stride_bk, stride_bn, BLOCK_K, BLOCK_N)
                acc3 = tl.dot(a, b3, acc3, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak

    # The epilogue: the stream, then LayerNorm of the whole row in fp32 (two passes over registers, mean then centred
    # squares, as the row kernel does), rounded to Y's dtype once, at the store.
    rows = offs_m[:, None].to(tl.int64)
    x0 = _stream_chunk(acc0, 0, rows, mask_m, C, BIAS, RES, N, stride_cm, stride_rm, HAS_BIAS, BLOCK_N)
    total = tl.sum(x0, 1)
    if N_CHUNKS > 1:
        x1 = _stream_chunk(acc1, 1, rows, mask_m, C, BIAS, RES, N, stride_cm, stride_rm, HAS_BIAS, BLOCK_N)
        total += tl.sum(x1, 1)
    if N_CHUNKS > 2:
        x2 = _stream_chunk(acc2, 2, rows, mask_m, C, BIAS, RES, N, stride_cm, stride_rm, HAS_BIAS, BLOCK_N)
        total += tl.sum(x2, 1)
    if N_CHUNKS > 3:
        x3 = _stream_chunk(acc3, 3, rows, mask_m, C, BIAS, RES, N, stride_cm, stride_rm, HAS_BIAS, BLOCK_N)
        total += tl.sum(x3, 1)
    mean = total / N
    x0 = _centred(x0, 0, mean, N, BLOCK_N)
    squares = tl.sum(x0 * x0, 1)
    if N_CHUNKS > 1:
        x1 = _centred(x1, 1, mean, N, BLOCK_N)
        squares += tl.sum(x1 * x1, 1)
    if N_CHUNKS > 2:
        x2 = _centred(x2, 2, mean, N, BLOCK_N)
        squares += tl.sum(x2 * x2, 1)
    if N_CHUNKS > 3:
        x3 = _centred(x3, 3, mean, N, BLOCK_N)
        squares += tl.sum(x3 * x3, 1)
    rstd = 1.0 / tl.sqrt(squares / N + eps)
    _norm_chunk(x0, rstd, 0, rows, mask_m, Y, LN_W, LN_B, N, stride_ym, BLOCK_N)
    if N_CHUNKS > 1:
        _norm_chunk(x1, rstd, 1, rows, mask_m, Y, LN_W, LN_B, N, stride_ym, BLOCK_N)
    if N_CHUNKS > 2:
        _norm_chunk(x2, rstd, 2, rows, mask_m, Y, LN_W, LN_B, N, stride_ym, BLOCK_N)
    if N_CHUNKS > 3:
        _norm_chunk(x3, rstd, 3, rows, mask_m, Y, LN_W, LN_B, N, stride_ym, BLOCK_N)
    tl.store(MEAN + offs_m, mean, mask=mask_m)
    tl.store(RSTD + offs_m, rstd, mask=mask_m)


# ------------------------------------------------------------------------------------------------------------------
# Ordinary tiles, the row block's last tile normalising it. The full-row tile above reads all of B for every 64 rows
# (fc2 + norm: 716 MB of tile loads at CIFAR-10's shape) with one block per SM, its K loop bound by L2 and its
# epilogue by HBM in turn; these tiles read B a quarter as often (128 x 256) and overlap one tile's epilogue with
# other tiles' K loops. The price: X read back once, from L2, by the tile that normalises it, and per-row partial
# statistics (8 B a row and part).
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _stream_part_stats(
    acc, chunk, rows, offs_m, mask_m, C, BIAS, RES, PARTS, M, N, stride_cm, stride_rm, HAS_BIAS, PART: tl.constexpr
):
    """The stream for columns [chunk * PART, (chunk + 1) * PART) of the tile's rows, and the rows' partial
    statistics over them: the sum and the sum of squares about the part's own mean (merged by _normalise_rows;
    plain sums of squares would cancel catastrophically in rows with a large mean)."""
    x = _stream_chunk(acc, chunk, rows, mask_m, C, BIAS, RES, N, stride_cm, stride_rm, HAS_BIAS, PART)
    total = tl.sum(x, 1)
    xc = _centred(x, chunk, total / tl.minimum(N - chunk * PART, PART), N, PART)
    tl.store(PARTS + (2 * chunk) * M + offs_m, total, mask=mask_m)
    tl.store(PARTS + (2 * chunk + 1) * M + offs_m, tl.sum(xc * xc, 1), mask=mask_m)


@triton.jit
def _normalise_rows(
    pid_m,
    C,
    LN_W,
    LN_B,
    Y,
    MEAN,
    RSTD,
    PARTS,
    M,
    N,
    stride_cm,
    stride_ym,
    eps,
    BLOCK_M: tl.constexpr,
    PART: tl.constexpr,
    NORM_COLS: tl.constexpr = 64,  # columns a step normalises (128: 8 B of stack in 128 x 128, fp32 stream, 3.8)
):
    """LayerNorm of the row block pid_m of X, whose every part has been stored with its statistics (by other
    programs: .cg loads, past this SM's L1). The parts merge one by one as Chan et al. merge two sets: with
    d = mean_p - mean, mean += d n_p / n and M2 += M2_p + d^2 n_before n_p / n (no difference of large sums)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for p in range(0, tl.cdiv(N, PART)):
        n_before = p * PART
        n_p = tl.minimum(N - n_before, PART)
        part_sum = tl.load(PARTS + (2 * p) * M + offs_m, mask=mask_m, other=0.0, cache_modifier=".cg")
        part_m2 = tl.load(PARTS + (2 * p + 1) * M + offs_m, mask=mask_m, other=0.0, cache_modifier=".cg")
        d = part_sum / n_p - mean
        mean += d * (n_p / (n_before + n_p))
        m2 += part_m2 + d * d * (n_before * n_p / (n_before + n_p))
    rstd = 1.0 / tl.sqrt(m2 / N + eps)
    tl.store(MEAN + offs_m, mean, mask=mask_m)
    tl.store(RSTD + offs_m, rstd, mask=mask_m)
    rows = offs_m[:, None].to(tl.int64)
    for chunk in range(0, tl.cdiv(N, NORM_COLS)):
        cols = chunk * NORM_COLS + tl.arange(0, NORM_COLS)
        mask = mask_m[:, None] & (cols < N)[None, :]
        x = tl.load(C + rows * stride_cm + cols[None, :], mask=mask, other=0.0, cache_modifier=".cg")
        xc = x.to(tl.float32) - mean[:, None]
        _norm_chunk(xc, rstd, chunk, rows, mask_m, Y, LN_W, LN_B, N, stride_ym, NORM_COLS)


@triton.jit
def _tile_then_rows(
    acc,
    pid_m,
    pid_n,
    num_pid_n,
    C,
    BIAS,
    RES,
    LN_W,
    LN_B,
    Y,
    MEAN,
    RSTD,
    PARTS,
    ARRIVED,
    M,
    N,
    stride_cm,
    stride_rm,
    stride_ym,
    eps,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One tile's stream and partial statistics; then, if it is the last of its row block to arrive, the block's
    LayerNorm. A 256-wide tile works in two 128-column halves (the fp32 residual whole spills: see gemm.py's
    _finish_tile), which are also its parts for the statistics."""
    HALVES: tl.constexpr = 2 if BLOCK_N >= 256 else 1
    PART: tl.constexpr = BLOCK_N // HALVES
    parts = _column_parts(acc, HALVES, BLOCK_M, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m[:, None].to(tl.int64)
    for half in tl.static_range(HALVES):
        chunk = HALVES * pid_n + half
        if chunk * PART < N:  # the second half of the last tile may lie past the row (N = 384 in 256-wide tiles)
            _stream_part_stats(
                parts[half],
                chunk,
                rows,
                offs_m,
                mask_m,
                C,
                BIAS,
                RES,
                PARTS,
                M,
                N,
                stride_cm,
                stride_rm,
                HAS_BIAS,
                PART,
            )
    if last_to_arrive(ARRIVED + pid_m, num_pid_n):
        _normalise_rows(pid_m, C, LN_W, LN_B, Y, MEAN, RSTD, PARTS, M, N, stride_cm, stride_ym, eps, BLOCK_M, PART)


@triton.heuristics({"HAS_BIAS": lambda args: args["BIAS"] is not None, "B_KMAJOR": lambda args: args["stride_bk"] == 1})
@triton.jit
def linear_residual_norm_rows_kernel(
    A,  # [M, K] activations, compute dtype
    B,  # [K, N] the weight as a transposed view of nn.Linear's [N, K], compute dtype
    BIAS,  # [N] or None
    RES,  # [M, N] residual (unit column stride), the stream's dtype
    C,  # [M, N] out: residual + A @ B + bias, the stream's dtype (unit column stride)
    LN_W,  # [N] the next LayerNorm's weight
    LN_B,  # [N] the next LayerNorm's bias
    Y,  # [M, N] out: LayerNorm(C), in the dtype the next GEMM reads (unit column stride)
    MEAN,  # [M] out: fp32 row means of C
    RSTD,  # [M] out: fp32 1 / std of C's rows
    PARTS,  # [2 * parts, M] fp32 scratch: each row's sum and centred sum of squares per part of its columns
    ARRIVED,  # [row blocks] int32, zeroed: column tiles of each row block done; left zero again
    M,
    N,
    K,
    num_programs,  # the persistent TMA programs' stride through the tiles (their grid: at most this many)
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_rm,
    stride_cm,
    stride_ym,
    eps,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_TMA: tl.constexpr,  # the tile's choice: persistent programs loading through tensor descriptors...
    TMA_OK: tl.constexpr,  # ...where the operands allow it (16-byte aligned rows, A K-contiguous)
    HAS_BIAS: tl.constexpr,
    B_KMAJOR: tl.constexpr,  # B's K steps are contiguous (nn.Linear's weight as stored), else its N steps are
):
    # Tiles in row-major order, a row block's column tiles one after another, so that the block's X is still in L2
    # when its last tile reads it back (B, at most 512 x K here, stays in L2 whatever the order).
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # (the pointer tiles as one program a tile, outside a loop: inside the TMA tiles' one-iteration loop they took
    # 20-30 more registers, 8 B of stack with the fp32 stream; sm_90, triton 3.8, compiled offline)
    if USE_TMA and TMA_OK:
        a_desc, b_desc = _tma_descriptors(
            A, B, M, N, K, stride_am, stride_bk, stride_bn, BLOCK_M, BLOCK_N, BLOCK_K, B_KMAJOR
        )
        for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, num_programs):
            pid_m, pid_n = tile // num_pid_n, tile % num_pid_n
            acc = _mainloop_tma(a_desc, b_desc, pid_m, pid_n, K, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K, B_KMAJOR)
            _tile_then_rows(
                acc,
                pid_m,
                pid_n,
                num_pid_n,
                C,
                BIAS,
                RES,
                LN_W,
                LN_B,
                Y,
                MEAN,
                RSTD,
                PARTS,
                ARRIVED,
                M,
                N,
                stride_cm,
                stride_rm,
                stride_ym,
                eps,
                HAS_BIAS,
                BLOCK_M,
                BLOCK_N,
            )
    else:
        pid_m, pid_n = tl.program_id(0) // num_pid_n, tl.program_id(0) % num_pid_n
        acc = _mainloop_pointers(
            A,
            B,
            pid_m,
            pid_n,
            M,
            N,
            K,
            stride_am,
            stride_ak,
            stride_bk,
            stride_bn,
            DOT_PRECISION,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
        )
        _tile_then_rows(
            acc,
            pid_m,
            pid_n,
            num_pid_n,
            C,
            BIAS,
            RES,
            LN_W,
            LN_B,
            Y,
            MEAN,
            RSTD,
            PARTS,
            ARRIVED,
            M,
            N,
            stride_cm,
            stride_rm,
            stride_ym,
            eps,
            HAS_BIAS,
            BLOCK_M,
            BLOCK_N,
        )
