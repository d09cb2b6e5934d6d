"""``uvit_fast.cuda_graph``: capture a model's forward as CUDA graphs and replay them.

Diffusion sampling calls the denoiser 25-250 times at small batches, where the host's time to
launch the kernels can be as large as the GPU's time to run them. A CUDA graph records every launch of one forward once
and replays them with one call. The policy, in short (docs/cuda_graphs.md has the whole of it):

- a *signature* is what a graph is valid for: each tensor argument's shape and dtype, each
  non-tensor argument's value, and the autocast state. The first call of a signature runs
  ``warmup`` eager calls on a side stream (so that every measured-dispatch key is decided, timed,
  before capture: nothing may be timed while a stream captures), then captures one forward;
  later calls copy their tensors into the graph's static input buffers and replay it.
- the outputs are the graph's static output tensors: the next call with the same signature
  overwrites them (``clone_outputs=True`` returns copies instead).
- inference only: warm-up, capture and the eager fallback run under ``torch.no_grad()``.
- past ``max_graphs`` signatures, a new signature runs eagerly (one warning).
- CPU tensors are a ValueError (``on_cpu="eager"``: run eagerly, with a warning); a runner belongs
  to the device of its example inputs.

The CUDA calls go through a small backend object (:class:`CudaBackend`) so that the state
machine can be tested on CPU with a simulated one (``tests/test_cuda_graph.py``).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["cuda_graph", "CudaGraphRunner", "CudaBackend"]


class CudaBackend:
    """The CUDA pieces the runner uses; a test passes another object with the same methods."""

    device_type = "cuda"

    def pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def new_graph(self) -> Any:
        return torch.cuda.CUDAGraph()

    @contextlib.contextmanager
    def side_stream(self, device: torch.device) -> Iterator[None]:
        """Run the block on a fresh stream ordered after, and before, the current one (the warm-up
        recipe of the CUDA graphs notes in torch's documentation)."""
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            yield
        torch.cuda.current_stream(device).wait_stream(stream)

    def capture(self, graph: Any, fn: Callable[[], Any], pool: Any) -> Any:
        """Capture ``fn()`` into ``graph`` (on torch's capture side stream) and return its outputs:
        tensors whose memory the replays write."""
        with torch.cuda.graph(graph, pool=pool):
            return fn()

    def replay(self, graph: Any) -> None:
        graph.replay()


class _Graph:
    __slots__ = ("graph", "static_inputs", "outputs")

    def __init__(self, graph: Any, static_inputs: List[torch.Tensor], outputs: Any):
        self.graph, self.static_inputs, self.outputs = graph, static_inputs, outputs


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {str(value.dtype).replace('torch.', '')} on {value.device}"
    return f"{type(value).__name__} {value!r}"


class CudaGraphRunner:
    """What :func:`cuda_graph` returns: call it like the model. ``graphs`` maps each captured
    signature to its graph; ``eager_calls`` counts the calls that ran eagerly."""

    def __init__(self, model: Callable[..., Any], *, device: torch.device, warmup: int, max_graphs: int,
                 clone_outputs: bool, eager: bool, backend: Any):
        self.model = model
        self.device = device
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.clone_outputs = clone_outputs
        self.eager = eager
        self.backend = backend
        self.graphs: Dict[Tuple, _Graph] = {}
        self.eager_calls = 0
        self._pool: Any = None
        self._warned = False

    # a signature: per argument, (where, "tensor", shape, dtype, device) or (where, "const", type,
    # value), keyword arguments by name; the autocast state of the backend's device type
    def _signature(self, args: Tuple, kwargs: Dict[str, Any]) -> Tuple[Tuple, List[torch.Tensor]]:
        parts, tensors = [], []
        for where, value in [*enumerate(args), *sorted(kwargs.items())]:
            name = f"argument {where}" if isinstance(where, int) else f"argument {where!r}"
            if isinstance(value, torch.Tensor):
                if value.device != self.device:
                    raise ValueError(
                        f"cuda_graph: this runner's graphs are on {self.device}; got {name} ({_describe(value)}); "
                        f"call the model directly, or make one runner per device")
                parts.append((where, "tensor", tuple(value.shape), value.dtype, value.device))
                tensors.append(value)
                continue
            leaves = tree_flatten(value)[0]
            if any(isinstance(v, torch.Tensor) for v in leaves):
                raise TypeError(f"cuda_graph: {name} is a {type(value).__name__} holding tensors; pass tensors "
                                "as top-level arguments (they become the graph's static inputs)")
            try:
                hash(value)
            except TypeError:
                raise TypeError(f"cuda_graph: {name} ({_describe(value)}) is not hashable; non-tensor "
                                "arguments are part of a graph's signature and must be hashable") from None
            parts.append((where, "const", type(value), value))
        dev = self.backend.device_type
        return (tuple(parts), torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)), tensors

    def _eager(self, args: Tuple, kwargs: Dict[str, Any]) -> Any:
        self.eager_calls += 1
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def _capture(self, args: Tuple, kwargs: Dict[str, Any]) -> _Graph:
        """Warm up ``warmup`` times on a side stream, then capture one forward on static copies of
        the tensor arguments (the copies are made before capture, outside the graph's pool)."""
        statics: List[torch.Tensor] = []

        def static(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                statics.append(v.detach().clone())
                return statics[-1]
            return v

        s_args = tuple(static(a) for a in args)
        s_kwargs = {k: static(v) for k, v in sorted(kwargs.items())}  # the signature's order
        device = self.device
        cache = torch.is_autocast_cache_enabled()
        try:
            # casts of weights cached by autocast outside the graph would be read by the replays
            # after autocast frees them: the graph casts for itself
            torch.set_autocast_cache_enabled(False)
            with torch.no_grad():
                with self.backend.side_stream(device):
                    for _ in range(self.warmup):
                        self.model(*s_args, **s_kwargs)
                if self._pool is None:
                    self._pool = self.backend.pool()
                graph = self.backend.new_graph()
                try:
                    outputs = self.backend.capture(graph, lambda: self.model(*s_args, **s_kwargs), self._pool)
                except RuntimeError as exc:
                    if "captur" not in str(exc).lower():
                        raise
                    raise RuntimeError(
                        f"cuda_graph: capturing the model failed ({exc}). A host sync inside the forward "
                        "(.item(), int(tensor), .cpu(), a data-dependent check or shape) cannot be captured "
                        "(docs/cuda_graphs.md lists the known ones)") from exc
        finally:
            torch.set_autocast_cache_enabled(cache)
        return _Graph(graph, statics, outputs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        signature, tensors = self._signature(args, kwargs)  # (checks every tensor's device)
        if self.eager:
            return self._eager(args, kwargs)
        entry = self.graphs.get(signature)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                if not self._warned:
                    self._warned = True
                    warnings.warn(
                        f"cuda_graph: {len(self.graphs)} graphs captured (max_graphs={self.max_graphs}); calls "
                        f"with another signature run eagerly (this one: "
                        f"{', '.join(_describe(a) for a in (*args, *kwargs.values()))})", stacklevel=2)
                return self._eager(args, kwargs)
            entry = self.graphs[signature] = self._capture(args, kwargs)
        with torch.no_grad():  # inference only: no autograd history through the static buffers
            for buf, new in zip(entry.static_inputs, tensors):
                if new is not buf:
                    buf.copy_(new)
            self.backend.replay(entry.graph)
        if self.clone_outputs:
            return tree_map(lambda o: o.clone() if isinstance(o, torch.Tensor) else o, entry.outputs)
        return entry.outputs

    def __repr__(self) -> str:
        name = getattr(self.model, "__name__", type(self.model).__name__)
        return (f"CudaGraphRunner({name}, graphs={len(self.graphs)}, max_graphs={self.max_graphs}, "
                f"warmup={self.warmup}, eager={self.eager})")


def cuda_graph(
    model: Callable[..., Any],
    *example_inputs: Any,
    warmup: int = 3,
    max_graphs: int = 8,
    clone_outputs: bool = False,
    on_cpu: str = "raise",
    backend: Optional[Any] = None,
    **example_kwargs: Any,
) -> CudaGraphRunner:
    """Capture ``model(*example_inputs, **example_kwargs)`` as a CUDA graph; return a runner that
    replays it. Inference only (``torch.no_grad()``); put the model in ``eval()`` mode first.

    Args:
        model: an ``nn.Module`` or any callable of tensors (e.g. a denoiser with guidance).
        example_inputs: the first call's arguments: tensors (CUDA) and hashable constants.
        warmup: eager calls on a side stream before each capture (>= 0); with ``auto`` dispatch
            the first call of each shape times the candidates, which must happen before capture.
        max_graphs: how many signatures get a graph; further signatures run eagerly (one warning).
        clone_outputs: return copies of the static outputs (safe to keep; costs a copy per call).
        on_cpu: ``"raise"`` (default): CPU tensors are a ValueError; ``"eager"``: the runner calls
            the model eagerly, with a warning.
        backend: the CUDA calls (default :class:`CudaBackend`); tests pass a simulated one.

    The outputs are the graph's own buffers: the next call with the same signature overwrites them.
    """
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(f"cuda_graph: model must be an nn.Module or a callable; got {type(model).__name__}")
    if not example_inputs and not example_kwargs:
        raise ValueError("cuda_graph: example_inputs are required (the first call's arguments, e.g. "
                         "cuda_graph(model, x, t, y)); the graph is captured for their shapes")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"cuda_graph: warmup must be an int >= 0; got {warmup!r}")
    if isinstance(max_graphs, bool) or not isinstance(max_graphs, int) or max_graphs < 1:
        raise ValueError(f"cuda_graph: max_graphs must be an int >= 1; got {max_graphs!r}")
    if on_cpu not in ("raise", "eager"):
        raise ValueError(f"cuda_graph: on_cpu must be 'raise' or 'eager'; got {on_cpu!r}")
    if not isinstance(clone_outputs, bool):
        raise TypeError(f"cuda_graph: clone_outputs must be True or False; got {clone_outputs!r}")
    backend = CudaBackend() if backend is None else backend
    tensors = [(k, v) for k, v in [*enumerate(example_inputs), *example_kwargs.items()] if isinstance(v, torch.Tensor)]
    if not tensors:
        nested = [(k, v) for k, v in [*enumerate(example_inputs), *example_kwargs.items()]
                  if isinstance(v, (tuple, list, dict))]
        if nested:
            raise TypeError(f"cuda_graph: example input {nested[0][0]} is a {type(nested[0][1]).__name__}; pass the "
                            "tensors as top-level arguments (cuda_graph(model, x, t, y))")
        raise ValueError("cuda_graph: example_inputs hold no tensor; a graph needs at least one tensor input")
    off = [(k, v) for k, v in tensors if v.device.type != backend.device_type]
    eager = False
    if off:
        where, value = off[0]
        kind = backend.device_type.upper()
        if on_cpu == "eager" and value.device.type == "cpu":
            warnings.warn(f"cuda_graph: example input {where} is on cpu; no CUDA graph, the model runs eagerly "
                          "(on_cpu='eager')", stacklevel=2)
            eager = True
        else:
            raise ValueError(
                f"cuda_graph: CUDA graphs need {kind} tensors; got example input {where} on {value.device}; "
                f"call the model directly on {value.device.type.upper()}")
    runner = CudaGraphRunner(model, device=tensors[0][1].device, warmup=warmup, max_graphs=max_graphs, clone_outputs=clone_outputs,
                             eager=eager, backend=backend)
    if not eager:
        signature, _ = runner._signature(example_inputs, example_kwargs)
        runner.graphs[signature] = runner._capture(example_inputs, example_kwargs)
    return runner
