"""Multi-head attention on ``(B, L, H, D)`` tensors, behind one call with several backends.

Causal masking is top-left aligned, as ``torch.nn.functional.scaled_dot_product_attention``'s
``is_causal``: query ``i`` sees keys ``0..i`` (every query sees at least one key).
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
import torch.nn.functional as F

from uvit_fast._backend import get_backend, load_kernel, resolve, triton_available
from uvit_fast.ops._checks import check_same_device, check_tensor

ATTENTION_BACKENDS = ("auto", "torch", "triton", "sdpa", "flash_attn", "xformers")
MAX_HEAD_DIM = 256


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

    Computed in the inputs' dtype with the softmax in float32; materialises ``(B, H, Lq, Lk)``.
    """
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    s = torch.einsum("blhd,bmhd->bhlm", q, k) * scale
    if causal:
        Lq, Lk = q.shape[1], k.shape[1]
        mask = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~mask, float("-inf"))
    p = s.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("bhlm,bmhd->blhd", p, v)


def _sdpa(q, k, v, causal, scale):
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, scale=scale
    )
    return out.transpose(1, 2)


def _flash_attn(q, k, v, causal, scale):
    try:
        fa = importlib.import_module("flash_attn")
    except ImportError:
        raise ValueError("attention: backend='flash_attn' needs the flash-attn package (pip install 'uvit-fast[flash]')") from None
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
        raise ValueError("attention: backend='xformers' needs the xformers package (pip install 'uvit-fast[xformers]')") from None
    bias = None
    if causal:
        bias = xops.LowerTriangularMask()
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)


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
        backend: ``"auto"`` (our Triton kernel on CUDA, PyTorch SDPA elsewhere), ``"torch"``
            (the math reference), ``"triton"``, ``"sdpa"``, ``"flash_attn"``, ``"xformers"``.

    Returns:
        ``(B, Lq, H, D)`` in the inputs' dtype.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention: backend must be one of {ATTENTION_BACKENDS}; got {backend!r}")
    _check_attention(q, k, v, scale)
    if backend == "sdpa":
        return _sdpa(q, k, v, causal, scale)
    if backend == "flash_attn":
        return _flash_attn(q, k, v, causal, scale)
    if backend == "xformers":
        return _xformers(q, k, v, causal, scale)
    if backend == "auto" and get_backend() == "auto":
        if q.is_cuda and triton_available():
            return _attention_triton(q, k, v, causal, scale)
        return _sdpa(q, k, v, causal, scale)
    if resolve(backend, "attention", q, k, v) == "torch":
        return attention_reference(q, k, v, causal=causal, scale=scale)
    return _attention_triton(q, k, v, causal, scale)


def _attention_triton(q, k, v, causal, scale):
    load_kernel("attention", "attention")
    raise NotImplementedError("attention: the Triton kernel is not implemented yet; use backend='torch' or 'sdpa'")


def attention_qkvpacked(
    qkv: torch.Tensor, *, causal: bool = False, scale: Optional[float] = None, backend: str = "auto"
) -> torch.Tensor:
    """:func:`attention` on a packed ``(B, L, 3, H, D)`` tensor (no copies: q, k, v are views)."""
    check_tensor("attention_qkvpacked", "qkv", qkv, 5)
    if qkv.shape[2] != 3:
        raise ValueError(f"attention_qkvpacked: qkv must have shape (B, L, 3, H, D); got {tuple(qkv.shape)}")
    return attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=causal, scale=scale, backend=backend)
