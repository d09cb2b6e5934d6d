"""Collection helpers shared by the benchmark files (not a test module)."""
from __future__ import annotations

from typing import Dict, List, Optional

import pytest
import torch

from uvit_fast.bench import runner
from uvit_fast.bench.core import Case, raise_recompile_limits

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32

_current: Dict[str, object] = {}
# set by conftest.py from pytest's --cpu-compile and --max-shapes (the names uvit-fast bench uses)
OPTIONS: Dict[str, object] = {"cpu_compile": False, "max_shapes": None}


def _policy(device: torch.device) -> runner.Policy:
    return runner.Policy(device, cpu_compile=bool(OPTIONS["cpu_compile"]), max_shapes=OPTIONS["max_shapes"])


def collect(modules: List[str], device: torch.device, dtype: torch.dtype):
    """``pytest.param(module, index, skip_reason)`` for every case of ``modules``; a module that
    cannot give cases becomes one skipped param carrying its error."""
    raise_recompile_limits()
    policy = _policy(device)
    params = []
    for module in modules:
        cases, reason = runner.load_cases(module, device, dtype)
        if reason is not None:
            params.append(pytest.param(module, -1, f"{module}: {reason}", id=f"{module}-unavailable"))
            continue
        shapes: Dict[str, Dict[str, int]] = {}
        for i, case in enumerate(cases):
            per_op = shapes.setdefault(case.op, {})
            idx = per_op.setdefault(case.shape, len(per_op))
            why = policy.skip_reason(case, idx)
            params.append(pytest.param(module, i, why, id=_id(case)))
        del cases
    return params


def _id(case: Case) -> str:
    return f"{case.op}|{case.shape}|{case.pass_}|{case.provider}".replace(" ", "_")


def get_case(module: str, index: int, device: torch.device, dtype: torch.dtype) -> Case:
    """The case, from a cache holding one module's cases at a time."""
    if _current.get("module") != module:
        _current.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        cases, reason = runner.load_cases(module, device, dtype)
        if reason is not None:
            pytest.skip(f"{module}: {reason}")
        _current.update(module=module, cases=cases)
    return _current["cases"][index]  # type: ignore[index]


def bench_case(benchmark, module: str, index: int, skip: Optional[str], device: torch.device, dtype: torch.dtype) -> None:
    if skip is not None:
        pytest.skip(skip)
    case = get_case(module, index, device, dtype)
    cuda = device.type == "cuda"

    def call():
        case.fn()
        if cuda:
            torch.cuda.synchronize(device)

    call()  # untimed: lazy allocation and compilation
    rounds, warmup = (20, 3) if cuda else (3, 1)
    benchmark.extra_info.update(
        suite=case.suite, op=case.op, shape=case.shape, pass_=case.pass_, provider=case.provider,
        bytes=case.bytes, flops=case.flops, device=runner.device_name(device), dtype=str(dtype),
    )
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=warmup, iterations=1)
    median = benchmark.stats.stats.median  # seconds
    if case.bytes:
        benchmark.extra_info["gbps"] = case.bytes / median / 1e9
    if case.flops:
        benchmark.extra_info["tflops"] = case.flops / median / 1e12
    batch = case.extra.get("batch")
    if isinstance(batch, int):
        benchmark.extra_info["samples_per_s"] = batch / median


__all__ = ["collect", "bench_case", "DEVICE", "DTYPE"]
