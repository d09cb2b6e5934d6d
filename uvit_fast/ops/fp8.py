"""FP8 (e4m3) W8A8 linears for inference: row-wise quantization and the GEMM with the fused epilogue.

The format (as torchao's row-wise float8 and ``torch._scaled_mm``'s row-wise scaling):

* weights: ``float8_e4m3fn`` ``(N, K)`` in nn.Linear's layout with one float32 scale per output
  channel, quantized once (:func:`quantize_fp8_weight`);
* activations: ``float8_e4m3fn`` with one float32 scale per row (token), computed at run time
  (:func:`quantize_fp8`).

A scale is the smallest power of two with ``amax / scale <= 448`` (448: e4m3's largest finite
value; the amax of a row taken as at least ``1e-12``), and the quantized values are ``e4m3(v /
scale)``, rounded to nearest even. Power-of-two scales (as the MX formats' shared exponents) make
the scaling exact, so the only rounding is e4m3's and every backend gives the same bits; since
e4m3 is a floating format, a normal value keeps the same relative precision (3 mantissa bits)
wherever the scale puts it, and only the amax itself lands in [224, 448] rather than at 448. ``fp8_linear`` then computes ``residual + gate * act((x_q @ w_q.T) * x_scale * w_scale +
bias)`` with the epilogues of :func:`uvit_fast.ops.fused_linear`.

Backends of :func:`fp8_linear`:

* ``"torch"``: :func:`fp8_linear_reference`, the specification (dequantized operands in float32,
  float64 when ``out_dtype`` is float64);
* ``"scaled_mm"``: ``torch._scaled_mm`` with row-wise scales, then the activation, gate and residual
  in eager PyTorch (the GEMM output is rounded to ``out_dtype`` before the activation);
* ``"triton"``: the custom op ``uvit_fast::fp8_linear`` (:mod:`uvit_fast.kernels.fp8_linear`), one
  kernel; needs FP8 tensor cores (sm_89+) or the interpreter;
* ``"auto"``: on CUDA, measured dispatch between ``scaled_mm`` and ``triton`` when timing is on
  (``UVIT_FAST_TUNE``), else ``triton``; elsewhere ``torch`` (or ``triton`` when
  ``UVIT_FAST_BACKEND=triton`` under the interpreter).

These ops are for inference: they have no autograd formulas, and a call that would record a graph
(grad mode on and an input requiring grad) is a TypeError.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch

from uvit_fast._backend import get_backend, load_kernel, resolve
from uvit_fast.dispatch import measure
from uvit_fast.ops._checks import check_same_device, check_tensor, shape_str
from uvit_fast.ops._hot import Plans
from uvit_fast.ops.fused_linear import (
    ACTIVATIONS,
    _broadcast_gate,
    _epilogue_reference,
    _gate_flag,
    _gate_rows,
    _rows,
    _rows2d,
    activation_reference,
)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
EPS = 1e-12
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------------------------
# The specification
# --------------------------------------------------------------------------------------------
def quantize_fp8_reference(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x_q, scale)``: ``x (..., K)`` as float8_e4m3fn ``(..., K)`` with one float32 scale per row
    ``(...)``; ``x ~= x_q * scale[..., None]``. Computed in float32 (module docstring)."""
    x32 = x.float()
    amax = x32.abs().amax(dim=-1) if x.shape[-1] > 0 else x32.new_zeros(x.shape[:-1])
    scale = fp8_scale(amax)
    q = (x32 * (1.0 / scale).unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The scale of rows with absolute maxima ``amax`` (float32): the smallest power of two with
    ``amax / scale <= 448``, amax taken as at least ``1e-12``."""
    m, e = torch.frexp(amax.float().clamp_min(EPS))  # amax = m * 2**e, m in [0.5, 1)
    e = e - 9 + (m > FP8_MAX / 512).to(e.dtype)  # 448 = 0.875 * 2**9
    return torch.ldexp(torch.ones_like(m), e)


def quantize_fp8_weight(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A linear's ``weight (N, K)`` as ``(w_q (N, K) float8_e4m3fn, w_scale (N,) float32)``, one scale
    per output channel (the same rounding as :func:`quantize_fp8_reference`). Done once, offline."""
    check_tensor("quantize_fp8_weight", "weight", weight, 2)
    return quantize_fp8_reference(weight.detach())


def dequantize_fp8(x_q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x_q * scale[..., None]`` in ``dtype``."""
    return (x_q.to(dtype) * scale.to(dtype).unsqueeze(-1))


def fp8_linear_reference(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Plain PyTorch specification: ``y = act((x_q @ w_q.T) * x_scale * w_scale + bias)`` computed in
    float32 (float64 when ``out_dtype`` is float64) and rounded to ``out_dtype``, then
    ``residual + gate * y`` in eager PyTorch, returned in ``out_dtype``."""
    ct = torch.float64 if out_dtype == torch.float64 else torch.float32
    y = (x_q.to(ct) @ w_q.to(ct).T) * x_scale.to(ct).unsqueeze(-1) * w_scale.to(ct)
    if bias is not None:
        y = y + bias.to(ct)
    y = activation_reference(y, activation).to(out_dtype)
    if ct == torch.float64:
        residual = None if residual is None else residual.to(ct)
        gate = None if gate is None else gate.to(ct)
    return _epilogue_reference(y, residual, gate).to(out_dtype)


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------
def _check_fp8(op: str, name: str, t, ndim=None) -> None:
    check_tensor(op, name, t, ndim, floating=False)
    if t.dtype != FP8_DTYPE:
        raise TypeError(f"{op}: {name} must be torch.float8_e4m3fn; got {t.dtype}")


def _check_no_grad(op: str, **tensors) -> None:
    if not torch.is_grad_enabled():
        return
    needs = [k for k, t in tensors.items() if t is not None and t.requires_grad]
    if needs:
        raise TypeError(f"{op}: the FP8 ops are inference-only (no autograd), but {', '.join(needs)} requires grad; "
                        "call it under torch.no_grad() or torch.inference_mode()")


def _check_fp8_linear(x_q, x_scale, w_q, w_scale, bias, activation, residual, gate, out_dtype) -> None:
    op = "fp8_linear"
    _check_fp8(op, "x_q", x_q)
    if x_q.dim() < 1:
        raise ValueError(f"{op}: x_q must have at least 1 dim (..., K); got shape {tuple(x_q.shape)}")
    _check_fp8(op, "w_q", w_q, 2)
    K = x_q.shape[-1]
    if w_q.shape[1] != K:
        raise ValueError(f"{op}: w_q must have shape (N, {K}) for x_q {tuple(x_q.shape)}; got {tuple(w_q.shape)}")
    N = w_q.shape[0]
    for name, s, want in (("x_scale", x_scale, tuple(x_q.shape[:-1])), ("w_scale", w_scale, (N,))):
        check_tensor(op, name, s)
        if s.dtype != torch.float32 or tuple(s.shape) != want:
            raise ValueError(f"{op}: {name} must be float32 of shape {want} for x_q {tuple(x_q.shape)} and "
                             f"w_q {tuple(w_q.shape)}; got {s.dtype} {tuple(s.shape)}")
    check_tensor(op, "bias", bias, 1, optional=True)
    if bias is not None and bias.shape[0] != N:
        raise ValueError(f"{op}: bias has shape {shape_str(bias)} but w_q {tuple(w_q.shape)} needs ({N},)")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}; got {activation!r}")
    if out_dtype not in OUT_DTYPES + (torch.float64,):
        raise TypeError(f"{op}: out_dtype must be torch.bfloat16, torch.float16 or torch.float32 (float64: "
                        f"backend='torch' only); got {out_dtype!r}")
    _check_epilogue(op, tuple(x_q.shape), N, residual, gate)
    check_same_device(op, x_q=x_q, x_scale=x_scale, w_q=w_q, w_scale=w_scale, bias=bias, residual=residual,
                      gate=gate)
    _check_no_grad(op, bias=bias, residual=residual, gate=gate)


def _check_epilogue(op: str, x_shape: tuple, N: int, residual, gate) -> None:
    """The residual has the output's shape ``(..., N)``; the gate that, or ``(B, N)`` per sample."""
    out_shape = (*x_shape[:-1], N)
    check_tensor(op, "residual", residual, optional=True)
    check_tensor(op, "gate", gate, optional=True)
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"{op}: residual must have the output's shape {out_shape} for x_q {x_shape}; "
                         f"got {tuple(residual.shape)}")
    if gate is not None and tuple(gate.shape) != out_shape:
        per_sample = (x_shape[0], N) if len(x_shape) >= 3 else None
        if per_sample is None or tuple(gate.shape) != per_sample:
            want = f"(B, N) = {per_sample} (per sample) or " if per_sample else ""
            raise ValueError(f"{op}: gate must have shape {want}the output's shape {out_shape} (per token) "
                             f"for x_q {x_shape}; got {tuple(gate.shape)}")


def fp8_supported(device: torch.device) -> bool:
    """Whether ``device`` runs FP8 GEMMs: a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper,
    Blackwell). Not CPU: there the ops run (the reference, ``_scaled_mm``), but emulated."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


# --------------------------------------------------------------------------------------------
# quantize_fp8
# --------------------------------------------------------------------------------------------
def quantize_fp8(x: torch.Tensor, *, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x_q, scale)`` of ``x (..., K)``: float8_e4m3fn values and one float32 scale per row
    (:func:`quantize_fp8_reference`). ``x`` in float16, bfloat16 or float32, any strides. The Triton
    path (``uvit_fast::fp8_quantize``) gives the same bits as the reference."""
    sig, plan = _QUANT_PLANS.lookup(backend, x)
    if plan is None:
        plan = _QUANT_PLANS.put(sig, _quantize_plan(x, backend))
    return plan(x)


def _quantize_plan(x, backend):
    op = "quantize_fp8"
    check_tensor(op, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dim (..., K); got shape {tuple(x.shape)}")
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{op}: x must be float16, bfloat16 or float32; got {x.dtype}")
    _check_no_grad(op, x=x)
    choice = _fp8_choice(op, backend, x)
    if choice == "torch":
        return quantize_fp8_reference
    return _quantize_triton


def _quantize_triton(x):
    q, s = torch.ops.uvit_fast.fp8_quantize(_rows2d(x))
    return q.view(x.shape), s.view(x.shape[:-1])


_QUANT_PLANS = Plans("quantize_fp8")


def quantize_fp8_concat(h: torch.Tensor, skip: torch.Tensor, *, backend: str = "auto"):
    """:func:`quantize_fp8` of ``torch.cat([h, skip], -1)`` without the concat in 16 bits: U-ViT's
    long-skip linear input, one scale per row over both halves. Returns ``(x_q (..., 2D), scale (...))``."""
    op = "quantize_fp8_concat"
    check_tensor(op, "h", h)
    check_tensor(op, "skip", skip)
    if h.dim() < 1 or tuple(h.shape[:-1]) != tuple(skip.shape[:-1]):
        raise ValueError(f"{op}: h and skip must have the same leading dims (..., D); got h {tuple(h.shape)} "
                         f"and skip {tuple(skip.shape)}")
    check_same_device(op, h=h, skip=skip)
    for name, t in (("h", h), ("skip", skip)):
        if t.dtype not in _INPUT_DTYPES:
            raise TypeError(f"{op}: {name} must be float16, bfloat16 or float32; got {t.dtype}")
    _check_no_grad(op, h=h, skip=skip)
    if _fp8_choice(op, backend, h, skip) == "torch":
        return quantize_fp8_reference(torch.cat([h, skip], dim=-1))
    q, s = torch.ops.uvit_fast.fp8_quantize(_rows2d(h), _rows2d(skip))
    return q.view(*h.shape[:-1], q.shape[-1]), s.view(h.shape[:-1])


def _fp8_choice(op: str, backend: str, *tensors) -> str:
    """``"torch"`` or ``"triton"`` for the quantize op (``"measure"`` is not used: one pass over x,
    nothing for PyTorch to win); Triton on CUDA with FP8 (sm_89+) or when forced."""
    choice = resolve(backend, op, *tensors)
    device = next(t for t in tensors if t is not None).device
    forced = backend == "triton" or (backend == "auto" and get_backend() == "triton")
    if choice == "measure":
        choice = "triton" if device.type == "cuda" else "torch"
    if choice == "triton" and device.type == "cuda" and not fp8_supported(device):
        if forced:
            cap = torch.cuda.get_device_capability(device)
            raise ValueError(f"{op}: backend='triton' needs a GPU of compute capability 8.9 or newer for FP8; "
                             f"{device} is {cap[0]}.{cap[1]} (use backend='torch')")
        choice = "torch"
    return choice


# --------------------------------------------------------------------------------------------
# the LayerNorms with an FP8 output (adaln_layer_norm(..., quantize="fp8") and the residual form)
# --------------------------------------------------------------------------------------------
QUANTIZE = (None, "fp8")


class FP8Activation(NamedTuple):
    """An activation already in FP8: ``q`` float8_e4m3fn ``(..., K)``, ``scale`` float32 ``(...)``
    (one per row), and ``dtype``, the dtype the unquantized activation had (the dtype a
    :class:`uvit_fast.quantization.FP8Linear` taking it returns)."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


def check_quantize(op: str, quantize) -> None:
    if quantize not in QUANTIZE:
        raise ValueError(f"{op}: quantize must be None or 'fp8'; got {quantize!r}")


def adaln_layer_norm_fp8(x, shift, scale, weight, bias, eps, scale_offset, backend) -> FP8Activation:
    """``adaln_layer_norm(..., quantize="fp8")``: the LayerNorm's output as an :class:`FP8Activation`.
    Triton: the norm kernel writes e4m3 and the row scales from its fp32 result (one pass, no 16-bit
    output); PyTorch: the reference in x's dtype, then :func:`quantize_fp8_reference`."""
    from uvit_fast.ops import adaln

    op = "adaln_layer_norm"
    adaln._check_adaln(op, x, shift, scale, weight, bias, eps)
    _check_norm_input(op, x)
    _check_no_grad(op, x=x, shift=shift, scale=scale, weight=weight, bias=bias)
    if _fp8_choice(op, backend, x, shift, scale, weight, bias) == "torch":
        y = adaln.adaln_layer_norm_reference(x, shift, scale, weight, bias, eps, scale_offset)
        return FP8Activation(*quantize_fp8_reference(y), y.dtype)
    _, q, s = torch.ops.uvit_fast.adaln_layer_norm_fp8(x, None, None, shift, scale, weight, bias, float(eps),
                                                      float(scale_offset))
    return FP8Activation(q, s, adaln._promote(adaln._ln_dtype(x), scale, shift))


def residual_adaln_layer_norm_fp8(x, branch, gate, shift, scale, weight, bias, eps, scale_offset, backend):
    """``residual_adaln_layer_norm(..., quantize="fp8")``: ``(x_new, FP8Activation of h)``."""
    from uvit_fast.ops import adaln

    op = "residual_adaln_layer_norm"
    adaln._check_adaln(op, x, shift, scale, weight, bias, eps)
    adaln._check_residual(op, x, branch, gate)
    _check_norm_input(op, x)
    _check_no_grad(op, x=x, branch=branch, gate=gate, shift=shift, scale=scale, weight=weight, bias=bias)
    if _fp8_choice(op, backend, x, branch, gate, shift, scale, weight, bias) == "torch":
        x_new, h = adaln.residual_adaln_layer_norm_reference(x, branch, gate, shift, scale, weight, bias, eps,
                                                            scale_offset)
        return x_new, FP8Activation(*quantize_fp8_reference(h), h.dtype)
    x_new, q, s = torch.ops.uvit_fast.adaln_layer_norm_fp8(x, branch, gate, shift, scale, weight, bias, float(eps),
                                                          float(scale_offset))
    return x_new, FP8Activation(q, s, adaln._promote(adaln._ln_dtype(x, x_new.dtype), scale, shift))


def _check_norm_input(op: str, x) -> None:
    if x.dtype not in _INPUT_DTYPES:
        raise TypeError(f"{op}: quantize='fp8' takes float16, bfloat16 or float32 x; got {x.dtype}")
    if x.shape[-1] == 0:
        raise ValueError(f"{op}: quantize='fp8' needs a non-empty last dim; got x {tuple(x.shape)}")


# --------------------------------------------------------------------------------------------
# fp8_linear
# --------------------------------------------------------------------------------------------
BACKENDS = ("auto", "torch", "scaled_mm", "triton")


def fp8_linear(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    activation: Optional[str] = None,
    residual: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
) -> torch.Tensor:
    """``residual + gate * act((x_q @ w_q.T) * x_scale[..., None] * w_scale + bias)`` in ``out_dtype``.

    Args:
        x_q: ``(..., K)`` float8_e4m3fn (from :func:`quantize_fp8`).
        x_scale: ``(...)`` float32, one scale per row of ``x_q``.
        w_q: ``(N, K)`` float8_e4m3fn, nn.Linear's layout (from :func:`quantize_fp8_weight`).
        w_scale: ``(N,)`` float32, one scale per output channel.
        bias: ``(N,)`` (float16, bfloat16 or float32) or None.
        activation: None, ``"gelu"``, ``"gelu_tanh"``, ``"silu"`` or ``"quick_gelu"``.
        residual: the output's shape ``(..., N)``, or None.
        gate: ``(B, N)`` per sample (``x_q`` of shape ``(B, ..., K)``) or the output's shape, or None.
        out_dtype: bfloat16 (default), float16 or float32 (float64 with ``backend="torch"``).
        backend: ``"auto"``, ``"torch"``, ``"scaled_mm"`` or ``"triton"`` (module docstring).
    """
    sig, plan = _LINEAR_PLANS.lookup((backend, activation, type(activation), out_dtype), x_q, x_scale, w_q,
                                     w_scale, bias, residual, gate)
    if plan is None:
        plan = _LINEAR_PLANS.put(sig, _linear_plan(x_q, x_scale, w_q, w_scale, bias, residual, gate, activation,
                                                   out_dtype, backend))
    return plan(x_q, x_scale, w_q, w_scale, bias, residual, gate, activation, out_dtype)


def _linear_plan(x_q, x_scale, w_q, w_scale, bias, residual, gate, activation, out_dtype, backend):
    op = "fp8_linear"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}; got {backend!r}")
    _check_fp8_linear(x_q, x_scale, w_q, w_scale, bias, activation, residual, gate, out_dtype)
    tensors = (x_q, x_scale, w_q, w_scale, bias, residual, gate)
    if backend == "scaled_mm":
        _check_scaled_mm(op, x_q.device, x_q.shape[-1], w_q.shape[0], out_dtype, strict=True)
        return _scaled_mm_linear
    if out_dtype == torch.float64:
        if backend == "triton" or (backend == "auto" and get_backend() == "triton"):
            raise TypeError(f"{op}: backend='triton' writes bfloat16, float16 or float32; got out_dtype=float64 "
                            "(use backend='torch')")
        return _linear_reference
    choice = resolve(backend, op, *tensors)
    device = x_q.device
    forced = backend == "triton" or (backend == "auto" and get_backend() == "triton")
    if choice in ("triton", "measure") and device.type == "cuda" and not fp8_supported(device):
        if forced:
            cap = torch.cuda.get_device_capability(device)
            raise ValueError(f"{op}: backend='triton' needs a GPU of compute capability 8.9 or newer for FP8; "
                             f"{device} is {cap[0]}.{cap[1]} (use backend='torch')")
        return _linear_reference
    if choice == "measure":
        if device.type != "cuda":  # the interpreter: the kernel's math, not its speed
            return _linear_reference
        candidates = {"triton": _linear_triton}
        if _check_scaled_mm(op, device, x_q.shape[-1], w_q.shape[0], out_dtype, strict=False):
            candidates = {"scaled_mm": _scaled_mm_linear, **candidates}
        rows = math.prod(x_q.shape[:-1])
        flags = f"act={activation},bias={int(bias is not None)},gate={_gate_flag(x_q, w_q.shape[0], gate)}," \
                f"res={int(residual is not None)},out={str(out_dtype).rsplit('.', 1)[-1]}"
        bound = {name: (lambda fn: lambda *t: fn(*t, activation, out_dtype))(fn) for name, fn in candidates.items()}
        choice = measure(op, tensors, bound, rows=rows, dims=(x_q.shape[-1], w_q.shape[0]), flags=flags)
        return candidates[choice]
    if choice == "torch":
        return _linear_reference
    return _linear_triton


def _linear_reference(x_q, x_scale, w_q, w_scale, bias, residual, gate, activation, out_dtype):
    return fp8_linear_reference(x_q, x_scale, w_q, w_scale, bias, activation=activation, residual=residual,
                                gate=gate, out_dtype=out_dtype)


def _check_scaled_mm(op: str, dev: torch.device, K: int, N: int, out_dtype, strict: bool) -> bool:
    """``torch._scaled_mm`` with row-wise scales: on CUDA it needs sm_89+, K and N multiples of 16 and
    a bfloat16 output; on CPU it runs any shape."""
    why = None
    if out_dtype == torch.float64:
        why = "out_dtype float64"
    elif dev.type == "cuda":
        if not fp8_supported(dev):
            why = f"{dev} has no FP8 (compute capability below 8.9)"
        elif K % 16 or N % 16:
            why = f"K={K} and N={N} must be multiples of 16"
        elif out_dtype != torch.bfloat16:
            why = f"row-wise scaling writes bfloat16; got out_dtype={out_dtype}"
    if why and strict:
        raise ValueError(f"{op}: backend='scaled_mm' cannot run this call: {why}")
    return why is None


def _scaled_mm_linear(x_q, x_scale, w_q, w_scale, bias, residual, gate, activation, out_dtype):
    """``torch._scaled_mm`` (row-wise scales; the bias inside when it has ``out_dtype``), then the
    activation, gate and residual in eager PyTorch."""
    N = w_q.shape[0]
    x2 = _rows2d(x_q)
    inner_bias = bias if bias is not None and bias.dtype == out_dtype else None
    y = torch._scaled_mm(x2, w_q.t(), scale_a=_rows2d(x_scale.unsqueeze(-1)), scale_b=w_scale.view(1, N),
                         bias=inner_bias, out_dtype=out_dtype)
    if bias is not None and inner_bias is None:
        y = (y.float() + bias.float()).to(out_dtype)
    y = activation_reference(y, activation).view(*x_q.shape[:-1], N)
    return _epilogue_reference(y, residual, gate).to(out_dtype)


def _linear_triton(x_q, x_scale, w_q, w_scale, bias, residual, gate, activation, out_dtype):
    N = w_q.shape[0]
    g2, gate_rows = _gate_rows(x_q, N, gate)
    out = torch.ops.uvit_fast.fp8_linear(_rows2d(x_q), x_scale.reshape(-1), w_q, w_scale, bias,
                                         _rows(residual, N), g2, activation, gate_rows, out_dtype)
    return out.view(*x_q.shape[:-1], N)


_LINEAR_PLANS = Plans("fp8_linear")


# --------------------------------------------------------------------------------------------
# fp8_mlp: fc1 + activation, then fc2 + gate + residual, with fc2's input quantized inside fc2
# --------------------------------------------------------------------------------------------
def fp8_mlp_reference(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    fc1_w_q: torch.Tensor,
    fc1_w_scale: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_w_q: torch.Tensor,
    fc2_w_scale: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    *,
    activation: Optional[str] = "gelu",
    residual: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Plain PyTorch specification: ``h = fp8_linear(x, fc1, activation)`` in ``out_dtype``, ``h``
    quantized per row (:func:`quantize_fp8_reference`), then ``fp8_linear(h, fc2, residual, gate)``."""
    h = fp8_linear_reference(x_q, x_scale, fc1_w_q, fc1_w_scale, fc1_bias, activation=activation,
                             out_dtype=out_dtype)
    h_q, h_scale = quantize_fp8_reference(h)
    return fp8_linear_reference(h_q, h_scale, fc2_w_q, fc2_w_scale, fc2_bias, residual=residual, gate=gate,
                                out_dtype=out_dtype)


def fp8_mlp(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    fc1_w_q: torch.Tensor,
    fc1_w_scale: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_w_q: torch.Tensor,
    fc2_w_scale: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    *,
    activation: Optional[str] = "gelu",
    residual: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
    backend: str = "auto",
) -> torch.Tensor:
    """``residual + gate * fc2(act(fc1(x)))`` with both GEMMs in FP8 (:func:`fp8_mlp_reference`).

    The Triton path is two kernels and no quantize pass: fc1's epilogue writes ``h`` (16-bit) and the
    partial maxima of its rows; fc2 quantizes its ``h`` tiles in registers with the row scales those
    give, the bits :func:`quantize_fp8` would write. ``out_dtype`` must be 16-bit there (``h`` has
    it). Backends as :func:`fp8_linear` (``"scaled_mm"``: two ``torch._scaled_mm`` with the quantize
    kernel between them)."""
    sig, plan = _MLP_PLANS.lookup((backend, activation, type(activation), out_dtype), x_q, x_scale, fc1_w_q,
                                  fc1_w_scale, fc1_bias, fc2_w_q, fc2_w_scale, fc2_bias, residual, gate)
    if plan is None:
        plan = _MLP_PLANS.put(sig, _mlp_plan(x_q, x_scale, fc1_w_q, fc1_w_scale, fc1_bias, fc2_w_q, fc2_w_scale,
                                             fc2_bias, residual, gate, activation, out_dtype, backend))
    return plan(x_q, x_scale, fc1_w_q, fc1_w_scale, fc1_bias, fc2_w_q, fc2_w_scale, fc2_bias, residual, gate,
                activation, out_dtype)


def _mlp_plan(x_q, x_scale, w1, s1, b1, w2, s2, b2, residual, gate, activation, out_dtype, backend):
    op = "fp8_mlp"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}; got {backend!r}")
    _check_fp8_linear(x_q, x_scale, w1, s1, b1, activation, None, None, out_dtype)
    H = w1.shape[0]
    _check_fp8(op, "fc2_w_q", w2, 2)
    if w2.shape[1] != H:
        raise ValueError(f"{op}: fc2_w_q must have shape (N, {H}) for fc1_w_q {tuple(w1.shape)}; got {tuple(w2.shape)}")
    N = w2.shape[0]
    check_tensor(op, "fc2_w_scale", s2)
    if s2.dtype != torch.float32 or tuple(s2.shape) != (N,):
        raise ValueError(f"{op}: fc2_w_scale must be float32 of shape ({N},); got {s2.dtype} {tuple(s2.shape)}")
    check_tensor(op, "fc2_bias", b2, 1, optional=True)
    if b2 is not None and b2.shape[0] != N:
        raise ValueError(f"{op}: fc2_bias has shape {shape_str(b2)} but fc2_w_q {tuple(w2.shape)} needs ({N},)")
    _check_epilogue(op, tuple(x_q.shape), N, residual, gate)
    check_same_device(op, x_q=x_q, fc2_w_q=w2, fc2_w_scale=s2, fc2_bias=b2, residual=residual, gate=gate)
    _check_no_grad(op, fc2_bias=b2, residual=residual, gate=gate)
    tensors = (x_q, x_scale, w1, s1, b1, w2, s2, b2, residual, gate)
    forced = backend == "triton" or (backend == "auto" and get_backend() == "triton")
    if backend == "scaled_mm":
        _check_scaled_mm(op, x_q.device, x_q.shape[-1], H, out_dtype, strict=True)
        _check_scaled_mm(op, x_q.device, H, N, out_dtype, strict=True)
        return _mlp_scaled_mm
    if out_dtype not in (torch.bfloat16, torch.float16):
        if forced:
            raise TypeError(f"{op}: backend='triton' keeps h in out_dtype, which must be bfloat16 or float16; got "
                            f"{out_dtype} (use backend='torch')")
        return _mlp_reference
    choice = resolve(backend, op, *tensors)
    device = x_q.device
    if choice in ("triton", "measure") and device.type == "cuda" and not fp8_supported(device):
        if forced:
            cap = torch.cuda.get_device_capability(device)
            raise ValueError(f"{op}: backend='triton' needs a GPU of compute capability 8.9 or newer for FP8; "
                             f"{device} is {cap[0]}.{cap[1]} (use backend='torch')")
        return _mlp_reference
    if choice == "measure":
        if device.type != "cuda":
            return _mlp_reference
        candidates = {"triton": _mlp_triton}
        if _check_scaled_mm(op, device, x_q.shape[-1], H, out_dtype, strict=False) and \
                _check_scaled_mm(op, device, H, N, out_dtype, strict=False):
            candidates = {"scaled_mm": _mlp_scaled_mm, **candidates}
        flags = f"act={activation},gate={_gate_flag(x_q, w2.shape[0], gate)},res={int(residual is not None)}," \
                f"out={str(out_dtype).rsplit('.', 1)[-1]}"
        bound = {name: (lambda fn: lambda *t: fn(*t, activation, out_dtype))(fn) for name, fn in candidates.items()}
        choice = measure(op, tensors, bound, rows=math.prod(x_q.shape[:-1]), dims=(x_q.shape[-1], H, w2.shape[0]),
                         flags=flags)
        return candidates[choice]
    return _mlp_reference if choice == "torch" else _mlp_triton


def _mlp_reference(x_q, x_scale, w1, s1, b1, w2, s2, b2, residual, gate, activation, out_dtype):
    return fp8_mlp_reference(x_q, x_scale, w1, s1, b1, w2, s2, b2, activation=activation, residual=residual,
                             gate=gate, out_dtype=out_dtype)


def _mlp_scaled_mm(x_q, x_scale, w1, s1, b1, w2, s2, b2, residual, gate, activation, out_dtype):
    h = _scaled_mm_linear(x_q, x_scale, w1, s1, b1, None, None, activation, out_dtype)
    h_q, h_scale = quantize_fp8(h)
    return _scaled_mm_linear(h_q, h_scale, w2, s2, b2, residual, gate, None, out_dtype)


def _mlp_triton(x_q, x_scale, w1, s1, b1, w2, s2, b2, residual, gate, activation, out_dtype):
    N = w2.shape[0]
    h, amax = torch.ops.uvit_fast.fp8_linear_amax(_rows2d(x_q), x_scale.reshape(-1), w1, s1, b1, activation,
                                                  out_dtype)
    g2, gate_rows = _gate_rows(x_q, N, gate)
    out = torch.ops.uvit_fast.fp8_linear_prequant(h, amax, w2, s2, b2, _rows(residual, N), g2, gate_rows, out_dtype)
    return out.view(*x_q.shape[:-1], N)


_MLP_PLANS = Plans("fp8_mlp")


# --------------------------------------------------------------------------------------------
# torch.library registration (inference: no autograd formulas)
# --------------------------------------------------------------------------------------------
def _kernel():
    return load_kernel("fp8_linear", "fp8_linear")


@torch.library.custom_op("uvit_fast::fp8_quantize", mutates_args=())
def _fp8_quantize_op(x: torch.Tensor, x2: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``x (M, K)``, or of ``[x, x2]`` with ``x2 (M, K2)``, in e4m3 with their scales."""
    return _kernel().quantize_rows(x, x2)


@_fp8_quantize_op.register_fake
def _(x, x2=None):
    K = x.shape[1] + (x2.shape[1] if x2 is not None else 0)
    return x.new_empty((x.shape[0], K), dtype=FP8_DTYPE), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.custom_op("uvit_fast::adaln_layer_norm_fp8", mutates_args=())
def _adaln_fp8_op(
    x: torch.Tensor,
    branch: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    scale_offset: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_new, y_q, y_scale)``; ``x_new`` is an empty ``(0,)`` tensor without ``branch``."""
    k = load_kernel("adaln_layer_norm", "adaln_layer_norm")
    xn_dtype = _xn_dtype(x, branch, gate)
    x_new, q, s = k.adaln_layer_norm_fp8_forward(x, shift, scale, weight, bias, eps, scale_offset, branch=branch,
                                                 gate=gate, xn_dtype=xn_dtype)
    return (x_new if x_new is not None else x.new_empty((0,))), q, s


def _xn_dtype(x, branch, gate):
    dtype = x.dtype
    for t in (branch, gate):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


@_adaln_fp8_op.register_fake
def _(x, branch, gate, shift, scale, weight, bias, eps, scale_offset):
    x_new = x.new_empty(x.shape, dtype=_xn_dtype(x, branch, gate)) if branch is not None else x.new_empty((0,))
    return x_new, x.new_empty(x.shape, dtype=FP8_DTYPE), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("uvit_fast::fp8_linear", mutates_args=())
def _fp8_linear_op(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    activation: Optional[str],
    gate_rows: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    return _kernel().fp8_linear_forward(x_q, x_scale, w_q, w_scale, bias, activation=activation, residual=residual,
                                        gate=gate, gate_rows=gate_rows, out_dtype=out_dtype)


@_fp8_linear_op.register_fake
def _(x_q, x_scale, w_q, w_scale, bias, residual, gate, activation, gate_rows, out_dtype):
    return x_q.new_empty((x_q.shape[0], w_q.shape[0]), dtype=out_dtype)


@torch.library.custom_op("uvit_fast::fp8_linear_amax", mutates_args=())
def _fp8_linear_amax_op(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    activation: Optional[str],
    out_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """fc1 of :func:`fp8_mlp`: ``(h, partial row maxima of h)``."""
    return _kernel().fp8_linear_forward(x_q, x_scale, w_q, w_scale, bias, activation=activation,
                                        out_dtype=out_dtype, amax_out=True)


@_fp8_linear_amax_op.register_fake
def _(x_q, x_scale, w_q, w_scale, bias, activation, out_dtype):
    M, N = x_q.shape[0], w_q.shape[0]
    slots = -(-N // _kernel().MIN_BLOCK_N)
    return x_q.new_empty((M, N), dtype=out_dtype), x_q.new_empty((M, slots), dtype=torch.float32)


@torch.library.custom_op("uvit_fast::fp8_linear_prequant", mutates_args=())
def _fp8_linear_prequant_op(
    x: torch.Tensor,
    x_amax: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    gate_rows: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """fc2 of :func:`fp8_mlp`: its 16-bit input quantized in the kernel from fc1's row maxima."""
    return _kernel().fp8_linear_forward(x, None, w_q, w_scale, bias, residual=residual, gate=gate,
                                        gate_rows=gate_rows, out_dtype=out_dtype, x_amax=x_amax)


@_fp8_linear_prequant_op.register_fake
def _(x, x_amax, w_q, w_scale, bias, residual, gate, gate_rows, out_dtype):
    return x.new_empty((x.shape[0], w_q.shape[0]), dtype=out_dtype)


def _register_flop_formulas() -> None:
    """torch.utils.flop_counter formulas: the GEMM of the FP8 linear (2 M N K), none for quantizing."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula([torch.ops.uvit_fast.fp8_linear, torch.ops.uvit_fast.fp8_linear_amax,
                            torch.ops.uvit_fast.fp8_linear_prequant])
    def _fwd(x_shape, xs_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * x_shape[0] * x_shape[1] * w_shape[0]


_register_flop_formulas()

__all__ = [
    "FP8Activation",
    "FP8_DTYPE",
    "adaln_layer_norm_fp8",
    "residual_adaln_layer_norm_fp8",
    "FP8_MAX",
    "dequantize_fp8",
    "fp8_linear",
    "fp8_linear_reference",
    "fp8_mlp",
    "fp8_mlp_reference",
    "fp8_supported",
    "quantize_fp8",
    "quantize_fp8_concat",
    "quantize_fp8_reference",
    "quantize_fp8_weight",
]
