"""jit helpers shared by the kernel families."""

import triton
import triton.language as tl

# Abramowitz & Stegun 7.1.26: erfc(a) ~= t * (p1 + t * (p2 + ...)) * exp(-a^2), t = 1 / (1 + P * a), for a >= 0,
# with at most 1.5e-7 absolute error in exact arithmetic (about 2e-7 in fp32; tests/test_gelu.py sweeps the float
# range against torch.erf). libdevice's erff is about 32 SASS instructions on sm_90; fc1's GELU epilogue is applied to
# every element of a 1536-wide activation, and at K = 384 it cost as many issue slots as the tile's main loop. The
# helpers below take 18 a GELU (sm_90, triton 3.6 and 3.8, compiled offline; 26 with `1.0 / y` and `tl.exp`): the
# reciprocal is a clamp, an rsqrt squared and a Newton step (6 instructions, one MUFU op, where the division's range
# checks cost 10) and the Gaussian an exp2 of a pre-scaled square (3, where tl.exp's denormal handling cost 6).
ERFC_P = tl.constexpr(0.3275911)
ERFC_A1 = tl.constexpr(0.254829592)
ERFC_A2 = tl.constexpr(-0.284496736)
ERFC_A3 = tl.constexpr(1.421413741)
ERFC_A4 = tl.constexpr(-1.453152027)
ERFC_A5 = tl.constexpr(1.061405429)
ERFC_P_RSQRT2 = tl.constexpr(0.3275911 * 0.7071067811865476)  # P / sqrt 2: Phi's t from x without scaling x first
LOG2E = tl.constexpr(1.4426950408889634)
# |x| past which erfc's exp(-a^2) factor is 0 in fp32 anyway: the reciprocal's argument stays finite (NaN goes on
# through the exp)
ERFC_A_MAX = tl.constexpr(64.0)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def grouped_pid(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` in grouped order: GROUP_M row blocks share B's column blocks while they sit
    in L2."""
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m
    return pid_m, pid_n


@triton.jit
def tma_k_step(acc, a_desc, b_desc, m0, n0, k0, DOT_PRECISION: tl.constexpr, B_KMAJOR: tl.constexpr):
    """acc += A[m0:, k0:] @ B[k0:, n0:] for one K step of a GEMM tile, both operands through tensor descriptors. B's
    tile is read as B is stored: K-major as nn.Linear stores its weight (transposed in shared memory for the dot), or
    N-major where the GEMM reads a weight untransposed (fc2's dX with GELU')."""
    a = a_desc.load([m0, k0])
    if B_KMAJOR:
        acc = tl.dot(a, b_desc.load([n0, k0]).T, acc, input_precision=DOT_PRECISION)
    else:
        acc = tl.dot(a, b_desc.load([k0, n0]), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def block_and_head(N, BLOCK: tl.constexpr):
    # One flat grid, sequence blocks fastest: the blocks of one head run side by side and share its K/V in L2. (A
    # second grid axis for batch x heads would cap it at 65535, which a CIFAR-10 evaluation batch of 11k images
    # exceeds.) Every attention kernel decodes its program id here, so the launchers' grids all read the same way.
    num_blocks = tl.cdiv(N, BLOCK)
    return tl.program_id(0) % num_blocks, tl.program_id(0) // num_blocks


@triton.jit
def row_blocks(N, BLOCK: tl.constexpr, ROW_TAIL: tl.constexpr):
    """The query blocks of a pair for a forward tile with ROW_TAIL: where the last partial block has at most ROW_TAIL
    rows after a full one, the full one takes them (one block fewer than cdiv(N, BLOCK))."""
    rem = N % BLOCK
    return tl.cdiv(N, BLOCK) - ((rem > 0) & (rem <= ROW_TAIL) & (N > BLOCK)).to(tl.int32)


@triton.jit
def full_blocks_end(N, BLOCK: tl.constexpr, TAIL: tl.constexpr):
    """Where a loop over N in blocks of BLOCK stops when its last, partial block has at most TAIL (> 0) elements and
    takes a TAIL-wide block of its own: a multiple of BLOCK (else N, every block BLOCK-wide, the last one masked)."""
    rem = N % BLOCK
    if TAIL > 0:
        return tl.where((rem > 0) & (rem <= TAIL), N - rem, N)
    return N


@triton.jit
def attention_probs(q, k, m, log_l, mask_m, mask_n, qk_scale_log2, DOT_PRECISION: tl.constexpr):
    # P (rows by keys) rebuilt from the forward's row statistics, as the forward computed it (kernels/attention.py).
    # One helper for every recomputation, so the backward's kernels evaluate the very same expression. Padded rows and
    # columns contribute exactly zero (exp2(0 - 0) would be 1).
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    p = tl.exp2(tl.fma(qk - m[:, None], qk_scale_log2, -log_l[:, None]))  # one rounding after the exact qk - m
    return tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)


@triton.jit
def load_kv(q_base, cols, offs_d, mask_d, stride_qn, N, D, MASK_COLS: tl.constexpr):
    """K and V of the keys `cols` of one (batch, head) pair, `q_base` pointing at its q of token 0; MASK_COLS where
    some of them are past N (else only the head dim's padding is masked)."""
    if MASK_COLS:
        mask_kv = (cols < N)[:, None] & mask_d[None, :]
    else:
        mask_kv = mask_d[None, :]
    k = tl.load(q_base + D + cols[:, None] * stride_qn + offs_d[None, :], mask=mask_kv, other=0.0)
    v = tl.load(q_base + 2 * D + cols[:, None] * stride_qn + offs_d[None, :], mask=mask_kv, other=0.0)
    return k, v


@triton.jit
def _recip_ge1(y):
    """1 / y for finite y >= 1 (fp32; the Newton step makes infinity NaN). rsqrt.approx squared is within ~3e-7 of
    1 / y, which the erfc fit would amplify past 1e-6 near a = 0; one Newton step brings it to fp32 rounding."""
    r = tl.rsqrt(y)
    t = r * r
    return t + t * (1.0 - y * t)


@triton.jit
def _erfc_poly(t):
    """erfc(a) / exp(-a^2) for a >= 0, given t = 1 / (1 + P * a) (fp32)."""
    return t * (ERFC_A1 + t * (ERFC_A2 + t * (ERFC_A3 + t * (ERFC_A4 + t * ERFC_A5))))


@triton.jit
def erf(x):
    """erf(x) in fp32 to about 2e-7 absolute error."""
    a = tl.abs(x)
    q = _erfc_poly(_recip_ge1(1.0 + tl.minimum(a, ERFC_A_MAX) * ERFC_P)) * tl.exp2(a * (a * -LOG2E))  # erfc(|x|)
    return tl.where(x < 0, q - 1.0, 1.0 - q)


@triton.jit
def _normal_cdf_and_gauss(x):
    """(Phi(x), exp(-x^2 / 2)) for fp32 x. Phi comes from erfc for negative x, without the cancellation of
    1 + erf(x): its absolute error stays about 1e-7 and its relative error small where Phi(x) is tiny (exp2 flushes
    below 2^-126 on the GPU: Phi(x) = 0 for x < -13.2, where it is under 1e-38)."""
    e = tl.exp2(x * (x * (-0.5 * LOG2E)))
    t = _recip_ge1(1.0 + tl.minimum(tl.abs(x), ERFC_A_MAX) * ERFC_P_RSQRT2)
    half_q = 0.5 * _erfc_poly(t) * e  # erfc(|x| / sqrt 2) / 2 = Phi(-|x|)
    return tl.where(x < 0, half_q, 1.0 - half_q), e


@triton.jit
def gelu(x):
    """Exact (erf) GELU, x * Phi(x), as nn.GELU() computes it; x in fp32."""
    cdf, _ = _normal_cdf_and_gauss(x)
    return x * cdf


@triton.jit
def gelu_grad(x):
    """d GELU / dx = Phi(x) + x * phi(x); x in fp32. The Gaussian of phi is the one Phi's erfc already computed."""
    cdf, e = _normal_cdf_and_gauss(x)
    return cdf + x * e * INV_SQRT_2PI


@triton.jit
def sum_partials(PART, split_stride, offsets, mask, splits):
    """The fp32 sum of `splits` partial tiles at PART + s * split_stride + offsets, in split order (deterministic
    whichever program runs it). .cg loads: the partials were written by other SMs, past this SM's L1."""
    total = tl.load(PART + offsets, mask=mask, other=0.0, cache_modifier=".cg")
    for s in range(1, splits):
        total += tl.load(PART + s * split_stride + offsets, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def last_to_arrive(ARRIVED, splits):
    """Count the arrival of this program's split (one of `splits`) at its output tile, whose counter is at ARRIVED;
    True for the tile's last split, which then adds the partials up (sum_partials). The barrier first: a
    scalar atomic runs in one thread, whose release then covers every thread's stores; the atomic's acq_rel order
    publishes them before the arrival, and shows the last one everyone else's. The last leaves the counter at zero:
    Triton's autotuner launches a kernel several times on the same arguments while it times the configs, then once
    more, and each launch must count from zero."""
    tl.debug_barrier()
    last = tl.atomic_add(ARRIVED, 1, sem="acq_rel") == splits - 1
    if last:
        tl.store(ARRIVED, 0)
    return last
