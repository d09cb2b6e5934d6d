"""Linear layers with their epilogue inside the GEMM: ``residual + gate * act(x @ weight.T + bias)``.

Two public ops, each with a plain PyTorch ``*_reference`` twin that is its specification:

* :func:`fused_linear`: one linear with an optional activation (``"gelu"``, ``"gelu_tanh"``,
  ``"silu"``, ``"quick_gelu"``), gate (per sample ``(B, N)`` broadcast over tokens, as DiT's adaLN
  gates, or per token, of the output's shape) and residual (of the output's shape);
* :func:`fused_mlp`: ``residual + gate * fc2(act(fc1(x)))``, the transformer MLP with its
  residual (and DiT's gate) folded in.

The Triton path (``uvit_fast.kernels.fused_linear``) is a set of ``torch.library`` custom ops, each
with a fake implementation, autograd and a FLOP formula, so that ``torch.compile(fullgraph=True)``
traces forward and backward and ``torch.utils.flop_counter`` counts them:

* ``uvit_fast::fused_linear`` (forward of :func:`fused_linear`) returns ``(out, preact)``;
  ``preact = x @ W.T + b`` is written only when the backward needs it (an activation or a gate,
  and autograd recording), and is not differentiable. Its backward: one elementwise pass
  ``grad * act'(preact)`` (``..._activation_backward``) when there is an activation, then the
  input-gradient GEMM and the weight-gradient GEMM (bias gradient fused, deterministic split of
  the long ``M`` reduction) with the gate applied in their prologue, and the gate gradient as a
  deterministic column reduction.
* :func:`fused_mlp` is two ops. ``uvit_fast::fused_mlp_fc1`` returns ``(h, z)``, ``h = act(z)``,
  ``z = x @ W1.T + b1``; ``uvit_fast::fused_mlp_fc2`` takes ``(h, z, W2, b2, residual, gate)``.
  fc2's backward returns the gradient for ``z``, with the activation's derivative applied in the
  epilogue of its input-gradient GEMM (``act'(z)`` times ``(grad * gate) @ W2``), and none for
  ``h``; fc1 marks ``h`` non-differentiable (its only consumer is fc2, whose backward accounts for
  it through ``z``) and its backward is two plain GEMMs on ``dz``. Saved for backward: ``x``
  and ``W1`` by fc1, ``h``, ``z`` and ``W2`` by fc2 (plus the gate and fc2's pre-gate output when
  gated): what eager saves, the pre-activation once.

Dtypes and autocast (as ``F.linear`` followed by the eager epilogue): outside autocast ``weight``
and ``bias`` must have ``x``'s dtype; under ``torch.autocast`` ``x``, the weights and biases, if
floating and not float64, are cast to the autocast dtype (custom ops are not autocast-aware, so
the wrapper casts, as autocast would; the casts are autograd ops, so float32 master weights get
float32 gradients). ``gate`` and ``residual`` may have any floating dtype: the output is
``promote(linear dtype, gate, residual)``, as the eager ``residual + gate * y``. The Triton
kernels read a float16, bfloat16 or float32 gate and residual in their own dtypes and write that
promoted dtype, so the float32 residual stream under bf16/fp16 autocast (and DiT's float32 gate
outside autocast) stays inside the GEMM: ``y = act(x @ W.T + b)`` is rounded to the linear's dtype
first, as eager's 16-bit ``y``, then ``residual + gate * y`` runs in fp32. Their backward takes the
wider gradient, forms ``grad * gate`` in fp32 and rounds it to the linear's dtype before the GEMMs
(eager's gradient of its 16-bit ``y``); every gradient comes back in its input's dtype (the gate's
and the residual's in theirs). Only a gate or residual the kernels cannot read (float64) is applied
in PyTorch after the kernel.

Backends: ``backend="auto"`` runs PyTorch (cuBLAS + the eager epilogue) unless measured dispatch
(:mod:`uvit_fast.dispatch`) is on and times the Triton kernel faster for the call's key; the
candidates are ``"torch"`` (the reference, the baseline that wins ties), ``"addmm_activation"``
(``torch._addmm_activation``, inference only, where it computes the same function: its GELU is
the tanh form on CUDA, where it is offered for ``"gelu_tanh"``, and the erf form on CPU, where it
is offered for ``"gelu"``) and ``"triton"``. ``backend="triton"`` (or ``use_backend("triton")``)
forces the kernels: float16, bfloat16 and float32; float64 is a TypeError there and goes to
PyTorch under ``"auto"``.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from uvit_fast._backend import get_backend, load_kernel, resolve
from uvit_fast.dispatch import is_training, measure
from uvit_fast.ops._autocast import autocast_cast, autocast_dtype
from uvit_fast.ops._hot import Direct, Plans, may_run_direct
from uvit_fast.ops._runtime import Ctx, DispatchOp
from uvit_fast.ops._checks import check_same_device, check_tensor, shape_str

#: the activations of the epilogue; ``"quick_gelu"`` is OpenAI CLIP's ``x * sigmoid(1.702 x)``
ACTIVATIONS = (None, "gelu", "gelu_tanh", "silu", "quick_gelu")

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------
# The specification
# --------------------------------------------------------------------------------------------
def activation_reference(x: torch.Tensor, activation: Optional[str]) -> torch.Tensor:
    """``act(x)`` in plain PyTorch, for every entry of :data:`ACTIVATIONS`."""
    if activation is None:
        return x
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if activation == "silu":
        return F.silu(x)
    if activation == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")


def _broadcast_gate(gate: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A per-sample gate ``(B, N)`` as ``(B, 1, ..., 1, N)`` against ``out``; a per-token gate as is."""
    if gate.shape == out.shape:
        return gate
    return gate.view(gate.shape[0], *([1] * (out.dim() - 2)), gate.shape[-1])


def _epilogue_reference(y, residual, gate):
    if gate is not None:
        y = _broadcast_gate(gate, y) * y
    if residual is not None:
        y = residual + y
    return y


def fused_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain PyTorch specification: ``residual + gate * act(F.linear(x, weight, bias))``."""
    y = activation_reference(F.linear(x, weight, bias), activation)
    return _epilogue_reference(y, residual, gate)


def fused_mlp_reference(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    *,
    activation: Optional[str] = "gelu",
    residual: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain PyTorch specification: ``residual + gate * fc2(act(fc1(x)))``."""
    h = activation_reference(F.linear(x, fc1_weight, fc1_bias), activation)
    return _epilogue_reference(F.linear(h, fc2_weight, fc2_bias), residual, gate)


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------
def _check_activation(op: str, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}; got {activation!r}")


def _check_weight(op: str, names: Tuple[str, str], K: int, what: str, weight, bias) -> None:
    wname, bname = names
    check_tensor(op, wname, weight, 2)
    check_tensor(op, bname, bias, 1, optional=True)
    if weight.shape[1] != K:
        raise ValueError(f"{op}: {wname} must have shape (N, {K}) for {what}; got {tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(
            f"{op}: {bname} has shape {shape_str(bias)} but {wname} {tuple(weight.shape)} needs ({weight.shape[0]},)"
        )


def _check_epilogue(op: str, x, N: int, residual, gate) -> None:
    out_shape = (*x.shape[:-1], N)
    check_tensor(op, "residual", residual, optional=True)
    check_tensor(op, "gate", gate, optional=True)
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(
            f"{op}: residual must have the output's shape {out_shape} for x {tuple(x.shape)}; got {tuple(residual.shape)}"
        )
    if gate is not None and tuple(gate.shape) != out_shape:
        per_sample = (x.shape[0], N) if x.dim() >= 3 else None
        if per_sample is None or tuple(gate.shape) != per_sample:
            want = f"(B, N) = {per_sample} (per sample) or " if per_sample else ""
            raise ValueError(
                f"{op}: gate must have shape {want}the output's shape {out_shape} (per token) "
                f"for x {tuple(x.shape)}; got {tuple(gate.shape)}"
            )


def _check_fused_linear(x, weight, bias, activation, residual, gate) -> None:
    op = "fused_linear"
    check_tensor(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dim (..., K); got shape {tuple(x.shape)}")
    _check_weight(op, ("weight", "bias"), x.shape[-1], f"x {tuple(x.shape)}", weight, bias)
    _check_activation(op, activation)
    _check_epilogue(op, x, weight.shape[0], residual, gate)
    check_same_device(op, x=x, weight=weight, bias=bias, residual=residual, gate=gate)


def _check_fused_mlp(x, w1, b1, w2, b2, activation, residual, gate) -> None:
    op = "fused_mlp"
    check_tensor(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dim (..., K); got shape {tuple(x.shape)}")
    _check_weight(op, ("fc1_weight", "fc1_bias"), x.shape[-1], f"x {tuple(x.shape)}", w1, b1)
    check_tensor(op, "fc2_weight", w2, 2)
    _check_weight(op, ("fc2_weight", "fc2_bias"), w1.shape[0], f"fc1_weight {tuple(w1.shape)}", w2, b2)
    _check_activation(op, activation)
    _check_epilogue(op, x, w2.shape[0], residual, gate)
    check_same_device(
        op, x=x, fc1_weight=w1, fc1_bias=b1, fc2_weight=w2, fc2_bias=b2, residual=residual, gate=gate
    )


def _check_dtypes(op: str, dtype: torch.dtype, **tensors: Optional[torch.Tensor]) -> None:
    """Outside autocast the weights and biases must have x's dtype, as F.linear requires."""
    for name, t in tensors.items():
        if t is not None and t.dtype != dtype:
            raise TypeError(f"{op}: {name} must have x's dtype ({dtype}) outside autocast; got {t.dtype}")


# --------------------------------------------------------------------------------------------
# Backend choice
# --------------------------------------------------------------------------------------------
@torch.compiler.assume_constant_result
def _forced(backend: str) -> bool:
    """Whether the Triton path is asked for explicitly (``backend="triton"`` or ``use_backend``)."""
    return backend == "triton" or (backend == "auto" and get_backend() == "triton")


def _choose(op: str, backend: str, dtype: torch.dtype, tensors: Sequence[Optional[torch.Tensor]]) -> str:
    """``"torch"``, ``"triton"`` or ``"measure"``. Untimed ``auto`` is PyTorch on every device: the
    Triton GEMM runs where measured dispatch times it faster, or when forced. ``dtype``: the
    dtype the linear computes in (after autocast's casts)."""
    choice = resolve(backend, op, *tensors)
    forced = _forced(backend)
    if choice == "triton" and not forced:
        choice = "torch"
    if choice in ("triton", "measure") and dtype not in _TRITON_DTYPES:
        if forced:
            raise _dtype_error(op, dtype)
        choice = "torch"  # the kernels do not compute in this dtype (float64)
    return choice


def _dtype_error(op: str, dtype: torch.dtype) -> TypeError:
    return TypeError(
        f"{op}: backend='triton' supports float16, bfloat16 and float32; got {dtype} (use backend='torch')"
    )


def _gate_flag(x: torch.Tensor, N: int, gate: Optional[torch.Tensor]) -> str:
    if gate is None:
        return "none"
    return "token" if tuple(gate.shape) == (*x.shape[:-1], N) else "sample"


def _addmm_activation_form(device_type: str) -> str:
    """The GELU ``torch._addmm_activation(..., use_gelu=True)`` computes on ``device_type``: cuBLASLt's
    epilogue (and CUDA's fallback) is the tanh form; the CPU kernel applies the exact (erf) GELU."""
    return "gelu_tanh" if device_type == "cuda" else "gelu"


def _addmm_activation_linear(x, weight, bias, activation, cast_to):
    """``act(x @ W.T + b)`` through ``torch._addmm_activation`` (no autograd: inference only)."""
    x, weight, bias = (autocast_cast(t, cast_to) for t in (x, weight, bias))
    x2 = _rows2d(x)
    y = torch._addmm_activation(bias, x2, weight.t(), use_gelu=activation is not None)
    return y.view(*x.shape[:-1], weight.shape[0])


def _addmm_activation_ok(activation, bias, device_type: str, inputs) -> bool:
    return (
        bias is not None
        and activation == _addmm_activation_form(device_type)
        and not is_training(inputs)
    )


# --------------------------------------------------------------------------------------------
# fused_linear
# --------------------------------------------------------------------------------------------
def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``residual + gate * act(x @ weight.T + bias)`` with the epilogue inside the GEMM.

    Args:
        x: ``(..., K)``; may be a strided view.
        weight: ``(N, K)``, ``nn.Linear``'s layout (read in place).
        bias: ``(N,)`` or None.
        activation: None, ``"gelu"`` (erf), ``"gelu_tanh"``, ``"silu"`` or ``"quick_gelu"``.
        residual: the output's shape ``(..., N)``, or None.
        gate: ``(B, N)`` for ``x`` of shape ``(B, ..., K)`` (per sample, broadcast over the tokens:
            DiT's adaLN gate), or the output's shape (per token), or None.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see the module docstring).

    Returns:
        ``(..., N)`` of dtype ``promote(linear dtype, gate, residual)`` (module docstring).
    """
    sig, plan = _LINEAR_PLANS.lookup((backend, activation, type(activation)), x, weight, bias, residual, gate)
    if plan is None:  # the first call of this signature (uvit_fast.ops._hot)
        plan = _LINEAR_PLANS.put(sig, _linear_plan(x, weight, bias, residual, gate, activation, backend))
    return plan(x, weight, bias, residual, gate, activation)


def _linear_plan(x, weight, bias, residual, gate, activation, backend):
    """The checks, the backend and the decision of one call signature: the function that runs it,
    taking ``(x, weight, bias, residual, gate, activation)``."""
    op = "fused_linear"
    _check_fused_linear(x, weight, bias, activation, residual, gate)
    cast_to = autocast_dtype(x.device)
    if cast_to is None:
        _check_dtypes(op, x.dtype, weight=weight, bias=bias)
    dtype = autocast_cast(x, cast_to).dtype
    choice = _choose(op, backend, dtype, (x, weight, bias, residual, gate))
    if choice == "measure" and torch.compiler.is_compiling():  # decided inside the graph, when it runs
        key = _linear_key(x, weight, bias, residual, gate, activation)
        call = _LINEAR_DISPATCH.bind(op, (x, weight, bias, residual, gate), **key)
        return lambda *a: _fused_linear_triton(*a, cast_to, call=call)
    if choice == "measure":
        choice = _measure_linear(x, weight, bias, residual, gate, activation, cast_to)
    if choice == "torch":
        return _linear_reference
    if choice == "addmm_activation":
        return lambda x, w, b, residual, gate, act: _epilogue_reference(
            _addmm_activation_linear(x, w, b, act, cast_to), residual, gate)
    call = _LINEAR_DIRECT if may_run_direct((x, weight, bias, residual, gate)) else None
    return lambda *a: _fused_linear_triton(*a, cast_to, call=call)


def _linear_reference(x, weight, bias, residual, gate, activation):
    return fused_linear_reference(x, weight, bias, activation=activation, residual=residual, gate=gate)


_LINEAR_PLANS = Plans("fused_linear")


def _measure_linear(x, weight, bias, residual, gate, activation, cast_to) -> str:
    inputs = (x, weight, bias, residual, gate)
    candidates: Dict[str, Callable] = {
        "torch": lambda *t: fused_linear_reference(*t[:3], activation=activation, residual=t[3], gate=t[4]),
    }
    if _addmm_activation_ok(activation, bias, x.device.type, inputs):
        candidates["addmm_activation"] = lambda *t: _epilogue_reference(
            _addmm_activation_linear(*t[:3], activation, cast_to), t[3], t[4]
        )
    call = _LINEAR_DIRECT if may_run_direct(inputs) else None
    candidates["triton"] = lambda *t: _fused_linear_triton(*t, activation, cast_to, call=call)
    return measure("fused_linear", inputs, candidates, **_linear_key(x, weight, bias, residual, gate, activation))


def _linear_key(x, weight, bias, residual, gate, activation):
    N = weight.shape[0]
    flags = (
        f"act={activation},bias={int(bias is not None)},residual={int(residual is not None)},"
        f"gate={_gate_flag(x, N, gate)}"
    )
    return dict(rows=x.numel() // max(x.shape[-1], 1), dims=(x.shape[-1], N), flags=flags)


def _records_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _kernel_epilogue(residual, gate):
    """The parts of the epilogue the kernel runs: a gate or residual in float16, bfloat16 or float32,
    whatever the linear's dtype (the kernel reads each in its own dtype and writes
    ``promote(linear dtype, gate, residual)``: the float32 residual stream under 16-bit autocast is
    fused). One in a dtype the kernel cannot read (float64) stays outside, in PyTorch after the
    kernel, and so does the residual after an unfused gate. Returns ``(residual, gate)`` for the kernel."""
    if gate is not None and gate.dtype not in _TRITON_DTYPES:
        return None, None
    if residual is not None and residual.dtype not in _TRITON_DTYPES:
        residual = None
    return residual, gate


def _out_dtype(dtype: torch.dtype, residual: Optional[torch.Tensor], gate: Optional[torch.Tensor]) -> torch.dtype:
    """The kernels' output dtype: ``promote(linear dtype, residual, gate)``, as eager's epilogue."""
    for t in (residual, gate):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _rows2d(x: torch.Tensor) -> torch.Tensor:
    """``(..., K) -> (M, K)`` with M spelled out: ``reshape(-1, 0)`` is ambiguous for K = 0."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def _rows(t: Optional[torch.Tensor], N: int) -> Optional[torch.Tensor]:
    return None if t is None else _rows2d(t)


def _gate_rows(x: torch.Tensor, N: int, gate: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], int]:
    """The gate as ``(G, N)`` and the rows each gate row covers (``m // gate_rows``)."""
    if gate is None:
        return None, 1
    if _gate_flag(x, N, gate) == "token":
        return _rows2d(gate), 1
    return gate, max(1, math.prod(x.shape[1:-1]))


def _fused_linear_triton(x, weight, bias, residual, gate, activation, cast_to, call=None):
    x, weight, bias = (autocast_cast(t, cast_to) for t in (x, weight, bias))
    _check_dtypes("fused_linear", x.dtype, weight=weight, bias=bias)
    N = weight.shape[0]
    k_residual, k_gate = _kernel_epilogue(residual, gate)
    g2, gate_rows = _gate_rows(x, N, k_gate)
    # the pre-activation feeds act' (gradients of x, weight, bias) and the gate's gradient
    store_preact = (activation is not None and _records_grad(x, weight, bias)) or (
        k_gate is not None and _records_grad(k_gate))
    out, _ = (call or torch.ops.uvit_fast.fused_linear)(
        _rows2d(x), weight, bias, _rows(k_residual, N), g2, activation, gate_rows, store_preact
    )
    out = out.view(*x.shape[:-1], N)
    if gate is not None and k_gate is None:
        out = _broadcast_gate(gate, out) * out
    if residual is not None and k_residual is None:
        out = residual + out
    return out


# --------------------------------------------------------------------------------------------
# fused_mlp
# --------------------------------------------------------------------------------------------
def fused_mlp(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    *,
    activation: Optional[str] = "gelu",
    residual: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``residual + gate * fc2(act(fc1(x)))``: the transformer MLP with its residual and gate.

    Args:
        x: ``(..., K)``.
        fc1_weight, fc1_bias: ``(H, K)`` and ``(H,)`` or None (timm's ``mlp.fc1``).
        fc2_weight, fc2_bias: ``(N, H)`` and ``(N,)`` or None (``mlp.fc2``).
        activation: as :func:`fused_linear` (default ``"gelu"``, the erf form; DiT uses ``"gelu_tanh"``).
        residual, gate: as :func:`fused_linear`, against the output ``(..., N)``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    On the Triton path the hidden activation ``h`` and the pre-activation ``z`` are written once by
    fc1's GEMM, and the activation's derivative runs in the epilogue of fc2's input-gradient GEMM
    (module docstring).
    """
    sig, plan = _MLP_PLANS.lookup((backend, activation, type(activation)), x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, gate)
    if plan is None:  # the first call of this signature (uvit_fast.ops._hot)
        plan = _MLP_PLANS.put(sig, _mlp_plan(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, gate, activation, backend))
    return plan(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, gate, activation)


def _mlp_plan(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, gate, activation, backend):
    """The function that runs calls of this signature, taking ``(x, w1, b1, w2, b2, residual, gate, activation)``."""
    op = "fused_mlp"
    _check_fused_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, activation, residual, gate)
    cast_to = autocast_dtype(x.device)
    if cast_to is None:
        _check_dtypes(op, x.dtype, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias)
    dtype = autocast_cast(x, cast_to).dtype
    tensors = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, gate)
    choice = _choose(op, backend, dtype, tensors)
    if choice == "measure" and torch.compiler.is_compiling():  # decided inside the graph, when it runs
        call = _MLP_DISPATCH.bind(op, tensors, **_mlp_key(*tensors, activation))
        return lambda *a: _fused_mlp_triton(*a, cast_to, call=call)
    if choice == "measure":
        choice = _measure_mlp(*tensors, activation, cast_to)
    if choice == "torch":
        return _mlp_reference
    if choice == "addmm_activation":
        return lambda *a: _mlp_addmm_activation(*a, cast_to)
    call = _MLP_DIRECT if may_run_direct(tensors) else None
    return lambda *a: _fused_mlp_triton(*a, cast_to, call=call)


_MLP_PLANS = Plans("fused_mlp")


def _mlp_reference(x, w1, b1, w2, b2, residual, gate, activation):
    return fused_mlp_reference(x, w1, b1, w2, b2, activation=activation, residual=residual, gate=gate)


def _mlp_addmm_activation(x, w1, b1, w2, b2, residual, gate, activation, cast_to):
    h = _addmm_activation_linear(x, w1, b1, activation, cast_to)
    return _epilogue_reference(F.linear(h, w2, b2), residual, gate)


def _measure_mlp(x, w1, b1, w2, b2, residual, gate, activation, cast_to) -> str:
    inputs = (x, w1, b1, w2, b2, residual, gate)
    candidates: Dict[str, Callable] = {"torch": lambda *t: _mlp_reference(*t, activation)}
    if _addmm_activation_ok(activation, b1, x.device.type, inputs):
        candidates["addmm_activation"] = lambda *t: _mlp_addmm_activation(*t, activation, cast_to)
    call = _MLP_DIRECT if may_run_direct(inputs) else None
    candidates["triton"] = lambda *t: _fused_mlp_triton(*t, activation, cast_to, call=call)
    return measure("fused_mlp", inputs, candidates, **_mlp_key(*inputs, activation))


def _mlp_key(x, w1, b1, w2, b2, residual, gate, activation):
    N = w2.shape[0]
    flags = (
        f"act={activation},bias={int(b1 is not None)}{int(b2 is not None)},residual={int(residual is not None)},"
        f"gate={_gate_flag(x, N, gate)}"
    )
    return dict(rows=x.numel() // max(x.shape[-1], 1), dims=(x.shape[-1], w1.shape[0], N), flags=flags)


def _fused_mlp_triton(x, w1, b1, w2, b2, residual, gate, activation, cast_to, call=None):
    x, w1, b1, w2, b2 = (autocast_cast(t, cast_to) for t in (x, w1, b1, w2, b2))
    _check_dtypes("fused_mlp", x.dtype, fc1_weight=w1, fc1_bias=b1, fc2_weight=w2, fc2_bias=b2)
    N = w2.shape[0]
    k_residual, k_gate = _kernel_epilogue(residual, gate)
    g2, gate_rows = _gate_rows(x, N, k_gate)
    # z feeds act' in dz (gradients of x, fc1's weight and bias); fc2's pre-gate output the gate's gradient
    store_z = _records_grad(x, w1, b1)
    store_preact = k_gate is not None and _records_grad(k_gate)
    out = (call or _mlp_pair)(
        _rows2d(x), w1, b1, w2, b2, _rows(k_residual, N), g2, activation, gate_rows, store_z,
        store_preact,
    )[0]
    out = out.view(*x.shape[:-1], N)
    if gate is not None and k_gate is None:
        out = _broadcast_gate(gate, out) * out
    if residual is not None and k_residual is None:
        out = residual + out
    return out


# --------------------------------------------------------------------------------------------
# torch.library registration. Every op works on 2-D ``(M, K)`` rows; the launchers read any
# strides. Triton is imported lazily inside the op bodies.
# --------------------------------------------------------------------------------------------
def _kernel():
    return load_kernel("fused_linear", "fused_linear")


@torch.library.custom_op("uvit_fast::fused_linear", mutates_args=())
def _fused_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    activation: Optional[str],
    gate_rows: int,
    store_preact: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _kernel().fused_linear_forward(
        x, weight, bias, activation=activation, residual=residual, gate=gate, gate_rows=gate_rows,
        store_preact=store_preact,
    )


@_fused_linear_op.register_fake
def _(x, weight, bias, residual, gate, activation, gate_rows, store_preact):
    M, N = x.shape[0], weight.shape[0]
    out = x.new_empty((M, N), dtype=_out_dtype(x.dtype, residual, gate))
    return out, x.new_empty((M, N) if store_preact else (0,))


@torch.library.custom_op("uvit_fast::fused_mlp_fc1", mutates_args=())
def _fused_mlp_fc1_op(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: Optional[str], store_preact: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _kernel().fused_linear_forward(x, weight, bias, activation=activation, store_preact=store_preact)


@_fused_mlp_fc1_op.register_fake
def _(x, weight, bias, activation, store_preact):
    M, N = x.shape[0], weight.shape[0]
    return x.new_empty((M, N)), x.new_empty((M, N) if store_preact else (0,))


@torch.library.custom_op("uvit_fast::fused_mlp_fc2", mutates_args=())
def _fused_mlp_fc2_op(
    h: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    activation: Optional[str],
    gate_rows: int,
    store_preact: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    # z (fc1's pre-activation) is an input only for the backward: act'(z) in dz's epilogue
    return _kernel().fused_linear_forward(
        h, weight, bias, residual=residual, gate=gate, gate_rows=gate_rows, store_preact=store_preact
    )


@_fused_mlp_fc2_op.register_fake
def _(h, z, weight, bias, residual, gate, activation, gate_rows, store_preact):
    M, N = h.shape[0], weight.shape[0]
    out = h.new_empty((M, N), dtype=_out_dtype(h.dtype, residual, gate))
    return out, h.new_empty((M, N) if store_preact else (0,))


@torch.library.custom_op("uvit_fast::fused_linear_backward_input", mutates_args=())
def _backward_input_op(
    grad: torch.Tensor,
    weight: torch.Tensor,
    gate: Optional[torch.Tensor],
    gate_rows: int,
    act_input: Optional[str],
    preact_input: Optional[torch.Tensor],
) -> torch.Tensor:
    return _kernel().fused_linear_backward_input(
        grad, weight, gate=gate, gate_rows=gate_rows, act_input=act_input, preact_input=preact_input
    )


@_backward_input_op.register_fake
def _(grad, weight, gate, gate_rows, act_input, preact_input):
    return weight.new_empty((grad.shape[0], weight.shape[1]))  # the linear's dtype, whatever grad's


@torch.library.custom_op("uvit_fast::fused_linear_backward_weight", mutates_args=())
def _backward_weight_op(
    grad: torch.Tensor, x: torch.Tensor, gate: Optional[torch.Tensor], gate_rows: int, compute_bias: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _kernel().fused_linear_backward_weight(grad, x, gate=gate, gate_rows=gate_rows, compute_bias=compute_bias)


@_backward_weight_op.register_fake
def _(grad, x, gate, gate_rows, compute_bias):
    N, K = grad.shape[1], x.shape[1]
    return x.new_empty((N, K)), x.new_empty((N if compute_bias else 0,))


@torch.library.custom_op("uvit_fast::fused_linear_backward_gate", mutates_args=())
def _backward_gate_op(
    grad: torch.Tensor, preact: torch.Tensor, activation: Optional[str], gate_rows: int, num_gates: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    # out_dtype: the gate's (its gradient's) dtype; grad may be wider (the float32 residual stream)
    return _kernel().fused_linear_backward_gate(
        grad, preact, activation=activation, gate_rows=gate_rows, num_gates=num_gates, out_dtype=out_dtype
    )


@_backward_gate_op.register_fake
def _(grad, preact, activation, gate_rows, num_gates, out_dtype):
    return grad.new_empty((num_gates, grad.shape[1]), dtype=out_dtype)


@torch.library.custom_op("uvit_fast::fused_linear_activation_backward", mutates_args=())
def _activation_backward_op(grad: torch.Tensor, preact: torch.Tensor, activation: str) -> torch.Tensor:
    # in the pre-activation's dtype (the linear's), as eager's gradient of its pre-activation
    return _kernel().activation_backward(grad, preact, activation, out_dtype=preact.dtype)


@_activation_backward_op.register_fake
def _(grad, preact, activation):
    return grad.new_empty(grad.shape, dtype=preact.dtype)


def _saved(t: torch.Tensor) -> Optional[torch.Tensor]:
    """An output saved for backward, or None for the empty ``(0,)`` placeholder (nothing to save)."""
    return t if t.numel() > 0 else None


def _need_preact(ctx, preact: Optional[torch.Tensor], grad: torch.Tensor, op: str) -> torch.Tensor:
    """The saved pre-activation; an empty output (no rows or columns) saved none and needs none."""
    if preact is None:
        if grad.numel() == 0:
            return grad
        raise RuntimeError(
            f"{op}: the backward needs the pre-activation, but the forward ran with store_preact=False "
            "(call it with store_preact=True when a gradient will be taken)"
        )
    return preact


def _linear_weight_grads(ctx, grad, x, gate, need_w: bool, need_b: bool):
    if not (need_w or need_b):
        return None, None
    dweight, dbias = _backward_weight_op(grad, x, gate, ctx.gate_rows, need_b)
    return (dweight if need_w else None), (dbias if need_b else None)


def _gate_grad(ctx, grad, preact, gate, activation, need_gate: bool):
    if not need_gate:
        return None
    preact = _need_preact(ctx, preact, grad, "fused_linear")
    return _backward_gate_op(grad, preact, activation, ctx.gate_rows, gate.shape[0], gate.dtype)


def _residual_grad(ctx, grad, need_res: bool):
    """The residual's gradient: the output's, in the residual's dtype (a 16-bit residual under a
    float32 gate gets a 16-bit gradient, as eager's add)."""
    return grad.to(ctx.res_dtype) if need_res else None


def _linear_setup(ctx, inputs, output):
    x, weight, bias, residual, gate, activation, gate_rows, store_preact = inputs
    _, preact = output
    ctx.mark_non_differentiable(preact)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, gate, _saved(preact))
    ctx.activation, ctx.gate_rows = activation, gate_rows
    ctx.has_bias = bias is not None
    ctx.res_dtype = None if residual is None else residual.dtype


def _linear_backward(ctx, grad, _grad_preact):
    x, weight, gate, preact = ctx.saved_tensors
    need_x, need_w, need_b, need_res, need_gate = ctx.needs_input_grad[:5]
    need_b = need_b and ctx.has_bias
    if grad is None:
        return (None,) * 8
    dpre = grad
    if ctx.activation is not None and (need_x or need_w or need_b):
        dpre = _activation_backward_op(grad, _need_preact(ctx, preact, grad, "fused_linear"), ctx.activation)
    dx = _backward_input_op(dpre, weight, gate, ctx.gate_rows, None, None) if need_x else None
    dweight, dbias = _linear_weight_grads(ctx, dpre, x, gate, need_w, need_b)
    dgate = _gate_grad(ctx, grad, preact, gate, ctx.activation, need_gate)
    return dx, dweight, dbias, _residual_grad(ctx, grad, need_res), dgate, None, None, None


_fused_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def _fc1_setup(ctx, inputs, output):
    x, weight, bias, activation, store_preact = inputs
    h, _ = output
    # h's only consumer is fc2, whose backward returns the gradient for z (act' applied there)
    ctx.mark_non_differentiable(h)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.gate_rows = 1


def _fc1_backward(ctx, _grad_h, grad_z):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_z is None:
        return (None,) * 5
    dx = _backward_input_op(grad_z, weight, None, 1, None, None) if need_x else None
    dweight, dbias = _linear_weight_grads(ctx, grad_z, x, None, need_w, need_b and ctx.has_bias)
    return dx, dweight, dbias, None, None


_fused_mlp_fc1_op.register_autograd(_fc1_backward, setup_context=_fc1_setup)


def _fc2_setup(ctx, inputs, output):
    h, z, weight, bias, residual, gate, activation, gate_rows, store_preact = inputs
    _, preact = output
    ctx.mark_non_differentiable(preact)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(h, _saved(z), weight, gate, _saved(preact))
    ctx.activation, ctx.gate_rows = activation, gate_rows
    ctx.has_bias = bias is not None
    ctx.res_dtype = None if residual is None else residual.dtype


def _fc2_backward(ctx, grad, _grad_preact):
    h, z, weight, gate, preact = ctx.saved_tensors
    _, need_z, need_w, need_b, need_res, need_gate = ctx.needs_input_grad[:6]
    if grad is None:
        return (None,) * 9
    dz = None
    if need_z:
        if ctx.activation is not None and z is None:
            if h.numel() > 0:
                raise RuntimeError("fused_mlp_fc2: the backward needs z, but fc1 ran with store_preact=False")
            z = h
        act_z = z if ctx.activation is not None else None
        dz = _backward_input_op(grad, weight, gate, ctx.gate_rows, ctx.activation, act_z)
    dweight, dbias = _linear_weight_grads(ctx, grad, h, gate, need_w, need_b and ctx.has_bias)
    dgate = _gate_grad(ctx, grad, preact, gate, None, need_gate)
    return None, dz, dweight, dbias, _residual_grad(ctx, grad, need_res), dgate, None, None, None


_fused_mlp_fc2_op.register_autograd(_fc2_backward, setup_context=_fc2_setup)


def _mlp_pair(x, w1, b1, w2, b2, residual, gate, activation, gate_rows, store_z, store_preact, direct=False):
    """fc1 then fc2 on rows: ``(out, h, z, fc2's pre-gate output)`` (z and the last empty when not stored).
    ``direct``: the two ops' bodies, without the dispatcher (an inference plan's :class:`Direct`)."""
    fc1 = _fused_mlp_fc1_op._init_fn if direct else torch.ops.uvit_fast.fused_mlp_fc1
    fc2 = _fused_mlp_fc2_op._init_fn if direct else torch.ops.uvit_fast.fused_mlp_fc2
    h, z = fc1(x, w1, b1, activation, store_z)
    out, preact = fc2(h, z, w2, b2, residual, gate, activation, gate_rows, store_preact)
    return out, h, z, preact


# --------------------------------------------------------------------------------------------
# Under torch.compile with measured dispatch (uvit_fast.ops._runtime): one dispatch op per call.
# The MLP is decided as a unit, as in eager calls: its Triton side is the pair above as one custom
# op, ``uvit_fast::fused_mlp``, whose backward is fc2's backward formula followed by fc1's.
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("uvit_fast::fused_mlp", mutates_args=())
def _fused_mlp_op(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: Optional[torch.Tensor],
    w2: torch.Tensor,
    b2: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    activation: Optional[str],
    gate_rows: int,
    store_z: bool,
    store_preact: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _mlp_pair(x, w1, b1, w2, b2, residual, gate, activation, gate_rows, store_z, store_preact)


@_fused_mlp_op.register_fake
def _(x, w1, b1, w2, b2, residual, gate, activation, gate_rows, store_z, store_preact):
    M, H, N = x.shape[0], w1.shape[0], w2.shape[0]
    return (x.new_empty((M, N), dtype=_out_dtype(x.dtype, residual, gate)), x.new_empty((M, H)), x.new_empty((M, H) if store_z else (0,)),
            x.new_empty((M, N) if store_preact else (0,)))


def _mlp_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, residual, gate, activation, gate_rows, store_z, store_preact = inputs
    _, h, z, preact = output
    ctx.mark_non_differentiable(h, z, preact)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, w1, h, _saved(z), w2, gate, _saved(preact))
    ctx.activation, ctx.gate_rows = activation, gate_rows
    ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None
    ctx.res_dtype = None if residual is None else residual.dtype


def _mlp_backward(ctx, grad, *_stats):
    x, w1, h, z, w2, gate, preact = ctx.saved_tensors
    need_x, need_w1, need_b1, need_w2, need_b2, need_res, need_gate = ctx.needs_input_grad[:7]
    if grad is None:
        return (None,) * 11
    fc1_needs = (need_x, need_w1, need_b1 and ctx.has_b1)
    # fc2's and fc1's ctx rebuilt from the pair's, for their backward formulas
    fc2 = Ctx((False, any(fc1_needs), need_w2, need_b2, need_res, need_gate), (h, z, w2, gate, preact),
              activation=ctx.activation, gate_rows=ctx.gate_rows, has_bias=ctx.has_b2, res_dtype=ctx.res_dtype)
    _, dz, dw2, db2, dres, dgate, *_ = _fc2_backward(fc2, grad, None)
    dx = dw1 = db1 = None
    if any(fc1_needs):
        fc1 = Ctx(fc1_needs, (x, w1), has_bias=ctx.has_b1, gate_rows=1)
        dx, dw1, db1, _, _ = _fc1_backward(fc1, None, dz)
    return dx, dw1, db1, dw2, db2, dres, dgate, None, None, None, None


_fused_mlp_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)

# inference plans call the ops' bodies without the dispatcher (uvit_fast.ops._hot.Direct); the MLP's
# op, where something watches the dispatcher, is the fc1 / fc2 pair, as in a training call
_LINEAR_DIRECT = Direct(_fused_linear_op)
_MLP_DIRECT = Direct(_mlp_pair, body=lambda *args: _mlp_pair(*args, direct=True))


def _rows_epilogue(y, residual, gate, gate_rows):
    """``residual + gate[m // gate_rows] * y`` on ``(M, N)`` rows."""
    if gate is not None:
        y = (y.view(gate.shape[0], -1, y.shape[-1]) * gate.unsqueeze(1)).view(y.shape)
    return y if residual is None else residual + y


def _linear_rows_torch(x, weight, bias, residual, gate, activation, gate_rows, store_preact):
    return (_rows_epilogue(activation_reference(F.linear(x, weight, bias), activation), residual, gate, gate_rows),)


def _mlp_rows_torch(x, w1, b1, w2, b2, residual, gate, activation, gate_rows, store_z, store_preact):
    h = activation_reference(F.linear(x, w1, b1), activation)
    return (_rows_epilogue(F.linear(h, w2, b2), residual, gate, gate_rows),)


_LINEAR_DISPATCH = DispatchOp(
    "fused_linear", torch.ops.uvit_fast.fused_linear, _linear_setup, _linear_backward, n_diff=1,
    candidates=lambda *args: {"torch": _linear_rows_torch},
)
_MLP_DISPATCH = DispatchOp(
    "fused_mlp", torch.ops.uvit_fast.fused_mlp, _mlp_setup, _mlp_backward, n_diff=1,
    candidates=lambda *args: {"torch": _mlp_rows_torch},
)


# --------------------------------------------------------------------------------------------
# FLOP formulas (torch.utils.flop_counter's convention: 2 per multiply-add; elementwise work,
# the activation's derivative and the gate's reduction, is not counted, as torch does not count it)
# --------------------------------------------------------------------------------------------
def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.uvit_fast.fused_linear)
    def _fwd(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * x_shape[0] * x_shape[1] * w_shape[0]

    @register_flop_formula(torch.ops.uvit_fast.fused_mlp_fc1)
    def _fc1(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * x_shape[0] * x_shape[1] * w_shape[0]

    @register_flop_formula(torch.ops.uvit_fast.fused_mlp_fc2)
    def _fc2(h_shape, z_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * h_shape[0] * h_shape[1] * w_shape[0]

    @register_flop_formula(torch.ops.uvit_fast.fused_linear_backward_input)
    def _dx(grad_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * grad_shape[0] * grad_shape[1] * w_shape[1]

    @register_flop_formula(torch.ops.uvit_fast.fused_linear_backward_weight)
    def _dw(grad_shape, x_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * grad_shape[0] * grad_shape[1] * x_shape[1]


_register_flop_formulas()
