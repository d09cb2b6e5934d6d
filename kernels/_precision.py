"""Precision settings shared by the launchers (no triton import here, so the ops modules can read
them without loading triton)."""
from __future__ import annotations

import torch


def tf32_matmul_allowed() -> bool:
    """Whether PyTorch lets fp32 matmuls use TF32. torch >= 2.9 has ``fp32_precision`` (the legacy
    setters update it too); reading the legacy ``allow_tf32`` after the new API set TF32 raises."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision in ("tf32", "ieee"):
        return precision == "tf32"
    return bool(torch.backends.cuda.matmul.allow_tf32)
