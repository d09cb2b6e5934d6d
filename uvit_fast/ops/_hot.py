"""The hot path of an op call: a plan per call signature, so that a decided call does almost nothing.

Sampling a diffusion model calls each fused op a few hundred times per image at shapes where the
GPU needs microseconds, so the host decides the speed. An op's first call with a new *signature*
runs the full path: argument checks, backend resolution, the measured-dispatch decision (timing
the candidates if the key is new). It ends in a *plan*: the one function that runs this call (the
chosen candidate, taking the op's arguments as they are). The plan is stored under the signature,
and every later call with that signature looks it up and calls it: no checks, no environment
reads, no key strings, no locks.

A signature holds everything the slow path's outcome depends on:

- the op's non-tensor arguments (``backend``, eps, activation, ...), given by the op;
- for each tensor argument (``None`` kept as ``None``): its shape, dtype and device, and, when
  grad mode is on, whether it requires grad (a training call decides under another key);
- grad mode, and the autocast state (enabled device types and their dtypes) when any is on.

What lies outside the call (the ``use_backend`` stack, ``UVIT_FAST_BACKEND`` / ``UVIT_FAST_TUNE``,
``tune()`` running, the decision table being cleared or filled from a broadcast) changes only
through this package's own functions, and each of them calls :func:`invalidate`, which drops
every plan. The environment variables are read when a plan is made: after changing one in a
running process, call :func:`uvit_fast.refresh_settings` (tests do so after ``monkeypatch.setenv``).

Plans are never used while tracing (``torch.compiler.is_compiling()``: the op's own Python is what
the compiler traces), and never stored while a CUDA stream is capturing a graph (a key first seen
there runs its stored decision or PyTorch, untimed; see :mod:`uvit_fast.dispatch`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch

from uvit_fast.dispatch import is_training, stream_capturing

#: bumped by :func:`invalidate`; a table whose generation differs is emptied on its next lookup
_GENERATION = [0]

_is_grad_enabled = torch.is_grad_enabled
_is_compiling = torch.compiler.is_compiling
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)
_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps")


def invalidate() -> None:
    """Drop every op's plans: the next call of each signature takes the full path again."""
    _GENERATION[0] += 1


def _autocast_state() -> Optional[Tuple[Any, ...]]:
    if not _any_autocast():
        return None
    state = []
    for device_type in _AUTOCAST_DEVICES:
        try:
            if torch.is_autocast_enabled(device_type):
                state.append((device_type, torch.get_autocast_dtype(device_type)))
        except (RuntimeError, TypeError, ValueError):  # a device type this build does not know
            continue
    return tuple(state) or None


class Plans:
    """One op's plans: signature -> the function that runs a call of that signature.

    ``maxsize`` bounds the table (a workload whose shapes never repeat would grow it without end):
    when full it is emptied, and the next calls make their plans again."""

    __slots__ = ("op", "maxsize", "_table", "_generation")

    def __init__(self, op: str, maxsize: int = 4096):
        self.op = op
        self.maxsize = maxsize
        self._table: Dict[Tuple[Any, ...], Callable[..., Any]] = {}
        self._generation = _GENERATION[0]

    def lookup(self, statics: Any, *tensors: Optional[torch.Tensor]) -> Tuple[Any, Optional[Callable[..., Any]]]:
        """``(signature, plan)`` of a call (plan None on a miss); ``(None, None)`` while tracing,
        and where the arguments have no signature (not tensors, an unhashable value): the op's full
        path then runs, and its checks say what is wrong."""
        if _is_compiling():
            return None, None
        try:
            grad = _is_grad_enabled()
            # the generation first: a plan made across an invalidate() (another thread leaving a
            # use_backend block meanwhile) is stored under its old generation, which no lookup matches
            sig = [_GENERATION[0], statics, grad, _any_autocast() and _autocast_state()]
            append = sig.append
            if grad:
                for t in tensors:
                    append(None if t is None else (t.shape, t.dtype, t.device, t.requires_grad))
            else:
                for t in tensors:
                    append(None if t is None else (t.shape, t.dtype, t.device))
            key = tuple(sig)
            return key, self._current().get(key)
        except (AttributeError, TypeError):
            return None, None

    def _current(self) -> Dict[Tuple[Any, ...], Callable[..., Any]]:
        """The table, emptied first if :func:`invalidate` ran since it was filled."""
        if self._generation != _GENERATION[0]:
            self._table = {}
            self._generation = _GENERATION[0]
        return self._table

    def put(self, sig: Optional[Tuple[Any, ...]], plan: Callable[..., Any]) -> Callable[..., Any]:
        """Store ``plan`` under ``sig`` (not for ``sig=None``, nor while a stream is capturing: see
        the module docstring); returns it."""
        if sig is None or sig[0] != _GENERATION[0] or stream_capturing():
            return plan
        if len(self._current()) >= self.maxsize:
            self._table = {}
        self._table[sig] = plan
        return plan

    def __len__(self) -> int:
        return len(self._current())


_dispatch_depth = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)
_profiling = torch.autograd._profiler_enabled


_PLAIN = (torch.Tensor, torch.nn.Parameter, type(None), int, float, bool, str)


class Direct:
    """An inference call of a Triton custom op without the dispatcher: the op's own Python body
    (the kernel launcher) called directly.

    Calling a ``torch.library.custom_op`` with an autograd formula costs tens of microseconds of
    host time before its body runs (the dispatcher, the Python autograd wrapper, the fake-tensor
    bookkeeping): as much as the kernel itself at sampling shapes. Where nothing needs the op as an
    op, the body computes the same: plans use this for their inference signatures only (no tensor
    requiring grad under grad mode), and each call still goes through the op whenever something
    watches the dispatcher (a ``TorchDispatchMode`` such as ``FlopCounterMode`` or fake tensors, a
    functorch transform, the autograd profiler, whose trace then names the op), traces it
    (torch.compile, torch.export), or gets a tensor subclass with a dispatch of its own."""

    __slots__ = ("op", "body")

    def __init__(self, op: Any, body: Optional[Callable[..., Any]] = None):
        self.op = op
        self.body = body if body is not None else op._init_fn

    def __call__(self, *args: Any) -> Any:
        if _is_compiling() or _dispatch_depth() or _functorch_active() or _profiling():
            return self.op(*args)  # (a plan made while tracing may hold one: the graph gets the op)
        for a in args:  # a tensor subclass (DTensor, torchao's) dispatches through the op
            if type(a) not in _PLAIN and isinstance(a, torch.Tensor):
                return self.op(*args)
        return self.body(*args)


def inference(tensors) -> bool:
    """A call whose outputs need no autograd (not :func:`uvit_fast.dispatch.is_training`)."""
    return not is_training(tensors)
