"""The functional ops: our Triton kernels, each with its eager PyTorch reference (`*_ref`) beside it.

Each op file reads top to bottom: custom ops (torch.library) with fake and autograd, public op, reference. The GEMM
engine of the linear layers is gemm.py, the LayerNorm row launchers layernorm.py, the column sums reduce.py; their
`@triton.jit` kernels live in fastvit_kernels/kernels/.
"""

from .fused_attention import attention, attention_ref
from .fused_linear import (
    layer_norm,
    layer_norm_ref,
    linear,
    linear_ref,
    linear_residual,
    linear_residual_layernorm,
    linear_residual_layernorm_ref,
    linear_residual_ref,
)
from .fused_mlp import (
    layernorm_mlp,
    layernorm_mlp_ref,
    mlp_residual,
    mlp_residual_layernorm,
    mlp_residual_layernorm_ref,
    mlp_residual_ref,
)
from .fused_patch_embed import patch_embed, patch_embed_ref
from .fused_qkv_attention import qkv_attention, qkv_attention_ref

__all__ = [
    "attention",
    "attention_ref",
    "layer_norm",
    "layer_norm_ref",
    "layernorm_mlp",
    "layernorm_mlp_ref",
    "linear",
    "linear_ref",
    "linear_residual",
    "linear_residual_layernorm",
    "linear_residual_layernorm_ref",
    "linear_residual_ref",
    "mlp_residual",
    "mlp_residual_layernorm",
    "mlp_residual_layernorm_ref",
    "mlp_residual_ref",
    "patch_embed",
    "patch_embed_ref",
    "qkv_attention",
    "qkv_attention_ref",
]
