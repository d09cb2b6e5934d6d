"""How the ops follow ``torch.autocast``: custom ops are not autocast-aware, so each Python
wrapper casts its inputs first, the way autocast casts the PyTorch ops they replace."""
from __future__ import annotations

from typing import Optional, Union

import torch


def autocast_dtype(device: Union[torch.device, str]) -> Optional[torch.dtype]:
    """The dtype autocast runs matmuls / convs in on ``device`` while it is enabled, else None.
    Device types autocast does not know (``meta``, used for FLOP counting) give None."""
    device_type = device if isinstance(device, str) else device.type
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError, ValueError):
        return None
    return None


def autocast_cast(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """Cast as autocast casts a matmul argument: floating tensors other than float64 go to ``dtype``."""
    if t is None or dtype is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def matmul_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a linear / conv / matmul on ``t`` (with weights of its dtype) returns: the autocast
    dtype inside an autocast region on ``t``'s device (float64 excepted), else ``t``'s own dtype."""
    dtype = autocast_dtype(t.device)
    if dtype is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t.dtype
    return dtype
