"""The GEMMs' configurations: the linear layers' (ops/gemm.py), the full-row GEMM with the next LayerNorm, the
patch embedding's (ops/fused_patch_embed.py).
"""

import os

import triton

from ..kernels.gemm_epilogue import epilogue_parts, second_tile, stores_pre
from .memory import prune_gemm_configs, smem_limit

GROUP_M = 8  # row blocks that share B's column blocks in L2 (grouped program order), for every GEMM here


def gemm_cfg(bm, bn, bk, warps, stages, tma=False, ws=False, flat=False, epi=False, behind=0, maxnreg=None):
    """tma=None: a kernel without the TMA, warp-specialisation, flattening, epilogue-descriptor and GELU-behind flags
    (the weight gradient). behind: GELU_BEHIND's chunks a K step (0: off); maxnreg: ptxas's register cap."""
    kwargs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
    if tma is not None:
        kwargs["USE_TMA"] = tma
        kwargs["WARP_SPEC"] = ws
        kwargs["FLATTEN"] = flat
        kwargs["EPI_TMA"] = epi
        kwargs["GELU_BEHIND"] = behind
    return triton.Config(kwargs, num_warps=warps, num_stages=stages, maxnreg=maxnreg)


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
    # 128 x 128 flattened: the next tile's first loads under this tile's epilogue at two blocks an SM, where the
    # 128 x 256 one runs one. Two stages: flattening adds one (96 KB, as the unflattened three-stage tile; with three,
    # 128 KB and one block). sm_90, bf16, compiled offline (triton 3.8 / 3.6): GELU 101 / 121 registers, qkv's 114 /
    # 112, no stack; with the residual or GELU' in the epilogue 162-238 and one block, where the descriptor epilogues
    # below run two: not offered there (_held_in_two_blocks). Flattened, ptxas waits for each wgmma before the next
    # (wait depth 0 against 1): the other block's warps are what keep the tensor cores fed.
    gemm_cfg(128, 128, 64, 8, 2, tma=True, flat=True),
    # warp-specialised: Triton adds warps of its own for the loads and the MMAs (12 in all, registers rebalanced by
    # setmaxnreg; sm_90, triton 3.6 and 3.8, compiled offline: 168 registers a thread, at most 8 B of stack, one block
    # per SM). Offered only with FASTVIT_WARP_SPEC=1 (warp_spec_on), which the GPU check sets once their tests pass
    # there; the tuner kept other tiles for every CIFAR-10 GEMM (H100, 2026-11-27: fc1 0.162 and 0.244 ms against
    # 0.119). 128 x 128, whose one MMA warpgroup holds the whole tile, spilled 24 B under triton 3.8 when this list
    # was made; it compiles without a stack now (3.6 and 3.8) and is offered. Never with a descriptor epilogue:
    # triton 3.6 fails to compile it (PassManager::run failed, 2026-11-28).
    gemm_cfg(128, 64, 64, 4, 4, tma=True, ws=True),
    gemm_cfg(64, 128, 64, 4, 4, tma=True, ws=True),
    gemm_cfg(128, 128, 64, 4, 3, tma=True, ws=True),
    # the epilogue through tensor descriptors too (EPI_TMA: C stored, the residual or the pre-activation loaded by the
    # copy engine, staged in shared memory one 64-column half at a time), offered where the epilogue reads or writes
    # a second tile (_second_tile). Compiled offline (sm_90, bf16 operands, triton 3.8 / 3.6): the fp32 residual
    # 96-119 registers where the pointer epilogue takes 198-226, its instructions after the K loop 298-447 a warp
    # against 721-796; GELU with the pre-activation stored (fc1 in training) 128 x 128 98 / 106 registers against
    # 140, GELU' (fc2's dX) 112 / 116 against 155: two blocks an SM instead of one. With nothing but C (GELU in
    # inference, qkv) about as through pointers (101 registers, 1,455 instructions a warp against 1,511; qkv 265
    # against 323), so not offered there: each candidate costs its compile and timing at a shape's first call. 16-64 KB
    # of staging: 128 x 128 with the fp32 residual takes 128 KB (one block an SM), the 4-warp tiles 88-112 KB (two).
    # With two stages the 128 x 128 residual tile takes 96 KB (119 registers, triton 3.6): two blocks an SM, for the
    # residual GEMMs whose K steps load from L2 at the rate it serves (fc2: 64 x 128 tiles read 24 KB a K step for half
    # the outputs 128 x 128 reads 32 KB for; 0.92 GB from L2 at the 0.116 ms measured, ~7.9 TB/s, H100 2026-11-27).
    gemm_cfg(128, 128, 64, 8, 3, tma=True, epi=True),
    gemm_cfg(128, 128, 64, 8, 2, tma=True, epi=True),
    gemm_cfg(128, 64, 64, 4, 3, tma=True, epi=True),
    gemm_cfg(64, 128, 64, 4, 4, tma=True, epi=True),
    # GELU one tile behind (kernels/gemm_gelu_behind.py), offered for the "gelu" and "gelu_grad" epilogues: a tile's
    # pre-activation is stored, and its GELU computed during the program's next tile's main loop, a 16-row chunk a
    # K step, loaded a step ahead. fc1's 128 x 128 tile (the H200's pick, 2026-11-28: 0.112 ms against cuBLAS's bare
    # 0.069) spends ~1,500 SASS instructions a warp on its epilogue after a main loop of 6 x 75, and its K steps wait
    # on L2 (~32 KB a step a block, two blocks an SM). Compiled offline (sm_90, bf16, triton 3.6 / 3.8), capped at
    # 128 registers (the most that keeps two blocks an SM; uncapped ptxas took 125-132 / 124-128): 110-112 /
    # 108-110, no stack; a K step 270 instructions with the chunk's GELU, which ptxas issues after the step's wgmma
    # group (wait depth 1: it runs meanwhile), ~520 after the loop, plus two chunks at K = 384 (six K steps).
    # BLOCK_K = 32 (twelve steps, every chunk in the loop) took 269 a step and, with the four stages that keep its
    # loads as deep, one block an SM: not offered. The second takes those two chunks in the first two K steps,
    # loaded on the spot (their issue under the L2-bound steps too, nothing but the stores after the loop): 448-458
    # instructions in those steps, the same registers. 16-bit operands only (fp32's FMA dots spill at the cap).
    # Offered for GELU' too (fc2's dX, with its column sums: fc1's bias gradient), whose plain 128 x 128 tile takes
    # 156 registers (one block an SM) and 1,972 instructions a warp after a main loop of 6 x 74, its epilogue loading
    # the pre-activation from DRAM (H200, 2026-11-28: 0.200 ms, cuBLAS + our GELU' pass 0.36). Behind, the chunk's
    # product and pre-activation loaded a step ahead, its column sums kept as a chunk-shaped fp32 sum: 128 registers
    # (at the cap), no stack, two blocks an SM; a K step 328-331, behind2's first two 583-587, ~550 after the loop
    # (sm_90, bf16, triton 3.6 / 3.8).
    gemm_cfg(128, 128, 64, 8, 3, tma=True, behind=1, maxnreg=128),
    gemm_cfg(128, 128, 64, 8, 3, tma=True, behind=2, maxnreg=128),
    # 128 x 256 with GELU behind, one block an SM: a K step reads 48 KB from L2 for twice the outputs 128 x 128 reads
    # 32 KB for (cuBLAS's fc1 runs 128 x 256 tiles, 0.069 ms against our 0.112, H200 2026-11-28), and the GELU of
    # the tile before fills the issue slots that a second block's main loop fills for 128 x 128. Compiled (sm_90,
    # bf16, triton 3.6 / 3.8): 205-212 registers, no stack, 144 KB; a K step 455-464 instructions, behind2's first
    # two 807-831. Not offered with GELU' (_behind_fits: 254-255 registers).
    gemm_cfg(128, 256, 64, 8, 3, tma=True, behind=2),
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

# The host time a GEMM candidate costs a step beyond one direct launch of our kernel, in ms: what the GEMM chooser
# adds to a candidate's GPU time where a training step's host time counts (tuning.pick_gemm_backend). Measured on the
# H200's host (2026-11-28, torch 2.11, triton 3.6; RESULTS.md session 23): the training step with our GEMM for every
# shape issued 85 cuBLAS calls fewer and 72 launches of ours more than with cuBLAS where it was faster, in 3.67 ms
# less host time: ~0.06 ms a cuBLAS call through torch (its transpose view, output allocation, cuBLAS's own memset and
# launch) against ~0.02 a direct launch of ours. "triton+ln" launches our row kernel after our GEMM.
GEMM_HOST_EXTRA_MS = {"cublas": 0.04, "triton+ln": 0.02}


def _serialised(cfg, epilogue, res) -> bool:
    """The tile whose wgmma ptxas 12.8 (triton 3.6, the lent GPUs') serialises, C7515 compiled offline: 128 x 128
    with 8 warps and pointer loads when the epilogue adds an fp32 residual (proj and fc2 under autocast)."""
    tile = (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, bool(cfg.kwargs.get("USE_TMA")))
    return epilogue == "residual" and res is not None and res.element_size() == 4 and tile == (128, 128, 8, False)


def _held_in_two_blocks(cfg, epilogue) -> bool:
    """False for the flattened 128 x 128 tile with the residual or GELU' in its epilogue: 162-238 registers there
    (sm_90, triton 3.6), one block an SM, where the descriptor-epilogue tiles keep two; not worth its compile and
    timing at a shape's first call. With GELU and its stored pre-activation it keeps two (108 registers)."""
    tile = (cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], bool(cfg.kwargs.get("FLATTEN")))
    return not (tile == (128, 128, True) and epilogue in ("residual", "gelu_grad"))


def _behind_fits(cfg, epilogue) -> bool:
    """False for the 128 x 256 tile one tile behind with GELU' in its epilogue: 254-255 registers (sm_90, bf16,
    triton 3.6 / 3.8, the product's and the pre-activation's chunks and the column sums beside the accumulator)."""
    return not (cfg.kwargs.get("GELU_BEHIND") and cfg.kwargs["BLOCK_N"] >= 256 and epilogue == "gelu_grad")


def _tma_where_ok(configs, args):
    """The configs without the TMA ones unless the operands allow descriptors (TMA_OK) and FASTVIT_TMA is not 0 (the
    benchmarks' A/B switch: the pointer-load tiles alone); without the descriptor epilogues unless C, the residual and
    the pre-activation allow them too (EPI_TMA_OK) and there is a second tile to load or store."""
    if not args.get("TMA_OK", False) or os.environ.get("FASTVIT_TMA", "1") == "0":
        return [c for c in configs if not c.kwargs.get("USE_TMA")]
    if not args.get("EPI_TMA_OK", False) or not _second_tile(args):
        return [c for c in configs if not c.kwargs.get("EPI_TMA")]
    return configs


def _second_tile(args) -> bool:
    """kernels/gemm_epilogue.py's second_tile, from the launch's arguments by name."""
    epilogue = args.get("EPILOGUE")
    return second_tile(epilogue, stores_pre(epilogue, args.get("PRE")))


def _epilogue_staging(c, args) -> int:
    """Bytes of shared memory a descriptor epilogue (EPI_TMA) stages its stores and loads in: one part of the tile
    (kernels/gemm_epilogue.py's epilogue_parts) for C, the residual and the pre-activation each. At or above what
    Triton allocated in every configuration the compile check builds (it shares one buffer among some of them)."""
    if not c.kwargs.get("EPI_TMA"):
        return 0
    epilogue, bn = args.get("EPILOGUE"), c.kwargs["BLOCK_N"]
    part_n = bn // epilogue_parts(bn, epilogue, stores_pre(epilogue, args.get("PRE")), True)
    staged = [args[n] for n in ("C", "RES", "PRE") if args.get(n) is not None]
    return c.kwargs["BLOCK_M"] * part_n * sum(t.element_size() for t in staged)


def warp_spec_on() -> bool:
    """FASTVIT_WARP_SPEC=1 offers the tuner the warp-specialised GEMM tiles (off by default until measured)."""
    return os.environ.get("FASTVIT_WARP_SPEC", "0") == "1"


def flatten_on() -> bool:
    """FASTVIT_FLATTEN=0 leaves out the tiles whose tile and K loops are pipelined as one (FLATTEN; their tests passed
    on an H200, 2026-11-27); the GPU check sets it if their tests fail there."""
    return os.environ.get("FASTVIT_FLATTEN", "1") != "0"


def epi_tma_on() -> bool:
    """FASTVIT_EPI_TMA=0 leaves out the tiles whose epilogue goes through tensor descriptors (EPI_TMA); the GPU check
    sets it if their tests fail there."""
    return os.environ.get("FASTVIT_EPI_TMA", "1") != "0"


def gelu_behind_on() -> bool:
    """FASTVIT_GELU_BEHIND=0 leaves out the tiles that compute GELU or GELU' one tile behind (GELU_BEHIND); the GPU
    check sets it if their tests fail there."""
    return os.environ.get("FASTVIT_GELU_BEHIND", "1") != "0"


def prune_linear_fwd(configs, args):
    """Shared memory as for every GEMM (with a descriptor epilogue's staging); the TMA tiles where _tma_where_ok keeps
    them; the warp-specialised ones where warp_spec_on, the flattened ones where flatten_on, the descriptor
    epilogues where epi_tma_on (neither with the tiles' column sums), the epilogue one tile behind for GELU and GELU'
    where gelu_behind_on; no tile that ptxas serialises, nor one that a second tile in the epilogue leaves at one
    block an SM where others keep two (_held_in_two_blocks), nor one behind at the register file's limit
    (_behind_fits)."""
    configs = _tma_where_ok(configs, args)
    if args.get("EPILOGUE") not in ("gelu", "gelu_grad") or not gelu_behind_on() or args["A"].element_size() != 2:
        configs = [c for c in configs if not c.kwargs.get("GELU_BEHIND")]
    if not warp_spec_on():
        configs = [c for c in configs if not c.kwargs.get("WARP_SPEC")]
    if not flatten_on():
        configs = [c for c in configs if not c.kwargs.get("FLATTEN")]
    if not epi_tma_on():
        configs = [c for c in configs if not c.kwargs.get("EPI_TMA")]
    if args.get("COLSUM") is not None:
        # the tiles' column sums (fc1's bias gradient beside GELU'): their reduction's scratch beside a descriptor
        # epilogue's staging ran out of shared memory, the warp-specialised loop failed Triton's partitioning, and the
        # 128 x 256 tiles reached 255 registers and 24-64 B of stack (sm_90, triton 3.8, compiled offline): none of
        # them is offered with the sums
        configs = [
            c
            for c in configs
            if not c.kwargs.get("EPI_TMA") and not c.kwargs.get("WARP_SPEC") and c.kwargs["BLOCK_N"] < 256
        ]
    epilogue = args.get("EPILOGUE")
    configs = [
        c
        for c in configs
        if not _serialised(c, epilogue, args.get("RES"))
        and _held_in_two_blocks(c, epilogue)
        and _behind_fits(c, epilogue)
    ]
    return _linear_smem(configs, args)


_linear_smem = prune_gemm_configs("A", "B", _epilogue_staging)


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
