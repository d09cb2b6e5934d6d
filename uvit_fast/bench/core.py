"""The contract between benchmark cases and the runners (``uvit-fast bench`` and ``benchmarks/``).

Each op has a module ``uvit_fast.bench.<op>`` with ``cases(device, dtype) -> list[Case]``.
A case is one provider (eager, torch.compile, ours, an SDPA backend, ...) at one shape; it
carries the bytes it must move and the FLOPs it must do, so a runner can print GB/s or
TFLOP/s next to the time.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch


@dataclass
class Case:
    suite: str                       # "ops" or "models"
    op: str                          # e.g. "adaln_layer_norm"
    shape: str                       # readable shape label, e.g. "B=256 L=258 D=1152"
    pass_: str                       # "fwd", "bwd" or "fwd+bwd"
    provider: str                    # "eager", "compile", "uvit_fast", "uvit_fast_auto", "sdpa_flash", ...
    fn: Callable[[], Any]            # runs the work once
    bytes: Optional[int] = None      # minimum bytes moved (for GB/s)
    flops: Optional[int] = None      # FLOPs done, 2 per multiply-add (for TFLOP/s)
    needs_cuda: bool = False         # skipped (with the reason) on machines without CUDA
    skip_reason: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def time_fn(fn: Callable[[], Any], device: torch.device, *, warmup: int = 3, rep: int = 20) -> Dict[str, float]:
    """Median / p20 / p80 milliseconds. CUDA: ``triton.testing.do_bench`` (events, L2 flush);
    CPU: wall clock."""
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"ms": med, "ms_p20": p20, "ms_p80": p80}
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
    return {"ms": statistics.median(times), "ms_p20": q[1], "ms_p80": q[7]}


def uvit_backend(provider: str) -> str:
    """The ``backend=`` a ``uvit_fast*`` row calls the op with: ``uvit_fast`` forces the Triton kernel,
    ``uvit_fast_auto`` is ``auto`` (measured dispatch: the first call times the kernel against PyTorch
    and the timed calls run the faster; ``UVIT_FAST_TUNE=0`` makes it the Triton row again)."""
    return "auto" if provider == "uvit_fast_auto" else "triton"


def raise_recompile_limits() -> None:
    """Runners call this before timing: case modules often ``torch.compile`` one closure per shape: they share a code object, and
    after dynamo's default 8 recompiles the ``compile`` rows would silently run eager."""
    try:
        import torch._dynamo.config as cfg

        for name, value in (("recompile_limit", 4096), ("accumulated_recompile_limit", 65536),
                            ("cache_size_limit", 4096), ("accumulated_cache_size_limit", 65536)):
            if hasattr(cfg, name) and getattr(cfg, name) < value:
                setattr(cfg, name, value)
    except Exception:  # noqa: BLE001 - older / newer torch without these knobs
        pass
