import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_matches, force_gemm_candidate

from fastvit_kernels import ViT, vit_base_patch16_224, vit_cifar10, vit_small_patch16_224, vit_tiny_patch16_224

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

TINY = dict(image_size=8, patch_size=4, num_classes=5, dim=32, depth=2, heads=2, mlp_dim=64)


def _timm_twin(pool="cls", **kw):
    cfg = dict(TINY, **kw)
    return VisionTransformer(
        img_size=cfg["image_size"],
        patch_size=cfg["patch_size"],
        num_classes=cfg["num_classes"],
        embed_dim=cfg["dim"],
        depth=cfg["depth"],
        num_heads=cfg["heads"],
        mlp_ratio=cfg["mlp_dim"] / cfg["dim"],
        global_pool="token" if pool == "cls" else "avg",
        qkv_bias=cfg.get("qkv_bias", True),
    )


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_state_dict_is_timms_and_logits_match(pool):
    ours = ViT(**TINY, pool=pool, backend="torch")
    theirs = _timm_twin(pool)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in theirs_sd.items()}
    theirs.load_state_dict(ours_sd)
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.forward_features(x), theirs.forward_features(x), rtol=1e-5, atol=1e-5)


def test_timm_weights_load_into_ours_unchanged():
    theirs = _timm_twin(qkv_bias=False)
    ours = ViT(**TINY, qkv_bias=False, backend="torch")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gemm", ["triton", "cublas", "triton+ln"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
def test_triton_and_torch_backends_agree_on_logits_and_gradients(pool, attn_impl, gemm, device, monkeypatch):
    # the fused path with each GEMM family, and with our residual GEMM and the row kernel for the GEMMs with the
    # LayerNorm ("triton+ln")
    force_gemm_candidate(monkeypatch, gemm)
    model = ViT(**TINY, pool=pool, attn_impl=attn_impl).to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    results = {}
    for backend in ("triton", "torch"):
        model.set_backend(backend)
        model.zero_grad()
        logits = model(x)
        logits.square().sum().backward()
        results[backend] = (logits, {n: p.grad.clone() for n, p in model.named_parameters()})
    ref = model.double().set_backend("torch")
    model.zero_grad()
    logits64 = ref(x.double())
    logits64.square().sum().backward()
    assert_matches(results["triton"][0], results["torch"][0], logits64, torch.float32, "logits")
    for name, p in ref.named_parameters():
        assert_matches(results["triton"][1][name], results["torch"][1][name], p.grad, torch.float32, name)


def test_non_square_images_and_dim_head(device):
    model = ViT(image_size=(8, 12), patch_size=4, num_classes=3, dim=24, depth=1, heads=2, mlp_dim=40, dim_head=16).to(
        device
    )
    x = torch.randn(2, 3, 8, 12, device=device)
    out_triton = model.set_backend("triton")(x)
    out_torch = model.set_backend("torch")(x)
    assert out_triton.shape == (2, 3)
    torch.testing.assert_close(out_triton, out_torch, rtol=1e-4, atol=1e-5)


def test_presets_have_the_advertised_shapes():
    with torch.device("meta"):
        m = vit_cifar10()
        assert m.num_patches == 64 and m.pos_embed.shape == (1, 65, 384) and len(m.blocks) == 12
        assert m.blocks[0].attn.num_heads == 6 and m.blocks[0].mlp.fc1.out_features == 1536
        assert vit_cifar10(depth=2).blocks.__len__() == 2
        for fn, dim, heads in [
            (vit_tiny_patch16_224, 192, 3),
            (vit_small_patch16_224, 384, 6),
            (vit_base_patch16_224, 768, 12),
        ]:
            m = fn()
            assert m.pos_embed.shape == (1, 197, dim) and m.blocks[0].attn.num_heads == heads
            assert m.head.out_features == 1000


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        ViT(**dict(TINY, image_size=10))
    with pytest.raises(ValueError, match="not divisible by heads"):
        ViT(**dict(TINY, dim=30, heads=4))
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ViT(**TINY, backend="cuda")
    with pytest.raises(ValueError, match="attn_impl"):
        ViT(**TINY, attn_impl="flash")
    with pytest.raises(ValueError, match="pool"):
        ViT(**TINY, pool="max")
    with pytest.raises(TypeError, match="image_size"):
        ViT(**dict(TINY, image_size=8.0))
    model = ViT(**TINY)
    with pytest.raises(ValueError, match="expects 8x8"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="1 channels; this model expects 3"):
        model(torch.randn(1, 1, 8, 8))
    with pytest.raises(TypeError, match="uint8"):
        model(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(TypeError, match="float64"):  # the kernels: fp32/fp16/bf16 (fp64 runs on backend='torch')
        model.set_backend("triton")(torch.randn(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        model(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="unknown backend"):
        model.set_backend("fast")


def test_dropout_in_blocks_is_refused_on_the_triton_path_not_silently_dropped(device):
    model = ViT(**TINY, dropout=0.1, backend="triton").to(device).train()
    with pytest.raises(NotImplementedError, match="dropout"):
        model(torch.randn(1, 3, 8, 8, device=device))
    model.eval()(torch.randn(1, 3, 8, 8, device=device))  # no dropout at eval: fine


def test_reduced_precision_parameters_run_on_both_backends(device):
    model = ViT(**TINY).to(device=device, dtype=torch.bfloat16)
    x = torch.randn(2, 3, 8, 8, device=device, dtype=torch.bfloat16)
    a = model.set_backend("triton")(x)
    # the eager baseline with explicit attention: like ours (and like SDPA's flash kernel on a GPU) it rounds P to
    # bf16 before P @ V; the CPU SDPA kernel keeps P in fp32, a different algorithm to bound against
    b = model.set_backend("torch", attn_impl="math")(x)
    assert a.dtype == b.dtype == torch.bfloat16
    ref = model.double()(x.double())
    assert_matches(a, b, ref, torch.bfloat16, "bf16 logits")


def test_env_var_sets_the_default_backend():
    code = (
        "from fastvit_kernels import ViT; m = ViT(image_size=8, patch_size=4, num_classes=2, dim=16, depth=1, "
        "heads=2, mlp_dim=16); print(m.backend)"
    )
    env = dict(os.environ, FASTVIT_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["torch"]
    env["FASTVIT_BACKEND"] = "bogus"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "FASTVIT_BACKEND='bogus'" in bad.stderr


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_grad_checkpointing_keeps_gradients_and_drops_saved_activations(backend, device):
    model = ViT(**dict(TINY, depth=3), backend=backend).to(device)
    x = torch.randn(2, 3, 8, 8, device=device)
    runs = {}
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        saved = []

        def pack(t, saved=saved):
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(x)
        logits.square().sum().backward()
        runs[enable] = (logits, {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved))
    # the same kernels run again: equal here; on a GPU, SDPA's backward may accumulate in another order
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-5, atol=1e-6)
    for name, g in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], g, rtol=1e-5, atol=1e-6, msg=name)
    # only each block's input is kept (3172 of 37012 saved elements with triton, at this size)
    assert runs[True][2] < runs[False][2] / 2, (runs[True][2], runs[False][2])


def test_timm_training_api_behaves_as_timms():
    ours = ViT(**TINY, backend="torch")
    theirs = _timm_twin()
    assert ours.no_weight_decay() <= theirs.no_weight_decay()
    assert ours.no_weight_decay() <= set(ours.state_dict())
    assert ours.get_classifier() is ours.head
    theirs.load_state_dict(ours.state_dict())
    ours.reset_classifier(7, global_pool="avg")
    theirs.reset_classifier(7, global_pool="avg")
    theirs.head.load_state_dict(ours.head.state_dict())
    x = torch.randn(3, 3, 8, 8)
    assert ours(x).shape == (3, 7)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    theirs.load_state_dict(ours.state_dict())  # still timm's keys and shapes after the reset
    ours.reset_classifier(0)
    assert ours(x).shape == (3, TINY["dim"])  # pooled features, as timm's num_classes=0
    with pytest.raises(ValueError, match="global_pool"):
        ours.reset_classifier(3, global_pool="max")


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_empty_batch_runs_forward_and_backward_on_both_backends(pool, device):
    model = ViT(**TINY, pool=pool).to(device)
    for backend in ("torch", "triton"):
        model.zero_grad(set_to_none=True)
        x = torch.randn(0, 3, 8, 8, device=device, requires_grad=True)
        out = model.set_backend(backend)(x)
        assert out.shape == (0, TINY["num_classes"]), backend
        out.sum().backward()
        assert x.grad.shape == x.shape
        for name, p in model.named_parameters():  # a sum over no images: every gradient is there, and zero
            assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), (backend, name)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_forward_head_pre_logits_and_num_features_are_timms(pool):
    ours = ViT(**TINY, pool=pool, backend="torch")
    theirs = _timm_twin(pool)
    theirs.load_state_dict(ours.state_dict())
    assert ours.num_features == theirs.num_features == TINY["dim"]
    feats = ours.forward_features(torch.randn(3, 3, 8, 8))
    pooled = ours.forward_head(feats, pre_logits=True)
    assert pooled.shape == (3, ours.num_features)
    torch.testing.assert_close(pooled, theirs.forward_head(feats, pre_logits=True))
    torch.testing.assert_close(ours.forward_head(feats), theirs.forward_head(feats))


def test_timm_checkpoint_without_class_token_is_refused_by_name():
    from fastvit_kernels.interop import UnsupportedCheckpoint

    theirs = VisionTransformer(
        img_size=8,
        patch_size=4,
        num_classes=5,
        embed_dim=32,
        depth=1,
        num_heads=2,
        class_token=False,
        global_pool="avg",
    )
    with pytest.raises(UnsupportedCheckpoint, match="no class token"):
        ViT.from_timm(theirs)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_input_dtype_that_is_not_the_weights_gets_one_message_on_both_backends(backend, device):
    model = ViT(**TINY, backend=backend).to(device)
    with pytest.raises(TypeError, match="input is torch.bfloat16 but the weights are torch.float32"):
        model(torch.randn(1, 3, 8, 8, device=device, dtype=torch.bfloat16))


def test_a_preset_is_one_registration():
    from fastvit_kernels import PRESETS, register_preset

    build = register_preset("vit_test_tiny", "a test preset", **TINY)
    try:
        assert PRESETS["vit_test_tiny"] is build and build.__name__ == "vit_test_tiny"
        model = build(depth=1)
        assert len(model.blocks) == 1 and model.embed_dim == TINY["dim"]
    finally:
        del PRESETS["vit_test_tiny"]


def test_a_model_on_the_meta_device_traces_shapes():
    # the meta device (shape tracing, FLOP counters, deferred init) has no autocast: the dtype checks must not ask it
    model = vit_cifar10(backend="torch").to("meta")
    out = model(torch.empty(3, 3, 32, 32, device="meta"))
    assert out.shape == (3, 10) and out.device.type == "meta"
