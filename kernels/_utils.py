"""Small helpers shared by the kernel launchers (no import of uvit_fast here)."""
from __future__ import annotations

import os

import torch
import triton


def poison_enabled() -> bool:
    """``UVIT_FAST_POISON=1`` (set by the test suite) fills every kernel output with NaN
    before launch, so elements a kernel fails to write show up as failures."""
    return os.environ.get("UVIT_FAST_POISON", "0") == "1"


def empty(*shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs, poisoned under ``UVIT_FAST_POISON=1``."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    if poison_enabled():
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t


def row_launch_config(n_cols: int, elem_size: int = 4):
    """Liger-style row-wise heuristic: one program per row, block = next power of two of the
    width, warps by width. Returns ``(BLOCK, num_warps)``."""
    block = triton.next_power_of_2(n_cols)
    if block * elem_size > 65536 * 4:
        raise ValueError(f"row width {n_cols} is too large for a single-block row kernel")
    num_warps = 4
    if block >= 32768:
        num_warps = 32
    elif block >= 8192:
        num_warps = 16
    elif block >= 2048:
        num_warps = 8
    return block, num_warps
