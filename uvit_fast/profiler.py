"""``uvit-fast profile``: parameters and forward FLOPs against token count, optionally timed.

FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` on models built on
the ``meta`` device (no memory, no arithmetic), so even U-ViT-H at patch size 1 counts in a
fraction of a second on a CPU. Counting uses the plain PyTorch path of the models
(``fused=False``): it does the same multiply-adds as the fused path, and every op in it has a
FLOP formula in torch (on ``meta``, scaled-dot-product attention runs as two ``bmm``).

Conventions (each row says both, named so they cannot be confused):

* ``gmacs``: multiply-adds x 1e-9, forward pass, one sample. This is what the U-ViT and DiT
  papers call "GFLOPs" (fvcore's convention): U-ViT-H/2 is 133 and DiT-XL/2 is 119.
* ``gflops`` = 2 x ``gmacs``: floating-point operations, what ``torch.utils.flop_counter``
  reports and what "achieved TFLOP/s" is measured against.
* ``attn_share``: the fraction of the FLOPs in the attention matmuls (``Q K^T`` and ``P V``);
  the linear layers are the rest, apart from the small patch-embedding and output convolutions.
* ``tokens``: every token the transformer blocks see, extras included (U-ViT's time and label
  tokens, U-ViT-T2I's 77 text tokens), for one sample.

With ``--batch B`` each row is also timed on the current device (CUDA when present, else the
CPU; rows say which), forward only, under ``torch.inference_mode``.
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

# the command-line arguments are defined in the torch-free uvit_fast.cli_args (so --help is instant)
from uvit_fast.cli_args import PROFILE_CPU_MAX_GFLOPS
from uvit_fast.cli_args import add_profile_arguments as add_arguments  # noqa: F401
from uvit_fast.models import create_model, list_models, model_config

# Default run: every preset at its own size, plus patch-size sweeps of U-ViT-H.
DEFAULT_SWEEPS: Dict[str, Tuple[int, ...]] = {
    "imagenet256_uvit_huge": (1, 2, 4, 8),
    "imagenet512_uvit_huge": (1, 2, 4, 8),
}
# On a CPU, --batch times only rows whose forward over the whole batch is at most this many
# GFLOPs (a few seconds on a laptop-class CPU); --force times the others too.
CPU_MAX_GFLOPS = PROFILE_CPU_MAX_GFLOPS

_ATTENTION_OPS = ("bmm", "baddbmm")  # SDPA on meta / the math backend; named attention ops too


@dataclass(frozen=True)
class Plan:
    """One row to profile: a ``create_model`` name at an image size and patch size
    (``None`` = the preset's own)."""

    model: str
    img_size: Optional[int] = None
    patch_size: Optional[int] = None


def _is_dit(name: str) -> bool:
    return "hidden_size" in model_config(name)


def _size_key(name: str) -> str:
    """The constructor argument that holds the (latent) image size: DiT's ``input_size``,
    U-ViT's ``img_size``."""
    return "input_size" if _is_dit(name) else "img_size"


def series_name(name: str) -> str:
    """The line a row belongs to in the plot: DiT's ``/p`` suffix names a patch size, so
    ``DiT-XL/2``, ``DiT-XL/4`` and ``DiT-XL/8`` are one model, ``DiT-XL``."""
    return re.sub(r"/\d+$", "", name) if _is_dit(name) else name


def build_model(name: str, img_size: Optional[int] = None, patch_size: Optional[int] = None, **overrides: Any):
    """``create_model(name)`` with the image size / patch size replaced where given; checks
    that the patch size divides the image size and says so by name."""
    if name not in list_models():
        raise ValueError(f"profile: unknown model {name!r}; choose from: {', '.join(list_models())}")
    cfg = model_config(name)
    key = _size_key(name)
    size = img_size if img_size is not None else cfg.get(key, 32)
    patch = patch_size if patch_size is not None else cfg.get("patch_size", 2)
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"profile: --img-size must be a positive integer; got {size!r} for {name}")
    if not isinstance(patch, int) or patch <= 0:
        raise ValueError(f"profile: patch sizes must be positive integers; got {patch!r} for {name}")
    if size % patch:
        raise ValueError(
            f"profile: patch size {patch} does not divide the image size {size} of {name} "
            f"({key}; for latent models this is the latent size, e.g. 32 for 256 px)"
        )
    overrides = {key: size, "patch_size": patch, **overrides}
    return create_model(name, **overrides), size, patch


def count_flops(
    name: str, img_size: Optional[int] = None, patch_size: Optional[int] = None, **overrides: Any
) -> Dict[str, Any]:
    """Parameters and forward FLOPs of one sample, counted on the meta device (``overrides``
    go to ``create_model``, e.g. ``depth=4``)."""
    from torch.utils.flop_counter import FlopCounterMode

    overrides["fused"] = False
    with torch.device("meta"):
        model, size, patch = build_model(name, img_size, patch_size, **overrides)
        inputs = model.example_inputs(1, device="meta")
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*inputs)
    total = counter.get_total_flops()
    per_op = counter.get_flop_counts().get("Global", {})
    attn = sum(n for op, n in per_op.items() if _is_attention_op(op))
    params = sum(p.numel() for p in model.parameters())
    return {
        "model": name,
        "series": series_name(name),
        "arch": type(model).__name__,
        "img_size": size,
        "patch_size": patch,
        "tokens": _tokens(model),
        "params": int(params),
        "flops": int(total),
        "gmacs": total / 2e9,
        "gflops": total / 1e9,
        "attn_share": attn / total if total else 0.0,
        "flops_by_op": {str(op): int(n) for op, n in per_op.items()},
    }


def _tokens(model) -> int:
    """Tokens of one sequence: ``num_tokens`` where the model has it (ViT, ViViT, CLIP's image
    tower), else the length of ``pos_embed`` (U-ViT: extras + patches; DiT: patches)."""
    n = getattr(model, "num_tokens", None)
    if isinstance(n, int):
        return n
    return int(model.pos_embed.shape[1])


def family(name: str) -> str:
    """The model class of a preset (``UViT``, ``UViTT2I``, ``DiT``, ``ViT``, ...), from a meta build."""
    return _family(name)


@functools.lru_cache(maxsize=None)
def _family(name: str) -> str:
    with torch.device("meta"):
        return type(create_model(name, fused=False)).__name__


def _is_attention_op(op: Any) -> bool:
    name = str(op)
    short = name.split(".")[1] if "." in name else name
    return "attention" in name or short in _ATTENTION_OPS


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def time_forward(
    row: Dict[str, Any],
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    *,
    fused: bool = True,
    force: bool = False,
    warmup: int = 2,
    rep: int = 10,
) -> Dict[str, Any]:
    """Time ``batch`` samples through the model of ``row`` (from :func:`count_flops`) on
    ``device``; returns the timing fields (or ``timing_skipped`` with the reason)."""
    from uvit_fast.bench.core import time_fn

    out: Dict[str, Any] = {"device": device_label(device), "dtype": str(dtype).replace("torch.", ""), "batch": batch}
    work = row["gflops"] * batch
    if device.type == "cpu" and work > CPU_MAX_GFLOPS and not force:
        out["timing_skipped"] = (
            f"{work:.0f} GFLOPs per forward is too much for a CPU (limit {CPU_MAX_GFLOPS:.0f}); "
            "pass --force to time it anyway"
        )
        return out
    with torch.device(device):
        model, _, _ = build_model(row["model"], row["img_size"], row["patch_size"], fused=fused)
    model = model.to(dtype).eval()
    inputs = model.example_inputs(batch, device=device, dtype=dtype)
    if device.type == "cpu":
        warmup, rep = min(warmup, 1), min(rep, 5)
    with torch.inference_mode():
        t = time_fn(lambda: model(*inputs), device, warmup=warmup, rep=rep)
    model = inputs = None  # free before the next row
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out.update(t)
    out["samples_per_s"] = batch / (t["ms"] * 1e-3)
    out["tflops"] = work / t["ms"]  # GFLOP / ms = TFLOP / s
    return out


DEFAULT_FAMILIES = ("UViT", "UViTT2I", "DiT")


def default_plan() -> List[Plan]:
    """Every U-ViT and DiT preset at its own size; U-ViT-H (256 and 512 px) swept over patch
    sizes. (The ViT / ViViT / CLIP presets are profiled when named with ``--model``.)"""
    plan: List[Plan] = []
    for name in list_models():
        if family(name) not in DEFAULT_FAMILIES:
            continue
        if name in DEFAULT_SWEEPS:
            plan.extend(Plan(name, None, p) for p in DEFAULT_SWEEPS[name])
        else:
            plan.append(Plan(name))
    return plan


def make_plan(models: Sequence[str], img_size: Optional[int], patch_sizes: Optional[Sequence[int]]) -> List[Plan]:
    plan = []
    for name in models:
        if name not in list_models():
            raise ValueError(f"profile: unknown model {name!r}; choose from: {', '.join(list_models())}")
        for p in patch_sizes or [None]:
            plan.append(Plan(name, img_size, p))
    return plan


def profile(
    plan: Iterable[Plan],
    *,
    batch: Optional[int] = None,
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
    fused: bool = True,
    force: bool = False,
    progress: Optional[bool] = None,
) -> List[Dict[str, Any]]:
    """Count (and with ``batch``, time) every entry of ``plan``; one dict per row."""
    from tqdm import tqdm

    plan = list(plan)
    device = device or _device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    bar = tqdm(plan, desc="profile", unit="row", file=sys.stderr, disable=(not progress) if progress is not None else None)
    for item in bar:
        bar.set_postfix_str(f"{item.model} p={item.patch_size or 'own'}")
        row = count_flops(item.model, item.img_size, item.patch_size)
        if batch is not None:
            row.update(time_forward(row, batch, device, dtype, fused=fused, force=force))
        rows.append(row)
    bar.close()
    return rows


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """A fixed-width table of the rows (``GMACs`` = the papers' "GFLOPs")."""
    headers = ["model", "img", "patch", "tokens", "params", "GMACs", "GFLOPs", "attn %"]
    timed = any("batch" in r for r in rows)
    if timed:
        headers += ["device", "batch", "ms", "samples/s", "TFLOP/s"]
    body = []
    for r in rows:
        cells = [
            r["model"], str(r["img_size"]), str(r["patch_size"]), str(r["tokens"]), _fmt_params(r["params"]),
            f"{r['gmacs']:.2f}", f"{r['gflops']:.2f}", f"{100 * r['attn_share']:.1f}",
        ]
        if timed:
            if "ms" in r:
                cells += [r["device"], str(r["batch"]), f"{r['ms']:.2f}", f"{r['samples_per_s']:.1f}", f"{r['tflops']:.2f}"]
            else:
                cells += [r.get("device", ""), str(r.get("batch", "")), "skipped", "", ""]
        body.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(headers)]
    left = {0, 8}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(headers), "  ".join("-" * w for w in widths)] + [line(c) for c in body]
    return "\n".join(out)


def make_figure(rows: Sequence[Dict[str, Any]]):
    """Log-log GFLOPs per sample against tokens, one line per model (``series``). Uses the
    object-oriented matplotlib API with the Agg canvas (no pyplot, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("profile --plot needs matplotlib: pip install 'uvit-fast[plot]'") from exc
    series: Dict[str, List[Tuple[int, float]]] = {}
    for r in rows:
        series.setdefault(r["series"], []).append((r["tokens"], r["gflops"]))
    fig = Figure(figsize=(9, 6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = [f"C{i}" for i in range(10)] if len(series) <= 10 else list(_TAB20)
    markers = "osD^v<>pPX*h"
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted(set(pts))
        dit = name.startswith("DiT")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], label=name,
                color=colors[i % len(colors)], linestyle="--" if dit else "-", alpha=0.85)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens per sample (patches + time/label/text tokens)")
    ax.set_ylabel("forward GFLOPs per sample (2 per multiply-add = 2 x papers' GFLOPs)")
    ax.set_title("uvit-fast profile: FLOPs against token count")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", ncol=2 if len(series) > 8 else 1)
    return fig


_TAB20 = [  # matplotlib's tab20, so up to 20 lines have distinct colours
    "#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896", "#9467bd", "#c5b0d5",
    "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7", "#bcbd22", "#dbdb8d", "#17becf", "#9edae5",
]


def save_plot(rows: Sequence[Dict[str, Any]], path: str) -> None:
    make_figure(rows).savefig(path, dpi=120)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def run(args: argparse.Namespace) -> int:
    models: List[str] = []
    for m in args.model or []:
        models.extend(s for s in m.split(",") if s)
    try:
        if models:
            plan = make_plan(models, args.img_size, args.patch_sizes)
        else:
            plan = default_plan()
            if args.img_size or args.patch_sizes:
                plan = make_plan(sorted({p.model for p in plan}, key=list_models().index), args.img_size, args.patch_sizes)
        # reject bad sizes before counting anything
        for item in plan:
            cfg = model_config(item.model)
            size = item.img_size or cfg.get(_size_key(item.model), 32)
            patch = item.patch_size or cfg.get("patch_size", 2)
            if size % patch:
                raise ValueError(
                    f"profile: patch size {patch} does not divide the image size {size} of {item.model} "
                    f"(for latent models the image size is the latent size, e.g. 32 for 256 px)"
                )
    except ValueError as exc:
        print(f"uvit-fast {exc}", file=sys.stderr)
        return 2
    device = _device()
    dtype = _DTYPES[args.dtype] if args.dtype else None
    if args.batch is not None and device.type == "cpu":
        print(
            f"uvit-fast profile: no CUDA device; timing on {device_label(device)}; rows above "
            f"{CPU_MAX_GFLOPS:.0f} GFLOPs per forward are skipped unless --force",
            file=sys.stderr,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # meta-device / TF32 chatter
        rows = profile(plan, batch=args.batch, device=device, dtype=dtype, fused=args.fused, force=args.force,
                       progress=args.progress)
    if args.json:
        for r in rows:
            print(json.dumps({k: v for k, v in r.items() if k != "flops_by_op"}))
    else:
        if args.batch:
            where = f"; forward of batch {args.batch} timed on {device_label(device)}"
        elif device.type == "cuda":
            where = "; pass --batch B to time it on " + device_label(device)
        else:
            where = " (no CUDA device: pass --batch B to time it on the CPU)"
        print(f"Forward FLOPs per sample, counted on the meta device{where}.")
        print("GMACs = multiply-adds x 1e-9 (the papers' \"GFLOPs\"); GFLOPs = 2 x GMACs; "
              "attn % = share of the FLOPs in the attention matmuls.")
        print(format_table(rows))
        for r in rows:
            if "timing_skipped" in r:
                print(f"  {r['model']} p={r['patch_size']}: not timed: {r['timing_skipped']}")
    if args.plot:
        try:
            save_plot(rows, args.plot)
        except RuntimeError as exc:
            print(f"uvit-fast profile: {exc}", file=sys.stderr)
            return 2
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0
