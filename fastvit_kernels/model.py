"""The Vision Transformer: the ViT paper's architecture with timm's module names and state_dict keys.

Every layer holds its eager PyTorch path (`forward`, calling the ops' `*_ref` references where there is one) and its
fused path (`forward_fused` / `tokens(..., fused=True)`, our kernels). The ViT decides which runs, in one place
(`_fused`, from its `backend` and fastvit_kernels.backend), so a test can flip the same weights.
On the Triton path the blocks pass (x, h) along, h = the next LayerNorm of the residual stream x, written by the GEMM
that wrote x: a block is qkv -> attention -> proj (+ residual, norm2) -> fc1 (+ GELU) -> fc2 (+ residual, the next
block's norm1, or the final norm), five launches where the model is at most 512 wide.
"""

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from . import ops, plan
from .backend import check_attn_impl, check_backend, default_backend, use_triton
from .ops._common import autocast_on


def _pair(v, name):
    if isinstance(v, int) and not isinstance(v, bool):
        pair = (v, v)
    elif isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        pair = tuple(v)
    else:
        raise TypeError(f"{name} must be an int or an (h, w) pair of ints, got {v!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be positive, got {v!r}")
    return pair


def _check_int(name, v, minimum=1):
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {v!r}")
    if v < minimum:
        raise ValueError(f"{name} must be {'positive' if minimum == 1 else f'at least {minimum}'}, got {v}")


def _check_float(name, v, low, high=None):
    """low < v (< high): the range a rate or an epsilon may take."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise TypeError(f"{name} must be a number, got {v!r}")
    if not (v > low if high is None else low <= v < high):
        raise ValueError(f"{name} must be {f'in [{low}, {high})' if high is not None else f'> {low}'}, got {v}")


class PatchEmbed(nn.Module):
    """Image to patch tokens [B, P, D] with a strided Conv2d (timm's PatchEmbed)."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.img_size = _pair(img_size, "image_size")
        self.patch_size = _pair(patch_size, "patch_size")
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise ValueError(f"image size {self.img_size} is not divisible by the patch size {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, P, D)

    def tokens(self, x, cls_token, pos_embed, fused: bool):
        """[B, 1 + P, D]: the patches with the class token in front and the position embedding added; one kernel
        when fused, the eager reference otherwise."""
        embed = ops.patch_embed if fused else ops.patch_embed_ref
        return embed(x, self.proj.weight, self.proj.bias, cls_token, pos_embed)


def _refuse_fused_dropout(p: float) -> None:
    """For a module in training mode: its dropout rate, which the fused path does not have."""
    if p > 0:
        raise NotImplementedError(
            "dropout inside the blocks is not fused into the Triton kernels: train with dropout=0 "
            "(emb_dropout is supported) or use backend='torch'"
        )


class Attention(nn.Module):
    def __init__(self, dim, num_heads, head_dim, qkv_bias=True, dropout=0.0, attn_impl="sdpa"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.attn_impl = check_attn_impl(attn_impl)
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)  # packed [q | k | v], heads contiguous in each
        self.attn_drop = nn.Dropout(dropout)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x):
        """Eager: proj(attention(x)) without the residual, as timm's Attention returns it."""
        p = self.attn_drop.p if self.training else 0.0
        o = ops.attention_ref(self.qkv(x), self.num_heads, self.scale, impl=self.attn_impl, dropout_p=p)
        return self.proj_drop(self.proj(o))

    def forward_fused(self, x, h, norm: nn.LayerNorm):
        """(x + proj(attention(qkv(h))), norm(that)) in three launches, h = norm1(x) in the compute dtype: the
        block's attention half, residual and norm2 included."""
        if self.training:
            _refuse_fused_dropout(self.attn_drop.p)
        qkv, proj = self.qkv, self.proj
        o = ops.qkv_attention(h, qkv.weight, qkv.bias, self.num_heads, self.scale)  # (B, N, inner)
        return ops.linear_residual_layernorm(o, proj.weight, proj.bias, x, norm.weight, norm.bias, norm.eps)


class Mlp(nn.Module):
    def __init__(self, dim, hidden, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf, as in the paper and timm
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))

    def forward_fused(self, x, h, next_norm: nn.LayerNorm | None, normed_dtype=None):
        """(x + fc2(gelu(fc1(h))), next_norm(that)) with h = norm2(x): the block's MLP half, residual and the next
        LayerNorm included (None without one: the last block of a model without a final norm)."""
        if self.training:
            _refuse_fused_dropout(self.drop1.p)
        fc1, fc2 = self.fc1, self.fc2
        params = (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        if next_norm is None:
            return ops.mlp_residual(h, x, *params), None
        n = next_norm
        return ops.mlp_residual_layernorm(h, x, *params, n.weight, n.bias, n.eps, normed_dtype)


class Block(nn.Module):
    """Pre-norm encoder block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim, num_heads, head_dim, mlp_dim, qkv_bias=True, dropout=0.0, eps=1e-6, attn_impl="sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, head_dim, qkv_bias, dropout, attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, dropout)

    def forward(self, x):
        """Eager, as timm's Block."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def forward_fused(self, x, h, next_norm: nn.LayerNorm | None, normed_dtype=None):
        """Our kernels on (x, h = norm1(x)): returns (x', next_norm(x')), x' the block's output. next_norm's output in
        normed_dtype (default: the compute dtype, which the next block's qkv reads)."""
        x, h = self.attn.forward_fused(x, h, self.norm2)
        return self.mlp.forward_fused(x, h, next_norm, normed_dtype)


class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al.), with timm's submodule names, so timm checkpoints load as they are.

    Takes the keyword arguments of vit_pytorch.ViT. pool='mean' averages the patch tokens (timm's 'avg', which
    leaves out the class token) and uses `fc_norm`, as timm does.
    """

    def __init__(
        self,
        *,
        image_size,
        patch_size,
        num_classes,
        dim,
        depth,
        heads,
        mlp_dim,
        pool="cls",
        channels=3,
        dim_head=None,
        dropout=0.0,
        emb_dropout=0.0,
        qkv_bias=True,
        eps=1e-6,
        backend=None,
        attn_impl="sdpa",
    ):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        for name, v in dict(dim=dim, depth=depth, heads=heads, mlp_dim=mlp_dim, channels=channels).items():
            _check_int(name, v)
        _check_int("num_classes", num_classes, minimum=0)
        if dim_head is not None:
            _check_int("dim_head", dim_head)
        _check_float("dropout", dropout, 0.0, 1.0)
        _check_float("emb_dropout", emb_dropout, 0.0, 1.0)
        _check_float("eps", eps, 0.0)
        if not isinstance(qkv_bias, bool):
            raise TypeError(f"qkv_bias must be True or False, got {qkv_bias!r}")
        if dim_head is None:
            if dim % heads:
                raise ValueError(f"dim {dim} is not divisible by heads {heads} (or pass dim_head)")
            dim_head = dim // heads
        self.num_classes = num_classes
        self.pool = pool
        self.channels = channels
        self.embed_dim = dim
        self.patch_embed = PatchEmbed(image_size, patch_size, channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, dim))
        self.pos_drop = nn.Dropout(emb_dropout)
        self.blocks = nn.Sequential(
            *[Block(dim, heads, dim_head, mlp_dim, qkv_bias, dropout, eps, attn_impl) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim, eps=eps) if pool == "cls" else nn.Identity()
        self.fc_norm = nn.LayerNorm(dim, eps=eps) if pool == "mean" else nn.Identity()
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self._init_weights()
        self.set_backend(default_backend() if backend is None else backend, attn_impl)

    def _init_weights(self):
        # timm's default ('') init: truncated normal(0.02) for pos_embed and every Linear, tiny normal for cls_token
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def set_backend(self, backend: str, attn_impl: str | None = None) -> "ViT":
        """Switch every module to `backend` ('auto', 'triton', 'torch'); attn_impl ('math'|'sdpa') for 'torch'."""
        self.backend = check_backend(backend)
        if attn_impl is not None:
            check_attn_impl(attn_impl)
            for blk in self.blocks:
                blk.attn.attn_impl = attn_impl
        return self

    def _fused(self, x) -> bool:
        """The one place a forward decides between our kernels and the eager path (fastvit_kernels.backend)."""
        return use_triton(self.backend, x.device)

    def _check_images(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"images have dtype {x.dtype}; expected float32, float16 or bfloat16 (normalise first)")
        if x.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.channels:
            raise ValueError(f"images have {x.shape[1]} channels; this model expects {self.channels}")
        if tuple(x.shape[2:]) != self.patch_embed.img_size:
            raise ValueError(
                f"images are {x.shape[2]}x{x.shape[3]}; this model expects "
                f"{self.patch_embed.img_size[0]}x{self.patch_embed.img_size[1]}"
            )
        weight = self.patch_embed.proj.weight
        if not autocast_on(x.device) and x.dtype != weight.dtype:  # both backends say the same
            raise TypeError(f"input is {x.dtype} but the weights are {weight.dtype}: cast one, or run under autocast")

    def _run(self, step, *args):
        if self.grad_checkpointing and torch.is_grad_enabled():  # keep the block's input; it runs again
            return checkpoint(step, *args, use_reentrant=False)
        return step(*args)

    def _features(self, x, fused):
        """forward_features on either path."""
        self._check_images(x)
        x = self.pos_drop(self.patch_embed.tokens(x, self.cls_token, self.pos_embed, fused))  # (B, 1 + P, D)
        if not fused:
            for blk in self.blocks:
                x = self._run(blk, x)
            return self.norm(x)
        # each block hands the next its input's LayerNorm; the last one the final norm's, in the stream's dtype (as
        # eager's norm returns it under autocast), or nothing where the model has no final norm (pool='mean')
        final = self.norm if isinstance(self.norm, nn.LayerNorm) else None
        blocks = list(self.blocks)
        n1 = blocks[0].norm1
        h = ops.layer_norm(x, n1.weight, n1.bias, n1.eps)
        for blk, nxt in zip(blocks, blocks[1:] + [None]):
            next_norm, normed_dtype = (final, x.dtype) if nxt is None else (nxt.norm1, None)
            x, h = self._run(blk.forward_fused, x, h, next_norm, normed_dtype)
        return x if final is None else h

    def forward_features(self, x):
        """Tokens after the last block and the final norm: [B, 1 + P, D] (timm's forward_features); replayed from
        its own step plans as forward is (a feature extractor's calls)."""
        fused = self._fused(x)
        if fused:
            return plan.run(self, self._forward_features, x, what="features")
        return self._features(x, fused)

    def _forward_features(self, x):
        return self._features(x, True)

    def forward_head(self, x, pre_logits: bool = False):
        """Pooling, fc_norm and the head on forward_features' tokens (timm's signature: pre_logits=True stops before
        the head and returns the pooled features, [B, num_features])."""
        x = x[:, 1:].mean(dim=1) if self.pool == "mean" else x[:, 0]
        x = self.fc_norm(x)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        """The logits [B, num_classes]. On our kernels, from the third call with x's signature on, the step plan
        recorded at the second is replayed (fastvit_kernels.plan: the same kernels and operations, forward and, when
        gradients are on, backward, with little host time)."""
        if self._fused(x):
            return plan.run(self, self._forward_fused, x, what="logits")
        return self.forward_head(self._features(x, False))

    def _forward_fused(self, x):
        return self.forward_head(self._features(x, True))

    # -- timm's model API, so training code written for timm's VisionTransformer runs unchanged -----------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in the backward instead of keeping its activations (timm's method)."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameters to leave out of weight decay, as timm names them (its optimizer factory reads this)."""
        return {"pos_embed", "cls_token"}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head for `num_classes` (0: none, features out), freshly initialised on the model's device and dtype,
        as timm's reset_classifier does; global_pool 'token'/'cls' or 'avg'/'mean' switches the pooling."""
        if global_pool is not None:
            pools = {"token": "cls", "cls": "cls", "avg": "mean", "mean": "mean"}
            if global_pool not in pools:
                raise ValueError(f"global_pool must be one of {sorted(pools)}, got {global_pool!r}")
            self.pool = pools[global_pool]  # the norms stay where they are, as in timm
        ref = self.cls_token
        self.num_classes = num_classes
        self.head = (
            nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )
        self.head.train(self.training)

    # -- weights in and out (fastvit_kernels.interop) ----------------------------------------------------------------
    @classmethod
    def from_timm(cls, model_or_state_dict, *, heads=None, image_size=None, strict=True, **kwargs) -> "ViT":
        """A ViT with a timm VisionTransformer's configuration and weights. `heads` is read off a timm model; pass it
        with a bare state_dict. `image_size` other than the checkpoint's resamples pos_embed (bicubic, CLS kept).
        The load's missing/unexpected keys are in `.load_report`."""
        from . import interop

        if heads is None and hasattr(model_or_state_dict, "blocks"):
            heads = model_or_state_dict.blocks[0].attn.num_heads
        return cls._from_timm_layout(interop._state_dict(model_or_state_dict), heads, image_size, strict, kwargs)

    @classmethod
    def from_torchvision(cls, model_or_state_dict, *, heads=None, image_size=None, strict=True, **kwargs) -> "ViT":
        """A ViT from a torchvision VisionTransformer (conv_proj, encoder.layers.encoder_layer_i, heads.head)."""
        from . import interop

        if heads is None and hasattr(model_or_state_dict, "encoder"):
            heads = model_or_state_dict.encoder.layers[0].self_attention.num_heads
        sd = interop.torchvision_to_timm(interop._state_dict(model_or_state_dict))
        return cls._from_timm_layout(sd, heads, image_size, strict, kwargs)

    @classmethod
    def from_pretrained(cls, path, *, heads, image_size=None, strict=True, **kwargs) -> "ViT":
        """A ViT from a checkpoint file of either layout (.pth/.pt, or .safetensors with safetensors installed)."""
        from . import interop

        sd = interop.read_checkpoint(path)
        if interop.detect_layout(sd) == "torchvision":
            sd = interop.torchvision_to_timm(sd)
        return cls._from_timm_layout(sd, heads, image_size, strict, kwargs)

    @classmethod
    def _from_timm_layout(cls, sd, heads, image_size, strict, kwargs):
        from . import interop

        interop._check_timm_layout(sd)
        if heads is None:
            raise ValueError("the number of heads cannot be read off the weights: pass heads=")
        cfg = interop.config_from_timm_state_dict(sd, image_size)
        cfg.update(kwargs)
        model = cls(heads=heads, **cfg)
        model.load_report = interop.load_timm_layout(model, sd, strict=strict)
        return model

    def to_timm_state_dict(self) -> dict:
        from .interop import to_timm_state_dict

        return to_timm_state_dict(self)

    @property
    def num_features(self) -> int:
        """Width of the pooled features the head reads (timm's attribute)."""
        return self.embed_dim

    @property
    def num_patches(self):
        return self.patch_embed.num_patches

    def flops_per_image(self) -> float:
        """Forward matmul FLOPs per image (2 per multiply-add), for TFLOP/s and MFU in the benchmarks."""
        D, T = self.embed_dim, self.num_patches + 1
        blk = self.blocks[0]
        inner = blk.attn.num_heads * blk.attn.head_dim
        hidden = blk.mlp.fc1.out_features
        k = self.patch_embed.proj.weight[0].numel()
        per_block = 2 * T * (D * 3 * inner + inner * D + 2 * D * hidden) + 2 * 2 * T * T * inner
        return 2 * self.num_patches * k * D + len(self.blocks) * per_block + 2 * D * max(self.num_classes, 0)


PRESETS: dict = {}  # name -> builder; fastvit-train --preset reads it


def register_preset(name: str, doc: str, **defaults):
    """A named configuration, in one edit: `name(**overrides)` builds ViT(**defaults) with the overrides applied."""

    def build(**overrides) -> ViT:
        return ViT(**{**defaults, **overrides})

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    PRESETS[name] = build
    return build


vit_cifar10 = register_preset(
    "vit_cifar10", "The benchmark configuration: 32x32 images, 4x4 patches (65 tokens), dim 384, depth 12, 6 heads.",
    image_size=32, patch_size=4, num_classes=10, dim=384, depth=12, heads=6, mlp_dim=1536,
)  # fmt: skip
vit_tiny_patch16_224 = register_preset(
    "vit_tiny_patch16_224", "timm's vit_tiny_patch16_224 (ViT-Ti/16).",
    image_size=224, patch_size=16, num_classes=1000, dim=192, depth=12, heads=3, mlp_dim=768,
)  # fmt: skip
vit_small_patch16_224 = register_preset(
    "vit_small_patch16_224", "timm's vit_small_patch16_224 (ViT-S/16).",
    image_size=224, patch_size=16, num_classes=1000, dim=384, depth=12, heads=6, mlp_dim=1536,
)  # fmt: skip
vit_base_patch16_224 = register_preset(
    "vit_base_patch16_224", "timm's vit_base_patch16_224 (ViT-B/16).",
    image_size=224, patch_size=16, num_classes=1000, dim=768, depth=12, heads=12, mlp_dim=3072,
)  # fmt: skip
