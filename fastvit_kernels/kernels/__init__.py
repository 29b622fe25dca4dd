"""`@triton.jit` code only, one file per kernel family; the launchers, custom ops and references live in `ops/`.

attention.py      fused multi-head attention, forward, from the packed qkv
attention_bwd.py  its backward: dQ, and dK/dV, into the packed dqkv
cast.py           dtype casts of several tensors in one launch (a step plan's batch of autocast's casts)
common.py         jit helpers shared by the families: the program-id swizzle, erf / GELU / GELU'
gemm.py           the linear layers' GEMMs: forward with a fused epilogue, and the weight gradient
gemm_layernorm.py the GEMM whose tile spans whole rows: residual add and the next LayerNorm in its epilogue
layernorm.py      row kernels: LayerNorm forward (normalised rows in the compute dtype) and backward
patch_embed.py    patch embedding: im2col in the GEMM, bias, position embedding, CLS row; its gradients
reduce.py         column sums of a tall matrix (the bias gradient beside cuBLAS's weight gradient)
"""
