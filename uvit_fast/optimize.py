"""``uvit_fast.optimize(model)``: the drop-in patcher for models built with upstream code.

It recognises upstream U-ViT (class-conditional, unconditional and text-to-image), DiT and
timm ``VisionTransformer`` module trees by structure (attribute names and shapes; upstream
code is never imported), and swaps in the fused modules in place:

* every transformer block becomes the fused block (fused LayerNorm, the residual add fused
  with the next LayerNorm, fused attention on the packed qkv, fused long-skip linear; qkv and
  proj through ``ops.fused_linear``, the MLP with its residual add, and DiT's gate, through one
  ``ops.fused_mlp`` call where the MLP is a plain fc1-activation-fc2 one: ``layers.mlp_parts``;
  any other MLP, e.g. timm's ``GluMlp``, is called as before);
* U-ViT and DiT also get the fused patch embedding (prefix tokens and position embedding
  written by the same kernel) and the fused decoder + unpatchify, through a forward that
  reads the same attributes (the model's class becomes a subclass of its own class, so
  ``isinstance`` checks keep working);
* timm ViT keeps its own forward and every other method; its patch embedding, blocks (with their
  attention and norms) and final norm are fused in place: each stays the same object and its class
  becomes a subclass of its own class, and calls the fused path does not cover (an attention mask,
  ``is_causal``, inputs the patch-embedding kernel does not write) run timm's own code.

Parameters are shared, never copied: ``state_dict`` keys, values and the optimizer's
parameter objects stay valid. Anything whose semantics the fused modules do not cover
(dropout with p > 0, LayerScale, DropPath, qk-norm, norms other than plain ``F.layer_norm``, any other sub-module,
parameter or buffer in a block or attention) is left alone and named in the report. Applying ``optimize`` twice is a no-op.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from uvit_fast import layers
from uvit_fast.models.clip import CLIP
from uvit_fast.models.dit import DiT, DiTBlock, FinalLayer, script_dit_twin
from uvit_fast.models.uvit import Block, UViT, UViTT2I, _UViTBase, script_uvit_twin
from uvit_fast.models.vit import ViT
from uvit_fast.models.vivit import ViViT

# every model class of this package: optimize switches it to fused=True instead of rebuilding it
_OWN_MODELS = (UViT, UViTT2I, DiT, ViT, ViViT, CLIP)


@dataclass
class OptimizeReport:
    """What :func:`optimize` did: ``replaced`` and ``left_alone`` are ``(module path, note)``."""

    kind: str = "unrecognised"
    replaced: List[Tuple[str, str]] = field(default_factory=list)
    left_alone: List[Tuple[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"uvit_fast.optimize: {self.kind}"]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  replaced ({len(self.replaced)}):")
        lines += [f"    {p or '<root>'}: {what}" for p, what in self.replaced]
        lines.append(f"  left alone ({len(self.left_alone)}):")
        lines += [f"    {p or '<root>'}: {why}" for p, why in self.left_alone]
        return "\n".join(lines)


class _Skip(Exception):
    """A module that cannot be fused without changing its semantics; the message says why."""


# --------------------------------------------------------------------------- leaf conversions
def _on_meta():
    return torch.device("meta")


def _is_identity(m: Optional[nn.Module]) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _no_dropout(m: nn.Module, *names: str) -> None:
    for n in names:
        d = getattr(m, n, None)
        if isinstance(d, nn.Dropout) and d.p > 0:
            raise _Skip(f"{n} has dropout p={d.p}, which the fused path does not apply")


# the children each recognised module may have; anything else (and any parameter or buffer of
# its own, e.g. BEiT's q_bias / relative position table, a cross-attention added to a block)
# would be dropped by the fused module, so such a module is left alone
_ATTN_CHILDREN = ("qkv", "proj", "attn_drop", "proj_drop", "q_norm", "k_norm", "norm")
_PRENORM_CHILDREN = ("norm1", "attn", "norm2", "mlp", "skip_linear", "ls1", "ls2", "drop_path", "drop_path1", "drop_path2")
_DIT_CHILDREN = ("norm1", "attn", "norm2", "mlp", "adaLN_modulation")
_FINAL_CHILDREN = ("norm_final", "linear", "adaLN_modulation")


def _no_extras(m: nn.Module, what: str, allowed: Tuple[str, ...]) -> None:
    extra = [n for n, _ in m.named_children() if n not in allowed]
    extra += [n for n, p in m._parameters.items() if p is not None]
    extra += [n for n, b in m._buffers.items() if b is not None]
    if extra:
        raise _Skip(f"{what} {type(m).__name__} also has {', '.join(extra)}, which the fused module would not compute")


# LayerNorm classes whose ``forward`` is exactly ``F.layer_norm(x, normalized_shape, weight, bias,
# eps)``, named by the module and qualified name of the class that defines ``forward`` (upstream code
# is never imported). timm's ``LayerNorm`` (the ViT norm since timm 1.0.16) is one unless timm's
# fast-norm mode was on when it was built (``_fast_norm``: it then runs in the autocast dtype).
# Look-alikes that compute something else are refused: timm's ``LayerNormFp32`` (upcasts, returns the
# input dtype), ``LayerNorm2d`` (normalises NCHW channels), open_clip's LayerNorm (casts back), any
# subclass that overrides ``forward``, and norms that are not ``nn.LayerNorm`` at all (RmsNorm).
_PLAIN_LAYER_NORMS = frozenset({
    "torch.nn.modules.normalization.LayerNorm",
    "timm.layers.norm.LayerNorm",
})


def _forward_owner(cls: type) -> str:
    owner = next(c for c in cls.__mro__ if "forward" in vars(c))
    return f"{owner.__module__}.{owner.__qualname__}"


def _check_layer_norm(ln: nn.Module, what: str) -> None:
    """Raise :class:`_Skip` unless ``ln`` computes exactly ``F.layer_norm`` over its last dim."""
    if not isinstance(ln, nn.LayerNorm):
        raise _Skip(f"{what} is {type(ln).__name__}, not a LayerNorm")
    owner = _forward_owner(type(ln))
    if owner not in _PLAIN_LAYER_NORMS:
        raise _Skip(f"{what} is {type(ln).__name__}, whose forward ({owner}) is not known to be plain F.layer_norm")
    if getattr(ln, "_fast_norm", False):
        raise _Skip(f"{what} is {type(ln).__name__} built in timm's fast-norm mode (computed in the autocast dtype)")
    if len(ln.normalized_shape) != 1:
        raise _Skip(f"{what} normalizes over the last {len(ln.normalized_shape)} dims, not the last one")


def _fused_norm(ln: nn.Module, what: str) -> layers.LayerNorm:
    if isinstance(ln, layers.LayerNorm):
        ln.fused = True
        return ln
    _check_layer_norm(ln, what)
    with _on_meta():
        new = layers.LayerNorm(
            ln.normalized_shape[0], eps=ln.eps, elementwise_affine=ln.elementwise_affine,
            bias=ln.bias is not None, fused=True,
        )
    new.weight, new.bias = ln.weight, ln.bias  # the same Parameter objects (or None)
    new.train(ln.training)
    return new


def _check_attention(attn: nn.Module) -> Tuple[int, int]:
    """Raise :class:`_Skip` unless ``attn`` is plain packed-qkv self-attention; returns ``(dim, heads)``."""
    _no_extras(attn, "attention", _ATTN_CHILDREN)
    qkv, proj, heads = getattr(attn, "qkv", None), getattr(attn, "proj", None), getattr(attn, "num_heads", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int)):
        raise _Skip(f"attention {type(attn).__name__} has no packed qkv / proj Linear and num_heads")
    D = qkv.in_features
    if qkv.out_features != 3 * D or proj.in_features != D or D % heads:
        raise _Skip(f"attention shapes qkv {tuple(qkv.weight.shape)} / proj {tuple(proj.weight.shape)} are not packed q, k, v")
    if getattr(attn, "head_dim", D // heads) != D // heads:
        raise _Skip(f"attention head_dim {attn.head_dim} is not dim / num_heads = {D // heads}")
    _no_dropout(attn, "attn_drop", "proj_drop")
    for n in ("q_norm", "k_norm", "norm"):
        if not _is_identity(getattr(attn, n, None)):
            raise _Skip(f"attention has {n} ({type(getattr(attn, n)).__name__}), which the fused path does not apply")
    return D, heads


def _fused_attention(attn: nn.Module) -> layers.Attention:
    if isinstance(attn, layers.Attention):
        attn.fused = True
        return attn
    D, heads = _check_attention(attn)
    qkv, proj = attn.qkv, attn.proj
    with _on_meta():
        new = layers.Attention(D, heads, qkv_bias=qkv.bias is not None, qk_scale=getattr(attn, "scale", None), fused=True)
    new.qkv, new.proj = qkv, proj
    new.train(attn.training)
    return new


def _check_mlp(mlp: nn.Module) -> None:
    if not (isinstance(getattr(mlp, "fc1", None), nn.Linear) and isinstance(getattr(mlp, "fc2", None), nn.Linear)):
        raise _Skip(f"mlp {type(mlp).__name__} has no fc1 / fc2")
    _no_dropout(mlp, "drop", "drop1", "drop2")


def _fused_patch_embed(pe: nn.Module) -> layers.PatchEmbed:
    if isinstance(pe, layers.PatchEmbed):
        pe.fused = True
        return pe
    proj = getattr(pe, "proj", None)
    if not isinstance(proj, (nn.Conv2d, nn.Conv3d)) or proj.kernel_size != proj.stride or any(proj.padding):
        raise _Skip("patch embedding has no patch-sized, unpadded conv `proj`")
    if not _is_identity(getattr(pe, "norm", None)) or getattr(pe, "flatten", True) is not True:
        raise _Skip("patch embedding applies a norm or does not flatten")
    if proj.groups != 1 or proj.dilation != (1,) * len(proj.dilation):
        raise _Skip("patch embedding conv is grouped or dilated")
    with _on_meta():
        new = layers.PatchEmbed(tuple(proj.kernel_size), proj.in_channels, proj.out_channels, fused=True)
    new.proj = proj
    new.train(pe.training)
    return new


# --------------------------------------------------------------------------- blocks
def _fused_prenorm_block(blk: nn.Module) -> Block:
    """U-ViT block (optional skip_linear) or timm ViT block without LayerScale / DropPath."""
    if isinstance(blk, Block):
        return blk
    _no_extras(blk, "block", _PRENORM_CHILDREN)
    for n in ("ls1", "ls2", "drop_path", "drop_path1", "drop_path2"):
        if not _is_identity(getattr(blk, n, None)):
            raise _Skip(f"block has {n} ({type(getattr(blk, n)).__name__})")
    attn = _fused_attention(blk.attn)
    norm1, norm2 = _fused_norm(blk.norm1, "norm1"), _fused_norm(blk.norm2, "norm2")
    _check_mlp(blk.mlp)
    skip = getattr(blk, "skip_linear", None)
    D = attn.qkv.in_features
    with _on_meta():
        new = Block(D, attn.num_heads, skip=skip is not None, use_checkpoint=bool(getattr(blk, "use_checkpoint", False)))
    new.norm1, new.attn, new.norm2, new.mlp = norm1, attn, norm2, blk.mlp
    if skip is not None:
        if not isinstance(skip, nn.Linear) or tuple(skip.weight.shape) != (D, 2 * D):
            raise _Skip(f"skip_linear is not a Linear(2D, D) (got {type(skip).__name__})")
        new.skip_linear.weight, new.skip_linear.bias = skip.weight, skip.bias
    new.train(blk.training)
    return new


def _fused_dit_block(blk: nn.Module) -> DiTBlock:
    if isinstance(blk, DiTBlock):
        return blk
    _no_extras(blk, "DiT block", _DIT_CHILDREN)
    attn = _fused_attention(blk.attn)
    norm1, norm2 = _fused_norm(blk.norm1, "norm1"), _fused_norm(blk.norm2, "norm2")
    _check_mlp(blk.mlp)
    D = attn.qkv.in_features
    with _on_meta():
        new = DiTBlock(D, attn.num_heads)
    new.norm1, new.attn, new.norm2, new.mlp = norm1, attn, norm2, blk.mlp
    new.adaLN_modulation = blk.adaLN_modulation
    new.train(blk.training)
    return new


def _fused_final_layer(fl: nn.Module) -> FinalLayer:
    if isinstance(fl, FinalLayer):
        return fl
    _no_extras(fl, "final layer", _FINAL_CHILDREN)
    norm = _fused_norm(fl.norm_final, "norm_final")
    with _on_meta():
        new = FinalLayer(fl.linear.in_features, 1, 1)
    new.norm_final, new.linear, new.adaLN_modulation = norm, fl.linear, fl.adaLN_modulation
    new.train(fl.training)
    return new


# --------------------------------------------------------------------------- model kinds
def _kind(m: nn.Module) -> Optional[str]:
    # the module's own attributes only: a wrapper that forwards attribute look-ups (torch.compile's
    # OptimizedModule) must not be taken for the model it holds (that one is found as `_orig_mod`)
    own = lambda n: n in m._modules or n in m._parameters or n in m._buffers or n in vars(m)  # noqa: E731
    has = lambda *names: all(own(n) for n in names)  # noqa: E731
    if isinstance(m, _OWN_MODELS):
        return "uvit_fast"
    if has("in_blocks", "mid_block", "out_blocks", "patch_embed", "pos_embed", "decoder_pred", "norm", "extras"):
        return "uvit_t2i" if hasattr(m, "context_embed") else "uvit"
    if has("x_embedder", "t_embedder", "y_embedder", "blocks", "final_layer", "pos_embed"):
        return "dit"
    if has("patch_embed", "cls_token", "pos_embed", "blocks", "norm") and isinstance(getattr(m, "blocks"), nn.Module):
        return "vit"
    return None


_FUSED_CLASSES: Dict[Tuple[type, str], type] = {}


def _rebuild_generated(base: type, swap, key, state: dict) -> nn.Module:
    m = base.__new__(base)
    m.__setstate__(state)
    swap(m, key)
    return m


def _reduce_generated(self, protocol):
    # pickle (torch.save(model)) and copy.deepcopy of a module whose class optimize generated: it is
    # rebuilt from the module's own class, the swap that generated it (_swap_forward or _swap_class)
    # and that swap's key (a kind or a mixin), all importable by name
    cls = type(self)
    return _rebuild_generated, (cls._uvit_fast_base, cls._uvit_fast_swap, cls._uvit_fast_key, self.__getstate__())


def _script_uvit(self) -> nn.Module:
    # TorchScript: upstream's forward on the same parameters (uvit_fast.models.uvit.ScriptUViT)
    return script_uvit_twin(self, type(self)._uvit_fast_key)


def _script_dit(self) -> nn.Module:
    return script_dit_twin(self)


def _script_upstream(self) -> nn.Module:
    # TorchScript: the module's own (upstream) class and code, on the same parameters
    return layers.script_twin(self, type(self)._uvit_fast_base)


def _swap_forward(m: nn.Module, kind: str) -> None:
    """Give ``m`` our fused forward by making its class a subclass of its own class."""
    src = {"uvit": UViT, "uvit_t2i": UViTT2I, "dit": DiT}[kind]
    key = (type(m), kind)
    if key not in _FUSED_CLASSES:
        attrs = {"forward": src.forward, "example_inputs": src.example_inputs, "_uvit_fast_optimized": True,
                 "_uvit_fast_base": type(m), "_uvit_fast_swap": _swap_forward,
                 "_uvit_fast_key": kind, "__reduce_ex__": _reduce_generated,
                 "__prepare_scriptable__": _script_dit if kind == "dit" else _script_uvit}
        if kind != "dit":
            attrs.update(_run=_UViTBase._run, _time_token=_UViTBase._time_token, _image_inputs=_UViTBase._image_inputs)
        _FUSED_CLASSES[key] = type(f"Fused{type(m).__name__}", (type(m),), attrs)
    m.__class__ = _FUSED_CLASSES[key]


def _replace(parent: nn.Module, name: str, fn, path: str, what: str, report: OptimizeReport) -> bool:
    child = getattr(parent, name)
    try:
        new = fn(child)
    except (_Skip, AttributeError) as exc:
        report.left_alone.append((path, str(exc) if isinstance(exc, _Skip) else f"unexpected structure: {exc}"))
        return False
    if new is not child:
        setattr(parent, name, new)
        report.replaced.append((path, what))
    return True


def _replace_list(blocks: nn.ModuleList, fn, prefix: str, what: str, report: OptimizeReport) -> bool:
    ok = True
    for i in range(len(blocks)):
        ok &= _replace(blocks, str(i), fn, f"{prefix}.{i}", what, report)
    return ok


def _optimize_uvit(m: nn.Module, kind: str, path: str, report: OptimizeReport) -> None:
    p = f"{path}." if path else ""
    blk = "block -> fused LayerNorm/residual, attention"
    _replace_list(m.in_blocks, _fused_prenorm_block, f"{p}in_blocks", blk, report)
    _replace(m, "mid_block", _fused_prenorm_block, f"{p}mid_block", blk, report)
    _replace_list(m.out_blocks, _fused_prenorm_block, f"{p}out_blocks", blk + ", skip linear without the concat", report)
    ok = _replace(m, "norm", lambda n: _fused_norm(n, "norm"), f"{p}norm", "LayerNorm -> fused LayerNorm", report)
    ok &= _replace(m, "patch_embed", _fused_patch_embed, f"{p}patch_embed", "patch embedding -> fused", report)
    if not ok:
        report.left_alone.append((path, "forward kept: the patch embedding or final norm could not be fused"))
        return
    patch = m.patch_embed.patch_size[0]
    m.patch_size = patch
    m.img_size = int(math.isqrt(m.pos_embed.shape[1] - m.extras)) * patch
    m.fused = True
    if kind == "uvit_t2i":
        m.clip_dim, m.num_clip_token = m.context_embed.in_features, m.extras - 1
    elif not hasattr(m, "num_classes"):
        m.num_classes = m.label_emb.num_embeddings if hasattr(m, "label_emb") else -1
    _swap_forward(m, kind)
    report.replaced.append((path, "forward -> fused patch embedding with prefix tokens + position embedding, "
                                  "fused decoder + unpatchify"))


def _optimize_dit(m: nn.Module, path: str, report: OptimizeReport) -> None:
    p = f"{path}." if path else ""
    _replace_list(m.blocks, _fused_dit_block, f"{p}blocks",
                  "DiT block -> fused modulated LayerNorm, gated residual + LayerNorm, attention", report)
    ok = _replace(m, "final_layer", _fused_final_layer, f"{p}final_layer", "final layer -> fused modulated LayerNorm", report)
    ok &= _replace(m, "x_embedder", _fused_patch_embed, f"{p}x_embedder", "patch embedding -> fused", report)
    if not ok:
        report.left_alone.append((path, "forward kept: the final layer or patch embedding could not be fused"))
        return
    m.patch_size = m.x_embedder.patch_size[0]
    m.input_size = int(math.isqrt(m.pos_embed.shape[1])) * m.patch_size
    m.fused = True
    _swap_forward(m, "dit")
    report.replaced.append((path, "forward -> fused patch embedding + position embedding, fused decoder + unpatchify"))


# --------------------------------------------------------------------------- timm ViT, fused in place
# A timm ViT keeps its own forward, forward_features, forward_intermediates and every other method,
# so its modules are not rebuilt: each one's class becomes a subclass of (one of the classes below,
# its own class). It stays the same object (hooks, attributes such as ``grid_size`` and methods
# such as ``dynamic_feat_size`` stay) and ``isinstance`` checks against its own class still hold.
# Calls the fused path does not cover (an attention mask, a causal mask, an input size or output
# format the kernel does not write) run the module's own forward.
def _given(**kwargs):
    """Only the keyword arguments that differ from their defaults (None / False): an older timm
    whose forward has no such parameter is called exactly as before when they are not used."""
    return {k: v for k, v in kwargs.items() if v is not None and v is not False}


class _TimmAttention(layers.Attention):
    """timm ``Attention``: fused when called without a mask; otherwise (and with ``fused=False``)
    timm's own forward."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if attn_mask is None and not is_causal and self.fused:
            return layers.Attention.forward(self, x)
        return super(layers.Attention, self).forward(x, **_given(attn_mask=attn_mask, is_causal=is_causal))


class _TimmBlock(nn.Module):
    """timm pre-norm ``Block``: the residual add fused with ``norm2`` when called without a mask;
    otherwise timm's own forward (on the fused attention and norms, which then run timm's code)."""

    __prepare_scriptable__ = _script_upstream  # TorchScript: timm's own block (and its children's twins)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        if attn_mask is None and not is_causal and self.fused:
            x, h = self.norm2.residual(x, self.attn(self.norm1(x)))
            return layers.mlp_residual(self.mlp, x, h)
        return super().forward(x, **_given(attn_mask=attn_mask, is_causal=is_causal))


def _output_fmt(pe: nn.Module) -> str:
    fmt = getattr(pe, "output_fmt", "NCHW")
    return str(getattr(fmt, "value", fmt))  # timm's Format is a str Enum


class _TimmPatchEmbed(layers.PatchEmbed):
    """timm ``PatchEmbed``: the fused patch embedding for inputs it writes exactly (patch-divisible
    size, the model's size when ``strict_img_size``; NLC or NHWC output); otherwise timm's forward,
    which also raises timm's own errors for a wrong input size."""

    def _fusable(self, x: torch.Tensor) -> bool:
        if not self.fused or x.dim() != 4:
            return False
        H, W = x.shape[-2:]
        if H % self.patch_size[0] or W % self.patch_size[1]:
            return False
        img_size = getattr(self, "img_size", None)
        if img_size is not None and getattr(self, "strict_img_size", True) and tuple(img_size) != (H, W):
            return False
        return getattr(self, "flatten", True) is True or _output_fmt(self) in ("NLC", "NHWC")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fusable(x):
            return super(layers.PatchEmbed, self).forward(x)
        out = layers.PatchEmbed.embed(self, x)  # (B, L, D), rows in (h, w) order
        if getattr(self, "flatten", True) is True or _output_fmt(self) == "NLC":
            return out
        B, _, H, W = x.shape
        return out.view(B, H // self.patch_size[0], W // self.patch_size[1], out.shape[-1])  # NHWC


class _TimmModel(nn.Module):
    """timm ``VisionTransformer`` after ``optimize``: its own forward and methods; the class only adds
    ``__prepare_scriptable__``, so that ``torch.jit.script(model)`` scripts a structural copy (timm's
    code, the same parameters, the patched modules' twins) and leaves the model's fused modules in place."""

    __prepare_scriptable__ = _script_upstream


_MIXED_CLASSES: Dict[Tuple[type, type], type] = {}


def _swap_class(m: nn.Module, mixin: type, **attrs) -> bool:
    """Make ``m`` an instance of ``Fused<its class>(mixin, its class)``; False if it already is."""
    if isinstance(m, mixin):
        return False
    key = (type(m), mixin)
    if key not in _MIXED_CLASSES:
        _MIXED_CLASSES[key] = type(f"Fused{type(m).__name__}", (mixin, type(m)), {
            "__module__": __name__, "_uvit_fast_base": type(m),
            "_uvit_fast_swap": _swap_class, "_uvit_fast_key": mixin, "__reduce_ex__": _reduce_generated,
        })
    m.__class__ = _MIXED_CLASSES[key]
    for k, v in attrs.items():
        if k == "fused" or k not in vars(m):
            setattr(m, k, v)
    return True


def _fuse_timm_norm(ln: nn.Module, what: str) -> bool:
    if isinstance(ln, layers.LayerNorm):
        ln.fused = True
        return False
    _check_layer_norm(ln, what)
    return _swap_class(ln, layers.LayerNorm, fused=True)


def _fuse_timm_attention(attn: nn.Module) -> bool:
    if isinstance(attn, layers.Attention):
        attn.fused = True
        return False
    D, heads = _check_attention(attn)
    return _swap_class(attn, _TimmAttention, fused=True, head_dim=D // heads, scale=(D // heads) ** -0.5,
                       upcast=False, causal=False)


# timm blocks with the pre-norm block's children but other math
_OTHER_BLOCKS = {"ResPostBlock": "a post-norm block (norm after attention and MLP)"}
_TIMM_BLOCK_CHILDREN = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2", "drop_path")


# the arguments of timm's Block.forward and Attention.forward; a forward taking any other (EvaBlock's
# and EvaAttention's ``rope``, BEiT's ``shared_rel_pos_bias``) computes what the fused one would not
_TIMM_FORWARD_ARGS = ("x", "attn_mask", "is_causal")


def _check_forward_args(m: nn.Module, what: str) -> None:
    extra = [n for n in list(inspect.signature(type(m).forward).parameters)[1:] if n not in _TIMM_FORWARD_ARGS]
    if extra:
        raise _Skip(f"{what} {type(m).__name__}.forward also takes {', '.join(extra)}, which the fused module would not apply")


def _fuse_timm_block(blk: nn.Module) -> bool:
    if isinstance(blk, (_TimmBlock, Block)):
        return False
    if type(blk).__name__ in _OTHER_BLOCKS:
        raise _Skip(f"block {type(blk).__name__} is {_OTHER_BLOCKS[type(blk).__name__]}")
    _check_forward_args(blk, "block")
    _check_forward_args(blk.attn, "attention")
    _no_extras(blk, "block", _TIMM_BLOCK_CHILDREN)
    for n in ("ls1", "ls2", "drop_path", "drop_path1", "drop_path2"):
        if not _is_identity(getattr(blk, n, None)):
            raise _Skip(f"block has {n} ({type(getattr(blk, n)).__name__})")
    _check_attention(blk.attn)
    _check_layer_norm(blk.norm1, "norm1")
    _check_layer_norm(blk.norm2, "norm2")
    _check_mlp(blk.mlp)
    _fuse_timm_attention(blk.attn)
    _fuse_timm_norm(blk.norm1, "norm1")
    _fuse_timm_norm(blk.norm2, "norm2")
    return _swap_class(blk, _TimmBlock, fused=True)


def _fuse_timm_patch_embed(pe: nn.Module) -> bool:
    if isinstance(pe, layers.PatchEmbed):
        pe.fused = True
        return False
    _no_extras(pe, "patch embedding", ("proj", "norm"))  # e.g. HybridEmbed's CNN backbone before proj
    proj = getattr(pe, "proj", None)
    if not isinstance(proj, nn.Conv2d) or proj.kernel_size != proj.stride or any(proj.padding):
        raise _Skip("patch embedding has no patch-sized, unpadded Conv2d `proj`")
    if proj.groups != 1 or proj.dilation != (1, 1):
        raise _Skip("patch embedding conv is grouped or dilated")
    if not _is_identity(getattr(pe, "norm", None)):
        raise _Skip(f"patch embedding applies a norm ({type(pe.norm).__name__})")
    if type(pe).__name__ == "PatchEmbedWithSize":
        raise _Skip("PatchEmbedWithSize returns (tokens, feature size)")
    return _swap_class(pe, _TimmPatchEmbed, fused=True, patch_size=tuple(proj.kernel_size))


def _fuse_in_place(m: nn.Module, fn, path: str, what: str, report: OptimizeReport) -> bool:
    try:
        changed = fn(m)
    except (_Skip, AttributeError) as exc:
        report.left_alone.append((path, str(exc) if isinstance(exc, _Skip) else f"unexpected structure: {exc}"))
        return False
    if changed:
        report.replaced.append((path, what))
    return True


def _optimize_vit(m: nn.Module, path: str, report: OptimizeReport) -> None:
    p = f"{path}." if path else ""
    for i, blk in enumerate(m.blocks):
        _fuse_in_place(blk, _fuse_timm_block, f"{p}blocks.{i}",
                       "block -> fused LayerNorm/residual, attention (fused in place)", report)
    if not _is_identity(m.norm):
        _fuse_in_place(m.norm, lambda n: _fuse_timm_norm(n, "norm"), f"{p}norm", "LayerNorm -> fused LayerNorm (in place)", report)
    _fuse_in_place(m.patch_embed, _fuse_timm_patch_embed, f"{p}patch_embed", "patch embedding -> fused (in place)", report)
    _swap_class(m, _TimmModel)
    m._uvit_fast_optimized = True
    report.notes.append("timm ViT keeps its own forward and methods (class token concat and position embedding stay "
                        "in PyTorch); calls with attn_mask or is_causal run timm's own block and attention code")


def _is_diffusers_model(m: nn.Module) -> bool:
    return any(c.__name__ == "ModelMixin" and c.__module__.startswith("diffusers.") for c in type(m).__mro__)


def optimize(model: nn.Module) -> Tuple[nn.Module, OptimizeReport]:
    """Swap the fused modules into an upstream-structured model, in place.

    Returns ``(model, report)``; ``print(report)`` says what was replaced and what was left
    alone and why. Works on the model itself or on any sub-module tree that contains one
    (e.g. a wrapper holding the network as ``.model``).
    """
    if not isinstance(model, nn.Module):
        hint = " (a diffusers pipeline: pass its model, e.g. pipe.transformer)" if hasattr(model, "components") else ""
        raise TypeError(f"optimize: model must be a torch.nn.Module; got {type(model).__name__}{hint}")
    report = OptimizeReport()
    # diffusers models: the model itself, or the outermost ones in a wrapper (or torch.compile's _orig_mod)
    in_diffusers = [p for p, m in model.named_modules() if _is_diffusers_model(m)]
    in_diffusers = [p for p in in_diffusers if not any(p.startswith(f"{q}.") or (q == "" and p) for q in in_diffusers)]
    if in_diffusers:
        from uvit_fast.optimize_diffusers import optimize_diffusers  # imports diffusers, only here

        for path in in_diffusers:
            optimize_diffusers(model.get_submodule(path), report, prefix=path)
        return model, report
    found = []
    for path, m in model.named_modules():
        if any(path.startswith(f"{done}.") or done == "" for done, _ in found):
            continue
        kind = _kind(m)
        if kind is not None:
            found.append((path, kind))
    if not found:
        report.notes.append("no U-ViT, DiT or ViT structure found; nothing changed")
        return model, report
    kinds = []
    for path, kind in found:
        m = model.get_submodule(path)
        if getattr(m, "_uvit_fast_optimized", False):
            report.notes.append(f"{path or '<root>'}: already optimized; nothing changed")
            kinds.append(kind)
            continue
        if kind == "uvit_fast":
            layers.set_fused(m, True)
            report.notes.append(f"{path or '<root>'}: a uvit_fast model; switched to fused=True")
        elif kind in ("uvit", "uvit_t2i"):
            _optimize_uvit(m, kind, path, report)
        elif kind == "dit":
            _optimize_dit(m, path, report)
        else:
            _optimize_vit(m, path, report)
        kinds.append(kind)
    report.kind = ", ".join(sorted(set(kinds)))
    return model, report
