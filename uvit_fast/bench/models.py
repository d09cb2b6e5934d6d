"""Benchmark cases: whole models, forward and training step (``uvit-fast bench --suite models``).

Rows, per preset: ``fwd`` (one forward of a batch under ``torch.inference_mode``) and ``train``
(zero_grad, forward, MSE loss against a random target, backward, AdamW step), each reported as
time, samples/s, TFLOP/s and, on CUDA, peak memory.

Providers:

* ``eager``: ``fused=False``, the plain PyTorch math of the upstream code (U-ViT's attention
  upcasts q, k, v to float32 as upstream does);
* ``compile``: ``torch.compile`` of the ``fused=False`` model;
* ``uvit_fast``: ``fused=True`` (our Triton kernels).

On CUDA the models keep float32 weights and run under ``torch.autocast`` in the benchmark
dtype (bf16 by default), as the upstream training and sampling scripts do (AMP). Every CUDA
row is ``needs_cuda``. On a CPU two small rows run instead, eager only and in float32 without
autocast, so that the suite does something real and quick there: DiT-S/8 and U-ViT-S built at
patch size 8 (17 tokens), both cut to 4 blocks, batch 2.

FLOPs come from :func:`uvit_fast.profiler.count_flops` (meta device): forward = 2 x MACs x
batch; a training step is counted as 3 x forward (backward = 2 x forward), which ignores the
optimizer's elementwise work.

Models are built on the first call of a case's ``fn`` (the runner makes one untimed call first)
and cached in a single slot, so only one model (with its optimizer state) is alive at a time.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
import torch.nn.functional as F

from uvit_fast._backend import use_backend
from uvit_fast.bench.core import Case

# (name, overrides, batch for fwd, batch for train, with compile rows)
GPU_MODELS: List[Tuple[str, Dict[str, Any], int, int, bool]] = [
    ("imagenet256_uvit_huge", {}, 256, 64, True),
    ("imagenet256_uvit_large", {}, 256, 64, False),
    ("imagenet512_uvit_huge", {}, 256, 64, False),
    ("mscoco_uvit_small", {}, 256, 128, False),
    ("DiT-XL/2", {}, 256, 64, True),
    ("DiT-B/2", {}, 256, 128, False),
]
# on a CPU: the small presets cut to 4 blocks (AdamW alone over 33-44M parameters takes
# seconds on a small CPU), at few tokens
CPU_MODELS: List[Tuple[str, Dict[str, Any], int, int, bool]] = [
    ("DiT-S/8", {"depth": 4}, 2, 2, False),
    ("cifar10_uvit_small", {"patch_size": 8, "depth": 4}, 2, 2, False),
]
PASSES = ("fwd", "train")


@dataclass(frozen=True)
class _Spec:
    name: str
    overrides: Tuple[Tuple[str, Any], ...]
    batch: int
    provider: str
    pass_: str


_slot: Dict[str, Any] = {}


def _state(spec: _Spec, device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
    """Build (once) the model, inputs, target and optimizer of ``spec``; frees the previous one."""
    from uvit_fast.models import create_model

    key = (spec, str(device), dtype)
    if _slot.get("key") == key:
        return _slot
    _slot.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    fused = spec.provider.startswith("uvit_fast")
    with torch.device(device):
        model = create_model(spec.name, fused=fused, **dict(spec.overrides))
    amp = device.type == "cuda" and dtype != torch.float32
    if not amp:
        model = model.to(dtype)
    inputs = model.example_inputs(spec.batch, device=device, dtype=torch.float32 if amp else dtype)
    run = torch.compile(model) if "compile" in spec.provider else model
    st: Dict[str, Any] = {"key": key, "model": model, "run": run, "inputs": inputs, "amp": amp}
    if spec.pass_ == "train":
        model.train()
        with torch.no_grad(), _autocast(device, dtype, amp):
            out = model(*inputs)
        st["target"] = torch.randn(out.shape, device=device, dtype=torch.float32)
        st["opt"] = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        model.eval()
    _slot.update(st)
    return _slot


def _autocast(device: torch.device, dtype: torch.dtype, amp: bool):
    return torch.autocast(device.type, dtype=dtype) if amp else contextlib.nullcontext()


def _backend(spec: _Spec):
    """``uvit_fast`` rows force the Triton kernels; ``uvit_fast_auto`` rows run ``auto`` (measured dispatch)."""
    return use_backend("triton") if spec.provider == "uvit_fast" else contextlib.nullcontext()


def _make_fn(spec: _Spec, device: torch.device, dtype: torch.dtype):
    if spec.pass_ == "fwd":
        def fn():
            st = _state(spec, device, dtype)
            with torch.inference_mode(), _autocast(device, dtype, st["amp"]), _backend(spec):
                return st["run"](*st["inputs"])
    else:
        def fn():
            st = _state(spec, device, dtype)
            st["opt"].zero_grad(set_to_none=True)
            with _autocast(device, dtype, st["amp"]), _backend(spec):
                out = st["run"](*st["inputs"])
            loss = F.mse_loss(out.float(), st["target"])
            loss.backward()
            st["opt"].step()
            return loss.detach()
    return fn


def release() -> None:
    """Drop the cached model (the runner calls it after the suite)."""
    _slot.clear()


def cases(device: torch.device, dtype: torch.dtype) -> List[Case]:
    from uvit_fast.profiler import count_flops

    device = torch.device(device)
    cuda = device.type == "cuda"
    # without CUDA: the small CPU rows, plus the GPU rows as skipped cases (so the report lists them)
    table = [(m, True) for m in GPU_MODELS] if cuda else [(m, False) for m in CPU_MODELS] + [(m, True) for m in GPU_MODELS]
    out: List[Case] = []
    for (name, overrides, fwd_batch, train_batch, with_compile), gpu_row in table:
        rest = {k: v for k, v in overrides.items() if k not in ("img_size", "input_size", "patch_size")}
        row = count_flops(name, overrides.get("img_size", overrides.get("input_size")), overrides.get("patch_size"), **rest)
        label_model = name if not overrides else name + "".join(f" {k}={v}" for k, v in overrides.items())
        for pass_ in PASSES:
            batch = fwd_batch if pass_ == "fwd" else train_batch
            flops = int(round(row["gflops"] * 1e9 * batch * (1 if pass_ == "fwd" else 3)))
            providers = (["eager"] + (["compile"] if with_compile else []) + ["uvit_fast", "uvit_fast_auto"]
                         if gpu_row else ["eager"])
            for provider in providers:
                spec = _Spec(name, tuple(sorted(overrides.items())), batch, provider, pass_)
                out.append(
                    Case(
                        suite="models",
                        op=label_model,
                        shape=f"B={batch} img={row['img_size']} p={row['patch_size']} tokens={row['tokens']}",
                        pass_=pass_,
                        provider=provider,
                        fn=_make_fn(spec, device, dtype),
                        flops=flops,
                        needs_cuda=gpu_row,
                        skip_reason=None if cuda or not gpu_row else "GPU-sized model row: needs CUDA",
                        extra={
                            "batch": batch,
                            "model": name,
                            "tokens": row["tokens"],
                            "params": row["params"],
                            "gmacs_per_sample": row["gmacs"],
                            "precision": (f"autocast {str(dtype).replace('torch.', '')}, fp32 weights"
                                          if gpu_row and dtype != torch.float32
                                          else str(dtype).replace("torch.", "")),
                            "flops_note": "fwd: 2 x MACs x batch" if pass_ == "fwd" else "train: 3 x forward FLOPs",
                        },
                    )
                )
    return out


__all__ = ["cases", "release", "GPU_MODELS", "CPU_MODELS"]
