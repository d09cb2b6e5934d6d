"""ViViT (Arnab et al., "ViViT: A Video Vision Transformer", arXiv 2103.15691) video classifiers.

The official code is JAX (scenic), so there is no PyTorch checkpoint layout to follow; ours
reuses timm's ViT names so that an image ViT's weights initialise the (spatial) transformer
(see :func:`inflate_patch_embed`).

* Tubelet embedding: ``Conv3d`` with kernel = stride = ``(t, p, p)`` over ``(B, C, T, H, W)``
  (``patch_embed.proj``), tokens in ``(T' h w)`` row-major order.
* Model 1 (``variant=1``, spatio-temporal attention): ``[cls, tubelets] + pos_embed`` through
  one transformer; keys ``cls_token``, ``pos_embed [1, 1 + T'hw, D]``, ``blocks.{i}.*``,
  ``norm``, ``head``.
* Model 2 (``variant=2``, factorised encoder): per temporal index, ``[cls, hw tubelets] +
  pos_embed`` through the spatial transformer (shared weights across temporal indices,
  ``cls_token``, ``pos_embed [1, 1 + hw, D]``, ``blocks``, ``norm``); the ``T'`` normalised
  class tokens, with ``temporal_cls_token`` first and ``temporal_pos_embed [1, 1 + T', D]``
  added, go through the temporal transformer (``temporal_blocks``, ``temporal_norm``);
  ``head`` reads its class token.

Blocks are timm's ViT blocks (pre-norm, LayerNorm eps 1e-6, qkv with bias). The GELU is exact
by default (timm); scenic's JAX code uses the tanh approximation (``gelu_approximate="tanh"``).
"""
from __future__ import annotations

from typing import Dict, Sequence, Union

import torch
import torch.nn as nn

from uvit_fast.layers import LayerNorm, PatchEmbed, script_twin
from uvit_fast.models.vit import Block, init_vit_weights_


def check_video(model: str, x: torch.Tensor, in_chans: int, num_frames: int, img_size: int, tubelet) -> None:
    """``(B, C, T, H, W)`` video with ``T`` a multiple of the tubelet's temporal size, the
    model's frame count and image size."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{model}: x must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(f"{model}: x must be a video of shape (B, C, T, H, W); got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{model}: x must have a floating dtype; got {x.dtype}")
    B, C, T, H, W = x.shape
    t, p = tubelet[0], tubelet[1]
    if C != in_chans:
        raise ValueError(
            f"{model}: x has {C} channels but the model was built with in_chans={in_chans} (x {tuple(x.shape)})"
        )
    if T % t:
        raise ValueError(
            f"{model}: x has {T} frames, which is not divisible by the tubelet's temporal size {t} "
            f"(x {tuple(x.shape)}, tubelet {tuple(tubelet)})"
        )
    if H % p or W % p:
        raise ValueError(f"{model}: frame size {H}x{W} is not divisible by the patch size {p} (x {tuple(x.shape)})")
    if T != num_frames or (H, W) != (img_size, img_size):
        raise ValueError(
            f"{model}: x has {T} frames of {H}x{W} but the model was built for num_frames={num_frames} "
            f"of {img_size}x{img_size} (its position embedding has a fixed token count); x {tuple(x.shape)}"
        )


class ViViT(nn.Module):
    """ViViT video classifier: ``forward(x)`` with ``x`` of shape ``(B, in_chans, num_frames,
    img_size, img_size)`` returns ``(B, num_classes)`` logits.

    Args:
        variant: 1 (joint spatio-temporal attention) or 2 (factorised encoder).
        tubelet_size: temporal extent ``t`` of a tubelet; ``patch_size`` its spatial extent.
        depth: transformer depth (Model 2: the spatial transformer's).
        temporal_depth, temporal_heads: Model 2's temporal transformer (heads default to
            ``num_heads``); ignored by Model 1.
    """

    def __init__(
        self,
        num_frames: int = 32,
        img_size: int = 224,
        patch_size: int = 16,
        tubelet_size: int = 2,
        in_chans: int = 3,
        num_classes: int = 400,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        variant: int = 1,
        temporal_depth: int = 4,
        temporal_heads: Union[int, None] = None,
        gelu_approximate: str = "none",
        *,
        fused: bool = True,
    ):
        super().__init__()
        name = "ViViT"
        if variant not in (1, 2):
            raise ValueError(f"{name}: variant must be 1 (spatio-temporal) or 2 (factorised encoder); got {variant!r}")
        if num_frames % tubelet_size:
            raise ValueError(f"{name}: num_frames {num_frames} is not divisible by tubelet_size {tubelet_size}")
        if img_size % patch_size:
            raise ValueError(f"{name}: img_size {img_size} is not divisible by patch_size {patch_size}")
        temporal_heads = num_heads if temporal_heads is None else temporal_heads
        for what, heads in (("num_heads", num_heads), ("temporal_heads", temporal_heads)):
            if embed_dim % heads:
                raise ValueError(f"{name}: embed_dim {embed_dim} is not divisible by {what} {heads}")
        if num_classes <= 0:
            raise ValueError(f"{name}: num_classes must be positive; got {num_classes}")
        self.variant = variant
        self.num_frames = num_frames
        self.img_size = img_size
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        self.tubelet = (tubelet_size, patch_size, patch_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.fused = fused
        self.temporal_tokens = num_frames // tubelet_size
        self.spatial_tokens = (img_size // patch_size) ** 2
        blk = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, gelu_approximate=gelu_approximate, fused=fused)
        self.patch_embed = PatchEmbed(self.tubelet, in_chans, embed_dim, fused=fused)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if variant == 1:
            self.num_tokens = 1 + self.temporal_tokens * self.spatial_tokens
        else:
            self.num_tokens = 1 + self.spatial_tokens  # per spatial sequence
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, **blk) for _ in range(depth)])
        self.norm = LayerNorm(embed_dim, eps=1e-6, fused=fused)
        if variant == 2:
            self.temporal_cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.temporal_pos_embed = nn.Parameter(torch.zeros(1, 1 + self.temporal_tokens, embed_dim))
            self.temporal_blocks = nn.ModuleList(
                [Block(embed_dim, temporal_heads, **blk) for _ in range(temporal_depth)]
            )
            self.temporal_norm = LayerNorm(embed_dim, eps=1e-6, fused=fused)
        self.head = nn.Linear(embed_dim, num_classes)
        init_vit_weights_(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if variant == 2:
            nn.init.trunc_normal_(self.temporal_pos_embed, std=0.02)
            nn.init.normal_(self.temporal_cls_token, std=1e-6)

    @torch.jit.ignore
    def no_weight_decay(self):
        names = {"pos_embed", "cls_token"}
        if self.variant == 2:
            names |= {"temporal_pos_embed", "temporal_cls_token"}
        return names

    def __prepare_scriptable__(self) -> nn.Module:
        """TorchScript runs the plain math (:class:`ScriptViViT`, the same parameters), not the kernels."""
        return script_twin(self, ScriptViViT)

    def example_inputs(self, batch_size: int = 1, device=None, dtype=None) -> tuple:
        """Random ``(video,)`` of shape ``(B, C, T, H, W)``, for profiling and benchmarks."""
        device = device or self.pos_embed.device
        shape = (batch_size, self.in_chans, self.num_frames, self.img_size, self.img_size)
        return (torch.randn(shape, device=device, dtype=dtype),)

    def _check(self, x: torch.Tensor) -> None:
        check_video(f"ViViT (model {self.variant})", x, self.in_chans, self.num_frames, self.img_size, self.tubelet)

    def _encode_model1(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.embed(x, self.cls_token, self.pos_embed)  # (B, 1 + T'hw, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x[:, 0])

    def _spatial_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B * T', 1 + hw, D)``: every temporal index's tubelets with the class token first
        and the spatial ``pos_embed`` added."""
        B, C, T, H, W = x.shape
        t, nt = self.tubelet_size, self.temporal_tokens
        if self.fused:
            # one clip of t frames per temporal index, so the 3-D fused patchify_embed puts the
            # class token first and adds pos_embed for every index in one kernel
            clips = x.reshape(B, C, nt, t, H, W).transpose(1, 2).reshape(B * nt, C, t, H, W)
            return self.patch_embed.embed(clips, self.cls_token, self.pos_embed)
        tok = self.patch_embed.proj(x)  # (B, D, T', h, w), as upstream's Conv3d over the whole video
        tok = tok.flatten(3).permute(0, 2, 3, 1).reshape(B * nt, self.spatial_tokens, self.embed_dim)
        cls = self.cls_token.expand(B * nt, -1, -1)
        return torch.cat([cls, tok], dim=1) + self.pos_embed

    def _encode_model2(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        s = self._spatial_tokens(x)
        for blk in self.blocks:
            s = blk(s)
        frames = self.norm(s[:, 0]).reshape(B, self.temporal_tokens, self.embed_dim)
        cls = self.temporal_cls_token.expand(B, -1, -1).to(frames.dtype)
        z = torch.cat([cls, frames], dim=1) + self.temporal_pos_embed
        for blk in self.temporal_blocks:
            z = blk(z)
        return self.temporal_norm(z[:, 0])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, D)``: the final normalised class token (pre-logits)."""
        self._check(x)
        return self._encode_model1(x) if self.variant == 1 else self._encode_model2(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def inflate_patch_embed(weight: torch.Tensor, tubelet_size: int, method: str = "central_frame") -> torch.Tensor:
    """A 2-D patch embedding ``[D, C, p, p]`` (e.g. a ViT's ``patch_embed.proj.weight``) as a
    3-D tubelet embedding ``[D, C, t, p, p]``, the two initialisations of the ViViT paper:

    * ``"central_frame"``: the 2-D filter at temporal index ``t // 2``, zeros elsewhere;
    * ``"average"`` (filter inflation): the 2-D filter replicated over ``t`` and divided by ``t``.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"inflate_patch_embed: weight must have shape [D, C, p, p]; got {got}")
    if not isinstance(tubelet_size, int) or tubelet_size < 1:
        raise ValueError(f"inflate_patch_embed: tubelet_size must be a positive int; got {tubelet_size!r}")
    if method == "central_frame":
        out = weight.new_zeros(weight.shape[:2] + (tubelet_size,) + weight.shape[2:])
        out[:, :, tubelet_size // 2] = weight
        return out
    if method == "average":
        return weight.unsqueeze(2).repeat(1, 1, tubelet_size, 1, 1) / tubelet_size
    raise ValueError(f"inflate_patch_embed: method must be 'central_frame' or 'average'; got {method!r}")


def vivit_state_dict_from_vit(
    vit_state_dict: Dict[str, torch.Tensor], model: ViViT, method: str = "central_frame"
) -> Dict[str, torch.Tensor]:
    """A ViViT state_dict initialised from a timm ViT one, as the paper does: the transformer
    (Model 2: the spatial one), ``norm`` and ``cls_token`` are copied, the patch embedding is
    inflated (:func:`inflate_patch_embed`), the class token's position embedding is kept and
    the patches' one is tiled over the temporal indices (Model 1); every other entry (the
    temporal transformer, the head) keeps ``model``'s current values. The image ViT must have
    the same width, patch size, depth and grid as ``model``."""
    own = model.state_dict()
    out = dict(own)
    for k, v in vit_state_dict.items():
        if k in ("head.weight", "head.bias") or k not in own:
            continue
        if k == "patch_embed.proj.weight":
            v = inflate_patch_embed(v, model.tubelet_size, method)
        elif k == "pos_embed" and model.variant == 1:
            v = torch.cat([v[:, :1], v[:, 1:].repeat(1, model.temporal_tokens, 1)], dim=1)
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(
                f"vivit_state_dict_from_vit: {k} has shape {tuple(v.shape)} in the ViT state_dict "
                f"but {tuple(own[k].shape)} in the model"
            )
        out[k] = v.to(own[k].dtype)
    return out


class ScriptViViT(nn.Module):
    """TorchScript twin of :class:`ViViT`: the tubelet conv over the whole video, then Model 1's joint
    transformer or Model 2's spatial and temporal transformers, as the plain path computes them."""


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "temporal_blocks"):
            B = x.shape[0]
            nt = self.temporal_tokens
            tok = self.patch_embed.proj(x)  # (B, D, T', h, w)
            tok = tok.flatten(3).permute(0, 2, 3, 1).reshape(B * nt, self.spatial_tokens, self.embed_dim)
            s = torch.cat([self.cls_token.expand(B * nt, -1, -1), tok], dim=1) + self.pos_embed
            for blk in self.blocks:
                s = blk(s)
            frames = self.norm(s[:, 0]).reshape(B, nt, self.embed_dim)
            cls = self.temporal_cls_token.expand(B, -1, -1).to(frames.dtype)
            z = torch.cat([cls, frames], dim=1) + self.temporal_pos_embed
            for blk in self.temporal_blocks:
                z = blk(z)
            return self.head(self.temporal_norm(z[:, 0]))
        x = self.patch_embed.embed(x, self.cls_token, self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, 0]))


__all__: Sequence[str] = ("ViViT", "check_video", "inflate_patch_embed", "vivit_state_dict_from_vit")
