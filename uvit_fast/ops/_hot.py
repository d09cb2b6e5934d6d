"""The hot path of an op call: a plan per call signature, so that a decided call does almost nothing.

Sampling a diffusion model calls each fused op a few hundred times per image at shapes where the
GPU needs microseconds, so the host decides the speed. An op's first call with a new *signature*
runs the full path: argument checks, backend resolution, the measured-dispatch decision (timing
the candidates if the key is new). It ends in a *plan*: the one function that runs this call (the
chosen candidate, taking the op's arguments as they are). The plan is stored under the signature,
and every later call with that signature looks it up and calls it: no checks, no environment
reads, no key strings, no locks.

A signature holds everything the slow path's outcome depends on:

- the op's non-tensor arguments (``backend``, eps, activation, ...) and their types (``2.0`` and
  ``True`` equal ``2`` and ``1``, but the checks tell them apart), given by the op;
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
there runs its stored decision or PyTorch, untimed; see :mod:`uvit_fast.dispatch`), nor when a
decision the plan needed could not be timed (fake or meta tensors, a functorch transform:
:func:`uvit_fast.dispatch.timing_allowed`).
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from uvit_fast.dispatch import UNTIMED, is_training, stream_capturing

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


def _tensor_guard(tensors: Tuple[Optional[torch.Tensor], ...]) -> Optional[Tuple[Any, Any, Tuple[None, ...], Any]]:
    """``(take, gaps, nones, guard)`` for a call on ``tensors``: ``gaps(args) == nones`` says the
    ``None`` arguments are where they were (``gaps`` is None where there is none: then ``take`` is
    not needed), and ``guard.check(*take(args))`` that the others match
    (the ``TensorGuards`` that torch.compile's own guards use: type, dispatch keys, dtype, device,
    shape, strides, requires_grad). ``None`` where it cannot be built: no tensor at all, the same
    tensor passed twice (the guard rejects aliased arguments), a torch whose private guard API moved."""
    if _TensorGuards is None:
        return None
    present = tuple(i for i, t in enumerate(tensors) if t is not None)
    absent = tuple(i for i, t in enumerate(tensors) if t is None)
    if not present:
        return None
    try:
        take, gaps = _getter(present), _getter(absent)
        guard = _TensorGuards(*take(tensors), dynamic_dims_sizes=None, dynamic_dims_strides=None)
        if not guard.check(*take(tensors)) or gaps(tensors) != (None,) * len(absent):
            return None
    except Exception:  # noqa: BLE001  (private API: any failure only means no fast check)
        return None
    return take, gaps if absent else None, (None,) * len(absent), guard


def _getter(positions: Tuple[int, ...]) -> Callable[[Tuple[Any, ...]], Tuple[Any, ...]]:
    """``args -> tuple(args[i] for i in positions)``, in C (``itemgetter``) where it returns a tuple."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    if positions:
        i = positions[0]
        return lambda args: (args[i],)
    return lambda args: ()


try:
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover (every torch this package supports has it)
    _TensorGuards = None
#: how many signatures per op get the guard check before the dict lookup
RECENT = 8


class Plans:
    """One op's plans: signature -> the function that runs a call of that signature.

    Two levels. The last :data:`RECENT` signatures stored with autocast off each keep a C-level
    tensor guard (:func:`_tensor_guard`): a call whose non-tensor arguments and grad mode equal an
    entry's is checked against it (about a microsecond for four tensors) and runs its plan. The
    guard compares each tensor's dispatch keys under the thread's current state, which include
    autocast being on for the tensor's device type: a call under autocast fails it. Any other call builds the full signature (a tuple of shapes, dtypes and devices: a few
    microseconds) and looks it up in the table. The guard is stricter than the signature (it also
    compares strides and dispatch keys), so whatever it accepts the signature would too; what it
    rejects takes the table.

    ``maxsize`` bounds the table (a workload whose shapes never repeat would grow it without end):
    when full it is emptied, and the next calls make their plans again."""

    __slots__ = ("op", "maxsize", "_table", "_recent", "_generation")

    def __init__(self, op: str, maxsize: int = 4096):
        self.op = op
        self.maxsize = maxsize
        self._table: Dict[Tuple[Any, ...], Callable[..., Any]] = {}
        self._recent: Tuple[Tuple[Any, ...], ...] = ()
        self._generation = _GENERATION[0]

    def lookup(self, statics: Any, *tensors: Optional[torch.Tensor]) -> Tuple[Any, Optional[Callable[..., Any]]]:
        """``(signature, plan)`` of a call (plan None on a miss); ``(None, None)`` while tracing,
        and where the arguments have no signature (not tensors, an unhashable value): the op's full
        path then runs, and its checks say what is wrong."""
        if _is_compiling():
            return None, None
        grad = _is_grad_enabled()
        if self._recent:  # (entries are made with autocast off: the guard's dispatch keys then say so)
            generation = _GENERATION[0]
            for entry_generation, entry_statics, entry_grad, take, gaps, nones, guard, plan in self._recent:
                try:
                    if (entry_generation == generation and entry_grad is grad and entry_statics == statics
                            and (guard.check(*tensors) if gaps is None
                                 else gaps(tensors) == nones and guard.check(*take(tensors)))):
                        return _HIT, plan
                except Exception:  # noqa: BLE001  (a tensor among the statics, another arity: no match)
                    continue
        try:
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
            return (key, tensors, UNTIMED[0]), self._current().get(key)
        except (AttributeError, TypeError):
            return None, None

    def _current(self) -> Dict[Tuple[Any, ...], Callable[..., Any]]:
        """The table, emptied first if :func:`invalidate` ran since it was filled."""
        if self._generation != _GENERATION[0]:
            self._table = {}
            self._recent = ()
            self._generation = _GENERATION[0]
        return self._table

    def put(self, sig: Optional[Tuple[Any, ...]], plan: Callable[..., Any]) -> Callable[..., Any]:
        """Store ``plan`` under ``sig`` (not for ``sig=None``, nor while a stream is capturing: see
        the module docstring); returns it."""
        if sig is None or sig is _HIT:
            return plan
        key, tensors, untimed = sig
        # not stored: across an invalidate(), while capturing, or when a decision it needed could
        # not be timed (fake tensors, functorch: uvit_fast.dispatch.timing_allowed) and
        # PyTorch ran undecided in its place
        if key[0] != _GENERATION[0] or untimed != UNTIMED[0] or stream_capturing():
            return plan
        table = self._current()
        if len(table) >= self.maxsize:
            table.clear()
            self._recent = ()
        table[key] = plan
        if not key[3]:  # no autocast: the guard checks no autocast state
            guarded = _tensor_guard(tensors)
            if guarded is not None:
                # each entry keeps its generation: one stored across an invalidate() in another
                # thread never matches (the dict's keys hold theirs the same way)
                self._recent = ((key[0], key[1], key[2], *guarded, plan),) + self._recent[:RECENT - 1]
        return plan

    def __len__(self) -> int:
        return len(self._current())


#: the signature of a call the guards matched (nothing to store)
_HIT = ("hit",)


_dispatch_depth = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 1)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)
_profiling = torch.autograd._profiler_enabled
_jit_tracing = torch._C._get_tracing_state


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
    (torch.compile, torch.export, torch.jit.trace), or gets a tensor subclass with a dispatch of its own."""

    __slots__ = ("op", "body")

    def __init__(self, op: Any, body: Optional[Callable[..., Any]] = None):
        self.op = op
        self.body = body if body is not None else op._init_fn

    def __call__(self, *args: Any) -> Any:
        if _is_compiling() or _dispatch_depth() or _functorch_active() or _profiling() or _jit_tracing():
            return self.op(*args)  # (a plan made while tracing may hold one: the graph gets the op)
        for a in args:  # a tensor subclass (DTensor, torchao's) dispatches through the op
            if type(a) not in _PLAIN and isinstance(a, torch.Tensor):
                return self.op(*args)
        return self.body(*args)


def types_of(value: Any) -> Any:
    """The type of a non-tensor argument for a signature (a tuple's: its items' types): ``2.0``,
    ``True`` and ``np.int64(2)`` equal ``2`` and hash alike, but the op's checks tell them apart."""
    return tuple(map(type, value)) if type(value) is tuple else type(value)


def may_run_direct(tensors) -> bool:
    """Whether a Triton plan of this signature may call the op's body directly (:class:`Direct`):
    no output needs autograd (not :func:`uvit_fast.dispatch.is_training`) and no tensor is on the
    meta device (the body launches a kernel; the op runs its fake implementation there)."""
    return not is_training(tensors) and not any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors)
