"""Benchmark cases: attention at ViT-diffusion shapes, forward and backward, against every backend.

Shapes: head_dim ``d`` in {64, 72, 80, 128} x tokens ``L`` in {77, 258, 334, 1026, 4096}
(CLIP text, U-ViT-H/2 at 256 px, U-ViT-T2I, 512 px with patch 2, long sequences), ``H = 16``
heads, batch ``B = max(1, round(32768 / L))`` (about 32k tokens a step), self-attention, no mask.
Inputs are one packed ``(B, L, 3, H, d)`` qkv as the projection writes it; every provider reads
it without copies (SDPA through ``(B, H, L, d)`` transposed views).

Passes: ``fwd`` (under ``torch.no_grad``) and ``bwd`` (the backward alone: the forward graph is
built in the untimed first call and ``torch.autograd.grad(..., retain_graph=True)`` is timed).
Providers:

* ``eager``: the plain PyTorch reference (``attention_reference``, materialises ``L x L``);
* ``compile``: ``torch.compile`` of the same;
* ``uvit_fast``: our Triton kernel (``attention_qkvpacked``, packed gradient; CUDA only);
* ``sdpa_flash``, ``sdpa_efficient``, ``sdpa_cudnn``, ``sdpa_math``: PyTorch SDPA pinned to one
  backend with ``torch.nn.attention.sdpa_kernel`` (the first three CUDA only; a backend that
  rejects a shape makes an ``error`` row);
* ``flash_attn`` (``flash_attn_qkvpacked_func``) and ``xformers``
  (``memory_efficient_attention``): when the packages are importable (else skipped).

``flops`` follows torch's SDPA convention (torch/utils/flop_counter.py), 2 per multiply-add:
``4 B H L^2 d`` forward (``Q K^T`` and ``P V``), ``10 B H L^2 d`` backward (five matmuls incl.
the recomputed scores), so TFLOP/s compare across providers whatever they recompute. ``bytes`` is
the minimum traffic of a fused kernel: forward reads q, k, v and writes o (+ the fp32 row
statistics); backward reads q, k, v, o, dO and writes dq, dk, dv. Tensors are allocated on the
first call of a case's ``fn``; one case's tensors (and retained graph) are alive at a time.

Targets (docs/performance-targets): at d=72, L=258 and 1026, ``uvit_fast`` forward >= 1.2x the
best SDPA row and >= 1.2x ``flash_attn``; at d=64, L>=1024, >= 0.9x the best SDPA row.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

from uvit_fast.bench.core import Case, uvit_backend
from uvit_fast.ops import attention_qkvpacked, attention_reference

HEAD_DIMS = (64, 72, 80, 128)
SEQ_LENS = (77, 258, 334, 1026, 4096)
HEADS = 16
TOKENS = 32768
PASSES = ("fwd", "bwd")

SDPA_PROVIDERS = {
    "sdpa_flash": "FLASH_ATTENTION",
    "sdpa_efficient": "EFFICIENT_ATTENTION",
    "sdpa_cudnn": "CUDNN_ATTENTION",
    "sdpa_math": "MATH",
}
PROVIDERS = ("eager", "compile", "uvit_fast", "uvit_fast_auto", *SDPA_PROVIDERS, "flash_attn", "xformers")


def batch_for(L: int) -> int:
    return max(1, round(TOKENS / L))


def shapes() -> List[Tuple[int, int, int]]:
    """``(B, L, d)`` in benchmark order (the first one is what a CPU run times)."""
    return [(batch_for(L), L, d) for d in HEAD_DIMS for L in SEQ_LENS]


def _label(B: int, L: int, d: int) -> str:
    return f"B={B} L={L} H={HEADS} d={d}"


def _cost(B: int, L: int, d: int, dtype: torch.dtype, pass_: str) -> Tuple[int, int]:
    """(bytes, flops) of one pass."""
    e = torch.finfo(dtype).bits // 8
    t = B * L * HEADS * d * e  # one (B, L, H, d) tensor
    stats = B * HEADS * L * 4 * 2
    if pass_ == "fwd":
        return 4 * t + stats, 4 * B * HEADS * L * L * d
    return 8 * t + stats, 10 * B * HEADS * L * L * d


_slot: Dict[str, Any] = {}


def _tensors(key, B: int, L: int, d: int, device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
    """One case's inputs; allocating them frees the previous case's (and its retained graph)."""
    if _slot.get("key") != key:
        _slot.clear()
        g = torch.Generator(device=device).manual_seed(0)
        qkv = torch.randn(B, L, 3, HEADS, d, generator=g, device=device, dtype=torch.float32).to(dtype)
        dout = torch.randn(B, L, HEADS, d, generator=g, device=device, dtype=torch.float32).to(dtype)
        _slot.update(key=key, qkv=qkv.requires_grad_(True), dout=dout)
    return _slot


def _provider_fn(provider: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(qkv) -> out (B, L, H, d)``."""
    if provider.startswith("uvit_fast"):
        return lambda qkv: attention_qkvpacked(qkv, backend=uvit_backend(provider))
    if provider in ("eager", "compile"):
        ref = attention_reference if provider == "eager" else torch.compile(attention_reference, dynamic=False)
        return lambda qkv: ref(*qkv.unbind(2))
    if provider in SDPA_PROVIDERS:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, SDPA_PROVIDERS[provider])

        def sdpa(qkv):
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return sdpa
    if provider == "flash_attn":
        def fa(qkv):
            import flash_attn

            return flash_attn.flash_attn_qkvpacked_func(qkv)
        return fa
    if provider == "xformers":
        def xf(qkv):
            import xformers.ops as xops

            return xops.memory_efficient_attention(*qkv.unbind(2))
        return xf
    raise ValueError(f"unknown attention provider {provider!r}")


def _make_fn(B, L, d, provider, pass_, device, dtype) -> Callable[[], Any]:
    f = _provider_fn(provider)
    key = (B, L, d, provider, pass_, str(device), dtype)
    if pass_ == "fwd":
        def fwd():
            s = _tensors(key, B, L, d, device, dtype)
            with torch.no_grad():
                return f(s["qkv"])
        return fwd

    def bwd():
        s = _tensors(key, B, L, d, device, dtype)
        if "out" not in s:  # first (untimed) call builds the graph
            s["out"] = f(s["qkv"])
        return torch.autograd.grad(s["out"], (s["qkv"],), s["dout"], retain_graph=True)
    return bwd


def _skip(provider: str, device: torch.device, dtype: torch.dtype):
    """(needs_cuda, skip_reason) of a provider."""
    if provider.startswith("uvit_fast"):
        return True, "the Triton kernel at these sizes needs CUDA (the CPU interpreter is far too slow)"
    if provider in ("sdpa_flash", "sdpa_efficient", "sdpa_cudnn"):
        if provider in ("sdpa_flash", "sdpa_cudnn") and dtype == torch.float32:
            return False, f"{provider} runs fp16/bf16 only"
        return True, f"{provider} is a CUDA kernel"
    if provider in ("flash_attn", "xformers"):
        if importlib.util.find_spec(provider) is None:
            return False, f"{provider} is not installed"
        if provider == "flash_attn" and dtype == torch.float32:
            return False, "flash_attn runs fp16/bf16 only"
        return True, f"{provider} is a CUDA kernel"
    return False, None


def cases(device: torch.device, dtype: torch.dtype) -> List[Case]:
    """Every shape x pass x provider."""
    device = torch.device(device)
    out: List[Case] = []
    for B, L, d in shapes():
        for pass_ in PASSES:
            nbytes, flops = _cost(B, L, d, dtype, pass_)
            for provider in PROVIDERS:
                needs_cuda, reason = _skip(provider, device, dtype)
                out.append(Case(
                    suite="ops",
                    op="attention",
                    shape=_label(B, L, d),
                    pass_=pass_,
                    provider=provider,
                    fn=_make_fn(B, L, d, provider, pass_, device, dtype),
                    bytes=nbytes,
                    flops=flops,
                    needs_cuda=needs_cuda,
                    skip_reason=reason,
                    extra={
                        "batch": B,
                        "L": L,
                        "heads": HEADS,
                        "head_dim": d,
                        "dtype": str(dtype).replace("torch.", ""),
                        "flop_convention": "torch sdpa: fwd 4BHL^2d, bwd 10BHL^2d",
                    },
                ))
    return out
