"""Small nn modules shared by the models (timm / nanoGPT style).

Every module keeps upstream's parameter names, so ``state_dict`` keys never change, and has a
``fused`` attribute: ``False`` runs the plain PyTorch math of the upstream code, ``True``
routes through :mod:`uvit_fast.ops` with ``backend="auto"`` (Triton on CUDA, PyTorch on CPU,
overridable with :func:`uvit_fast.use_backend`). While ``torch.jit.trace`` records, every module runs
its plain path, so a traced graph holds the upstream math in aten ops (as a scripted one: the
``__prepare_scriptable__`` twins below). On the fused path the blocks' linears (qkv, proj,
and the MLP with its residual add and DiT's gate) go through :func:`uvit_fast.ops.fused_linear` /
:func:`uvit_fast.ops.fused_mlp` where the module computes exactly that (:func:`is_plain_linear`,
:func:`mlp_parts`); those ops run PyTorch unless measured faster or forced (``use_backend("triton")``).
"""
from __future__ import annotations

import functools
import math
import weakref
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from uvit_fast import dispatch, ops
from uvit_fast._backend import resolve
from uvit_fast.ops.patch_embed import _check_patchify_embed as check_patchify_embed
from uvit_fast.quantization import FP8Linear, fp8_mlp_forward


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``cat([cos(t f), sin(t f)])`` of ``(B,)`` timesteps, shape ``(B, dim)``
    (a zero column appended when ``dim`` is odd), as in U-ViT and DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class LayerNorm(nn.LayerNorm):
    """Drop-in ``nn.LayerNorm`` (same parameters and state_dict) whose fused path is the
    Triton LayerNorm, with modulated and residual variants used by the DiT / U-ViT blocks."""

    def __init__(self, *args, fused: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused = fused

    def _fusable(self, x: torch.Tensor) -> bool:
        return self.fused and len(self.normalized_shape) == 1 and not torch.jit.is_tracing()

    def __prepare_scriptable__(self) -> nn.Module:
        """TorchScript runs the upstream math: ``nn.LayerNorm`` (or the patched module's own class)."""
        return script_twin(self, _upstream_class(self, nn.LayerNorm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fusable(x):
            return super().forward(x)
        return ops.adaln_layer_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)

    def modulated(
        self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, scale_offset: float = 1.0
    ) -> torch.Tensor:
        """``LN(x) * (scale_offset + scale) + shift`` with per-sample ``(B, D)`` or per-token modulation."""
        if not self._fusable(x):
            return ops.adaln_layer_norm_reference(x, shift, scale, self.weight, self.bias, self.eps, scale_offset)
        return ops.adaln_layer_norm(x, shift, scale, self.weight, self.bias, self.eps, scale_offset)

    def residual(
        self,
        x: torch.Tensor,
        branch: torch.Tensor,
        gate: Optional[torch.Tensor] = None,
        shift: Optional[torch.Tensor] = None,
        scale: Optional[torch.Tensor] = None,
        scale_offset: float = 1.0,
        quantize: Optional[str] = None,
    ):
        """``x_new = x + gate * branch``; returns ``(x_new, self.modulated(x_new, shift, scale))``;
        with ``quantize="fp8"`` the second is an FP8 GEMM input (:meth:`quantized`)."""
        args = (x, branch, gate, shift, scale, self.weight, self.bias, self.eps, scale_offset)
        if not self._fusable(x):
            x_new, h = ops.residual_adaln_layer_norm_reference(*args)
            return (x_new, h) if quantize is None else (x_new, _fp8_activation(h))
        if quantize is not None:
            return ops.residual_adaln_layer_norm(*args, quantize=quantize)
        return ops.residual_adaln_layer_norm(*args)

    def quantized(self, x: torch.Tensor, shift: Optional[torch.Tensor] = None, scale: Optional[torch.Tensor] = None,
                  scale_offset: float = 1.0):
        """The norm (modulated when ``shift`` / ``scale`` are given) as the FP8 input of the next
        GEMM (:class:`uvit_fast.ops.fp8.FP8Activation`): the norm kernel writes e4m3 and the row
        scales in its own pass, for a :class:`uvit_fast.quantization.FP8Linear`."""
        if not self._fusable(x):
            return _fp8_activation(ops.adaln_layer_norm_reference(x, shift, scale, self.weight, self.bias, self.eps,
                                                                  scale_offset))
        return ops.adaln_layer_norm(x, shift, scale, self.weight, self.bias, self.eps, scale_offset, quantize="fp8")


def _fp8_activation(y: torch.Tensor):
    from uvit_fast.ops.fp8 import FP8Activation, quantize_fp8

    return FP8Activation(*quantize_fp8(y), y.dtype)


def fp8_input(m: nn.Module) -> Optional[str]:
    """``"fp8"`` when ``m`` (the GEMM a norm feeds) is an :class:`FP8Linear` that takes its input
    already quantized (:func:`is_fp8_linear`), else None."""
    return "fp8" if is_fp8_linear(m) else None


def mlp_fp8_input(mlp: nn.Module) -> Optional[str]:
    """``"fp8"`` when :func:`mlp_residual` runs ``mlp`` as two FP8 GEMMs (fc1 takes an FP8 input)."""
    parts = None if torch.jit.is_tracing() else mlp_parts(mlp)
    return "fp8" if parts is not None and type(parts[0]) is FP8Linear else None


def attention_fp8_input(attn: nn.Module) -> Optional[str]:
    """``"fp8"`` when ``attn`` is this module's :class:`Attention` (its forward) with an FP8 ``qkv``:
    it then takes its input as an :class:`uvit_fast.ops.fp8.FP8Activation`."""
    if type(attn).forward is not Attention.forward or not _no_hooks(attn):
        return None
    return fp8_input(attn.qkv)


def norm_into(norm: nn.Module, attn: nn.Module, x: torch.Tensor):
    """``norm(x)`` for the attention ``attn``: written in FP8 by the norm kernel when ``attn``'s qkv is
    an :class:`FP8Linear` (:func:`attention_fp8_input`) and ``norm`` this module's :class:`LayerNorm`
    (:meth:`LayerNorm.quantized`)."""
    if type(norm) is LayerNorm and attention_fp8_input(attn):
        return norm.quantized(x)
    return norm(x)


def residual_into(norm: nn.Module, mlp: nn.Module, x: torch.Tensor, branch: torch.Tensor, *args):
    """``norm.residual(x, branch, *args)``, its ``h`` written in FP8 by the norm kernel when ``mlp``
    runs as FP8 GEMMs (:func:`mlp_fp8_input`) and ``norm`` is this module's :class:`LayerNorm`."""
    if type(norm) is LayerNorm and mlp_fp8_input(mlp):
        return norm.residual(x, branch, *args, quantize="fp8")
    return norm.residual(x, branch, *args)


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))`` with timm's parameter names."""

    def __init__(self, in_features: int, hidden_features: int, act_layer=nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# --------------------------------------------------------------------------- the linears on the fused path
# A block on the fused path calls its linears through ops.fused_linear / ops.fused_mlp, reading the
# modules' own parameters, only where calling the module computes exactly that: a plain nn.Linear
# (its class does not override forward: no LoRA-style subclass), no hooks on it (a forward pre-hook
# may recompute the weight, a forward hook reads the output), a known activation, dropout off.
# Anything else is called as before, so a module the fused path cannot route is never skipped.
@functools.lru_cache(maxsize=None)
def _forward_owner(cls: type) -> str:
    owner = next(c for c in cls.__mro__ if "forward" in vars(c))
    return f"{owner.__module__}.{owner.__qualname__}"


def _no_hooks(m: nn.Module) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _no_global_hooks() -> bool:
    g = nn.modules.module
    return not (g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks)


def is_plain_linear(m: nn.Module) -> bool:
    """``m(x)`` is exactly ``F.linear(x, m.weight, m.bias)``: an ``nn.Linear`` whose class keeps
    ``nn.Linear.forward`` and that has no hooks (nor any global module hook)."""
    return (isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward and _no_hooks(m)
            and _no_global_hooks())


# activation modules by the class that defines their forward (timm is never imported): the
# ``activation`` name of ops.fused_linear they compute
_ACTIVATIONS = {
    "torch.nn.modules.activation.SiLU": "silu",
    "uvit_fast.layers.QuickGELU": "quick_gelu",  # OpenAI CLIP's x * sigmoid(1.702 x)
    "timm.layers.activations.QuickGELU": "quick_gelu",
    "timm.layers.activations.GELU": "gelu",  # F.gelu(x)
    "timm.layers.activations.GELUTanh": "gelu_tanh",  # F.gelu(x, approximate="tanh")
}


def activation_name(act: nn.Module) -> Optional[str]:
    """The ``ops.fused_linear`` activation ``act`` computes, or None when it is not one of them."""
    if not isinstance(act, nn.Module) or not _no_hooks(act):
        return None
    owner = _forward_owner(type(act))
    if owner == "torch.nn.modules.activation.GELU":
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    return _ACTIVATIONS.get(owner)


def _inactive_dropout(m: Optional[nn.Module]) -> bool:
    if m is None or isinstance(m, nn.Identity):
        return True
    return type(m) is nn.Dropout and _no_hooks(m) and (m.p == 0 or not m.training)


_MLP_CHILDREN = ("fc1", "act", "drop", "drop1", "norm", "fc2", "drop2")


def mlp_parts(mlp: nn.Module) -> Optional[Tuple[nn.Linear, str, nn.Linear]]:
    """``(fc1, activation, fc2)`` when ``mlp(x)`` computes ``fc2(act(fc1(x)))`` and nothing else, else
    None (the block then calls ``mlp`` itself). fc1 and fc2 are both plain linears or both
    :class:`uvit_fast.quantization.FP8Linear` (:func:`is_fp8_linear`). Two forms: a class named ``Mlp`` (ours, timm's, upstream
    U-ViT's) with only timm's ``Mlp`` children, inactive dropouts and no ``norm`` (or an Identity one);
    OpenAI CLIP's ``nn.Sequential(c_fc, gelu, c_proj)``. Both need plain linears of matching widths
    (:func:`is_plain_linear`), a known activation (:func:`activation_name`) and no hooks.

    Called once per block per forward: the full check runs again only when the module's children
    change (or its modes, hooks or dropout rates, which are read each time); otherwise the answer
    comes from a per-module cache (host time: the full check took ~10 us)."""
    if torch.compiler.is_compiling():  # traced once: no cache (dynamo would guard on its weak keys)
        return _mlp_parts(mlp) if _no_global_hooks() else None
    children = tuple(mlp._modules.values())
    cached = _MLP_ROUTES.get(mlp)
    if cached is None or cached[0] != children or cached[1] != _mlp_state(mlp, children):
        cached = _MLP_ROUTES[mlp] = (children, _mlp_state(mlp, children), _mlp_parts(mlp))
    return cached[2] if _no_global_hooks() else None


# mlp -> (its children, their hooks / modes / rates, mlp_parts' answer); weak: no module is kept alive
_MLP_ROUTES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _mlp_state(mlp: nn.Module, children: tuple) -> tuple:
    """What :func:`_mlp_parts` reads that can change without replacing a child: hooks, training
    mode, dropout rates, GELU's form, the MLP's own parameters and buffers."""
    # (``__dict__.get``: a missing attribute through nn.Module.__getattr__ costs an exception)
    return (_no_hooks(mlp), mlp.training, len(mlp._parameters), len(mlp._buffers), *(
        (_no_hooks(c), c.training, c.__dict__.get("p"), c.__dict__.get("approximate"))
        for c in children if c is not None))


def _mlp_parts(mlp: nn.Module) -> Optional[Tuple[nn.Linear, str, nn.Linear]]:
    if not _no_hooks(mlp):
        return None
    if type(mlp) is nn.Sequential:
        if list(mlp._modules) != ["c_fc", "gelu", "c_proj"]:
            return None
        fc1, act_mod, fc2 = mlp.c_fc, mlp.gelu, mlp.c_proj
    else:
        if _forward_owner(type(mlp)).rsplit(".", 1)[-1] != "Mlp":
            return None
        if any(n not in _MLP_CHILDREN for n in mlp._modules) or mlp._parameters or mlp._buffers:
            return None
        norm = getattr(mlp, "norm", None)
        if not (norm is None or (type(norm) is nn.Identity and _no_hooks(norm))):
            return None
        if not all(_inactive_dropout(getattr(mlp, n, None)) for n in ("drop", "drop1", "drop2")):
            return None
        fc1, act_mod, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "act", None), getattr(mlp, "fc2", None)
    same_kind = (is_plain_linear(fc1) and is_plain_linear(fc2)) or (is_fp8_linear(fc1) and is_fp8_linear(fc2))
    if not same_kind or fc2.in_features != fc1.out_features:
        return None  # e.g. timm's GluMlp (fc1 twice as wide, its output chunked) is not this
    act = activation_name(act_mod)
    return None if act is None else (fc1, act, fc2)


def is_fp8_linear(m: nn.Module) -> bool:
    """``m`` is a :class:`uvit_fast.quantization.FP8Linear` (that class's forward) without hooks."""
    return type(m) is FP8Linear and _no_hooks(m) and _no_global_hooks()


def linear(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``m(x)``, through :func:`uvit_fast.ops.fused_linear` when ``m`` is a plain ``nn.Linear``."""
    if is_plain_linear(m) and not torch.jit.is_tracing():
        return ops.fused_linear(x, m.weight, m.bias)
    return m(x)


def mlp_residual(mlp: nn.Module, x: torch.Tensor, h: torch.Tensor, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x + mlp(h)`` (``x + gate[:, None] * mlp(h)`` with DiT's per-sample ``(B, D)`` gate), as one
    :func:`uvit_fast.ops.fused_mlp` call when ``mlp`` is a plain fc1-activation-fc2 MLP
    (:func:`mlp_parts`); otherwise exactly that, in PyTorch."""
    parts = None if torch.jit.is_tracing() else mlp_parts(mlp)
    if parts is None:
        y = mlp(h)
        return x + y if gate is None else x + gate.unsqueeze(1) * y
    fc1, act, fc2 = parts
    if type(fc1) is FP8Linear:  # uvit_fast.quantize: fc1's activation, fc2's input quantization, gate, residual
        return fp8_mlp_forward(fc1, act, fc2, h, residual=x, gate=gate)
    return ops.fused_mlp(h, fc1.weight, fc1.bias, fc2.weight, fc2.bias, activation=act, residual=x, gate=gate)


class Attention(nn.Module):
    """Multi-head self-attention with a packed ``qkv`` Linear and a ``proj`` Linear.

    ``upcast=True`` reproduces upstream U-ViT's attention, which casts q, k, v to float32
    before SDPA (the fused path does not; float64 stays float64). ``causal`` masks keys after the query.
    The fused path runs ``qkv`` and ``proj`` through :func:`uvit_fast.ops.fused_linear` when they are
    plain ``nn.Linear`` modules (:func:`is_plain_linear`), else calls them.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        *,
        upcast: bool = False,
        causal: bool = False,
        fused: bool = True,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.upcast = upcast
        self.causal = causal
        self.fused = fused

    def __prepare_scriptable__(self) -> nn.Module:
        """TorchScript runs the plain path (:class:`ScriptAttention`; a patched module: its own class)."""
        return script_twin(self, _upstream_class(self, ScriptAttention))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        if self.fused and not torch.jit.is_tracing():
            qkv = linear(self.qkv, x).view(B, L, 3, self.num_heads, self.head_dim)
            out = ops.attention_qkvpacked(qkv, causal=self.causal, scale=self.scale)
            return linear(self.proj, out.reshape(B, L, C))
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, L, Dh) each
        if self.upcast and q.dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=self.scale)
        out = out.transpose(1, 2).to(qkv.dtype)
        return self.proj(out.reshape(B, L, C))


class SkipLinear(nn.Linear):
    """U-ViT's ``skip_linear = nn.Linear(2D, D)`` (same state_dict) called as ``(h, skip)``;
    the fused path never materialises ``cat([h, skip])``."""

    def __init__(self, dim: int, *, fused: bool = True):
        super().__init__(2 * dim, dim)
        self.fused = fused

    def __prepare_scriptable__(self) -> nn.Module:
        """TorchScript sees the plain ``nn.Linear(2D, D)``; the block twin concatenates its inputs."""
        return script_twin(self, nn.Linear)

    def forward(self, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.fused and not torch.jit.is_tracing():
            return ops.skip_concat_linear(h, skip, self.weight, self.bias)
        return F.linear(torch.cat([h, skip], dim=-1), self.weight, self.bias)


def patch_tokens(out: torch.Tensor, prefix: Optional[torch.Tensor], pos_embed: Optional[torch.Tensor]) -> torch.Tensor:
    """The conv's ``(B, D, h, w)`` output as ``[prefix, patches] + pos_embed`` tokens ``(B, E + L, D)``:
    the plain path of :meth:`PatchEmbed.embed` (scriptable: its TorchScript twin calls it too)."""
    out = out.flatten(2).transpose(1, 2)
    if prefix is not None:
        out = torch.cat([prefix.expand(out.shape[0], -1, -1), out], dim=1)
    if pos_embed is not None:
        out = out + pos_embed
    return out


class PatchEmbed(nn.Module):
    """Conv patch projection (``proj``, kernel = stride = patch) with the upstream key layout.

    ``forward(x)`` gives the ``(B, L, D)`` patch tokens as upstream; :meth:`embed` also puts
    ``prefix`` tokens first and adds ``pos_embed``, fused into one kernel when ``fused``.
    """

    def __init__(self, patch_size, in_chans: int = 3, embed_dim: int = 768, bias: bool = True, *, fused: bool = True):
        super().__init__()
        n = 3 if (not isinstance(patch_size, int) and len(tuple(patch_size)) == 3) else 2
        self.patch_size = (patch_size,) * n if isinstance(patch_size, int) else tuple(patch_size)
        conv = nn.Conv3d if n == 3 else nn.Conv2d
        self.proj = conv(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)
        self.fused = fused

    def __prepare_scriptable__(self) -> nn.Module:
        """TorchScript runs the conv + flatten (:class:`ScriptPatchEmbed`; a patched module: its own class)."""
        return script_twin(self, _upstream_class(self, ScriptPatchEmbed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)

    def embed(
        self, x: torch.Tensor, prefix: Optional[torch.Tensor] = None, pos_embed: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if self.fused and not torch.jit.is_tracing():
            return ops.patchify_embed(x, self.proj.weight, self.proj.bias, prefix=prefix, pos_embed=pos_embed)
        # the fused op's argument checks, so both paths give the same clear dtype/device/shape errors
        check_patchify_embed(x, self.proj.weight, self.proj.bias, prefix, pos_embed)
        return patch_tokens(self.proj(x), prefix, pos_embed)


def decode_tokens(
    linear: nn.Linear,
    x: torch.Tensor,
    *,
    patch_size: int,
    extras: int,
    grid: Optional[Sequence[int]] = None,
    fused: bool = True,
) -> torch.Tensor:
    """``linear`` on the patch tokens, then unpatchify to ``(B, C, H, W)`` (upstream's
    ``(p1 p2 C)`` order). Upstream applies the linear to every token and then drops the
    ``extras``; the result is the same."""
    if fused and not torch.jit.is_tracing():
        return ops.decoder_unpatchify(x, linear.weight, linear.bias, patch_size=patch_size, grid=grid, extras=extras)
    out = linear(x)[:, extras:]
    channels = linear.out_features // (patch_size * patch_size)
    return ops.unpatchify(out, patch_size, channels, grid)


def set_fused(module: nn.Module, fused: bool) -> nn.Module:
    """Switch every sub-module that has a ``fused`` attribute."""
    for m in module.modules():
        if hasattr(m, "fused"):
            m.fused = fused
    return module


# --------------------------------------------------------------------------- TorchScript twins
# ``torch.jit.script`` cannot compile the fused modules (their forwards choose a path in Python and
# call the ops through the dispatcher). Each one's ``__prepare_scriptable__`` hands TorchScript a
# *twin* instead: a module of a plain-PyTorch class computing the upstream math, holding the same
# Parameter and buffer objects (never copies) under the same names, so the scripted module's
# state_dict keys are the eager model's. ``torch.jit.script`` stores what ``__prepare_scriptable__``
# returns in the parent's ``_modules`` dict, in place; every model root and patched module returns a
# structural copy (:func:`script_twin`), so the eager model it was called on keeps its fused modules.
def script_twin(module: nn.Module, cls: type, memo: Optional[dict] = None) -> nn.Module:
    """A structural copy of ``module`` of class ``cls``: a new object with ``module``'s attributes,
    its own ``_modules`` / ``_parameters`` / ``_buffers`` dicts holding the same Parameter and
    buffer objects, and as sub-modules the twins of the fused ones (their ``__prepare_scriptable__``)
    and structural copies of the others, all the way down. Nothing is copied but the module objects
    and their dicts (``torch.jit.script`` then finds no fused module left to replace, and creates no
    object that it could free while it still holds its id)."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    new = cls.__new__(cls)
    memo[id(module)] = new
    new.__dict__.update(module.__dict__)
    new.__dict__["_parameters"] = dict(module._parameters)
    new.__dict__["_buffers"] = dict(module._buffers)
    children: dict = {}
    for k, v in module._modules.items():
        if v is None or id(v) in memo:
            children[k] = None if v is None else memo[id(v)]
        elif hasattr(v, "__prepare_scriptable__"):  # a fused child: its own twin
            children[k] = memo[id(v)] = v.__prepare_scriptable__()
        else:
            children[k] = script_twin(v, type(v), memo)
    new.__dict__["_modules"] = children
    return new


def _upstream_class(module: nn.Module, default: type) -> type:
    """The class a patched module had before :func:`uvit_fast.optimize` (its upstream class), else ``default``."""
    return getattr(type(module), "_uvit_fast_base", None) or default


class ScriptLayerNormFp32(nn.LayerNorm):
    """TorchScript twin of :class:`LayerNormFp32`: float32 (float64 stays float64), back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        w = self.weight.to(dt) if self.weight is not None else None
        b = self.bias.to(dt) if self.bias is not None else None
        return F.layer_norm(x.to(dt), self.normalized_shape, w, b, self.eps).to(x.dtype)


class ScriptAttention(nn.Module):
    """TorchScript twin of :class:`Attention`: its plain path (``qkv``, SDPA, ``proj``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.upcast and (q.dtype == torch.float16 or q.dtype == torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=self.scale)
        out = out.transpose(1, 2).to(qkv.dtype)
        return self.proj(out.reshape(B, L, C))


class ScriptInProjAttention(nn.Module):
    """TorchScript twin of :class:`InProjAttention`: ``F.linear``, SDPA, ``out_proj``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal).transpose(1, 2)
        return self.out_proj(out.reshape(B, L, C))


class ScriptPatchEmbed(nn.Module):
    """TorchScript twin of :class:`PatchEmbed`: the conv, flatten, prefix tokens, position embedding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)

    def embed(
        self, x: torch.Tensor, prefix: Optional[torch.Tensor] = None, pos_embed: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return patch_tokens(self.proj(x), prefix, pos_embed)


def script_unpatchify(x: torch.Tensor, patch_size: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """``(B, h w, p p C) -> (B, C, h p, w p)`` (upstream's order), TorchScript-compilable."""
    B, C = x.shape[0], x.shape[-1] // (patch_size * patch_size)
    x = x.reshape(B, grid_h, grid_w, patch_size, patch_size, C).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, C, grid_h * patch_size, grid_w * patch_size)


# --------------------------------------------------------------------------- CLIP (OpenAI) layers
class QuickGELU(nn.Module):
    """OpenAI CLIP's activation ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNormFp32(LayerNorm):
    """OpenAI CLIP's LayerNorm: computed in float32, returned in the input's dtype (eps 1e-5).

    The plain path casts ``x`` (and the affine parameters) to float32 as upstream does
    (float64 inputs stay float64, where upstream would round them to float32); the
    fused path's kernel always computes in float32, and its result is cast back to ``x``'s dtype
    (so the output dtype is ``x``'s under autocast too, as upstream's).
    """

    def __prepare_scriptable__(self) -> nn.Module:
        return script_twin(self, ScriptLayerNormFp32)

    def _kernel_backend(self, name: str, tensors: Tuple[torch.Tensor, ...], plain, kernel) -> Optional[str]:
        """The ``backend`` to run the fused op with, or None for the plain float32 path. The kernel
        computes in float32 whatever the input dtype; the op's own PyTorch path would run
        ``F.layer_norm`` in the input's dtype (and sum the bias gradient in bf16), so it is never
        used here. Under measured ``auto`` the kernel is timed against the plain float32 path
        (``name`` in the key); under torch.compile that choice is not measured and the plain path
        runs (the compiler fuses it)."""
        if not self._fusable(tensors[0]):
            return None
        choice = resolve("auto", "adaln_layer_norm", *tensors)
        if choice == "triton":
            return "auto"
        if choice != "measure" or torch.compiler.is_compiling():
            return None
        if any(t is not None and t.dtype not in (torch.float16, torch.bfloat16, torch.float32) for t in tensors):
            return None
        x = tensors[0]
        rows = x.numel() // max(x.shape[-1], 1)
        winner = dispatch.measure(name, tensors, {"torch": plain, "triton": kernel}, rows=rows, dims=(x.shape[-1],),
                                  flags=f"affine={int(self.weight is not None)}")
        return "triton" if winner == "triton" else None

    def _plain(self, x: torch.Tensor, weight, bias) -> torch.Tensor:
        dt = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64
        w = weight.to(dt) if weight is not None else None
        b = bias.to(dt) if bias is not None else None
        return F.layer_norm(x.to(dt), self.normalized_shape, w, b, self.eps).to(x.dtype)

    def _kernel(self, x: torch.Tensor, weight, bias, backend: str = "triton") -> torch.Tensor:
        return ops.adaln_layer_norm(x, weight=weight, bias=bias, eps=self.eps, backend=backend).to(x.dtype)

    def _plain_residual(self, x, branch, weight, bias):
        x_new = x + branch
        return x_new, self._plain(x_new, weight, bias)

    def _kernel_residual(self, x, branch, weight, bias, backend: str = "triton"):
        x_new, h = ops.residual_adaln_layer_norm(x, branch, weight=weight, bias=bias, eps=self.eps, backend=backend)
        return x_new, h.to(x_new.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = self._kernel_backend("layer_norm_fp32", (x, self.weight, self.bias), self._plain, self._kernel)
        if backend is not None:
            return self._kernel(x, self.weight, self.bias, backend)
        return self._plain(x, self.weight, self.bias)

    def residual(self, x: torch.Tensor, branch: torch.Tensor, *args, **kwargs):  # type: ignore[override]
        """``x_new = x + branch``; returns ``(x_new, LN(x_new))`` (no modulation)."""
        if args or kwargs:
            raise TypeError("LayerNormFp32.residual takes only (x, branch)")
        tensors = (x, branch, self.weight, self.bias)
        backend = self._kernel_backend("residual_layer_norm_fp32", tensors, self._plain_residual, self._kernel_residual)
        if backend is not None:
            return self._kernel_residual(*tensors, backend)
        return self._plain_residual(*tensors)


class InProjAttention(nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s parameter names (``in_proj_weight``
    ``[3D, D]``, ``in_proj_bias`` ``[3D]``, ``out_proj``), as in OpenAI CLIP's state_dict.

    Batch-first ``(B, L, D)`` (upstream runs sequence-first; the result is the same). The
    packed projection's rows are ``[q; k; v]``, heads contiguous inside each. ``causal`` is
    the text tower's mask (query i sees keys 0..i). The fused path runs the packed projection and
    ``out_proj`` through :func:`uvit_fast.ops.fused_linear` and
    :func:`uvit_fast.ops.attention_qkvpacked`; the plain path runs ``F.linear`` and SDPA.
    """

    def __init__(self, dim: int, num_heads: int, *, causal: bool = False, fused: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"InProjAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.causal = causal
        self.fused = fused
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def __prepare_scriptable__(self) -> nn.Module:
        return script_twin(self, ScriptInProjAttention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        if self.fused and not torch.jit.is_tracing():
            qkv = ops.fused_linear(x, self.in_proj_weight, self.in_proj_bias)
            out = ops.attention_qkvpacked(qkv.view(B, L, 3, self.num_heads, self.head_dim), causal=self.causal)
            return linear(self.out_proj, out.reshape(B, L, C))
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, L, Dh) each
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal).transpose(1, 2)
        return self.out_proj(out.reshape(B, L, C))
