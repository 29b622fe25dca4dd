"""How many of our kernels a ViT block launches: each launch costs host time (about 0.1 ms of Python per launch on
the H100 machine's CPU, 2026-11-26), so the count is held here and lowered on purpose, never raised by accident.

Counted by recording the launches (tests/launches.py) of a one-block and a two-block model: the difference is one
block. torch's own kernels (the backward's dx GEMMs, casts) are not counted here.
"""

import torch
from launches import record_launches

from fastvit_kernels import ViT

# inference: qkv, attention, proj+residual+norm2, fc1+GELU, fc2+residual+the next norm1 (the goal: five)
INFERENCE_PER_BLOCK = 5
# training adds the backward: the next norm1's LayerNorm backward (with the residual gradient) and the column sums of
# its partial rows, dW fc2, dGELU (its tiles add their partial rows up: fc1's bias gradient), dW fc1, norm2's
# LayerNorm backward and its column sums, dW proj, attention dq and dk/dv (dk/dv leaving partial rows of qkv's bias
# gradient), dW qkv and the column sums of those rows. The partial rows' sums cost a small launch each where the dW
# kernel's bias dot did the work in its K loop (none for fc1's, added up by the dGELU GEMM's last tiles); they spare
# the cuBLAS dW a column sum over all of d pre and of dqkv, and either dW kernel its bias
TRAINING_PER_BLOCK = 17
# with cuBLAS's GEMMs (FASTVIT_GEMM=cublas): inference attention and the two add + LayerNorm row kernels after proj and
# fc2; training adds the two LayerNorm backwards (each also summing the rows proj's and fc2's weight gradients read:
# their bias gradients) with the column sums finishing them, the dgelu pass (GELU' applied in the column sums, which
# sum fc1's bias gradient on the way), attention dq and dk/dv, and the column sums of their partial rows (qkv's bias
# gradient)
CUBLAS_INFERENCE_PER_BLOCK = 3
CUBLAS_TRAINING_PER_BLOCK = 11


def _count(monkeypatch, depth, train, device, gemm=None):
    with monkeypatch.context() as m:
        if gemm is not None:
            m.setenv("FASTVIT_GEMM", gemm)
        launches = record_launches(m)
        model = ViT(
            image_size=8, patch_size=4, num_classes=3, dim=32, depth=depth, heads=2, mlp_dim=64, backend="triton"
        ).to(device)
        x = torch.randn(2, 3, 8, 8, device=device)
        if train:
            model(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)
        return len(launches)


def test_launches_per_block(monkeypatch, device):
    for train, expected in ((False, INFERENCE_PER_BLOCK), (True, TRAINING_PER_BLOCK)):
        per_block = _count(monkeypatch, 2, train, device) - _count(monkeypatch, 1, train, device)
        assert per_block == expected, ("training" if train else "inference", per_block)


def test_launches_per_block_with_cublas(monkeypatch, device):
    for train, expected in ((False, CUBLAS_INFERENCE_PER_BLOCK), (True, CUBLAS_TRAINING_PER_BLOCK)):
        per_block = _count(monkeypatch, 2, train, device, "cublas") - _count(monkeypatch, 1, train, device, "cublas")
        assert per_block == expected, ("training" if train else "inference", per_block)
