"""Small helpers shared by the kernel launchers (no import of uvit_fast here)."""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import KernelInterface


def poison_enabled() -> bool:
    """``UVIT_FAST_POISON=1`` (set by the test suite) fills every kernel output with NaN
    before launch, so elements a kernel fails to write show up as failures. Read at import and by
    :func:`refresh_poison` (``uvit_fast.refresh_settings`` calls it), not at every launch."""
    return _POISON[0]


def refresh_poison() -> None:
    _POISON[0] = os.environ.get("UVIT_FAST_POISON", "0") == "1"


_POISON = [False]
refresh_poison()


def empty(*shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs, poisoned under ``UVIT_FAST_POISON=1``."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    if poison_enabled():
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t


def device_guard(t: torch.Tensor):
    """Context in which a kernel launch runs on ``t``'s device.

    Triton launches on the *current* CUDA device; with inputs on ``cuda:1`` while ``cuda:0`` is
    current every launch would fail. CUDA tensors: ``torch.cuda.device(t.device)``; anything else
    (CPU under the interpreter): no-op."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def on_inputs_device(launcher):
    """Decorator for every launcher: the body runs under :func:`device_guard` of its first tensor
    argument (looked up at call time, so tests can record the calls)."""
    @functools.wraps(launcher)
    def wrapped(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None:
            return launcher(*args, **kwargs)
        with device_guard(first):
            return launcher(*args, **kwargs)
    return wrapped


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


@triton.jit
def patch_row_offsets(offs_m, L, Gh, Gw, s_b, s_t, s_h, s_w,
                      PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
    """Offset (int64) of the first element of patch ``m = b*L + l`` in a ``(B, C, T, H, W)``
    tensor with strides ``s_*``, for a grid ``(L / (Gh*Gw), Gh, Gw)`` of ``(PT, PH, PW)`` patches.
    Shared by the patch-embedding gather and the decoder's unpatchify store."""
    b = offs_m // L
    l = offs_m % L
    tg = l // (Gh * Gw)
    r = l % (Gh * Gw)
    hh = r // Gw
    ww = r % Gw
    return (b.to(tl.int64) * s_b + tg.to(tl.int64) * (PT * s_t)
            + hh.to(tl.int64) * (PH * s_h) + ww.to(tl.int64) * (PW * s_w))


# Per-block shared memory, bytes, that a kernel's config may use (the GEMM kernels prune to it)
SMEM_LIMIT = 232448  # H100/H200 (227 KiB)
SMEM_LIMIT_SM80 = 166912  # A100 (163 KiB)
SMEM_LIMIT_OTHER = 101376  # sm_86 / sm_89 / sm_120 (99 KiB)


def capability(t: torch.Tensor):
    """``(major, minor)`` of ``t``'s CUDA GPU, None off CUDA (interpreter)."""
    return torch.cuda.get_device_capability(t.device) if t.device.type == "cuda" else None


def smem_limit(cap) -> int:
    """Per-block shared memory of a GPU of capability ``cap`` (the H100's when None)."""
    if cap is None or cap[0] in (9, 10):
        return SMEM_LIMIT
    if tuple(cap) in ((8, 0), (8, 7)):
        return SMEM_LIMIT_SM80
    return SMEM_LIMIT_OTHER


_SCALARS = (int, float, bool, str, type(None))


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        return a.dtype
    if isinstance(a, _SCALARS):
        return a
    base = getattr(a, "base", None)  # a TMA TensorDescriptor: its tensor's dtype
    return (type(a), base.dtype if isinstance(base, torch.Tensor) else None)


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``; for a ``triton.autotune``d kernel, the config it chose is
    remembered per *launch signature* (every scalar argument's value and every tensor's dtype: finer
    than the autotuner's own key, so it never reuses a config the autotuner would not), and later
    launches of that signature call the tuned function with it directly: no key building, cache
    lookup or pruning in the autotuner, only the config's pre-hook (TMA block shapes) and the launch.
    A launch runs on the host at every denoiser call, so this is host time per kernel. Where launches
    are intercepted (``uvit-fast kernels`` compiles instead of running), every launch goes through
    ``kernel[grid]``."""
    if not isinstance(kernel, Autotuner) or KernelInterface.__getitem__.__module__ != _TRITON_JIT:
        return kernel[grid](*args, **kwargs)  # not autotuned, or launches are intercepted
    chosen = kernel.__dict__.setdefault("_uvit_fast_chosen", {})
    sig = (*map(_arg_key, args), *sorted(kwargs.items()))
    hit = chosen.get(sig)
    if hit is None:
        ret = kernel[grid](*args, **kwargs)
        config = getattr(kernel, "best_config", None)
        if config is not None:
            chosen[sig] = (config, config.all_kwargs())
        return ret
    config, config_kwargs = hit
    if config.pre_hook is not None:
        config.pre_hook({**dict(zip(kernel.arg_names, args)), **kwargs, **config_kwargs})
    return kernel.fn.run(*args, grid=grid, warmup=False, **kwargs, **config_kwargs)


#: the module of triton's own ``KernelInterface.__getitem__``: another one means a tool (the kernel
#: report, the launch counter) intercepts launches, possibly patched before this module was imported
_TRITON_JIT = "triton.runtime.jit"
