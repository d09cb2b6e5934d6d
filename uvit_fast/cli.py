"""The ``uvit-fast`` command line: ``info`` and ``models`` here, ``profile`` and ``bench`` in their modules.

The parser comes from :mod:`uvit_fast.cli_args`, which imports no torch, so every ``--help``
answers at once; this module imports torch (and the module that runs a subcommand) only when
a subcommand runs.
"""
from __future__ import annotations

import argparse
import importlib
import platform
import sys
from typing import Any, Callable, Dict, List, Optional

from uvit_fast import __version__
from uvit_fast.cli_args import SUBCOMMANDS

__all__ = ["SUBCOMMANDS", "build_parser", "info", "main", "model_rows", "run_info", "run_models"]


def _version(module: str) -> Optional[str]:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - an unimportable module is simply absent
        return None
    return getattr(mod, "__version__", "unknown")


def info() -> Dict[str, object]:
    """Versions of Python, torch, triton, the CUDA device and the importable attention backends."""
    import torch

    import uvit_fast

    out: Dict[str, object] = {
        "uvit_fast": uvit_fast.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda_available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name()
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    from uvit_fast import _backend, dispatch

    # the Triton kernels run on CUDA tensors, or on CPU tensors under the interpreter
    interpreter = _backend.interpreter_enabled()
    backends = ["torch", "sdpa"]
    if out["triton"] is not None and (torch.cuda.is_available() or interpreter):
        backends.append("triton (interpreter)" if interpreter and not torch.cuda.is_available() else "triton")
    for name, module in (("flash_attn", "flash_attn"), ("xformers", "xformers.ops")):
        if _version(module) is not None and torch.cuda.is_available():
            backends.append(name)
    out["attention_backends"] = backends
    # what backend="auto" does here (README "Choosing the backend")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out["auto_measures"] = _backend.measuring(device)
    out["tune_cache"] = str(dispatch.default_cache_path())
    return out


def run_info(args: argparse.Namespace) -> int:
    data = info()
    if args.json:
        import json

        print(json.dumps(data))
    else:
        width = max(map(len, data))
        for k, v in data.items():
            print(f"{k:<{width}}  {', '.join(v) if isinstance(v, list) else v}")
    return 0


def model_rows(name_filter: Optional[str] = None) -> List[Dict[str, Any]]:
    """One row per ``create_model`` name matching ``name_filter`` (see :func:`uvit_fast.models.filter_models`):
    class, tokens, parameters and forward GFLOPs of one sample, counted by the profiler on the meta device."""
    from uvit_fast.models import filter_models
    from uvit_fast.profiler import count_flops

    rows = []
    for name in filter_models(name_filter):
        r = count_flops(name)
        rows.append({k: r[k] for k in ("model", "arch", "img_size", "patch_size", "tokens", "params", "gmacs", "gflops")})
    return rows


def run_models(args: argparse.Namespace) -> int:
    from uvit_fast.models import suggest_models

    rows = model_rows(args.filter)
    if not rows:
        hint = suggest_models(args.filter)
        print(f"uvit-fast models: no model name matches {args.filter!r}"
              + (f"; did you mean {', '.join(hint)}?" if hint else "; run 'uvit-fast models' for all names"),
              file=sys.stderr)
        return 2
    if args.json:
        import json

        for row in rows:
            print(json.dumps(row))
        return 0
    header = ("model", "class", "tokens", "params", "GFLOPs", "GMACs")
    table = [header] + [
        (r["model"], r["arch"], str(r["tokens"]), f"{r['params'] / 1e6:.1f}M", f"{r['gflops']:.2f}", f"{r['gmacs']:.2f}")
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("\nGFLOPs: forward, one sample, counted on the meta device (= 2 x GMACs; the papers' "
          "'GFLOPs' are GMACs); tokens include U-ViT's extra tokens.")
    return 0


# the old name of the ``info`` runner
run = run_info


def build_parser() -> argparse.ArgumentParser:
    """The whole ``uvit-fast`` parser (imports no torch: see :mod:`uvit_fast.cli_args`)."""
    from uvit_fast.cli_args import build_parser as _build

    return _build(__version__)


def _run_function(target: str) -> Callable[[argparse.Namespace], int]:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function or "run")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(_run_function(args._run)(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
