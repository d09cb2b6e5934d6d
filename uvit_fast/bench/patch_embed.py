"""Benchmark cases: fused patchify + embed and fused decoder + unpatchify.

Shapes are the input and output stages of every upstream preset (batch 256, 64 for patch 1):

* U-ViT (``extras`` = time token, + label token for class-conditional, + 77 context tokens for
  text-to-image; learned ``pos_embed`` of batch 1): S/2 CIFAR-10, S/4 CelebA 64, M/4 and L/4
  ImageNet 64, L/2 and H/2 ImageNet 256 (latent 32x32x4), L/4 and H/4 ImageNet 512 (latent
  64x64x4), S/2 MS-COCO text-to-image.
* DiT S, B, L, XL with patch 2, 4, 8 (latent 32x32x4, no prefix tokens, a frozen
  ``pos_embed``; the decoder has 8 output channels because of ``learn_sigma``).
* The patch-size sweep 1, 2, 4, 8 at U-ViT-H's latent and width (patch 1 and 8 added; 2 and 4
  are presets).

Passes: ``fwd`` (under ``torch.no_grad``) and ``fwd+bwd``. Gradients are taken for what
training updates: weight, bias, prefix tokens and a learned ``pos_embed`` (the embed; the
image does not need one), and tokens, weight, bias (the decoder). Providers: ``eager`` (the
plain PyTorch reference chain: conv -> flatten -> transpose -> cat -> add, and linear ->
rearrange), ``compile`` (``torch.compile`` of that chain) and ``uvit_fast`` (the Triton kernels;
CUDA only: the CPU interpreter would take hours at these sizes).

``bytes`` is the minimum HBM traffic of the fused op (every input read once, every output and
gradient written once; the fp32 split-reduction partials of dW/dbias are not counted);
``flops`` counts 2 per multiply-add of the GEMMs. Tensors are allocated on the first call of a
case's ``fn`` and shared by the cases of the same shape; one shape's tensors are alive at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import torch

from uvit_fast.bench.core import Case, uvit_backend
from uvit_fast.ops import (
    decoder_unpatchify,
    decoder_unpatchify_reference,
    patchify_embed,
    patchify_embed_reference,
)

BATCH = 256
BATCH_P1 = 64  # patch 1: 1024+ tokens per image

# (preset, image side, patch, in channels, out channels, D, extras, learned pos_embed)
PRESETS: List[Tuple[str, int, int, int, int, int, int, bool]] = [
    ("U-ViT-S/2 cifar10", 32, 2, 3, 3, 512, 1, True),
    ("U-ViT-S/4 celeba64", 64, 4, 3, 3, 512, 1, True),
    ("U-ViT-M/4 imagenet64", 64, 4, 3, 3, 768, 2, True),
    ("U-ViT-L/4 imagenet64", 64, 4, 3, 3, 1024, 2, True),
    ("U-ViT-L/2 imagenet256", 32, 2, 4, 4, 1024, 2, True),
    ("U-ViT-H/2 imagenet256", 32, 2, 4, 4, 1152, 2, True),
    ("U-ViT-L/4 imagenet512", 64, 4, 4, 4, 1024, 2, True),
    ("U-ViT-H/4 imagenet512", 64, 4, 4, 4, 1152, 2, True),
    ("U-ViT-S/2 mscoco-t2i", 32, 2, 4, 4, 512, 78, True),
    ("U-ViT-H/1 sweep", 32, 1, 4, 4, 1152, 2, True),
    ("U-ViT-H/8 sweep", 32, 8, 4, 4, 1152, 2, True),
]
for _name, _D in (("S", 384), ("B", 768), ("L", 1024), ("XL", 1152)):
    for _p in (2, 4, 8):
        PRESETS.append((f"DiT-{_name}/{_p}", 32, _p, 4, 8, _D, 0, False))

OPS = ("patchify_embed", "decoder_unpatchify")
PASSES = ("fwd", "fwd+bwd")
PROVIDERS = ("eager", "compile", "uvit_fast", "uvit_fast_auto")


@dataclass(frozen=True)
class _Spec:
    op: str
    preset: str
    B: int
    side: int
    p: int
    C: int       # embed: input channels; decoder: output channels
    D: int
    E: int
    learned_pos: bool

    @property
    def L(self) -> int:
        return (self.side // self.p) ** 2

    @property
    def grid(self) -> Tuple[int, int]:
        return (self.side // self.p, self.side // self.p)

    @property
    def K(self) -> int:
        return self.C * self.p * self.p

    @property
    def label(self) -> str:
        return (f"{self.preset} B={self.B} img={self.C}x{self.side}x{self.side} p={self.p} "
                f"D={self.D} E={self.E}")


_slot: Dict[str, Any] = {}


def _inputs(spec: _Spec, device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
    key = (spec, str(device), dtype)
    if _slot.get("key") != key:
        _slot.clear()
        g = torch.Generator(device=device).manual_seed(0)

        def rnd(*shape, grad=True, s=1.0):
            t = torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * s
            return t.to(dtype).requires_grad_(grad)

        B, D, E, L, K = spec.B, spec.D, spec.E, spec.L, spec.K
        if spec.op == "patchify_embed":
            t = {
                "x": rnd(B, spec.C, spec.side, spec.side, grad=False),
                "weight": rnd(D, spec.C, spec.p, spec.p, s=K ** -0.5),
                "bias": rnd(D, s=0.02),
                "prefix": rnd(B, E, D) if E else None,
                "pos_embed": rnd(1, E + L, D, grad=spec.learned_pos, s=0.02),
            }
            out_shape = (B, E + L, D)
        else:
            t = {
                "tokens": rnd(B, E + L, D),
                "weight": rnd(K, D, s=D ** -0.5),
                "bias": rnd(K, s=0.02),
            }
            out_shape = (B, spec.C, spec.side, spec.side)
        _slot.update(key=key, tensors=t, grad=rnd(*out_shape, grad=False))
    return _slot


def _chain(spec: _Spec, provider: str) -> Callable[[Dict[str, Any]], torch.Tensor]:
    if spec.op == "patchify_embed":
        if provider.startswith("uvit_fast"):
            def f(t):
                return patchify_embed(t["x"], t["weight"], t["bias"], prefix=t["prefix"],
                                      pos_embed=t["pos_embed"], backend=uvit_backend(provider))
            return f

        def ref(x, weight, bias, prefix, pos_embed):
            return patchify_embed_reference(x, weight, bias, prefix=prefix, pos_embed=pos_embed)
        if provider == "compile":
            ref = torch.compile(ref, dynamic=False)

        def g(t):
            return ref(t["x"], t["weight"], t["bias"], t["prefix"], t["pos_embed"])
        return g

    grid, p, E = spec.grid, spec.p, spec.E
    if provider.startswith("uvit_fast"):
        def f(t):
            return decoder_unpatchify(t["tokens"], t["weight"], t["bias"], patch_size=p, grid=grid,
                                      extras=E, backend=uvit_backend(provider))
        return f

    def dref(tokens, weight, bias):
        return decoder_unpatchify_reference(tokens, weight, bias, patch_size=p, grid=grid, extras=E)
    if provider == "compile":
        dref = torch.compile(dref, dynamic=False)

    def h(t):
        return dref(t["tokens"], t["weight"], t["bias"])
    return h


def _cost(spec: _Spec, dtype: torch.dtype, pass_: str) -> Tuple[int, int]:
    """(bytes, flops) of the fused op."""
    e = torch.finfo(dtype).bits // 8
    B, D, E, L, K = spec.B, spec.D, spec.E, spec.L, spec.K
    if spec.op == "patchify_embed":
        img, w, vec = B * spec.C * spec.side * spec.side * e, D * K * e, D * e
        pre, pos, out = B * E * D * e, (E + L) * D * e, B * (E + L) * D * e
        fwd = img + w + vec + pre + pos + out
        # read dout, x, weight; write dweight, dbias, dprefix (+ dpos when learned)
        bwd = out + img + w + w + vec + pre + (pos if spec.learned_pos else 0)
        gemm = 2 * B * L * K * D
        flops = {"fwd": gemm, "fwd+bwd": 2 * gemm}[pass_]
    else:
        tok, w, vec, img = B * L * D * e, K * D * e, K * e, B * L * K * e
        fwd = tok + w + vec + img
        # read dimg, tokens, weight; write dtokens (extras rows included), dweight, dbias
        bwd = img + tok + w + B * (E + L) * D * e + w + vec
        gemm = 2 * B * L * K * D
        flops = {"fwd": gemm, "fwd+bwd": 3 * gemm}[pass_]
    return {"fwd": fwd, "fwd+bwd": fwd + bwd}[pass_], flops


def _make_fn(spec: _Spec, provider: str, pass_: str, device: torch.device, dtype: torch.dtype):
    chain = _chain(spec, provider)

    def leaves(t):
        return [v for v in t.values() if v is not None and v.requires_grad]

    if pass_ == "fwd":
        def fn():
            s = _inputs(spec, device, dtype)
            with torch.no_grad():
                return chain(s["tensors"])
    else:
        def fn():
            s = _inputs(spec, device, dtype)
            out = chain(s["tensors"])
            return torch.autograd.grad(out, leaves(s["tensors"]), s["grad"])
    return fn


def specs() -> List[_Spec]:
    out = []
    for op in OPS:
        for preset, side, p, cin, cout, D, E, learned in PRESETS:
            B = BATCH_P1 if p == 1 else BATCH
            out.append(_Spec(op, preset, B, side, p, cin if op == "patchify_embed" else cout, D, E, learned))
    return out


def cases(device: torch.device, dtype: torch.dtype) -> List[Case]:
    """Every (op, preset) x pass x provider; the ``uvit_fast`` rows need CUDA."""
    device = torch.device(device)
    out: List[Case] = []
    for spec in specs():
        for pass_ in PASSES:
            nbytes, flops = _cost(spec, dtype, pass_)
            for provider in PROVIDERS:
                needs_cuda = provider.startswith("uvit_fast")
                out.append(Case(
                    suite="ops",
                    op=spec.op,
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
                        "preset": spec.preset,
                        "patch": spec.p,
                        "tokens": spec.B * (spec.E + spec.L),
                        "D": spec.D,
                        "K": spec.K,
                        "extras": spec.E,
                        "dtype": str(dtype).replace("torch.", ""),
                    },
                ))
    return out
