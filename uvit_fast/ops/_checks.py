"""Argument checks shared by the ops: every message names the op, the argument and the shapes."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch


def check_tensor(
    op: str,
    name: str,
    t: Optional[torch.Tensor],
    ndim: Union[int, Sequence[int], None] = None,
    *,
    floating: bool = True,
    optional: bool = False,
) -> None:
    if t is None:
        if optional:
            return
        raise TypeError(f"{op}: {name} is required; got None")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{op}: {name} must have a floating dtype; got {t.dtype}")
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in dims:
            want = " or ".join(str(d) for d in dims)
            raise ValueError(f"{op}: {name} must have {want} dims; got shape {tuple(t.shape)}")


def check_same_device(op: str, **tensors: Optional[torch.Tensor]) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        desc = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"{op}: all tensors must be on one device; got {desc}")


def shape_str(t: Optional[torch.Tensor]) -> str:
    return "None" if t is None else str(tuple(t.shape))


def as_tuple(op: str, name: str, value, n: int) -> Tuple[int, ...]:
    """An int or a sequence of ``n`` positive ints, as a tuple of ``n`` ints."""
    if isinstance(value, int) and not isinstance(value, bool):
        out = (value,) * n
    else:
        try:
            out = tuple(int(v) for v in value)
        except TypeError:
            raise TypeError(f"{op}: {name} must be an int or a sequence of {n} ints; got {value!r}") from None
        if len(out) != n:
            raise ValueError(f"{op}: {name} must have {n} entries; got {value!r}")
    if any(v <= 0 for v in out):
        raise ValueError(f"{op}: {name} must be positive; got {value!r}")
    return out
