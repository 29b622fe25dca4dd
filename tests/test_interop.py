import pytest
import torch

from fastvit_kernels import ViT
from fastvit_kernels.interop import UnsupportedCheckpoint, resample_pos_embed

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
from timm.layers import resample_abs_pos_embed  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from torchvision.models.vision_transformer import VisionTransformer as TVViT  # noqa: E402


def _timm(**kw):
    cfg = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=7)
    cfg.update(kw)
    return VisionTransformer(**cfg).eval()


def _tv():
    return TVViT(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=7
    ).eval()


def _same_gradients(ours, theirs, x, to_theirs=lambda name: name):
    """Backward through both models on the same cotangent: every parameter's gradient agrees (names mapped)."""
    cot = torch.randn(x.shape[0], 7)
    ours(x).backward(cot)
    theirs(x).backward(cot)
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, grads[to_theirs(name)].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_from_timm_gives_timms_logits_and_gradients(global_pool):
    theirs = _timm(global_pool=global_pool)
    ours = ViT.from_timm(theirs, backend="torch").eval()
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    assert not ours.load_report.missing_keys and not ours.load_report.unexpected_keys
    _same_gradients(ours, theirs, x)


def test_from_torchvision_gives_torchvisions_logits():
    theirs = _tv()
    ours = ViT.from_torchvision(theirs, backend="torch").eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_legacy_torchvision_mlp_names_map_too():
    sd = {
        k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v
        for k, v in _tv().state_dict().items()
    }
    ours = ViT.from_torchvision(sd, heads=2, backend="torch")
    assert torch.equal(ours.blocks[0].mlp.fc1.weight, sd["encoder.layers.encoder_layer_0.mlp.linear_1.weight"])


def test_triton_backend_matches_timm_on_a_tiny_model(device):
    theirs = _timm()
    ours = ViT.from_timm(theirs, backend="triton").to(device).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(ours(x.to(device)).cpu(), theirs(x), rtol=1e-4, atol=1e-4)
    cot = torch.randn(2, 7)
    ours(x.to(device)).backward(cot.to(device))
    theirs(x).backward(cot)
    grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():  # our kernels' backward against timm's autograd
        torch.testing.assert_close(p.grad.cpu(), grads[name].grad, rtol=1e-3, atol=1e-5, msg=name)


def test_round_trip_through_timm_state_dict_is_exact():
    ours = ViT(image_size=16, patch_size=8, num_classes=7, dim=32, depth=2, heads=2, mlp_dim=128)
    theirs = _timm()
    theirs.load_state_dict(ours.to_timm_state_dict())
    back = ViT.from_timm(theirs.state_dict(), heads=2)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_from_pretrained_reads_both_layouts_and_resamples_pos_embed(tmp_path):
    theirs = _timm()
    torch.save(theirs.state_dict(), tmp_path / "timm.pth")
    torch.save({"model": _tv().state_dict()}, tmp_path / "tv.pt")
    a = ViT.from_pretrained(tmp_path / "timm.pth", heads=2, image_size=32)
    assert a.pos_embed.shape == (1, 17, 32)
    torch.testing.assert_close(a.pos_embed, resample_abs_pos_embed(theirs.pos_embed, (4, 4), num_prefix_tokens=1))
    assert torch.equal(a.pos_embed[:, 0], theirs.pos_embed[:, 0])  # the CLS row is kept as it is
    b = ViT.from_pretrained(tmp_path / "tv.pt", heads=2)
    assert b.head.out_features == 7
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, str(tmp_path / "w.safetensors"))
    c = ViT.from_pretrained(tmp_path / "w.safetensors", heads=2)
    assert torch.equal(c.pos_embed, theirs.pos_embed)


def test_resample_is_identity_on_the_same_grid():
    pe = torch.randn(1, 5, 8)
    assert resample_pos_embed(pe, (2, 2)) is pe


def test_unsupported_layouts_are_refused_with_the_keys_that_did_not_map():
    distilled = dict(_timm().state_dict(), dist_token=torch.zeros(1, 1, 32))
    with pytest.raises(UnsupportedCheckpoint, match="dist_token"):
        ViT.from_timm(distilled, heads=2)
    vit_pytorch_like = dict(_timm().state_dict(), **{"to_patch_embedding.1.weight": torch.ones(192)})
    with pytest.raises(UnsupportedCheckpoint, match="to_patch_embedding.1.weight"):
        ViT.from_timm(vit_pytorch_like, heads=2)
    with pytest.raises(UnsupportedCheckpoint, match="do not map"):
        ViT.from_torchvision(dict(_tv().state_dict(), **{"encoder.extra": torch.zeros(1)}), heads=2)
    with pytest.raises(ValueError, match="heads="):
        ViT.from_timm(_timm().state_dict())


def test_strict_false_reports_missing_keys():
    sd = {k: v for k, v in _timm().state_dict().items() if not k.startswith("head.")}
    ours = ViT.from_timm(sd, heads=2, strict=False, num_classes=7)
    assert set(ours.load_report.missing_keys) == {"head.weight", "head.bias"}
    with pytest.raises(RuntimeError, match="Missing key"):
        ViT.from_timm(sd, heads=2, num_classes=7)
