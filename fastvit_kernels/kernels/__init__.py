"""`@triton.jit` code only, one file per kernel family; the launchers, custom ops and references live in `ops/`.

common.py     jit helpers shared by the families: the program-id swizzle, erf / GELU / GELU'
gemm.py       the linear layers' GEMMs: forward with a fused epilogue, and the weight gradient
layernorm.py  row kernels: LayerNorm forward (normalised rows in the compute dtype) and backward
reduce.py     column sums of a tall matrix (the bias gradient beside cuBLAS's weight gradient)
"""
