"""The row kernels' configurations: the LayerNorm forward and backward (ops/layernorm.py), the column sums beside
cuBLAS's weight gradient.
"""

import os

import triton

from .._intmath import next_pow2
from .memory import smem_limit


def row_pipeline_on() -> bool:
    """FASTVIT_ROW_PIPELINE=0 leaves out the configs whose row loops pipeline their loads (LOAD_STAGES > 1: the
    LayerNorm backward's and the column sums', new since the last GPU run): the GPU check sets it if they fail there."""
    return os.environ.get("FASTVIT_ROW_PIPELINE", "1") != "0"


# The column sums (kernels/reduce.py: the bias gradient beside cuBLAS's weight gradient, the LayerNorm backward's
# partial rows): strips of COLUMN_SUM_BLOCK_N columns (the grid, and so the partial rows, do not depend on the
# config), row blocks of BLOCK_R with LOAD_STAGES - 1 ahead in flight; programs COLUMN_SUM_PROGRAMS_PER_SM an SM in all.
COLUMN_SUM_BLOCK_N = 128
COLUMN_SUM_PROGRAMS_PER_SM = 4
COLUMN_SUM_CONFIGS = [
    triton.Config({"BLOCK_R": 32, "LOAD_STAGES": 3}, num_warps=4),
    triton.Config({"BLOCK_R": 64, "LOAD_STAGES": 3}, num_warps=4),
    triton.Config({"BLOCK_R": 32, "LOAD_STAGES": 1}, num_warps=4),
]


def column_sum_kernel_on() -> bool:
    """FASTVIT_COLUMN_SUM=0 adds the columns up with torch's sum and a cast instead of our kernel (on the default
    training path: the bias gradients, the LayerNorm backward's, cuBLAS's dgelu pass, there with torch's gelu_backward;
    the GPU check sets it if the kernel's tests or memcheck fail there)."""
    return os.environ.get("FASTVIT_COLUMN_SUM", "1") != "0"


def prune_column_sum(configs, args):
    """The pipelined configs where row_pipeline_on."""
    return [c for c in configs if row_pipeline_on() or c.kwargs["LOAD_STAGES"] == 1]


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
# 32 rows with 4 warps is kept only for narrow rows (D <= 64, 8-16 elements a thread, where every other config holds
# fewer than 4): the tests' small models, whose interpreted row loops it shortens fourfold.
# The 1-row, 2-warp program (the H100's choice at D = 384, 2026-11-27) is capped at 80 registers: summing dx's columns
# too (SUM_DX) takes it from 78 to 91 (triton 3.8, sm_90), ten programs an SM instead of the grid's twelve; capped, 80
# and no stack either way. Kept only where a row fits the cap (next_pow2(D) <= 512; at 1024 it would spill).
def _ln_bwd_cfg(rows, warps, stages, maxnreg=None):
    return triton.Config({"BLOCK_M": rows, "LOAD_STAGES": stages}, num_warps=warps, maxnreg=maxnreg)


LN_BWD_CAPPED_MAX_BLOCK_D = 512


LAYERNORM_BWD_CONFIGS = [
    _ln_bwd_cfg(32, 4, 1),
    _ln_bwd_cfg(8, 8, 1),
    _ln_bwd_cfg(4, 8, 1),
    _ln_bwd_cfg(2, 2, 3),
    _ln_bwd_cfg(2, 4, 3),
    _ln_bwd_cfg(1, 2, 3, maxnreg=80),
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
    pipelined loads fit the device's shared memory, the register-capped one where a row fits its cap; the pipelined
    ones where row_pipeline_on."""
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
    fits = [c for c in fits if c.maxnreg is None or block_d <= LN_BWD_CAPPED_MAX_BLOCK_D]
    kept = [c for c in fits if _ln_bwd_elems(c, block_d) >= 4] or fits
    return kept or [min(configs, key=lambda c: _ln_bwd_elems(c, block_d))]
