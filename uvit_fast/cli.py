"""The ``uvit-fast`` command line: ``info``, plus the subcommands other modules register."""
from __future__ import annotations

import argparse
import importlib
import platform
import sys
from typing import Callable, Dict, List, Optional

# name -> (module, help); each module has ``add_arguments(parser)`` and ``run(args) -> int``
SUBCOMMANDS: Dict[str, tuple] = {
    "info": ("uvit_fast.cli", "versions, devices and available attention backends"),
    "profile": ("uvit_fast.profiler", "parameters and GFLOPs against token count, optionally timed"),
    "bench": ("uvit_fast.bench.runner", "benchmark every op and model against eager, compile and SDPA"),
}


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
    backends = ["torch", "sdpa"]
    if out["triton"] is not None:
        backends.append("triton")
    for name, module in (("flash_attn", "flash_attn"), ("xformers", "xformers.ops")):
        if _version(module) is not None:
            backends.append(name)
    out["attention_backends"] = backends
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    data = info()
    if args.json:
        import json

        print(json.dumps(data))
    else:
        width = max(map(len, data))
        for k, v in data.items():
            print(f"{k:<{width}}  {', '.join(v) if isinstance(v, list) else v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uvit-fast", description="Fused Triton kernels for U-ViT / DiT / ViT.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            p.set_defaults(_missing=True)
            continue
        mod.add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "_missing", False):
        print(f"uvit-fast {args.command}: not available in this build", file=sys.stderr)
        return 2
    run_fn: Callable[[argparse.Namespace], int] = importlib.import_module(args._module).run
    return int(run_fn(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
