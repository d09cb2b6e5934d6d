"""U-ViT (Bao et al., "All are Worth Words") with upstream's constructor and state_dict.

``UViT`` is the unconditional / class-conditional model (upstream ``libs/uvit.py``);
``UViTT2I`` the text-to-image model conditioned on CLIP text tokens (``libs/uvit_t2i.py``).
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.utils.checkpoint

from uvit_fast.layers import (
    Attention, LayerNorm, Mlp, PatchEmbed, SkipLinear, decode_tokens, mlp_residual, norm_into, residual_into,
    script_twin, script_unpatchify, timestep_embedding,
)
from uvit_fast.models.common import check_image, check_input_dtype, check_labels, check_timesteps


def _make_norm(norm_layer, dim: int, fused: bool) -> nn.Module:
    if norm_layer is nn.LayerNorm or norm_layer is LayerNorm:
        return LayerNorm(dim, fused=fused)
    return norm_layer(dim)


class Block(nn.Module):
    """Pre-norm transformer block with an optional long-skip input (out-blocks)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        norm_layer=nn.LayerNorm,
        skip: bool = False,
        use_checkpoint: bool = False,
        fused: bool = True,
    ):
        super().__init__()
        self.norm1 = _make_norm(norm_layer, dim, fused)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, upcast=True, fused=fused)
        self.norm2 = _make_norm(norm_layer, dim, fused)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.skip_linear = SkipLinear(dim, fused=fused) if skip else None
        self.use_checkpoint = use_checkpoint
        self.fused = fused

    def __prepare_scriptable__(self) -> nn.Module:
        """TorchScript runs upstream's block (:class:`ScriptBlock`)."""
        return script_twin(self, ScriptBlock)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, skip, use_reentrant=False)
        return self._forward(x, skip)

    def _forward(self, x: torch.Tensor, skip: Optional[torch.Tensor]) -> torch.Tensor:
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError("U-ViT out-block: skip is required when the block has a skip_linear")
            x = self.skip_linear(x, skip)
        if self.fused and isinstance(self.norm2, LayerNorm):
            # residual add + norm2 in one pass; the MLP with its residual add in one fused_mlp call
            h = norm_into(self.norm1, self.attn, x)  # norm1(x), in FP8 for a quantized qkv
            x, h = residual_into(self.norm2, self.mlp, x, self.attn(h))
            return mlp_residual(self.mlp, x, h)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ScriptBlock(nn.Module):
    """TorchScript twin of U-ViT's :class:`Block` (``skip_linear`` a Linear or None):
    upstream's ``skip_linear(cat([x, skip]))``, ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``.
    Gradient checkpointing does not apply (it changes memory, not the result)."""

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.skip_linear is not None:
            if skip is None:
                raise ValueError("U-ViT out-block: skip is required when the block has a skip_linear")
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _UViTBase(nn.Module):
    """Everything U-ViT and U-ViT-T2I share: patch embedding, blocks with long skips, head."""

    def _build(
        self,
        img_size,
        patch_size,
        in_chans,
        embed_dim,
        depth,
        num_heads,
        mlp_ratio,
        qkv_bias,
        qk_scale,
        norm_layer,
        mlp_time_embed,
        use_checkpoint,
        conv,
        skip,
        extras: int,
        fused: bool,
    ) -> None:
        if img_size % patch_size:
            raise ValueError(f"{type(self).__name__}: img_size {img_size} is not divisible by patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"{type(self).__name__}: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_features = self.embed_dim = embed_dim
        self.in_chans = in_chans
        self.extras = extras
        self.fused = fused
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, fused=fused)
        num_patches = (img_size // patch_size) ** 2
        self.time_embed = (
            nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim))
            if mlp_time_embed
            else nn.Identity()
        )
        # label_emb / context_embed here, as upstream registers them: parameters() keeps upstream's
        # order, which an optimizer's saved state (upstream's optimizer.pth) is matched against
        self._build_condition_embed(embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, extras + num_patches, embed_dim))
        kw = dict(
            dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
            norm_layer=norm_layer, use_checkpoint=use_checkpoint, fused=fused,
        )
        self.in_blocks = nn.ModuleList([Block(**kw) for _ in range(depth // 2)])
        self.mid_block = Block(**kw)
        self.out_blocks = nn.ModuleList([Block(skip=skip, **kw) for _ in range(depth // 2)])
        self.norm = _make_norm(norm_layer, embed_dim, fused)
        self.patch_dim = patch_size ** 2 * in_chans
        self.decoder_pred = nn.Linear(embed_dim, self.patch_dim, bias=True)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    def _build_condition_embed(self, embed_dim: int) -> None:
        """Register the condition embedding (label or context), if any."""

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed"}

    def __prepare_scriptable__(self) -> nn.Module:
        """TorchScript runs upstream's math (:class:`ScriptUViT` / :class:`ScriptUViTT2I`, the same
        parameters): ``torch.jit.script(model)`` gives the PyTorch reference, not the kernels."""
        return script_uvit_twin(self, "uvit_t2i" if hasattr(self, "context_embed") else "uvit")

    def _image_inputs(self, batch_size: int, device, dtype) -> tuple:
        x = torch.randn(batch_size, self.in_chans, self.img_size, self.img_size, device=device, dtype=dtype)
        return x, torch.randint(0, 1000, (batch_size,), device=device).float()

    def _time_token(self, timesteps: torch.Tensor) -> torch.Tensor:
        # float32 as upstream; cast to the parameter dtype so float64 / half models also work
        emb = timestep_embedding(timesteps, self.embed_dim).to(self.pos_embed.dtype)
        return self.time_embed(emb).unsqueeze(1)

    def _run(self, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Tokens = ``[prefix, patches] + pos_embed`` -> blocks -> head -> image."""
        x = self.patch_embed.embed(x, prefix, self.pos_embed)
        skips: List[torch.Tensor] = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())
        x = self.norm(x)
        x = decode_tokens(self.decoder_pred, x, patch_size=self.patch_size, extras=self.extras, fused=self.fused)
        return self.final_layer(x)


class UViT(_UViTBase):
    """U-ViT for unconditional (``num_classes <= 0``) and class-conditional generation.

    Tokens are ``[label, time, patches]`` (label only when ``num_classes > 0``).
    ``forward(x, timesteps, y=None)`` returns a tensor of ``x``'s shape.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        norm_layer=nn.LayerNorm,
        mlp_time_embed: bool = False,
        num_classes: int = -1,
        use_checkpoint: bool = False,
        conv: bool = True,
        skip: bool = True,
        *,
        fused: bool = True,
    ):
        super().__init__()
        self.num_classes = num_classes
        self._build(
            img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_scale,
            norm_layer, mlp_time_embed, use_checkpoint, conv, skip, 2 if num_classes > 0 else 1, fused,
        )

    def _build_condition_embed(self, embed_dim: int) -> None:
        if self.num_classes > 0:
            self.label_emb = nn.Embedding(self.num_classes, embed_dim)

    def example_inputs(self, batch_size: int = 1, device=None, dtype=None) -> tuple:
        """Random ``(x, timesteps[, y])`` of the right shapes, for profiling and benchmarks."""
        device = device or self.pos_embed.device
        x, t = self._image_inputs(batch_size, device, dtype)
        if self.num_classes > 0:
            return x, t, torch.randint(0, self.num_classes, (batch_size,), device=device)
        return x, t

    def forward(self, x: torch.Tensor, timesteps, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        check_image("UViT", x, self.in_chans, self.img_size, self.patch_size)
        B = x.shape[0]
        timesteps = check_timesteps("UViT", timesteps, B, x.device)
        prefix = self._time_token(timesteps)
        if self.num_classes > 0:
            check_labels("UViT", y, B, self.num_classes, x.device)
            prefix = torch.cat([self.label_emb(y).unsqueeze(1), prefix], dim=1)
        elif y is not None:
            raise ValueError("UViT: y was given but the model is unconditional (num_classes <= 0)")
        return self._run(x, prefix)


class UViTT2I(_UViTBase):
    """U-ViT text-to-image: tokens ``[time, context_embed(context), patches]``.

    ``context`` is CLIP text features ``(B, num_clip_token, clip_dim)`` (77 x 768 for ViT-L/14).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        norm_layer=nn.LayerNorm,
        mlp_time_embed: bool = False,
        use_checkpoint: bool = False,
        clip_dim: int = 768,
        num_clip_token: int = 77,
        conv: bool = True,
        skip: bool = True,
        *,
        fused: bool = True,
    ):
        super().__init__()
        self.clip_dim = clip_dim
        self.num_clip_token = num_clip_token
        self._build(
            img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, qkv_bias, qk_scale,
            norm_layer, mlp_time_embed, use_checkpoint, conv, skip, 1 + num_clip_token, fused,
        )

    def _build_condition_embed(self, embed_dim: int) -> None:
        self.context_embed = nn.Linear(self.clip_dim, embed_dim)

    def example_inputs(self, batch_size: int = 1, device=None, dtype=None) -> tuple:
        """Random ``(x, timesteps, context)`` of the right shapes, for profiling and benchmarks."""
        device = device or self.pos_embed.device
        x, t = self._image_inputs(batch_size, device, dtype)
        ctx = torch.randn(batch_size, self.num_clip_token, self.clip_dim, device=device, dtype=dtype)
        return x, t, ctx

    def forward(self, x: torch.Tensor, timesteps, context: torch.Tensor) -> torch.Tensor:
        check_image("UViTT2I", x, self.in_chans, self.img_size, self.patch_size)
        B = x.shape[0]
        timesteps = check_timesteps("UViTT2I", timesteps, B, x.device)
        want = (B, self.num_clip_token, self.clip_dim)
        if not isinstance(context, torch.Tensor) or tuple(context.shape) != want:
            got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(f"UViTT2I: context must have shape {want} (B, num_clip_token, clip_dim); got {got}")
        if context.device != x.device:
            raise ValueError(f"UViTT2I: context is on {context.device} but x is on {x.device}; put them on one device")
        check_input_dtype("UViTT2I", "context", context, self.context_embed.weight)
        prefix = torch.cat([self._time_token(timesteps), self.context_embed(context)], dim=1)
        return self._run(x, prefix)


# --------------------------------------------------------------------------- TorchScript twins
class _ScriptUViTBase(nn.Module):
    def _time_token(self, timesteps: torch.Tensor, batch: int) -> torch.Tensor:
        if timesteps.dim() == 0 or (timesteps.dim() == 1 and timesteps.shape[0] == 1 and batch != 1):
            timesteps = timesteps.reshape(1).expand(batch)
        emb = timestep_embedding(timesteps, self.pos_embed.shape[-1]).to(self.pos_embed.dtype)
        return self.time_embed(emb).unsqueeze(1)

    def _run(self, x: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.embed(x, prefix, self.pos_embed)
        skips: List[torch.Tensor] = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())
        x = self.decoder_pred(self.norm(x))[:, self.extras:]
        return self.final_layer(script_unpatchify(x, self.patch_size, self.grid, self.grid))


class ScriptUViT(_ScriptUViTBase):
    """TorchScript twin of :class:`UViT` (and of an ``optimize``'d upstream U-ViT): upstream's forward."""

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        prefix = self._time_token(timesteps, x.shape[0])
        if hasattr(self, "label_emb"):
            if y is None:
                raise ValueError("UViT: this model is class-conditional; y is required")
            prefix = torch.cat([self.label_emb(y).unsqueeze(1), prefix], dim=1)
        return self._run(x, prefix)


class ScriptUViTT2I(_ScriptUViTBase):
    """TorchScript twin of :class:`UViTT2I` (and of an ``optimize``'d upstream U-ViT text-to-image model)."""

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        prefix = torch.cat([self._time_token(timesteps, x.shape[0]), self.context_embed(context)], dim=1)
        return self._run(x, prefix)


def script_uvit_twin(model: nn.Module, kind: str) -> nn.Module:
    """The TorchScript twin of a U-ViT (ours, or upstream's after ``optimize``): same parameters."""
    twin = script_twin(model, ScriptUViTT2I if kind == "uvit_t2i" else ScriptUViT)
    twin.patch_size, twin.extras = int(model.patch_size), int(model.extras)
    twin.grid = int(model.img_size) // int(model.patch_size)
    return twin
