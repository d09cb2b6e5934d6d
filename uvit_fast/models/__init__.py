"""Models with upstream constructors and state_dicts, and the preset registry.

``create_model(name, **overrides)`` builds a preset by its upstream name (the U-ViT config
names such as ``imagenet256_uvit_huge``, and ``DiT-XL/2`` style names); ``list_models()``
lists them. ``load_upstream_checkpoint`` loads a checkpoint file written by the upstream code.
"""
from __future__ import annotations

import argparse
import difflib
import inspect
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn

from uvit_fast.models.dit import DiT
from uvit_fast.models.uvit import UViT, UViTT2I

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}
_DEFAULTS: Dict[str, Dict[str, Any]] = {}


def register_model(name: str, cls: Callable[..., nn.Module], **defaults: Any) -> None:
    if name in _REGISTRY:
        raise ValueError(f"register_model: {name!r} is already registered")
    _REGISTRY[name] = cls
    _DEFAULTS[name] = defaults


_U = dict(mlp_ratio=4.0, qkv_bias=False, mlp_time_embed=False)
# name: (img_size, patch, in_chans, embed_dim, depth, heads, num_classes, conv)
_UVIT_PRESETS = {
    "cifar10_uvit_small": (32, 2, 3, 512, 12, 8, -1, True),
    "celeba64_uvit_small": (64, 4, 3, 512, 12, 8, -1, True),
    "imagenet64_uvit_mid": (64, 4, 3, 768, 16, 12, 1000, True),
    "imagenet64_uvit_large": (64, 4, 3, 1024, 20, 16, 1000, True),
    "imagenet256_uvit_large": (32, 2, 4, 1024, 20, 16, 1001, True),
    "imagenet256_uvit_huge": (32, 2, 4, 1152, 28, 16, 1001, False),
    "imagenet512_uvit_large": (64, 4, 4, 1024, 20, 16, 1001, True),
    "imagenet512_uvit_huge": (64, 4, 4, 1152, 28, 16, 1001, False),
}
for _name, (_img, _p, _c, _d, _depth, _h, _nc, _conv) in _UVIT_PRESETS.items():
    register_model(
        _name, UViT, img_size=_img, patch_size=_p, in_chans=_c, embed_dim=_d, depth=_depth, num_heads=_h,
        num_classes=_nc, conv=_conv, **_U,
    )
for _name, _depth in (("mscoco_uvit_small", 12), ("mscoco_uvit_small_deep", 16)):
    register_model(
        _name, UViTT2I, img_size=32, patch_size=2, in_chans=4, embed_dim=512, depth=_depth, num_heads=8,
        clip_dim=768, num_clip_token=77, conv=True, **_U,
    )
# DiT sizes: (depth, hidden, heads)
_DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
for _size in ("XL", "L", "B", "S"):
    for _p in (2, 4, 8):
        _depth, _d, _h = _DIT_SIZES[_size]
        register_model(f"DiT-{_size}/{_p}", DiT, depth=_depth, hidden_size=_d, num_heads=_h, patch_size=_p)


def list_models() -> List[str]:
    """Every name :func:`create_model` accepts, in registration order."""
    return list(_REGISTRY)


def _normalized(name: str) -> str:
    """Lower case without separators: ``DiT-XL-2``, ``dit_xl/2`` and ``DiT-XL/2`` are all ``ditxl2``."""
    return re.sub(r"[\s\-_/.]+", "", name.lower())


def suggest_models(name: object, n: int = 3) -> List[str]:
    """Registered names close to ``name``: the names equal to it up to case and separators
    (``dit-s/2``, ``DiT-XL-2``), else the names containing it (``vit-tiny``, see
    :func:`filter_models`), then the closest by :func:`difflib.get_close_matches`."""
    if not isinstance(name, str) or not name.strip():
        return []
    by_norm: Dict[str, List[str]] = {}
    for m in _REGISTRY:
        by_norm.setdefault(_normalized(m), []).append(m)
    key = _normalized(name)
    if key in by_norm:
        return list(by_norm[key])
    out = filter_models(name)  # a part of a name ('vit-tiny', 'DiT-XL', 'uvit_huge'), in list order
    close = difflib.get_close_matches(key, list(by_norm), n=n, cutoff=0.6)
    out += [m for c in close for m in by_norm[c] if m not in out]
    lower = {m.lower(): m for m in _REGISTRY}
    out += [lower[c] for c in difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.6) if lower[c] not in out]
    return out[:n]


def filter_models(pattern: Optional[str] = None) -> List[str]:
    """The names :func:`list_models` gives that contain ``pattern``, ignoring case and the
    separators ``-``, ``_``, ``/`` (``"dit"``, ``"DiT-XL"``, ``"uvit_huge"``); all names for ``None``."""
    if pattern is None:
        return list_models()
    key = _normalized(pattern)
    return [m for m in _REGISTRY if key in _normalized(m)]


def unknown_model_error(name: object) -> ValueError:
    """The ValueError for a name :func:`create_model` does not know, with the closest names."""
    hint = suggest_models(name)
    did_you_mean = f"did you mean {' or '.join(map(repr, hint))}? " if hint else ""
    return ValueError(
        f"unknown model {name!r}; {did_you_mean}uvit_fast.list_models() (or `uvit-fast models`) lists every name: "
        f"{', '.join(_REGISTRY)}"
    )


def model_config(name: str) -> Dict[str, Any]:
    """The constructor arguments of a preset (before overrides)."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise unknown_model_error(name)
    return dict(_DEFAULTS[name])


def model_class(name: str) -> Callable[..., nn.Module]:
    """The class :func:`create_model` builds for ``name`` (without building it)."""
    model_config(name)  # the unknown-name error
    return _REGISTRY[name]


def is_diffusion_model(name: str) -> bool:
    """True for the presets that predict noise from ``(x, timesteps, ...)``: U-ViT, U-ViT-T2I and DiT."""
    return issubclass(model_class(name), (UViT, UViTT2I, DiT))


# constructor arguments that hold the same thing under another name in another model family
_ARGUMENT_ALIASES = {
    "img_size": ("input_size", "the (latent) image size"),
    "input_size": ("img_size", "the (latent) image size"),
    "embed_dim": ("hidden_size", "the width"),
    "hidden_size": ("embed_dim", "the width"),
    "in_channels": ("in_chans", "the input channels"),
    "in_chans": ("in_channels", "the input channels"),
}


def _check_overrides(name: str, cls: Callable[..., nn.Module], overrides: Mapping[str, Any]) -> None:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [k for k, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in overrides:
        if key in accepted:
            continue
        cls_name = getattr(cls, "__name__", str(cls))
        alias = _ARGUMENT_ALIASES.get(key)
        if alias is not None and alias[0] in accepted:
            hint = f"{cls_name}'s argument for {alias[1]} is {alias[0]!r} (create_model({name!r}, {alias[0]}=...))"
        else:
            close = difflib.get_close_matches(key, accepted, n=3)
            hint = f"did you mean {' or '.join(map(repr, close))}?" if close else f"its arguments: {', '.join(accepted)}"
        raise TypeError(f"create_model({name!r}): {cls_name} has no argument {key!r}; {hint}")


# sizes that must be positive integers (a 0 ends in a ZeroDivisionError deep in a constructor)
_POSITIVE_INTS = (
    "clip_dim", "context_length", "embed_dim", "hidden_size", "img_size", "input_size", "in_chans",
    "num_clip_token", "num_frames", "num_heads", "patch_size", "transformer_heads", "transformer_width",
    "tubelet_size", "vision_width", "vocab_size",
)
# block counts: 0 is a model without those blocks (U-ViT keeps its mid block), which is valid
_COUNTS = ("depth", "temporal_depth", "transformer_layers", "vision_layers")


def _check_values(name: str, overrides: Mapping[str, Any]) -> None:
    """A clear error naming the argument for a size that is not a positive integer, or an mlp_ratio
    that is not a positive number."""
    for key, value in overrides.items():
        if key in _POSITIVE_INTS or key in _COUNTS:
            what = "a positive int" if key in _POSITIVE_INTS else "an int >= 0"
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"create_model({name!r}): {key} must be {what}; got {value!r}")
            if value < (1 if key in _POSITIVE_INTS else 0):
                raise ValueError(f"create_model({name!r}): {key} must be {what}; got {value}")
        elif key == "mlp_ratio":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"create_model({name!r}): mlp_ratio must be a positive number; got {value!r}")
            if not value > 0:
                raise ValueError(f"create_model({name!r}): mlp_ratio must be a positive number; got {value}")


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a preset by name; keyword overrides replace constructor arguments
    (e.g. ``create_model("DiT-XL/2", input_size=64, fused=False)``).

    An unknown name is a ValueError with the closest names; an argument the model's
    constructor does not take is a TypeError naming the right one where it has another name
    (DiT's ``input_size`` is U-ViT's ``img_size``)."""
    cfg = model_config(name)
    _check_overrides(name, _REGISTRY[name], overrides)
    _check_values(name, overrides)
    cfg.update(overrides)
    model = _REGISTRY[name](**cfg)
    model.preset_name = name
    model.preset_overrides = dict(overrides)
    return model


def _describe(model: nn.Module) -> str:
    """How the model was built: ``create_model('cifar10_uvit_small', depth=3)``, or its class."""
    name = getattr(model, "preset_name", None)
    if name is None:
        return type(model).__name__
    overrides = {k: v for k, v in getattr(model, "preset_overrides", {}).items() if k != "fused"}
    if not overrides:
        return name
    args = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    return f"create_model({name!r}, {args}) (the preset {name} with overrides {args})"


def _unwrap_state_dict(obj: Any, key: Optional[str]) -> Mapping[str, torch.Tensor]:
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            have = list(obj.keys())[:10] if isinstance(obj, Mapping) else type(obj).__name__
            raise KeyError(f"load_upstream_checkpoint: the checkpoint has no entry {key!r} (top-level: {have})")
        obj = obj[key]
    elif isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        # training checkpoints: {"model": ..., "ema": ..., "opt": ...}; prefer the EMA weights
        for k in ("ema", "model", "state_dict", "module"):
            if k in obj and isinstance(obj[k], Mapping):
                obj = obj[k]
                break
    if not isinstance(obj, Mapping):
        raise TypeError(f"load_upstream_checkpoint: expected a state_dict mapping; got {type(obj).__name__}")
    prefixes = ("module.", "_orig_mod.")
    out = {}
    for k, v in obj.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def load_upstream_checkpoint(
    model_or_name: Union[str, nn.Module],
    path: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
    *,
    key: Optional[str] = None,
    map_location: Union[str, torch.device] = "cpu",
    **overrides: Any,
) -> nn.Module:
    """Load a checkpoint written by the upstream U-ViT or DiT code, strictly.

    Args:
        model_or_name: a model, or a preset name for :func:`create_model` (with ``overrides``).
        path: a ``.pth`` / ``.pt`` file (or an already loaded state_dict). Plain state_dicts
            load as they are; training checkpoints with ``ema`` / ``model`` entries (DiT's, with
            its ``opt`` and ``args`` entries, too) use ``ema`` unless ``key`` says otherwise; ``module.`` (DDP) and ``_orig_mod.`` (compile)
            prefixes are removed.

    Raises:
        ValueError listing every missing key, unexpected key and shape mismatch.
    """
    model = create_model(model_or_name, **overrides) if isinstance(model_or_name, str) else model_or_name
    if isinstance(path, Mapping):
        obj = path
    else:
        # DiT's train.py also saves its argparse.Namespace ("args"): allow just that class
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    sd = _unwrap_state_dict(obj, key)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = [f"load_upstream_checkpoint: the checkpoint does not match the model {_describe(model)}"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
                parts.append(f"{title}: {shown}")
        raise ValueError("\n  ".join(parts))
    model.load_state_dict(sd, strict=True)
    return model


__all__ = [
    "UViT",
    "UViTT2I",
    "DiT",
    "create_model",
    "list_models",
    "model_config",
    "model_class",
    "is_diffusion_model",
    "register_model",
    "filter_models",
    "suggest_models",
    "unknown_model_error",
    "load_upstream_checkpoint",
]

# --------------------------------------------------------------------------- the ViT family
from uvit_fast.models.clip import CLIP, contrastive_loss, text_to_image_context  # noqa: E402
from uvit_fast.models.vit import ViT  # noqa: E402
from uvit_fast.models.vivit import ViViT  # noqa: E402

# timm ViT names: (patch, embed_dim, depth, heads); img 224, mlp_ratio 4, qkv_bias, 1000 classes
_VIT_PRESETS = {
    "vit_tiny_patch16_224": (16, 192, 12, 3),
    "vit_small_patch16_224": (16, 384, 12, 6),
    "vit_base_patch16_224": (16, 768, 12, 12),
    "vit_large_patch16_224": (16, 1024, 24, 16),
    "vit_huge_patch14_224": (14, 1280, 32, 16),
}
# classes of timm's default tag for each name: vit_huge_patch14_224 resolves to orig_in21k, which
# has no classifier head (num_classes=0), so its state_dict loads strictly only without one
_VIT_CLASSES = {"vit_huge_patch14_224": 0}
for _name, (_p, _d, _depth, _h) in _VIT_PRESETS.items():
    register_model(_name, ViT, img_size=224, patch_size=_p, embed_dim=_d, depth=_depth, num_heads=_h,
                   num_classes=_VIT_CLASSES.get(_name, 1000))
# ViViT-B/16x2 (Kinetics-400 setting of the paper / scenic configs): 32 frames of 224 px,
# tubelet 2x16x16, width 768, 12 heads, 12 layers; Model 2 adds a 4-layer temporal transformer.
for _variant in (1, 2):
    register_model(
        f"vivit_b_16x2_model{_variant}", ViViT, num_frames=32, img_size=224, patch_size=16, tubelet_size=2,
        embed_dim=768, depth=12, num_heads=12, num_classes=400, variant=_variant,
        **({"temporal_depth": 4} if _variant == 2 else {}),
    )
# OpenAI CLIP: (embed_dim, patch, vision_width, vision_layers, text_width, text_heads)
_CLIP_PRESETS = {
    "clip_vit_b32": (512, 32, 768, 12, 512, 8),
    "clip_vit_b16": (512, 16, 768, 12, 512, 8),
    "clip_vit_l14": (768, 14, 1024, 24, 768, 12),
}
for _name, (_e, _p, _vw, _vl, _tw, _th) in _CLIP_PRESETS.items():
    register_model(
        _name, CLIP, embed_dim=_e, img_size=224, patch_size=_p, vision_width=_vw, vision_layers=_vl,
        context_length=77, vocab_size=49408, transformer_width=_tw, transformer_heads=_th, transformer_layers=12,
    )

__all__ += ["ViT", "ViViT", "CLIP", "contrastive_loss", "text_to_image_context"]
