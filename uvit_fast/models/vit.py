"""ViT (Dosovitskiy et al.) image classifier with timm's ``VisionTransformer`` state_dict.

Keys: ``cls_token [1, 1, D]``, ``pos_embed [1, 1 + L, D]``, ``patch_embed.proj.{weight,bias}``,
``blocks.{i}.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``, ``head``.
LayerNorm eps 1e-6, exact GELU, qkv with bias, class token first, ``pos_embed`` added after the
concat, classification from the class token after ``norm``.

The fused path embeds the patches with the class token as prefix and ``pos_embed`` added in
one kernel (:func:`uvit_fast.ops.patchify_embed`), runs the fused LayerNorm, the fused
residual-add + LayerNorm between attention and MLP, the fused attention, qkv and proj through
:func:`uvit_fast.ops.fused_linear` and the MLP with its residual add through :func:`uvit_fast.ops.fused_mlp`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from uvit_fast.layers import Attention, LayerNorm, Mlp, PatchEmbed, mlp_residual, norm_into, residual_into, script_twin
from uvit_fast.models.common import check_image


class Block(nn.Module):
    """timm's pre-norm ViT block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    ``gelu_approximate`` is passed to ``nn.GELU`` (``"none"``: exact erf GELU, as timm)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        eps: float = 1e-6,
        gelu_approximate: str = "none",
        *,
        fused: bool = True,
    ):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=eps, fused=fused)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, fused=fused)
        self.norm2 = LayerNorm(dim, eps=eps, fused=fused)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=lambda: nn.GELU(approximate=gelu_approximate))
        self.fused = fused

    def __prepare_scriptable__(self) -> nn.Module:
        """TorchScript runs timm's block math (:class:`ScriptViTBlock`)."""
        return script_twin(self, ScriptViTBlock)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            h = norm_into(self.norm1, self.attn, x)  # norm1(x), in FP8 for a quantized qkv
            x, h = residual_into(self.norm2, self.mlp, x, self.attn(h))  # residual add + norm2
            return mlp_residual(self.mlp, x, h)  # fc1 + GELU, fc2 + residual: one fused_mlp call
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_vit_weights_(module: nn.Module) -> None:
    """timm-style init: trunc-normal(0.02) Linear weights, zero biases, LayerNorm 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ViT(nn.Module):
    """Vision Transformer classifier (timm ``VisionTransformer`` with ``global_pool="token"``).

    ``forward(x)`` takes ``(B, in_chans, img_size, img_size)`` and returns ``(B, num_classes)``
    logits (``(B, embed_dim)`` pooled features when ``num_classes == 0``, where ``head`` is an
    ``Identity`` with no keys, as timm).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        *,
        fused: bool = True,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"ViT: img_size {img_size} is not divisible by patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"ViT: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if num_classes < 0:
            raise ValueError(f"ViT: num_classes must be >= 0 (0: no head); got {num_classes}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.fused = fused
        self.num_patches = (img_size // patch_size) ** 2
        self.num_tokens = 1 + self.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, fused=fused)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias, fused=fused) for _ in range(depth)]
        )
        self.norm = LayerNorm(embed_dim, eps=1e-6, fused=fused)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        init_vit_weights_(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def __prepare_scriptable__(self) -> nn.Module:
        """TorchScript runs timm's math (:class:`ScriptViT`, the same parameters), not the kernels."""
        return script_twin(self, ScriptViT)

    def example_inputs(self, batch_size: int = 1, device=None, dtype=None) -> tuple:
        """Random ``(x,)`` of the right shape, for profiling and benchmarks."""
        device = device or self.pos_embed.device
        return (torch.randn(batch_size, self.in_chans, self.img_size, self.img_size, device=device, dtype=dtype),)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1 + L, D)`` tokens after the blocks and ``norm`` (class token first)."""
        check_image("ViT", x, self.in_chans, self.img_size, self.patch_size)
        x = self.patch_embed.embed(x, self.cls_token, self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Class-token pooling of :meth:`forward_features`' output, then ``head``."""
        x = x[:, 0]
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self.forward_head(self.forward_features(x))
        check_image("ViT", x, self.in_chans, self.img_size, self.patch_size)
        x = self.patch_embed.embed(x, self.cls_token, self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        # LayerNorm is per token: normalising only the class token gives the same logits
        return self.head(self.norm(x[:, 0]))


class ScriptViTBlock(nn.Module):
    """TorchScript twin of :class:`Block`: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ScriptViT(nn.Module):
    """TorchScript twin of :class:`ViT`: timm's forward (class token first, ``pos_embed``, blocks,
    ``norm``, ``head`` on the class token)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.embed(x, self.cls_token, self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])
