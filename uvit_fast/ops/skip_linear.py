"""U-ViT's long-skip ``Linear(cat([h, skip], -1))`` without materialising the concat."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from uvit_fast._backend import load_kernel, resolve
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
    if h.dtype != skip.dtype:
        raise TypeError(f"{op}: h and skip must have the same dtype; got {h.dtype} and {skip.dtype}")
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
        h: the block input ``(..., D)`` (usually ``(B, L, D)``).
        skip: the matching in-block output, same shape as ``h``.
        weight: ``(N, 2*D)``: upstream's ``skip_linear.weight`` (``N = D``), unchanged;
            ``W1 = weight[:, :D]``, ``W2 = weight[:, D:]``.
        bias: ``(N,)`` or None.

    Returns:
        ``(..., N)``. Dtype as ``nn.Linear`` (under autocast, the autocast dtype).
    """
    _check_skip_concat_linear(h, skip, weight, bias)
    if resolve(backend, "skip_concat_linear", h, skip, weight, bias) == "torch":
        return skip_concat_linear_reference(h, skip, weight, bias)
    return _skip_concat_linear_triton(h, skip, weight, bias)


def _skip_concat_linear_triton(h, skip, weight, bias):
    load_kernel("skip_concat_linear", "skip_concat_linear")
    raise NotImplementedError("skip_concat_linear: the Triton kernel is not implemented yet; use backend='torch'")
