"""Per kernel, at the model's real shapes, bf16: forward and forward+backward against eager and the strongest peers."""

import pytest
import torch
from common import chosen_configs, gemm_backends, measure, need_cuda

from fastvit_kernels import ops, vit_cifar10
from fastvit_kernels.ops import cast
from fastvit_kernels.ops import fused_attention as at
from fastvit_kernels.ops import layernorm as ln
from fastvit_kernels.ops import reduce as red

ATTN_SHAPES = {"cifar10-N65": (512, 6, 65, 64), "vitb16-N197": (128, 12, 197, 64), "N257": (64, 16, 257, 64)}
MLP_SHAPES = {"cifar10": (512 * 65, 384, 1536), "vitb16": (128 * 197, 768, 3072)}
PATCH_SHAPES = {"cifar10": (512, 32, 4, 384), "vitb16": (128, 224, 16, 768)}
DT = torch.bfloat16


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[name]
    return sdpa_kernel(backend)


def _run(fn, inputs, mode):
    """One call: forward, or forward + backward of a fixed random cotangent (grads reset so nothing accumulates)."""
    if mode == "fwd":

        def step():
            with torch.no_grad():
                fn(*inputs)

        return step
    g = {}

    def step():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        if "g" not in g:
            g["g"] = torch.randn_like(out)
        out.backward(g["g"])

    return step


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("row", ["ours", "ours-no-whole", "eager-math", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn"])
@pytest.mark.parametrize("shape", list(ATTN_SHAPES))
def test_attention(benchmark, bench_opts, device, shape, row, mode, monkeypatch):
    need_cuda(device, "kernel benchmarks")
    B, H, N, d = ATTN_SHAPES[shape]
    if row == "ours-no-whole":  # the A/B of the forward's whole-sequence tiles (N <= 128), which the tuner also times
        if N > 128:
            pytest.skip("the whole-sequence tiles take N <= 128")
        monkeypatch.setenv("FASTVIT_ATTN_WHOLE", "0")
    qkv = torch.randn(B, N, 3 * H * d, device=device, dtype=DT, requires_grad=True)
    if row.startswith("ours"):
        fn = lambda t: ops.attention(t, H)  # noqa: E731
    elif row == "eager-math":
        fn = lambda t: ops.attention_ref(t, H, impl="math")  # noqa: E731
    else:
        sdpa_name = row.split("-")[1]

        def fn(t):
            with _sdpa_backend(sdpa_name):
                return ops.attention_ref(t, H, impl="sdpa")

        try:
            fn(qkv).sum().backward()
        except RuntimeError as e:
            pytest.skip(f"{row} not available here: {str(e).splitlines()[0][:120]}")
    flops = 4 * B * H * N * N * d * (3.5 if mode == "fwd+bwd" else 1)  # bwd: 5 N^2 d GEMMs vs 2 (recompute incl.)
    launchers = dict(fwd=at._fwd) if mode == "fwd" else dict(fwd=at._fwd, dq=at._bwd_dq, dkdv=at._bwd_dkdv)
    measure(
        benchmark,
        _run(fn, [qkv], mode),
        device=device,
        opts=bench_opts,
        kernel_time=True,
        group=f"attention/{shape}/{mode}",
        row=row,
        items=B,
        flops=flops,
        peak_dtype=DT,
        describe=chosen_configs(**launchers) if row.startswith("ours") else None,
    )


@pytest.mark.parametrize("row", ["ours", "ours-composed", "eager-sdpa"])
@pytest.mark.parametrize("shape", list(ATTN_SHAPES)[:2])
def test_qkv_attention(benchmark, bench_opts, device, shape, row):
    """The qkv projection and the attention, forward and backward, with qkv's bias: ours as one op (qkv's bias
    gradient from the dK/dV kernel's partial rows), ours composed of the linear and attention ops (the column
    sum over dqkv, as before session 21), eager (F.linear, then SDPA's default backend)."""
    need_cuda(device, "kernel benchmarks")
    B, H, N, d = ATTN_SHAPES[shape]
    dim = H * d
    h = torch.randn(B, N, dim, device=device, dtype=DT, requires_grad=True)
    w = (0.02 * torch.randn(3 * dim, dim, device=device, dtype=DT)).requires_grad_()
    b = (0.02 * torch.randn(3 * dim, device=device, dtype=DT)).requires_grad_()
    if row == "ours":
        fn = lambda h, w, b: ops.qkv_attention(h, w, b, H)  # noqa: E731
    elif row == "ours-composed":
        fn = lambda h, w, b: ops.attention(ops.linear(h, w, b), H)  # noqa: E731
    else:
        fn = lambda h, w, b: ops.qkv_attention_ref(h, w, b, H, impl="sdpa")  # noqa: E731
    flops = 4 * B * H * N * N * d * 3.5 + 2 * B * N * dim * 3 * dim * 3  # attention fwd+bwd, the GEMM's three
    configs, backends = chosen_configs(fwd=at._fwd, dq=at._bwd_dq, dkdv=at._bwd_dkdv), gemm_backends()

    def describe():  # the attention tiles, and which GEMM candidates ran (the weight gradient's: `gemm`, `gemm_ms`)
        info, gemms = configs(), backends()
        config = "; ".join(i["config"] for i in (info, gemms) if "config" in i)
        return {**gemms, **info} | ({"config": config} if config else {})

    measure(
        benchmark,
        _run(fn, [h, w, b], "fwd+bwd"),
        device=device,
        opts=bench_opts,
        kernel_time=True,
        group=f"qkv_attention/{shape}/fwd+bwd",
        row=row,
        items=B,
        flops=flops,
        peak_dtype=DT,
        describe=describe if row.startswith("ours") else None,
    )


def _mlp_eager(x, nw, nb, w1, b1, w2, b2):
    return ops.layernorm_mlp_ref(x, nw, nb, w1, b1, w2, b2)


_compiled_mlp = None


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("row", ["ours", "eager", "compile"])
@pytest.mark.parametrize("shape", list(MLP_SHAPES))
def test_layernorm_mlp(benchmark, bench_opts, device, shape, row, mode, monkeypatch):
    global _compiled_mlp
    monkeypatch.setenv("FASTVIT_GEMM", "triton")  # `ours` is our kernels here: the goals are for the Triton path
    need_cuda(device, "kernel benchmarks")
    R, D, Hd = MLP_SHAPES[shape]

    def p(*s, base=0.0):
        return (base + 0.02 * torch.randn(*s, device=device, dtype=DT)).requires_grad_()

    inputs = [
        torch.randn(R, D, device=device, dtype=DT, requires_grad=True),
        p(D, base=1.0),
        p(D),
        p(Hd, D),
        p(Hd),
        p(D, Hd),
        p(D),
    ]
    if row == "ours":
        fn = ops.layernorm_mlp
    elif row == "eager":
        fn = _mlp_eager
    else:
        _compiled_mlp = _compiled_mlp or torch.compile(_mlp_eager)
        fn = _compiled_mlp
    flops = 2 * 2 * R * D * Hd * (3 if mode == "fwd+bwd" else 1)
    measure(
        benchmark,
        _run(fn, inputs, mode),
        device=device,
        opts=bench_opts,
        kernel_time=True,
        group=f"layernorm_mlp/{shape}/{mode}",
        row=row,
        items=R,
        item_name="tok",
        flops=flops,
        peak_dtype=DT,
        warmup=bench_opts["warmup"] + 3,
    )


@pytest.mark.parametrize("row", ["ours", "eager", "ours+bf16", "eager+cast"])
@pytest.mark.parametrize("shape", list(MLP_SHAPES))
def test_layernorm_bwd(benchmark, bench_opts, device, shape, row):
    """The LayerNorm backward of a training step under bf16 autocast, the residual gradient added: dy in bf16 (our
    GEMM's input gradient; eager's arrives in fp32), the fp32 stream x, its gradient dres and dx in fp32. Eager: aten's
    layer_norm backward (input, weight and bias gradients) and the add. +bf16 / +cast: what a training step runs after
    proj and fc2: dx in bf16 too, the operand of the GEMMs' backward, and its column sums, that GEMM's bias gradient
    (ours in the same pass and the same column sums; eager a cast and a sum)."""
    need_cuda(device, "kernel benchmarks")
    R, D, _ = MLP_SHAPES[shape]
    x = torch.randn(R, D, device=device)
    w, b = 1 + 0.02 * torch.randn(D, device=device), 0.02 * torch.randn(D, device=device)
    dres = torch.randn(R, D, device=device)
    dy = torch.randn(R, D, device=device, dtype=DT)
    _, mean, rstd = ln.layernorm_fwd(x, w, b, 1e-6, DT)
    low = torch.empty(R, D, device=device, dtype=DT) if row.endswith(("+bf16", "+cast")) else None
    sum_dtype = DT if low is not None else None
    if row.startswith("ours"):

        def step():
            ln.layernorm_bwd(dy, x, mean, rstd, w, dres=dres, dx_low=low, dx_sum_dtype=sum_dtype)

        describe = chosen_configs(ln_bwd=ln._bwd, colsum=red._colsum)
    else:
        dy32, mean2, rstd2 = dy.float(), mean[:, None], rstd[:, None]

        def step():
            dx, _, _ = torch.ops.aten.native_layer_norm_backward(dy32, x, [D], mean2, rstd2, w, b, [True] * 3)
            dx.add_(dres)
            if low is not None:
                low.copy_(dx)
                low.sum(0)  # the bias gradient of the GEMM that reads low (bf16, as autocast's backward gives it)

        describe = None
    _measure_rows_pass(benchmark, bench_opts, device, step, f"layernorm/{shape}/bwd", row, R, describe)


COLSUM_SHAPES = {"cifar10-fc1": (512 * 65, 1536), "cifar10-proj": (512 * 65, 384)}  # a linear's output gradient


@pytest.mark.parametrize("row", ["ours", "eager"])
@pytest.mark.parametrize("shape", list(COLSUM_SHAPES))
def test_column_sum(benchmark, bench_opts, device, shape, row):
    """The bias gradient beside cuBLAS's weight gradient: the fp32 column sums of a bf16 output gradient. Eager:
    torch's sum over the rows."""
    need_cuda(device, "kernel benchmarks")
    R, N = COLSUM_SHAPES[shape]
    g = torch.randn(R, N, device=device, dtype=DT)
    if row == "ours":

        def step():
            red.column_sum(g)

    else:

        def step():
            g.sum(0, dtype=torch.float32)

    describe = chosen_configs(colsum=red._colsum) if row == "ours" else None
    _measure_rows_pass(benchmark, bench_opts, device, step, f"column_sum/{shape}", row, R, describe)


@pytest.mark.parametrize("row", ["ours", "eager"])
def test_cast(benchmark, bench_opts, device, row):
    """Autocast's casts of vit_cifar10's weights to bf16 (152 tensors, 21.7 M values): ours as a step plan's batch
    runs them (ops/cast.py: one torch._foreach_copy_), eager a .to() each, as autocast casts them. host_ms beside the
    GPU time: the launches' host time is the point."""
    need_cuda(device, "kernel benchmarks")
    srcs = [p.detach() for p in vit_cifar10().to(device).parameters()]
    dsts = [torch.empty_like(t, dtype=DT) for t in srcs]
    if row == "ours":

        def step():
            cast.cast_batch(dsts, srcs)

    else:

        def step():
            for t in srcs:
                t.to(DT)

    timing = dict(device=device, opts=bench_opts, kernel_time=True, item_name="tensor")
    measure(benchmark, step, group="cast/vit_cifar10-weights", row=row, items=len(srcs), **timing)


def _measure_rows_pass(benchmark, opts, device, step, group, row, rows, describe):
    """GPU time of one pass over `rows` token rows (the memory-bound row kernels: no FLOPs to count)."""
    timing = dict(device=device, opts=opts, kernel_time=True, item_name="tok")
    measure(benchmark, step, group=group, row=row, items=rows, describe=describe, **timing)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("row", ["ours", "eager"])
@pytest.mark.parametrize("shape", list(PATCH_SHAPES))
def test_patch_embed(benchmark, bench_opts, device, shape, row, mode):
    need_cuda(device, "kernel benchmarks")
    B, S, p, D = PATCH_SHAPES[shape]
    T = (S // p) ** 2 + 1
    inputs = [
        torch.randn(B, 3, S, S, device=device, dtype=DT),
        (0.02 * torch.randn(D, 3, p, p, device=device, dtype=DT)).requires_grad_(),
        torch.zeros(D, device=device, dtype=DT, requires_grad=True),
        torch.zeros(1, 1, D, device=device, dtype=DT, requires_grad=True),
        (0.02 * torch.randn(1, T, D, device=device, dtype=DT)).requires_grad_(),
    ]
    fn = ops.patch_embed if row == "ours" else ops.patch_embed_ref
    flops = 2 * B * (T - 1) * 3 * p * p * D * (2 if mode == "fwd+bwd" else 1)  # bwd: the weight gradient only
    measure(
        benchmark,
        _run(fn, inputs, mode),
        device=device,
        opts=bench_opts,
        kernel_time=True,
        group=f"patch_embed/{shape}/{mode}",
        row=row,
        items=B,
        flops=flops,
        peak_dtype=DT,
    )


def test_cpu_eager_mlp_reference(benchmark, bench_opts, device):
    """Without a GPU the suite still measures something real: the eager reference of the fused MLP, small."""
    if device.type == "cuda":
        pytest.skip("CPU-only row")
    x = torch.randn(2048, 96, requires_grad=True)
    params = [
        torch.ones(96, requires_grad=True),
        torch.zeros(96, requires_grad=True),
        (0.02 * torch.randn(384, 96)).requires_grad_(),
        torch.zeros(384, requires_grad=True),
        (0.02 * torch.randn(96, 384)).requires_grad_(),
        torch.zeros(96, requires_grad=True),
    ]
    measure(
        benchmark,
        _run(_mlp_eager, [x] + params, "fwd+bwd"),
        device=device,
        opts=bench_opts,
        kernel_time=True,
        group="layernorm_mlp/cpu-small/fwd+bwd",
        row="eager",
        items=2048,
        item_name="tok",
    )
