"""Training memory and HBM traffic of a model, counted on the ``meta`` device (a model, not a
measurement): what ``uvit-fast profile --memory`` reports.

Everything runs on meta tensors: no memory is allocated and no arithmetic runs, so U-ViT-H at
1026 tokens counts in about a second on a CPU. Two paths are counted:

* **fused**: the model with ``fused=True`` under ``use_backend("triton")``, so every op that has
  a Triton kernel goes through its ``uvit_fast::`` custom op (its fake implementation runs on
  meta; ``_backend.check_triton_device`` accepts meta tensors for this);
* **plain**: the model with ``fused=False`` (the upstream math) with
  ``F.scaled_dot_product_attention`` dispatched as SDPA dispatches it on an sm80+ GPU: the flash
  kernel for fp16 / bf16 inputs, the memory-efficient kernel for fp32 (U-ViT's upstream attention
  casts q, k, v to fp32). Left alone, SDPA on meta takes its math path, which keeps the
  ``L x L`` probabilities that no GPU kernel keeps.

The counting rules (docs/profiling.md has the reasons and the limits):

* **Saved activations**: every tensor autograd saves for backward during one training forward
  (``torch.autograd.graph.saved_tensors_hooks``), by storage: a storage saved twice, or saved
  through two views, counts once, at its full size; storages of parameters and buffers are not
  activations and are left out.
* **Per sample**: counts at batch 1 and batch 2; the difference is the per-sample figure, the
  rest (``2 c(1) - c(2)``) is the batch-independent part (RNG state, constants, weight reads).
* **HBM traffic**: a :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every aten op
  and every ``uvit_fast::`` custom op; each is one kernel that reads each distinct input tensor
  once and writes each output once (an argument it only writes, ``out=`` or the destination of
  ``copy_`` / ``fill_`` / ``zero_``, is not read, nor the model tensor of ``full_like`` and kin,
  nor ``fused_mlp_fc2``'s ``z``, which it takes only for its backward).
  A tensor's bytes are the elements it addresses (broadcast, stride-0 dimensions count once)
  times the element size. Views, reshapes, ``detach`` and
  allocations (``empty``) move nothing.
* **Roofline**: each kernel takes at least ``max(flops / peak, bytes / bandwidth)``; the sum is
  split into GEMM (matmuls, convolutions, the fused GEMM ops), attention and the memory-bound rest.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from uvit_fast.cli_args import parse_size

# ---------------------------------------------------------------------------------------------
# GPUs: peak dense bf16 tensor-core FLOP/s (no sparsity) and HBM bandwidth, from NVIDIA's datasheets:
#   H100 SXM5 80GB: 989.4 TFLOP/s bf16 dense (the datasheet's 1,979 is with 2:4 sparsity), 3.35 TB/s
#     (NVIDIA H100 Tensor Core GPU datasheet, SXM column);
#   H200 SXM 141GB: 989 TFLOP/s bf16 dense (1,979 with sparsity), 4.8 TB/s (NVIDIA H200 datasheet);
#   A100 SXM 80GB: 312 TFLOP/s bf16 dense (624 with sparsity), 2,039 GB/s (NVIDIA A100 datasheet).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float  # dense, FLOP/s
    hbm_bandwidth: float  # bytes/s
    memory: int  # bytes
    source: str


GPUS: Dict[str, GPU] = {
    "h100": GPU("NVIDIA H100 SXM5 80GB", 989e12, 3.35e12, 80 * 2**30, "NVIDIA H100 datasheet (SXM5)"),
    "h200": GPU("NVIDIA H200 SXM 141GB", 989e12, 4.8e12, 141 * 10**9, "NVIDIA H200 datasheet (SXM)"),
    "a100": GPU("NVIDIA A100 SXM 80GB", 312e12, 2.039e12, 80 * 2**30, "NVIDIA A100 datasheet (SXM 80GB)"),
}

# Training recipe the state bytes model: AMP as the upstream scripts train, fp32 master weights,
# fp32 gradients, AdamW's exp_avg and exp_avg_sq in fp32, and autocast's bf16 copy of each weight
# (cached for the forward). Activations are counted in bf16.
PARAM_BYTES, GRAD_BYTES, ADAMW_BYTES, WEIGHT_CAST_BYTES = 4, 4, 8, 2
# AdamW step traffic per parameter: read p, g, m, v (fp32) and write p, m, v.
ADAMW_TRAFFIC_BYTES = 7 * 4


def parse_memory(text: str) -> int:
    """``"80GiB"``, ``"80GB"``, ``"141 GB"``, ``"40960MiB"`` -> bytes (GB = 1e9, GiB = 2**30)."""
    return parse_size(text)


def get_gpu(name: str) -> GPU:
    key = str(name).strip().lower()
    if key not in GPUS:
        raise ValueError(f"--gpu must be one of {', '.join(sorted(GPUS))}; got {name!r}")
    return GPUS[key]


# ---------------------------------------------------------------------------------------------
# the plain path's SDPA as a GPU runs it


def _sdpa_gpu_kernel(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if attn_mask is not None or dropout_p or enable_gqa:
        raise NotImplementedError("memory model: SDPA with a mask, dropout or GQA is not modelled")
    if q.dtype in (torch.float16, torch.bfloat16):
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)[0]
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, is_causal, scale=scale)[0]


class _GpuSdpa(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` on meta tensors -> the flash / memory-efficient op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and args and args[0].device.type == "meta":
            return _sdpa_gpu_kernel(*args, **kwargs)
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# the dispatch trace

_FREE = {"_unsafe_view", "detach", "alias", "lift_fresh", "empty", "empty_like", "new_empty", "empty_strided",
         "new_empty_strided", "promote_types"}
_GEMM = {"mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution", "convolution_backward", "_scaled_mm",
         "skip_concat_linear", "skip_concat_linear_backward_input", "skip_concat_linear_backward_weight",
         "patchify_embed", "patchify_embed_backward", "decoder_unpatchify", "decoder_unpatchify_backward",
         "fused_linear", "fused_mlp_fc1", "fused_mlp_fc2", "fused_linear_backward_input",
         "fused_linear_backward_weight"}
# arguments a custom op takes only for its backward (autograd saves them), which its forward kernel
# does not read: fused_mlp_fc2 gets fc1's pre-activation z for act'(z) in its input-gradient GEMM
_UNREAD_ARGS = {"fused_mlp_fc2": {"z"}}


def _short(func) -> str:
    return func._overloadpacket.__name__ if hasattr(func, "_overloadpacket") else str(func)


def category(func) -> str:
    """``gemm``, ``attention`` or ``memory`` for one op."""
    name = _short(func)
    if "attention" in name:
        return "attention"
    return "gemm" if name in _GEMM else "memory"


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel moves for ``t``: the elements it addresses (broadcast dims once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _tensors(tree) -> List[torch.Tensor]:
    out = []
    for x in tree:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            out.extend(_tensors(x))
        elif isinstance(x, dict):
            out.extend(_tensors(x.values()))
    return out


# ops that overwrite their first argument without reading it (the random fills included)
_OVERWRITE = {"copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_", "exponential_"}


def _read_tensors(func, args, kwargs) -> List[torch.Tensor]:
    """The tensor arguments an op reads: all of them but those it only writes (``out=``
    arguments, and the destination of ``copy_`` / ``fill_`` / ``zero_`` / a random fill) and
    those a custom op takes only for its backward (``_UNREAD_ARGS``); a ``*_like`` factory reads
    none (it takes only the shape and dtype)."""
    if _short(func).endswith("_like"):  # full_like, zeros_like, rand_like: only the shape is used
        return []
    schema = getattr(func, "_schema", None)
    if schema is None:
        return _tensors(list(args) + list(kwargs.values()))
    overwrite = _short(func) in _OVERWRITE
    skip = {a.name for a in schema.arguments
            if a.alias_info is not None and a.alias_info.is_write and (a.kwarg_only or overwrite)}
    skip |= _UNREAD_ARGS.get(_short(func), set())
    names = [a.name for a in schema.arguments]
    pos = [x for i, x in enumerate(args) if i >= len(names) or names[i] not in skip]
    return _tensors(pos + [v for k, v in kwargs.items() if k not in skip])


def _distinct(ts: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    seen, out = set(), []
    for t in ts:
        key = (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _gemm_flops_custom(name: str, args) -> Optional[int]:
    """FLOPs (2 per multiply-add) of this package's GEMM custom ops, which torch has no formula for."""
    if name == "skip_concat_linear":  # h (.., D), skip, W (N, 2D)
        h, _, w = args[:3]
        return 2 * (h.numel() // h.shape[-1]) * w.shape[1] * w.shape[0]
    if name == "skip_concat_linear_backward_input":  # grad_out (.., N), W (N, 2D)
        g, w = args[:2]
        return 2 * (g.numel() // g.shape[-1]) * w.shape[0] * w.shape[1]
    if name == "skip_concat_linear_backward_weight":  # grad_out (.., N), h (.., D), skip
        g, h = args[:2]
        return 2 * (g.numel() // g.shape[-1]) * g.shape[-1] * 2 * h.shape[-1]
    if name in ("patchify_embed", "patchify_embed_backward"):
        x, w = (args[0], args[1]) if name == "patchify_embed" else (args[1], args[2])
        patches = math.prod(s // p for s, p in zip(x.shape[2:], w.shape[2:]))
        one = 2 * x.shape[0] * patches * math.prod(w.shape[1:]) * w.shape[0]
        return one if name == "patchify_embed" else one * (int(bool(args[4])) + int(bool(args[5])))
    if name in ("decoder_unpatchify", "decoder_unpatchify_backward"):
        tok, w = (args[0], args[1]) if name == "decoder_unpatchify" else (args[1], args[2])
        grid = args[4]  # (tokens, weight, bias, patch, grid, ...) / (grad, tokens, weight, patch, grid, ...)
        one = 2 * tok.shape[0] * math.prod(grid) * tok.shape[-1] * w.shape[0]
        return one if name == "decoder_unpatchify" else one * (int(bool(args[6])) + int(bool(args[7])))
    return None


def op_flops(func, args, kwargs, out) -> int:
    from torch.utils.flop_counter import flop_registry

    packet = getattr(func, "_overloadpacket", None)
    if packet in flop_registry:
        return int(flop_registry[packet](*args, **kwargs, out_val=out))
    return int(_gemm_flops_custom(_short(func), args) or 0)


@dataclass
class Kernel:
    op: str
    category: str
    phase: str  # "forward" or "backward"
    read: int
    written: int
    flops: int

    @property
    def bytes(self) -> int:
        return self.read + self.written


class TrafficTrace(TorchDispatchMode):
    """Records one :class:`Kernel` per dispatched op that is not a view or an allocation."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: List[Kernel] = []
        self.phase = "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _short(func)
        if getattr(func, "is_view", False) or name in _FREE:
            return out
        ins = _distinct(_read_tensors(func, args, kwargs))
        outs = _distinct(_tensors(out if isinstance(out, (list, tuple)) else [out]))
        if not ins and not outs:
            return out
        self.kernels.append(Kernel(
            op=str(func), category=category(func), phase=self.phase,
            read=sum(tensor_bytes(t) for t in ins), written=sum(tensor_bytes(t) for t in outs),
            flops=op_flops(func, args, kwargs, out),
        ))
        return out


# ---------------------------------------------------------------------------------------------
# saved tensors


class SavedTensorCounter:
    """Unique storages autograd saves, skipping those of ``exclude`` (parameters, buffers);
    each storage is attributed to the block (if any) whose forward first saved it."""

    def __init__(self, exclude: Sequence[torch.Tensor]) -> None:
        self._exclude = {t.untyped_storage()._cdata for t in exclude}
        self._keep: List[torch.Tensor] = []  # holds storages alive so their ids are not reused
        self.storages: Dict[int, Tuple[int, Optional[int]]] = {}  # id -> (bytes, block index)
        self.block: Optional[int] = None

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self._exclude and key not in self.storages:
            self.storages[key] = (storage.nbytes(), self.block)
            self._keep.append(t)
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def total(self) -> int:
        return sum(n for n, _ in self.storages.values())


def transformer_blocks(model: torch.nn.Module) -> List[torch.nn.Module]:
    """The residual blocks (a module with ``attn`` and ``mlp``), in forward order."""
    return [m for m in model.modules() if hasattr(m, "attn") and hasattr(m, "mlp")]


@contextlib.contextmanager
def _block_hooks(blocks: Sequence[torch.nn.Module], counter: SavedTensorCounter, inputs: Dict[int, int]) -> Iterator[None]:
    """Attribute saves to the block that runs; record each block's input storages (kept alive
    until the count ends, so that a freed storage's identity is not reused)."""
    handles = []
    keep: List[torch.Tensor] = []

    def pre(i):
        def hook(module, args, kwargs):
            counter.block = i
            for t in _tensors(list(args) + list(kwargs.values())):
                s = t.untyped_storage()
                if s._cdata not in inputs:
                    inputs[s._cdata] = s.nbytes()
                    keep.append(t)
        return hook

    def post(module, args, kwargs, output):
        counter.block = None

    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(pre(i), with_kwargs=True))
        handles.append(b.register_forward_hook(post, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class StepCount:
    """One training forward + backward of one batch on meta."""

    batch: int
    saved: int  # activations saved for backward, bytes
    saved_checkpointed: int  # the same with every block checkpointed (peak during recompute)
    kernels: List[Kernel]

    def traffic(self, phase: Optional[str] = None) -> int:
        return sum(k.bytes for k in self.kernels if phase is None or k.phase == phase)

    def flops(self, phase: Optional[str] = None) -> int:
        return sum(k.flops for k in self.kernels if phase is None or k.phase == phase)


def build_meta(name: str, img_size: Optional[int], patch_size: Optional[int], fused: bool, **overrides: Any):
    from uvit_fast.profiler import build_model

    with torch.device("meta"):
        model, _, _ = build_model(name, img_size, patch_size, fused=fused, **overrides)
    return model.to(torch.bfloat16).train()


@contextlib.contextmanager
def path_context(fused: bool) -> Iterator[None]:
    """Where each path's ops go on meta: fused -> the custom ops, plain -> SDPA's GPU kernels."""
    from uvit_fast import use_backend

    if fused:
        with use_backend("triton"):
            yield
    else:
        with _GpuSdpa():
            yield


def count_step(model: torch.nn.Module, batch: int, fused: bool) -> StepCount:
    """Count one training forward (saved tensors) and forward + backward (kernels) of ``model``
    (built on meta, bf16) at ``batch``. The backward starts from a given output gradient: the
    loss is not counted."""
    params = list(model.parameters())
    for p in params:  # a first backward, as a training step after zero_grad(set_to_none=True)
        p.grad = None
    inputs = model.example_inputs(batch, device="meta", dtype=torch.bfloat16)  # data: no gradient
    counter = SavedTensorCounter(list(model.parameters()) + list(model.buffers()))
    blocks = transformer_blocks(model)
    block_inputs: Dict[int, int] = {}
    trace = TrafficTrace()
    with path_context(fused), trace:
        with saved_tensors_hooks(counter.pack, counter.unpack), _block_hooks(blocks, counter, block_inputs):
            out = model(*inputs)
        trace.phase = "backward"
        outs = [t for t in _tensors([out]) if t.requires_grad]  # CLIP returns a tuple of logits
        torch.autograd.backward(outs, [torch.empty_like(t) for t in outs])
    for p in params:
        p.grad = None
    outside = {k: n for k, (n, b) in counter.storages.items() if b is None}
    held = dict(outside)
    held.update(block_inputs)  # block inputs (x, skips, c) stay alive under checkpointing
    per_block = [0] * len(blocks)
    for k, (n, b) in counter.storages.items():
        if b is not None and k not in held:
            per_block[b] += n
    ckpt = sum(held.values()) + (max(per_block) if per_block else 0)
    return StepCount(batch, counter.total(), ckpt, trace.kernels)


# ---------------------------------------------------------------------------------------------
# the report


def _slope(f1: float, f2: float) -> Tuple[float, float]:
    """(per sample, batch-independent) from counts at batch 1 and batch 2."""
    return f2 - f1, 2 * f1 - f2


def _extrapolate(c1: StepCount, c2: StepCount, batch: int) -> Optional[List[Kernel]]:
    """The kernels at ``batch`` from those at batch 1 and 2 (bytes and FLOPs are affine in the
    batch); None when the two traces do not list the same ops."""
    if [k.op for k in c1.kernels] != [k.op for k in c2.kernels]:
        return None
    n = batch - 1
    return [
        Kernel(a.op, a.category, a.phase, a.read + n * (b.read - a.read), a.written + n * (b.written - a.written),
               a.flops + n * (b.flops - a.flops))
        for a, b in zip(c1.kernels, c2.kernels)
    ]


def roofline(kernels: Sequence[Kernel], gpu: GPU) -> Dict[str, float]:
    """Lower-bound seconds per category: each kernel ``max(flops / peak, bytes / bandwidth)``."""
    out = {"gemm": 0.0, "attention": 0.0, "memory": 0.0}
    for k in kernels:
        out[k.category] += max(k.flops / gpu.bf16_flops, k.bytes / gpu.hbm_bandwidth)
    return out


def max_batch(budget: int, fixed: int, per_sample: int) -> int:
    """The largest batch ``B`` with ``fixed + B * per_sample <= budget`` (0 when none fits)."""
    if per_sample <= 0:
        raise ValueError(f"max_batch: per_sample must be positive; got {per_sample}")
    return max(0, (budget - fixed) // per_sample)


def memory_fields(
    name: str,
    img_size: Optional[int] = None,
    patch_size: Optional[int] = None,
    *,
    gpu: str = "h100",
    gpu_memory: Optional[int] = None,
    roofline_batch: int = 64,
    **overrides: Any,
) -> Dict[str, Any]:
    """Every modelled memory / traffic field of one row (see docs/profiling.md)."""
    spec = get_gpu(gpu)
    budget = spec.memory if gpu_memory is None else int(gpu_memory)
    out: Dict[str, Any] = {"memory_model": "counted on meta (bf16 activations); a model, not a measurement"}
    params = None
    for path, fused in (("fused", True), ("plain", False)):
        model = build_meta(name, img_size, patch_size, fused, **overrides)
        params = sum(p.numel() for p in model.parameters())
        c1, c2 = count_step(model, 1, fused), count_step(model, 2, fused)
        big = _extrapolate(c1, c2, roofline_batch) or count_step(model, roofline_batch, fused).kernels
        saved, saved_fixed = _slope(c1.saved, c2.saved)
        ckpt, ckpt_fixed = _slope(c1.saved_checkpointed, c2.saved_checkpointed)
        fwd, fwd_fixed = _slope(c1.traffic("forward"), c2.traffic("forward"))
        step, step_fixed = _slope(c1.traffic(), c2.traffic())
        flops_fwd = c2.flops("forward") - c1.flops("forward")
        flops_step = c2.flops() - c1.flops()
        state = params * (PARAM_BYTES + GRAD_BYTES + ADAMW_BYTES + WEIGHT_CAST_BYTES)
        step_fixed += params * ADAMW_TRAFFIC_BYTES
        rf_fwd = roofline([k for k in big if k.phase == "forward"], spec)
        rf_step = roofline(big, spec)
        rf_step["memory"] += params * ADAMW_TRAFFIC_BYTES / spec.hbm_bandwidth  # the AdamW step
        out.update({
            f"saved_bytes_{path}": int(saved),
            f"saved_bytes_fixed_{path}": int(saved_fixed),
            f"saved_bytes_checkpointed_{path}": int(ckpt),
            f"hbm_bytes_{path}": int(fwd),
            f"hbm_bytes_fixed_{path}": int(fwd_fixed),
            f"hbm_bytes_step_{path}": int(step),
            f"hbm_bytes_step_fixed_{path}": int(step_fixed),
            f"intensity_{path}": flops_fwd / fwd if fwd else 0.0,
            f"intensity_step_{path}": flops_step / step if step else 0.0,
            f"max_batch_{path}": max_batch(budget, state + max(saved_fixed, 0), int(saved)),
            f"max_batch_checkpointed_{path}": max_batch(budget, state + max(ckpt_fixed, 0), int(ckpt)),
            # per sample, at roofline_batch
            f"roofline_fwd_ms_{path}": {k: 1e3 * v / roofline_batch for k, v in rf_fwd.items()},
            f"roofline_step_ms_{path}": {k: 1e3 * v / roofline_batch for k, v in rf_step.items()},
        })
    out.update({
        "state_bytes": int(params * (PARAM_BYTES + GRAD_BYTES + ADAMW_BYTES + WEIGHT_CAST_BYTES)),
        "param_bytes": int(params * PARAM_BYTES),
        "grad_bytes": int(params * GRAD_BYTES),
        "adamw_bytes": int(params * ADAMW_BYTES),
        "weight_cast_bytes": int(params * WEIGHT_CAST_BYTES),
        "gpu": gpu.lower(),
        "gpu_memory_bytes": budget,
        "roofline_batch": roofline_batch,
    })
    return out
