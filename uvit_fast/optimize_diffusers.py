"""``optimize`` for Hugging Face diffusers transformers: DiT, PixArt and UniDiffuser's U-ViT.

:func:`uvit_fast.optimize` calls :func:`optimize_diffusers` when it is given a diffusers
``ModelMixin`` (detected by class module name, so ``uvit_fast`` never imports diffusers on its
own), or a module tree holding one (a wrapper, ``torch.compile``'s ``OptimizedModule``). This
module imports diffusers; checked against diffusers 0.42.1.

What it swaps, in place, keeping the model's class, ``config``, module names, ``state_dict``
keys and the attention processor API (a swapped module keeps its object and gets a subclass of
its class, so ``isinstance`` holds):

* ``PatchEmbed`` (patch conv + sin-cos position embedding) -> :class:`FusedPatchEmbed`, whose
  forward runs :func:`uvit_fast.ops.patchify_embed` (conv, flatten and the position embedding in
  one kernel). Inputs of another size than ``sample_size`` (diffusers recomputes the position
  embedding for them) run diffusers' own forward; ``pos_embed_max_size`` (SD3 cropping) and
  ``layer_norm=True`` are left alone.
* ``BasicTransformerBlock`` with ``norm_type="ada_norm_zero"`` (DiT) or ``"ada_norm_single"``
  (PixArt) -> :class:`FusedBasicTransformerBlock`: the modulated LayerNorms run
  :func:`~uvit_fast.ops.adaln_layer_norm` and each (gated) residual add that is followed by a
  LayerNorm runs with it in :func:`~uvit_fast.ops.residual_adaln_layer_norm`. Attention and the
  feed-forward are still called as the block's own sub-modules (so a user's processor, dropout
  and GELU apply as before). Chunked feed-forward and GLIGEN calls run diffusers' forward.
* UniDiffuser (``UTransformer2DModel``, ``UniDiffuserModel``): its ``PatchEmbed``, the long-skip
  ``SkipBlock`` (:func:`~uvit_fast.ops.skip_concat_linear`, no concat, then the fused LayerNorm),
  ``UniDiffuserBlock`` (post- or pre-LN: residual + LayerNorm fused) and pre-LN
  ``UTransformerBlock``.
* each ``Attention`` whose processor is diffusers' ``AttnProcessor2_0`` and which has no
  group/spatial/qk/cross norm, no added KV projections, no residual connection or output rescale
  -> :class:`UvitFastAttnProcessor` (set through ``Attention.set_processor``): q, k, v
  projections as before, then :func:`uvit_fast.ops.attention` (self-attention and
  cross-attention with Lq != Lk). A call with an ``attention_mask`` (PixArt's text padding mask)
  runs ``AttnProcessor2_0`` instead: the kernel takes no padding mask.

Left alone, and said so in the report: the model's own forward (embeddings, final norm, output
projection and unpatchify stay diffusers'), and any module whose structure differs from the
above.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.normalization import AdaLayerNormZero

try:  # UniDiffuser's U-ViT lives under the deprecated pipelines (diffusers 0.42.1)
    from diffusers.pipelines.deprecated.unidiffuser import modeling_uvit as _uvit
except ImportError:  # pragma: no cover - a diffusers without it
    _uvit = None

from uvit_fast import ops
from uvit_fast.ops._autocast import autocast_dtype
from uvit_fast.ops.attention import MAX_HEAD_DIM

#: diffusers model classes optimize knows, by class name
SUPPORTED_MODELS = ("DiTTransformer2DModel", "PixArtTransformer2DModel") + (
    ("UTransformer2DModel", "UniDiffuserModel") if _uvit is not None else ()
)
#: the diffusers version the recognisers were checked against
CHECKED_VERSION = "0.42.1"


class _Skip(Exception):
    """A module whose math the fused path would change; the message says why."""


# --------------------------------------------------------------------------- attention
class UvitFastAttnProcessor:
    """``AttnProcessor2_0``'s math on :func:`uvit_fast.ops.attention`.

    Supported calls (3-D hidden states, no attention mask) run the fused kernel on the
    ``(B, L, H, D)`` views of the q, k, v projections; any other call runs diffusers'
    ``AttnProcessor2_0`` (``fallback_calls`` counts them).
    """

    def __init__(self):
        self._diffusers = AttnProcessor2_0()
        self.fallback_calls = 0

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        temb: Optional[torch.Tensor] = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if (attention_mask is not None or args or kwargs.get("scale") is not None
                or hidden_states.dim() != 3 or ctx.dim() != 3):
            self.fallback_calls += 1
            return self._diffusers(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        B, Lq, _ = hidden_states.shape
        q = attn.to_q(hidden_states)
        k = attn.to_k(ctx)
        v = attn.to_v(ctx)
        H = attn.heads
        Dh = k.shape[-1] // H
        # AttnProcessor2_0 calls SDPA with its default scale, Dh ** -0.5 (not attn.scale): so does ops.attention
        out = ops.attention(q.view(B, Lq, H, Dh), k.view(B, -1, H, Dh), v.view(B, -1, H, Dh))
        out = out.reshape(B, Lq, H * Dh).to(q.dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _check_attention(attn: nn.Module) -> None:
    if type(attn) is not Attention:
        raise _Skip(f"{type(attn).__name__} is not diffusers' Attention")
    proc = attn.processor
    if type(proc) is UvitFastAttnProcessor:
        return
    if getattr(attn, "fused_projections", False):  # fuse_qkv_projections(): FusedAttnProcessor2_0 on to_qkv
        raise _Skip("uses fused projections (to_qkv, fuse_qkv_projections())")
    if type(proc) is not AttnProcessor2_0:
        raise _Skip(f"processor is {type(proc).__name__}, not AttnProcessor2_0 (a user's processor is kept)")
    for name in ("spatial_norm", "group_norm", "norm_q", "norm_k", "norm_cross", "add_k_proj", "to_add_out"):
        if getattr(attn, name, None) is not None:
            raise _Skip(f"has {name}, which the fused processor does not apply")
    if attn.residual_connection or attn.rescale_output_factor != 1.0:
        raise _Skip("has a residual connection or an output rescale")
    if not (isinstance(attn.to_k, nn.Linear) and isinstance(attn.to_v, nn.Linear) and attn.to_out is not None):
        raise _Skip("has no to_k / to_v / to_out")
    if attn.inner_kv_dim != attn.inner_dim:
        raise _Skip(f"has {attn.inner_kv_dim // (attn.inner_dim // attn.heads)} key/value heads for {attn.heads} query heads")
    head_dim = attn.inner_dim // attn.heads
    if head_dim > MAX_HEAD_DIM:
        raise _Skip(f"head_dim {head_dim} is above the kernel's maximum")


# --------------------------------------------------------------------------- patch embedding
def _conv_out_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype diffusers' conv gives ``x``: the autocast dtype inside autocast (float64 excepted)."""
    ac = autocast_dtype(x.device)
    return x.dtype if ac is None or x.dtype == torch.float64 else ac


class FusedPatchEmbed(PatchEmbed):
    """diffusers ``PatchEmbed`` whose forward runs :func:`uvit_fast.ops.patchify_embed`."""

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        if (latent.dim() != 4 or latent.shape[-2] % p or latent.shape[-1] % p
                or (latent.shape[-2] // p, latent.shape[-1] // p) != (self.height, self.width)):
            return super().forward(latent)  # another size: diffusers recomputes the position embedding
        out = ops.patchify_embed(latent, self.proj.weight, self.proj.bias, pos_embed=self.pos_embed)
        return out.to(_conv_out_dtype(latent))  # diffusers: (conv(x) + pos_embed).to(conv(x).dtype)


def _check_patch_embed(pe: nn.Module) -> None:
    if type(pe) is FusedPatchEmbed:
        return
    if type(pe) is not PatchEmbed:
        raise _Skip(f"{type(pe).__name__} is not diffusers' PatchEmbed")
    if not pe.flatten or pe.layer_norm or pe.pos_embed_max_size:
        raise _Skip("patch embedding does not flatten, applies a LayerNorm or crops a larger position embedding")
    proj = pe.proj
    if (type(proj) is not nn.Conv2d or proj.kernel_size != (pe.patch_size, pe.patch_size) or proj.stride != proj.kernel_size
            or any(proj.padding) or proj.dilation != (1, 1) or proj.groups != 1):
        raise _Skip("patch embedding conv is not a plain patch-sized, unpadded Conv2d")
    if pe.pos_embed is not None and tuple(pe.pos_embed.shape) != (1, pe.height * pe.width, proj.out_channels):
        raise _Skip(f"position embedding has shape {tuple(pe.pos_embed.shape)}")


# --------------------------------------------------------------------------- blocks
def _plain_ln(ln: Optional[nn.Module], what: str) -> nn.LayerNorm:
    if type(ln) is not nn.LayerNorm or len(ln.normalized_shape) != 1:
        raise _Skip(f"{what} is {type(ln).__name__}, not a 1-D nn.LayerNorm")
    return ln


def _check_block(blk: nn.Module) -> None:
    if type(blk) is FusedBasicTransformerBlock:
        return
    if type(blk) is not BasicTransformerBlock:
        raise _Skip(f"{type(blk).__name__} is not diffusers' BasicTransformerBlock")
    if blk.norm_type not in ("ada_norm_zero", "ada_norm_single"):
        raise _Skip(f"norm_type {blk.norm_type!r} (fused: 'ada_norm_zero', 'ada_norm_single')")
    if blk.pos_embed is not None or hasattr(blk, "fuser") or blk.only_cross_attention:
        raise _Skip("has a sinusoidal position embedding, a GLIGEN fuser or only cross-attention")
    if blk.norm_type == "ada_norm_zero":
        if type(blk.norm1) is not AdaLayerNormZero or blk.norm1.emb is None:
            raise _Skip(f"norm1 is {type(blk.norm1).__name__} without its own embedding, not AdaLayerNormZero")
        _plain_ln(blk.norm1.norm, "norm1.norm")
        _plain_ln(blk.norm3, "norm3")
    else:
        _plain_ln(blk.norm1, "norm1")
        sst = getattr(blk, "scale_shift_table", None)
        if not isinstance(sst, torch.Tensor) or tuple(sst.shape) != (6, blk.dim):
            raise _Skip("has no (6, dim) scale_shift_table")
    if blk.attn2 is not None or blk.norm_type == "ada_norm_single":
        _plain_ln(blk.norm2, "norm2")


def _ln_args(ln: nn.LayerNorm):
    return ln.weight, ln.bias, ln.eps


class FusedBasicTransformerBlock(BasicTransformerBlock):
    """diffusers ``BasicTransformerBlock`` (adaLN-Zero or adaLN-single) on the fused LayerNorm ops.

    Same sub-modules, same order of calls (and of random numbers: label dropout, dropout);
    each modulated LayerNorm and each residual add followed by a LayerNorm run fused.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        timestep: Optional[torch.LongTensor] = None,
        cross_attention_kwargs: Optional[Dict[str, Any]] = None,
        class_labels: Optional[torch.LongTensor] = None,
        added_cond_kwargs: Optional[Dict[str, torch.Tensor]] = None,
    ) -> torch.Tensor:
        kw = dict(cross_attention_kwargs or {})
        if (hidden_states.dim() != 3 or self._chunk_size is not None or "gligen" in kw
                or kw.get("scale") is not None):
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   timestep, cross_attention_kwargs, class_labels, added_cond_kwargs)
        h = hidden_states
        if self.norm_type == "ada_norm_zero":
            n1 = self.norm1
            emb = n1.linear(n1.silu(n1.emb(timestep, class_labels, hidden_dtype=h.dtype)))
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
            x = ops.adaln_layer_norm(h, shift_msa, scale_msa, *_ln_args(n1.norm), 1.0)
            a = self.attn1(x, encoder_hidden_states=None, attention_mask=attention_mask, **kw)
            if self.attn2 is not None:
                h, x = ops.residual_adaln_layer_norm(h, a, gate_msa, None, None, *_ln_args(self.norm2), 1.0)
                a = self.attn2(x, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask, **kw)
                gate_msa = None
            h, x = ops.residual_adaln_layer_norm(h, a, gate_msa, shift_mlp, scale_mlp, *_ln_args(self.norm3), 1.0)
            return gate_mlp.unsqueeze(1) * self.ff(x) + h
        # ada_norm_single (PixArt): the modulation comes from the model's adaln_single as `timestep`
        B = h.shape[0]
        mods = (self.scale_shift_table[None] + timestep.reshape(B, 6, -1)).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods  # each (B, 1, D)
        x = ops.adaln_layer_norm(h, shift_msa, scale_msa, *_ln_args(self.norm1), 1.0)
        a = self.attn1(x, encoder_hidden_states=None, attention_mask=attention_mask, **kw)
        if self.attn2 is not None:
            h = gate_msa * a + h
            # PixArt applies no norm before cross-attention
            a = self.attn2(h, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask, **kw)
            gate_msa = None
        h, x = ops.residual_adaln_layer_norm(h, a, gate_msa, shift_mlp, scale_mlp, *_ln_args(self.norm2), 1.0)
        return gate_mlp * self.ff(x) + h



# --------------------------------------------------------------------------- UniDiffuser (U-ViT)
if _uvit is not None:

    class FusedUViTPatchEmbed(_uvit.PatchEmbed):
        """UniDiffuser's ``PatchEmbed`` on :func:`uvit_fast.ops.patchify_embed`."""

        def forward(self, latent: torch.Tensor) -> torch.Tensor:
            pos = self.pos_embed if self.use_pos_embed else None
            p = self.proj.kernel_size
            if (latent.dim() != 4 or latent.shape[-2] % p[0] or latent.shape[-1] % p[1]
                    or (pos is not None and pos.shape[1] != (latent.shape[-2] // p[0]) * (latent.shape[-1] // p[1]))):
                return super().forward(latent)  # diffusers' own error (or result) for these shapes
            return ops.patchify_embed(latent, self.proj.weight, self.proj.bias, pos_embed=pos)

    class FusedSkipBlock(_uvit.SkipBlock):
        """U-ViT's long skip: ``LayerNorm(Linear(cat([x, skip])))`` with the linear on
        :func:`uvit_fast.ops.skip_concat_linear` (no concat) and the fused LayerNorm."""

        def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
            h = ops.skip_concat_linear(x, skip, self.skip_linear.weight, self.skip_linear.bias)
            return ops.adaln_layer_norm(h, None, None, *_ln_args(self.norm))

    class FusedUniDiffuserBlock(_uvit.UniDiffuserBlock):
        """UniDiffuser's block (LayerNorms on the residual stream): each residual add and the
        LayerNorm after it (post-LN), or before the next branch (pre-LN), in one pass."""

        def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                    encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None, class_labels=None):
            kw = cross_attention_kwargs if cross_attention_kwargs is not None else {}
            h = hidden_states
            if self.pre_layer_norm:  # h = LN1(h); h = h + attn1(h); [h = LN2(h); h = h + attn2(h)]; h = LN3(h); h + ff(h)
                h = ops.adaln_layer_norm(h, None, None, *_ln_args(self.norm1))
                a = self.attn1(h, encoder_hidden_states=None, attention_mask=attention_mask, **kw)
                if self.attn2 is not None:
                    _, h = ops.residual_adaln_layer_norm(h, a, None, None, None, *_ln_args(self.norm2))
                    a = self.attn2(h, encoder_hidden_states=encoder_hidden_states,
                                   attention_mask=encoder_attention_mask, **kw)
                _, h = ops.residual_adaln_layer_norm(h, a, None, None, None, *_ln_args(self.norm3))
                return self.ff(h) + h
            # post-LN (UniDiffuser's default): h = LN1(h + attn1(h)); [h = LN2(h + attn2(h))]; LN3(h + ff(h))
            a = self.attn1(h, encoder_hidden_states=None, attention_mask=attention_mask, **kw)
            _, h = ops.residual_adaln_layer_norm(h, a, None, None, None, *_ln_args(self.norm1))
            if self.attn2 is not None:
                a = self.attn2(h, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask, **kw)
                _, h = ops.residual_adaln_layer_norm(h, a, None, None, None, *_ln_args(self.norm2))
            _, h = ops.residual_adaln_layer_norm(h, self.ff(h), None, None, None, *_ln_args(self.norm3))
            return h

    class FusedUTransformerBlock(_uvit.UTransformerBlock):
        """UniDiffuser's ``UTransformerBlock`` with pre-LayerNorm (the standard diffusers block):
        each residual add fused with the next branch's LayerNorm."""

        def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                    encoder_attention_mask=None, timestep=None, cross_attention_kwargs=None, class_labels=None):
            kw = cross_attention_kwargs if cross_attention_kwargs is not None else {}
            h = hidden_states
            x = ops.adaln_layer_norm(h, None, None, *_ln_args(self.norm1))
            a = self.attn1(x, encoder_hidden_states=None, attention_mask=attention_mask, **kw)
            if self.attn2 is not None:
                h, x = ops.residual_adaln_layer_norm(h, a, None, None, None, *_ln_args(self.norm2))
                a = self.attn2(x, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask, **kw)
            h, x = ops.residual_adaln_layer_norm(h, a, None, None, None, *_ln_args(self.norm3))
            return self.ff(x) + h

    def _check_uvit_patch_embed(pe: nn.Module) -> None:
        if type(pe) is FusedUViTPatchEmbed:
            return
        if type(pe) is not _uvit.PatchEmbed:
            raise _Skip(f"{type(pe).__name__} is not UniDiffuser's PatchEmbed")
        if not pe.flatten or pe.layer_norm:
            raise _Skip("patch embedding does not flatten or applies a LayerNorm")
        proj = pe.proj
        if (type(proj) is not nn.Conv2d or proj.stride != proj.kernel_size or any(proj.padding)
                or proj.dilation != (1, 1) or proj.groups != 1):
            raise _Skip("patch embedding conv is not a plain patch-sized, unpadded Conv2d")

    def _check_skip_block(sb: nn.Module) -> None:
        if type(sb) is FusedSkipBlock:
            return
        if type(sb) is not _uvit.SkipBlock:
            raise _Skip(f"{type(sb).__name__} is not UniDiffuser's SkipBlock")
        lin = sb.skip_linear
        if type(lin) is not nn.Linear or lin.in_features != 2 * lin.out_features:
            raise _Skip("skip_linear is not a Linear(2 * dim, dim)")
        _plain_ln(sb.norm, "norm")

    def _check_uvit_block(blk: nn.Module) -> None:
        if type(blk) in (FusedUniDiffuserBlock, FusedUTransformerBlock):
            return
        if type(blk) not in (_uvit.UniDiffuserBlock, _uvit.UTransformerBlock):
            raise _Skip(f"{type(blk).__name__} is not a UniDiffuser block")
        if type(blk) is _uvit.UTransformerBlock and not blk.pre_layer_norm:
            raise _Skip("UTransformerBlock with post-LayerNorm normalises the branch before the residual add, "
                        "which no fused op computes")
        if blk.use_ada_layer_norm or blk.only_cross_attention:
            raise _Skip("uses AdaLayerNorm or only cross-attention")
        _plain_ln(blk.norm1, "norm1")
        _plain_ln(blk.norm3, "norm3")
        if blk.attn2 is not None:
            _plain_ln(blk.norm2, "norm2")

    _UVIT_SWAPS = {
        _uvit.PatchEmbed: (FusedUViTPatchEmbed, _check_uvit_patch_embed,
                           "PatchEmbed -> patchify_embed (conv [+ position embedding] in one kernel)"),
        _uvit.SkipBlock: (FusedSkipBlock, _check_skip_block,
                          "SkipBlock -> skip_concat_linear (long-skip linear without the concat) + fused LayerNorm"),
        _uvit.UniDiffuserBlock: (FusedUniDiffuserBlock, _check_uvit_block,
                                 "UniDiffuserBlock -> residual + LayerNorm fused"),
        _uvit.UTransformerBlock: (FusedUTransformerBlock, _check_uvit_block,
                                  "UTransformerBlock (pre-LN) -> fused LayerNorm, residual + LayerNorm fused"),
    }
else:  # pragma: no cover
    _UVIT_SWAPS = {}


# --------------------------------------------------------------------------- driver
def _swap(m: nn.Module, cls: type, check, path: str, what: str, report) -> None:
    try:
        check(m)
    except _Skip as exc:
        report.left_alone.append((path, str(exc)))
        return
    if type(m) is not cls:
        m.__class__ = cls
        report.replaced.append((path, what))


def optimize_diffusers(model: nn.Module, report, prefix: str = "") -> None:
    """Fill ``report`` (an :class:`uvit_fast.optimize.OptimizeReport`) while swapping in place.

    ``prefix``: ``model``'s path in the module tree ``optimize`` was given (report paths start with it).
    """
    import diffusers

    name = type(model).__name__
    kind = f"diffusers {name}"
    report.kind = kind if report.kind in ("unrecognised", kind) else f"{report.kind}, {kind}"
    if name not in SUPPORTED_MODELS:
        report.notes.append(f"diffusers {diffusers.__version__}: {name} is not one of {', '.join(SUPPORTED_MODELS)}; "
                            "nothing changed")
        return
    report.notes.append(f"diffusers {diffusers.__version__} (recognisers checked against {CHECKED_VERSION}); "
                        "the model keeps its class, config, state_dict keys and forward")
    n_replaced = len(report.replaced)
    for path, m in model.named_modules(prefix=prefix):
        if isinstance(m, PatchEmbed):
            _swap(m, FusedPatchEmbed, _check_patch_embed, path,
                  "PatchEmbed -> patchify_embed (conv + position embedding in one kernel)", report)
        elif isinstance(m, BasicTransformerBlock):
            _swap(m, FusedBasicTransformerBlock, _check_block, path,
                  f"BasicTransformerBlock ({m.norm_type}) -> fused modulated LayerNorms and residual + LayerNorm", report)
        elif any(isinstance(m, c) for c in _UVIT_SWAPS):
            cls, check, what = next(v for c, v in _UVIT_SWAPS.items() if isinstance(m, c))
            _swap(m, cls, check, path, what, report)
        elif isinstance(m, Attention):
            try:
                _check_attention(m)
            except _Skip as exc:
                report.left_alone.append((path, str(exc)))
                continue
            if type(m.processor) is not UvitFastAttnProcessor:
                m.set_processor(UvitFastAttnProcessor())
                kind = "cross-attention" if m.is_cross_attention else "self-attention"
                report.replaced.append((path, f"AttnProcessor2_0 -> UvitFastAttnProcessor ({kind}, fused attention; "
                                              "calls with an attention mask stay on AttnProcessor2_0)"))
    report.left_alone.append((prefix, f"{name}.forward kept: the code between the blocks (embeddings, final norm, "
                                  "output projection, unpatchify) stays diffusers', so the class and config are unchanged"))
    if len(report.replaced) == n_replaced:
        report.notes.append("nothing left to replace (already optimized, or nothing recognised)")
