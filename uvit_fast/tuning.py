"""``uvit_fast.tune`` and ``uvit-fast tune``: pre-tune every fused op a model runs.

:func:`tune` runs the model once (forward, and for ``training=True`` a backward too) with
measured dispatch on (see :mod:`uvit_fast.dispatch`), so every op of the model times its
candidates for this shape now, not during the first training steps, and stores the decisions
in the cache file. In a distributed run rank 0 measures and broadcasts its decisions (one
``broadcast_object_list``, outside any forward), and the other ranks install them, so every
rank runs the same kernels.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import json
import os
import sys
from typing import Any, Dict, List

import torch

from uvit_fast import dispatch
from uvit_fast.dispatch import Decision


@dataclasses.dataclass
class TuneReport:
    """The decisions one :func:`tune` call took (or found stored), by key; ``str()`` prints them
    with every candidate's time."""

    decisions: Dict[str, Decision]

    @property
    def choices(self) -> Dict[str, str]:
        return {k: d.choice for k, d in self.decisions.items()}

    def __str__(self) -> str:
        if not self.decisions:
            return ("tune: no fused op measured (nothing to decide): the model runs none with backend='auto' "
                "(fused=False, backend= or use_backend(...) force a path), or Triton cannot run on its tensors "
                "(CPU tensors need TRITON_INTERPRET=1 set before triton is imported)")
        return dispatch.format_decisions(self.decisions)


def _off() -> bool:
    return os.environ.get(dispatch.ENV_TUNE, "").strip().lower() in ("0", "off", "false", "no")


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _run(model: torch.nn.Module, inputs: tuple, kwargs: Dict[str, Any], training: bool) -> None:
    if not training:
        with torch.no_grad():
            model(*inputs, **kwargs)
        return
    with torch.enable_grad():
        outs = [o for o in dispatch._outputs(model(*inputs, **kwargs)) if o.requires_grad]
        params = [p for p in model.parameters() if p.requires_grad]
        if outs and params:  # autograd.grad, not backward: the user's .grad stays as it was
            torch.autograd.grad(sum(o.float().sum() for o in outs), params, allow_unused=True)


def tune(model: torch.nn.Module, *example_inputs: Any, training: bool = True, **example_kwargs: Any) -> TuneReport:
    """Time every fused op ``model`` runs on ``example_inputs`` and keep the faster path per op.

    Measures even where ``auto`` would not by default (CPU tensors under ``TRITON_INTERPRET=1``):
    calling ``tune`` is the request. ``UVIT_FAST_TUNE=0`` (timing off) is a RuntimeError.
    Decisions already stored for a key (this process, or the cache file) are reported as they are,
    not re-timed. Ops called with ``backend="torch"``/``"triton"`` or under ``use_backend`` are not timed.

    ``training=True`` runs the forward with autograd on and takes the gradient of the outputs
    (``torch.autograd.grad``: the parameters' ``.grad`` are left alone), so the decisions are the
    training keys, timed forward plus backward; ``training=False`` runs under ``torch.no_grad()``.
    Run it under the ``torch.autocast`` and with the batch that training or sampling will use.

    Distributed (``torch.distributed`` initialised, world size > 1): every rank must call it;
    rank 0 runs the model and broadcasts the decisions, the others install them (they do not run
    the model, so pass the bare model, not a DistributedDataParallel wrapper: its forward would
    wait for the other ranks; a ``.module`` is unwrapped for you).
    """
    if _off():
        raise RuntimeError(f"uvit_fast.tune: {dispatch.ENV_TUNE}=0 turns timing off; unset it to tune")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"uvit_fast.tune: model must be an nn.Module; got {type(model).__name__}")
    model = getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model
    distributed = _distributed()
    rank = torch.distributed.get_rank() if distributed else 0
    keys: List[str] = []
    if rank == 0:
        with dispatch.forced() as keys:
            _run(model, example_inputs, example_kwargs, training)
    table = dispatch.dispatcher().decisions()
    mine = {k: table[k] for k in dict.fromkeys(keys) if k in table}
    if distributed:
        payload = [{k: d.to_json() for k, d in mine.items()} if rank == 0 else None]
        torch.distributed.broadcast_object_list(payload, src=0)
        if rank != 0:
            mine = {k: Decision.from_json(k, v, "broadcast") for k, v in payload[0].items()}
            dispatch.dispatcher().install(mine)
            mine = {k: dispatch.dispatcher().decisions()[k] for k in mine}
    return TuneReport(mine)


# ----------------------------------------------------------------------------------------------
# uvit-fast tune MODEL [--batch B] [--training]


def _override(text: str):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set takes KEY=VALUE (a create_model override, e.g. depth=2); got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def run(args: argparse.Namespace) -> int:
    """The ``uvit-fast tune`` subcommand: build ``MODEL`` with ``create_model`` (plus ``--set``
    overrides) on the current device, tune it on the model's own ``example_inputs``, print the report."""
    from uvit_fast.models import create_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        overrides = dict(_override(s) for s in args.set or ())
        model = create_model(args.model, **overrides)
    except (ValueError, TypeError) as exc:  # unknown name or override: one line, not a traceback
        print(f"uvit-fast tune: {exc}", file=sys.stderr)
        return 2
    model = model.to(device)
    model.train(args.training)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    inputs = model.example_inputs(args.batch, device=device)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    with autocast:
        report = tune(model, *inputs, training=args.training)
    if args.json:
        for k, d in report.decisions.items():
            print(json.dumps({"key": k, "source": d.source, **d.to_json()}))
    else:
        mode = "training (forward + backward)" if args.training else "inference"
        print(f"uvit-fast tune {args.model}: batch {args.batch}, {mode}, {dtype} on {dispatch.device_name(device)}"
              f"{' (CPU timings)' if device.type == 'cpu' else ''}; cache {dispatch.dispatcher().cache.path}")
        print(report)
    return 0
