"""The ops are torch.library custom ops: opcheck passes for each, and torch.compile(fullgraph=True) traces the model
with no graph break, forward and backward."""

import pytest
import torch

from fastvit_kernels import ViT
from fastvit_kernels.ops import fused_attention as at
from fastvit_kernels.ops import fused_linear as fl
from fastvit_kernels.ops import fused_mlp as lm
from fastvit_kernels.ops import fused_patch_embed as pe
from fastvit_kernels.ops import fused_qkv_attention as qa


def _p(*shape, device, base=0.0):
    return (base + 0.2 * torch.randn(*shape, device=device)).requires_grad_()


def _samples(device):
    x = torch.randn(2, 5, 16, device=device, requires_grad=True)
    nw, nb = _p(16, device=device, base=1.0), _p(16, device=device)
    w1, b1, w2, b2 = _p(48, 16, device=device), _p(48, device=device), _p(16, 48, device=device), _p(16, device=device)
    img = torch.randn(2, 3, 8, 8, device=device, requires_grad=True)
    h = torch.randn(2, 5, 16, device=device, requires_grad=True)  # LayerNorm's output, as the previous op wrote it
    o = torch.randn(2, 5, 48, device=device, requires_grad=True)  # attention's output
    none = torch.empty(0, device=device)  # the LayerNorm parameters of an op called without one

    def bf16(t):  # a bf16 leaf: the stream of a bf16 model
        return t.detach().bfloat16().requires_grad_()

    return [
        (at._attention_fwd_op, (torch.randn(2, 9, 96, device=device, requires_grad=True), 2, 0.25)),
        (lm._mlp_fwd, (h, x, w1, b1, w2, b2, nw, nb, 1e-6, torch.float32, True)),
        (lm._mlp_fwd, (h, x, w1, None, w2, None, none, none, 1e-6, torch.float32, True)),
        (fl._layer_norm_fwd, (x, nw, nb, 1e-6, torch.float32)),
        (fl._linear_fwd, (h, w1, b1)),
        (qa._qkv_attention_fwd, (h, w1, b1, 2, 0.25)),
        (qa._qkv_attention_fwd, (h, w1, None, 2, 0.25)),
        (fl._linear_residual_fwd, (o, w2, b2, x, nw, nb, 1e-6, torch.float32)),
        (fl._linear_residual_fwd, (o, w2, None, x, none, none, 1e-6, torch.float32)),
        (fl._linear_residual_fwd, (*(bf16(t) for t in (o, w2, b2, x)), none, none, 1e-6, torch.bfloat16)),
        (
            pe._patch_embed_fwd,
            (
                img,
                _p(16, 3, 4, 4, device=device),
                _p(16, device=device),
                _p(1, 1, 16, device=device),
                _p(1, 5, 16, device=device),
                torch.float32,
            ),
        ),
    ]


@pytest.mark.parametrize("case", range(11))
def test_opcheck(case, device):
    op, args = _samples(device)[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_fullgraph_compile_matches_eager_forward_and_backward(pool, device):
    torch._dynamo.reset()
    model = ViT(
        image_size=8, patch_size=4, num_classes=5, dim=32, depth=2, heads=2, mlp_dim=64, pool=pool, backend="triton"
    ).to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = model.set_backend("torch")(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-5, msg=n)


def test_inductor_compiles_around_the_ops(device):
    """Inductor (C++ on a CPU, Triton on a GPU) generates the glue around our opaque ops; logits match eager."""
    torch._dynamo.reset()
    model = ViT(image_size=8, patch_size=4, num_classes=5, dim=32, depth=1, heads=2, mlp_dim=64, backend="triton").to(
        device
    )
    x = torch.randn(2, 3, 8, 8, device=device)
    out = torch.compile(model, fullgraph=True)(x)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    eager = model.set_backend("torch")(x)
    eager.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():  # and every gradient against the eager backend's
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-5, msg=n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["infer", "train"])
def test_reduce_overhead_cuda_graphs_match_eager(mode):
    """mode="reduce-overhead" records our kernels into CUDA graphs (cudagraph trees) and replays them; the replayed
    logits and gradients equal eager ones. Three calls: warm-up (autotuning happens here), recording, replay."""
    torch._dynamo.reset()
    model = ViT(
        image_size=32, patch_size=4, num_classes=10, dim=64, depth=2, heads=2, mlp_dim=128, backend="triton"
    ).cuda()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    if mode == "infer":
        with torch.inference_mode():
            for _ in range(3):
                out = compiled(x).clone()  # a replay overwrites the graph's output buffers: keep a copy
            ref = model(x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        return
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        out = compiled(x)
        out.square().mean().backward()
        out = out.detach().clone()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    ref = model(x)
    ref.square().mean().backward()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-5, msg=n)
