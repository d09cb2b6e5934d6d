"""Every ``uvit-fast`` subcommand's arguments, without importing torch.

``uvit-fast --help`` and ``uvit-fast SUBCOMMAND --help`` build the whole parser from this
module alone, so they answer at once instead of after torch's and triton's import time. The
work of a subcommand is the function ``SUBCOMMANDS[name].run`` (``"module:function"``, called
as ``function(args) -> int``), whose module is imported only when that subcommand runs.

To add a subcommand: write its ``add_<name>_arguments(parser)`` here (stdlib only: no torch,
no numpy, no ``uvit_fast`` module that imports them), and add one :class:`Subcommand` entry
to :data:`SUBCOMMANDS`. ``tests/test_cli.py`` checks that every entry's ``--help`` leaves
torch unimported.
"""
from __future__ import annotations

import argparse
from typing import Callable, Dict, List, NamedTuple

# names of the dtypes the subcommands accept (the modules that run map them to torch dtypes)
DTYPE_NAMES = ("bf16", "fp16", "fp32")

# profile: on a CPU, rows above this many GFLOPs per forward are not timed unless --force
PROFILE_CPU_MAX_GFLOPS = 20.0

# bench: environment variable for --quick; CPU time budgets (seconds per op, per case), normal / quick
BENCH_QUICK_ENV = "UVIT_FAST_BENCH_QUICK"
BENCH_CPU_BUDGET = (20.0, 2.0)
BENCH_CPU_BUDGET_QUICK = (6.0, 0.5)
BENCH_RESULTS_DIR = "benchmarks/results"


# profile --memory: the GPUs of the roofline table (uvit_fast.memory.GPUS) and the size units
PROFILE_GPUS = ("a100", "h100", "h200")
_SIZE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``"80GiB"``, ``"80GB"``, ``"141 GB"``, ``"40960MiB"`` -> bytes (GB = 1e9, GiB = 2**30);
    ValueError naming ``--gpu-memory`` otherwise."""
    import re

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"--gpu-memory must be a size with a unit, like 80GiB, 80GB or 40960MiB; got {text!r}")
    value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    if value <= 0:
        raise ValueError(f"--gpu-memory must be positive; got {text!r}")
    return value


def memory_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class Subcommand(NamedTuple):
    run: str  # "module:function"; the module is imported only to run, as function(args) -> int
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer; got {text!r}")
    return value


def parse_patch_sizes(text: str) -> List[int]:
    try:
        sizes = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--patch-sizes must be comma-separated integers like 1,2,4; got {text!r}"
        ) from None
    if not sizes or any(p <= 0 for p in sizes):
        raise argparse.ArgumentTypeError(f"--patch-sizes must be positive integers; got {text!r}")
    return sizes


# ----------------------------------------------------------------------------------------------
# one function per subcommand


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("filter", nargs="?", default=None, metavar="FILTER", help=(
        "only names containing FILTER (case-insensitive; '-', '_' and '/' are ignored, so 'dit', "
        "'DiT-XL' and 'uvit_huge' all work); default: every name create_model accepts"))
    parser.add_argument("--json", action="store_true", help="print one JSON object per model")


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", metavar="NAME", help=(
        "a create_model name (repeat, or comma-separate, for several); default: every U-ViT and DiT preset "
        "at its own size plus patch-size sweeps of U-ViT-H"))
    parser.add_argument("--img-size", type=positive_int, metavar="N", help=(
        "image size the model is built for (U-ViT img_size / DiT input_size; for latent models the latent "
        "size, e.g. 32 for 256 px)"))
    parser.add_argument("--patch-sizes", type=parse_patch_sizes, metavar="P,P,...", help=(
        "one row per patch size, e.g. 1,2,4,8 (default: the preset's own)"))
    parser.add_argument("--batch", type=positive_int, metavar="B", help=(
        "also time a forward of B samples on the current device (CUDA if present, else CPU); with --memory "
        "on a GPU, also a training step of B samples with its measured peak memory, and B is the batch of "
        "the roofline model (default 64)"))
    parser.add_argument("--memory", action="store_true", help=(
        "also count, on the meta device, fused and plain: activation bytes saved for backward per sample, "
        "weight/gradient/AdamW bytes, the largest training batch that fits, HBM bytes per forward and per "
        "training step, arithmetic intensity and a roofline lower bound (all modelled, none measured)"))
    parser.add_argument("--gpu", choices=PROFILE_GPUS, type=str.lower, help=(
        "GPU of the --memory roofline (peak dense bf16 FLOP/s and HBM bandwidth from its datasheet; default h100)"))
    parser.add_argument("--gpu-memory", type=memory_size, metavar="SIZE", help=(
        "memory the largest batch must fit in, e.g. 80GiB or 141GB (default: the --gpu's own)"))
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES),
                        help="dtype for --batch timing (default bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--no-fused", dest="fused", action="store_false", help="time the plain PyTorch path (fused=False)")
    parser.add_argument("--force", action="store_true",
                        help=f"on CPU, also time rows above {PROFILE_CPU_MAX_GFLOPS:.0f} GFLOPs per forward")
    parser.add_argument("--json", action="store_true", help="print one JSON object per row on stdout")
    parser.add_argument("--plot", metavar="FILE.png", help="write a log-log plot of GFLOPs against tokens (needs matplotlib)")
    parser.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                        help="no progress bar (it goes to stderr, and only when stderr is a terminal by default)")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", choices=("ops", "models", "sampling", "all"), default="all", help=(
        "what to run (default all = ops + models; sampling: time per guided DDIM step on CUDA and host time per "
        "op call and per forward, run on its own)"))
    parser.add_argument("--out", metavar="FILE.json", help=(
        "JSON results file; the markdown table goes next to it with .md (default: "
        f"{BENCH_RESULTS_DIR}/uvit-fast-bench-SUITE-DEVICE-DATE.json, in the source checkout when run from one, "
        "else under the current directory)"))
    parser.add_argument("--md", metavar="FILE.md", help="markdown table path (default: --out with .md)")
    parser.add_argument("--op", action="append", metavar="NAME", help=(
        "only these case modules (repeatable; an unknown name is an error that lists the valid ones)"))
    parser.add_argument("--provider", action="append", metavar="NAME", help=(
        "only these providers (repeatable; an unknown name is an error that lists the valid ones)"))
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help="benchmark dtype (default bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--quick", action="store_true", default=None, help=(
        f"fewer repetitions and smaller time budgets (also: {BENCH_QUICK_ENV}=1)"))
    parser.add_argument("--max-shapes", type=positive_int, metavar="N",
                        help="run only the first N shapes of each op (default: 1 on CPU, all on CUDA)")
    parser.add_argument("--time-budget", type=float, metavar="S", help=(
        f"seconds per op before its remaining rows are skipped (default: {BENCH_CPU_BUDGET[0]:.0f} on CPU, "
        f"{BENCH_CPU_BUDGET_QUICK[0]:.0f} with --quick; no limit on CUDA). --suite sampling on CUDA: seconds for "
        "all its DDIM-step rows"))
    parser.add_argument("--cpu-compile", action="store_true", help="on CPU, also run the torch.compile rows")
    parser.add_argument("--depth", type=nonnegative_int, metavar="N", help=(
        "--suite sampling: build the presets with N blocks instead of their own depth (tests; default: the preset's)"))
    parser.add_argument("--width", type=positive_int, metavar="D", help=(
        "--suite sampling: width of the host-time forwards (2 heads; default 64)"))
    parser.add_argument("--strict", action="store_true", help="exit 1 when a row raised or a case module was skipped")
    parser.add_argument("--show-skipped", action="store_true", help="list skipped rows in the printed table too")
    parser.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                        help="no progress bar (stderr; shown only on a terminal by default)")


# kernels: what `uvit_fast.kernel_report` knows (kept here so --help imports neither torch nor triton)
KERNEL_REPORT_ARCHS = ("sm_90", "sm_80")
KERNEL_REPORT_SHAPES = ("uvit-h2", "dit-xl2", "uvit-m4", "clip-l14-text", "clip-l14-vision", "vivit-b")
KERNEL_REPORT_OPS = ("adaln", "adaln_residual", "patchify", "decoder", "skip_linear", "attention", "fused_linear",
                     "fp8_linear")


def add_kernels_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=KERNEL_REPORT_ARCHS, default="sm_90", help=(
        "GPU to compile for, without needing one: sm_90 (H100/H200) or sm_80 (A100); default sm_90"))
    parser.add_argument("--shape", action="append", choices=KERNEL_REPORT_SHAPES, help=(
        "only this model's shapes (repeatable; default all)"))
    parser.add_argument("--op", action="append", choices=KERNEL_REPORT_OPS, help="only this op (repeatable; default all)")
    parser.add_argument("--kernel", action="append", metavar="NAME", help=(
        "only kernels whose name contains NAME, e.g. _attn_fwd or dkdv (repeatable; others are not compiled)"))
    parser.add_argument("--dtype", action="append", choices=DTYPE_NAMES, help="only this dtype (repeatable; default all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per compiled config")
    parser.add_argument("--cache-dir", metavar="DIR", help=(
        "Triton cache directory (default: Triton's own, ~/.triton/cache or TRITON_CACHE_DIR); a warm cache "
        "turns the hour-long cold sweep into minutes"))
    parser.add_argument("--strict", action="store_true", help="exit 1 when a config failed to compile")
    parser.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                        help="no progress bar (stderr; shown only on a terminal by default)")


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a create_model name, e.g. DiT-XL/2 or imagenet256_uvit_huge")
    parser.add_argument("--batch", type=positive_int, default=1, metavar="B", help="batch size to tune for (default 1)")
    parser.add_argument("--training", action="store_true", help=(
        "tune the training keys (forward + backward timed together); default: inference"))
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), help=(
        "autocast dtype (weights stay fp32; default bf16 on CUDA, fp32 = no autocast on CPU)"))
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help=(
        "a create_model override (repeatable), e.g. --set depth=2 --set img_size=32"))
    parser.add_argument("--json", action="store_true", help="print one JSON object per decision")


# name -> Subcommand; the order is the order of ``uvit-fast --help``
SUBCOMMANDS: Dict[str, Subcommand] = {
    "info": Subcommand("uvit_fast.cli:run_info", "versions, devices and available attention backends", add_info_arguments),
    "models": Subcommand("uvit_fast.cli:run_models", "every create_model name with its class, tokens, parameters and GFLOPs",
                         add_models_arguments),
    "profile": Subcommand("uvit_fast.profiler:run", "parameters and GFLOPs against token count, optionally timed",
                          add_profile_arguments),
    "bench": Subcommand("uvit_fast.bench.runner:run", "benchmark every op and model against eager, compile and SDPA",
                        add_bench_arguments),
    "kernels": Subcommand("uvit_fast.kernel_report:run", "compile every kernel for sm_90/sm_80 without a GPU: registers, "
                          "spills, shared memory, MMA, load widths, async copies", add_kernels_arguments),
    "tune": Subcommand("uvit_fast.tuning:run", "time every fused op of a model against PyTorch once and keep the faster "
                       "(stored in the tuning cache)", add_tune_arguments),
}


def build_parser(version: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uvit-fast", description="Fused Triton kernels for U-ViT / DiT / ViT.")
    parser.add_argument("--version", action="version", version=f"uvit-fast {version}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        p.set_defaults(_run=command.run)
        command.add_arguments(p)
    return parser
