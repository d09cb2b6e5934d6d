"""AdaLN-modulated LayerNorm and the DiT gated residual.

``y = (LN(x) * weight + bias) * (scale_offset + scale) + shift``

* ``scale_offset=1`` is DiT's ``modulate(norm(x), shift, scale)``;
* ``scale_offset=0`` is the U-ViT paper's ``AdaLN(h, t) = t_s * LN(h) + t_b``;
* no ``shift``/``scale`` is a plain (affine or not) LayerNorm.

Dtypes follow ``nn.LayerNorm``: outside autocast the output has ``x``'s dtype (with
PyTorch's type promotion against the modulation tensors); under CUDA autocast LayerNorm runs
in float32, so the output is float32 (CPU autocast leaves layer_norm alone: ``x``'s dtype).
The residual ``x_new`` is ``promote(x, branch, gate)`` in every mode. The Triton path
(``backend="triton"``) gives the same dtypes, computes in fp32 from the inputs as they are
(no cast copies) and rounds once; gradients come back in each input's dtype. It takes
float16, bfloat16 and float32 tensors: with ``backend="auto"`` anything else (float64) runs the
PyTorch reference, with ``backend="triton"`` it is a TypeError.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from uvit_fast._backend import load_kernel, resolve
from uvit_fast.dispatch import measure
from uvit_fast.ops._hot import Direct, Plans, may_run_direct
from uvit_fast.ops._runtime import DispatchOp
from uvit_fast.ops._checks import check_same_device, check_tensor, shape_str


def _fp8():
    from uvit_fast.ops import fp8

    return fp8


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


#: dtypes the Triton kernels read and write (they compute in fp32)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _choose(op: str, backend: str, tensors) -> str:
    """``resolve`` plus the dtype rule of the other ops: the kernels compute in fp32, so inputs
    in other dtypes (float64) go to PyTorch under ``"auto"`` and are a TypeError with ``"triton"``."""
    choice = resolve(backend, op, *tensors)
    bad = [t.dtype for t in tensors if t is not None and t.dtype not in _KERNEL_DTYPES]
    if choice in ("triton", "measure") and bad:
        if backend == "triton":
            raise TypeError(
                f"{op}: the Triton kernel supports float16, bfloat16 and float32; got {bad[0]} "
                f"(use backend='torch')"
            )
        choice = "torch"
    return choice


def _flags(optional, scale_offset: float) -> str:
    """The dispatch key's flags: which optional tensors are present (with their rank: per-sample or
    per-token modulation) and the scale offset."""
    present = "".join(str(t.dim()) if t is not None else "-" for t in optional)
    return f"opt={present},off={float(scale_offset)}"


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
    quantize: Optional[str] = None,
) -> torch.Tensor:
    """LayerNorm over the last dim with optional affine and optional AdaLN modulation.

    Args:
        x: ``(..., D)``; ``(B, L, D)`` when modulated.
        shift, scale: ``(B, D)`` (per sample, broadcast over tokens) or ``(B, L, D)`` (per token), or None.
        weight, bias: LayerNorm affine ``(D,)`` or None.
        eps: LayerNorm epsilon (1e-5 in U-ViT, 1e-6 in DiT).
        scale_offset: 1.0 for DiT's ``x * (1 + scale) + shift``, 0.0 for ``scale * x + shift``.

        quantize: ``"fp8"`` for an FP8 GEMM's input (inference only): the output as
            ``(y_q, row_scale)`` (:class:`uvit_fast.ops.fp8.FP8Activation`: float8_e4m3fn values, one
            float32 scale per row, and the dtype ``y`` would have); the Triton kernel writes them in
            the same pass (:mod:`uvit_fast.ops.fp8`).

    Returns:
        Tensor of ``x``'s shape (dtype: see the module docstring).
    """
    if quantize is not None:
        _fp8().check_quantize("adaln_layer_norm", quantize)
        return _fp8().adaln_layer_norm_fp8(x, shift, scale, weight, bias, eps, scale_offset, backend)
    sig, plan = _ADALN_PLANS.lookup((backend, eps, scale_offset, type(eps), type(scale_offset)), x, shift, scale, weight, bias)
    if plan is None:  # the first call of this signature (uvit_fast.ops._hot)
        plan = _ADALN_PLANS.put(sig, _adaln_plan(x, shift, scale, weight, bias, eps, scale_offset, backend))
    return plan(x, shift, scale, weight, bias, eps, scale_offset)


def _adaln_plan(x, shift, scale, weight, bias, eps, scale_offset, backend):
    """The checks, the backend and the decision of one call signature: the function that runs it."""
    op = "adaln_layer_norm"
    _check_adaln(op, x, shift, scale, weight, bias, eps)
    tensors = (x, shift, scale, weight, bias)
    choice = _choose(op, backend, tensors)
    if choice == "measure":  # time both paths once per key (uvit_fast.dispatch)
        key = dict(rows=_rows(x), dims=(x.shape[-1],), flags=_flags(tensors[1:], scale_offset))
        if torch.compiler.is_compiling():  # decided inside the graph, when it runs
            return functools.partial(_adaln_layer_norm_triton, call=_ADALN_DISPATCH.bind(op, tensors, **key))
        choice = measure(op, tensors, {
            "torch": lambda *t: adaln_layer_norm_reference(*t, eps, scale_offset),
            "triton": lambda *t: _adaln_layer_norm_triton(*t, eps, scale_offset, call=_call(_ADALN_DIRECT, tensors)),
        }, **key)
    if choice == "torch":
        return adaln_layer_norm_reference
    return functools.partial(_adaln_layer_norm_triton, call=_call(_ADALN_DIRECT, tensors))


def _call(direct: Direct, tensors) -> Optional[Direct]:
    """How a Triton plan calls its op: directly for inference signatures (:class:`Direct`)."""
    return direct if may_run_direct(tensors) else None


_ADALN_PLANS = Plans("adaln_layer_norm")


def _adaln_layer_norm_triton(x, shift, scale, weight, bias, eps, scale_offset, call=None):
    out_dtype = _promote(_ln_dtype(x), scale, shift)
    y, _, _ = (call or torch.ops.uvit_fast.adaln_layer_norm)(
        x, shift, scale, weight, bias, float(eps), float(scale_offset), out_dtype
    )
    return y


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
    quantize: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (gated) residual add followed by the next (modulated) LayerNorm, in one pass.

    ``x_new = x + gate * branch`` (``x + branch`` when ``gate`` is None, the U-ViT / ViT
    pre-norm residual), then ``h = adaln_layer_norm(x_new, shift, scale, weight, bias, eps,
    scale_offset)``.

    Args:
        x, branch: ``(B, L, D)``.
        gate: ``(B, D)`` or ``(B, L, D)``, or None.
        the rest: as :func:`adaln_layer_norm`.

        quantize: ``"fp8"``: ``h`` as an :class:`uvit_fast.ops.fp8.FP8Activation` (as
            :func:`adaln_layer_norm`'s).

    Returns:
        ``(x_new, h)``, both ``(B, L, D)``.
    """
    if quantize is not None:
        _fp8().check_quantize("residual_adaln_layer_norm", quantize)
        return _fp8().residual_adaln_layer_norm_fp8(x, branch, gate, shift, scale, weight, bias, eps, scale_offset,
                                                     backend)
    sig, plan = _RESIDUAL_PLANS.lookup((backend, eps, scale_offset, type(eps), type(scale_offset)), x, branch, gate, shift, scale, weight, bias)
    if plan is None:  # the first call of this signature (uvit_fast.ops._hot)
        plan = _RESIDUAL_PLANS.put(
            sig, _residual_plan(x, branch, gate, shift, scale, weight, bias, eps, scale_offset, backend))
    return plan(x, branch, gate, shift, scale, weight, bias, eps, scale_offset)


def _residual_plan(x, branch, gate, shift, scale, weight, bias, eps, scale_offset, backend):
    op = "residual_adaln_layer_norm"
    _check_adaln(op, x, shift, scale, weight, bias, eps)
    _check_residual(op, x, branch, gate)
    tensors = (x, branch, gate, shift, scale, weight, bias)
    choice = _choose(op, backend, tensors)
    if choice == "measure":  # time both paths once per key (uvit_fast.dispatch)
        key = dict(rows=_rows(x), dims=(x.shape[-1],), flags=_flags(tensors[2:], scale_offset))
        if torch.compiler.is_compiling():  # decided inside the graph, when it runs
            return functools.partial(_residual_adaln_layer_norm_triton, call=_RESIDUAL_DISPATCH.bind(op, tensors, **key))
        choice = measure(op, tensors, {
            "torch": lambda *t: residual_adaln_layer_norm_reference(*t, eps, scale_offset),
            "triton": lambda *t: _residual_adaln_layer_norm_triton(*t, eps, scale_offset, call=_call(_RESIDUAL_DIRECT, tensors)),
        }, **key)
    if choice == "torch":
        return residual_adaln_layer_norm_reference
    return functools.partial(_residual_adaln_layer_norm_triton, call=_call(_RESIDUAL_DIRECT, tensors))


_RESIDUAL_PLANS = Plans("residual_adaln_layer_norm")


def _residual_adaln_layer_norm_triton(x, branch, gate, shift, scale, weight, bias, eps, scale_offset, call=None):
    xn_dtype = _promote(x.dtype, branch, gate)
    out_dtype = _promote(_ln_dtype(x, xn_dtype), scale, shift)
    x_new, h, _, _ = (call or torch.ops.uvit_fast.residual_adaln_layer_norm)(
        x, branch, gate, shift, scale, weight, bias, float(eps), float(scale_offset), out_dtype
    )
    if not any(t is not None and t.requires_grad for t in (x, branch, gate)):
        x_new = x_new.detach()  # as the reference: x_new depends on x, branch and gate only
    return x_new, h


# ----------------------------------------------------------------------------------------------
# Triton path: torch.library custom ops (forward and backward), so torch.compile(fullgraph=True)
# traces through them. The kernels module is imported inside the op bodies only.
#
# Dtypes / autocast. Custom ops are not autocast-aware; the Python wrappers above pick the output
# dtype the reference would produce and pass it to the op, and the kernels read every input in its
# own dtype, compute in fp32 and write the outputs in that dtype (no cast copies):
#   * CUDA autocast runs layer_norm in float32 -> the LayerNorm output is float32 for fp16/bf16/fp32
#     inputs (float64 stays float64); CPU autocast leaves layer_norm alone (output in x's dtype);
#   * the modulation then promotes: y dtype = promote(LN dtype, scale, shift);
#   * the residual x_new (not an autocast op) is promote(x, branch, gate).
# Gradients are returned in each input's dtype.
# ----------------------------------------------------------------------------------------------
_AUTOCAST_LN_FP32 = (torch.float16, torch.bfloat16, torch.float32)


def _ln_dtype(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """Dtype of ``F.layer_norm``'s output for an input of ``dtype`` (default ``x.dtype``) on x's device."""
    dtype = x.dtype if dtype is None else dtype
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda") and dtype in _AUTOCAST_LN_FP32:
        return torch.float32
    return dtype


def _promote(dtype: torch.dtype, *tensors: Optional[torch.Tensor]) -> torch.dtype:
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _kernels():
    return load_kernel("adaln_layer_norm", "adaln_layer_norm")


def _rows(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])


def _grad_or_empty(g: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    # custom ops cannot return None: absent gradients travel as empty tensors
    return g if g is not None else like.new_empty(0)


def _fake_grad(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return t.new_empty(t.shape) if t is not None else like.new_empty(0)


@torch.library.custom_op("uvit_fast::adaln_layer_norm", mutates_args=())
def _adaln_op(
    x: torch.Tensor,
    shift: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    scale_offset: float,
    out_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels().adaln_layer_norm_forward(x, shift, scale, weight, bias, eps, scale_offset, out_dtype)


@_adaln_op.register_fake
def _(x, shift, scale, weight, bias, eps, scale_offset, out_dtype):
    n = _rows(x)
    return (
        x.new_empty(x.shape, dtype=out_dtype),
        x.new_empty(n, dtype=torch.float32),
        x.new_empty(n, dtype=torch.float32),
    )


@torch.library.custom_op("uvit_fast::adaln_layer_norm_backward", mutates_args=())
def _adaln_bwd_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    shift: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    scale_offset: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, _, _, dshift, dscale, dweight, dbias = _kernels().adaln_layer_norm_backward(
        dy, None, x, None, None, shift, scale, weight, bias, mean, rstd, scale_offset, x.dtype
    )
    return dx, _grad_or_empty(dshift, x), _grad_or_empty(dscale, x), _grad_or_empty(dweight, x), _grad_or_empty(dbias, x)


@_adaln_bwd_op.register_fake
def _(dy, x, shift, scale, weight, bias, mean, rstd, scale_offset):
    return (
        x.new_empty(x.shape),
        _fake_grad(shift, x),
        _fake_grad(scale, x),
        _fake_grad(weight, x),
        _fake_grad(bias, x),
    )


def _adaln_setup_context(ctx, inputs, output):
    x, shift, scale, weight, bias, eps, scale_offset, out_dtype = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, shift, scale, weight, bias, mean, rstd)
    ctx.scale_offset = scale_offset
    ctx.mark_non_differentiable(mean, rstd)


def _adaln_backward(ctx, dy, dmean, drstd):
    x, shift, scale, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale, dweight, dbias = torch.ops.uvit_fast.adaln_layer_norm_backward(
        dy, x, shift, scale, weight, bias, mean, rstd, ctx.scale_offset
    )
    return (
        dx,
        dshift if shift is not None else None,
        dscale if scale is not None else None,
        dweight if weight is not None else None,
        dbias if bias is not None else None,
        None,
        None,
        None,
    )


_adaln_op.register_autograd(_adaln_backward, setup_context=_adaln_setup_context)
_ADALN_DIRECT = Direct(_adaln_op)


@torch.library.custom_op("uvit_fast::residual_adaln_layer_norm", mutates_args=())
def _residual_adaln_op(
    x: torch.Tensor,
    branch: torch.Tensor,
    gate: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    scale_offset: float,
    out_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    xn_dtype = _promote(x.dtype, branch, gate)
    return _kernels().residual_adaln_layer_norm_forward(
        x, branch, gate, shift, scale, weight, bias, eps, scale_offset, out_dtype, xn_dtype
    )


@_residual_adaln_op.register_fake
def _(x, branch, gate, shift, scale, weight, bias, eps, scale_offset, out_dtype):
    n = _rows(x)
    return (
        x.new_empty(x.shape, dtype=_promote(x.dtype, branch, gate)),
        x.new_empty(x.shape, dtype=out_dtype),
        x.new_empty(n, dtype=torch.float32),
        x.new_empty(n, dtype=torch.float32),
    )


@torch.library.custom_op("uvit_fast::residual_adaln_layer_norm_backward", mutates_args=())
def _residual_adaln_bwd_op(
    dh: torch.Tensor,
    dx_new: Optional[torch.Tensor],
    x_new: torch.Tensor,
    branch: Optional[torch.Tensor],  # only read with a gate (None otherwise: nothing saved)
    gate: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    scale_offset: float,
    x_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = _kernels().adaln_layer_norm_backward(
        dh, dx_new, x_new, branch, gate, shift, scale, weight, bias, mean, rstd, scale_offset, x_dtype,
        residual=True,
    )
    dx = grads[0]
    return (dx,) + tuple(_grad_or_empty(g, x_new) for g in grads[1:])


@_residual_adaln_bwd_op.register_fake
def _(dh, dx_new, x_new, branch, gate, shift, scale, weight, bias, mean, rstd, scale_offset, x_dtype):
    return (
        x_new.new_empty(x_new.shape, dtype=x_dtype),
        branch.new_empty(branch.shape) if gate is not None else x_new.new_empty(0),
        _fake_grad(gate, x_new),
        _fake_grad(shift, x_new),
        _fake_grad(scale, x_new),
        _fake_grad(weight, x_new),
        _fake_grad(bias, x_new),
    )


def _residual_setup_context(ctx, inputs, output):
    x, branch, gate, shift, scale, weight, bias, eps, scale_offset, out_dtype = inputs
    x_new, _, mean, rstd = output
    # the backward reads branch only for the gate's gradient: without a gate it is not kept
    # (16 MiB per sample over U-ViT-H/2's blocks)
    ctx.save_for_backward(x_new, branch if gate is not None else None, gate, shift, scale, weight, bias, mean, rstd)
    ctx.branch_dtype = branch.dtype
    ctx.scale_offset = scale_offset
    ctx.x_dtype = x.dtype
    ctx.mark_non_differentiable(mean, rstd)


def _residual_backward(ctx, dx_new, dh, dmean, drstd):
    x_new, branch, gate, shift, scale, weight, bias, mean, rstd = ctx.saved_tensors
    # Without a gate the branch's gradient is x_new's: have the kernel write it in x_new's dtype
    # (wider than x's when e.g. x is fp16 and branch fp32) and round it to x's dtype only for dx.
    dx_dtype = ctx.x_dtype if gate is not None else x_new.dtype
    dx, dbranch, dgate, dshift, dscale, dweight, dbias = torch.ops.uvit_fast.residual_adaln_layer_norm_backward(
        dh, dx_new, x_new, branch, gate, shift, scale, weight, bias, mean, rstd, ctx.scale_offset, dx_dtype
    )
    if gate is None:  # x_new = x + branch: the branch gets the same gradient as x
        dbranch = dx.to(ctx.branch_dtype)
        dx = dx.to(ctx.x_dtype)
    return (
        dx,
        dbranch,
        dgate if gate is not None else None,
        dshift if shift is not None else None,
        dscale if scale is not None else None,
        dweight if weight is not None else None,
        dbias if bias is not None else None,
        None,
        None,
        None,
    )


_residual_adaln_op.register_autograd(_residual_backward, setup_context=_residual_setup_context)
_RESIDUAL_DIRECT = Direct(_residual_adaln_op)


# ----------------------------------------------------------------------------------------------
# Under torch.compile with measured dispatch: the decision inside the graph (uvit_fast.ops._runtime).
# The PyTorch candidate computes on the Triton op's arguments: x is widened to the output dtype
# first when that is wider (CUDA autocast runs layer_norm in float32), then the result is cast to it.
# ----------------------------------------------------------------------------------------------
def _widen(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if x.dtype != dtype and torch.promote_types(x.dtype, dtype) == dtype else x


def _adaln_torch_candidate(x, shift, scale, weight, bias, eps, scale_offset, out_dtype):
    y = adaln_layer_norm_reference(_widen(x, out_dtype), shift, scale, weight, bias, eps, scale_offset)
    return (y.to(out_dtype),)


def _residual_torch_candidate(x, branch, gate, shift, scale, weight, bias, eps, scale_offset, out_dtype):
    x_new = x + (_per_token(gate) * branch if gate is not None else branch)
    h = adaln_layer_norm_reference(_widen(x_new, out_dtype), shift, scale, weight, bias, eps, scale_offset)
    return x_new, h.to(out_dtype)


_ADALN_DISPATCH = DispatchOp(
    "adaln_layer_norm", torch.ops.uvit_fast.adaln_layer_norm, _adaln_setup_context, _adaln_backward, n_diff=1,
    candidates=lambda *args: {"torch": _adaln_torch_candidate},
)
_RESIDUAL_DISPATCH = DispatchOp(
    "residual_adaln_layer_norm", torch.ops.uvit_fast.residual_adaln_layer_norm, _residual_setup_context,
    _residual_backward, n_diff=2, candidates=lambda *args: {"torch": _residual_torch_candidate},
)
