"""A GEMM whose tile spans whole output rows, so that its epilogue can finish the residual add and run the next
LayerNorm: X = residual + A @ B + bias in the residual stream's dtype, Y = LayerNorm(X) in the dtype the next GEMM
reads, with the fp32 mean and rstd for the backward.

This is how the GEMMs that write the residual stream (attention's proj, the MLP's fc2) may absorb the LayerNorm that
follows them, for D <= 4 * BLOCK_N (512); the GEMM chooser (ops/gemm.py) times it against the plain residual GEMM
followed by the row kernel, and cuBLAS followed by the row kernel. Wider models use the last two.

Triton blocks are powers of two, so a D = 384 row is N_CHUNKS = 3 accumulators of BLOCK_N = 128 columns that share
each K step's A tile; the constexpr `if`s below compile only the chunks a launch has.
"""

import triton
import triton.language as tl


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
