"""fastvit_kernels: a Vision Transformer whose hot paths are fused Triton kernels.

from fastvit_kernels import ViT
model = ViT(image_size=32, patch_size=4, num_classes=10, dim=384, depth=12, heads=6, mlp_dim=1536).cuda()
logits = model(images)            # Triton kernels on CUDA; model.set_backend("torch") for eager PyTorch
"""

from . import ops
from .backend import BACKENDS
from .cuda_graphs import cuda_graph_step
from .model import (
    PRESETS,
    ViT,
    register_preset,
    vit_base_patch16_224,
    vit_cifar10,
    vit_small_patch16_224,
    vit_tiny_patch16_224,
)

__version__ = "0.1.0"
__all__ = [
    "BACKENDS",
    "PRESETS",
    "ViT",
    "cuda_graph_step",
    "ops",
    "register_preset",
    "vit_base_patch16_224",
    "vit_cifar10",
    "vit_small_patch16_224",
    "vit_tiny_patch16_224",
]
