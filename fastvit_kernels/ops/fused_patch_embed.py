"""Patch embedding in one launch: im2col inside the GEMM, bias, position embedding and the CLS row.

tokens[b, 0]     = cls_token + pos_embed[0]                          (when there is a class token)
tokens[b, 1 + p] = patch(b, p) . W^T + bias + pos_embed[1 + p]

The A operand is gathered straight from the image through its four strides (NCHW, channels-last or any view): no
unfold, no permuted copy. The weight is the Conv2d weight [D, C, ph, pw] read as [D, C*ph*pw], so column k of a
patch is (c, i, j) = (k // (ph*pw), (k // pw) % ph, k % pw), the order Conv2d flattens its weight in.
"""

import torch

from ..configs import (
    GROUP_M,
    PATCH_EMBED_BWD_CONFIGS,
    PATCH_EMBED_FWD_CONFIGS,
    prune_patch_embed_dw,
    prune_patch_embed_dx,
    prune_patch_embed_fwd,
)
from ..kernels.patch_embed import patch_embed_bwd_dw_kernel, patch_embed_bwd_dx_kernel, patch_embed_fwd_kernel
from ..tuning import Launcher
from ._common import (
    arrival_counters,
    autocast_on,
    call,
    cdiv,
    check_same_device,
    check_tensor,
    compute_dtype,
    custom_op,
    dot_precision,
    on_input_device,
    register_autograd,
    split_rows,
)

# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
_KEY = ["B", "P", "K", "N", "PH", "PW", "DOT_PRECISION"]
_fwd = Launcher(patch_embed_fwd_kernel, PATCH_EMBED_FWD_CONFIGS, _KEY, prune_patch_embed_fwd)
_bwd_dw = Launcher(patch_embed_bwd_dw_kernel, PATCH_EMBED_BWD_CONFIGS, _KEY, prune_patch_embed_dw)
_bwd_dx = Launcher(patch_embed_bwd_dx_kernel, PATCH_EMBED_BWD_CONFIGS, _KEY, prune_patch_embed_dx)


def _key(images, D, K, ph, pw, a, b, dot):
    """What a configuration depends on: the geometry, the GEMM operands' dtypes (shared memory), the dot's precision
    and the device."""
    return (*images.shape, D, K, ph, pw, a.dtype, b.dtype, dot, images.device)


def _geometry(images, weight):
    B, C, H, Wd = images.shape
    D, _, ph, pw = weight.shape
    return B, C, H, Wd, D, ph, pw, (H // ph) * (Wd // pw), Wd // pw


def patch_embed_fwd(images, weight, bias, cls_token, pos_embed, out_dtype):
    B, C, H, Wd, D, ph, pw, P, GW = _geometry(images, weight)
    has_cls = cls_token is not None
    K = C * ph * pw
    out = torch.empty((B, P + has_cls, D), device=images.device, dtype=out_dtype)
    w2 = weight.reshape(D, K)
    pos = pos_embed.reshape(P + has_cls, D)
    if B == 0:  # an empty batch: nothing to launch (a grid of zero programs is not a launch CUDA accepts)
        return out

    def grid(cfg):
        n_tiles = cdiv(D, cfg["BLOCK_N"])
        cls_tiles = cdiv(B, cfg["BLOCK_M"]) * n_tiles if has_cls else 0
        return (cdiv(B * P, cfg["BLOCK_M"]) * n_tiles + cls_tiles,)

    dot = dot_precision(w2.dtype)
    key = _key(images, D, K, ph, pw, images, w2, dot) + (has_cls,)
    _fwd.launch(
        key,
        grid,
        images,
        w2,
        bias,
        pos,
        cls_token.reshape(D) if has_cls else None,
        out,
        B,
        P,
        GW,
        K,
        D,
        images.stride(0),
        images.stride(1),
        images.stride(2),
        images.stride(3),
        w2.stride(0),
        w2.stride(1),
        pos.stride(0),
        out.stride(0),
        out.stride(1),
        PH=ph,
        PW=pw,
        DOT_PRECISION=dot,
        GROUP_M=GROUP_M,
    )
    return out


def patch_embed_bwd_weight(g, images, weight):
    """dW [D, C, ph, pw] in fp32 from g = dTokens for the patch rows, a [B, P, D] view."""
    g = g if g.stride(-1) == 1 else g.contiguous()  # rows through strides, features at unit stride
    B, C, H, Wd, D, ph, pw, P, GW = _geometry(images, weight)
    K = C * ph * pw
    R = B * P
    if R == 0:
        return torch.zeros((D, C, ph, pw), device=g.device, dtype=torch.float32)
    tiles = cdiv(D, 64) * cdiv(K, 64)
    splits, rows_per_split = split_rows(R, tiles, g.device)
    dw = torch.empty((D, K), device=g.device, dtype=torch.float32)
    part = arrived = None
    if splits > 1:  # the kernel's last split per tile adds the partials up
        part = torch.empty((splits, D, K), device=g.device, dtype=torch.float32)
        arrived = arrival_counters(cdiv(D, 16) * cdiv(K, 16), g.device)  # any tile >= 16
    dot = dot_precision(g.dtype)
    key = _key(images, D, K, ph, pw, g, images, dot)
    _bwd_dw.launch(
        key,
        lambda cfg: (cdiv(D, cfg["BLOCK_M"]), cdiv(K, cfg["BLOCK_N"]), splits),
        g,
        images,
        dw,
        part,
        arrived,
        B,
        P,
        GW,
        K,
        D,
        rows_per_split,
        g.stride(0),
        g.stride(1),
        images.stride(0),
        images.stride(1),
        images.stride(2),
        images.stride(3),
        D * K,
        PH=ph,
        PW=pw,
        DOT_PRECISION=dot,
    )
    return dw.view(D, C, ph, pw)


def patch_embed_bwd_images(g, weight, images):
    g = g if g.stride(-1) == 1 else g.contiguous()
    B, C, H, Wd, D, ph, pw, P, GW = _geometry(images, weight)
    K = C * ph * pw
    w2 = weight.reshape(D, K)
    dimg = torch.empty((B, C, H, Wd), device=g.device, dtype=images.dtype)
    if B == 0:
        return dimg
    dot = dot_precision(g.dtype)
    key = _key(images, D, K, ph, pw, g, w2, dot)
    _bwd_dx.launch(
        key,
        lambda cfg: (cdiv(B * P, cfg["BLOCK_M"]), cdiv(K, cfg["BLOCK_N"])),
        g,
        w2,
        dimg,
        B,
        P,
        GW,
        K,
        D,
        g.stride(0),
        g.stride(1),
        w2.stride(0),
        w2.stride(1),
        dimg.stride(0),
        dimg.stride(1),
        dimg.stride(2),
        dimg.stride(3),
        PH=ph,
        PW=pw,
        DOT_PRECISION=dot,
    )
    return dimg


# ----------------------------------------------------------------------------------------------------------------
# Custom ops (torch.library) and the autograd formula: opaque to torch.compile, no graph break.
# ----------------------------------------------------------------------------------------------------------------
Tensor = torch.Tensor


@custom_op("fastvit::patch_embed_fwd")
@on_input_device
def _patch_embed_fwd(
    images: Tensor, weight: Tensor, bias: Tensor, cls_token: Tensor | None, pos_embed: Tensor, out_dtype: torch.dtype
) -> Tensor:
    return patch_embed_fwd(images, weight, bias, cls_token, pos_embed, out_dtype)


@_patch_embed_fwd.register_fake
def _(images, weight, bias, cls_token, pos_embed, out_dtype):
    B, _, H, W = images.shape
    D, _, ph, pw = weight.shape
    return images.new_empty((B, (H // ph) * (W // pw) + (cls_token is not None), D), dtype=out_dtype)


@custom_op("fastvit::patch_embed_bwd_weight")
@on_input_device
def _patch_embed_bwd_weight(g: Tensor, images: Tensor, weight: Tensor) -> Tensor:
    return patch_embed_bwd_weight(g, images, weight).to(weight.dtype)


@_patch_embed_bwd_weight.register_fake
def _(g, images, weight):
    return torch.empty_like(weight)


@custom_op("fastvit::patch_embed_bwd_images")
@on_input_device
def _patch_embed_bwd_images(g: Tensor, weight: Tensor, images: Tensor) -> Tensor:
    return patch_embed_bwd_images(g, weight, images)


@_patch_embed_bwd_images.register_fake
def _(g, weight, images):
    return images.new_empty(images.shape)


def _patch_embed_setup(ctx, inputs, output):
    images, weight, bias, cls_token, pos_embed, _ = inputs
    ctx.save_for_backward(images, weight)
    ctx.has_cls = cls_token is not None
    ctx.dtypes = (bias.dtype, None if cls_token is None else cls_token.dtype, pos_embed.dtype)


def _patch_embed_backward(ctx, dout):
    images, weight = ctx.saved_tensors
    bias_dt, cls_dt, pos_dt = ctx.dtypes
    c = int(ctx.has_cls)
    dpos = dout.sum(0, dtype=torch.float32)  # (T, D): the batch reduction pos_embed, cls and bias all need
    dbias = dpos[c:].sum(0).to(bias_dt)
    dcls = dpos[0].view(1, 1, -1).to(cls_dt) if ctx.has_cls else None
    # (B, P, D) in the compute dtype, as eager autocast's backward; the kernels read its rows through strides
    g = dout[:, c:].to(weight.dtype)
    dw = call(_patch_embed_bwd_weight, g, images, weight) if ctx.needs_input_grad[1] else None
    dimg = call(_patch_embed_bwd_images, g, weight, images) if ctx.needs_input_grad[0] else None
    return dimg, dw, dbias, dcls, dpos.unsqueeze(0).to(pos_dt), None


register_autograd(_patch_embed_fwd, _patch_embed_backward, _patch_embed_setup)


def patch_embed(images, weight, bias, cls_token, pos_embed):
    """Tokens [B, T, D] = conv2d(images, weight, bias, stride=patch) as rows, with the CLS row first and pos_embed added.

    cls_token [1, 1, D] or None (then T = P); pos_embed [1, T, D]. Under autocast the GEMM runs in the autocast dtype
    and the tokens come out in the promoted dtype of that and pos_embed (fp32 with fp32 parameters), as in eager.
    """
    check_same_device(images=images, weight=weight, bias=bias, cls_token=cls_token, pos_embed=pos_embed)
    check_tensor(images, "images")
    check_tensor(weight, "patch weight")
    if images.dim() != 4 or weight.dim() != 4:
        raise ValueError(
            f"images must be [B, C, H, W] and weight [D, C, ph, pw]; got {tuple(images.shape)} and "
            f"{tuple(weight.shape)}"
        )
    B, C, H, Wd = images.shape
    D, wc, ph, pw = weight.shape
    if C != wc:
        raise ValueError(f"images have {C} channels but the patch projection expects {wc}")
    if H % ph or Wd % pw:
        raise ValueError(f"image size {H}x{Wd} is not divisible by the patch size {ph}x{pw}")
    T = (H // ph) * (Wd // pw) + (cls_token is not None)
    if bias is None or bias.shape != (D,):
        raise ValueError(f"bias must have shape ({D},)")
    if cls_token is not None and cls_token.numel() != D:
        raise ValueError(f"cls_token has shape {tuple(cls_token.shape)}; expected (1, 1, {D})")
    if pos_embed.shape[-2:] != (T, D) or pos_embed.numel() != T * D:
        raise ValueError(
            f"pos_embed has shape {tuple(pos_embed.shape)}; expected (1, {T}, {D}) for {H}x{Wd} images "
            f"with {ph}x{pw} patches"
        )
    if not autocast_on(images.device) and images.dtype != weight.dtype:
        raise TypeError(f"images are {images.dtype} but the weight is {weight.dtype}: cast one, or run under autocast")
    cdt = compute_dtype(weight)
    out_dtype = torch.promote_types(cdt, pos_embed.dtype)
    return call(_patch_embed_fwd, images, weight.to(cdt), bias.to(cdt), cls_token, pos_embed, out_dtype)


def patch_embed_ref(images, weight, bias, cls_token, pos_embed):
    """Eager: conv2d + flatten + transpose + cat + add."""
    x = torch.nn.functional.conv2d(images, weight, bias, stride=weight.shape[-2:])
    x = x.flatten(2).transpose(1, 2)  # (B, P, D)
    if cls_token is not None:
        x = torch.cat([cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
    return x + pos_embed
