"""Every kernel's candidate configurations, in one place, and the pruning that drops what a device or an input cannot
take. The launchers in ops/ name a list and a prune function from here; tuning.py's Launcher chooses among what the
prune keeps. A prune function takes (configs, the launch's arguments by name) and returns the configs kept.

  memory.py      shared memory a block may use; the prune function the GEMMs share
  gemm.py        the linear layers' GEMMs, the full-row GEMM with the next LayerNorm, the patch embedding
  attention.py   the attention forward and backward
  rows.py        the LayerNorm row kernels, the column sums, the step plans' casts
"""

from .._intmath import next_pow2  # noqa: F401 - configs.next_pow2 for the compile check
from .attention import (  # noqa: F401
    ATTENTION_BWD_DKDV_CONFIGS,
    ATTENTION_BWD_DQ_CONFIGS,
    ATTENTION_BWD_MIN_BLOCK,
    ATTENTION_FALLBACK_CONFIG,
    ATTENTION_FWD_CONFIGS,
    ATTENTION_SMEM_BUDGET,
    prune_attention,
    row_blocks,
    tail_attention_on,
    whole_attention_on,
    whole_programs_per_sm,
)
from .gemm import (  # noqa: F401
    GEMM_HOST_EXTRA_MS,
    GROUP_M,
    LINEAR_DW_CONFIGS,
    LINEAR_FWD_CONFIGS,
    LINEAR_LN_CONFIGS,
    PATCH_EMBED_BWD_CONFIGS,
    PATCH_EMBED_FWD_CONFIGS,
    TMA_PROGRAMS_PER_SM,
    _behind_fits,
    _held_in_two_blocks,
    _serialised,
    epi_tma_on,
    flatten_on,
    gemm_cfg,
    prune_linear_dw,
    prune_linear_fwd,
    prune_linear_ln,
    prune_patch_embed_dw,
    prune_patch_embed_dx,
    prune_patch_embed_fwd,
    warp_spec_on,
)
from .memory import (  # noqa: F401
    SMEM_BY_ARCH,
    prune_gemm_configs,
    smem_limit,
)
from .rows import (  # noqa: F401
    COLUMN_SUM_BLOCK_N,
    COLUMN_SUM_CONFIGS,
    COLUMN_SUM_PROGRAMS_PER_SM,
    LAYERNORM_BWD_CONFIGS,
    LAYERNORM_BWD_PROGRAMS_PER_SM,
    LAYERNORM_FWD_PARAMS,
    column_sum_kernel_on,
    prune_column_sum,
    prune_layernorm_bwd,
    row_kernel_params,
    row_pipeline_on,
)
