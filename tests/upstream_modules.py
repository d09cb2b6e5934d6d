"""Module trees with the structure of the upstream code (U-ViT ``libs/uvit.py`` and
``libs/uvit_t2i.py``, DiT ``models.py`` with timm's layers, timm ``VisionTransformer``),
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


# --------------------------------------------------------------------------- timm ViT
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


class VisionTransformer(nn.Module):
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
