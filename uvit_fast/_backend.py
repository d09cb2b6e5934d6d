"""Backend selection shared by every op in :mod:`uvit_fast.ops`.

Each op takes ``backend="auto" | "torch" | "triton"`` (attention takes a few more).
``"auto"`` first looks at the process-wide default, which is set by
:func:`use_backend` (innermost wins) or else by the environment variable
``UVIT_FAST_BACKEND``; when that default is itself ``"auto"``, CUDA tensors go to
the Triton kernel and CPU tensors to plain PyTorch, unless measured dispatch is on
(``UVIT_FAST_TUNE``, on by default for CUDA; see :mod:`uvit_fast.dispatch`): then each op
times its PyTorch and Triton paths once per shape key and runs the faster.

``"triton"`` on CPU tensors only works under the Triton interpreter
(``TRITON_INTERPRET=1`` set before ``triton`` is imported); otherwise a
:class:`BackendError` says so.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import threading
from typing import Iterator, List, Optional, Tuple

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "UVIT_FAST_BACKEND"

# process-wide, not per thread: autograd runs backward (and checkpoint recomputation) on its own
# threads, which must see the same choice as the forward
_overrides: List[Tuple[object, str]] = []
_lock = threading.Lock()


class BackendError(ValueError):
    """A backend was asked for that cannot run these tensors."""


def _check_name(name: str, allowed=BACKENDS, what: str = "backend") -> str:
    if not isinstance(name, str) or name not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, allowed))}; got {name!r}")
    return name


def _env_default() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    return _check_name(value, what=f"environment variable {ENV_VAR}")


def get_backend() -> str:
    """The process-wide default that ``backend="auto"`` resolves through."""
    with _lock:
        if _overrides:
            return _overrides[-1][1]
    return _env_default()


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every op with ``backend="auto"`` on ``name`` while the block runs (process-wide:
    every thread, autograd's backward threads included, sees it; the innermost block wins).

    >>> with uvit_fast.use_backend("triton"):   # e.g. under TRITON_INTERPRET=1 on CPU
    ...     out = model(x, t, y)
    """
    _check_name(name)
    token = object()
    with _lock:
        _overrides.append((token, name))
    refresh_settings()
    try:
        yield
    finally:
        with _lock:
            _overrides[:] = [entry for entry in _overrides if entry[0] is not token]
        refresh_settings()


def refresh_settings() -> None:
    """Make the next op calls read the process-wide settings again.

    An op's first call with a new signature resolves its backend (``use_backend``,
    ``UVIT_FAST_BACKEND``, ``UVIT_FAST_TUNE``, ``TRITON_INTERPRET``) and its measured-dispatch
    decision, and later calls of that signature reuse the outcome without reading them
    (:mod:`uvit_fast.ops._hot`). ``use_backend``, ``tune()`` and the decision table refresh by
    themselves; call this after changing one of those environment variables in a running process
    (or ``UVIT_FAST_POISON``, which the kernel launchers read)."""
    from uvit_fast.ops import _hot

    _hot.invalidate()
    if "uvit_fast.kernels._utils" in sys.modules:  # imported with the first launch
        sys.modules["uvit_fast.kernels._utils"].refresh_poison()


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


def resolve(backend: str, op: str, *tensors: Optional[torch.Tensor]) -> str:
    """Turn a user's ``backend`` argument into ``"torch"``, ``"triton"`` or ``"measure"`` for ``op``.

    ``"measure"`` (``backend="auto"``, the process-wide default ``"auto"`` and :func:`measuring`):
    the op times both paths once per key through :func:`uvit_fast.dispatch.measure`. Under
    torch.compile the answer is a trace-time constant, and a ``"measure"`` traces the op's run-time
    dispatch op (:mod:`uvit_fast.ops._runtime`), which decides when the graph runs.

    ``tensors`` are the op's inputs (``None`` entries are ignored); they must share
    one device.
    """
    _check_name(backend)
    present = [t for t in tensors if t is not None]
    devices = {t.device for t in present}
    if len(devices) > 1:
        raise ValueError(
            f"{op}: all tensors must be on one device; got {sorted(str(d) for d in devices)}"
        )
    device = present[0].device if present else torch.device("cpu")
    # under torch.compile the choice is a trace-time constant: dynamo cannot trace the import check
    return _resolve_constant(backend, op, device.type)


def measuring(device_type: str) -> bool:
    """Whether ``auto`` times the candidates (``uvit_fast.dispatch``) on ``device_type``: timing is
    on (``UVIT_FAST_TUNE``, or ``tune()`` running) and the Triton kernel can run there (CUDA, or CPU
    under the interpreter)."""
    from uvit_fast import dispatch

    if not dispatch.tuning_requested(device_type) or not triton_available():
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and interpreter_enabled() and not compiled_before_interpreter()


def _resolve_device(backend: str, op: str, device_type: str) -> str:
    choice = backend if backend != "auto" else get_backend()
    if choice == "auto":
        return "triton" if device_type == "cuda" and triton_available() else "torch"
    if choice == "triton":
        check_triton_device(op, torch.device(device_type))
    return choice


@torch.compiler.assume_constant_result
def _resolve_constant(backend: str, op: str, device_type: str) -> str:
    if backend == "auto" and get_backend() == "auto" and measuring(device_type):
        return "measure"  # under compile: the run-time dispatch op decides when the graph runs
    return _resolve_device(backend, op, device_type)


def check_triton_device(op: str, device: torch.device) -> None:
    if not triton_available():
        raise BackendError(f"{op}: backend='triton' needs the 'triton' package, which is not importable")
    if device.type in ("cuda", "meta"):
        # meta: the custom ops run their fake implementations (shapes only, no launch), which
        # is how the profiler counts the fused path's saved tensors and traffic
        return
    if device.type == "cpu" and interpreter_enabled():
        compiled = compiled_before_interpreter()
        if compiled:
            raise BackendError(
                f"{op}: TRITON_INTERPRET=1 was set after triton (and uvit_fast's kernels) had been imported, so "
                f"their kernels were built for the GPU ({', '.join(compiled)}) and cannot run on CPU tensors; set "
                "TRITON_INTERPRET=1 before importing uvit_fast or triton (e.g. `TRITON_INTERPRET=1 python "
                "script.py`, or os.environ at the very top of the script)"
            )
        return
    raise BackendError(
        f"{op}: backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 "
        f"set before triton is imported; got tensors on {device}"
    )


def compiled_before_interpreter() -> List[str]:
    """Modules whose ``@triton.jit`` functions were built without the interpreter (``triton``'s
    own ``triton.language.standard``, ``uvit_fast.kernels.*``), though ``TRITON_INTERPRET=1`` is
    set now: the interpreter is chosen when a function is decorated, at import time, and an
    interpreted kernel that calls a GPU-built one fails deep inside with an InterpreterError."""
    if "triton" not in sys.modules:
        return []
    # (a scan of sys.modules: it runs when an op first sees a call signature, not at every call)
    names = ("triton.language.standard",) + tuple(sorted(n for n in list(sys.modules) if n.startswith("uvit_fast.kernels.")))
    return list(_gpu_built(names))


@functools.lru_cache(maxsize=64)
def _gpu_built(names: Tuple[str, ...]) -> Tuple[str, ...]:
    from triton.runtime.jit import JITFunction

    out = []
    for name in names:
        module = sys.modules.get(name)
        if module is None:
            continue
        for value in list(vars(module).values()):
            fn = getattr(value, "fn", value)  # an Autotuner / Heuristics wraps the jitted function
            if isinstance(value, JITFunction) or isinstance(fn, JITFunction):
                out.append(name)
                break
    return tuple(out)


def load_kernel(op: str, module: str):
    """Import ``uvit_fast.kernels.<module>``; a missing kernel is a NotImplementedError naming the op."""
    try:
        return importlib.import_module(f"uvit_fast.kernels.{module}")
    except ModuleNotFoundError as exc:
        if exc.name in (f"uvit_fast.kernels.{module}",):
            raise NotImplementedError(
                f"{op}: the Triton kernel is not implemented yet; use backend='torch'"
            ) from None
        raise
