import pytest
import torch
from helpers import check_op

from fastvit_kernels.ops import _common, patch_embed, patch_embed_ref

# (B, C, H, W, patch, D, with class token): CIFAR's 32x32/4, non-square 48x64, patches 2/4/8/14/16, 1-4 channels,
# and enough patch rows (5 x 256) for the weight gradient to split them (the interpreter counts 4 SMs)
SHAPES = [
    (2, 3, 32, 32, 4, 48, True),
    (1, 1, 48, 64, 8, 40, False),
    (3, 4, 6, 6, 2, 24, True),
    (1, 3, 28, 28, 14, 32, True),
    (1, 3, 32, 48, 16, 64, True),
    (5, 3, 32, 32, 2, 32, True),  # 1,280 patch rows: the weight gradient splits them, its last split adds them up
]


def _inputs(B, C, H, W, p, D, cls, device, image_grad=True):
    T = (H // p) * (W // p) + cls
    img = torch.randn(B, C, H, W, device=device, requires_grad=image_grad)
    w = (0.1 * torch.randn(D, C, p, p, device=device)).requires_grad_()
    b = torch.randn(D, device=device, requires_grad=True)
    ct = torch.randn(1, 1, D, device=device, requires_grad=True) if cls else None
    pos = torch.randn(1, T, D, device=device, requires_grad=True)
    return [img, w, b, ct, pos]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-C{}-{}x{}-p{}-D{}-cls{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_patch_embed_matches_reference(shape, dtype, device):
    check_op(patch_embed, patch_embed_ref, _inputs(*shape, device), dtype)


def test_patch_embed_channels_last_and_no_image_grad(device):
    img, w, b, ct, pos = _inputs(2, 3, 16, 16, 4, 32, True, device, image_grad=False)

    def op(fn):
        return lambda i, *rest: fn(i.contiguous(memory_format=torch.channels_last), *rest)

    check_op(op(patch_embed), op(patch_embed_ref), [img, w, b, ct, pos], torch.float32)


def test_patch_embed_under_autocast_matches_eager(device):
    img, w, b, ct, pos = _inputs(2, 3, 16, 16, 4, 32, True, device)
    with torch.autocast(device, dtype=torch.bfloat16):
        ours = patch_embed(img, w, b, ct, pos)
        eager = patch_embed_ref(img, w, b, ct, pos)
    assert ours.dtype == eager.dtype == torch.float32
    ref = patch_embed_ref(*[t.double() for t in (img, w, b, ct, pos)])
    assert (ours.double() - ref).norm() <= 2 * (eager.double() - ref).norm() + 1e-3 * ref.norm()


def test_patch_embed_rejects_bad_input(device, monkeypatch):
    img, w, b, ct, pos = _inputs(1, 3, 16, 16, 4, 32, True, device)
    with pytest.raises(ValueError, match="not divisible by the patch"):
        patch_embed(img[:, :, :15], w, b, ct, pos)
    with pytest.raises(ValueError, match="channels"):
        patch_embed(img[:, :2], w, b, ct, pos)
    with pytest.raises(ValueError, match="pos_embed"):
        patch_embed(img, w, b, ct, pos[:, :-1])
    with pytest.raises(TypeError, match="cast one"):
        patch_embed(img.half(), w, b, ct, pos)
    monkeypatch.setattr(_common, "interpreting", lambda: False)  # as on a GPU: the device check comes first
    with pytest.raises(RuntimeError, match="pos_embed on meta"):
        patch_embed(img, w, b, ct, pos.to("meta"))
