"""AdaLN-modulated LayerNorm and the DiT gated residual.

``y = (LN(x) * weight + bias) * (scale_offset + scale) + shift``

* ``scale_offset=1`` is DiT's ``modulate(norm(x), shift, scale)``;
* ``scale_offset=0`` is the U-ViT paper's ``AdaLN(h, t) = t_s * LN(h) + t_b``;
* no ``shift``/``scale`` is a plain (affine or not) LayerNorm.

Dtypes follow ``nn.LayerNorm``: outside autocast the output has ``x``'s dtype (with
PyTorch's type promotion against the modulation tensors); under autocast LayerNorm runs
in float32, so the output is float32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from uvit_fast._backend import load_kernel, resolve
from uvit_fast.ops._checks import check_same_device, check_tensor, shape_str


def _check_mod(op: str, name: str, t: Optional[torch.Tensor], x: torch.Tensor) -> None:
    """Modulation: ``(B, D)`` per sample or ``(B, L, D)`` per token; B may be 1 (broadcast)."""
    if t is None:
        return
    check_tensor(op, name, t, (2, 3))
    if x.dim() != 3:
        raise ValueError(
            f"{op}: modulation needs x of shape (B, L, D); got x {tuple(x.shape)} with {name} {shape_str(t)}"
        )
    B, L, D = x.shape
    ok = t.shape[0] in (1, B) and t.shape[-1] == D and (t.dim() == 2 or t.shape[1] in (1, L))
    if not ok:
        raise ValueError(
            f"{op}: {name} must have shape ({B}, {D}) or ({B}, {L}, {D}) to modulate x {tuple(x.shape)}; "
            f"got {shape_str(t)}"
        )


def _check_adaln(op, x, shift, scale, weight, bias, eps):
    check_tensor(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least one dim; got shape {tuple(x.shape)}")
    D = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        check_tensor(op, name, t, 1, optional=True)
        if t is not None and t.shape[0] != D:
            raise ValueError(f"{op}: {name} must have shape ({D},) for x {tuple(x.shape)}; got {shape_str(t)}")
    _check_mod(op, "shift", shift, x)
    _check_mod(op, "scale", scale, x)
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"{op}: eps must be a non-negative number; got {eps!r}")
    check_same_device(op, x=x, shift=shift, scale=scale, weight=weight, bias=bias)


def _per_token(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.unsqueeze(1) if t is not None and t.dim() == 2 else t


def adaln_layer_norm_reference(
    x: torch.Tensor,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    scale_offset: float = 1.0,
) -> torch.Tensor:
    """Plain PyTorch specification of :func:`adaln_layer_norm`."""
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    if scale is not None:
        y = y * (scale_offset + _per_token(scale))
    if shift is not None:
        y = y + _per_token(shift)
    return y


def adaln_layer_norm(
    x: torch.Tensor,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    scale_offset: float = 1.0,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """LayerNorm over the last dim with optional affine and optional AdaLN modulation.

    Args:
        x: ``(..., D)``; ``(B, L, D)`` when modulated.
        shift, scale: ``(B, D)`` (per sample, broadcast over tokens) or ``(B, L, D)`` (per token), or None.
        weight, bias: LayerNorm affine ``(D,)`` or None.
        eps: LayerNorm epsilon (1e-5 in U-ViT, 1e-6 in DiT).
        scale_offset: 1.0 for DiT's ``x * (1 + scale) + shift``, 0.0 for ``scale * x + shift``.

    Returns:
        Tensor of ``x``'s shape (dtype: see the module docstring).
    """
    _check_adaln("adaln_layer_norm", x, shift, scale, weight, bias, eps)
    if resolve(backend, "adaln_layer_norm", x, shift, scale, weight, bias) == "torch":
        return adaln_layer_norm_reference(x, shift, scale, weight, bias, eps, scale_offset)
    return _adaln_layer_norm_triton(x, shift, scale, weight, bias, eps, scale_offset)


def _adaln_layer_norm_triton(x, shift, scale, weight, bias, eps, scale_offset):
    load_kernel("adaln_layer_norm", "adaln_layer_norm")
    raise NotImplementedError("adaln_layer_norm: the Triton kernel is not implemented yet; use backend='torch'")


def _check_residual(op, x, branch, gate):
    check_tensor(op, "branch", branch)
    if tuple(branch.shape) != tuple(x.shape):
        raise ValueError(f"{op}: branch {shape_str(branch)} must have the shape of x {tuple(x.shape)}")
    _check_mod(op, "gate", gate, x)
    check_same_device(op, x=x, branch=branch, gate=gate)


def residual_adaln_layer_norm_reference(
    x: torch.Tensor,
    branch: torch.Tensor,
    gate: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    scale_offset: float = 1.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch specification of :func:`residual_adaln_layer_norm`."""
    x_new = x + (_per_token(gate) * branch if gate is not None else branch)
    return x_new, adaln_layer_norm_reference(x_new, shift, scale, weight, bias, eps, scale_offset)


def residual_adaln_layer_norm(
    x: torch.Tensor,
    branch: torch.Tensor,
    gate: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    scale_offset: float = 1.0,
    *,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (gated) residual add followed by the next (modulated) LayerNorm, in one pass.

    ``x_new = x + gate * branch`` (``x + branch`` when ``gate`` is None, the U-ViT / ViT
    pre-norm residual), then ``h = adaln_layer_norm(x_new, shift, scale, weight, bias, eps,
    scale_offset)``.

    Args:
        x, branch: ``(B, L, D)``.
        gate: ``(B, D)`` or ``(B, L, D)``, or None.
        the rest: as :func:`adaln_layer_norm`.

    Returns:
        ``(x_new, h)``, both ``(B, L, D)``.
    """
    op = "residual_adaln_layer_norm"
    _check_adaln(op, x, shift, scale, weight, bias, eps)
    _check_residual(op, x, branch, gate)
    if resolve(backend, op, x, branch, gate, shift, scale, weight, bias) == "torch":
        return residual_adaln_layer_norm_reference(x, branch, gate, shift, scale, weight, bias, eps, scale_offset)
    return _residual_adaln_layer_norm_triton(x, branch, gate, shift, scale, weight, bias, eps, scale_offset)


def _residual_adaln_layer_norm_triton(x, branch, gate, shift, scale, weight, bias, eps, scale_offset):
    load_kernel("residual_adaln_layer_norm", "adaln_layer_norm")
    raise NotImplementedError(
        "residual_adaln_layer_norm: the Triton kernel is not implemented yet; use backend='torch'"
    )
