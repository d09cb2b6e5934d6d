"""Benchmark cases: U-ViT's long-skip ``skip_linear(cat([h, skip], -1))`` without the concat.

Shapes are the out-blocks of every upstream U-ViT preset at batch 128: ``h`` and ``skip`` are
``(128, L, D)`` with ``L`` the preset's tokens including the extras (time token, label token for
class-conditional models, 77 context tokens for text-to-image) and the weight ``(D, 2D)``. Presets
with the same ``(L, D)`` share one row (the label lists them all):

* L=257, D=512: U-ViT-S/2 CIFAR-10, U-ViT-S/4 CelebA 64
* L=258, D=768: U-ViT-M/4 ImageNet 64
* L=258, D=1024: U-ViT-L/4 ImageNet 64, U-ViT-L/2 ImageNet 256, U-ViT-L/4 ImageNet 512
* L=258, D=1152: U-ViT-H/2 ImageNet 256, U-ViT-H/4 ImageNet 512
* L=334, D=512: U-ViT-S/2 MS-COCO text-to-image

Passes: ``fwd`` (under ``torch.no_grad``) and ``fwd+bwd`` (gradients for h, skip, weight and bias,
as in training). Providers:

* ``eager``: the reference, ``F.linear(torch.cat([h, skip], -1), weight, bias)``;
* ``compile``: ``torch.compile`` of the same;
* ``uvit_fast``: the Triton kernels (CUDA only: the CPU interpreter would take hours here);
* ``linear_no_concat``: ``F.linear`` on an input concatenated once beforehand (not timed) -- the
  same GEMM without the concat (cuBLAS on CUDA, the CPU BLAS on a CPU, hence the device-neutral
  name), i.e. the ceiling the fused kernel is measured against
  (target: ``uvit_fast`` >= 1.15x ``eager`` and >= 90% of this row's TFLOP/s).

``flops`` counts 2 per multiply-add: ``2 * M * D * 2D`` forward, three times that for fwd+bwd
(dX and dW GEMMs). ``bytes`` is the minimum traffic of the fused op (inputs read once, outputs and
gradients written once; the concat that eager materialises is not counted). Tensors are allocated
on the first call of a case's ``fn`` and shared by the cases of the same shape; one shape's tensors
are alive at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

from uvit_fast.bench.core import Case, uvit_backend
from uvit_fast.ops import skip_concat_linear, skip_concat_linear_reference

BATCH = 128

# (presets sharing the out-block shape, tokens incl. extras, width D)
SHAPES: List[Tuple[str, int, int]] = [
    ("U-ViT-S/2 cifar10, U-ViT-S/4 celeba64", 257, 512),
    ("U-ViT-M/4 imagenet64", 258, 768),
    ("U-ViT-L/4 imagenet64, U-ViT-L/2 imagenet256, U-ViT-L/4 imagenet512", 258, 1024),
    ("U-ViT-H/2 imagenet256, U-ViT-H/4 imagenet512", 258, 1152),
    ("U-ViT-S/2 mscoco-t2i", 334, 512),
]

PASSES = ("fwd", "fwd+bwd")
PROVIDERS = ("eager", "compile", "uvit_fast", "uvit_fast_auto", "linear_no_concat")


@dataclass(frozen=True)
class _Spec:
    presets: str
    B: int
    L: int
    D: int

    @property
    def M(self) -> int:
        return self.B * self.L

    @property
    def label(self) -> str:
        return f"B={self.B} L={self.L} D={self.D} (M={self.M}, N={self.D}, K={2 * self.D})"


_slot: Dict[str, Any] = {}


def _inputs(spec: _Spec, device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
    key = (spec, str(device), dtype)
    if _slot.get("key") != key:
        _slot.clear()
        g = torch.Generator(device=device).manual_seed(0)

        def rnd(*shape, s=1.0):
            t = torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * s
            return t.to(dtype).requires_grad_(True)

        B, L, D = spec.B, spec.L, spec.D
        t = {
            "h": rnd(B, L, D),
            "skip": rnd(B, L, D),
            "weight": rnd(D, 2 * D, s=(2 * D) ** -0.5),
            "bias": rnd(D, s=0.02),
        }
        with torch.no_grad():
            x = torch.cat([t["h"], t["skip"]], dim=-1)
        _slot.update(key=key, tensors=t, x=x.requires_grad_(True),
                     grad=torch.randn(B, L, D, generator=g, device=device, dtype=torch.float32).to(dtype))
    return _slot


def _chain(provider: str) -> Callable[[Dict[str, Any]], Tuple[torch.Tensor, List[torch.Tensor]]]:
    """``f(slot) -> (output, the leaves its gradients are taken for)``."""
    if provider.startswith("uvit_fast"):
        def f(s):
            t = s["tensors"]
            out = skip_concat_linear(t["h"], t["skip"], t["weight"], t["bias"], backend=uvit_backend(provider))
            return out, [t["h"], t["skip"], t["weight"], t["bias"]]
        return f
    if provider == "linear_no_concat":
        def g(s):
            t = s["tensors"]
            return F.linear(s["x"], t["weight"], t["bias"]), [s["x"], t["weight"], t["bias"]]
        return g

    ref = skip_concat_linear_reference
    if provider == "compile":
        ref = torch.compile(skip_concat_linear_reference, dynamic=False)

    def r(s):
        t = s["tensors"]
        return ref(t["h"], t["skip"], t["weight"], t["bias"]), [t["h"], t["skip"], t["weight"], t["bias"]]
    return r


def _cost(spec: _Spec, dtype: torch.dtype, pass_: str) -> Tuple[int, int]:
    """(bytes, flops) of the fused op."""
    e = torch.finfo(dtype).bits // 8
    M, D = spec.M, spec.D
    act, w, vec = M * D * e, D * 2 * D * e, D * e
    fwd = 2 * act + w + vec + act  # read h, skip, weight, bias; write y
    bwd = act + 2 * act + w + 2 * act + w + vec  # read dy, h, skip, weight; write dh, dskip, dweight, dbias
    gemm = 2 * M * D * (2 * D)
    return {"fwd": fwd, "fwd+bwd": fwd + bwd}[pass_], {"fwd": gemm, "fwd+bwd": 3 * gemm}[pass_]


def _make_fn(spec: _Spec, provider: str, pass_: str, device: torch.device, dtype: torch.dtype):
    chain = _chain(provider)
    if pass_ == "fwd":
        def fn():
            s = _inputs(spec, device, dtype)
            with torch.no_grad():
                return chain(s)[0]
    else:
        def fn():
            s = _inputs(spec, device, dtype)
            out, leaves = chain(s)
            return torch.autograd.grad(out, leaves, s["grad"])
    return fn


def specs() -> List[_Spec]:
    return [_Spec(presets, BATCH, L, D) for presets, L, D in SHAPES]


def cases(device: torch.device, dtype: torch.dtype) -> List[Case]:
    """Every out-block shape x pass x provider; the ``uvit_fast`` rows need CUDA."""
    device = torch.device(device)
    out: List[Case] = []
    for spec in specs():
        for pass_ in PASSES:
            nbytes, flops = _cost(spec, dtype, pass_)
            for provider in PROVIDERS:
                needs_cuda = provider.startswith("uvit_fast")
                out.append(Case(
                    suite="ops",
                    op="skip_concat_linear",
                    shape=spec.label,
                    pass_=pass_,
                    provider=provider,
                    fn=_make_fn(spec, provider, pass_, device, dtype),
                    bytes=nbytes,
                    flops=flops,
                    needs_cuda=needs_cuda,
                    skip_reason=(
                        "the Triton kernel at preset sizes needs CUDA (the CPU interpreter is far too slow)"
                        if needs_cuda else None
                    ),
                    extra={
                        "preset": spec.presets,
                        "M": spec.M,
                        "N": spec.D,
                        "K": 2 * spec.D,
                        "ceiling_provider": "linear_no_concat",
                        "dtype": str(dtype).replace("torch.", ""),
                    },
                ))
    return out
