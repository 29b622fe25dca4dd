"""Each fused GEMM of a block, alone, at the model's real shapes and dtypes: how far is it from a bare cuBLAS GEMM?

The per-op rows (test_kernels.py) say whether a fused op beats eager; these say where the time goes inside it. Inputs
are what the model feeds the kernels under bf16 autocast: the residual stream x in fp32, weights and activations in
bf16. Rows per group:
  ours        our fused kernel (the autotuner's choice is recorded in the row as `config`); for the +norm GEMMs the
              faster of ours, timed by the model's chooser (both times in `gemm_ms`, which ran in `backend`):
              "triton", the full-row GEMM up to D = 512 (past it, ours+ln); "triton+ln", ours+ln below
  eager       what eager autocast runs for the same math (LayerNorm, linear, GELU, add as separate kernels)
  cublas      the bare GEMM on ready bf16 operands, nothing fused: a floor for ours, not a peer (it skips work)
  ln+ours     (qkv, fc1) our LayerNorm row kernel writing bf16 rows, then our GEMM
  ours+ln     (proj+norm, fc2+norm) our residual GEMM, then our LayerNorm row kernel: two launches where the
              full-row GEMM is one
  cublas+addln  (proj+norm, fc2+norm) cuBLAS's GEMM, then our row kernel adding the residual and normalising in one
              pass: the cuBLAS candidate the model's tuner times against `ours` (ops/gemm.py)
"""

import importlib

import pytest
import torch
import torch.nn.functional as F
from common import chosen_configs, gemm_candidate_ms, measure, need_cuda

lin = importlib.import_module("fastvit_kernels.ops.gemm")
lnorm = importlib.import_module("fastvit_kernels.ops.layernorm")

SHAPES = {"cifar10": (512 * 65, 384, 1536), "vitb16": (128 * 197, 768, 3072)}  # rows, D, hidden
# name -> (N, K) as functions of (D, hidden), and which rows apply. In the order the GPU check measures them until its
# stage's limit: the GEMMs whose kernels changed since the last GPU run first (fc1 and fc2's dX with their epilogues
# one tile behind, sessions 26-27)
GEMMS = {
    "fc1": (lambda d, h: (h, d), ("ours", "eager", "cublas", "ln+ours")),
    "fc1+pre": (lambda d, h: (h, d), ("ours", "eager", "cublas")),  # training's: the pre-activation stored too
    # dy @ W2 with GELU' in the epilogue and the column sums of the result (fc1's bias gradient), as the model runs it
    "fc2-dgelu": (lambda d, h: (h, d), ("ours", "eager", "cublas")),
    "qkv": (lambda d, h: (3 * d, d), ("ours", "eager", "cublas", "ln+ours")),
    "proj": (lambda d, h: (d, d), ("ours", "eager", "cublas")),
    "fc2": (lambda d, h: (d, h), ("ours", "eager", "cublas")),
    "proj+norm": (lambda d, h: (d, d), ("ours", "eager", "cublas", "ours+ln", "cublas+addln")),  # + the block's norm2
    "fc2+norm": (lambda d, h: (d, h), ("ours", "eager", "cublas", "ours+ln", "cublas+addln")),  # + the next norm1
    "fc1-dW": (lambda d, h: (h, d), ("ours", "eager", "cublas")),  # weight gradient from the saved LayerNorm rows
    "fc2-dW": (lambda d, h: (d, h), ("ours", "eager", "cublas")),
}
BF16 = torch.bfloat16


def _case(name, row, R, D, Hd, device):
    """(step, FLOPs, describe() for measure or None) for one row of one GEMM."""
    N, K = GEMMS[name][0](D, Hd)
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*s, dtype=BF16, scale=1.0):
        return (scale * torch.randn(*s, device=device, generator=g)).to(dtype)

    x = rnd(R, D, dtype=torch.float32)  # the residual stream
    nw, nb = 1.0 + rnd(D, dtype=torch.float32, scale=0.1), rnd(D, dtype=torch.float32, scale=0.1)
    eps = 1e-6
    w, b = rnd(N, K, scale=K**-0.5), rnd(N, scale=0.1)
    xn = F.layer_norm(x, (D,), nw, nb, eps).to(BF16)
    amp = torch.autocast(device.type, dtype=BF16)

    if name in ("qkv", "fc1", "fc1+pre"):
        gelu = name != "qkv"
        act = F.gelu if gelu else (lambda t: t)
        epi = "gelu" if gelu else "none"
        # fc1+pre: the pre-activation written beside GELU's output, for the backward (eager's linear writes it anyway)
        pre = torch.empty(R, N, device=device, dtype=BF16) if name == "fc1+pre" else None
        fns = {
            "ours": lambda: lin.linear(xn, w, b, epilogue=epi, pre=pre),
            "eager": lambda: act(F.linear(F.layer_norm(x, (D,), nw, nb, eps), w, b)),
            "cublas": lambda: F.linear(xn, w, b),
            "ln+ours": lambda: lin.linear(lnorm.layernorm_fwd(x, nw, nb, eps, BF16)[0], w, b, epilogue=epi),
        }
        kernel = lin._fwd
    elif name in ("proj", "fc2"):
        a = rnd(R, K)
        fns = {
            "ours": lambda: lin.linear(a, w, b, epilogue="residual", residual=x, out_dtype=torch.float32),
            "eager": lambda: x + F.linear(a, w, b),
            "cublas": lambda: F.linear(a, w, b),
        }
        kernel = lin._fwd
    elif name in ("proj+norm", "fc2+norm"):  # X = x + a @ W^T + b (fp32 stream), LayerNorm(X) in bf16 for the next GEMM
        a = rnd(R, K)

        def ours_then_ln():
            out = lin.linear(a, w, b, epilogue="residual", residual=x, out_dtype=torch.float32)
            return out, lnorm.layernorm_fwd(out, nw, nb, eps, BF16)

        def eager():
            out = x + F.linear(a, w, b)
            return out, F.layer_norm(out, (D,), nw, nb, eps).to(BF16)

        fns = {
            "ours": lambda: lin.linear_residual_layernorm(a, w, b, x, nw, nb, eps, BF16),
            "eager": eager,
            "cublas": lambda: F.linear(a, w, b),
            "ours+ln": ours_then_ln,
            "cublas+addln": lambda: lnorm.add_layernorm_fwd(F.linear(a, w, b), x, nw, nb, eps, BF16),
        }
        kernel = lin._fwd  # `ours`: _describe picks the launcher of the candidate that ran
    elif name == "fc2-dgelu":  # dpre [R, hidden] = (dy [R, D] @ W2 [D, hidden]) * GELU'(pre), and dpre.sum(0)
        w2, dy, pre = rnd(K, N, scale=N**-0.5), rnd(R, K), rnd(R, N)

        def eager_dgelu():
            dpre = torch.ops.aten.gelu_backward(dy @ w2, pre)
            return dpre, dpre.sum(0)

        fns = {
            "ours": lambda: lin.linear_gelu_grad(dy, w2.t(), pre, BF16),
            "eager": eager_dgelu,
            "cublas": lambda: dy @ w2,
        }
        kernel = lin._fwd
    else:  # weight gradients: dW [N, K] = G^T [N, R] @ X' [R, K], and the bias gradient colsum(G)
        gout = rnd(R, N)
        if name == "fc1-dW":
            fns = {
                "ours": lambda: lin.linear_weight_grad(gout, xn, out_dtype=BF16),
                "eager": lambda: (gout.t() @ xn, gout.sum(0)),
                "cublas": lambda: gout.t() @ xn,
            }
        else:
            h = rnd(R, K)
            fns = {
                "ours": lambda: lin.linear_weight_grad(gout, h, out_dtype=BF16),
                "eager": lambda: (gout.t() @ h, gout.sum(0)),
                "cublas": lambda: gout.t() @ h,
            }
        kernel = lin._dw
    fn = fns[row]

    def step():
        with torch.no_grad(), amp:
            fn()

    return step, 2 * R * N * K, (_describe(kernel, name, row, N) if row in ("ours", "ln+ours", "ours+ln") else None)


def _describe(kernel, name, row, N):
    """The row's config, read after the timing; for the +norm GEMMs' `ours`, also which of our candidates ran, as
    `backend` and in the config, and the chooser's times of all of them (FASTVIT_GEMM=triton times our candidates)."""

    def describe():
        if not (name.endswith("+norm") and row == "ours"):
            return chosen_configs(gemm=kernel)()
        ran = lin.last_backend
        full_row = ran == "triton" and N <= lin.MAX_LN_EPILOGUE_DIM  # else the residual GEMM, then the row kernel
        launcher = lin._fwd_ln if full_row else kernel
        info = chosen_configs(gemm=launcher)() | gemm_candidate_ms()  # each of ours, timed by the chooser
        return info | {"backend": ran, "config": f"{ran}: {info.get('config', '')}"}

    return describe


@pytest.mark.parametrize("row", ["ours", "ln+ours", "ours+ln", "cublas+addln", "eager", "cublas"])
@pytest.mark.parametrize("gemm", list(GEMMS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_gemm(benchmark, bench_opts, device, shape, gemm, row, monkeypatch):
    need_cuda(device, "GEMM benchmarks")
    monkeypatch.setenv("FASTVIT_GEMM", "triton")  # `ours` is our kernel here: the goals are for the Triton path
    if row not in GEMMS[gemm][1]:
        pytest.skip(f"{row} does not apply to {gemm}")
    R, D, Hd = SHAPES[shape]
    step, flops, describe = _case(gemm, row, R, D, Hd, device)
    measure(
        benchmark,
        step,
        device=device,
        opts=bench_opts,
        kernel_time=True,
        group=f"gemm/{shape}/{gemm}",
        row=row,
        items=R,
        item_name="tok",
        flops=flops,
        peak_dtype=BF16,
        warmup=bench_opts["warmup"] + 2,
        describe=describe,
    )
