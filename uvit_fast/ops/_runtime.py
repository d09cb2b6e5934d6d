"""Measured dispatch under ``torch.compile``: the decision is taken inside a custom op, at run time.

In eager mode an op wrapper asks :func:`uvit_fast.dispatch.measure` which path to run and then runs
it. Under ``torch.compile`` that Python runs once, while tracing, on fake tensors: a decision taken
there would be frozen into the graph. So when ``auto`` measures and the wrapper is being traced,
it calls a *dispatch op* instead: one more ``torch.library`` custom op per fused op,
``uvit_fast::<op>_dispatch``, with the Triton op's arguments plus the key's parts (the op's name
with its flags, inference or training, the row count and the exact dims, as ``SymInt``s so that
they are real numbers when the graph runs). Its body runs eagerly each time the compiled graph
runs: it builds the key, takes the decision (stored, or timed now, exactly as an eager call would)
and runs the chosen candidate. The graph itself contains only the dispatch op.

The backward is a second op, ``uvit_fast::<op>_dispatch_backward``, that runs the same candidate's
backward:

* ``triton``: the Triton op's own autograd formula, on the tensors its ``setup_context`` saves
  (every dispatch op returns the Triton op's outputs, statistics included, so they are there);
* any PyTorch candidate: ``torch.func.vjp`` of that candidate's forward on the saved inputs (the
  op is opaque to the compiler, so PyTorch's backward recomputes its forward: what runs is
  forward + forward + backward, and a training decision under compile times exactly that, under
  its own key, tagged ``compiled``; inference keys are shared with eager calls and ``tune()``).

A training key's first run-time decision is pinned for the process, so that a backward always
runs the candidate its forward ran, even if the decision table changes in between
(``dispatcher().clear()``, a ``tune()`` broadcast).

Every output is returned with the strides of the Triton op's fake implementation (contiguous),
which is what the compiled graph was planned with.
"""
from __future__ import annotations

import dataclasses
import re
import threading
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from uvit_fast import dispatch

#: candidate name -> function of the Triton op's arguments returning its differentiable outputs
Candidates = Mapping[str, Callable[..., Tuple[torch.Tensor, ...]]]

_PINNED: Dict[str, str] = {}
_PIN_LOCK = threading.Lock()


class Ctx:
    """What a custom op's ``setup_context`` / backward formula uses of autograd's ``ctx``, for calling
    them outside autograd: ``saved`` and ``attrs`` rebuild a ``ctx`` a formula reads directly."""

    def __init__(self, needs_input_grad: Sequence[bool], saved: Tuple[Any, ...] = (), **attrs: Any):
        self.needs_input_grad = tuple(needs_input_grad)
        self.saved_tensors: Tuple[Any, ...] = tuple(saved)
        self.__dict__.update(attrs)

    def save_for_backward(self, *tensors: Any) -> None:
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors: Any) -> None:
        pass

    def set_materialize_grads(self, value: bool) -> None:
        pass


def _split_schema(schema: str) -> Tuple[str, str]:
    """``"ns::name(ARGS) -> RETURNS"`` -> ``(ARGS, RETURNS)``."""
    match = re.match(r"^[\w:.]+\((.*)\) -> (.*)$", schema)
    if match is None:
        raise ValueError(f"cannot read the schema {schema!r}")
    return match.group(1), match.group(2)


def _in_fresh_thread(fn: Callable[[], Any], device: torch.device) -> Any:
    """``fn()`` on a new thread, waiting for it. Dispatch state is thread-local, and the body of a
    custom op in a compiled graph runs with functorch's and autograd's dispatch keys excluded, so
    ``torch.func.vjp`` (what a PyTorch candidate's backward is timed with) cannot run there; a new
    thread starts from the defaults (grad mode on, no autocast) on the same device."""
    result: List[Any] = []
    error: List[BaseException] = []

    def run() -> None:
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - raised again on the caller's thread
            error.append(exc)

    worker = threading.Thread(target=run, name="uvit_fast-dispatch-timing")
    worker.start()
    worker.join()
    if error:
        raise error[0]
    return result[0]


def _as_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _storages(tensors: Sequence[Any]) -> set:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor) and t.numel() > 0}


def _own(outputs: Sequence[Optional[torch.Tensor]], inputs: Sequence[Any]) -> List[Optional[torch.Tensor]]:
    """``outputs`` contiguous (the fake's strides) and not aliasing ``inputs`` or each other, as a
    custom op's outputs must be (a PyTorch candidate's gradient may be its incoming gradient)."""
    seen = _storages(inputs)
    out: List[Optional[torch.Tensor]] = []
    for t in outputs:
        if t is not None:
            t = _as_contiguous(t)
            if t.numel() > 0 and t.untyped_storage().data_ptr() in seen:
                t = t.clone()
            seen |= _storages([t])
        out.append(t)
    return out


def _key_parts(parts: Sequence[Any]) -> Tuple[Any, ...]:
    """``(key_op, training, rows, dims, dtypes, grads)`` from a dispatch op's trailing arguments,
    ``dtypes`` and ``grads`` defaulting to ``""`` (a direct call without them, as opcheck's: the key
    takes the op's tensors' dtypes, and a training key times the gradient of every floating input)."""
    return (*parts, *[""] * (6 - len(parts)))


class DispatchOp:
    """The run-time dispatch op of one fused op (see the module docstring).

    Args:
        name: the fused op's name (``"skip_concat_linear"``); the ops are ``uvit_fast::<name>_dispatch``
            and ``uvit_fast::<name>_dispatch_backward``.
        triton_op: the Triton path's custom op (``torch.ops.uvit_fast.<op>``), with its autograd.
        setup_context, backward: the functions registered as the Triton op's autograd.
        n_diff: how many leading outputs of the Triton op are differentiable (the rest are
            statistics the backward reads, e.g. LayerNorm's mean and rstd).
        candidates: the PyTorch candidates, as a function of the Triton op's arguments returning
            ``{name: fn}``; each ``fn(*args)`` returns the ``n_diff`` differentiable outputs (the
            first candidate is the baseline that wins ties). ``"triton"`` is added last.
    """

    def __init__(
        self,
        name: str,
        triton_op: Any,
        setup_context: Callable[..., None],
        backward: Callable[..., Tuple[Optional[torch.Tensor], ...]],
        n_diff: int,
        candidates: Callable[..., Candidates],
    ):
        self.name = name
        self.triton_op = triton_op
        self.setup_context = setup_context
        self.backward = backward
        self.n_diff = n_diff
        self.candidates = candidates
        schema = triton_op.default._schema
        self.arg_types = [str(a.type) for a in schema.arguments]
        self.tensor_args = [i for i, t in enumerate(self.arg_types) if t.startswith("Tensor") or t.startswith("Optional[Tensor]")]
        args, returns = _split_schema(str(schema))
        self.n_args = len(schema.arguments)
        self.n_out = len(schema.returns)
        key_args = "str key_op, bool training, SymInt rows, SymInt[] dims, str dtypes"
        key_defaults = key_args + '=""'  # callers without the dtypes (opcheck) key by the op's tensors
        self.forward_op = torch.library.custom_op(
            f"uvit_fast::{name}_dispatch", self._forward_body, mutates_args=(), schema=f"({args}, {key_defaults}, str grads=\"\") -> {returns}"
        )
        self.backward_op = torch.library.custom_op(
            f"uvit_fast::{name}_dispatch_backward",
            self._backward_body,
            mutates_args=(),
            schema=f"(Tensor?[] grads, Tensor[] outputs, {args}, {key_args}, bool[] needs) -> Tensor[]",
        )
        self.forward_op.register_fake(self._forward_fake)
        self.backward_op.register_fake(self._backward_fake)
        self.forward_op.register_autograd(self._autograd_backward, setup_context=self._autograd_setup)

    # -- calling ------------------------------------------------------------------------------
    def __call__(self, *args: Any, key_op: str, training: bool, rows: Any, dims: Sequence[Any],
                 dtypes: str = "") -> Any:
        """Run the op with the Triton op's arguments ``args``; the decision is taken when it runs.
        ``dtypes``: the key's dtypes, comma-separated (the caller's tensors', as an eager call's key
        has them; empty: those of ``args``). Which ``args`` require grad (known while tracing) is
        passed too: a training decision times the backward of exactly those, as the graph runs it."""
        grads = "".join("1" if isinstance(a, torch.Tensor) and a.requires_grad else "0" for a in args)
        return self.forward_op(*args, key_op, bool(training), rows, list(dims), dtypes, grads)

    def bind(self, op: str, inputs: Sequence[Any], *, rows: Any, dims: Sequence[Any], flags: str = "") -> Callable[..., Any]:
        """A stand-in for the Triton op, called while tracing in place of ``measure``: ``op``,
        ``flags``, ``rows`` and ``dims`` as :func:`uvit_fast.dispatch.measure` takes them, ``inputs``
        the op's tensors as the user passed them (a training call: grad on and one requiring grad)."""
        device = next(t for t in inputs if isinstance(t, torch.Tensor)).device
        training = dispatch.is_training(inputs)
        key_op = dispatch.key_name(op, flags, device.type, compiled_training=training)
        # the key's dtypes are the user's tensors' (before autocast's casts), as in an eager call's
        # key, so that inference decisions are shared with eager calls and tune()
        dtypes = ",".join(dispatch.dtype_names(inputs))
        return lambda *args: self(*args, key_op=key_op, training=training, rows=rows, dims=dims, dtypes=dtypes)

    # -- the decision -------------------------------------------------------------------------
    def _key(self, args: Sequence[Any], key_op: str, training: bool, rows: int, dims: Sequence[int],
             dtypes: str):
        tensors = [args[i] for i in self.tensor_args if args[i] is not None]
        key = dispatch.make_key(key_op, tensors, training=training, rows=rows, dims=dims)
        return dataclasses.replace(key, dtypes=tuple(dtypes.split(","))) if dtypes else key

    def _names(self, args: Sequence[Any]) -> List[str]:
        return [*self.candidates(*args), "triton"]

    def _decide(self, args: Sequence[Any], key_op: str, training: bool, rows: int, dims: Sequence[int],
                dtypes: str, grads: str = "") -> str:
        key = self._key(args, key_op, training, rows, dims, dtypes)
        skey = str(key)
        with _PIN_LOCK:
            pinned = _PINNED.get(skey)
        if pinned is None:
            names = self._names(args)
            decision = dispatch.dispatcher().lookup(key)
            if decision is None and not dispatch.timing_allowed([a for a in args if isinstance(a, torch.Tensor)]):
                # nothing is timed while a CUDA graph is captured (torch.compile's cudagraph trees
                # capture this op's body), nor on fake tensors: PyTorch runs, and the key stays
                # undecided (a training key is pinned to it, so that its backward runs the same candidate)
                choice = names[0]
            else:
                if decision is None:
                    bound = {n: self._timed(n, args, training, grads) for n in names}
                    device = self._device(args)
                    timer = dispatch.decision_timer(device.type, training)
                    decision = _in_fresh_thread(lambda: dispatch.dispatcher().decide(key, bound, timer), device)
                choice = decision.choice if decision.choice in names else names[0]
            if training:
                with _PIN_LOCK:
                    choice = _PINNED.setdefault(skey, choice)
        else:
            choice = pinned
        dispatch.record_key(skey)
        return choice

    def _device(self, args: Sequence[Any]) -> torch.device:
        return next(args[i] for i in self.tensor_args if args[i] is not None).device

    def _timed(self, name: str, args: Sequence[Any], training: bool, grads_of: str = "") -> Callable[[], Any]:
        """What the timer runs for candidate ``name``: the forward this op runs, and for training
        also the backward its backward op runs (against a fixed random gradient), for the inputs
        marked ``"1"`` in ``grads_of`` (all floating inputs when it is empty)."""
        needs = [i in self.tensor_args and args[i] is not None and args[i].is_floating_point() for i in range(self.n_args)]
        if grads_of:
            needs = [n and grads_of[i] == "1" for i, n in enumerate(needs)]
        if not training or not any(needs):
            return lambda: self._run_forward(name, args)
        grads: List[torch.Tensor] = []

        def run() -> Any:
            outputs = self._run_forward(name, args)
            if not grads:
                gen = torch.Generator(device=outputs[0].device).manual_seed(0)
                grads.extend(torch.randn(o.shape, dtype=o.dtype, device=o.device, generator=gen) for o in outputs[: self.n_diff])
            return self._run_backward(name, list(grads), list(outputs), args, needs)
        return run

    # -- forward ------------------------------------------------------------------------------
    def _run_forward(self, name: str, args: Sequence[Any]) -> Tuple[torch.Tensor, ...]:
        if name == "triton":
            out = self.triton_op(*args)
            return tuple(out) if self.n_out > 1 else (out,)
        device = self._device(args)
        with torch.autocast(device.type, enabled=False), torch.no_grad():
            diff = self.candidates(*args)[name](*args)
        # the statistics only the Triton backward reads: uninitialised, with the fake's shapes
        fake = self._fake_outputs(args)
        return tuple(_as_contiguous(o) for o in diff) + tuple(
            torch.empty(f.shape, dtype=f.dtype, device=device) for f in fake[self.n_diff:]
        )

    def _fake_outputs(self, args: Sequence[Any]) -> Tuple[torch.Tensor, ...]:
        meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
        out = self.triton_op(*meta)
        return tuple(out) if self.n_out > 1 else (out,)

    def _forward_body(self, *all_args: Any) -> Any:
        args, (key_op, training, rows, dims, dtypes, grads) = all_args[: self.n_args], _key_parts(all_args[self.n_args:])
        choice = self._decide(args, key_op, training, rows, dims, dtypes, grads)
        outputs = tuple(_own(self._run_forward(choice, args), args))
        return outputs if self.n_out > 1 else outputs[0]

    def _forward_fake(self, *all_args: Any) -> Any:
        return self.triton_op(*all_args[: self.n_args])

    # -- backward -----------------------------------------------------------------------------
    def _run_backward(
        self, name: str, grads: List[Optional[torch.Tensor]], outputs: List[torch.Tensor], args: Sequence[Any],
        needs: Sequence[bool],
    ) -> List[Optional[torch.Tensor]]:
        """Gradients of the Triton op's arguments (None where not needed or not a tensor)."""
        grads = list(grads) + [None] * (self.n_out - len(grads))
        grads = [torch.zeros_like(o) if g is None and i < self.n_diff else g for i, (g, o) in enumerate(zip(grads, outputs))]
        if name == "triton":
            ctx = Ctx(needs)
            self.setup_context(ctx, tuple(args), tuple(outputs) if self.n_out > 1 else outputs[0])
            result = self.backward(ctx, *grads[: self.n_out])
            result = result if isinstance(result, (tuple, list)) else (result,)
            return [g if needs[i] else None for i, g in enumerate(result)]
        wrt = [i for i in range(self.n_args) if needs[i]]
        fn = self.candidates(*args)[name]
        device = self._device(args)

        def forward(*primals: torch.Tensor) -> Tuple[torch.Tensor, ...]:
            full = list(args)
            for i, p in zip(wrt, primals):
                full[i] = p
            return tuple(fn(*full))

        with torch.autocast(device.type, enabled=False):
            _, vjp = torch.func.vjp(forward, *[args[i] for i in wrt])
            got = vjp(tuple(grads[: self.n_diff]))
        result: List[Optional[torch.Tensor]] = [None] * self.n_args
        for i, g in zip(wrt, got):
            result[i] = g
        return result

    def _backward_body(self, grads, outputs, *rest):
        args = rest[: self.n_args]
        key_op, training, rows, dims, dtypes, needs = rest[self.n_args:]
        key = self._key(args, key_op, training, rows, dims, dtypes)
        with _PIN_LOCK:
            choice = _PINNED.get(str(key))
        if choice is None:  # a forward always pins its training key first
            raise RuntimeError(f"{self.name}: no forward decision for {key} (backward without its forward)")
        grads_in = self._run_backward(choice, list(grads), list(outputs), args, needs)
        result = _own([grads_in[i] for i in self.tensor_args], [*grads, *outputs, *args])
        return [g if g is not None else outputs[0].new_empty(0) for g in result]

    def _backward_fake(self, grads, outputs, *rest):
        args = rest[: self.n_args]
        needs = rest[-1]
        out = []
        for i in self.tensor_args:
            a = args[i]
            if a is not None and needs[i]:
                out.append(a.new_empty(a.shape))
            else:
                out.append(outputs[0].new_empty(0))
        return out

    # -- autograd of the dispatch op ----------------------------------------------------------
    def _autograd_setup(self, ctx, inputs, output) -> None:
        args = inputs[: self.n_args]
        outputs = tuple(output) if self.n_out > 1 else (output,)
        ctx.save_for_backward(*[args[i] for i in self.tensor_args], *outputs)
        ctx.statics = [None if i in self.tensor_args else args[i] for i in range(self.n_args)]
        ctx.key = _key_parts(inputs[self.n_args:])[:5]
        ctx.n_inputs = len(inputs)
        for o in outputs[self.n_diff:]:
            ctx.mark_non_differentiable(o)

    def _autograd_backward(self, ctx, *grads):
        saved = ctx.saved_tensors
        tensors, outputs = saved[: len(self.tensor_args)], saved[len(self.tensor_args):]
        args = list(ctx.statics)
        for i, t in zip(self.tensor_args, tensors):
            args[i] = t
        needs = [bool(ctx.needs_input_grad[i]) and i in self.tensor_args and args[i] is not None for i in range(self.n_args)]
        none = [None] * ctx.n_inputs
        if not any(needs):
            return tuple(none)
        key_op, _, rows, dims, dtypes = ctx.key
        got = self.backward_op(list(grads[: self.n_diff]) + [None] * (self.n_out - self.n_diff), list(outputs),
                               *args, key_op, True, rows, list(dims), dtypes, needs)
        for j, i in enumerate(self.tensor_args):
            if needs[i]:
                none[i] = got[j]
        return tuple(none)
