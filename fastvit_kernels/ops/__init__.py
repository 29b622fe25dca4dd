"""The functional ops: our Triton kernels, each with its eager PyTorch reference (`*_ref`) beside it.

Each op file reads top to bottom: launchers, custom ops (torch.library) with fake and autograd, public op, reference.
The GEMM engine of the linear layers is linear.py, the LayerNorm row launchers layernorm.py; their `@triton.jit`
kernels live in fastvit_kernels/kernels/.
"""

from .fused_attention import attention, attention_ref
from .fused_mlp import (
    layernorm_linear,
    layernorm_linear_ref,
    layernorm_mlp,
    layernorm_mlp_ref,
    linear_residual,
    linear_residual_ref,
)
from .fused_patch_embed import patch_embed, patch_embed_ref

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
