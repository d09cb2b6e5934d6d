"""Independent functional references of ViT (timm), ViViT (paper / scenic) and CLIP (OpenAI),
written from ``shared/reference/upstream-facts.md`` (not from our modules): they read weights
from a state_dict by the documented key names and run plain ``torch.nn.functional`` math, so
they check both our forward passes and our key layouts.

Also: the documented ``{key: shape}`` layouts.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

Shape = Tuple[int, ...]


# --------------------------------------------------------------------------- key layouts
def _timm_block(prefix: str, D: int, hidden: int) -> Dict[str, Shape]:
    return {
        f"{prefix}.norm1.weight": (D,), f"{prefix}.norm1.bias": (D,),
        f"{prefix}.attn.qkv.weight": (3 * D, D), f"{prefix}.attn.qkv.bias": (3 * D,),
        f"{prefix}.attn.proj.weight": (D, D), f"{prefix}.attn.proj.bias": (D,),
        f"{prefix}.norm2.weight": (D,), f"{prefix}.norm2.bias": (D,),
        f"{prefix}.mlp.fc1.weight": (hidden, D), f"{prefix}.mlp.fc1.bias": (hidden,),
        f"{prefix}.mlp.fc2.weight": (D, hidden), f"{prefix}.mlp.fc2.bias": (D,),
    }


def vit_keys(img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12,
             mlp_ratio=4.0, **_ignored) -> Dict[str, Shape]:
    """timm ``VisionTransformer`` (class token, token pooling)."""
    D, p = embed_dim, patch_size
    L = (img_size // p) ** 2
    keys: Dict[str, Shape] = {
        "cls_token": (1, 1, D), "pos_embed": (1, 1 + L, D),
        "patch_embed.proj.weight": (D, in_chans, p, p), "patch_embed.proj.bias": (D,),
    }
    for i in range(depth):
        keys.update(_timm_block(f"blocks.{i}", D, int(D * mlp_ratio)))
    keys.update({"norm.weight": (D,), "norm.bias": (D,)})
    if num_classes > 0:
        keys.update({"head.weight": (num_classes, D), "head.bias": (num_classes,)})
    return keys


def vivit_keys(num_frames=32, img_size=224, patch_size=16, tubelet_size=2, in_chans=3, num_classes=400,
               embed_dim=768, depth=12, mlp_ratio=4.0, variant=1, temporal_depth=4, **_ignored) -> Dict[str, Shape]:
    """Our documented ViViT layout (docs/vit_family.md): timm ViT names, Conv3d tubelets."""
    D, p, t = embed_dim, patch_size, tubelet_size
    nt, hw = num_frames // t, (img_size // p) ** 2
    hidden = int(D * mlp_ratio)
    keys: Dict[str, Shape] = {
        "patch_embed.proj.weight": (D, in_chans, t, p, p), "patch_embed.proj.bias": (D,),
        "cls_token": (1, 1, D), "pos_embed": (1, 1 + (nt * hw if variant == 1 else hw), D),
    }
    for i in range(depth):
        keys.update(_timm_block(f"blocks.{i}", D, hidden))
    keys.update({"norm.weight": (D,), "norm.bias": (D,)})
    if variant == 2:
        keys.update({"temporal_cls_token": (1, 1, D), "temporal_pos_embed": (1, 1 + nt, D)})
        for i in range(temporal_depth):
            keys.update(_timm_block(f"temporal_blocks.{i}", D, hidden))
        keys.update({"temporal_norm.weight": (D,), "temporal_norm.bias": (D,)})
    keys.update({"head.weight": (num_classes, D), "head.bias": (num_classes,)})
    return keys


def _clip_block(prefix: str, W: int) -> Dict[str, Shape]:
    return {
        f"{prefix}.attn.in_proj_weight": (3 * W, W), f"{prefix}.attn.in_proj_bias": (3 * W,),
        f"{prefix}.attn.out_proj.weight": (W, W), f"{prefix}.attn.out_proj.bias": (W,),
        f"{prefix}.ln_1.weight": (W,), f"{prefix}.ln_1.bias": (W,),
        f"{prefix}.mlp.c_fc.weight": (4 * W, W), f"{prefix}.mlp.c_fc.bias": (4 * W,),
        f"{prefix}.mlp.c_proj.weight": (W, 4 * W), f"{prefix}.mlp.c_proj.bias": (W,),
        f"{prefix}.ln_2.weight": (W,), f"{prefix}.ln_2.bias": (W,),
    }


def clip_keys(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
              context_length=77, vocab_size=49408, transformer_width=512, transformer_layers=12,
              **_ignored) -> Dict[str, Shape]:
    """OpenAI CLIP (ViT image tower)."""
    W, p, E, Wt = vision_width, vision_patch_size, embed_dim, transformer_width
    L = (image_resolution // p) ** 2
    keys: Dict[str, Shape] = {
        "visual.conv1.weight": (W, 3, p, p),
        "visual.class_embedding": (W,),
        "visual.positional_embedding": (1 + L, W),
        "visual.ln_pre.weight": (W,), "visual.ln_pre.bias": (W,),
    }
    for i in range(vision_layers):
        keys.update(_clip_block(f"visual.transformer.resblocks.{i}", W))
    keys.update({"visual.ln_post.weight": (W,), "visual.ln_post.bias": (W,), "visual.proj": (W, E)})
    keys.update({"token_embedding.weight": (vocab_size, Wt), "positional_embedding": (context_length, Wt)})
    for i in range(transformer_layers):
        keys.update(_clip_block(f"transformer.resblocks.{i}", Wt))
    keys.update({"ln_final.weight": (Wt,), "ln_final.bias": (Wt,), "text_projection": (Wt, E), "logit_scale": ()})
    return keys


# --------------------------------------------------------------------------- math helpers
def _lin(sd, name, x):
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _ln(sd, name, x, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _attend(q, k, v, heads, causal=False):
    """q, k, v: (B, L, D) with heads contiguous in D; softmax(q k^T / sqrt(dh)) v."""
    B, L, D = q.shape
    dh = D // heads
    q, k, v = (t.reshape(B, L, heads, dh) for t in (q, k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / dh ** 0.5
    if causal:  # additive -inf strictly above the diagonal
        s = s + torch.full((L, L), float("-inf"), dtype=s.dtype).triu(1)
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(B, L, D)


def _timm_block_fwd(sd, n, x, heads, approximate="none"):
    h = _ln(sd, f"{n}.norm1", x, 1e-6)
    q, k, v = _lin(sd, f"{n}.attn.qkv", h).chunk(3, dim=-1)
    x = x + _lin(sd, f"{n}.attn.proj", _attend(q, k, v, heads))
    h = _ln(sd, f"{n}.norm2", x, 1e-6)
    return x + _lin(sd, f"{n}.mlp.fc2", F.gelu(_lin(sd, f"{n}.mlp.fc1", h), approximate=approximate))


# --------------------------------------------------------------------------- ViT
def vit_reference(sd, cfg, x):
    """timm ViT: conv patches, ``[cls, patches] + pos_embed``, blocks, norm, head on the class token."""
    p, heads = cfg["patch_size"], cfg["num_heads"]
    tok = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    tok = tok.flatten(2).transpose(1, 2)
    h = torch.cat([sd["cls_token"].expand(x.shape[0], 1, -1), tok], dim=1) + sd["pos_embed"]
    for i in range(cfg["depth"]):
        h = _timm_block_fwd(sd, f"blocks.{i}", h, heads)
    cls = _ln(sd, "norm", h, 1e-6)[:, 0]
    return _lin(sd, "head", cls) if cfg.get("num_classes", 1000) > 0 else cls


# --------------------------------------------------------------------------- ViViT
def vivit_reference(sd, cfg, x):
    """ViViT Model 1 / Model 2 (facts: Conv3d tubelets; Model 2 loops over temporal indices)."""
    t, p = cfg["tubelet_size"], cfg["patch_size"]
    heads = cfg["num_heads"]
    approx = cfg.get("gelu_approximate", "none")
    B = x.shape[0]
    tok = F.conv3d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=(t, p, p))
    nt = tok.shape[2]
    if cfg.get("variant", 1) == 1:
        tok = tok.flatten(2).transpose(1, 2)  # (B, T'hw, D) in (T' h w) order
        h = torch.cat([sd["cls_token"].expand(B, 1, -1), tok], dim=1) + sd["pos_embed"]
        for i in range(cfg["depth"]):
            h = _timm_block_fwd(sd, f"blocks.{i}", h, heads, approx)
        return _lin(sd, "head", _ln(sd, "norm", h, 1e-6)[:, 0])
    frame_cls = []
    for j in range(nt):  # the spatial transformer, once per temporal index
        s = tok[:, :, j].flatten(2).transpose(1, 2)
        s = torch.cat([sd["cls_token"].expand(B, 1, -1), s], dim=1) + sd["pos_embed"]
        for i in range(cfg["depth"]):
            s = _timm_block_fwd(sd, f"blocks.{i}", s, heads, approx)
        frame_cls.append(_ln(sd, "norm", s, 1e-6)[:, 0])
    z = torch.stack(frame_cls, dim=1)
    z = torch.cat([sd["temporal_cls_token"].expand(B, 1, -1), z], dim=1) + sd["temporal_pos_embed"]
    th = cfg.get("temporal_heads") or heads
    for i in range(cfg.get("temporal_depth", 4)):
        z = _timm_block_fwd(sd, f"temporal_blocks.{i}", z, th, approx)
    return _lin(sd, "head", _ln(sd, "temporal_norm", z, 1e-6)[:, 0])


# --------------------------------------------------------------------------- CLIP
def _ln32(sd, name, x):
    """OpenAI's LayerNorm: in float32 (at least), eps 1e-5, back to the input dtype."""
    dt = torch.promote_types(x.dtype, torch.float32)
    w, b = sd[f"{name}.weight"].to(dt), sd[f"{name}.bias"].to(dt)
    return F.layer_norm(x.to(dt), (x.shape[-1],), w, b, 1e-5).to(x.dtype)


def _clip_block_fwd(sd, n, x, heads, causal):
    h = _ln32(sd, f"{n}.ln_1", x)
    qkv = F.linear(h, sd[f"{n}.attn.in_proj_weight"], sd[f"{n}.attn.in_proj_bias"])
    q, k, v = qkv.chunk(3, dim=-1)
    x = x + _lin(sd, f"{n}.attn.out_proj", _attend(q, k, v, heads, causal))
    h = _lin(sd, f"{n}.mlp.c_fc", _ln32(sd, f"{n}.ln_2", x))
    h = h * torch.sigmoid(1.702 * h)  # QuickGELU
    return x + _lin(sd, f"{n}.mlp.c_proj", h)


def _layers(sd, prefix):
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def clip_image_reference(sd, image, vision_heads):
    w = sd["visual.conv1.weight"]
    tok = F.conv2d(image, w, None, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].reshape(1, 1, -1).expand(image.shape[0], 1, -1)
    h = torch.cat([cls, tok], dim=1) + sd["visual.positional_embedding"]
    h = _ln32(sd, "visual.ln_pre", h)
    prefix = "visual.transformer.resblocks."
    for i in range(_layers(sd, prefix)):
        h = _clip_block_fwd(sd, f"{prefix}{i}", h, vision_heads, False)
    return _ln32(sd, "visual.ln_post", h[:, 0]) @ sd["visual.proj"]


def clip_text_hidden_reference(sd, text, text_heads):
    L = text.shape[1]
    h = F.embedding(text, sd["token_embedding.weight"]) + sd["positional_embedding"][:L]
    prefix = "transformer.resblocks."
    for i in range(_layers(sd, prefix)):
        h = _clip_block_fwd(sd, f"{prefix}{i}", h, text_heads, True)
    return _ln32(sd, "ln_final", h)


def clip_text_reference(sd, text, text_heads):
    h = clip_text_hidden_reference(sd, text, text_heads)
    return h[torch.arange(h.shape[0]), text.argmax(-1)] @ sd["text_projection"]


def clip_reference(sd, image, text, vision_heads, text_heads):
    """``(logits_per_image, logits_per_text)``."""
    img = clip_image_reference(sd, image, vision_heads)
    txt = clip_text_reference(sd, text, text_heads)
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    logits = sd["logit_scale"].exp() * img @ txt.T
    return logits, logits.T


def clip_loss_reference(logits_per_image, logits_per_text):
    """Symmetric cross-entropy, written as explicit log-softmax diagonals."""
    li = -logits_per_image.log_softmax(dim=1).diagonal().mean()
    lt = -logits_per_text.log_softmax(dim=1).diagonal().mean()
    return (li + lt) / 2
