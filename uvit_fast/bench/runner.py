"""``uvit-fast bench``: every op's benchmark cases and the model rows, timed against the
device's own ceilings measured in the same run.

Cases come from the modules ``uvit_fast.bench.<op>`` (``cases(device, dtype) -> list[Case]``,
see :mod:`uvit_fast.bench.core`), discovered at run time: the known ops in :data:`OP_MODULES`
plus any other module of the package that defines ``cases``. A module that is missing, fails
to import or whose ``cases`` raises is reported as skipped with its error; a case that raises
while running becomes an ``error`` row; nothing stops the run.

Timing: every case gets one untimed call first (tensors and models are allocated lazily and
``torch.compile`` compiles there), then :func:`uvit_fast.bench.core.time_fn` -- on CUDA
``triton.testing.do_bench`` (CUDA events, warm-up, the L2 cache flushed between repetitions),
on a CPU the wall clock. Reported: median, p20 and p80 ms; GB/s from the case's ``bytes``,
TFLOP/s from its ``flops``, each as a fraction of the ceiling measured at the start of the run
(copy bandwidth; dense GEMM in the benchmark dtype, bf16 on CUDA); the speed-up over the
``eager`` row of the same op, shape and pass; samples/s for rows with a batch; peak memory on
CUDA.

On a CPU (what makes sense there): rows marked ``needs_cuda`` are skipped with their reason;
``compile`` rows are skipped (Inductor's CPU code generation costs tens of seconds a case and
says nothing about the GPU kernels this library is about; ``--cpu-compile`` runs them);
``uvit_fast`` rows are skipped (the Triton kernels run on a CPU only in the interpreter, whose
timings mean nothing); only the first ``--max-shapes`` shapes of each op run (default 1), with
the repetitions adapted to a time budget per op (``--time-budget``).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import os
import pkgutil
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from uvit_fast.bench.core import Case, raise_recompile_limits, time_fn
from uvit_fast.cli_args import BENCH_CPU_BUDGET, BENCH_CPU_BUDGET_QUICK, BENCH_QUICK_ENV, BENCH_RESULTS_DIR
from uvit_fast.cli_args import add_bench_arguments as add_arguments  # noqa: F401

SUITES: Tuple[str, ...] = ("ops", "models", "sampling", "all")  # "all" = ops + models (sampling is its own run)
OP_MODULES: Tuple[str, ...] = ("adaln_layer_norm", "patch_embed", "skip_concat_linear", "attention", "fused_linear")
NOT_OP_MODULES = {"core", "runner", "models", "sampling", "host"}
# the command-line arguments and their defaults are in the torch-free uvit_fast.cli_args
QUICK_ENV = BENCH_QUICK_ENV
# CPU defaults: (seconds per op, seconds per case) normal / quick
CPU_BUDGET = BENCH_CPU_BUDGET
CPU_BUDGET_QUICK = BENCH_CPU_BUDGET_QUICK


# ----------------------------------------------------------------------------------------------
# discovery


def discover_op_modules() -> List[str]:
    """The known op modules first, then any other ``uvit_fast.bench`` module (not core/runner/models)."""
    import uvit_fast.bench as pkg

    names = list(OP_MODULES)
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in names and info.name not in NOT_OP_MODULES and not info.name.startswith("_"):
            names.append(info.name)
    return names


def load_cases(module: str, device: torch.device, dtype: torch.dtype) -> Tuple[List[Case], Optional[str]]:
    """``(cases, None)``, or ``([], reason)`` when the module is missing, broken or has no ``cases``."""
    full = module if "." in module else f"uvit_fast.bench.{module}"
    try:
        mod = importlib.import_module(full)
    except ModuleNotFoundError as exc:
        if exc.name == full:
            return [], "module not found (not written yet?)"
        return [], f"import failed: {type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - a broken case module must not stop the run
        return [], f"import failed: {type(exc).__name__}: {exc}"
    fn = getattr(mod, "cases", None)
    if not callable(fn):
        return [], "the module defines no cases(device, dtype)"
    try:
        out = list(fn(device, dtype))
    except Exception as exc:  # noqa: BLE001
        return [], f"cases() raised {type(exc).__name__}: {exc}"
    bad = [c for c in out if not isinstance(c, Case)]
    if bad:
        return [], f"cases() returned {type(bad[0]).__name__} objects, not Case"
    return out, None


def select_modules(suite: str, ops: Optional[Sequence[str]] = None) -> List[str]:
    """The case modules of ``suite``, narrowed to ``ops``; unknown names are a ValueError listing the valid ones."""
    if suite not in SUITES:
        raise ValueError(f"bench: suite must be 'ops', 'models', 'sampling' or 'all'; got {suite!r}")
    if suite == "sampling":
        from uvit_fast.bench import sampling

        sampling.check_selection(ops)
        return ["sampling"]
    modules: List[str] = []
    if suite in ("ops", "all"):
        modules += discover_op_modules()
    if suite in ("models", "all"):
        modules.append("models")
    if ops:
        unknown = [o for o in ops if o not in modules]
        if unknown:
            raise ValueError(
                f"bench: unknown --op {', '.join(unknown)} for --suite {suite}; choose from: {', '.join(modules)}"
            )
        modules = [m for m in modules if m in ops]
    return modules


def check_providers(providers: Sequence[str], cases: Sequence[Case]) -> None:
    """A ValueError listing the valid names when a selected provider has no case."""
    valid = sorted({c.provider for c in cases})
    unknown = sorted(set(providers) - set(valid))
    if unknown:
        raise ValueError(
            f"bench: unknown --provider {', '.join(unknown)}; the selected cases have: {', '.join(valid) or 'none'}"
        )


# ----------------------------------------------------------------------------------------------
# policy: what runs where


class Policy:
    """What runs on this device, and for how long."""

    def __init__(
        self,
        device: torch.device,
        *,
        quick: bool = False,
        cpu_compile: bool = False,
        max_shapes: Optional[int] = None,
        time_budget: Optional[float] = None,
        providers: Optional[Sequence[str]] = None,
    ):
        self.device = device
        self.cpu = device.type != "cuda"
        self.quick = quick
        self.cpu_compile = cpu_compile
        self.max_shapes = max_shapes if max_shapes is not None else (1 if self.cpu else None)
        op_budget, case_budget = CPU_BUDGET_QUICK if quick else CPU_BUDGET
        self.op_budget = time_budget if time_budget is not None else (op_budget if self.cpu else None)
        self.case_budget = case_budget
        self.providers = set(providers) if providers else None

    def skip_reason(self, case: Case, shape_index: int) -> Optional[str]:
        """Why ``case`` does not run here (``None``: it runs). ``shape_index`` is the position of
        the case's shape among its op's shapes."""
        if self.providers is not None and case.provider not in self.providers:
            return f"provider {case.provider!r} not selected (--provider)"
        if self.cpu and case.needs_cuda:
            return case.skip_reason or "needs CUDA"
        if case.skip_reason and not case.needs_cuda:
            return case.skip_reason
        if self.cpu:
            if case.provider.startswith("compile") and not self.cpu_compile:
                return ("torch.compile on CPU: Inductor's C++ code generation costs tens of seconds a case and says "
                        "nothing about the GPU; --cpu-compile runs it")
            if case.provider.startswith("uvit_fast"):
                return "Triton kernels run on a CPU only under the interpreter, whose timings mean nothing"
            if self.max_shapes is not None and shape_index >= self.max_shapes:
                return f"CPU: only the first {self.max_shapes} shape(s) of each op run (--max-shapes)"
        return None


# ----------------------------------------------------------------------------------------------
# ceilings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, *, quick: bool, reps: Optional[int] = None) -> Dict[str, float]:
    if device.type == "cuda":
        if quick:
            import triton.testing

            med, p20, p80 = triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=[0.5, 0.2, 0.8])
            return {"ms": med, "ms_p20": p20, "ms_p80": p80, "reps": None}
        out = time_fn(fn, device)
        out["reps"] = None
        return out
    reps = reps or (3 if quick else 10)
    out = time_fn(fn, device, warmup=0, rep=reps)
    out["reps"] = reps
    return out


def measure_ceilings(device: torch.device, dtype: torch.dtype, *, quick: bool = False) -> Dict[str, Any]:
    """Copy bandwidth (GB/s, read + write counted) and dense GEMM rate (TFLOP/s) in ``dtype``.

    :func:`run_suite` measures them on CUDA only: a CPU's GEMM rate depends so much on the
    shape and the threads that the op rows beat a fixed square GEMM (126-161% of it were
    printed), so on a CPU rows carry GB/s and TFLOP/s without a "% of ceiling"."""
    cuda = device.type == "cuda"
    out: Dict[str, Any] = {}
    # copy: large enough to leave every cache behind
    n_bytes = (1 << 30) if cuda else (64 << 20)
    src = torch.empty(n_bytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    src.add_(0)
    t = _time(lambda: dst.copy_(src), device, quick=quick, reps=5)
    out["copy_gbps"] = 2 * n_bytes / (t["ms"] * 1e-3) / 1e9
    out["copy_desc"] = f"dst.copy_(src), {n_bytes >> 20} MiB fp32, read + write counted"
    src = dst = None  # free before the GEMM
    # GEMM
    n = 8192 if cuda else (512 if quick else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.mm(a, b)
    _sync(device)
    t = _time(lambda: torch.mm(a, b), device, quick=quick, reps=5)
    out["gemm_tflops"] = 2 * n**3 / (t["ms"] * 1e-3) / 1e12
    out["gemm_desc"] = f"torch.mm {n}x{n}x{n} {str(dtype).replace('torch.', '')}"
    a = b = None
    if cuda:
        torch.cuda.empty_cache()
    return out


# ----------------------------------------------------------------------------------------------
# running


def _case_row(case: Case) -> Dict[str, Any]:
    extra = {k: v for k, v in case.extra.items() if _jsonable(v)}
    return {
        "suite": case.suite, "op": case.op, "shape": case.shape, "pass": case.pass_, "provider": case.provider,
        "bytes": case.bytes, "flops": case.flops, "extra": extra,
    }


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


def run_case(case: Case, device: torch.device, policy: Policy, ceilings: Dict[str, Any],
             deadline: Optional[float]) -> Dict[str, Any]:
    row = _case_row(case)
    cuda = device.type == "cuda"
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        case.fn()  # untimed: lazy allocation, compilation, first-touch
        _sync(device)
        first = row["first_call_s"] = time.perf_counter() - t0
        reps = None
        if not cuda:
            left = policy.case_budget
            if deadline is not None:
                left = min(left, max(0.0, deadline - time.perf_counter()))
            if first >= left:
                reps = 1  # no time for more: one timed call
            else:
                # a second untimed call estimates the cost; the repetitions fit the time left
                t0 = time.perf_counter()
                case.fn()
                est = time.perf_counter() - t0
                reps = max(1, min(3 if policy.quick else 10, int(max(0.0, left - est) / max(est, 1e-6))))
        t = _time(case.fn, device, quick=policy.quick, reps=reps)
        row.update(t)
        row["status"] = "ok"
        if cuda:
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    except Exception as exc:  # noqa: BLE001 - a failing case is a row, not the end of the run
        row["status"] = "error"
        row["error"] = f"{type(exc).__name__}: {exc}".strip()[:500]
        row["traceback"] = traceback.format_exc(limit=4)[-2000:]
        if cuda:
            torch.cuda.empty_cache()
        return row
    ms = row["ms"]
    fracs = {}
    if case.bytes:
        row["gbps"] = case.bytes / (ms * 1e-3) / 1e9
        if ceilings.get("copy_gbps"):
            fracs["memory"] = row["gbps"] / ceilings["copy_gbps"]
    if case.flops:
        row["tflops"] = case.flops / (ms * 1e-3) / 1e12
        if ceilings.get("gemm_tflops"):
            fracs["compute"] = row["tflops"] / ceilings["gemm_tflops"]
    if fracs:
        bound = max(fracs, key=fracs.get)
        row["bound"] = bound
        row["ceiling_frac"] = fracs[bound]
    batch = case.extra.get("batch")
    if isinstance(batch, int) and batch > 0:
        row["samples_per_s"] = batch / (ms * 1e-3)
    return row


def add_speedups(rows: List[Dict[str, Any]]) -> None:
    """``speedup_vs_eager`` for every timed row whose op/shape/pass has a timed ``eager`` row."""
    eager = {(r["suite"], r["op"], r["shape"], r["pass"]): r["ms"] for r in rows
             if r.get("status") == "ok" and r["provider"] == "eager"}
    for r in rows:
        base = eager.get((r["suite"], r["op"], r["shape"], r["pass"]))
        if base is not None and r.get("status") == "ok":
            r["speedup_vs_eager"] = base / r["ms"]


def run_suite(
    suite: str,
    device: torch.device,
    dtype: torch.dtype,
    policy: Policy,
    *,
    ops: Optional[Sequence[str]] = None,
    progress: Optional[bool] = None,
    sampling: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Run ``suite`` ("ops", "models", "sampling" or "all" = ops + models); returns
    ``{"meta", "ceilings", "rows", "skipped_modules"}``.

    An unknown name in ``ops`` or ``policy.providers`` is a ValueError listing the valid names,
    raised before anything is measured. ``ceilings`` is empty on a CPU (see :func:`measure_ceilings`)."""
    from tqdm import tqdm

    started = time.perf_counter()
    modules = select_modules(suite, ops)
    if suite == "sampling":
        return _run_sampling(device, dtype, policy, ops=ops, progress=progress, started=started,
                             **(sampling or {}))
    loaded = [(module, *load_cases(module, device, dtype)) for module in modules]
    if policy.providers is not None:
        check_providers(policy.providers, [c for _, cases, _ in loaded for c in cases])
    raise_recompile_limits()
    meta = environment(device, dtype)
    meta.update(suite=suite, quick=policy.quick)
    ceilings = measure_ceilings(device, dtype, quick=policy.quick) if device.type == "cuda" else {}
    rows: List[Dict[str, Any]] = []
    skipped_modules: List[Dict[str, str]] = []
    while loaded:
        module, cases, reason = loaded.pop(0)  # dropped after its run: tensors a case allocated go with it
        if reason is not None:
            skipped_modules.append({"module": module, "reason": reason})
            continue
        shapes: Dict[str, Dict[str, int]] = {}
        plan = []
        for case in cases:
            per_op = shapes.setdefault(case.op, {})
            idx = per_op.setdefault(case.shape, len(per_op))
            plan.append((case, policy.skip_reason(case, idx)))
        runnable = sum(1 for _, r in plan if r is None)
        deadline = time.perf_counter() + policy.op_budget if policy.op_budget is not None else None
        bar = tqdm(total=runnable, desc=f"bench {module}", unit="case", file=sys.stderr,
                   disable=(not progress) if progress is not None else None, leave=False)
        ran = 0
        for case, reason in plan:
            # the budget never skips an op's first runnable case
            if reason is None and ran and deadline is not None and time.perf_counter() > deadline:
                reason = f"time budget of {policy.op_budget:.0f} s for this op used up (--time-budget)"
            if reason is not None:
                row = _case_row(case)
                row.update(status="skipped", reason=reason)
                rows.append(row)
                continue
            bar.set_postfix_str(f"{case.provider} {case.pass_} {case.shape}"[:60])
            rows.append(run_case(case, device, policy, ceilings, deadline))
            ran += 1
            bar.update()
        bar.close()
        del cases, plan
        if module == "models":
            try:
                importlib.import_module("uvit_fast.bench.models").release()
            except Exception:  # noqa: BLE001
                pass
        if device.type == "cuda":
            torch.cuda.empty_cache()
    add_speedups(rows)
    meta["seconds"] = time.perf_counter() - started
    return {"meta": meta, "ceilings": ceilings, "rows": rows, "skipped_modules": skipped_modules}


def _run_sampling(device: torch.device, dtype: torch.dtype, policy: Policy, *, ops: Optional[Sequence[str]],
                  progress: Optional[bool], started: float, depth: Optional[int] = None, width: int = 64,
                  host_calls: Optional[Tuple[int, int]] = None, host_models: Optional[Sequence[str]] = None
                  ) -> Dict[str, Any]:
    """``--suite sampling`` (:mod:`uvit_fast.bench.sampling`): DDIM steps on CUDA, host time everywhere.
    On CUDA ``--time-budget`` bounds the DDIM rows (on a CPU they are skipped rows anyway)."""
    from uvit_fast.bench import sampling

    raise_recompile_limits()
    meta = environment(device, dtype)
    meta.update(suite="sampling", quick=policy.quick)
    budget = policy.op_budget if device.type == "cuda" else None
    rows, host_env = sampling.run(device, dtype, quick=policy.quick,
                                  ops=ops, depth=depth, width=width, budget_s=budget, progress=progress,
                                  host_calls=host_calls,
                                  providers=sorted(policy.providers) if policy.providers is not None else None,
                                  **({"host_models": tuple(host_models)} if host_models is not None else {}))
    add_speedups(rows)
    meta["host"] = host_env
    meta["seconds"] = time.perf_counter() - started
    return {"meta": meta, "ceilings": {}, "rows": rows, "skipped_modules": []}


# ----------------------------------------------------------------------------------------------
# environment


def _git_commit() -> Dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
        return {"git_commit": sha or None, "git_dirty": dirty}
    except Exception:  # noqa: BLE001 - not a git checkout (installed wheel): no commit to report
        return {"git_commit": None, "git_dirty": None}


def _version(module: str) -> Optional[str]:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:  # noqa: BLE001
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
    import uvit_fast

    meta: Dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "uvit_fast": uvit_fast.__version__,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "flash_attn": _version("flash_attn"),
        "xformers": _version("xformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    if device.type == "cuda":
        meta["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    meta.update(_git_commit())
    return meta


# ----------------------------------------------------------------------------------------------
# output


def _f(v: Optional[float], fmt: str) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _rate(r: Dict[str, Any]) -> str:
    parts = []
    if "gbps" in r:
        parts.append(f"{r['gbps']:.1f} GB/s")
    if "tflops" in r:
        parts.append(f"{r['tflops']:.3g} TFLOP/s")
    return ", ".join(parts)


_COLUMNS = ["suite", "op", "shape", "pass", "provider", "median ms", "p20-p80 ms", "rate", "% ceiling",
            "vs eager", "samples/s", "peak GB"]


_HOST_COLUMNS = ["host us", "ratio"]


def _columns(result: Dict[str, Any]) -> List[str]:
    """The table's columns: no "% ceiling" without measured ceilings (a CPU run); "host us" and
    "ratio" when a row has host time (``--suite sampling``)."""
    cols = [c for c in _COLUMNS if c != "% ceiling" or result["ceilings"]]
    if any("us" in r for r in result["rows"]):
        cols += _HOST_COLUMNS
    return cols


def _host_cells(r: Dict[str, Any]) -> List[str]:
    if r.get("status") != "ok" or "us" not in r:
        return ["", ""]
    ratio = ""
    if r.get("ratio") is not None:
        ratio = f"{r['ratio']:.2f}x"
        if r.get("extra_us") is not None:
            ratio += f" ({r['extra_us']:+.1f} us)"
    return [f"{r['us']:.1f}", ratio]


def _all_cells(r: Dict[str, Any], columns: List[str]) -> List[str]:
    cells = _cells(r, "% ceiling" in columns)
    return cells + (_host_cells(r) if columns[-len(_HOST_COLUMNS):] == _HOST_COLUMNS else [])


def _cells(r: Dict[str, Any], with_ceiling: bool = True) -> List[str]:
    base = [r["suite"], r["op"], r["shape"], r["pass"], r["provider"]]
    if r.get("status") != "ok":
        what = r.get("reason") if r.get("status") == "skipped" else r.get("error", "")
        return base + [r.get("status", ""), what or "", "", "", "", ""] + ([""] if with_ceiling else [])
    frac = r.get("ceiling_frac")
    ceiling = ["" if frac is None else f"{100 * frac:.0f}% {'BW' if r['bound'] == 'memory' else 'GEMM'}"]
    return base + [
        f"{r['ms']:.3f}",
        f"{r['ms_p20']:.3f}-{r['ms_p80']:.3f}",
        _rate(r),
        *(ceiling if with_ceiling else []),
        _f(r.get("speedup_vs_eager"), ".2f") + ("x" if "speedup_vs_eager" in r else ""),
        _f(r.get("samples_per_s"), ".1f"),
        _f(r.get("peak_mem_gb"), ".2f"),
    ]


def _header_lines(result: Dict[str, Any]) -> List[str]:
    m, c = result["meta"], result["ceilings"]
    commit = (m.get("git_commit") or "unknown")[:12] + (" (dirty)" if m.get("git_dirty") else "")
    first = (f"device: {m['device']}   dtype: {m['dtype']}   torch {m['torch']}   triton {m['triton']}   "
             f"commit {commit}   {m['date']}" + ("   (quick)" if m.get("quick") else ""))
    host = []
    if m.get("suite") == "sampling":
        h = m.get("host") or {}
        load = h.get("load_average")
        host = [f"host rows: {h.get('device', '?')} (torch threads: {h.get('threads', '?')}), {h.get('dtype', '?')}"
                + (f", load average {load[0]:.1f} at the start of {h.get('cpu_count')} CPUs" if load else "")
                + "; ratio: fused / plain (forward), backend='torch' / reference, auto / chosen candidate "
                  "(with the difference in us)"]
    if m.get("suite") == "sampling":
        where = ("DDIM steps: wall time between torch.cuda.synchronize() calls, per step = slope between a short "
                 "and a long run" if m.get("device_type") == "cuda"
                 else "CPU timings (wall clock); the DDIM-step rows need CUDA")
        return [first, where] + host
    if not c:
        return [first, "CPU timings (wall clock). No '% of ceiling' column on a CPU: its GEMM rate depends on the "
                       "shape and the threads, so no one ceiling bounds the rows; GB/s and TFLOP/s are as measured."]
    return [
        first,
        f"ceilings (measured in this run): copy {c['copy_gbps']:.1f} GB/s [{c['copy_desc']}]; "
        f"GEMM {c['gemm_tflops']:.3g} TFLOP/s [{c['gemm_desc']}]",
    ]


def format_text(result: Dict[str, Any], *, show_skipped: bool = False) -> str:
    rows = [r for r in result["rows"] if show_skipped or r.get("status") != "skipped"]
    columns = _columns(result)
    body = [_all_cells(r, columns) for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(columns)]
    widths = [min(w, 60) for w in widths]

    def line(cells):
        return "  ".join(c[:w].ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = _header_lines(result) + ["", line(columns), line(["-" * w for w in widths])]
    out += [line(b) for b in body]
    out += _skip_summary(result)
    return "\n".join(out)


def _skip_summary(result: Dict[str, Any]) -> List[str]:
    out = []
    counts: Dict[str, int] = {}
    for r in result["rows"]:
        if r.get("status") == "skipped":
            counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    if counts:
        out.append("")
        out.append(f"skipped rows ({sum(counts.values())}):")
        out += [f"  {n:4d} x {reason}" for reason, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    errors = [r for r in result["rows"] if r.get("status") == "error"]
    if errors:
        out.append(f"rows that raised ({len(errors)}): see the JSON for tracebacks")
    for s in result["skipped_modules"]:
        out.append(f"skipped module {s['module']}: {s['reason']}")
    return out


def format_markdown(result: Dict[str, Any]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    m = result["meta"]
    lines = [f"# uvit-fast bench: {m['device']}", ""]
    lines += [f"- {esc(h)}" for h in _header_lines(result)]
    lines += [f"- suite: {m['suite']}; {m['seconds']:.0f} s", ""]
    columns = _columns(result)
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    for r in result["rows"]:
        if r.get("status") == "skipped":
            continue
        lines.append("| " + " | ".join(esc(c) for c in _all_cells(r, columns)) + " |")
    summary = _skip_summary(result)
    if summary:
        lines += ["", "```"] + [s for s in summary if s] + ["```"]
    return "\n".join(lines) + "\n"


def save(result: Dict[str, Any], out: str, md: Optional[str] = None) -> Tuple[str, str]:
    """Write the JSON (``out``) and the markdown table (``md``, default: ``out`` with ``.md``)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = dict(result)
    clean["rows"] = [{k: v for k, v in r.items() if _jsonable(v)} for r in result["rows"]]
    path.write_text(json.dumps(clean, indent=1, allow_nan=False) + "\n")
    md_path = Path(md) if md else path.with_suffix(".md")
    md_path.write_text(format_markdown(result))
    return str(path), str(md_path)


def output_path_error(path: str, flag: str) -> Optional[str]:
    """Why ``path`` (a file to write) cannot be written, or None: checked before any work runs,
    so a typo in ``--out`` / ``--md`` costs nothing. Missing folders are fine (``save`` creates
    them) as long as the nearest existing one is a writable folder."""
    p = Path(path)
    if p.is_dir():
        return f"{flag} {path}: is a folder; give a file name"
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{flag} {path}: {parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{flag} {path}: folder {parent} is not writable"
    return None


def results_dir() -> Path:
    """``benchmarks/results`` of the source checkout this package runs from (an editable
    install), else ``benchmarks/results`` under the current directory."""
    root = Path(__file__).resolve().parents[2]
    checkout = root / BENCH_RESULTS_DIR
    if checkout.is_dir() and (root / "pyproject.toml").is_file():
        return checkout
    return Path.cwd() / BENCH_RESULTS_DIR


def default_out(device: torch.device, suite: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()[:40]
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(results_dir() / f"uvit-fast-bench-{suite}-{slug}-{stamp}.json")


# ----------------------------------------------------------------------------------------------
# CLI

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def run(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    quick = args.quick if args.quick is not None else os.environ.get(QUICK_ENV, "0").strip() not in ("", "0")
    if args.max_shapes is not None and args.max_shapes < 1:
        print("uvit-fast bench: --max-shapes must be >= 1", file=sys.stderr)
        return 2
    if args.time_budget is not None and not args.time_budget > 0:
        print("uvit-fast bench: --time-budget must be > 0", file=sys.stderr)
        return 2
    for path, flag in ((args.out, "--out"), (args.md, "--md")):
        problem = output_path_error(path, flag) if path else None
        if problem:
            print(f"uvit-fast bench: {problem}", file=sys.stderr)
            return 2
    policy = Policy(device, quick=quick, cpu_compile=args.cpu_compile, max_shapes=args.max_shapes,
                    time_budget=args.time_budget, providers=args.provider)
    if device.type != "cuda":
        print("uvit-fast bench: no CUDA device: running the CPU rows only (GPU rows are reported as skipped)",
              file=sys.stderr)
    try:
        sampling = None
        if args.suite == "sampling":
            sampling = {"depth": getattr(args, "depth", None), "width": getattr(args, "width", None) or 64}
        elif getattr(args, "depth", None) is not None or getattr(args, "width", None) is not None:
            raise ValueError("bench: --depth and --width apply only to --suite sampling")
        result = run_suite(args.suite, device, dtype, policy, ops=args.op, progress=args.progress, sampling=sampling)
    except ValueError as exc:
        print(f"uvit-fast {exc}", file=sys.stderr)
        return 2
    print(format_text(result, show_skipped=args.show_skipped))
    out = args.out or default_out(device, args.suite)
    json_path, md_path = save(result, out, args.md)
    print(f"\nresults: {json_path} and {md_path}")
    errors = sum(r.get("status") == "error" for r in result["rows"])
    return 1 if (args.strict and (errors or result["skipped_modules"])) else 0
