"""Module trees with the structure of the upstream code (U-ViT ``libs/uvit.py`` and
``libs/uvit_t2i.py``, DiT ``models.py`` with timm's layers, timm ``VisionTransformer`` as of timm
1.0.31 and as before timm 1.0.16),
written for the tests from ``shared/reference/upstream-facts.md``: same attribute names,
same parameter shapes, same forward math. ``uvit_fast.optimize`` must recognise them by
structure alone.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


def sinusoid(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], -1) if dim % 2 else emb


class Mlp(nn.Module):  # timm layout: fc1, act, drop1, norm, fc2, drop2
    def __init__(self, dim, hidden, act=nn.GELU):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), act(), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=False, upcast=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(0.0), nn.Linear(dim, dim), nn.Dropout(0.0)
        self.upcast = upcast

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):  # U-ViT's SDPA path casts to
            q, k, v = q.float(), k.float(), v.float()  # float32 (float64 kept here for the float64 tests)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, C)
        return self.proj_drop(self.proj(out.to(x.dtype)))


# --------------------------------------------------------------------------- U-ViT
class UPatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class UBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, skip=False, use_checkpoint=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, upcast=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.use_checkpoint = use_checkpoint

    def forward(self, x, skip=None):
        if self.use_checkpoint:
            return torch.utils.checkpoint.checkpoint(self._forward, x, skip, use_reentrant=False)
        return self._forward(x, skip)

    def _forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    """Upstream U-ViT structure; ``t2i=True`` gives the text-to-image variant."""

    def __init__(self, img_size=16, patch_size=2, in_chans=3, embed_dim=32, depth=4, num_heads=2, mlp_ratio=4.0,
                 qkv_bias=False, mlp_time_embed=False, num_classes=-1, use_checkpoint=False, conv=True, skip=True,
                 t2i=False, clip_dim=24, num_clip_token=5):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.num_classes, self.in_chans = num_classes, in_chans
        self.patch_embed = UPatchEmbed(patch_size, in_chans, embed_dim)
        L = (img_size // patch_size) ** 2
        self.time_embed = (nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim))
                           if mlp_time_embed else nn.Identity())
        if t2i:
            self.context_embed = nn.Linear(clip_dim, embed_dim)
            self.extras = 1 + num_clip_token
        elif num_classes > 0:
            self.label_emb = nn.Embedding(num_classes, embed_dim)
            self.extras = 2
        else:
            self.extras = 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + L, embed_dim))
        kw = dict(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, use_checkpoint=use_checkpoint)
        self.in_blocks = nn.ModuleList([UBlock(**kw) for _ in range(depth // 2)])
        self.mid_block = UBlock(**kw)
        self.out_blocks = nn.ModuleList([UBlock(skip=skip, **kw) for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(embed_dim)
        self.patch_dim = patch_size ** 2 * in_chans
        self.decoder_pred = nn.Linear(embed_dim, self.patch_dim)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()
        self.t2i = t2i

    def forward(self, x, timesteps, y=None):
        x = self.patch_embed(x)
        B, L, D = x.shape
        # upstream's float32 sinusoid, cast to the weights' dtype so float64 copies run too
        tok = self.time_embed(sinusoid(timesteps, self.embed_dim).to(self.pos_embed.dtype)).unsqueeze(1)
        if self.t2i:
            x = torch.cat((tok, self.context_embed(y), x), dim=1)
        else:
            x = torch.cat((tok, x), dim=1)
            if y is not None:
                x = torch.cat((self.label_emb(y).unsqueeze(1), x), dim=1)
        x = x + self.pos_embed
        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())
        x = self.decoder_pred(self.norm(x))[:, self.extras:]
        p, C = self.patch_embed.patch_size, self.in_chans
        h = int(math.isqrt(L))
        x = x.reshape(B, h, h, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * p, h * p)
        return self.final_layer(x)


# --------------------------------------------------------------------------- DiT (timm layers)
class TPatchEmbed(nn.Module):  # timm PatchEmbed: img_size, patch_size tuple, proj, norm, flatten
    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch_size, patch_size)
        self.num_patches = (img_size // patch_size) ** 2
        self.flatten = True
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size)
        self.norm = nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(sinusoid(t, 256).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, hidden, p):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(p > 0), hidden)
        self.num_classes, self.dropout_prob = num_classes, p

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            drop = (torch.rand(labels.shape[0]) < self.dropout_prob) if force_drop_ids is None else force_drop_ids == 1
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    def __init__(self, D, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(D, heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(D, int(D * mlp_ratio), act=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c):
        s1, c1, g1, s2, c2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), s1, c1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), s2, c2))


class FinalLayer(nn.Module):
    def __init__(self, D, p, out_c):
        super().__init__()
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(D, p * p * out_c)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size, self.num_heads = patch_size, num_heads
        self.x_embedder = TPatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        B, L, _ = x.shape
        h, p, C = int(math.isqrt(L)), self.patch_size, self.out_channels
        return x.reshape(B, h, h, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, h * p, h * p)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)
        eps, rest = out[:, :3], out[:, 3:]  # upstream guides only three channels
        cond, uncond = torch.split(eps, len(eps) // 2)
        g = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([g, g]), rest], dim=1)


# --------------------------------------------------------------------------- timm ViT before 1.0.16
class VBlock(nn.Module):
    def __init__(self, D, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(D, eps=1e-6)
        self.attn = Attention(D, heads, qkv_bias=True)
        self.ls1, self.drop_path1 = nn.Identity(), nn.Identity()
        self.norm2 = nn.LayerNorm(D, eps=1e-6)
        self.mlp = Mlp(D, 4 * D)
        self.ls2, self.drop_path2 = nn.Identity(), nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformerPre116(nn.Module):
    """timm's ViT before 1.0.16: plain ``nn.LayerNorm`` norms, ``Block.forward(x)``."""

    def __init__(self, img_size=16, patch_size=4, in_chans=3, num_classes=7, embed_dim=32, depth=2, num_heads=2):
        super().__init__()
        self.patch_embed = TPatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.pos_drop = nn.Dropout(0.0)
        self.blocks = nn.Sequential(*[VBlock(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(self.pos_drop(x)))
        return self.head(x[:, 0])


# --------------------------------------------------------------------------- timm ViT today (1.0.31)
# Written from the facts file's "timm today" section. The norm classes report timm's module name
# (``timm.layers.norm``), as ``type(m).__module__`` does for the real ones: optimize recognises
# norms by the qualified name of the class that defines ``forward``.
class LayerNorm(nn.LayerNorm):
    """``timm.layers.LayerNorm`` (the ViT norm since timm 1.0.16): ``F.layer_norm``; in timm's
    fast-norm mode (``_fast_norm``) it runs in the autocast dtype instead."""

    __module__ = "timm.layers.norm"

    def __init__(self, num_channels, eps=1e-6, affine=True, fast_norm=False):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)
        self._fast_norm = fast_norm

    def forward(self, x):
        if self._fast_norm and torch.is_autocast_enabled(x.device.type):
            dt = torch.get_autocast_dtype(x.device.type)
            w = self.weight.to(dt) if self.weight is not None else None
            b = self.bias.to(dt) if self.bias is not None else None
            with torch.autocast(x.device.type, enabled=False):
                return F.layer_norm(x.to(dt), self.normalized_shape, w, b, self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class LayerNormFp32(nn.LayerNorm):
    """``timm.layers.LayerNormFp32``: computed in float32, returned in the input dtype."""

    __module__ = "timm.layers.norm"

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class LayerNorm2d(nn.LayerNorm):
    """``timm.layers.LayerNorm2d``: normalises the channels of an NCHW tensor."""

    __module__ = "timm.layers.norm"

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class RmsNorm(nn.Module):
    __module__ = "timm.layers.norm"

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(channels))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LayerScale(nn.Module):
    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.drop_prob = p

    def forward(self, x):
        if not self.training or self.drop_prob == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.drop_prob)
        return x * keep / (1 - self.drop_prob)


class TimmAttention(nn.Module):
    """timm 1.0.31 ``Attention``: ``forward(x, attn_mask=None, is_causal=False)`` on SDPA."""

    def __init__(self, dim, num_heads=8, attn_head_dim=None, dim_out=None, qkv_bias=False, qk_norm=False,
                 scale_norm=False, proj_bias=True, gated=False, attn_drop=0.0, proj_drop=0.0, norm_layer=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = attn_head_dim or dim // num_heads
        self.attn_dim = self.num_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, 3 * self.attn_dim, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class TimmBlock(nn.Module):
    """timm 1.0.31 ``Block``; children ``norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2``."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, qk_norm=False, init_values=None,
                 drop_path=0.0, norm_layer=LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = TimmAttention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, norm_layer=norm_layer)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, attn_mask=None, is_causal=False):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ResPostBlock(TimmBlock):
    """timm's post-norm block: the pre-norm block's children, norms after attention and MLP."""

    def forward(self, x, attn_mask=None, is_causal=False):
        x = x + self.drop_path1(self.norm1(self.attn(x, attn_mask=attn_mask, is_causal=is_causal)))
        return x + self.drop_path2(self.norm2(self.mlp(x)))


def rotate_pairs(x, rope):
    """Rotary embedding on (B, H, N, Dh) with ``rope = (sin, cos)``, each (N, Dh)."""
    sin, cos = rope
    x1, x2 = x[..., ::2], x[..., 1::2]
    rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)
    return x * cos + rotated * sin


class EvaAttention(TimmAttention):
    """timm 1.0.31 ``EvaAttention`` without its q/v biases (``qkv_bias=False``): the plain packed qkv
    and ``forward(x, rope=None, attn_mask=None, is_causal=False)`` rotating q and k by ``rope``."""

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = rotate_pairs(q, rope), rotate_pairs(k, rope)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, self.attn_dim)))


class EvaBlock(TimmBlock):
    """timm 1.0.31 ``EvaBlock`` without layer scale: the pre-norm block's children, and ``rope``
    passed to the attention (``Eva.forward_features`` calls ``blk(x, rope=...)``)."""

    def __init__(self, dim, num_heads, *args, **kwargs):
        super().__init__(dim, num_heads, *args, **kwargs)
        self.attn = EvaAttention(dim, num_heads, qkv_bias=False)

    def forward(self, x, rope=None, attn_mask=None, is_causal=False):
        x = x + self.drop_path1(self.attn(self.norm1(x), rope=rope, attn_mask=attn_mask, is_causal=is_causal))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """timm 1.0.31 ``timm.layers.PatchEmbed`` (output_fmt as a plain string here)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None, flatten=True,
                 output_fmt=None, bias=True, strict_img_size=True, dynamic_img_pad=False):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.img_size = (img_size, img_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        if output_fmt is not None:
            self.flatten, self.output_fmt = False, output_fmt
        else:
            self.flatten, self.output_fmt = flatten, "NCHW"
        self.strict_img_size, self.dynamic_img_pad = strict_img_size, dynamic_img_pad
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def feat_ratio(self, as_scalar=True):
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size):
        if self.dynamic_img_pad:
            return math.ceil(img_size[0] / self.patch_size[0]), math.ceil(img_size[1] / self.patch_size[1])
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def forward(self, x):
        _, _, H, W = x.shape
        if self.strict_img_size:
            if (H, W) != self.img_size:
                raise AssertionError(f"Input size ({H}, {W}) doesn't match model {self.img_size}.")
        elif not self.dynamic_img_pad and (H % self.patch_size[0] or W % self.patch_size[1]):
            raise AssertionError(f"Input size ({H}, {W}) should be divisible by patch size {self.patch_size}.")
        if self.dynamic_img_pad:
            x = F.pad(x, (0, (-W) % self.patch_size[1], 0, (-H) % self.patch_size[0]))
        x = self.proj(x)
        if self.flatten:
            x = x.flatten(2).transpose(1, 2)
        elif self.output_fmt == "NHWC":
            x = x.permute(0, 2, 3, 1)
        elif self.output_fmt == "NLC":
            x = x.flatten(2).transpose(1, 2)
        return self.norm(x)


class HybridEmbed(PatchEmbed):
    """timm 1.0.31 ``timm.layers.HybridEmbed`` (the hybrid ViTs, e.g. ``vit_small_r26_s32_224``): a CNN
    ``backbone`` first, then ``proj``, a conv whose kernel = stride over the backbone's feature map."""

    def __init__(self, img_size=16, patch_size=1, in_chans=3, embed_dim=24, feature_stride=2, feature_dim=5):
        super().__init__(img_size // feature_stride, patch_size, feature_dim, embed_dim)
        self.img_size = (img_size, img_size)
        self.backbone = nn.Conv2d(in_chans, feature_dim, feature_stride, feature_stride)

    def feat_ratio(self, as_scalar=True):
        return self.patch_size[0] * self.backbone.stride[0]

    def forward(self, x):
        x = self.proj(self.backbone(x))
        return x.flatten(2).transpose(1, 2)


def resample_abs_pos_embed(pos_embed, new_size, old_size, num_prefix_tokens):
    if tuple(new_size) == tuple(old_size):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    D = grid.shape[-1]
    grid = grid.reshape(1, old_size[0], old_size[1], D).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(new_size), mode="bicubic", antialias=True).to(pos_embed.dtype)
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(1, -1, D)], dim=1)


def feature_take_indices(num_blocks, indices=None):
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        take = [num_blocks - indices + i for i in range(indices)]
    else:
        take = [num_blocks + i if i < 0 else i for i in indices]
    return take, max(take)


class VisionTransformer(nn.Module):
    """timm 1.0.31 ``VisionTransformer`` (class token, learned absolute position embedding)."""

    def __init__(self, img_size=16, patch_size=4, in_chans=3, num_classes=7, global_pool="token", embed_dim=32,
                 depth=2, num_heads=2, mlp_ratio=4.0, qkv_bias=True, qk_norm=False, init_values=None,
                 class_token=True, no_embed_class=False, dynamic_img_size=False, dynamic_img_pad=False,
                 drop_path_rate=0.0, norm_layer=LayerNorm, block_fn=TimmBlock):
        super().__init__()
        self.num_classes, self.global_pool = num_classes, global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.no_embed_class, self.dynamic_img_size = no_embed_class, dynamic_img_size
        self.grad_checkpointing = False
        kw = dict(flatten=False, output_fmt="NHWC", strict_img_size=False) if dynamic_img_size else {}
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, dynamic_img_pad=dynamic_img_pad, **kw)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = None
        L = self.patch_embed.num_patches + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.randn(1, L, embed_dim) * 0.02)
        self.pos_drop, self.patch_drop, self.norm_pre = nn.Dropout(0.0), nn.Identity(), nn.Identity()
        self.blocks = nn.Sequential(*[
            block_fn(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_norm, init_values,
                     drop_path_rate * i / max(depth - 1, 1), norm_layer)
            for i in range(depth)
        ])
        use_fc_norm = global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else norm_layer(embed_dim)
        self.attn_pool = None
        self.fc_norm = norm_layer(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(0.0)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    def reset_classifier(self, num_classes, global_pool=None):
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _pos_embed(self, x):
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)] if self.cls_token is not None else []
        if self.dynamic_img_size:
            B, H, W, C = x.shape
            pos_embed = resample_abs_pos_embed(self.pos_embed, (H, W), self.patch_embed.grid_size,
                                               0 if self.no_embed_class else self.num_prefix_tokens)
            x = x.view(B, -1, C)
        else:
            pos_embed = self.pos_embed
        if self.no_embed_class:
            x = torch.cat(prefix + [x + pos_embed], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + pos_embed
        return self.pos_drop(x)

    def _run_blocks(self, blocks, x, attn_mask, is_causal, each=None):
        for i, blk in enumerate(blocks):
            if attn_mask is not None or is_causal:
                x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
            elif self.grad_checkpointing:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if each is not None:
                each(i, x)
        return x

    def forward_intermediates(self, x, indices=None, return_prefix_tokens=False, norm=False, stop_early=False,
                              output_fmt="NCHW", intermediates_only=False, output_dict=False, attn_mask=None,
                              is_causal=False):
        if output_fmt not in ("NCHW", "NLC"):
            raise AssertionError("Output format must be one of NCHW or NLC.")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        inter = []
        x = self._run_blocks(blocks, x, attn_mask, is_causal,
                             lambda i, y: inter.append(self.norm(y) if norm else y) if i in take else None)
        n = self.num_prefix_tokens
        prefix = [y[:, :n] for y in inter] if n else None
        inter = [y[:, n:] for y in inter]
        if output_fmt == "NCHW":
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            inter = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in inter]
        if output_dict:
            out = {"image_intermediates": inter}
            if prefix is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens and prefix is not None:
            inter = list(zip(inter, prefix))
        return inter if intermediates_only else (self.norm(x), inter)

    def forward_features(self, x, attn_mask=None, is_causal=False):
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        if attn_mask is None and not is_causal and not self.grad_checkpointing:
            x = self.blocks(x)
        else:
            x = self._run_blocks(self.blocks, x, attn_mask, is_causal)
        return self.norm(x)

    def forward_head(self, x, pre_logits=False):
        x = x[:, self.num_prefix_tokens:].mean(1) if self.global_pool == "avg" else x[:, 0]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x, attn_mask=None, is_causal=False):
        return self.forward_head(self.forward_features(x, attn_mask=attn_mask, is_causal=is_causal))
