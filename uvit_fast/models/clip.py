"""CLIP (Radford et al.) with the ViT image tower, state_dict compatible with OpenAI's
``clip/model.py`` checkpoints (open_clip uses the same keys).

Keys: ``visual.{conv1 (no bias), class_embedding [W], positional_embedding [1 + L, W], ln_pre,
transformer.resblocks.{i}.{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2,
mlp.c_fc, mlp.c_proj}, ln_post, proj [W, E]}``, ``token_embedding``, ``positional_embedding
[77, W_t]``, ``transformer.resblocks.*``, ``ln_final``, ``text_projection [W_t, E]``,
``logit_scale``. QuickGELU, LayerNorm eps 1e-5 computed in float32.

The fused path runs the patch embedding with the class token as prefix and the position
embedding added in one kernel, the fused LayerNorm (and residual + LayerNorm between attention
and MLP), the fused attention (causal in the text tower), the attention's projections through
``ops.fused_linear`` and the MLP (QuickGELU) with its residual add through ``ops.fused_mlp``.

:func:`text_to_image_context` gives the text tower's last hidden states, the context U-ViT's
text-to-image model (``UViTT2I``, ``clip_dim`` = the text width) is conditioned on.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from uvit_fast import ops
from uvit_fast.layers import InProjAttention, LayerNormFp32, QuickGELU, mlp_residual, script_twin
from uvit_fast.ops._autocast import matmul_dtype
from uvit_fast.models.common import check_image, check_index_range

#: keys in OpenAI's released (JIT) checkpoints that are not parameters; ignored on load
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


class ResidualAttentionBlock(nn.Module):
    """OpenAI's block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))`` with
    ``mlp = c_fc, QuickGELU, c_proj``."""

    def __init__(self, width: int, heads: int, *, causal: bool = False, fused: bool = True):
        super().__init__()
        self.attn = InProjAttention(width, heads, causal=causal, fused=fused)
        self.ln_1 = LayerNormFp32(width, fused=fused)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * width, width)),
        ]))
        self.ln_2 = LayerNormFp32(width, fused=fused)
        self.fused = fused

    def __prepare_scriptable__(self) -> nn.Module:
        """TorchScript runs OpenAI's block math (:class:`ScriptResidualAttentionBlock`)."""
        return script_twin(self, ScriptResidualAttentionBlock)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            x, h = self.ln_2.residual(x, self.attn(self.ln_1(x)))
            return mlp_residual(self.mlp, x, h)  # c_fc + QuickGELU, then c_proj + the residual: one fused_mlp
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """``resblocks``: a stack of :class:`ResidualAttentionBlock` on ``(B, L, W)`` (batch first)."""

    def __init__(self, width: int, layers: int, heads: int, *, causal: bool = False, fused: bool = True):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads, causal=causal, fused=fused) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resblocks(x)


class VisionTransformer(nn.Module):
    """CLIP's image tower: ``(B, 3, R, R)`` -> ``(B, output_dim)`` (not normalised)."""

    def __init__(
        self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int,
        *, fused: bool = True,
    ):
        super().__init__()
        self.input_resolution = input_resolution
        self.patch_size = patch_size
        self.output_dim = output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.num_tokens = 1 + (input_resolution // patch_size) ** 2
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.num_tokens, width))
        self.ln_pre = LayerNormFp32(width, fused=fused)
        self.transformer = Transformer(width, layers, heads, fused=fused)
        self.ln_post = LayerNormFp32(width, fused=fused)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.fused = fused

    def __prepare_scriptable__(self) -> nn.Module:
        return script_twin(self, ScriptVisionTransformer)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1 + L, W)``: ``[class, patches] + positional_embedding`` (before ``ln_pre``)."""
        W = self.class_embedding.shape[0]
        if self.fused and not torch.jit.is_tracing():  # torch.jit.trace records the plain path
            # upstream casts the class and position embeddings to the conv's output dtype (the
            # autocast dtype under autocast), so the residual stream has that dtype: same here
            dt = matmul_dtype(x)
            cls, pos = self.class_embedding.to(dt).view(1, 1, W), self.positional_embedding.to(dt).unsqueeze(0)
            return ops.patchify_embed(x, self.conv1.weight, None, prefix=cls, pos_embed=pos)
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).view(1, 1, W).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.ln_pre(self.tokens(x)))
        return self.ln_post(x[:, 0]) @ self.proj


class CLIP(nn.Module):
    """OpenAI CLIP (ViT image tower). Constructor as upstream's ``CLIP(embed_dim,
    image_resolution, vision_layers, vision_width, vision_patch_size, context_length,
    vocab_size, transformer_width, transformer_heads, transformer_layers)`` (vision heads =
    ``vision_width // 64``, as upstream); ``img_size`` / ``patch_size`` are accepted as aliases
    of ``image_resolution`` / ``vision_patch_size``.

    ``forward(image, text)`` returns ``(logits_per_image, logits_per_text)``, the scaled cosine
    similarities ``exp(logit_scale) * norm(img) @ norm(txt).T`` and their transpose.
    """

    def __init__(
        self,
        embed_dim: int = 512,
        image_resolution: int = 224,
        vision_layers: int = 12,
        vision_width: int = 768,
        vision_patch_size: int = 32,
        context_length: int = 77,
        vocab_size: int = 49408,
        transformer_width: int = 512,
        transformer_heads: int = 8,
        transformer_layers: int = 12,
        *,
        vision_heads: Optional[int] = None,
        img_size: Optional[int] = None,
        patch_size: Optional[int] = None,
        fused: bool = True,
    ):
        super().__init__()
        if img_size is not None:
            image_resolution = img_size
        if patch_size is not None:
            vision_patch_size = patch_size
        vision_heads = vision_width // 64 if vision_heads is None else vision_heads
        if image_resolution % vision_patch_size:
            raise ValueError(
                f"CLIP: image_resolution {image_resolution} is not divisible by vision_patch_size {vision_patch_size}"
            )
        if vision_heads < 1 or vision_width % vision_heads:
            raise ValueError(f"CLIP: vision_width {vision_width} is not divisible by vision_heads {vision_heads}")
        if transformer_width % transformer_heads:
            raise ValueError(
                f"CLIP: transformer_width {transformer_width} is not divisible by transformer_heads {transformer_heads}"
            )
        self.embed_dim = embed_dim
        self.image_resolution = self.img_size = image_resolution
        self.vision_patch_size = self.patch_size = vision_patch_size
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.transformer_width = transformer_width
        self.fused = fused
        self.visual = VisionTransformer(
            image_resolution, vision_patch_size, vision_width, vision_layers, vision_heads, embed_dim, fused=fused
        )
        self.num_tokens = self.visual.num_tokens
        self.transformer = Transformer(
            transformer_width, transformer_layers, transformer_heads, causal=True, fused=fused
        )
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNormFp32(transformer_width, fused=fused)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """Upstream's init of the text side (the image tower keeps its constructor init)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        t = self.transformer
        proj_std = (t.width ** -0.5) * ((2 * t.layers) ** -0.5)
        attn_std = t.width ** -0.5
        fc_std = (2 * t.width) ** -0.5
        for block in t.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=t.width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def __prepare_scriptable__(self) -> nn.Module:
        """TorchScript runs OpenAI's math (:class:`ScriptCLIP`, the same parameters), not the kernels."""
        return script_twin(self, ScriptCLIP)

    # ------------------------------------------------------------------ inputs
    def example_inputs(self, batch_size: int = 1, device=None, dtype=None) -> tuple:
        """Random ``(image, text)``: images ``(B, 3, R, R)`` and ``(B, context_length)`` token
        ids laid out as the tokenizer does (start token ``vocab - 2``, random ids, the end
        token ``vocab - 1`` at a random position, zeros after), for profiling and benchmarks."""
        device = device or self.positional_embedding.device
        R, L, V = self.image_resolution, self.context_length, self.vocab_size
        image = torch.randn(batch_size, 3, R, R, device=device, dtype=dtype)
        pos = torch.arange(L, device=device).expand(batch_size, L)
        eot_at = torch.randint(min(1, L - 1), L, (batch_size, 1), device=device)
        ids = torch.randint(1, max(V - 2, 2), (batch_size, L), device=device)
        ids = torch.where(pos < eot_at, ids, torch.zeros_like(ids))
        ids = torch.where(pos == eot_at, torch.full_like(ids, V - 1), ids)
        if L > 1:
            ids = torch.where(pos == 0, torch.full_like(ids, max(V - 2, 0)), ids)
        return image, ids

    def _check_text(self, text: torch.Tensor) -> None:
        op = "CLIP.encode_text"
        if not isinstance(text, torch.Tensor):
            raise TypeError(f"{op}: text must be a tensor of token ids (B, L); got {type(text).__name__}")
        if text.dtype.is_floating_point or text.dtype == torch.bool or text.is_complex():
            raise TypeError(f"{op}: text must hold integer token ids; got dtype {text.dtype}")
        if text.dim() != 2 or text.shape[1] == 0:
            raise ValueError(
                f"{op}: text must have shape (B, L) with 1 <= L <= {self.context_length}; got {tuple(text.shape)}"
            )
        if text.shape[1] > self.context_length:
            raise ValueError(
                f"{op}: text has {text.shape[1]} tokens but the context length is {self.context_length} "
                f"(text {tuple(text.shape)}); truncate it"
            )
        check_index_range(op, "token ids", text, self.vocab_size, " (the vocabulary)")  # no host sync on a GPU

    # ------------------------------------------------------------------ towers
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 3, R, R)`` -> ``(B, embed_dim)`` image features (not normalised)."""
        check_image("CLIP.encode_image", image, 3, self.image_resolution, self.vision_patch_size)
        return self.visual(image.to(self.dtype))

    def text_hidden_states(self, text: torch.Tensor) -> torch.Tensor:
        """``(B, L, W_t)``: the text transformer's output after ``ln_final``, every token (the
        "last hidden state" a text-to-image model is conditioned on)."""
        self._check_text(text)
        x = self._text_transformer(text)
        return self.ln_final(x)

    def _text_transformer(self, text: torch.Tensor) -> torch.Tensor:
        L = text.shape[1]
        x = self.token_embedding(text).to(self.dtype) + self.positional_embedding[:L].to(self.dtype)
        return self.transformer(x)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` token ids (``L <= context_length``) -> ``(B, embed_dim)`` text features
        (not normalised): the state at the end-of-text token (the largest id, ``argmax``)."""
        self._check_text(text)
        x = self._text_transformer(text)
        rows = torch.arange(x.shape[0], device=x.device)
        eot = text.argmax(dim=-1)
        if self.fused:
            # LayerNorm is per token: normalising only the pooled token gives the same features
            return self.ln_final(x[rows, eot]) @ self.text_projection
        return self.ln_final(x)[rows, eot] @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        image_features = self.encode_image(image)
        text_features = self.encode_text(text)
        image_features = image_features / image_features.norm(dim=1, keepdim=True)
        text_features = text_features / text_features.norm(dim=1, keepdim=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


# --------------------------------------------------------------------------- TorchScript twins
class ScriptResidualAttentionBlock(nn.Module):
    """TorchScript twin of :class:`ResidualAttentionBlock`: ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ScriptVisionTransformer(nn.Module):
    """TorchScript twin of CLIP's image tower (:class:`VisionTransformer`): OpenAI's math."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)
        W = self.class_embedding.shape[0]
        cls = self.class_embedding.to(x.dtype).view(1, 1, W).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class ScriptCLIP(nn.Module):
    """TorchScript twin of :class:`CLIP`: ``forward``, ``encode_image`` and ``encode_text`` with OpenAI's math."""

    @torch.jit.export
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image.to(self.visual.conv1.weight.dtype))

    @torch.jit.export
    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        dt = self.visual.conv1.weight.dtype
        L = text.shape[1]
        x = self.token_embedding(text).to(dt) + self.positional_embedding[:L].to(dt)
        x = self.ln_final(self.transformer(x))
        rows = torch.arange(x.shape[0], device=x.device)
        return x[rows, text.argmax(dim=-1)] @ self.text_projection

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        image_features = self.encode_image(image)
        text_features = self.encode_text(text)
        image_features = image_features / image_features.norm(2.0, dim=1, keepdim=True)
        text_features = text_features / text_features.norm(2.0, dim=1, keepdim=True)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def contrastive_loss(logits_per_image: torch.Tensor, logits_per_text: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss for a batch of N matching pairs: the mean of the
    cross-entropies of ``logits_per_image`` and ``logits_per_text`` (default: its transpose),
    each against the labels ``0..N-1`` (pair i matches pair i)."""
    if not isinstance(logits_per_image, torch.Tensor) or logits_per_image.dim() != 2:
        got = logits_per_image
        got = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise ValueError(f"contrastive_loss: logits_per_image must have shape (N, N); got {got}")
    N, M = logits_per_image.shape
    if N != M:
        raise ValueError(
            f"contrastive_loss: needs N matching image-text pairs, i.e. square logits; got logits_per_image {(N, M)}"
        )
    if logits_per_text is None:
        logits_per_text = logits_per_image.t()
    elif tuple(logits_per_text.shape) != (N, N):
        raise ValueError(
            f"contrastive_loss: logits_per_text must have shape {(N, N)}; got {tuple(logits_per_text.shape)}"
        )
    labels = torch.arange(N, device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def text_to_image_context(clip: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP text tower -> U-ViT text-to-image context: the last hidden states after
    ``ln_final``, ``(B, L, transformer_width)``. With ``L = context_length = 77`` this is the
    ``context`` of ``UViTT2I(clip_dim=clip.transformer_width, num_clip_token=77)``.

    >>> clip = create_model("clip_vit_l14"); t2i = create_model("mscoco_uvit_small")
    >>> eps = t2i(latents, timesteps, text_to_image_context(clip, tokens))
    """
    if not isinstance(clip, CLIP):
        raise TypeError(f"text_to_image_context: clip must be a uvit_fast CLIP model; got {type(clip).__name__}")
    return clip.text_hidden_states(tokens)


def openai_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """An OpenAI checkpoint's state_dict without its non-parameter entries
    (``input_resolution``, ``context_length``, ``vocab_size`` in the released JIT files)."""
    return {k: v for k, v in state_dict.items() if k not in OPENAI_EXTRA_KEYS}


def clip_config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, int]:
    """The :class:`CLIP` constructor arguments of an OpenAI-layout ViT CLIP state_dict, read
    from its shapes (vision heads = width // 64, text heads = text width // 64, as upstream)."""
    need = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "positional_embedding",
            "token_embedding.weight", "ln_final.weight", "text_projection")
    missing = [k for k in need if k not in state_dict]
    if missing:
        raise ValueError(f"clip_config_from_state_dict: not an OpenAI ViT CLIP state_dict; missing {missing}")
    conv = state_dict["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vision_layers = len({k.split(".")[3] for k in state_dict if k.startswith("visual.transformer.resblocks.")})
    text_layers = len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")})
    tw = state_dict["ln_final.weight"].shape[0]
    return dict(
        embed_dim=state_dict["text_projection"].shape[1],
        image_resolution=patch * grid,
        vision_layers=vision_layers,
        vision_width=width,
        vision_patch_size=patch,
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        transformer_width=tw,
        transformer_heads=tw // 64,
        transformer_layers=text_layers,
    )


__all__ = [
    "CLIP",
    "VisionTransformer",
    "Transformer",
    "ResidualAttentionBlock",
    "contrastive_loss",
    "text_to_image_context",
    "openai_state_dict",
    "clip_config_from_state_dict",
]
