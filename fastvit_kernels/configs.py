"""Every kernel's candidate configurations, in one place, and the pruning that drops what a device or an input cannot
take. The launchers in ops/ name a list and a prune function from here; tuning.py's Launcher chooses among what the
prune keeps. A prune function takes (configs, the launch's arguments by name) and returns the configs kept.
"""

import os

import torch
import triton

from ._intmath import next_pow2

# ------------------------------------------------------------------------------------------------------------------
# Shared memory
# ------------------------------------------------------------------------------------------------------------------
# Shared memory a block may use, by compute capability: sm_80 (A100) 163 KB, sm_86/89 99 KB, sm_90 (H100) 227 KB.
SMEM_BY_ARCH = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


def smem_limit(device) -> int:
    """Bytes of shared memory one block may use on `device` (a torch device, or 'sm_80'-style target names)."""
    if isinstance(device, str) and device.startswith("sm_"):
        return SMEM_BY_ARCH[int(device[3:])]
    if getattr(device, "type", None) != "cuda":
        return 1 << 30  # the interpreter has no limit
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", 0)
    return optin or SMEM_BY_ARCH.get(props.major * 10 + props.minor, 101376)


def prune_gemm_configs(a_name, b_name):
    """A prune function (configs, the launch's arguments by name -> the configs kept): drop the configs whose
    pipelined A and B tiles (stages x (BM x BK + BK x BN), in the operands' own dtypes) would not fit the device's
    shared memory, as fp32 tiles of 128 x 256 do not on an A100. The estimate is at or above what Triton allocated in
    every configuration tests/test_compile_targets.py builds (equal for 16-bit operands); the smallest config is always
    kept."""

    def prune(configs, args):
        a, b = args[a_name], args[b_name]
        limit = smem_limit(a.device)

        def need(c):
            bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
            return c.num_stages * (bm * bk * a.element_size() + bk * bn * b.element_size())

        kept = [c for c in configs if need(c) <= limit]
        return kept or [min(configs, key=need)]

    return prune


# ------------------------------------------------------------------------------------------------------------------
# The linear layers' GEMMs (ops/gemm.py)
# ------------------------------------------------------------------------------------------------------------------
GROUP_M = 8  # row blocks that share B's column blocks in L2 (grouped program order), for every GEMM here


def gemm_cfg(bm, bn, bk, warps, stages, tma=False, ws=False, flat=False):
    """tma=None: a kernel without the TMA, warp-specialisation and flattening flags (the weight gradient)."""
    kwargs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    if tma is not None:
        kwargs["USE_TMA"] = tma
        kwargs["WARP_SPEC"] = ws
        kwargs["FLATTEN"] = flat
    return triton.Config(kwargs, num_warps=warps, num_stages=stages)


# No tile here spills registers in bf16 on sm_90 (tests/test_compile_targets.py checks it): 128 x 128 x 32 with 4 warps
# hits ptxas's 255-register cap with the residual epilogue or GELU'. The 4-warp tiles with 3 stages fit two blocks per
# SM, so one block's epilogue overlaps the other's main loop: with K = 384 (qkv, fc1) a block has only 6 K steps to
# hide it behind. The TMA tiles come first, so that the interpreter's tests and FASTVIT_AUTOTUNE=0 run them wherever
# the operands allow (the first config is the one those launch).
LINEAR_FWD_CONFIGS = [
    gemm_cfg(128, 128, 64, 8, 3, tma=True),
    gemm_cfg(128, 64, 64, 4, 4, tma=True),
    gemm_cfg(64, 128, 64, 4, 4, tma=True),
    gemm_cfg(128, 128, 64, 8, 3),
    gemm_cfg(128, 64, 64, 4, 4),
    gemm_cfg(64, 128, 64, 4, 4),
    gemm_cfg(64, 64, 64, 4, 4),
    gemm_cfg(128, 64, 64, 4, 3),
    gemm_cfg(64, 128, 64, 4, 3),
    # 128 x 256: a K step reads 48 KB for 128 x 256 outputs where 128 x 128 reads 32 KB for half as many, and at
    # K = 384 the GEMMs are bound by that traffic from L2 (H100, 2026-11-27, GPU time: our 128 x 128 tiles moved ~5.6
    # TB/s for qkv, fc1 and proj, cuBLAS's ~5.9 for qkv and fc1 as 128 x 256 tiles would): qkv's and fc1's A tiles are
    # read 4.5 and 6 times instead of 9 and 12. One block per SM (sm_90, bf16, compiled offline, triton 3.6 / 3.8,
    # the epilogue in two halves: 168-240 registers by epilogue, no stack; 144 KB), so nothing hides the epilogue but
    # FLATTEN (168-230 registers, no stack; 176 KB, 208 KB with the fp32 residual, which it pipelines too).
    gemm_cfg(128, 256, 64, 8, 3, tma=True),
    gemm_cfg(128, 256, 64, 8, 3, tma=True, flat=True),
    # warp-specialised: Triton adds warps of its own for the loads and the MMAs (12 in all, registers rebalanced by
    # setmaxnreg; sm_90, triton 3.6 and 3.8, compiled offline: 168 registers a thread, at most 8 B of stack, one block
    # per SM; 128 x 128 spills 24 B with fc1's GELU epilogue under triton 3.8 and is not offered). Never run on a GPU
    # yet: offered only with FASTVIT_WARP_SPEC=1 (warp_spec_on), which the GPU check sets once their tests pass there.
    gemm_cfg(128, 64, 64, 4, 4, tma=True, ws=True),
    gemm_cfg(64, 128, 64, 4, 4, tma=True, ws=True),
]
# The persistent TMA tiles launch up to this many programs per SM. Two fit wherever the 4-warp tiles and 128 x 128
# with 8 warps stay under 128 registers (bf16, sm_90, compiled offline: fc1's GELU 99-109 and qkv's 95-106 in
# inference; 142 with the pre-activation stored, 146 with the fp32 residual: one fits, and the second program waits
# for the first to finish, as the grid's second wave). One program per SM left every tile's epilogue and its next
# tile's pipeline fill exposed, where the pointer-load tiles run two blocks per SM (H100, 2026-11-27: the tuner kept
# the cp.async tiles for qkv and fc1).
TMA_PROGRAMS_PER_SM = 2
# 128 x 64 and 64 x 64 with 4 warps serialise every wgmma of the weight gradient under ptxas 12.9 (triton 3.8, C7515,
# compiled offline); the tuner kept 64 x 128 for every weight gradient on the H100 (2026-11-26).
LINEAR_DW_CONFIGS = [gemm_cfg(*c, tma=None) for c in ((128, 128, 64, 8, 3), (64, 128, 64, 4, 4))]

_linear_smem = prune_gemm_configs("A", "B")


def _serialised(cfg, epilogue, res) -> bool:
    """The tile whose wgmma ptxas 12.8 (triton 3.6, the lent GPUs') serialises, C7515 compiled offline: 128 x 128
    with 8 warps and pointer loads when the epilogue adds an fp32 residual (proj and fc2 under autocast)."""
    tile = (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, bool(cfg.kwargs.get("USE_TMA")))
    return epilogue == "residual" and res is not None and res.element_size() == 4 and tile == (128, 128, 8, False)


def _tma_where_ok(configs, args):
    """The configs without the TMA ones unless the operands allow descriptors (TMA_OK) and FASTVIT_TMA is not 0 (the
    benchmarks' A/B switch: the pointer-load tiles alone)."""
    if not args.get("TMA_OK", False) or os.environ.get("FASTVIT_TMA", "1") == "0":
        return [c for c in configs if not c.kwargs.get("USE_TMA")]
    return configs


def warp_spec_on() -> bool:
    """FASTVIT_WARP_SPEC=1 offers the tuner the warp-specialised GEMM tiles (off by default until measured)."""
    return os.environ.get("FASTVIT_WARP_SPEC", "0") == "1"


def flatten_on() -> bool:
    """FASTVIT_FLATTEN=0 leaves out the tiles whose tile and K loops are pipelined as one (FLATTEN; their tests passed
    on an H200, 2026-11-27); the GPU check sets it if their tests fail there."""
    return os.environ.get("FASTVIT_FLATTEN", "1") != "0"


def prune_linear_fwd(configs, args):
    """Shared memory as for every GEMM; the TMA tiles where _tma_where_ok keeps them; the warp-specialised ones where
    warp_spec_on, the flattened ones where flatten_on; no tile that ptxas serialises."""
    configs = _tma_where_ok(configs, args)
    if not warp_spec_on():
        configs = [c for c in configs if not c.kwargs.get("WARP_SPEC")]
    if not flatten_on():
        configs = [c for c in configs if not c.kwargs.get("FLATTEN")]
    configs = [c for c in configs if not _serialised(c, args.get("EPILOGUE"), args.get("RES"))]
    return _linear_smem(configs, args)


prune_linear_dw = prune_gemm_configs("G", "X")


# The full-row GEMM with the next LayerNorm in its epilogue (kernels/gemm_layernorm.py): a 64-row tile holds up to
# four 128-column fp32 accumulators (96 registers a thread for D = 384 with 8 warps), so BLOCK_M stays 64 and the
# warps 8; the configurations differ in how deep the K pipeline is. The last one fits fp32 operands.
# The TMA variants come after the pointer ones (the tests and FASTVIT_AUTOTUNE=0 take the first): 158 SASS
# instructions per 64-wide K step against 185 (sm_90, D = 384, compiled offline), for fc2's 24 K steps per tile.
LINEAR_LN_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_K": bk, "USE_TMA": tma}, num_warps=8, num_stages=stages)
    for bk, stages, tma in (
        (64, 3, False),
        (32, 4, False),
        (64, 2, False),
        (16, 2, False),
        (64, 3, True),
        (32, 4, True),
    )
]


def prune_linear_ln(configs, args):
    """Shared memory: stages x (A's 64 x BLOCK_K tile + B's BLOCK_K x (N_CHUNKS x BLOCK_N) tile); the TMA configs
    where _tma_where_ok keeps them."""
    configs = _tma_where_ok(configs, args)
    a, row = args["A"], args["N_CHUNKS"] * args["BLOCK_N"]
    limit = smem_limit(a.device)

    def need(c):
        return c.num_stages * c.kwargs["BLOCK_K"] * (c.kwargs["BLOCK_M"] + row) * a.element_size()

    kept = [c for c in configs if need(c) <= limit]
    return kept or [min(configs, key=need)]


def row_pipeline_on() -> bool:
    """FASTVIT_ROW_PIPELINE=0 leaves out the configs whose row loops pipeline their loads (LOAD_STAGES > 1: the
    LayerNorm backward's and the column sums', new since the last GPU run): the GPU check sets it if they fail there."""
    return os.environ.get("FASTVIT_ROW_PIPELINE", "1") != "0"


# The column sums beside cuBLAS's weight gradient (kernels/reduce.py): strips of COLUMN_SUM_BLOCK_N columns (the
# grid, and so the partial rows, do not depend on the config), row blocks of BLOCK_R with LOAD_STAGES - 1 ahead in
# flight; programs COLUMN_SUM_PROGRAMS_PER_SM an SM in all.
COLUMN_SUM_BLOCK_N = 128
COLUMN_SUM_PROGRAMS_PER_SM = 4
COLUMN_SUM_CONFIGS = [
    triton.Config({"BLOCK_R": 32, "LOAD_STAGES": 3}, num_warps=4),
    triton.Config({"BLOCK_R": 64, "LOAD_STAGES": 3}, num_warps=4),
    triton.Config({"BLOCK_R": 32, "LOAD_STAGES": 1}, num_warps=4),
]


def prune_column_sum(configs, args):
    """The pipelined configs where row_pipeline_on."""
    return [c for c in configs if row_pipeline_on() or c.kwargs["LOAD_STAGES"] == 1]


# The casts of a step plan's batches (kernels/cast.py): CAST_BLOCK elements a program, one config for every size (a
# copy: its speed is its bytes').
CAST_BLOCK = 4096
CAST_WARPS = 4


def cast_kernel_on() -> bool:
    """FASTVIT_CAST_KERNEL=0 runs the step plans' batched casts through torch._foreach_copy_ instead of our kernel
    (new since the last GPU run: the GPU check sets it if the kernel's tests or memcheck fail there)."""
    return os.environ.get("FASTVIT_CAST_KERNEL", "1") != "0"


# ------------------------------------------------------------------------------------------------------------------
# Attention (ops/fused_attention.py)
# ------------------------------------------------------------------------------------------------------------------
def _attention_cfg(bm, bn, warps, stages, maxnreg=None, whole=None, tail=0, row_tail=0):
    """whole: the forward's WHOLE flag (True or False); None for the backward kernels, which have none. tail: TAIL,
    the width of a last partial block of at most that many keys (queries, in the dK/dV kernel's loop), or a WHOLE
    tile's rows past BLOCK_M. row_tail: the forward's ROW_TAIL, a pair's last rows (at most that many past a full
    block) taken by that block's program."""
    kwargs = {"BLOCK_M": bm, "BLOCK_N": bn, "TAIL": tail}
    if whole is not None:  # the forward's
        kwargs["WHOLE"] = whole
        kwargs["ROW_TAIL"] = row_tail
    return triton.Config(kwargs, num_warps=warps, num_stages=stages, maxnreg=maxnreg)


def whole_programs_per_sm(block: int, tail: int = 0) -> int:
    """Persistent forward programs per SM for a WHOLE tile: as many as fit at once (sm_90, bf16, head dim 64,
    compiled offline: the 128-row tile with 8 warps takes 189-254 registers, one block per SM; the 64-row tile with 4
    warps 167, three blocks; with a 16-row tail 190 (two stages) or 255 (three), two blocks), so that no program
    waits for another to finish before it starts."""
    if block >= 128:
        return 1
    return 2 if tail else 3


# Short sequences are the normal case (65 tokens for CIFAR-10, 197 for ImageNet): small tiles keep N = 65 from
# paying for a 128 x 128 tile of padding, and the tuner's key holds N so each length picks its own.
# At N = 65 the forward is memory-latency bound (5x above its byte floor on an H200): the 64 x 64 tile capped at 128
# registers (ptxas: 128, no stack, bf16, head dim 64; 134 uncapped) fits 4 blocks per SM instead of 3, more loads in
# flight. Offered to the tuner; at N = 65 (B = 512, H = 6) the H200 took the WHOLE 64 + 16 tile over it (2026-11-27).
# WHOLE: where the sequence fits one tile (N <= 128: CIFAR-10's 65), one tile per (batch, head) pair and persistent
# programs whose loop keeps the next pairs' loads in flight (issue: attention at ViT lengths is memory-latency bound).
# With a tail (64 < N <= 80: CIFAR-10's 65 = 64 + 1), the rows past 64 in a 16-row tile: 80 x 80 scores a pair
# instead of the 128-row tile's 128 x 128, at 5,970 SASS instructions a pair against 8,780 (sm_90, triton 3.8).
# The tuner's choice at N = 65 on an H100 and an H200 (0.048 / 0.046 ms, 1.16-1.22x cuDNN, 2026-11-27); first in
# the list so that the tests and FASTVIT_AUTOTUNE=0 run them wherever they apply.
# tail=16 on a query-block tile: a last key block of at most 16 keys (197 = 3 x 64 + 5) runs 16 wide. Given only to
# the tiles where it costs no block per SM and no spill (sm_90, bf16, head dim 64, triton 3.6 / 3.8: 64 x 64
# 131 / 134 -> 131 / 132 registers, 128 x 64 141 / 131 -> 147 / 127; the 64 x 32 tile would go from 5 blocks per SM to
# 4 with 3.8 for 16 columns of 32 saved).
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
    _attention_cfg(64, 64, 4, 3, maxnreg=128, whole=False, tail=16),
]
# The last: N <= 128 (CIFAR-10's 65) in one 128 x 128 tile per (batch, head) pair for dK/dV, where 64-row tiles take
# two (the second one row deep at N = 65). Single-stage: one Q/dO block per pair leaves nothing to pipeline. sm_90,
# bf16, head dim 64, compiled offline: 255 registers, no spill, no C7515 (two stages serialise its wgmma). At N = 65
# the H200 took 64 x 32 with a 16-wide tail over it (2026-11-27).
# tail=16: a last block of at most 16 queries (dK/dV) or keys (dQ) runs 16 wide: at N = 65 with the 64 x 32 tiles the
# H100 kept, dK/dV sweeps 80 query rows instead of 128. Given where it costs no block per SM and no spill in triton
# 3.6 (the lent GPUs') and 3.8 (sm_90, bf16, head dim 64; 3.6: dK/dV 64 x 32 140 -> 142 registers, 64 x 64 222 -> 241
# (two blocks either way), 128 x 64 192 -> 250 and its C7515 gone). dQ keeps it on 128 x 64 only: with 3.6 its 64 x 32
# and 64 x 64 tiles lose a block per SM (114 -> 146, 128 -> 157 registers) for 16 columns of 96 or 128.
ATTENTION_BWD_DKDV_CONFIGS = [
    _attention_cfg(64, 64, 4, 2, tail=16),
    _attention_cfg(32, 32, 4, 2),
    _attention_cfg(32, 64, 4, 2),
    _attention_cfg(64, 32, 4, 2, tail=16),
    _attention_cfg(16, 32, 4, 2),
    _attention_cfg(128, 64, 8, 2, tail=16),
    _attention_cfg(128, 128, 8, 1),
]
# dQ has no whole-pair tile: one (64 + 16 rows, delta and dQ from one P and one dP) read shared memory out of range in
# a wgmma on the H100 with triton 3.6 (compute-sanitizer, 2026-11-27; benchmarks/NOTES.md, session 9).
ATTENTION_BWD_DQ_CONFIGS = [  # the dK/dV tiles, in the same order (the tests pair them)
    _attention_cfg(64, 64, 4, 2),
    _attention_cfg(32, 32, 4, 2),
    _attention_cfg(32, 64, 4, 2),
    _attention_cfg(64, 32, 4, 2),
    _attention_cfg(16, 32, 4, 2),
    _attention_cfg(128, 64, 8, 2, tail=16),
    _attention_cfg(128, 128, 8, 1),
]
ATTENTION_FALLBACK_CONFIG = _attention_cfg(16, 16, 4, 1)  # fits any head dim <= 256 in fp32 on sm_80 and sm_90
ATTENTION_SMEM_BUDGET = 160 * 1024  # under sm_80's 164 KB and sm_90's 228 KB per block


def _attention_smem(cfg, block_d, elem):
    # pipelined K/V (or Q/dO) tiles per stage plus the resident tile (WHOLE: q, k and v per stage); checked against
    # the compiler's own numbers by tests/test_compile_targets.py
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    if cfg.kwargs.get("WHOLE"):
        return cfg.num_stages * 3 * (bm + cfg.kwargs["TAIL"]) * block_d * elem
    return (cfg.num_stages * 2 * max(bm, bn) + min(bm, bn) + cfg.kwargs.get("ROW_TAIL", 0)) * block_d * elem


def prune_attention(configs, args):
    # fp32 with big head dims: the tiles outgrow shared memory, so only the smaller ones stay
    block_d = args["BLOCK_D"]
    elem = args["QKV"].element_size()
    kept = [c for c in configs if _attention_smem(c, block_d, elem) <= ATTENTION_SMEM_BUDGET]
    # a WHOLE tile must hold the sequence, and its tail must hold some of it (else a tail-less tile does the same
    # work); N is unknown when the compile check asks: keep them all
    n = args.get("N")
    kept = [c for c in kept if not c.kwargs.get("WHOLE") or (whole_attention_on() and (n is None or _whole_fits(c, n)))]
    kept = [c for c in kept if not c.kwargs["TAIL"] or tail_attention_on()]
    # a row tail must have rows to take (else the tile without it does the same work)
    kept = [c for c in kept if n is None or _row_tail_fits(c, n)]
    # a register cap fits 16-bit tiles of head dim <= 64 only; wider heads and fp32 tiles would spill under it
    kept = [c for c in kept if c.maxnreg is None or (elem == 2 and block_d <= 64)]
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


# ------------------------------------------------------------------------------------------------------------------
# Patch embedding (ops/fused_patch_embed.py)
# ------------------------------------------------------------------------------------------------------------------
def _patch_cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# K = C * ph * pw is 48 for CIFAR-10 (3 x 4 x 4) and 768 for /16 patches: BLOCK_K 32/64 covers both without
# padding a 48-wide K to 128.
# (128 x 256 x 64 spilled registers in bf16 on sm_90 and was dropped; tests/test_compile_targets.py checks the rest.)
PATCH_EMBED_FWD_CONFIGS = [
    _patch_cfg(128, 128, 64, 8, 3),
    _patch_cfg(128, 64, 32, 4, 3),
    _patch_cfg(64, 128, 32, 4, 3),
    _patch_cfg(64, 64, 64, 4, 3),
    _patch_cfg(128, 128, 32, 8, 3),
]
PATCH_EMBED_BWD_CONFIGS = [
    _patch_cfg(64, 64, 64, 4, 3),
    _patch_cfg(128, 64, 64, 4, 3),
    _patch_cfg(64, 128, 64, 4, 3),
    _patch_cfg(128, 128, 64, 8, 3),
]

prune_patch_embed_fwd = prune_gemm_configs("IMG", "W")
prune_patch_embed_dw = prune_gemm_configs("G", "IMG")
prune_patch_embed_dx = prune_gemm_configs("G", "W")


# ------------------------------------------------------------------------------------------------------------------
# LayerNorm row kernels (ops/layernorm.py)
# ------------------------------------------------------------------------------------------------------------------
def row_kernel_params(D, elems, max_rows):
    """(BLOCK_M, BLOCK_D, num_warps) for the row kernels, which hold BLOCK_M whole rows in registers.

    BLOCK_M * BLOCK_D is about `elems`, spread so that each thread holds at most 16 elements per row tensor: the
    LayerNorm backward keeps five such tensors live, and with a fixed 4 warps it spilled (ptxas: 8192 elements per
    program at D = 768, 40 B of stack on sm_90; 16 KB at D = 8192).
    """
    block_d = next_pow2(D)
    block_m = max(1, min(max_rows, elems // block_d))
    warps = min(16, max(4, block_m * block_d // (32 * 16)))
    return block_m, block_d, warps


LAYERNORM_FWD_PARAMS = dict(elems=4096, max_rows=16)  # three live row tensors: 16 rows of D = 256, 4 of D = 1024


# The LayerNorm backward (kernels/layernorm.py): BLOCK_M rows of next_pow2(D) columns a step, LOAD_STAGES - 1 row
# blocks of loads in flight ahead of it. Registers limit the rows an SM holds (sm_90, triton 3.6, D = 384, bf16 dy,
# fp32 x, dres and dx, compiled offline): 8 rows with 8 warps, unpipelined (what ran before) take 128 registers, two
# programs an SM, 16 rows; 2 rows with 2 warps and three stages 128 registers and 20 KB, eight programs, 16 rows
# computing and 32 loading; 1 row with 2 warps 80 registers, twelve programs. The tuner times those that keep 4 to 16
# elements a thread (more spills; fewer wastes the warps), first the one the interpreter and FASTVIT_AUTOTUNE=0 run.
def _ln_bwd_cfg(rows, warps, stages):
    return triton.Config({"BLOCK_M": rows, "LOAD_STAGES": stages}, num_warps=warps)


LAYERNORM_BWD_CONFIGS = [
    _ln_bwd_cfg(8, 8, 1),
    _ln_bwd_cfg(4, 8, 1),
    _ln_bwd_cfg(2, 2, 3),
    _ln_bwd_cfg(2, 4, 3),
    _ln_bwd_cfg(1, 2, 3),
    _ln_bwd_cfg(1, 4, 3),
    _ln_bwd_cfg(1, 8, 1),
    _ln_bwd_cfg(1, 16, 1),
]
LAYERNORM_BWD_PROGRAMS_PER_SM = 12  # persistent programs: at least as many as the smallest config fits an SM


def _ln_bwd_elems(cfg, block_d) -> float:
    """Elements of one row tensor a thread holds."""
    return cfg.kwargs["BLOCK_M"] * block_d / (32 * cfg.num_warps)


def prune_layernorm_bwd(configs, args):
    """The configs holding 4 to 16 elements of a row tensor a thread (at most 16 where D is too small for 4) whose
    pipelined loads fit the device's shared memory; the pipelined ones where row_pipeline_on."""
    if not row_pipeline_on():
        configs = [c for c in configs if c.kwargs["LOAD_STAGES"] == 1]
    block_d = args["BLOCK_D"]
    loaded = sum(args[t].element_size() for t in ("DY", "X", "DRES") if args.get(t) is not None)  # a row's bytes
    limit = smem_limit(args["X"].device)
    fits = [
        c
        for c in configs
        if _ln_bwd_elems(c, block_d) <= 16
        and (c.kwargs["LOAD_STAGES"] - 1) * c.kwargs["BLOCK_M"] * block_d * loaded <= limit
    ]
    kept = [c for c in fits if _ln_bwd_elems(c, block_d) >= 4] or fits
    return kept or [min(configs, key=lambda c: _ln_bwd_elems(c, block_d))]
