"""Weights in and out: timm and torchvision ViTs, checkpoint files, position-embedding resampling.

Our state_dict *is* timm's, so timm weights load as they are; torchvision's names are mapped onto timm's here.
Layouts we cannot represent (vit_pytorch's extra patch LayerNorms, distillation or register tokens, ...) are refused
with the list of keys that did not map, never loaded half-way.
"""

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

_TV_LAYER = re.compile(r"encoder\.layers\.encoder_layer_(\d+)\.(.+)")
_TV_BLOCK_MAP = {
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "self_attention.in_proj_weight": "attn.qkv.weight",
    "self_attention.in_proj_bias": "attn.qkv.bias",
    "self_attention.out_proj.weight": "attn.proj.weight",
    "self_attention.out_proj.bias": "attn.proj.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    "mlp.0.weight": "mlp.fc1.weight",
    "mlp.0.bias": "mlp.fc1.bias",
    "mlp.3.weight": "mlp.fc2.weight",
    "mlp.3.bias": "mlp.fc2.bias",
    "mlp.linear_1.weight": "mlp.fc1.weight",
    "mlp.linear_1.bias": "mlp.fc1.bias",  # torchvision's legacy names
    "mlp.linear_2.weight": "mlp.fc2.weight",
    "mlp.linear_2.bias": "mlp.fc2.bias",
}
_TV_TOP_MAP = {
    "conv_proj.weight": "patch_embed.proj.weight",
    "conv_proj.bias": "patch_embed.proj.bias",
    "class_token": "cls_token",
    "encoder.pos_embedding": "pos_embed",
    "encoder.ln.weight": "norm.weight",
    "encoder.ln.bias": "norm.bias",
    "heads.head.weight": "head.weight",
    "heads.head.bias": "head.bias",
}
_TIMM_KEY = re.compile(
    r"^(cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|(norm|fc_norm|head)\.(weight|bias)|"
    r"blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias))$"
)


class UnsupportedCheckpoint(ValueError):
    """A checkpoint whose layout this ViT cannot represent."""


def _state_dict(obj):
    if isinstance(obj, torch.nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):  # common wrappers of training checkpoints
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        return obj
    raise TypeError(f"expected an nn.Module or a state_dict, got {type(obj).__name__}")


def torchvision_to_timm(sd: dict) -> dict:
    """Rename a torchvision VisionTransformer state_dict to timm's names; refuses keys that do not map."""
    out, unmapped = {}, []
    for k, v in sd.items():
        m = _TV_LAYER.fullmatch(k)
        if m and m.group(2) in _TV_BLOCK_MAP:
            out[f"blocks.{m.group(1)}.{_TV_BLOCK_MAP[m.group(2)]}"] = v
        elif k in _TV_TOP_MAP:
            out[_TV_TOP_MAP[k]] = v
        else:
            unmapped.append(k)
    if unmapped:
        raise UnsupportedCheckpoint(f"these torchvision keys do not map onto this ViT: {', '.join(unmapped[:20])}")
    return out


def _check_timm_layout(sd: dict) -> None:
    if "cls_token" not in sd:
        raise UnsupportedCheckpoint(
            "this checkpoint has no class token (timm's class_token=False): this ViT always attends over one, so "
            "its function would differ"
        )
    unmapped = [k for k in sd if not _TIMM_KEY.match(k)]
    if unmapped:
        raise UnsupportedCheckpoint(
            "this checkpoint has parts this ViT does not have (distillation or register tokens, extra norms such as "
            f"vit_pytorch's patch LayerNorms, ...); keys that did not map: {', '.join(unmapped[:20])}"
        )


def detect_layout(sd: dict) -> str:
    if any(k.startswith("encoder.layers.") or k == "conv_proj.weight" for k in sd):
        return "torchvision"
    if "patch_embed.proj.weight" in sd:
        return "timm"
    raise UnsupportedCheckpoint(f"not a timm or torchvision ViT state_dict (first keys: {', '.join(list(sd)[:8])})")


def config_from_timm_state_dict(sd: dict, image_size=None) -> dict:
    """ViT constructor arguments that reproduce a timm-layout state_dict (heads cannot be read off the weights)."""
    w = sd["patch_embed.proj.weight"]
    dim, channels, ph, pw = w.shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    tokens = sd["pos_embed"].shape[1]
    has_cls = "cls_token" in sd
    grid = math.isqrt(tokens - has_cls)
    if grid * grid != tokens - has_cls or ph != pw:
        raise UnsupportedCheckpoint("only square patch grids can be inferred; build the ViT yourself and load")
    head = sd.get("head.weight")
    return dict(
        image_size=image_size or grid * ph,
        patch_size=ph,
        channels=channels,
        dim=dim,
        depth=depth,
        mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0],
        num_classes=0 if head is None else head.shape[0],
        pool="mean" if "fc_norm.weight" in sd else "cls",
        qkv_bias="blocks.0.attn.qkv.bias" in sd,
    )


def resample_pos_embed(pos_embed: torch.Tensor, new_grid, old_grid=None, num_prefix_tokens=1) -> torch.Tensor:
    """Bicubic resampling of the patch part of a [1, T, D] position embedding; the CLS row is kept as it is."""
    prefix, grid_part = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n = grid_part.shape[1]
    old_grid = old_grid or (math.isqrt(n), math.isqrt(n))
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    D = pos_embed.shape[-1]
    g = grid_part.reshape(1, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2).float()  # (1, D, gh, gw)
    g = F.interpolate(g, size=tuple(new_grid), mode="bicubic", antialias=True, align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], D).to(pos_embed.dtype)
    return torch.cat([prefix, g], dim=1)


def load_timm_layout(model, sd: dict, strict=True):
    """Load a timm-layout state_dict into `model`, resampling pos_embed to the model's patch grid if they differ."""
    _check_timm_layout(sd)
    sd = dict(sd)
    if "pos_embed" in sd and sd["pos_embed"].shape != model.pos_embed.shape:
        sd["pos_embed"] = resample_pos_embed(sd["pos_embed"], model.patch_embed.grid_size)
    return model.load_state_dict(sd, strict=strict)


def load_pretrained_into(model, path_or_sd, strict=False):
    """Fine-tuning entry: load a timm or torchvision checkpoint, keeping the model's own head when the class count
    differs. Returns load_state_dict's report (missing / unexpected keys)."""
    sd = read_checkpoint(path_or_sd) if isinstance(path_or_sd, (str, Path)) else _state_dict(path_or_sd)
    if detect_layout(sd) == "torchvision":
        sd = torchvision_to_timm(sd)
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if not (k.startswith("head.") and k in own and v.shape != own[k].shape)}
    return load_timm_layout(model, sd, strict=strict)


def read_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError("reading .safetensors needs the safetensors package: pip install safetensors") from e
        return load_file(str(path))
    return _state_dict(torch.load(path, map_location="cpu", weights_only=True))


def to_timm_state_dict(model) -> dict:
    """Our state_dict with timm's names (already the same names): a copy that timm's VisionTransformer loads."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
