"""U-ViT's long-skip ``Linear(cat([h, skip], -1))`` without materialising the concat.

The Triton path is the custom op ``uvit_fast::skip_concat_linear`` (autograd through
``uvit_fast::skip_concat_linear_backward_input`` and ``..._backward_weight``; all three have fake
implementations, so ``torch.compile(fullgraph=True)`` traces forward and backward).

Dtypes and autocast: custom ops are not autocast-aware, so :func:`skip_concat_linear` does what
the reference does before calling the op: ``torch.cat`` promotes ``h`` and ``skip`` to one dtype
(in U-ViT under autocast the long skip is float32 while the out-blocks' stream is the autocast
dtype), and under ``torch.autocast(device_type, dtype)`` the linear's input, weight and bias, if
floating and not float64, are cast to the autocast dtype, which is the output dtype;
the casts are ordinary autograd ops, so float32 master weights get float32 gradients. The torch
backend runs the reference, which autocast handles itself, with the same result dtypes.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from uvit_fast._backend import get_backend, load_kernel, resolve
from uvit_fast.dispatch import measure
from uvit_fast.ops._hot import Direct, Plans, may_run_direct
from uvit_fast.ops._runtime import DispatchOp
from uvit_fast.ops._autocast import autocast_cast, autocast_dtype
from uvit_fast.ops._checks import check_same_device, check_tensor, shape_str


def _check_skip_concat_linear(h, skip, weight, bias):
    op = "skip_concat_linear"
    check_tensor(op, "h", h)
    check_tensor(op, "skip", skip)
    check_tensor(op, "weight", weight, 2)
    check_tensor(op, "bias", bias, 1, optional=True)
    check_same_device(op, h=h, skip=skip, weight=weight, bias=bias)
    if h.dim() < 2 or tuple(h.shape) != tuple(skip.shape):
        raise ValueError(
            f"{op}: h and skip must have the same shape (..., D) with at least 2 dims; "
            f"got h {tuple(h.shape)} and skip {tuple(skip.shape)}"
        )
    D = h.shape[-1]
    if weight.shape[1] != 2 * D:
        raise ValueError(
            f"{op}: weight must have shape (N, 2*D) = (N, {2 * D}) for h {tuple(h.shape)}; got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"{op}: bias has shape {shape_str(bias)} but weight {tuple(weight.shape)} needs ({weight.shape[0]},)")


def skip_concat_linear_reference(
    h: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Plain PyTorch specification: upstream's ``skip_linear(torch.cat([h, skip], dim=-1))``."""
    return F.linear(torch.cat([h, skip], dim=-1), weight, bias)


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_dtypes(op: str, dtype: torch.dtype, weight, bias) -> None:
    """``dtype``: the linear's input dtype (h and skip after the cat's promotion and autocast's casts)."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != dtype:
            raise TypeError(
                f"{op}: {name} must have the dtype of h and skip ({dtype}) outside autocast; got {t.dtype}"
            )


def _linear_operands(h, skip, weight, bias, cast_to):
    """The operands that ``F.linear(torch.cat([h, skip], -1), weight, bias)`` computes with:
    ``cat`` promotes h and skip to one dtype (fp32 and bf16 give fp32); under autocast (``cast_to``)
    the linear then casts its input, weight and bias to the autocast dtype, float64 excepted.
    Casts are autograd ops, so each gradient comes back in its tensor's own dtype, as through the cat."""
    dtype = torch.promote_types(h.dtype, skip.dtype)
    h, skip = h.to(dtype), skip.to(dtype)
    if cast_to is not None:
        h, skip, weight, bias = (autocast_cast(t, cast_to) for t in (h, skip, weight, bias))
    return h, skip, weight, bias


def skip_concat_linear(
    h: torch.Tensor,
    skip: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``cat([h, skip], -1) @ weight.T + bias`` computed as ``h @ W1.T + skip @ W2.T + bias``.

    Args:
        h: the block input ``(..., D)`` (usually ``(B, L, D)``); may be a strided view.
        skip: the matching in-block output, same shape as ``h`` (the dtypes may differ: they are
            promoted as ``torch.cat`` promotes them).
        weight: ``(N, 2*D)``: upstream's ``skip_linear.weight`` (``N = D``), unchanged;
            ``W1 = weight[:, :D]``, ``W2 = weight[:, D:]``.
        bias: ``(N,)`` or None.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :mod:`uvit_fast._backend`).

    Returns:
        ``(..., N)``. Dtypes as ``nn.Linear`` on ``cat([h, skip])``: outside autocast ``weight``
        and ``bias`` must have ``promote_types(h.dtype, skip.dtype)``, the output dtype; under
        autocast ``h``, ``skip``, ``weight`` and ``bias`` are cast to the autocast dtype (float64
        excepted), which is the output dtype, and the gradients flow back through the casts in
        the tensors' own dtypes.

    The Triton backend supports float16, bfloat16 and float32. With ``backend="auto"`` and no
    process-wide backend set, other dtypes (float64) fall back to PyTorch; with ``"triton"`` they
    raise a TypeError.
    """
    sig, plan = _PLANS.lookup(backend, h, skip, weight, bias)
    if plan is None:  # the first call of this signature (uvit_fast.ops._hot)
        plan = _PLANS.put(sig, _plan(h, skip, weight, bias, backend))
    return plan(h, skip, weight, bias)


def _plan(h, skip, weight, bias, backend):
    """The checks, the backend and the decision of one call signature: the function that runs it."""
    op = "skip_concat_linear"
    _check_skip_concat_linear(h, skip, weight, bias)
    cast_to = autocast_dtype(h.device)
    if cast_to is None:
        _check_dtypes(op, torch.promote_types(h.dtype, skip.dtype), weight, bias)
    choice = resolve(backend, op, h, skip, weight, bias)
    if choice == "measure":  # time both paths once per key (uvit_fast.dispatch)
        choice = _measure(op, h, skip, weight, bias, cast_to)
        if callable(choice):
            return choice
    if choice == "triton":
        h, skip, weight, bias = _linear_operands(h, skip, weight, bias, cast_to)
        _check_dtypes(op, h.dtype, weight, bias)
    if choice == "triton" and h.dtype not in _TRITON_DTYPES:
        if backend == "auto" and get_backend() == "auto":
            choice = "torch"
        else:
            raise TypeError(
                f"{op}: backend='triton' supports float16, bfloat16 and float32; got {h.dtype} "
                f"(use backend='torch')"
            )
    if choice == "torch":
        return skip_concat_linear_reference
    call = _DIRECT if may_run_direct((h, skip, weight, bias)) else None
    return lambda *t: _skip_concat_linear_triton(*_linear_operands(*t, cast_to), call=call)


_PLANS = Plans("skip_concat_linear")


def _measure(op, h, skip, weight, bias, cast_to):
    """The measured choice, or under torch.compile the function calling the run-time dispatch op."""
    if _linear_operands(h, skip, weight, bias, cast_to)[0].dtype not in _TRITON_DTYPES:
        return "torch"  # as "auto" without timing: the kernel does not compute in this dtype
    key = dict(rows=h.numel() // max(h.shape[-1], 1), dims=(h.shape[-1], weight.shape[0]), flags=f"bias={int(bias is not None)}")
    if torch.compiler.is_compiling():  # decided inside the graph, when it runs
        call = _DISPATCH.bind(op, (h, skip, weight, bias), **key)
        return lambda *t: _skip_concat_linear_triton(*_linear_operands(*t, cast_to), call=call)
    direct = _DIRECT if may_run_direct((h, skip, weight, bias)) else None
    return measure(op, (h, skip, weight, bias), {
        "torch": skip_concat_linear_reference,
        "triton": lambda *t: _skip_concat_linear_triton(*_linear_operands(*t, cast_to), call=direct),
    }, **key)


def _skip_concat_linear_triton(h, skip, weight, bias, call=None):
    return (call or torch.ops.uvit_fast.skip_concat_linear)(h, skip, weight, bias)


# --------------------------------------------------------------------------------------------
# torch.library registration: the forward op and two backward ops (inputs, weight + bias), each
# with a fake (meta) implementation so that torch.compile(fullgraph=True) traces forward and
# backward. Triton is imported lazily inside the op bodies.
# --------------------------------------------------------------------------------------------
def _kernel():
    return load_kernel("skip_concat_linear", "skip_concat_linear")


@torch.library.custom_op("uvit_fast::skip_concat_linear", mutates_args=())
def _skip_concat_linear_op(
    h: torch.Tensor, skip: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    return _kernel().skip_concat_linear_forward(h, skip, weight, bias)


@_skip_concat_linear_op.register_fake
def _(h, skip, weight, bias):
    return h.new_empty((*h.shape[:-1], weight.shape[0]))


@torch.library.custom_op("uvit_fast::skip_concat_linear_backward_input", mutates_args=())
def _skip_concat_linear_backward_input_op(
    grad_out: torch.Tensor, weight: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _kernel().skip_concat_linear_backward_input(grad_out, weight)


@_skip_concat_linear_backward_input_op.register_fake
def _(grad_out, weight):
    shape = (*grad_out.shape[:-1], weight.shape[1] // 2)
    return grad_out.new_empty(shape), grad_out.new_empty(shape)


@torch.library.custom_op("uvit_fast::skip_concat_linear_backward_weight", mutates_args=())
def _skip_concat_linear_backward_weight_op(
    grad_out: torch.Tensor, h: torch.Tensor, skip: torch.Tensor, compute_bias: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _kernel().skip_concat_linear_backward_weight(grad_out, h, skip, compute_bias)


@_skip_concat_linear_backward_weight_op.register_fake
def _(grad_out, h, skip, compute_bias):
    N, D = grad_out.shape[-1], h.shape[-1]
    return grad_out.new_empty((N, 2 * D)), grad_out.new_empty((N if compute_bias else 0,))


def _setup_context(ctx, inputs, output):
    h, skip, weight, bias = inputs
    ctx.save_for_backward(h, skip, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    h, skip, weight = ctx.saved_tensors
    need_h, need_skip, need_w, need_b = ctx.needs_input_grad
    need_b = need_b and ctx.has_bias
    dh = dskip = dweight = dbias = None
    if need_h or need_skip:
        dh, dskip = torch.ops.uvit_fast.skip_concat_linear_backward_input(grad_out, weight)
    if need_w or need_b:
        dweight, dbias = torch.ops.uvit_fast.skip_concat_linear_backward_weight(grad_out, h, skip, need_b)
    return (
        dh if need_h else None,
        dskip if need_skip else None,
        dweight if need_w else None,
        dbias if need_b else None,
    )


_skip_concat_linear_op.register_autograd(_backward, setup_context=_setup_context)
_DIRECT = Direct(_skip_concat_linear_op)  # inference plans: the body without the dispatcher (ops._hot)

# under torch.compile with measured dispatch: the decision inside the graph (uvit_fast.ops._runtime)
_DISPATCH = DispatchOp(
    "skip_concat_linear", torch.ops.uvit_fast.skip_concat_linear, _setup_context, _backward, n_diff=1,
    candidates=lambda h, skip, weight, bias: {"torch": lambda *a: (skip_concat_linear_reference(*a),)},
)


def _register_flop_formulas() -> None:
    """torch.utils.flop_counter formulas: the GEMM of ``Linear(cat([h, skip]))``, as the reference counts it."""
    from torch.utils.flop_counter import register_flop_formula

    def gemm(h_shape, n: int) -> int:
        return 2 * math.prod(h_shape[:-1]) * 2 * h_shape[-1] * n

    @register_flop_formula(torch.ops.uvit_fast.skip_concat_linear)
    def _fwd(h_shape, skip_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return gemm(h_shape, w_shape[0])

    @register_flop_formula(torch.ops.uvit_fast.skip_concat_linear_backward_input)
    def _bwd_input(grad_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * math.prod(grad_shape[:-1]) * grad_shape[-1] * w_shape[1]

    @register_flop_formula(torch.ops.uvit_fast.skip_concat_linear_backward_weight)
    def _bwd_weight(grad_shape, h_shape, *args, out_shape=None, **kwargs) -> int:
        return gemm(h_shape, grad_shape[-1])


_register_flop_formulas()
