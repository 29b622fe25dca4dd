"""The attention kernels' configurations (ops/fused_attention.py)."""

import os

import triton


def _attention_cfg(bm, bn, warps, stages, whole=None, tail=0, row_tail=0):
    """whole: the forward's WHOLE flag (True or False); None for the backward kernels, which have none. tail: TAIL,
    the width of a last partial block of at most that many keys (queries, in the dK/dV kernel's loop), or a WHOLE
    tile's rows past BLOCK_M. row_tail: the forward's ROW_TAIL, a pair's last rows (at most that many past a full
    block) taken by that block's program."""
    kwargs = {"BLOCK_M": bm, "BLOCK_N": bn, "TAIL": tail}
    if whole is not None:  # the forward's
        kwargs["WHOLE"] = whole
        kwargs["ROW_TAIL"] = row_tail
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


def whole_programs_per_sm(block: int) -> int:
    """Persistent forward programs per SM for a WHOLE tile: as many as fit at once, so that no program waits for
    another to finish before it starts. sm_90, bf16, head dim 64, triton 3.6, compiled offline as a GPU runs it (the
    row width D divisible by 16): the 128-row tile with 8 warps takes 175-205 registers, one block an SM; the 64-row
    tile with 4 warps and a 16-row tail 205-211, two blocks; without the tail 126 registers but 80 KB of shared
    memory (three stages of q, k and v), two blocks."""
    return 1 if block >= 128 else 2


# Short sequences are the normal case (65 tokens for CIFAR-10, 197 for ImageNet): small tiles keep N = 65 from
# paying for a 128 x 128 tile of padding, and the tuner's key holds N so each length picks its own.
# At N = 65 the forward is memory-latency bound (5x above its byte floor on an H200).
# WHOLE: where the sequence fits one tile (N <= 128: CIFAR-10's 65), one tile per (batch, head) pair and persistent
# programs whose loop keeps the next pairs' loads in flight (issue: attention at ViT lengths is memory-latency bound).
# With a tail (64 < N <= 80: CIFAR-10's 65 = 64 + 1), the rows past 64 in a 16-row tile: 80 x 80 scores a pair
# instead of the 128-row tile's 128 x 128, at 5,970 SASS instructions a pair against 8,780 (sm_90, triton 3.8).
# The tuner's choice at N = 65 on an H100 and an H200 (0.048 / 0.046 ms, 1.16-1.22x cuDNN, 2026-11-27); first in
# the list so that the tests and FASTVIT_AUTOTUNE=0 run them wherever they apply.
# tail=16 on a query-block tile: a last key block of at most 16 keys (197 = 3 x 64 + 5) runs 16 wide. Given only to
# the tiles where it costs no block per SM and no spill (sm_90, bf16, head dim 64, compiled as a GPU runs them, the
# row width D divisible by 16: 64 x 64 with it 124 / 121 registers in triton 3.6 / 3.8, four blocks an SM; 128 x 64
# 118 / 119, two; the 64 x 32 tile would lose a block per SM for 16 columns of 32 saved).
# row_tail=16: where a pair's last query block would hold at most 16 rows (197 = 3 x 64 + 5), the last full block's
# program also takes them, against the K/V it loads anyway: at N = 197 three programs a pair instead of four. The
# fourth computed a 64-row tile for 5 rows and read all of the pair's K and V from L2 again; the query-block tiles
# read K/V once per block, ~440 MB from L2 at ViT-B/16's shape (B = 128, H = 12), near the H100's L2 rate at the
# 0.088 ms measured (2026-11-27). Ahead of the tile without it: FASTVIT_AUTOTUNE=0 and the tests take it where it
# applies.
ATTENTION_FWD_CONFIGS = [
    _attention_cfg(64, 64, 4, 2, whole=True, tail=16),
    _attention_cfg(64, 64, 4, 3, whole=True, tail=16),
    _attention_cfg(128, 128, 8, 3, whole=True),
    _attention_cfg(64, 64, 4, 3, whole=True),
    _attention_cfg(128, 128, 8, 2, whole=True),
    _attention_cfg(64, 64, 4, 3, whole=False, tail=16, row_tail=16),
    _attention_cfg(64, 64, 4, 3, whole=False, tail=16),
    _attention_cfg(32, 32, 4, 2, whole=False),
    _attention_cfg(32, 64, 4, 3, whole=False),
    _attention_cfg(64, 32, 4, 3, whole=False),
    _attention_cfg(128, 64, 8, 3, whole=False, tail=16),
    _attention_cfg(128, 32, 8, 3, whole=False),
    _attention_cfg(16, 32, 4, 2, whole=False),
]
# The last: N <= 128 (CIFAR-10's 65) in one 128 x 128 tile per (batch, head) pair for dK/dV, where 64-row tiles take
# two (the second one row deep at N = 65). Single-stage: one Q/dO block per pair leaves nothing to pipeline. sm_90,
# bf16, head dim 64, compiled offline: 255 registers, no spill, no C7515 (two stages serialise its wgmma). At N = 65
# the H200 took 64 x 32 with a 16-wide tail over it (2026-11-27).
# tail=16: a last block of at most 16 queries (dK/dV) or keys (dQ) runs 16 wide: at N = 65 with the 64 x 32 tiles the
# H100 kept, dK/dV sweeps 80 query rows instead of 128. Given where it costs no block per SM and no spill in triton
# 3.6 (the lent GPUs'), compiled as a GPU runs them (sm_90, bf16, head dim 64, the row width D divisible by 16):
# dK/dV 64 x 32 142 -> 166 registers (three blocks either way; with 3.8 128 -> 166, four blocks to three), 64 x 64
# 240 -> 242 (two), 128 x 64 186 -> 216 (one); dQ 64 x 32 95 -> 96 (five), 64 x 64 142 -> 142 (three), 128 x 64
# 128 -> 132 (one). At N = 65 the dQ tiles then sweep 80 keys instead of 96 (64 x 32) or 128 (64 x 64). (Compiled
# with D's alignment unknown, as the compile check did before 2026-11-28, dQ's 64-row tiles seemed to lose a block.)
DKDV_WHOLE_PAIR = _attention_cfg(128, 128, 8, 1)
ATTENTION_BWD_DKDV_CONFIGS = [
    _attention_cfg(64, 64, 4, 2, tail=16),
    _attention_cfg(32, 32, 4, 2),
    _attention_cfg(32, 64, 4, 2),
    _attention_cfg(64, 32, 4, 2, tail=16),
    _attention_cfg(16, 32, 4, 2),
    _attention_cfg(128, 64, 8, 2, tail=16),
    DKDV_WHOLE_PAIR,
]
# dQ has no whole-pair tile: one (64 + 16 rows, delta and dQ from one P and one dP) read shared memory out of range in
# a wgmma on the H100 with triton 3.6 (compute-sanitizer, 2026-11-27; benchmarks/NOTES.md, session 9).
ATTENTION_BWD_DQ_CONFIGS = [  # the dK/dV tiles, in the same order (the tests pair them)
    _attention_cfg(64, 64, 4, 2, tail=16),
    _attention_cfg(32, 32, 4, 2),
    _attention_cfg(32, 64, 4, 2),
    _attention_cfg(64, 32, 4, 2, tail=16),
    _attention_cfg(16, 32, 4, 2),
    _attention_cfg(128, 64, 8, 2, tail=16),
    _attention_cfg(128, 128, 8, 1),
]
ATTENTION_FALLBACK_CONFIG = _attention_cfg(16, 16, 4, 1)  # fits any head dim <= 256 in fp32 on sm_80 and sm_90
# The smallest key block of a pair the dK/dV kernel may cut: each block leaves a partial row of the qkv bias gradient
# (attention_bwd's bias rows), laid out for the most blocks there may be.
ATTENTION_BWD_MIN_BLOCK = min(c.kwargs["BLOCK_N"] for c in (*ATTENTION_BWD_DKDV_CONFIGS, ATTENTION_FALLBACK_CONFIG))
ATTENTION_SMEM_BUDGET = 160 * 1024  # under sm_80's 164 KB and sm_90's 228 KB per block


def _attention_smem(cfg, block_d, elem, rows=False):
    # pipelined K/V (or Q/dO) tiles per stage plus the resident tile (WHOLE: q, k and v per stage); with the qkv bias
    # rows (dK/dV), a K-sized tile twice more for their two products' operands (sm_90, bf16, head dim 256, the 64 x 64
    # tile: 246 KB compiled, past the 228 KB a block may have); checked against the compiler's own numbers by
    # tests/test_compile_targets.py
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    if cfg.kwargs.get("WHOLE"):
        return cfg.num_stages * 3 * (bm + cfg.kwargs["TAIL"]) * block_d * elem
    tiles = cfg.num_stages * 2 * max(bm, bn) + min(bm, bn) + cfg.kwargs.get("ROW_TAIL", 0) + (2 * bn if rows else 0)
    return tiles * block_d * elem


def prune_attention(configs, args):
    # fp32 with big head dims: the tiles outgrow shared memory, so only the smaller ones stay
    block_d = args["BLOCK_D"]
    elem = args["QKV"].element_size()
    rows = args.get("COLSUM") is not None
    kept = [c for c in configs if _attention_smem(c, block_d, elem, rows) <= ATTENTION_SMEM_BUDGET]
    # a WHOLE tile must hold the sequence, and its tail must hold some of it (else a tail-less tile does the same
    # work); N is unknown when the compile check asks: keep them all
    n = args.get("N")
    kept = [c for c in kept if not c.kwargs.get("WHOLE") or (whole_attention_on() and (n is None or _whole_fits(c, n)))]
    kept = [c for c in kept if not c.kwargs["TAIL"] or tail_attention_on()]
    # a row tail must have rows to take (else the tile without it does the same work)
    kept = [c for c in kept if n is None or _row_tail_fits(c, n)]
    # the whole-pair dK/dV tile is at the register file's limit (255) without the qkv bias rows and spills with them
    # (sm_90, bf16, head dim 64, triton 3.8: 24 B)
    if rows:
        kept = [c for c in kept if c is not DKDV_WHOLE_PAIR]
    return kept or [ATTENTION_FALLBACK_CONFIG]


def row_blocks(n: int, block: int, row_tail: int) -> int:
    """The query blocks of a pair (kernels/common.py's row_blocks): cdiv(n, block), one fewer where the last partial
    block has at most row_tail rows after a full block, which takes them."""
    rem = n % block
    return -(-n // block) - (0 < rem <= row_tail and n > block)


def _row_tail_fits(cfg, n: int) -> bool:
    block, row_tail = cfg.kwargs["BLOCK_M"], cfg.kwargs.get("ROW_TAIL", 0)
    return not row_tail or row_blocks(n, block, row_tail) * block < n


def _whole_fits(cfg, n: int) -> bool:
    block, tail = cfg.kwargs["BLOCK_M"], cfg.kwargs["TAIL"]
    return n <= block + tail and (not tail or n > block)


def whole_attention_on() -> bool:
    """FASTVIT_ATTN_WHOLE=0 leaves out the one-tile (WHOLE) attention paths: the A/B switch of the benchmarks."""
    return os.environ.get("FASTVIT_ATTN_WHOLE", "1") != "0"


def tail_attention_on() -> bool:
    """FASTVIT_ATTN_TAIL=0 leaves out the tiles with a 16-wide last block (TAIL): with FASTVIT_ATTN_WHOLE=0, the tiles
    the H100 ran in 2026-11-26's check, which the GPU check falls back to when the attention tests fail there."""
    return os.environ.get("FASTVIT_ATTN_TAIL", "1") != "0"
