"""The functional ops: our Triton kernels, each with its eager PyTorch reference (`*_ref`) beside it.

Each op lives in its own file, read top to bottom: kernels, launchers, autograd Function, public op, reference.
"""

from .attention import attention, attention_ref
from .layernorm_mlp import (
    layernorm_linear,
    layernorm_linear_ref,
    layernorm_mlp,
    layernorm_mlp_ref,
    linear_residual,
    linear_residual_ref,
)
from .patch_embed import patch_embed, patch_embed_ref

__all__ = [
    "attention",
    "attention_ref",
    "layernorm_linear",
    "layernorm_linear_ref",
    "layernorm_mlp",
    "layernorm_mlp_ref",
    "linear_residual",
    "linear_residual_ref",
    "patch_embed",
    "patch_embed_ref",
]
