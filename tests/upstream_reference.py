"""Independent functional references of the upstream models, written from
``shared/reference/upstream-facts.md`` (not from our modules): they read weights from a
state_dict by upstream key names and run plain ``torch.nn.functional`` math, so they
check both our forward passes and our key layout.

Also: the expected ``{key: shape}`` layouts of every upstream configuration.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

Shape = Tuple[int, ...]


# --------------------------------------------------------------------------- key layouts
# Each layout is an insertion-ordered dict in upstream's parameter registration order (facts file,
# "Parameter registration order"): what ``state_dict()`` and ``parameters()`` list, and what an
# optimizer's saved per-parameter state (upstream's ``optimizer.pth``) is matched against by position.
# U-ViT: pos_embed (a parameter of the model itself comes first), patch_embed, time_embed,
# label_emb / context_embed, in_blocks, mid_block, out_blocks (skip_linear after the mlp), norm,
# decoder_pred, final_layer. DiT: pos_embed, x_embedder, t_embedder, y_embedder, blocks (attn,
# mlp, adaLN_modulation; the norms have no parameters), final_layer (linear, adaLN_modulation).
def _block_keys(prefix: str, D: int, mlp_ratio: float, qkv_bias: bool, affine_norms: bool) -> Dict[str, Shape]:
    """In upstream's registration order: norm1, attn (qkv, proj), norm2, mlp (fc1, fc2)."""
    H = int(D * mlp_ratio)
    keys: Dict[str, Shape] = {}

    def norm(n: str) -> None:
        if affine_norms:
            keys[f"{prefix}.{n}.weight"] = (D,)
            keys[f"{prefix}.{n}.bias"] = (D,)

    norm("norm1")
    keys[f"{prefix}.attn.qkv.weight"] = (3 * D, D)
    if qkv_bias:
        keys[f"{prefix}.attn.qkv.bias"] = (3 * D,)
    keys[f"{prefix}.attn.proj.weight"] = (D, D)
    keys[f"{prefix}.attn.proj.bias"] = (D,)
    norm("norm2")
    keys[f"{prefix}.mlp.fc1.weight"] = (H, D)
    keys[f"{prefix}.mlp.fc1.bias"] = (H,)
    keys[f"{prefix}.mlp.fc2.weight"] = (D, H)
    keys[f"{prefix}.mlp.fc2.bias"] = (D,)
    return keys


def uvit_keys(
    img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0,
    qkv_bias=False, mlp_time_embed=False, num_classes=-1, conv=True, skip=True,
    t2i=False, clip_dim=768, num_clip_token=77, **_ignored,
) -> Dict[str, Shape]:
    D, C, p = embed_dim, in_chans, patch_size
    L = (img_size // p) ** 2
    extras = (1 + num_clip_token) if t2i else (2 if num_classes > 0 else 1)
    keys: Dict[str, Shape] = {
        "pos_embed": (1, extras + L, D),
        "patch_embed.proj.weight": (D, C, p, p),
        "patch_embed.proj.bias": (D,),
    }
    if mlp_time_embed:
        keys.update({"time_embed.0.weight": (4 * D, D), "time_embed.0.bias": (4 * D,),
                     "time_embed.2.weight": (D, 4 * D), "time_embed.2.bias": (D,)})
    if t2i:
        keys.update({"context_embed.weight": (D, clip_dim), "context_embed.bias": (D,)})
    elif num_classes > 0:
        keys["label_emb.weight"] = (num_classes, D)
    for i in range(depth // 2):
        keys.update(_block_keys(f"in_blocks.{i}", D, mlp_ratio, qkv_bias, True))
    keys.update(_block_keys("mid_block", D, mlp_ratio, qkv_bias, True))
    for i in range(depth // 2):
        keys.update(_block_keys(f"out_blocks.{i}", D, mlp_ratio, qkv_bias, True))
        if skip:
            keys[f"out_blocks.{i}.skip_linear.weight"] = (D, 2 * D)
            keys[f"out_blocks.{i}.skip_linear.bias"] = (D,)
    keys.update({"norm.weight": (D,), "norm.bias": (D,),
                 "decoder_pred.weight": (p * p * C, D), "decoder_pred.bias": (p * p * C,)})
    if conv:
        keys.update({"final_layer.weight": (C, C, 3, 3), "final_layer.bias": (C,)})
    return keys


def dit_keys(
    input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0,
    class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, **_ignored,
) -> Dict[str, Shape]:
    D, C, p = hidden_size, in_channels, patch_size
    out_c = 2 * C if learn_sigma else C
    L = (input_size // p) ** 2
    keys: Dict[str, Shape] = {
        "pos_embed": (1, L, D),
        "x_embedder.proj.weight": (D, C, p, p),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (num_classes + int(class_dropout_prob > 0), D),
    }
    for i in range(depth):
        keys.update(_block_keys(f"blocks.{i}", D, mlp_ratio, True, False))
        keys[f"blocks.{i}.adaLN_modulation.1.weight"] = (6 * D, D)
        keys[f"blocks.{i}.adaLN_modulation.1.bias"] = (6 * D,)
    keys.update({
        "final_layer.linear.weight": (p * p * out_c, D), "final_layer.linear.bias": (p * p * out_c,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    })
    return keys


# --------------------------------------------------------------------------- forward references
def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Upstream computes the sinusoid in float32 (``t[:, None].float() * freqs``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _lin(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _mha(sd, name, x, heads, scale=None):
    B, L, D = x.shape
    dh = D // heads
    qkv = _lin(sd, f"{name}.qkv", x).reshape(B, L, 3, heads, dh)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (scale if scale is not None else dh ** -0.5)
    out = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(B, L, D)
    return _lin(sd, f"{name}.proj", out)


def _patches(x, w, b):
    return F.conv2d(x, w, b, stride=w.shape[-1]).flatten(2).transpose(1, 2)


def _unpatchify(tokens, p, C):
    B, L, _ = tokens.shape
    h = int(round(math.sqrt(L)))
    return torch.einsum("bhwpqc->bchpwq", tokens.reshape(B, h, h, p, p, C)).reshape(B, C, h * p, h * p)


def uvit_reference(sd, cfg, x, t, y=None, context=None, t2i=False):
    """Upstream U-ViT forward (facts file, section U-ViT / U-ViT text-to-image)."""
    D, heads, C = cfg["embed_dim"], cfg["num_heads"], cfg["in_chans"]
    p, depth = cfg["patch_size"], cfg["depth"]
    ln = lambda n, v: F.layer_norm(v, (D,), sd[f"{n}.weight"], sd[f"{n}.bias"], 1e-5)  # noqa: E731
    tokens = _patches(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"])
    tt = sinusoid(t, D).to(x.dtype)
    if cfg.get("mlp_time_embed", False):
        tt = _lin(sd, "time_embed.2", F.silu(_lin(sd, "time_embed.0", tt)))
    parts = [tt[:, None]]
    if t2i:
        parts.append(_lin(sd, "context_embed", context))
    elif cfg.get("num_classes", -1) > 0:
        parts.insert(0, F.embedding(y, sd["label_emb.weight"])[:, None])
    extras = sum(p_.shape[1] for p_ in parts)
    h = torch.cat(parts + [tokens], dim=1) + sd["pos_embed"]

    def block(name, h, skip=None):
        if skip is not None:
            h = _lin(sd, f"{name}.skip_linear", torch.cat([h, skip], -1))
        h = h + _mha(sd, f"{name}.attn", ln(f"{name}.norm1", h), heads)
        m = _lin(sd, f"{name}.mlp.fc2", F.gelu(_lin(sd, f"{name}.mlp.fc1", ln(f"{name}.norm2", h))))
        return h + m

    skips = []
    for i in range(depth // 2):
        h = block(f"in_blocks.{i}", h)
        skips.append(h)
    h = block("mid_block", h)
    for i in range(depth // 2):
        s = skips.pop()
        h = block(f"out_blocks.{i}", h, s if cfg.get("skip", True) else None)
    h = _lin(sd, "decoder_pred", ln("norm", h))[:, extras:]
    img = _unpatchify(h, p, C)
    if cfg.get("conv", True):
        img = F.conv2d(img, sd["final_layer.weight"], sd["final_layer.bias"], padding=1)
    return img


def dit_reference(sd, cfg, x, t, y):
    """Upstream DiT forward in eval mode (no label dropout)."""
    D, heads = cfg["hidden_size"], cfg["num_heads"]
    p, C = cfg["patch_size"], cfg["in_channels"]
    out_c = 2 * C if cfg.get("learn_sigma", True) else C
    ln = lambda v: F.layer_norm(v, (D,), None, None, 1e-6)  # noqa: E731
    mod = lambda v, shift, scale: v * (1 + scale[:, None]) + shift[:, None]  # noqa: E731
    h = _patches(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"]) + sd["pos_embed"]
    te = sinusoid(t, 256).to(x.dtype)
    c = _lin(sd, "t_embedder.mlp.2", F.silu(_lin(sd, "t_embedder.mlp.0", te)))
    c = c + F.embedding(y, sd["y_embedder.embedding_table.weight"])
    for i in range(cfg["depth"]):
        n = f"blocks.{i}"
        chunks = _lin(sd, f"{n}.adaLN_modulation.1", F.silu(c)).chunk(6, dim=1)
        sh1, sc1, g1, sh2, sc2, g2 = chunks
        h = h + g1[:, None] * _mha(sd, f"{n}.attn", mod(ln(h), sh1, sc1), heads)
        m = mod(ln(h), sh2, sc2)
        m = _lin(sd, f"{n}.mlp.fc2", F.gelu(_lin(sd, f"{n}.mlp.fc1", m), approximate="tanh"))
        h = h + g2[:, None] * m
    shift, scale = _lin(sd, "final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
    h = _lin(sd, "final_layer.linear", mod(ln(h), shift, scale))
    return _unpatchify(h, p, out_c)


def randomize_(model: torch.nn.Module, std: float = 0.2, generator: Optional[torch.Generator] = None) -> None:
    """Random weights everywhere (DiT's zero-initialised layers included)."""
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0.0, std, generator=generator)
