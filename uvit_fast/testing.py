"""Parity helpers shared by the tests and the GPU checks (the flash-attn rule).

A kernel's result passes when its error against a float64 reference is at most
``factor`` times the error of plain PyTorch in the same dtype, plus a small ``atol``.
"""
from __future__ import annotations

from typing import Optional, Set

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: absolute slack by dtype for :func:`assert_parity`
DEFAULT_ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def max_abs_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.detach().double() - ref.detach().double()).abs().max().item()


def assert_parity(
    out: torch.Tensor,
    baseline: torch.Tensor,
    ref64: torch.Tensor,
    *,
    factor: float = 2.0,
    atol: Optional[float] = None,
    name: str = "output",
) -> None:
    """``|out - ref64| <= factor * |baseline - ref64| + atol`` (max-abs), and no NaN/inf.

    ``baseline`` is plain PyTorch run in the same dtype as ``out``; ``ref64`` the float64 result.
    """
    if out.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}")
    if not torch.isfinite(out).all():
        raise AssertionError(f"{name}: non-finite values in the result")
    if atol is None:
        atol = DEFAULT_ATOL.get(out.dtype, 1e-5)
    err = max_abs_err(out, ref64)
    base = max_abs_err(baseline, ref64)
    if not err <= factor * base + atol:
        raise AssertionError(
            f"{name}: max abs error {err:.3e} > {factor} x PyTorch's {base:.3e} + atol {atol:.1e} ({out.dtype})"
        )


def randomize_(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with ``N(0, std^2)`` draws from a seeded generator, in place: models
    whose zero-initialised layers (adaLN-Zero, final layers) would otherwise hide wrong math."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that elements a kernel fails to write are caught."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)


class CustomOpRecorder(TorchDispatchMode):
    """Records the names of the ``uvit_fast::`` custom ops dispatched inside the block, to prove
    that a model really ran on the kernels (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.ops: Set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith("uvit_fast."):
            self.ops.add(str(func))
        return func(*args, **(kwargs or {}))


def assert_same_nonfinite(out: torch.Tensor, ref: torch.Tensor, *, name: str = "output") -> None:
    """``out`` is non-finite (NaN or +-inf) exactly where ``ref`` is: NaN/Inf inputs propagate as
    in the reference, and nowhere else."""
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    bad, ref_bad = ~torch.isfinite(out), ~torch.isfinite(ref)
    if not torch.equal(bad, ref_bad):
        extra = (bad & ~ref_bad).nonzero().tolist()[:5]
        missing = (ref_bad & ~bad).nonzero().tolist()[:5]
        raise AssertionError(
            f"{name}: non-finite where the reference is finite at {extra}, "
            f"finite where the reference is not at {missing} (first 5 of each)"
        )
