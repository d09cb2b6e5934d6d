"""Measured dispatch: under ``backend="auto"``, time an op's candidates once per key and keep the faster.

PyTorch's max-autotune times its Triton templates against the ATen choice on the device and keeps
the winner; this module does the same for the fused ops, so that ``optimize(model)`` never costs
speed. The pieces:

- :class:`DispatchKey`: what a decision is valid for: the op, inference or training, the shape with
  its row count bucketed to a power of two, the dtypes, the device name and the torch / triton /
  uvit-fast versions.
- :func:`choose`: the decision itself. Every candidate is timed (a failing one is recorded with its
  reason and left out); the fastest wins, and a tie goes to the first candidate, the PyTorch path,
  so the Triton kernel runs only where it measures faster.
- :class:`TuneCache`: decisions persist across processes in a JSON file (``UVIT_FAST_TUNE_CACHE``,
  else ``$XDG_CACHE_HOME/uvit_fast/tune.json``), written atomically under a file lock and merged
  with what other writers (several DDP ranks on one machine) stored meanwhile. A corrupt file, or
  one written by other versions, is ignored with a warning.
- :class:`Dispatcher`: the process-wide table of decisions, :func:`dispatch_report` prints it.
- :func:`measure`: what an op wrapper calls when ``_backend.resolve`` answers ``"measure"``: the
  key of this call, its stored decision or the candidates timed now (a training call, grad on and
  an input requiring grad, times forward plus backward). Under torch.compile the wrappers call a
  run-time dispatch op instead (:mod:`uvit_fast.ops._runtime`), which does the same when the graph
  runs. :func:`uvit_fast.tune` (``tuning.py``) runs a whole model with measuring forced on
  (:func:`forced`).

``UVIT_FAST_TUNE=0`` turns timing off (``auto`` then runs Triton on CUDA tensors, as before).
Timing is on by default for CUDA tensors; on CPU tensors under ``TRITON_INTERPRET=1`` it runs
only when ``UVIT_FAST_TUNE=1`` asks for it (then with ``time.perf_counter``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

ENV_TUNE = "UVIT_FAST_TUNE"
ENV_CACHE = "UVIT_FAST_TUNE_CACHE"
#: bumped when the file layout changes; a file of another format is ignored
CACHE_FORMAT = 1

Timer = Callable[[Callable[[], Any]], float]


def tuning_enabled(device_type: str) -> bool:
    """Whether ``auto`` measures on tensors of ``device_type``: ``UVIT_FAST_TUNE`` decides when set
    (``0``/``off``/``false`` off, anything else on); unset, CUDA measures and CPU does not."""
    value = os.environ.get(ENV_TUNE)
    if value is not None and value.strip() != "":
        return value.strip().lower() not in ("0", "off", "false", "no")
    return device_type == "cuda"


def bucket(n: int) -> int:
    """The power of two at or above ``n`` (0 stays 0): row counts that differ only by a partial
    last batch or by classifier-free guidance's doubling share a decision."""
    if n <= 1:
        return max(n, 0)
    return 1 << (int(n) - 1).bit_length()


def versions() -> Dict[str, str]:
    """The versions a decision depends on."""
    from uvit_fast import __version__

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - no triton: decisions can only be PyTorch's
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version, "uvit_fast": __version__}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())
    return device.type


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def stream_capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False where CUDA is not built): then
    nothing may be timed or synchronised, so a key without a stored decision runs PyTorch."""
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except (RuntimeError, AssertionError, AttributeError):  # a CPU build: its CUDA stubs raise
        return False


def timing_allowed(tensors: Sequence[Any]) -> bool:
    """Whether a decision may be timed for a call on ``tensors`` now. Not while a CUDA stream is
    capturing (:func:`stream_capturing`), and not where what would be timed is not the call's
    computation: fake tensors (``FakeTensorMode``: torch.export, a FLOP count on fake inputs), meta
    tensors, other tensor subclasses, and calls inside a functorch transform. There a key without a
    stored decision runs PyTorch and stays undecided."""
    if stream_capturing() or _functorch_active():
        return False
    return all(type(t) in _PLAIN_TENSORS and not t.is_meta for t in tensors if t is not None)


#: how many calls :func:`measure` has run undecided because :func:`timing_allowed` said no (a plan
#: made across one of them is not stored: ``uvit_fast.ops._hot``)
UNTIMED = [0]
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


@dataclasses.dataclass(frozen=True)
class DispatchKey:
    """What one decision is valid for. ``shape`` holds the op's dims with the row dim bucketed."""

    op: str
    training: bool
    shape: Tuple[int, ...]
    dtypes: Tuple[str, ...]
    device: str

    def __str__(self) -> str:
        mode = "train" if self.training else "infer"
        dims = "x".join(map(str, self.shape))
        return f"{self.op}|{mode}|{dims}|{','.join(self.dtypes)}|{self.device}"


def make_key(
    op: str,
    tensors: Sequence[Optional[torch.Tensor]],
    *,
    training: bool,
    rows: int,
    dims: Sequence[int] = (),
) -> DispatchKey:
    """The key of one call: ``rows`` is the op's long dim (``B*L`` for row-wise ops and GEMMs,
    ``B*H`` for attention), bucketed; ``dims`` are kept exact (widths, head_dim, sequence length)."""
    present = [t for t in tensors if t is not None]
    if not present:
        raise ValueError(f"make_key: {op} needs at least one tensor")
    return DispatchKey(op, bool(training), (bucket(rows), *map(int, dims)), dtype_names(present), device_name(present[0].device))


def dtype_names(tensors: Sequence[Any]) -> Tuple[str, ...]:
    """The dtypes part of a key: each tensor's dtype without ``torch.`` (``None`` entries skipped)."""
    return tuple(str(t.dtype).replace("torch.", "") for t in tensors if isinstance(t, torch.Tensor))


@dataclasses.dataclass
class Decision:
    """The outcome for one key: the chosen candidate, every candidate's time in milliseconds (None
    where it failed), why a candidate failed, and where the decision came from."""

    key: str
    choice: str
    timings_ms: Dict[str, Optional[float]]
    errors: Dict[str, str] = dataclasses.field(default_factory=dict)
    source: str = "measured"  # measured | cache | broadcast

    def to_json(self) -> Dict[str, Any]:
        return {"choice": self.choice, "timings_ms": self.timings_ms, "errors": self.errors}

    @classmethod
    def from_json(cls, key: str, data: Mapping[str, Any], source: str) -> "Decision":
        timings = {str(k): (None if v is None else float(v)) for k, v in dict(data["timings_ms"]).items()}
        choice = str(data["choice"])
        if choice not in timings:
            raise ValueError(f"decision for {key}: choice {choice!r} is not among the timed candidates")
        return cls(key, choice, timings, {str(k): str(v) for k, v in dict(data.get("errors", {})).items()}, source)


#: the wall clock :func:`cpu_timer` reads (tests replace it)
_clock = time.perf_counter


def cpu_timer(fn: Callable[[], Any], reps: int = 9, budget_ms: float = 30.0) -> float:
    """The fastest of up to ``reps`` wall-clock runs of ``fn`` in milliseconds, after one warm-up call
    (CPU tensors); it stops after three runs once ``budget_ms`` is spent (an interpreted kernel takes
    tens of milliseconds a call), and after one run where the warm-up alone took ten budgets (a
    call of a third of a second: the machine's noise is small against it, and an interpreted
    backward takes seconds). The minimum, not the median: at microsecond sizes a shared
    machine's noise only adds time, and three medians let a slower candidate win (a decided
    fused_linear ran ``addmm_activation`` 24 us slower than ``torch``)."""
    start = _clock()
    fn()
    if (_clock() - start) * 1e3 > 10 * budget_ms:
        reps = 1
    best, spent = float("inf"), 0.0
    for i in range(reps):
        start = _clock()
        fn()
        took = (_clock() - start) * 1e3
        best, spent = min(best, took), spent + took
        if i >= 2 and spent > budget_ms:
            break
    return best


def cuda_timer(fn: Callable[[], Any]) -> float:
    """``triton.testing.do_bench``'s median in milliseconds (it flushes L2 between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


def cuda_loop_timer(fn: Callable[[], Any], calls: int = 50) -> float:
    """What a user's loop sees, in milliseconds per call: ``calls`` back-to-back calls between two
    synchronisations, timed on the host clock (host and device together: where a call's host work
    exceeds its kernel time the launches cannot keep the GPU busy, and this sees it; ``do_bench``
    sees the kernels alone). Best of three runs, after a warm-up run."""
    best = float("inf")
    for _ in range(4):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) * 1e3 / calls)
    return best


def host_aware(timer: Timer) -> Timer:
    """An inference timer on CUDA: the larger of ``timer``'s device time and the back-to-back loop's
    time per call (:func:`cuda_loop_timer`), so that a candidate whose launch costs more host time
    than its kernel saves never wins a small, host-bound call."""
    def timed(fn: Callable[[], Any]) -> float:
        return max(float(timer(fn)), cuda_loop_timer(fn))
    return timed


def default_timer(device_type: str) -> Timer:
    return cuda_timer if device_type == "cuda" else cpu_timer


def decision_timer(device_type: str, training: bool) -> Timer:
    """The timer a decision uses: :func:`default_timer`, host-aware (:func:`host_aware`) for an
    inference decision on CUDA. (On CPU tensors the timer is the wall clock already.)"""
    timer = default_timer(device_type)
    return host_aware(timer) if device_type == "cuda" and not training else timer


def _keep(t: Any) -> Any:
    return t


def _plain_saves() -> Any:
    """Identity saved-tensor hooks over the caller's, only where the caller has some (torch.func, which
    the run-time dispatch ops time PyTorch backwards with, refuses to run under any)."""
    hooks = torch._C._autograd
    if not hooks._saved_tensors_hooks_is_enabled() or hooks._top_saved_tensors_default_hooks(False) is None:
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_keep, _keep)


def choose(key: str, candidates: Mapping[str, Callable[[], Any]], timer: Timer) -> Decision:
    """Time every candidate and keep the fastest. The first candidate is the baseline (the PyTorch
    path): it wins ties, so another candidate must be strictly faster to be kept. A candidate that
    raises is recorded with its reason; if every candidate fails, the first error is raised."""
    if not candidates:
        raise ValueError(f"choose: no candidates for {key}")
    timings: Dict[str, Optional[float]] = {}
    errors: Dict[str, str] = {}
    first_error: Optional[BaseException] = None
    for name, fn in candidates.items():
        try:
            # the timing runs save their tensors plainly, never through the caller's saved-tensor
            # hooks (a non-reentrant checkpoint would count them, save_on_cpu would copy them)
            with _plain_saves():
                timings[name] = float(timer(fn))
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run here loses
            timings[name] = None
            errors[name] = f"{type(exc).__name__}: {exc}".strip()[:500]
            first_error = first_error or exc
    ok = [(t, i, name) for i, (name, t) in enumerate(timings.items()) if t is not None]
    if not ok:
        raise first_error  # type: ignore[misc] - every candidate failed, so one error was kept
    _, _, best = min(ok)
    return Decision(key, best, timings, errors)


def default_cache_path() -> Path:
    explicit = os.environ.get(ENV_CACHE)
    if explicit:
        return Path(explicit).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "uvit_fast" / "tune.json"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path.lock`` (POSIX; elsewhere the atomic rename alone)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(f"{path}.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class TuneCache:
    """The decisions file: ``{"format", "versions", "decisions": {key: decision}}``."""

    def __init__(self, path: Optional[os.PathLike] = None):
        self.path = Path(path) if path is not None else default_cache_path()

    def _read(self, warn: bool) -> Dict[str, Decision]:
        try:
            text = self.path.read_bytes()  # decoded by json.loads: bad UTF-8 is a ValueError, below
        except FileNotFoundError:
            return {}
        except OSError as exc:
            if warn:
                warnings.warn(f"uvit_fast: cannot read the tuning cache {self.path} ({exc}); ignoring it")
            return {}
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
                raise ValueError(f"format {data.get('format') if isinstance(data, dict) else None!r}, expected {CACHE_FORMAT}")
            if data.get("versions") != versions():
                if warn:
                    warnings.warn(
                        f"uvit_fast: the tuning cache {self.path} was written by {data.get('versions')}, "
                        f"not {versions()}; ignoring it (it is replaced on the next write)"
                    )
                return {}
            return {k: Decision.from_json(k, v, "cache") for k, v in dict(data["decisions"]).items()}
        except (ValueError, KeyError, TypeError) as exc:
            if warn:
                warnings.warn(f"uvit_fast: the tuning cache {self.path} is corrupt ({exc}); ignoring it")
            return {}

    def load(self) -> Dict[str, Decision]:
        """Every stored decision of these versions; a corrupt or foreign file gives ``{}`` and a warning."""
        return self._read(warn=True)

    def store(self, decisions: Mapping[str, Decision]) -> None:
        """Merge ``decisions`` into the file: under the lock, read what is there (other processes
        may have written since), add ours, and replace the file atomically."""
        with _file_lock(self.path):
            merged = self._read(warn=False)
            merged.update(decisions)
            payload = {
                "format": CACHE_FORMAT,
                "versions": versions(),
                "decisions": {k: d.to_json() for k, d in sorted(merged.items())},
            }
            fd, tmp = tempfile.mkstemp(prefix=".tune-", suffix=".json", dir=str(self.path.parent))
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump(payload, fh, indent=1)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise


class Dispatcher:
    """The process-wide decisions: looked up by key, measured on a miss, written to the cache."""

    def __init__(self, cache: Optional[TuneCache] = None):
        self._cache = cache
        self._loaded = False
        self._decisions: Dict[str, Decision] = {}
        self._lock = threading.RLock()

    @property
    def cache(self) -> TuneCache:
        if self._cache is None:
            self._cache = TuneCache()
        return self._cache

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._loaded = True
            for k, d in self.cache.load().items():
                self._decisions.setdefault(k, d)

    def lookup(self, key: DispatchKey) -> Optional[Decision]:
        with self._lock:
            self._ensure_loaded()
            return self._decisions.get(str(key))

    def decide(self, key: DispatchKey, candidates: Mapping[str, Callable[[], Any]], timer: Timer) -> Decision:
        """The decision for ``key``: from this process or the cache, else measured now and stored."""
        with self._lock:
            found = self.lookup(key)
            if found is not None:
                return found
            decision = choose(str(key), candidates, timer)
            self._decisions[str(key)] = decision
        try:
            self.cache.store({str(key): decision})
        except OSError as exc:
            warnings.warn(f"uvit_fast: cannot write the tuning cache {self.cache.path} ({exc}); decisions stay in memory")
        return decision

    def install(self, decisions: Mapping[str, Decision], source: str = "broadcast") -> None:
        """Take decisions made elsewhere (rank 0 of a distributed run)."""
        with self._lock:
            for k, d in decisions.items():
                self._decisions[k] = dataclasses.replace(d, source=source)
        _invalidate_plans()

    def decisions(self) -> Dict[str, Decision]:
        with self._lock:
            return dict(self._decisions)

    def clear(self) -> None:
        """Forget this process's decisions (the file stays); the next lookup reads the file again."""
        with self._lock:
            self._decisions.clear()
            self._loaded = False
        _invalidate_plans()


_DISPATCHER = Dispatcher()


def _invalidate_plans() -> None:
    """The ops' stored plans (:mod:`uvit_fast.ops._hot`) hold decisions: drop them."""
    from uvit_fast.ops import _hot

    _hot.invalidate()


def dispatcher() -> Dispatcher:
    return _DISPATCHER


def format_decisions(decisions: Mapping[str, Decision]) -> str:
    """One line per decision: key, choice, every candidate's time, failures with their reason."""
    if not decisions:
        return "no dispatch decisions in this process"
    lines = []
    for key, d in sorted(decisions.items()):
        times = ", ".join(
            f"{name} {'failed' if t is None else f'{t:.3f} ms'}" for name, t in d.timings_ms.items()
        )
        lines.append(f"{key}: {d.choice} ({d.source}; {times})")
        for name, why in d.errors.items():
            lines.append(f"    {name} failed: {why}")
    return "\n".join(lines)


def dispatch_report() -> str:
    """Every decision taken (or read from the cache) in this process, one line each."""
    return format_decisions(_DISPATCHER.decisions())


def snapshot() -> List[Dict[str, Any]]:
    """The decisions as JSON-ready rows (for ``tune`` and the benchmark's ``auto`` row)."""
    return [{"key": k, "source": d.source, **d.to_json()} for k, d in sorted(_DISPATCHER.decisions().items())]


# ------------------------------------------------------------------------------------------------
# Measuring a call: what the op wrappers run when ``resolve`` answers "measure".
# ------------------------------------------------------------------------------------------------
_FORCE = [0]  # > 0 while tune() runs: measure even where UVIT_FAST_TUNE is unset (CPU)
_RECORD: List[List[str]] = []  # keys touched while tune() runs (innermost list)


@contextlib.contextmanager
def forced() -> Iterator[List[str]]:
    """Measure ``auto`` calls while the block runs (as if ``UVIT_FAST_TUNE=1``) and collect the
    keys of every decision the ops take in it. ``UVIT_FAST_TUNE=0`` still wins: see :func:`tune`."""
    keys: List[str] = []
    with _GLOBAL_LOCK:
        _FORCE[0] += 1
        _RECORD.append(keys)
    _invalidate_plans()  # every call of the block takes the full path: measured, and its key recorded
    try:
        yield keys
    finally:
        with _GLOBAL_LOCK:
            _FORCE[0] -= 1
            _RECORD.remove(keys)
        _invalidate_plans()


_GLOBAL_LOCK = threading.Lock()


def tuning_requested(device_type: str) -> bool:
    """``tuning_enabled``, or ``tune()`` running (unless ``UVIT_FAST_TUNE=0`` turns timing off)."""
    if _FORCE[0] > 0:
        value = os.environ.get(ENV_TUNE, "").strip().lower()
        return value not in ("0", "off", "false", "no")
    return tuning_enabled(device_type)


def is_training(inputs: Sequence[Any]) -> bool:
    """A call is a training call when autograd records it: grad mode on and a floating input requires grad."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad for t in inputs
    )


def _outputs(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _outputs(o)]
    return []


def _bind(fn: Callable[..., Any], inputs: Sequence[Any], training: bool) -> Callable[[], Any]:
    """A no-argument callable the timer runs: the forward under ``no_grad`` for inference; for
    training the forward plus ``torch.autograd.grad`` of its outputs (against a fixed random
    ``grad_output``) with respect to detached leaves of the inputs, so the backward is this
    candidate's own and nothing reaches the user's ``.grad``."""
    if not training:
        def run_inference() -> Any:
            with torch.no_grad():
                return fn(*inputs)
        return run_inference

    leaves = [
        t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs
    ]
    wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grad_outputs: List[torch.Tensor] = []

    def run_training() -> Any:
        with torch.enable_grad():
            outs = [o for o in _outputs(fn(*leaves)) if o.requires_grad]
            if not grad_outputs:
                for o in outs:
                    g = torch.Generator(device=o.device).manual_seed(len(grad_outputs))
                    grad_outputs.append(torch.randn(o.shape, dtype=o.dtype, device=o.device, generator=g))
            return torch.autograd.grad(outs, wrt, grad_outputs, allow_unused=True)
    return run_training


def measure(
    op: str,
    inputs: Sequence[Any],
    candidates: Mapping[str, Callable[..., Any]],
    *,
    rows: int,
    dims: Sequence[int] = (),
    flags: str = "",
) -> str:
    """The candidate that runs this call of ``op``: the stored decision for its key, else every
    candidate timed now (see :func:`choose`; the first is the PyTorch baseline) and the winner stored.

    ``candidates`` map a name to a function of ``*inputs`` (the op's tensors and ``None``s, in one
    order), running that path forward. ``rows`` is bucketed in the key, ``dims`` kept exact, and
    ``flags`` (what changes the kernel: causal, bias present, ...) plus the autocast dtype are
    part of the op's name in the key.

    Eager calls only: under torch.compile the op wrappers call their run-time dispatch op instead
    (:mod:`uvit_fast.ops._runtime`), which takes the decision when the graph runs."""
    present = [t for t in inputs if isinstance(t, torch.Tensor)]
    device = present[0].device
    if len(candidates) == 1:
        return next(iter(candidates))
    name = key_name(op, flags, device.type)
    training = is_training(inputs)
    if torch.compiler.is_compiling():
        raise RuntimeError(
            f"{op}: measure() runs in eager calls only; under torch.compile an op decides inside its "
            "run-time dispatch op (uvit_fast.ops._runtime)"
        )
    key = make_key(name, present, training=training, rows=rows, dims=dims)
    decision = _DISPATCHER.lookup(key)
    if decision is None:
        if not timing_allowed(present):  # capturing a CUDA graph, fake tensors, ...: PyTorch, undecided
            UNTIMED[0] += 1
            return next(iter(candidates))
        bound = {cand: _bind(fn, inputs, training) for cand, fn in candidates.items()}
        decision = _DISPATCHER.decide(key, bound, decision_timer(device.type, training))
    record_key(str(key))
    if decision.choice not in candidates:  # a stored decision for a candidate this process lacks
        return next(iter(candidates))
    return decision.choice


def key_name(op: str, flags: str, device_type: str, compiled_training: bool = False) -> str:
    """The op part of a key: ``op[flags,autocast=dtype]``. ``compiled_training`` tags the training
    keys of the run-time dispatch ops under torch.compile (``uvit_fast.ops._runtime``), whose
    PyTorch candidates time a recomputing backward: not what an eager training call times."""
    ac = ""
    if torch.is_autocast_enabled(device_type):
        ac = f"autocast={str(torch.get_autocast_dtype(device_type)).replace('torch.', '')}"
    tags = ",".join(p for p in (flags, ac, "compiled" if compiled_training else "") if p)
    return f"{op}[{tags}]" if tags else op


def record_key(key: str) -> None:
    """Note ``key`` for every :func:`forced` block running (``tune()`` reports what a model ran)."""
    with _GLOBAL_LOCK:
        for keys in _RECORD:
            keys.append(key)
