"""Multi-head attention on ``(B, L, H, D)`` tensors, behind one call with several backends.

Causal masking is top-left aligned, as ``torch.nn.functional.scaled_dot_product_attention``'s
``is_causal``: query ``i`` sees keys ``0..i`` (every query sees at least one key).

The Triton backend (``kernels/attention.py``, design in ``docs/attention.md``) is registered as
``torch.library`` custom ops ``uvit_fast::attention_fwd`` / ``attention_bwd`` and the packed
``uvit_fast::attention_qkvpacked_fwd`` / ``attention_qkvpacked_bwd``, with fake kernels, autograd
and FLOP formulas (torch's SDPA convention). Autocast: inside an autocast region every backend
computes in the autocast dtype (float64 excepted) and returns that dtype, like SDPA and the
reference's matmuls; the custom ops are not autocast-aware, so the wrapper casts before calling.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from uvit_fast._backend import BackendError, check_triton_device, get_backend, measuring
from uvit_fast.dispatch import measure
from uvit_fast.ops._hot import Direct, Plans, may_run_direct
from uvit_fast.ops._runtime import DispatchOp
from uvit_fast.kernels._precision import tf32_matmul_allowed
from uvit_fast.ops._autocast import autocast_cast, autocast_dtype
from uvit_fast.ops._checks import check_same_device, check_tensor

ATTENTION_BACKENDS = ("auto", "torch", "triton", "sdpa", "flash_attn", "xformers")
MAX_HEAD_DIM = 256
#: dtypes the Triton kernel runs (fp32 accumulation in every case)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_attention(q, k, v, scale):
    op = "attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, 4)
    check_same_device(op, q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    (B, Lq, H, D), (Bk, Lk, Hk, Dk) = q.shape, k.shape
    if (Bk, Hk, Dk) != (B, H, D) or tuple(v.shape) != tuple(k.shape):
        raise ValueError(
            "attention: q (B, Lq, H, D), k and v (B, Lk, H, D) must agree in batch, heads and head_dim; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if D > MAX_HEAD_DIM:
        raise ValueError(f"attention: head_dim {D} is above the supported maximum {MAX_HEAD_DIM} (q {tuple(q.shape)})")
    if Lq == 0 or Lk == 0:
        raise ValueError(f"attention: sequence lengths must be >= 1; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"attention: scale must be a float or None; got {type(scale).__name__}")


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Plain PyTorch math specification: ``softmax(q k^T * scale [+ causal mask]) v`` per head.

    Computed in the inputs' dtype with the softmax in at least float32 (float64 stays float64);
    materialises ``(B, H, Lq, Lk)``.
    """
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    s = torch.einsum("blhd,bmhd->bhlm", q, k) * scale
    if causal:
        Lq, Lk = q.shape[1], k.shape[1]
        mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~mask, float("-inf"))
    p = s.softmax(dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    return torch.einsum("bhlm,bmhd->blhd", p, v)


def _sdpa(q, k, v, causal, scale):
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=scale
    )
    return out.transpose(1, 2)


def _flash_attn_module():
    try:
        return importlib.import_module("flash_attn")
    except ImportError:
        raise ValueError("attention: backend='flash_attn' needs the flash-attn package (pip install flash-attn, or from a checkout pip install -e \".[flash]\")") from None


def _check_half(t: torch.Tensor) -> None:
    if t.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"attention: backend='flash_attn' runs float16/bfloat16 only; got {t.dtype} "
                        f"(shape {tuple(t.shape)}): use torch.autocast or another backend")


def _flash_attn(q, k, v, causal, scale):
    fa = _flash_attn_module()
    _check_half(q)
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(
            "attention: flash_attn aligns causal masks bottom-right; with Lq != Lk use another backend "
            f"(q {tuple(q.shape)}, k {tuple(k.shape)})"
        )
    return fa.flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)


def _xformers(q, k, v, causal, scale):
    try:
        xops = importlib.import_module("xformers.ops")
    except ImportError:
        raise ValueError("attention: backend='xformers' needs the xformers package (pip install xformers, or from a checkout pip install -e \".[xformers]\")") from None
    bias = None
    if causal:
        bias = xops.LowerTriangularMask()  # top-left aligned, as ours
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)


# ---------------------------------------------------------------------------------------------
# Autocast: the custom ops are not autocast-aware, so the Python wrapper casts first, exactly as
# autocast treats SDPA and the matmuls of the reference: inside an autocast region, floating
# inputs other than float64 run in the autocast dtype and the output comes back in that dtype.
# ---------------------------------------------------------------------------------------------


def _autocast(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    dtype = autocast_dtype(tensors[0].device)
    return tuple(autocast_cast(t, dtype) for t in tensors)


# Backend choice happens in Python before the op is called. Under torch.compile these helpers are
# evaluated once at trace time and folded as constants (importing triton and reading the
# process-wide default cannot be traced): the choice is fixed for a compiled graph.


@torch.compiler.assume_constant_result
def _default_backend() -> str:
    return get_backend()


@torch.compiler.assume_constant_result
def _triton_error(device_type: str) -> str:
    """Why backend='triton' cannot run on ``device_type`` ('' when it can)."""
    try:
        check_triton_device("attention", torch.device(device_type))
    except BackendError as exc:
        return str(exc)
    return ""


@torch.compiler.assume_constant_result
def _tf32_allowed() -> bool:
    return tf32_matmul_allowed()


def _auto_choice(device_type: str, dtype: torch.dtype, tf32_allowed: bool) -> str:
    """What ``auto`` runs for inputs of ``dtype`` (after autocast) on ``device_type``: our kernel on
    CUDA for 16-bit inputs and for fp32 when TF32 is allowed; SDPA otherwise. Exact fp32 (no TF32)
    goes to SDPA: on CUDA cores the kernel spills catastrophically (compiled for sm_90: 32
    registers and 35-87 KB of spills per thread, docs/attention.md); ``backend="triton"`` still
    forces it."""
    if device_type != "cuda" or dtype not in TRITON_DTYPES:
        return "sdpa"
    if dtype == torch.float32 and not tf32_allowed:
        return "sdpa"
    return "triton"


@torch.compiler.assume_constant_result
def _measuring(device_type: str) -> bool:
    return measuring(device_type)


def _untimed_auto(q: torch.Tensor) -> str:
    """``auto`` without timing (``UVIT_FAST_TUNE=0``, and under torch.compile for a key with no stored decision)."""
    if q.is_cuda and not _triton_error("cuda"):
        return _auto_choice("cuda", _autocast(q)[0].dtype, _tf32_allowed())
    return "sdpa"


def _select(backend: str, q: torch.Tensor) -> str:
    """The backend that will run: one of ``torch``, ``triton``, ``sdpa``, ``flash_attn``, ``xformers``."""
    if backend in ("sdpa", "flash_attn", "xformers"):
        return backend
    choice = backend if backend != "auto" else _default_backend()
    if choice == "auto" and _measuring(q.device.type) and _autocast(q)[0].dtype in TRITON_DTYPES:
        return "measure"  # time the candidates once per key (uvit_fast.dispatch)
    if choice == "auto":
        return _untimed_auto(q)
    if choice == "triton":
        err = _triton_error(q.device.type)
        if err:
            raise BackendError(err)
    return choice


# ---------------------------------------------------------------------------------------------
# Triton kernel as torch.library custom ops (forward and backward are separate ops so that
# torch.compile(fullgraph=True) traces both; the kernel module is imported inside the bodies).
# ---------------------------------------------------------------------------------------------


def _fp32_precision(t: torch.Tensor) -> str:
    """fp32 inputs: exact fp32 dots ("ieee") unless TF32 matmuls are allowed in torch."""
    if t.is_cuda and tf32_matmul_allowed():
        return "tf32"
    return "ieee"


@torch.library.custom_op("uvit_fast::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    from uvit_fast.kernels.attention import attention_forward

    return attention_forward(q, k, v, causal=causal, scale=scale, input_precision=_fp32_precision(q))


@_attention_fwd_op.register_fake
def _(q, k, v, causal, scale):
    B, Lq, H, D = q.shape
    return q.new_empty(B, Lq, H, D), q.new_empty(B, H, 2, Lq, dtype=torch.float32)


@torch.library.custom_op("uvit_fast::attention_bwd", mutates_args=())
def _attention_bwd_op(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    stats: torch.Tensor,
    causal: bool,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from uvit_fast.kernels.attention import attention_backward

    return attention_backward(
        dout, q, k, v, out, stats, causal=causal, scale=scale, input_precision=_fp32_precision(q)
    )


@_attention_bwd_op.register_fake
def _(dout, q, k, v, out, stats, causal, scale):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
    )


def _attention_setup(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    out, stats = output
    ctx.save_for_backward(q, k, v, out, stats)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(stats)


def _attention_backward(ctx, dout, _dstats):
    q, k, v, out, stats = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(dout, q, k, v, out, stats, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_attention_fwd_op.register_autograd(_attention_backward, setup_context=_attention_setup)


@torch.library.custom_op("uvit_fast::attention_qkvpacked_fwd", mutates_args=())
def _attention_packed_fwd_op(qkv: torch.Tensor, causal: bool, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    from uvit_fast.kernels.attention import attention_forward

    q, k, v = qkv.unbind(2)
    return attention_forward(q, k, v, causal=causal, scale=scale, input_precision=_fp32_precision(qkv))


@_attention_packed_fwd_op.register_fake
def _(qkv, causal, scale):
    B, L, _, H, D = qkv.shape
    return qkv.new_empty(B, L, H, D), qkv.new_empty(B, H, 2, L, dtype=torch.float32)


@torch.library.custom_op("uvit_fast::attention_qkvpacked_bwd", mutates_args=())
def _attention_packed_bwd_op(
    dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, stats: torch.Tensor, causal: bool, scale: float
) -> torch.Tensor:
    from uvit_fast.kernels.attention import attention_qkvpacked_backward

    return attention_qkvpacked_backward(
        dout, qkv, out, stats, causal=causal, scale=scale, input_precision=_fp32_precision(qkv)
    )


@_attention_packed_bwd_op.register_fake
def _(dout, qkv, out, stats, causal, scale):
    return qkv.new_empty(qkv.shape)


def _packed_setup(ctx, inputs, output):
    qkv, causal, scale = inputs
    out, stats = output
    ctx.save_for_backward(qkv, out, stats)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(stats)


def _packed_backward(ctx, dout, _dstats):
    qkv, out, stats = ctx.saved_tensors
    return _attention_packed_bwd_op(dout, qkv, out, stats, ctx.causal, ctx.scale), None, None


_attention_packed_fwd_op.register_autograd(_packed_backward, setup_context=_packed_setup)
# inference plans call the forward ops' bodies without the dispatcher (uvit_fast.ops._hot.Direct)
_ATTENTION_DIRECT = Direct(_attention_fwd_op)
_PACKED_DIRECT = Direct(_attention_packed_fwd_op)


# FLOP formulas, in torch's SDPA convention (torch/utils/flop_counter.py): forward = the two
# matmuls, 4 B H Lq Lk D; backward = five matmuls incl. the recomputed scores, 10 B H Lq Lk D;
# causal masking is not discounted (SDPA's formulas do not discount it either).


def _fwd_flops(B, H, Lq, Lk, D, Dv):
    return 2 * B * H * Lq * Lk * D + 2 * B * H * Lq * Lk * Dv


def _bwd_flops(B, H, Lq, Lk, D, Dv):
    return 2 * B * H * Lq * Lk * (3 * D + 2 * Dv)


def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.uvit_fast.attention_fwd)
    def _fwd(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        B, Lq, H, D = q_shape
        return _fwd_flops(B, H, Lq, k_shape[1], D, v_shape[3])

    @register_flop_formula(torch.ops.uvit_fast.attention_bwd)
    def _bwd(dout_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        B, Lq, H, D = q_shape
        return _bwd_flops(B, H, Lq, k_shape[1], D, v_shape[3])

    @register_flop_formula(torch.ops.uvit_fast.attention_qkvpacked_fwd)
    def _packed_fwd(qkv_shape, *args, out_shape=None, **kwargs) -> int:
        B, L, _, H, D = qkv_shape
        return _fwd_flops(B, H, L, L, D, D)

    @register_flop_formula(torch.ops.uvit_fast.attention_qkvpacked_bwd)
    def _packed_bwd(dout_shape, qkv_shape, *args, out_shape=None, **kwargs) -> int:
        B, L, _, H, D = qkv_shape
        return _bwd_flops(B, H, L, L, D, D)


_register_flop_formulas()


def _resolve_scale(scale: Optional[float], D: int) -> float:
    return float(D ** -0.5 if scale is None else scale)


def _check_triton(op: str, t: torch.Tensor) -> None:
    if t.dtype not in TRITON_DTYPES:
        raise TypeError(f"{op}: backend='triton' supports {', '.join(map(str, TRITON_DTYPES))}; got {t.dtype} "
                        f"(shape {tuple(t.shape)}); use backend='sdpa' or 'torch'")


def _attention_triton(q, k, v, causal, scale, call=None):
    q, k, v = _autocast(q, k, v)
    _check_triton("attention", q)
    out, _ = (call or _attention_fwd_op)(q, k, v, bool(causal), _resolve_scale(scale, q.shape[-1]))
    return out


def _attention_candidates(q, k, causal, scale):
    """What ``auto`` times (the first, SDPA, is the baseline that wins ties): SDPA, the math
    reference (small score matrices only), our kernel, and flash-attn / xformers where installed
    and applicable."""
    def run(name):
        return lambda q, k, v: attention(q, k, v, causal=causal, scale=scale, backend=name)

    # the math reference materialises the fp32 scores: not timed where they pass 1 GiB (it would
    # lose, and could run the device out of memory while timing)
    B, Lq, H, _ = q.shape
    names = ["sdpa", "torch", "triton"] if B * H * Lq * k.shape[1] * 4 <= 2**30 else ["sdpa", "triton"]
    half = _autocast(q)[0].dtype in (torch.float16, torch.bfloat16)
    if q.is_cuda and half and not (causal and q.shape[1] != k.shape[1]) and importlib.util.find_spec("flash_attn"):
        names.append("flash_attn")
    if q.is_cuda and importlib.util.find_spec("xformers"):
        names.append("xformers")
    return {name: run(name) for name in names}


def _key(inputs, causal, q=None):
    q = inputs[0] if q is None else q
    B, L, H, D = q.shape
    Lk = inputs[1].shape[1] if len(inputs) > 1 else L
    return dict(rows=B * H, dims=(L, Lk, D), flags=f"causal={int(bool(causal))}")


def _measure(op, inputs, candidates, causal, q=None) -> str:
    q = inputs[0] if q is None else q
    return measure(op, inputs, candidates, **_key(inputs, causal, q))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention in the ``(B, L, H, D)`` layout of a qkv projection.

    Args:
        q: ``(B, Lq, H, D)``; k, v: ``(B, Lk, H, D)``. Strided views (e.g. slices of one
            packed qkv tensor) are accepted as they are.
        causal: top-left aligned causal mask (query i sees keys 0..i).
        scale: softmax scale; None means ``D ** -0.5``.
        backend: ``"auto"`` (our Triton kernel on CUDA for 16-bit inputs and for fp32 when TF32
            is allowed; PyTorch SDPA elsewhere and for exact fp32), ``"torch"`` (the math
            reference), ``"triton"``, ``"sdpa"``, ``"flash_attn"``, ``"xformers"``.

    Returns:
        ``(B, Lq, H, D)`` in the inputs' dtype (the autocast dtype inside an autocast region);
        contiguous from the Triton kernel.
    """
    sig, plan = _PLANS.lookup((backend, causal, scale, type(causal), type(scale), _tf32_state(q)), q, k, v)
    if plan is None:  # the first call of this signature (uvit_fast.ops._hot)
        plan = _PLANS.put(sig, _plan(q, k, v, causal, scale, backend))
    return plan(q, k, v, causal, scale)


def _tf32_state(q) -> bool:
    """Part of a signature: for float32 CUDA inputs, untimed ``auto`` depends on PyTorch's TF32
    setting (read only for those: it is a slow property)."""
    return q.dtype is torch.float32 and q.is_cuda and tf32_matmul_allowed()


def _plan(q, k, v, causal, scale, backend):
    """The checks, the backend and the decision of one call signature: the function that runs it,
    taking ``(q, k, v, causal, scale)``."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention: backend must be one of {ATTENTION_BACKENDS}; got {backend!r}")
    _check_attention(q, k, v, scale)
    choice = _select(backend, q)
    if choice == "measure" and torch.compiler.is_compiling():  # decided inside the graph, when it runs
        call = _DISPATCH.bind("attention", (q, k, v), **_key((q, k, v), causal))
        return lambda q, k, v, causal, scale: _attention_triton(q, k, v, causal, scale, call=call)
    if choice == "measure":
        choice = _measure("attention", (q, k, v), _attention_candidates(q, k, causal, scale), causal)
    if choice == "triton" and may_run_direct((q, k, v)):
        return functools.partial(_attention_triton, call=_ATTENTION_DIRECT)
    return _RUNNERS[choice]


def _attention_torch(q, k, v, causal, scale):
    return attention_reference(q, k, v, causal=causal, scale=scale)


_RUNNERS = {
    "sdpa": _sdpa,
    "flash_attn": lambda q, k, v, causal, scale: _flash_attn(*_autocast(q, k, v), causal, scale),
    "xformers": lambda q, k, v, causal, scale: _xformers(*_autocast(q, k, v), causal, scale),
    "torch": _attention_torch,
    "triton": _attention_triton,
}
_PLANS = Plans("attention")


def attention_qkvpacked(
    qkv: torch.Tensor, *, causal: bool = False, scale: Optional[float] = None, backend: str = "auto"
) -> torch.Tensor:
    """:func:`attention` on a packed ``(B, L, 3, H, D)`` tensor (no copies: q, k, v are views).

    With the Triton backend the backward writes one packed ``(B, L, 3, H, D)`` gradient (no
    per-slice zero-fill and sum); with flash-attn it calls ``flash_attn_qkvpacked_func``.
    """
    sig, plan = _PACKED_PLANS.lookup((backend, causal, scale, type(causal), type(scale), _tf32_state(qkv)), qkv)
    if plan is None:  # the first call of this signature (uvit_fast.ops._hot)
        plan = _PACKED_PLANS.put(sig, _packed_plan(qkv, causal, scale, backend))
    return plan(qkv, causal, scale)


def _packed_plan(qkv, causal, scale, backend):
    """The function that runs calls of this signature, taking ``(qkv, causal, scale)``."""
    check_tensor("attention_qkvpacked", "qkv", qkv, 5)
    if qkv.shape[2] != 3:
        raise ValueError(f"attention_qkvpacked: qkv must have shape (B, L, 3, H, D); got {tuple(qkv.shape)}")
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_qkvpacked: backend must be one of {ATTENTION_BACKENDS}; got {backend!r}")
    q, k, v = qkv.unbind(2)
    _check_attention(q, k, v, scale)
    choice = _select(backend, qkv)
    if choice == "measure" and torch.compiler.is_compiling():  # decided inside the graph, when it runs
        call = _PACKED_DISPATCH.bind("attention_qkvpacked", (qkv,), **_key((qkv,), causal, q))
        return lambda qkv, causal, scale: _packed_triton(qkv, causal, scale, call)
    if choice == "measure":
        candidates = {
            name: (lambda qkv, fn=fn: fn(*qkv.unbind(2))) for name, fn in _attention_candidates(q, k, causal, scale).items()
        }
        direct = _PACKED_DIRECT if may_run_direct((qkv,)) else None
        candidates["triton"] = lambda qkv: _packed_triton(qkv, causal, scale, direct)
        choice = _measure("attention_qkvpacked", (qkv,), candidates, causal, q)
    if choice == "triton":
        return functools.partial(_packed_triton, call=_PACKED_DIRECT) if may_run_direct((qkv,)) else _packed_triton
    if choice == "flash_attn":
        return _packed_flash_attn
    runner = _RUNNERS[choice]
    return lambda qkv, causal, scale: runner(*qkv.unbind(2), causal, scale)


def _packed_triton(qkv, causal, scale, call=None):
    (qkv,) = _autocast(qkv)
    _check_triton("attention_qkvpacked", qkv)
    out = (call or _attention_packed_fwd_op)(qkv, bool(causal), _resolve_scale(scale, qkv.shape[-1]))
    return out[0]


def _packed_flash_attn(qkv, causal, scale):
    (qkv,) = _autocast(qkv)
    fa = _flash_attn_module()
    _check_half(qkv)
    return fa.flash_attn_qkvpacked_func(qkv, softmax_scale=scale, causal=causal)


_PACKED_PLANS = Plans("attention_qkvpacked")


# ---------------------------------------------------------------------------------------------
# Under torch.compile with measured dispatch: the decision inside the graph (uvit_fast.ops._runtime)
# between SDPA (the baseline), the math reference (small score matrices) and the kernel. flash-attn
# and xformers are timed in eager calls only: their autograd Functions do not run under torch.func.
# ---------------------------------------------------------------------------------------------
def _compiled_candidates(q, k, causal, scale):
    names = [n for n in _attention_candidates(q, k, causal, scale) if n in ("sdpa", "torch")]
    fns = {
        "sdpa": lambda q, k, v, causal, scale: (_sdpa(q, k, v, causal, scale),),
        "torch": lambda q, k, v, causal, scale: (attention_reference(q, k, v, causal=causal, scale=scale),),
    }
    return {n: fns[n] for n in names}


def _packed_candidates(qkv, causal, scale):
    q, k, _ = qkv.unbind(2)
    return {
        name: (lambda qkv, causal, scale, fn=fn: fn(*qkv.unbind(2), causal, scale))
        for name, fn in _compiled_candidates(q, k, causal, scale).items()
    }


_DISPATCH = DispatchOp("attention", torch.ops.uvit_fast.attention_fwd, _attention_setup, _attention_backward,
                       n_diff=1, candidates=lambda q, k, v, causal, scale: _compiled_candidates(q, k, causal, scale))
_PACKED_DISPATCH = DispatchOp("attention_qkvpacked", torch.ops.uvit_fast.attention_qkvpacked_fwd, _packed_setup,
                              _packed_backward, n_diff=1, candidates=_packed_candidates)
