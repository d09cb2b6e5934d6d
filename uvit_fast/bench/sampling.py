"""``uvit-fast bench --suite sampling``: time per DDIM step with classifier-free guidance, and host time.

Two kinds of rows (docs/profiling.md, "Sampling suite"):

* **DDIM step** (``op = "ddim step <model>"``, CUDA only; on a CPU they are listed as skipped with
  the reason): :func:`uvit_fast.sampling.ddim_sample` with ``cfg_scale=4`` (each step: the model on
  ``cat([x, x])``, the guidance combination, the DDIM update) for U-ViT-H/2
  (``imagenet256_uvit_huge``) and DiT-XL/2 at 256 px (32x32x4 latents), batch 1, 8 and 32, bf16
  weights and inputs (``model.to(torch.bfloat16)``: pure bf16 inference, no autocast casts).
  Providers: ``eager`` (``fused=False``), ``uvit_fast`` (``fused=True``, eager, ``auto`` decided by
  the warm-up), ``uvit_fast_cuda_graph`` (``fused=True``, ``ddim_sample(..., cuda_graph=True)``),
  ``compile`` and ``compile_reduce_overhead`` (``torch.compile`` of the ``fused=False`` model,
  default mode and ``mode="reduce-overhead"``). The time per step is the slope between a short and
  a long run, ``(T(long) - T(short)) / (long - short)`` with each ``T`` the median wall time of
  ``ddim_sample`` between two ``torch.cuda.synchronize``: what a step costs once the sampler runs,
  without the per-call set-up (a CUDA graph's capture, the timestep schedule). A warm-up run first
  compiles, captures and decides every dispatch key.
* **host time** (``op = "host op <op>"`` and ``"host forward <model>"``), on every device, from
  :mod:`uvit_fast.bench.host` run in a subprocess: microseconds per call of each fused op at a
  tiny shape (reference, ``backend="torch"``, decided ``auto``) and per forward of U-ViT-H/2 and
  DiT-XL/2 at their full depth and width 64 (plain and fused), one thread, with the ratios. On a
  CPU every such row says ``CPU, 1 thread`` in its shape.
"""
from __future__ import annotations

import inspect
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from uvit_fast.bench import host

GPU_MODELS: Tuple[str, ...] = ("imagenet256_uvit_huge", "DiT-XL/2")
BATCHES: Tuple[int, ...] = (1, 8, 32)
BATCHES_QUICK: Tuple[int, ...] = (1, 8)
EAGER_PROVIDERS: Tuple[str, ...] = ("eager", "uvit_fast", "uvit_fast_cuda_graph")
COMPILE_PROVIDERS: Tuple[str, ...] = ("compile", "compile_reduce_overhead")
PROVIDERS = EAGER_PROVIDERS + COMPILE_PROVIDERS
CFG_SCALE = 4.0
# (short, long, repetitions) of the per-step slope
STEPS = (2, 12, 3)
STEPS_QUICK = (2, 6, 2)
# host measurement: (calls per op, calls per forward)
HOST_CALLS = (2000, 200)
HOST_CALLS_QUICK = (200, 20)
#: ``--op`` names of this suite: the host op rows, "forward" (host forwards), "ddim" (GPU steps)
SELECTABLE: Tuple[str, ...] = host.OPS + ("forward", "ddim")


def check_selection(ops: Optional[Sequence[str]]) -> None:
    unknown = [o for o in ops or () if o not in SELECTABLE]
    if unknown:
        raise ValueError(f"bench: unknown --op {', '.join(unknown)} for --suite sampling; choose from: "
                         f"{', '.join(SELECTABLE)}")


def _row(op: str, shape: str, pass_: str, provider: str, **fields: Any) -> Dict[str, Any]:
    row = {"suite": "sampling", "op": op, "shape": shape, "pass": pass_, "provider": provider, "bytes": None,
           "flops": None, "extra": {}}
    row.update(fields)
    return row


# ----------------------------------------------------------------------------------------------
# DDIM steps (CUDA)


def has_cuda_graph_sampler() -> Optional[str]:
    """None when ``ddim_sample`` takes ``cuda_graph`` and :func:`uvit_fast.cuda_graph` imports, else why not."""
    from uvit_fast import sampling

    if "cuda_graph" not in inspect.signature(sampling.ddim_sample).parameters:
        return "ddim_sample has no cuda_graph argument in this checkout"
    try:
        from uvit_fast.cuda_graphs import cuda_graph  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"uvit_fast.cuda_graphs does not import: {type(exc).__name__}: {exc}"
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ddim_step(model: Callable[..., torch.Tensor], noise: torch.Tensor, cond: torch.Tensor,
                   null_cond: torch.Tensor, *, short: int, long: int, reps: int, cuda_graph: bool = False,
                   cfg_scale: float = CFG_SCALE) -> Dict[str, Any]:
    """Milliseconds per guided DDIM step of ``model`` (the slope between ``short`` and ``long``
    steps, medians of ``reps`` runs each, after one warm-up run of ``long`` steps)."""
    from uvit_fast.sampling import ddim_sample

    for name, v in (("short", short), ("long", long), ("reps", reps)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"time_ddim_step: {name} must be a positive integer; got {v!r}")
    if long <= short:
        raise ValueError(f"time_ddim_step: long ({long}) must be more steps than short ({short})")
    device = noise.device
    kw: Dict[str, Any] = {"cond": cond, "null_cond": null_cond, "cfg_scale": cfg_scale}
    if cuda_graph:
        kw["cuda_graph"] = True

    def run(steps: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        ddim_sample(model, noise, steps=steps, **kw)
        _sync(device)
        return (time.perf_counter() - t0) * 1e3

    t0 = time.perf_counter()
    run(long)  # warm-up: compile, capture, decide
    first_s = time.perf_counter() - t0
    t_short = [run(short) for _ in range(reps)]
    t_long = [run(long) for _ in range(reps)]
    s, l_ = statistics.median(t_short), statistics.median(t_long)
    per_step = (l_ - s) / (long - short)
    return {"ms": per_step, "ms_p20": (min(t_long) - max(t_short)) / (long - short),
            "ms_p80": (max(t_long) - min(t_short)) / (long - short), "ms_per_step_incl_setup": l_ / long,
            "ms_short_run": s, "ms_long_run": l_, "steps": [short, long], "reps": reps, "first_call_s": first_s}


class _Models:
    """One preset at a time: its plain and fused builds (bf16) and their compiled wrappers."""

    def __init__(self, device: torch.device, dtype: torch.dtype, overrides: Dict[str, Any]):
        self.device, self.dtype, self.overrides = device, dtype, overrides
        self.name: Optional[str] = None
        self.cache: Dict[str, Any] = {}

    def get(self, name: str, provider: str):
        from uvit_fast.models import create_model

        if name != self.name:
            self.cache.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.name = name
        fused = provider.startswith("uvit_fast")
        key = "fused" if fused else "plain"
        if key not in self.cache:
            with torch.device(self.device):
                self.cache[key] = create_model(name, fused=fused, **self.overrides).to(self.dtype).eval()
        model = self.cache[key]
        if provider.startswith("compile"):
            if provider not in self.cache:
                mode = "reduce-overhead" if provider == "compile_reduce_overhead" else None
                self.cache[provider] = torch.compile(model, mode=mode)
            return model, self.cache[provider]
        return model, model


def measure_row(row: Dict[str, Any], slot: "_Models", name: str, provider: str, batch: int,
                steps: Tuple[int, int, int]) -> Dict[str, Any]:
    """Time one DDIM-step row into ``row`` (``status`` ok, or error with the exception)."""
    from uvit_fast.sampling import null_label

    device, dtype = slot.device, slot.dtype
    cuda = device.type == "cuda"
    short, long, reps = steps
    try:
        model, run = slot.get(name, provider)
        cfg_in = model.example_inputs(batch, device=device, dtype=dtype)
        noise = torch.randn(cfg_in[0].shape, device=device, dtype=dtype)
        cond = torch.randint(0, 1000, (batch,), device=device)
        null = torch.full((batch,), null_label(model), device=device, dtype=cond.dtype)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t = time_ddim_step(run, noise, cond, null, short=short, long=long, reps=reps,
                           cuda_graph=provider == "uvit_fast_cuda_graph")
        row.update(t, status="ok")
        row["samples_per_s"] = batch / (t["ms"] * 1e-3) if t["ms"] > 0 else None
        if t["ms"] <= 0:
            row["extra"]["slope_note"] = ("slope not positive: the timing noise is larger than a step here; "
                                          "more steps (a longer run) would resolve it")
        row["extra"]["samples_note"] = "samples/s = batch / time per step (one step, not a whole sample)"
        if cuda:
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    except Exception as exc:  # noqa: BLE001 - a failing row is a row
        row.update(status="error", error=f"{type(exc).__name__}: {exc}".strip()[:500])
    return row


def ddim_rows(device: torch.device, dtype: torch.dtype, *, quick: bool, models: Sequence[str] = GPU_MODELS,
              batches: Optional[Sequence[int]] = None, overrides: Optional[Dict[str, Any]] = None,
              budget_s: Optional[float] = None, steps: Optional[Tuple[int, int, int]] = None,
              progress: Optional[bool] = None, providers: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """The DDIM-step rows: timed on CUDA, skipped (with the reason) elsewhere. Order: batch by
    batch the eager providers of both models, then the compiled ones (slowest to set up), so that a
    time budget (``budget_s``; rows past it are skipped with the reason) keeps the small batches."""
    batches = tuple(batches or (BATCHES_QUICK if quick else BATCHES))
    short, long, reps = steps or (STEPS_QUICK if quick else STEPS)
    overrides = dict(overrides or {})
    plan = [(b, m, p) for b in batches for m in models for p in EAGER_PROVIDERS]
    plan += [(b, m, p) for b in batches for m in models for p in COMPILE_PROVIDERS]
    cuda = device.type == "cuda"
    no_graph = has_cuda_graph_sampler()
    deadline = time.perf_counter() + budget_s if budget_s is not None else None
    label_over = "".join(f" {k}={v}" for k, v in sorted(overrides.items()))
    rows: List[Dict[str, Any]] = []
    slot = _Models(device, dtype, overrides)
    from tqdm import tqdm

    bar = tqdm(plan, desc="bench sampling", unit="row", leave=False,
               disable=(not progress) if progress is not None else None)
    for batch, name, provider in bar:
        dt = str(dtype).replace("torch.", "")
        row = _row(f"ddim step {name}{label_over}", f"B={batch} 256px cfg={CFG_SCALE:g}", "step", provider,
                   extra={"batch": batch, "model": name, "precision": f"{dt} weights and inputs (.to({dt}))",
                          "timing": "slope of ddim_sample wall time between a short and a long run"})
        reason = None
        if providers is not None and provider not in providers:
            reason = f"provider {provider!r} not selected (--provider)"
        elif not cuda:
            reason = "needs CUDA: a GPU-sized sampling row (U-ViT-H/2 / DiT-XL/2 at 256 px)"
        elif provider == "uvit_fast_cuda_graph" and no_graph:
            reason = no_graph
        elif deadline is not None and rows and time.perf_counter() > deadline:
            reason = f"time budget of {budget_s:.0f} s for the sampling rows used up (--time-budget)"
        if reason:
            row.update(status="skipped", reason=reason)
            rows.append(row)
            continue
        bar.set_postfix_str(f"{name} B={batch} {provider}")
        rows.append(measure_row(row, slot, name, provider, batch, (short, long, reps)))
    bar.close()
    slot.cache.clear()
    return rows


# ----------------------------------------------------------------------------------------------
# host time


def host_rows(device: torch.device, *, quick: bool, ops: Sequence[str] = host.OPS,
              models: Sequence[str] = host.FORWARD_MODELS, depth: Optional[int] = None, width: int = 64,
              calls: Optional[Tuple[int, int]] = None,
              timeout: float = 900.0) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """The host rows (from a :mod:`uvit_fast.bench.host` subprocess) and that run's environment."""
    op_calls, forward_calls = calls or (HOST_CALLS_QUICK if quick else HOST_CALLS)
    cuda = device.type == "cuda"
    where = host.CPU_LABEL if not cuda else f"{torch.cuda.get_device_name(device)}, host 1 thread"
    if not ops and not models:
        return [], {}
    try:
        res = host.run_subprocess(op_calls=op_calls, forward_calls=forward_calls, models=models, ops_=ops,
                                  depth=depth, width=width, timeout=timeout, cuda=cuda)
    except RuntimeError as exc:
        rows = [_row("host", where, "call", "-", status="error", error=str(exc)[:500])]
        return rows, {}
    rows = []
    for r in res["ops"]:
        rows.append(_host_row(f"host op {r['op']}", f"{where}: {r['shape']}", "call", r))
    for r in res["forwards"]:
        rows.append(_host_row(f"host forward {r['op']}", f"{where}: {r['shape']}", "fwd", r))
    env = {k: res.get(k) for k in ("device", "dtype", "threads", "load_average", "load_average_end", "cpu_count",
                                   "env")}
    return rows, env


def _host_row(op: str, shape: str, pass_: str, r: Dict[str, Any]) -> Dict[str, Any]:
    fields = {"ms": r["us"] / 1e3, "ms_p20": r["us_p20"] / 1e3, "ms_p80": r["us_p80"] / 1e3, "us": r["us"],
              "us_p20": r["us_p20"], "us_p80": r["us_p80"], "us_min": r.get("us_min"), "status": "ok",
              "reps": r["calls"]}
    for k in ("ratio", "ratio_desc", "extra_us", "chosen", "auto_note", "first_call_s"):
        if k in r:
            fields[k] = r[k]
    extra = {"calls": r["calls"]}
    if r.get("decisions"):
        extra["decisions"] = r["decisions"]
    return _row(op, shape, pass_, r["way"], extra=extra, **fields)


# ----------------------------------------------------------------------------------------------
# the suite


def run(device: torch.device, dtype: torch.dtype, *, quick: bool, ops: Optional[Sequence[str]] = None,
        depth: Optional[int] = None, width: int = 64, budget_s: Optional[float] = None,
        progress: Optional[bool] = None, host_calls: Optional[Tuple[int, int]] = None,
        host_models: Sequence[str] = host.FORWARD_MODELS,
        providers: Optional[Sequence[str]] = None) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Every row of the suite and the host run's environment. ``ops`` narrows it (names of
    :data:`SELECTABLE`); ``depth`` replaces the presets' depth (host forwards and DDIM steps; tests),
    ``width`` is the host forwards' width; ``providers`` narrows the DDIM rows (the host rows always
    run); ``host_calls`` = (calls per op, calls per forward) and
    ``host_models`` replace the defaults (tests)."""
    check_selection(ops)
    unknown = sorted(set(providers or ()) - set(PROVIDERS))
    if unknown:
        raise ValueError(f"bench: unknown --provider {', '.join(unknown)} for --suite sampling; choose from: "
                         f"{', '.join(PROVIDERS)}")
    if depth is not None and (not isinstance(depth, int) or isinstance(depth, bool) or depth < 0):
        raise ValueError(f"bench: --depth must be a non-negative integer; got {depth!r}")
    if not isinstance(width, int) or isinstance(width, bool) or width < 2 or width % 2:
        raise ValueError(f"bench: --width must be an even integer >= 2 (2 heads); got {width!r}")
    chosen = set(ops or SELECTABLE)
    rows: List[Dict[str, Any]] = []
    if "ddim" in chosen:
        rows += ddim_rows(device, dtype, quick=quick, overrides={"depth": depth} if depth is not None else None,
                          budget_s=budget_s, progress=progress, providers=providers)
    host_ops = [o for o in host.OPS if o in chosen]
    models = tuple(host_models) if "forward" in chosen else ()
    more, env = host_rows(device, quick=quick, ops=host_ops, models=models, depth=depth, width=width,
                          calls=host_calls)
    return rows + more, env


__all__ = ["run", "ddim_rows", "host_rows", "time_ddim_step", "SELECTABLE", "PROVIDERS"]
