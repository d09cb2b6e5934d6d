"""Benchmark cases: AdaLN LayerNorm and the fused (gated) residual + LayerNorm.

Shapes are the token counts of real presets at batch 256 (``B x L`` rows of width ``D``):

* LayerNorm variants (U-ViT: affine, eps 1e-5; ``x + branch`` then LN for the residual):
  U-ViT-S/2 (CIFAR-10, L=257, D=512), U-ViT-M/4 (ImageNet 64, L=258, D=768),
  U-ViT-L/2 (ImageNet 256, L=258, D=1024), U-ViT-H/2 (ImageNet 256, L=258, D=1152).
* AdaLN variants (DiT: non-affine, eps 1e-6, per-sample shift/scale, gate for the residual):
  DiT-B/2 (D=768), DiT-L/2 (D=1024), DiT-XL/2 (D=1152), all L=256.

Passes: ``fwd`` (inference, under ``torch.no_grad``), ``bwd`` (the backward of a retained
forward) and ``fwd+bwd``. Providers: ``eager`` (the plain PyTorch reference chain),
``compile`` (``torch.compile`` of it) and ``uvit_fast`` (the Triton kernels; CUDA only: at these
sizes the CPU interpreter would take hours).

``bytes`` is the minimum HBM traffic of the fused op: every activation read once and every
output written once, modulation/affine vectors and their gradients included; the fp32 row
statistics (8 bytes a row) and fp32 partial sums are not counted.

Tensors are allocated on the first call of a case's ``fn`` and shared by the cases of the same
shape; only one shape's tensors (and one retained graph) are alive at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from uvit_fast.bench.core import Case, uvit_backend
from uvit_fast.ops import (
    adaln_layer_norm,
    adaln_layer_norm_reference,
    residual_adaln_layer_norm,
    residual_adaln_layer_norm_reference,
)

OP = "adaln_layer_norm"
BATCH = 256

# (preset, L, D, family) -- family "uvit": affine LN eps 1e-5; "dit": modulated, eps 1e-6
PRESETS: List[Tuple[str, int, int, str]] = [
    ("U-ViT-S/2", 257, 512, "uvit"),
    ("U-ViT-M/4", 258, 768, "uvit"),
    ("DiT-B/2", 256, 768, "dit"),
    ("U-ViT-L/2", 258, 1024, "uvit"),
    ("DiT-L/2", 256, 1024, "dit"),
    ("U-ViT-H/2", 258, 1152, "uvit"),
    ("DiT-XL/2", 256, 1152, "dit"),
]

PASSES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = ("eager", "compile", "uvit_fast", "uvit_fast_auto")


@dataclass(frozen=True)
class _Spec:
    preset: str
    B: int
    L: int
    D: int
    residual: bool
    modulated: bool  # DiT: per-sample shift/scale (+ gate), no affine, eps 1e-6

    @property
    def variant(self) -> str:
        if self.modulated:
            return "residual_adaln" if self.residual else "adaln"
        return "residual_layer_norm" if self.residual else "layer_norm"

    @property
    def eps(self) -> float:
        return 1e-6 if self.modulated else 1e-5

    @property
    def label(self) -> str:
        return f"{self.variant} {self.preset} B={self.B} L={self.L} D={self.D}"


# one slot each: the inputs of the current spec, the retained forward of the current bwd case
_inputs_slot: Dict[str, Any] = {}
_graph_slot: Dict[str, Any] = {}


def _inputs(spec: _Spec, device: torch.device, dtype: torch.dtype) -> Dict[str, Optional[torch.Tensor]]:
    key = (spec, str(device), dtype)
    if _inputs_slot.get("key") != key:
        _inputs_slot.clear()
        _graph_slot.clear()
        B, L, D = spec.B, spec.L, spec.D
        g = torch.Generator(device=device).manual_seed(0)

        def rnd(*shape, s=1.0):
            t = torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * s
            return t.to(dtype).requires_grad_(True)

        t: Dict[str, Optional[torch.Tensor]] = {
            "x": rnd(B, L, D),
            "branch": rnd(B, L, D) if spec.residual else None,
            "gate": rnd(B, D, s=0.5) if spec.residual and spec.modulated else None,
            "shift": rnd(B, D, s=0.5) if spec.modulated else None,
            "scale": rnd(B, D, s=0.5) if spec.modulated else None,
            # parameters stay in the benchmark dtype (as a model cast with .to(dtype))
            "weight": None if spec.modulated else (1 + rnd(D, s=0.1)).detach().requires_grad_(True),
            "bias": None if spec.modulated else rnd(D, s=0.1),
        }
        _inputs_slot.update(key=key, tensors=t)
    return _inputs_slot["tensors"]


def _chain(spec: _Spec, provider: str) -> Callable[..., Tuple[torch.Tensor, ...]]:
    """The op as a function of the inputs dict, returning a tuple of outputs."""
    if provider.startswith("uvit_fast"):
        if spec.residual:
            def f(t):
                return residual_adaln_layer_norm(
                    t["x"], t["branch"], t["gate"], t["shift"], t["scale"], t["weight"], t["bias"],
                    spec.eps, 1.0, backend=uvit_backend(provider),
                )
        else:
            def f(t):
                return (adaln_layer_norm(
                    t["x"], t["shift"], t["scale"], t["weight"], t["bias"], spec.eps, 1.0, backend=uvit_backend(provider)
                ),)
        return f

    if spec.residual:
        def ref(x, branch, gate, shift, scale, weight, bias):
            return residual_adaln_layer_norm_reference(x, branch, gate, shift, scale, weight, bias, spec.eps, 1.0)
    else:
        def ref(x, branch, gate, shift, scale, weight, bias):
            return (adaln_layer_norm_reference(x, shift, scale, weight, bias, spec.eps, 1.0),)
    if provider == "compile":
        ref = torch.compile(ref)

    def g(t):
        return ref(t["x"], t["branch"], t["gate"], t["shift"], t["scale"], t["weight"], t["bias"])

    return g


def _nbytes(spec: _Spec, dtype: torch.dtype, pass_: str) -> int:
    e = torch.finfo(dtype).bits // 8
    act = spec.B * spec.L * spec.D * e          # one (B, L, D) activation
    vec = spec.D * e                            # one (D,) affine vector
    mod = spec.B * spec.D * e                   # one (B, D) modulation tensor
    n_mod = (2 + (1 if spec.residual else 0)) if spec.modulated else 0
    n_vec = 0 if spec.modulated else 2
    gated = spec.residual and spec.modulated
    if spec.residual:
        # read x, branch; write x_new, h
        fwd = 4 * act + n_mod * mod + n_vec * vec
        # read dh, dx_new, x_new (+ branch when gated); write dx (+ dbranch when gated; else dbranch = dx)
        bwd = (4 + (2 if gated else 0)) * act + 2 * n_mod * mod + 2 * n_vec * vec
    else:
        fwd = 2 * act + n_mod * mod + n_vec * vec   # read x, write y
        bwd = 3 * act + 2 * n_mod * mod + 2 * n_vec * vec  # read dy, x; write dx
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def _make_fn(spec: _Spec, provider: str, pass_: str, device: torch.device, dtype: torch.dtype):
    chain = _chain(spec, provider)

    def grads_for(outs):
        return [torch.ones_like(o) for o in outs]

    def leaves(t):
        return [v for v in t.values() if v is not None]

    if pass_ == "fwd":
        def fn():
            t = _inputs(spec, device, dtype)
            with torch.no_grad():
                return chain(t)
    elif pass_ == "bwd":
        def fn():
            t = _inputs(spec, device, dtype)
            key = (provider, spec)
            if _graph_slot.get("key") != key:
                _graph_slot.clear()
                outs = chain(t)
                _graph_slot.update(key=key, outs=outs, grads=grads_for(outs))
            return torch.autograd.grad(
                _graph_slot["outs"], leaves(t), _graph_slot["grads"], retain_graph=True
            )
    else:
        def fn():
            t = _inputs(spec, device, dtype)
            outs = chain(t)
            return torch.autograd.grad(outs, leaves(t), grads_for(outs))
    return fn


def specs() -> List[_Spec]:
    out = []
    for preset, L, D, family in PRESETS:
        for residual in (False, True):
            out.append(_Spec(preset, BATCH, L, D, residual, family == "dit"))
    return out


def cases(device: torch.device, dtype: torch.dtype) -> List[Case]:
    """Every (shape, variant) x pass x provider; the ``uvit_fast`` rows need CUDA."""
    device = torch.device(device)
    out: List[Case] = []
    for spec in specs():
        for pass_ in PASSES:
            for provider in PROVIDERS:
                needs_cuda = provider.startswith("uvit_fast")
                out.append(
                    Case(
                        suite="ops",
                        op=OP,
                        shape=spec.label,
                        pass_=pass_,
                        provider=provider,
                        fn=_make_fn(spec, provider, pass_, device, dtype),
                        bytes=_nbytes(spec, dtype, pass_),
                        flops=None,
                        needs_cuda=needs_cuda,
                        skip_reason=(
                            "the Triton kernel at preset sizes needs CUDA (the CPU interpreter is far too slow)"
                            if needs_cuda else None
                        ),
                        extra={
                            "variant": spec.variant,
                            "preset": spec.preset,
                            "rows": spec.B * spec.L,
                            "D": spec.D,
                            "dtype": str(dtype).replace("torch.", ""),
                        },
                    )
                )
    return out
