"""cuda_graph_step: a whole step captured once and replayed computes what the step computes eagerly."""

import pytest
import torch
import torch.nn.functional as F

from fastvit_kernels import ViT, cuda_graph_step


def _model():
    torch.manual_seed(0)
    return ViT(image_size=32, patch_size=4, num_classes=10, dim=64, depth=2, heads=2, mlp_dim=128, backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message for a machine without a GPU")
def test_without_a_gpu_the_helper_says_so():
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA GPU"):
        cuda_graph_step(lambda: None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_replayed_inference_matches_eager():
    model = _model().cuda().eval()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    out = torch.empty(8, 10, device="cuda")

    def step():
        with torch.inference_mode():
            out.copy_(model(x))

    replay = cuda_graph_step(step)
    for _ in range(2):  # new inputs copied into the captured tensor, as a loader loop does
        x.copy_(torch.randn_like(x))
        replay()
        with torch.inference_mode():
            torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_replayed_training_steps_match_eager_steps():
    # the same five steps (three warm-up runs, two replays) on the same batches, eagerly and through the graph
    graphed, eager = _model().cuda(), _model().cuda()
    batches = [(torch.randn(8, 3, 32, 32, device="cuda"), torch.randint(0, 10, (8,), device="cuda")) for _ in range(5)]
    x, y = (t.clone() for t in batches[0])

    def train_step(model, opt, x, y):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    opt_g = torch.optim.AdamW(graphed.parameters(), lr=1e-3, capturable=True)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    warm_batches = list(batches[:3])

    def step():  # the warm-up runs take the first three batches; the capture records reading x and y
        if warm_batches:
            bx, by = warm_batches.pop(0)
            x.copy_(bx), y.copy_(by)
        train_step(graphed, opt_g, x, y)

    replay = cuda_graph_step(step, warmup=3)
    for bx, by in batches[3:]:
        x.copy_(bx), y.copy_(by)
        replay()
    for bx, by in batches:
        train_step(eager, opt_e, bx, by)
    for (n, p), q in zip(graphed.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)
