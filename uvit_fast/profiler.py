"""``uvit-fast profile``: parameters and forward FLOPs against token count, optionally timed.

FLOPs are counted with :class:`torch.utils.flop_counter.FlopCounterMode` on models built on
the ``meta`` device (no memory, no arithmetic), so even U-ViT-H at patch size 1 counts in a
fraction of a second on a CPU. Counting uses the plain PyTorch path of the models
(``fused=False``) in bf16, with ``F.scaled_dot_product_attention`` dispatched to the flash /
memory-efficient op a GPU runs (:func:`launch_path`): it does the same multiply-adds as the fused
path, and every op in it has a FLOP formula in torch. The same pass counts the plain path's kernel
launches (``launches_plain``); a second, fused pass counts ``launches_fused`` (:func:`count_launches`).

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

With ``--memory`` each row also gets the training memory and HBM traffic of the fused and the
plain path, modelled on the meta device by :mod:`uvit_fast.memory` (``saved_bytes_fused``,
``saved_bytes_plain``, ``hbm_bytes_fused``, ``hbm_bytes_plain``, ... per sample), the largest
batch that fits ``--gpu-memory`` and a roofline bound for ``--gpu``; with ``--batch`` on CUDA, one
measured AMP training step (peak memory, time) sits beside the model.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Any, ContextManager, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# the command-line arguments are defined in the torch-free uvit_fast.cli_args (so --help is instant)
from uvit_fast.cli_args import PROFILE_CPU_MAX_GFLOPS
from uvit_fast.cli_args import add_profile_arguments as add_arguments  # noqa: F401
from uvit_fast.models import create_model, list_models, model_config, unknown_model_error

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
        raise ValueError(f"profile: {unknown_model_error(name)}")
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
    # bf16 and SDPA as a GPU dispatches it: the same multiply-adds as float32 and meta's SDPA math
    # (checked for every preset), and the same pass counts the plain path's kernel launches
    model = model.to(torch.bfloat16).eval()
    inputs = model.example_inputs(1, device="meta", dtype=torch.bfloat16)
    counter = FlopCounterMode(display=False)
    launches = LaunchCounter()
    with launch_path(False), counter, launches, torch.no_grad():
        model(*inputs)
    _count_range_checks(launches, inputs)
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
        "launches_plain": launches.total,
        "flops_by_op": {str(op): int(n) for op, n in per_op.items()},
    }


# ---------------------------------------------------------------------------------------------
# kernel launches per forward (counted on meta)

#: ATen ops that launch no kernel although their schema does not say so (``_unsafe_view`` has no
#: alias annotation); views, allocations and metadata. Every op whose tensor outputs all alias an
#: input per its schema (``Tensor(a)`` without ``!``: view, t, transpose, permute, expand, squeeze,
#: unsqueeze, slice, select, split, chunk, unbind, as_strided, detach, alias, lift_fresh, ...) and
#: every op with no tensor output (``promote_types``, ``_fused_sdp_choice``, ``sym_size``,
#: ``_local_scalar_dense``) launches nothing too; see :func:`aten_launches_nothing`.
NO_LAUNCH_ATEN = frozenset({
    "view", "_unsafe_view", "_reshape_alias", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze",
    "slice", "select", "split", "split_with_sizes", "chunk", "unbind", "as_strided", "detach", "alias",
    "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "unfold",
    "view_as_real", "view_as_complex", "_nested_tensor_from_mask_left_aligned", "set_",
})

#: Triton kernels the launcher of each ``uvit_fast::`` forward op launches (``kernels/*.py``):
#: every forward launcher is one kernel (``_adaln_fwd_kernel``, ``_attn_fwd``,
#: ``_fused_linear_fwd_kernel``, ``_skip_concat_linear_fwd_kernel``, ``_patchify_embed_fwd_kernel``,
#: ``_decoder_unpatchify_fwd_kernel``), none when its output is empty; ``fused_mlp`` is the
#: composite of ``fused_mlp_fc1`` and ``fused_mlp_fc2`` (two). Backward ops are not listed: a
#: forward does not run them. ``tests/test_launch_count.py`` checks these numbers against the
#: launches counted while the kernels really run (Triton interpreter).
TRITON_FORWARD_KERNELS: Dict[str, int] = {
    "adaln_layer_norm": 1,
    "residual_adaln_layer_norm": 1,
    "attention_fwd": 1,
    "attention_qkvpacked_fwd": 1,
    "fused_linear": 1,
    "fused_mlp_fc1": 1,
    "fused_mlp_fc2": 1,
    "fused_mlp": 2,
    "skip_concat_linear": 1,
    "patchify_embed": 1,
    "decoder_unpatchify": 1,
}


def _is_tensor_type(t: Any) -> bool:
    if isinstance(t, torch.TensorType):
        return True
    if isinstance(t, (torch.ListType, torch.OptionalType)):
        return _is_tensor_type(t.getElementType())
    return False


@functools.lru_cache(maxsize=None)
def _aten_launches_nothing(func: Any) -> bool:
    if func.overloadpacket.__name__ in NO_LAUNCH_ATEN:
        return True
    returns = [r for r in func._schema.returns if _is_tensor_type(r.type)]
    if not returns:
        return True  # metadata: promote_types, _fused_sdp_choice, sym_size, _local_scalar_dense
    return all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def aten_launches_nothing(func: Any) -> bool:
    """The rule for ATen ops: launches nothing iff it is in :data:`NO_LAUNCH_ATEN`, has no tensor
    output, or every tensor output aliases an input per its schema without writing it (views).
    Everything else (``clone``, ``_to_copy``, ``copy_``, in-place ops, ``fill_``, ``arange``,
    ``cat``, matmuls, ...) is one launch."""
    return _aten_launches_nothing(func)


def _numel0(out: Any) -> bool:
    first = out[0] if isinstance(out, (tuple, list)) and out else out
    return isinstance(first, torch.Tensor) and first.numel() == 0


class _State(threading.local):
    in_triton = 0  # > 0 while a Triton launch runs (its interpreter's own torch calls are not the model's)


_STATE = _State()


class LaunchCounter(TorchDispatchMode):
    """Counts the kernel launches of what runs under it (a :class:`TorchDispatchMode`).

    * an ATen op is one launch unless :func:`aten_launches_nothing`;
    * a ``uvit_fast::<op>`` custom op is :data:`TRITON_FORWARD_KERNELS` ``[op]`` Triton launches
      (0 when its output is empty); an op missing from the table counts 1 and is listed in
      ``unknown``. On meta its fake runs; this is how :func:`count_launches` counts.

    ``inner=True`` (real tensors) also counts the ATen launches a custom op's own code makes
    around its Triton kernels (copies, fills: ``aten_in_custom``), which a meta count cannot see;
    the Triton interpreter's own torch calls are not counted."""

    def __init__(self, inner: bool = False):
        super().__init__()
        self.inner = inner
        self.aten = 0
        self.triton = 0
        self.aten_in_custom = 0
        self.by_op: Dict[str, int] = {}
        self.unknown: Dict[str, int] = {}

    def _add(self, name: str, n: int) -> None:
        if n:
            self.by_op[name] = self.by_op.get(name, 0) + n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns = func.namespace
        if ns == "uvit_fast":
            name = func.overloadpacket.__name__
            if self.inner:
                inner = _InnerAten()
                with inner:
                    out = func(*args, **kwargs)
                self.aten_in_custom += inner.n
            else:
                out = func(*args, **kwargs)
            if name not in TRITON_FORWARD_KERNELS:
                self.unknown[name] = self.unknown.get(name, 0) + 1
            n = 0 if _numel0(out) else TRITON_FORWARD_KERNELS.get(name, 1)
            self.triton += n
            self._add(f"uvit_fast::{name}", n)
            return out
        out = func(*args, **kwargs)
        if not _aten_launches_nothing(func):
            self.aten += 1
            self._add(str(func.overloadpacket), 1)
        return out

    @property
    def total(self) -> int:
        return self.aten + self.triton


class _InnerAten(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not _STATE.in_triton and func.namespace != "uvit_fast" and not _aten_launches_nothing(func):
            self.n += 1
        return out


class TritonLaunches:
    """Counts real Triton launches (``kernel[grid](...)``, the launchers' one call per kernel; an
    autotuner's benchmarking runs are not launches of the model) while the block runs: patches
    ``__getitem__`` of triton's ``KernelInterface``, which JIT functions, autotuners, heuristics and
    the interpreter's ``InterpretedFunction`` share (and of any of them that defines its own).
    ``n`` is the count; ``names`` the kernels."""

    def __init__(self):
        self.n = 0
        self.names: Dict[str, int] = {}
        self._saved: List[Tuple[Any, Any]] = []

    def __enter__(self) -> "TritonLaunches":
        from triton.runtime.jit import KernelInterface

        classes = [KernelInterface]
        try:
            from triton.runtime.interpreter import InterpretedFunction

            classes.append(InterpretedFunction)
        except ImportError:  # pragma: no cover - triton without the interpreter module
            pass
        counter = self
        for cls in classes:
            original = cls.__dict__.get("__getitem__")
            if original is None:
                continue
            self._saved.append((cls, original))

            def getitem(kernel, grid, _original=original):
                launch = _original(kernel, grid)

                def run(*args, **kwargs):
                    if _STATE.in_triton:  # a launch inside a launch is not the launcher's
                        return launch(*args, **kwargs)
                    counter.n += 1
                    name = _kernel_name(kernel)
                    counter.names[name] = counter.names.get(name, 0) + 1
                    _STATE.in_triton += 1
                    try:
                        return launch(*args, **kwargs)
                    finally:
                        _STATE.in_triton -= 1

                return run

            cls.__getitem__ = getitem
        return self

    def __exit__(self, *exc: Any) -> None:
        for cls, original in reversed(self._saved):
            cls.__getitem__ = original
        self._saved.clear()


def _kernel_name(kernel: Any) -> str:
    fn = kernel
    for _ in range(4):  # Autotuner -> Heuristics -> JITFunction / InterpretedFunction
        inner = getattr(fn, "fn", None)
        if inner is None or inner is fn:
            break
        fn = inner
    return getattr(fn, "__name__", None) or type(fn).__name__


def launch_path(fused: bool) -> ContextManager[None]:
    """What a CUDA device runs: fused -> ``use_backend("triton")`` (every fused op on its Triton
    kernel); plain -> SDPA dispatched as on an sm80+ GPU (one flash / memory-efficient kernel,
    not meta's math decomposition): :func:`uvit_fast.memory.path_context`, which the memory profile
    counts under too."""
    from uvit_fast.memory import path_context

    return path_context(fused)


def count_launches(
    name: str,
    img_size: Optional[int] = None,
    patch_size: Optional[int] = None,
    *,
    fused: bool,
    dtype: torch.dtype = torch.bfloat16,
    batch: int = 1,
    device_type: str = "cuda",
    **overrides: Any,
) -> Dict[str, Any]:
    """Kernel launches of one inference forward (``torch.no_grad``), counted on the meta device
    with :class:`LaunchCounter`: ``{"launches", "aten", "triton", "by_op", "unknown"}``. ``fused``
    picks the path (:func:`launch_path`); the weights and inputs are cast to ``dtype`` (bf16 by
    default: what a GPU runs; U-ViT's plain attention then adds its fp32 casts). ``device_type``
    ``"cpu"`` counts the models' label range check as a CPU runs it (the tests compare with CPU runs)."""
    if not isinstance(fused, bool):
        raise TypeError(f"count_launches: fused must be True or False; got {fused!r}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"count_launches: batch must be a positive integer; got {batch!r}")
    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"count_launches: device_type must be 'cuda' or 'cpu'; got {device_type!r}")
    with torch.device("meta"):
        model, _, _ = build_model(name, img_size, patch_size, fused=fused, **overrides)
    model = model.to(dtype).eval()
    inputs = model.example_inputs(batch, device="meta", dtype=dtype)
    counter = LaunchCounter()
    with launch_path(fused), torch.no_grad(), counter:
        model(*inputs)
    _count_range_checks(counter, inputs, device_type)
    return {"launches": counter.total, "aten": counter.aten, "triton": counter.triton,
            "by_op": dict(counter.by_op), "unknown": dict(counter.unknown)}


def _count_range_checks(counter: "LaunchCounter", inputs: Sequence[Any], device_type: str = "cuda") -> None:
    """The models check the range of integer inputs (class labels, CLIP's text tokens) on real
    tensors and skip it on meta (``uvit_fast.models.common.check_index_range``): on a GPU on the
    device, ``torch._assert_async(((t >= 0) & (t < n)).all())`` (5 launches: the four ops run here on
    the meta tensor, plus the assert, which meta does not dispatch); on a CPU a ``min`` and a ``max``
    read back (2)."""
    for t in inputs:
        if not (isinstance(t, torch.Tensor) and not t.is_floating_point() and t.numel()):
            continue
        if device_type == "cpu":
            for op in ("aten.min", "aten.max"):
                counter.aten += 1
                counter._add(op, 1)
            continue
        with counter:
            ((t >= 0) & (t < 1)).all()
        counter.aten += 1
        counter._add("aten._assert_async", 1)


def fused_launch_fields(name: str, img_size: Optional[int] = None, patch_size: Optional[int] = None) -> Dict[str, Any]:
    """``launches_fused`` and ``launches_fused_triton`` (``launches_plain`` comes with :func:`count_flops`)."""
    fused = count_launches(name, img_size, patch_size, fused=True)
    out = {"launches_fused": fused["launches"], "launches_fused_triton": fused["triton"]}
    if fused["unknown"]:
        out["launches_unknown_ops"] = sorted(fused["unknown"])
    return out


def launch_fields(name: str, img_size: Optional[int] = None, patch_size: Optional[int] = None) -> Dict[str, Any]:
    """The profile row's launch fields: ``launches_fused`` (ATen + Triton), ``launches_fused_triton``,
    ``launches_plain`` (ATen only) per inference forward, bf16, counted on meta."""
    plain = count_launches(name, img_size, patch_size, fused=False)
    return {**fused_launch_fields(name, img_size, patch_size), "launches_plain": plain["launches"]}


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


def modelled_peak_bytes(row: Dict[str, Any], batch: int, path: str) -> int:
    """The memory model's training peak at ``batch`` (no checkpointing): the training state,
    the batch-independent saves and ``batch`` samples' saved activations."""
    return int(row["state_bytes"] + max(row[f"saved_bytes_fixed_{path}"], 0) + batch * row[f"saved_bytes_{path}"])


def training_step(model: torch.nn.Module, opt: torch.optim.Optimizer, inputs: Sequence[Any], device_type: str):
    """One AMP training step as a closure: zero_grad, forward under bf16 autocast, a mean-square
    loss over every output (CLIP returns a tuple of logits), backward, optimizer step."""

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = model(*inputs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        sum(o.float().square().mean() for o in outs).backward()
        opt.step()

    return step


def measure_training(row: Dict[str, Any], batch: int, device: torch.device, *, fused: bool = True) -> Dict[str, Any]:
    """Measured beside the memory model, on CUDA only: one AMP training step (fp32 weights,
    bf16 autocast, AdamW) of ``batch`` samples: ``torch.cuda.max_memory_allocated`` and the
    median step time. On other devices ``measured_skipped`` says why nothing was measured."""
    if device.type != "cuda":
        return {"measured_skipped": "no CUDA device: peak memory and step time are measured on a GPU only "
                                    "(the memory fields are the model)"}
    from uvit_fast.bench.core import time_fn

    torch.cuda.empty_cache()
    with torch.device(device):
        model, _, _ = build_model(row["model"], row["img_size"], row["patch_size"], fused=fused)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = training_step(model, opt, model.example_inputs(batch, device=device), device.type)
    step()  # AdamW state exists from here on, as in a training run
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    t = time_fn(step, device, warmup=1, rep=5)
    model = opt = step = None
    torch.cuda.empty_cache()
    return {
        "measured_batch": batch,
        "measured_path": "fused" if fused else "plain",
        "measured_peak_bytes": int(peak),
        "measured_step_ms": t["ms"],
        "measured_device": device_label(device),
    }


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
            raise ValueError(f"profile: {unknown_model_error(name)}")
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
    memory: bool = False,
    gpu: str = "h100",
    gpu_memory: Optional[int] = None,
) -> List[Dict[str, Any]]:
    """Count (and with ``batch``, time) every entry of ``plan``; one dict per row. ``memory``
    adds the modelled memory / traffic fields of :func:`uvit_fast.memory.memory_fields` and,
    with ``batch`` on CUDA, a measured training step beside them."""
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
        row.update(fused_launch_fields(item.model, item.img_size, item.patch_size))
        if batch is not None:
            row.update(time_forward(row, batch, device, dtype, fused=fused, force=force))
        if memory:
            from uvit_fast.memory import memory_fields

            row.update(memory_fields(item.model, item.img_size, item.patch_size, gpu=gpu, gpu_memory=gpu_memory,
                                     roofline_batch=batch or 64))
            if batch is not None:
                for path in ("fused", "plain"):
                    row[f"modelled_peak_bytes_{path}"] = modelled_peak_bytes(row, batch, path)
                row.update(measure_training(row, batch, device, fused=fused))
        rows.append(row)
    bar.close()
    return rows


def _fmt_rate(tflops: float) -> str:
    """Three significant digits: a CPU's 0.0015 TFLOP/s must not print as 0.00."""
    return f"{tflops:.2f}" if tflops >= 1 else f"{tflops:.3g}"


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.2f}B"


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """A fixed-width table of the rows (``GMACs`` = the papers' "GFLOPs")."""
    headers = ["model", "img", "patch", "tokens", "params", "GMACs", "GFLOPs", "attn %"]
    launches = all("launches_fused" in r for r in rows)
    if launches:
        headers += ["launches fused (Triton)", "launches plain"]
    timed = any("batch" in r for r in rows)
    if timed:
        headers += ["device", "batch", "ms", "samples/s", "TFLOP/s"]
    body = []
    for r in rows:
        cells = [
            r["model"], str(r["img_size"]), str(r["patch_size"]), str(r["tokens"]), _fmt_params(r["params"]),
            f"{r['gmacs']:.2f}", f"{r['gflops']:.2f}", f"{100 * r['attn_share']:.1f}",
        ]
        if launches:
            cells += [f"{r['launches_fused']} ({r['launches_fused_triton']})", str(r["launches_plain"])]
        if timed:
            if "ms" in r:
                cells += [r["device"], str(r["batch"]), f"{r['ms']:.2f}", f"{r['samples_per_s']:.1f}", _fmt_rate(r["tflops"])]
            else:
                cells += [r.get("device", ""), str(r.get("batch", "")), "skipped", "", ""]
        body.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(headers)]
    left = {0, headers.index("device")} if timed else {0}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line(headers), "  ".join("-" * w for w in widths)] + [line(c) for c in body]
    return "\n".join(out)


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def _split(d: Dict[str, float]) -> str:
    return f"{sum(d.values()):.3f} ({d['gemm']:.3f}/{d['attention']:.3f}/{d['memory']:.3f})"


def format_memory_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The ``--memory`` fields as a table, fused vs plain, with what they are said above it."""
    from uvit_fast.memory import GPUS

    rows = [r for r in rows if "saved_bytes_fused" in r]
    if not rows:
        return ""
    gpu = GPUS[rows[0]["gpu"]]
    head = [
        "Training memory and HBM traffic per sample: MODELLED (counted on the meta device, bf16 activations), "
        "not measured.",
        "saved = activations autograd keeps for backward (MiB/sample; ckpt = every block checkpointed, peak); "
        "HBM = bytes read + written per forward (MiB/sample, weights excluded); FLOP/B = forward FLOPs / HBM bytes.",
        f"max batch: fits in {rows[0]['gpu_memory_bytes'] / 2**30:.1f} GiB with fp32 weights, grads and AdamW state "
        "(16 B/param) + bf16 weight copies (2 B/param); no allocator slack or workspace.",
        f"roofline: lower bound on {gpu.name} ({gpu.bf16_flops / 1e12:.0f} TFLOP/s bf16 dense, "
        f"{gpu.hbm_bandwidth / 1e12:.2f} TB/s; datasheet), ms/sample at batch {rows[0]['roofline_batch']}: "
        "forward total (GEMM/attention/memory-bound); step = forward + backward + AdamW.",
    ]
    headers = ["model", "patch", "tokens", "saved fused", "saved plain", "ckpt fused", "HBM fused", "HBM plain",
               "FLOP/B fused", "FLOP/B plain", "max B fused", "max B plain", "max B ckpt fused",
               "fwd roofline fused", "fwd roofline plain", "step fused", "step plain"]
    body = []
    for r in rows:
        body.append([
            r["model"], str(r["patch_size"]), str(r["tokens"]),
            _mib(r["saved_bytes_fused"]), _mib(r["saved_bytes_plain"]), _mib(r["saved_bytes_checkpointed_fused"]),
            _mib(r["hbm_bytes_fused"]), _mib(r["hbm_bytes_plain"]),
            f"{r['intensity_fused']:.0f}", f"{r['intensity_plain']:.0f}",
            str(r["max_batch_fused"]), str(r["max_batch_plain"]), str(r["max_batch_checkpointed_fused"]),
            _split(r["roofline_fwd_ms_fused"]), _split(r["roofline_fwd_ms_plain"]),
            f"{sum(r['roofline_step_ms_fused'].values()):.3f}", f"{sum(r['roofline_step_ms_plain'].values()):.3f}",
        ])
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = head + [line(headers), "  ".join("-" * w for w in widths)] + [line(c) for c in body]
    for r in rows:
        if "measured_peak_bytes" in r:
            out.append(f"  {r['model']} p={r['patch_size']}: MEASURED on {r['measured_device']}, AMP training step of "
                       f"batch {r['measured_batch']} ({r['measured_path']}): peak {r['measured_peak_bytes'] / 2**30:.2f} GiB "
                       f"(torch.cuda.max_memory_allocated), {r['measured_step_ms']:.1f} ms; the model says "
                       f"{r['modelled_peak_bytes_' + r['measured_path']] / 2**30:.2f} GiB")
        elif "measured_skipped" in r:
            out.append(f"  {r['model']} p={r['patch_size']}: not measured: {r['measured_skipped']}")
    return "\n".join(out)


# one marker per model family, and strong colours (no pastel pairs) for the lines of a family
FAMILY_MARKERS = {"UViT": "o", "UViTT2I": "s", "DiT": "^", "ViT": "D", "ViViT": "v", "CLIP": "P"}
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#000000", "#393b79", "#637939"]


def _series(rows: Sequence[Dict[str, Any]], key) -> Dict[str, List[Tuple[int, float, str]]]:
    """series -> sorted (tokens, value, model name) points."""
    out: Dict[str, List[Tuple[int, float, str]]] = {}
    for r in rows:
        out.setdefault(r["series"], []).append((r["tokens"], key(r), _point_label(r)))
    return {name: sorted(set(pts)) for name, pts in out.items()}


def _point_label(r: Dict[str, Any]) -> str:
    """``DiT-L/2`` as it is at its own patch size; other names, and a DiT at another patch size,
    get their patch size: ``imagenet256_uvit_huge p2``, ``DiT-XL/2 p4``."""
    name = r["model"]
    own = re.search(r"/(\d+)$", name)
    if r.get("patch_size") is None or (own and int(own.group(1)) == r["patch_size"]):
        return name
    return f"{name} p{r['patch_size']}"


def _family_of(rows: Sequence[Dict[str, Any]], name: str) -> str:
    return next(r.get("arch", "") for r in rows if r["series"] == name)


def _clusters(points: Sequence[Tuple[str, int, float, str]], rel: float = 0.06) -> List[List[Tuple[str, int, float, str]]]:
    """Groups of points that would be drawn on top of each other (tokens and value both within
    ``rel`` of the group's first point, on log axes)."""
    groups: List[List[Tuple[str, int, float, str]]] = []
    for p in sorted(points, key=lambda p: (p[1], p[2])):
        for g in groups:
            _, x, y, _ = g[0]
            if abs(math.log(p[1] / x)) < rel and abs(math.log(p[2] / y)) < rel:
                g.append(p)
                break
        else:
            groups.append([p])
    return groups


def series_colors(rows: Sequence[Dict[str, Any]]) -> Dict[str, str]:
    """A strong colour per series: all different when the series fit the palette, else distinct
    within each family (families differ by marker). The memory panel draws fused and plain as
    solid and dashed, so there only the colour and the marker tell two models apart."""
    series = list(dict.fromkeys(r["series"] for r in rows))
    if len(series) <= len(_COLORS):
        return {name: _COLORS[i] for i, name in enumerate(series)}
    colors: Dict[str, str] = {}
    count: Dict[str, int] = {}
    for r in rows:
        if r["series"] not in colors:
            fam = r.get("arch", "")
            colors[r["series"]] = _COLORS[count.get(fam, 0) % len(_COLORS)]
            count[fam] = count.get(fam, 0) + 1
    return colors


def _draw(ax, rows, key, colors, linestyle=None, label_suffix="", annotate=True) -> None:
    points = []
    for name, pts in _series(rows, key).items():
        fam = _family_of(rows, name)
        style = linestyle or ("--" if fam == "DiT" else "-")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=style, color=colors[name], alpha=0.9,
                marker=FAMILY_MARKERS.get(fam, "x"), markersize=6, markerfacecolor="none", markeredgewidth=1.4,
                label=name + label_suffix)
        points.extend((name, x, y, model) for x, y, model in pts)
    if not annotate:
        return
    # points drawn on top of each other: concentric rings (largest first) and one label naming them all
    for group in _clusters(points):
        if len(group) < 2:
            continue
        for i, (name, x, y, _) in enumerate(group):
            ax.plot([x], [y], linestyle="none", marker=FAMILY_MARKERS.get(_family_of(rows, name), "x"),
                    markersize=6 + 5 * (len(group) - 1 - i), markerfacecolor="none", markeredgewidth=1.4,
                    color=colors[name], label="_nolegend_")
        _, x, y, _ = group[0]
        ax.annotate("\n".join(model for _, _, _, model in group), (x, y), xytext=(14, -4), textcoords="offset points",
                    fontsize="x-small", va="top", arrowprops=dict(arrowstyle="-", color="0.5", lw=0.6))


def _reference_slopes(ax, rows, key) -> None:
    """Guides from half the smallest point: cost proportional to L (dotted) and to L^2 (dash-dot)."""
    x0, y0 = min((r["tokens"], key(r)) for r in rows)
    x1 = max(r["tokens"] for r in rows)
    if x1 <= x0:
        return
    y0 = y0 / 2
    for power, style, label in ((1, ":", "∝ L (reference slope)"), (2, "-.", "∝ L² (reference slope)")):
        y1 = y0 * (x1 / x0) ** power
        ax.plot([x0, x1], [y0, y1], linestyle=style, color="0.35", linewidth=1.0, label=label)
        ax.annotate("∝ L" if power == 1 else "∝ L²", (x1, y1), xytext=(4, 0), textcoords="offset points",
                    fontsize="small", color="0.35", va="center")


def make_figure(rows: Sequence[Dict[str, Any]]):
    """Log-log GFLOPs per sample against tokens, one line per model (``series``), one marker
    per family (U-ViT circles, U-ViT-T2I squares, DiT triangles), points that coincide drawn as
    concentric rings with one label naming them, and reference slopes for cost ∝ L and ∝ L².
    Rows with the ``--memory`` fields get a second panel: activation memory saved for backward
    per sample against tokens, fused (solid) and plain (dashed). Uses the object-oriented
    matplotlib API with the Agg canvas (no pyplot, no display needed)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError('profile --plot needs matplotlib: pip install -e ".[plot]"') from exc
    memory = [r for r in rows if "saved_bytes_fused" in r]
    fig = Figure(figsize=(16 if memory else 10, 7), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if memory else 1, 1)
    colors = series_colors(rows)
    _draw(ax, rows, lambda r: r["gflops"], colors)
    _reference_slopes(ax, rows, lambda r: r["gflops"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens per sample L (patches + time/label/text tokens)")
    ax.set_ylabel("forward GFLOPs per sample (2 per multiply-add = 2 x papers' GFLOPs)")
    ax.set_title("FLOPs against token count (counted)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2 if len(colors) > 8 else 1, loc="upper left",
              title="marker = family: o U-ViT, s U-ViT-T2I, ^ DiT (dashed)", title_fontsize="x-small")
    if memory:
        mx = fig.add_subplot(1, 2, 2)
        _draw(mx, memory, lambda r: r["saved_bytes_fused"] / 2**20, colors, "-", " fused")
        _draw(mx, memory, lambda r: r["saved_bytes_plain"] / 2**20, colors, "--", " plain", annotate=False)
        _reference_slopes(mx, memory, lambda r: r["saved_bytes_fused"] / 2**20)
        mx.set_xscale("log")
        mx.set_yscale("log")
        mx.set_xlabel("tokens per sample L")
        mx.set_ylabel("activation memory saved for backward, MiB per sample (bf16)")
        mx.set_title("Activation memory per sample (modelled on meta): fused vs plain")
        mx.grid(True, which="both", alpha=0.3)
        mx.legend(fontsize="x-small", ncol=2 if len(memory) > 8 else 1, loc="upper left")
    return fig


PLOT_FORMATS = ("png", "pdf", "svg")


def check_plot_path(path: str) -> None:
    """Before any work: the folder of ``path`` exists and is writable, the suffix is one
    matplotlib writes, and matplotlib is importable. ValueError (one line) otherwise."""
    import importlib.util
    import os

    folder = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1].lower().lstrip(".")
    if suffix not in PLOT_FORMATS:
        raise ValueError(f"profile: --plot {path}: the file name must end in .{', .'.join(PLOT_FORMATS)}")
    if not os.path.isdir(folder):
        raise ValueError(f"profile: --plot {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"profile: --plot {path}: folder {folder} is not writable")
    if os.path.isdir(path):
        raise ValueError(f"profile: --plot {path}: is a folder")
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError(f"profile: --plot needs matplotlib: pip install -e \".[plot]\" (or 'uvit-fast[plot]')")


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
        if args.plot:
            check_plot_path(args.plot)
        if not getattr(args, "memory", False):
            given = [f for f, v in (("--gpu", getattr(args, "gpu", None)), ("--gpu-memory", getattr(args, "gpu_memory", None)))
                     if v is not None]
            if given:
                verb = "applies" if len(given) == 1 else "apply"
                raise ValueError(f"profile: {' and '.join(given)} {verb} only to --memory; add --memory")
    except ValueError as exc:
        print(f"uvit-fast {exc}", file=sys.stderr)
        return 2
    memory = getattr(args, "memory", False)
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
                       progress=args.progress, memory=memory, gpu=getattr(args, "gpu", None) or "h100",
                       gpu_memory=getattr(args, "gpu_memory", None))
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
        print("launches = kernel launches per inference forward as a CUDA device runs it (bf16), counted on "
              "meta: fused = ATen + Triton (the Triton ones in brackets), plain = ATen with SDPA as one kernel; "
              "views and metadata ops launch nothing.")
        print(format_table(rows))
        for r in rows:
            if "timing_skipped" in r:
                print(f"  {r['model']} p={r['patch_size']}: not timed: {r['timing_skipped']}")
        if memory:
            print()
            print(format_memory_table(rows))
    if args.plot:
        try:
            save_plot(rows, args.plot)
        except RuntimeError as exc:
            print(f"uvit-fast profile: {exc}", file=sys.stderr)
            return 2
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0
