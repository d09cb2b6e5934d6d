"""Benchmark cases: the linears with their epilogue in the GEMM (``fused_linear``) and the MLP (``fused_mlp``).

Shapes are U-ViT-H/2 at 256 px (``L = 258`` tokens: 256 patches, the time and the label token;
``D = 1152``, MLP width ``4D = 4608``) and DiT-XL/2 at 256 px (``L = 256``, same widths, the
tanh GELU and adaLN's per-sample gate), at batch 128 (``M = B * L``). Rows of ``fused_linear``:

* ``qkv``: ``(M, 1152) @ (3456, 1152).T + b``, no epilogue (the bare GEMM);
* ``proj+res``: ``(1152, 1152)`` with the block's residual;
* ``fc1+gelu``: ``(4608, 1152)`` with the erf GELU (U-ViT) or the tanh GELU (DiT);
* ``fc2+res`` / ``fc2+res+gate``: ``(1152, 4608)`` with the residual (U-ViT) and DiT's gate.

Rows of ``fused_mlp``: the whole MLP with its residual (U-ViT) or gated residual (DiT).

Passes: ``fwd`` (under ``torch.no_grad``) and ``fwd+bwd`` (gradients for every input, as in
training). Providers:

* ``eager``: the reference (``F.linear``: cuBLAS on CUDA, then the eager epilogue);
* ``compile``: ``torch.compile`` of the reference;
* ``uvit_fast``: the Triton kernels (``backend="triton"``; CUDA only: the CPU interpreter would
  take hours here), ``uvit_fast_auto``: ``backend="auto"`` (measured dispatch);
* ``addmm_activation``: ``torch._addmm_activation`` then the eager residual / gate: only the
  forward (it has no autograd) of the rows whose function it computes (its CUDA GELU is the tanh
  form: DiT's fc1 and MLP rows), CUDA only;
* ``linear``: the bare ``F.linear`` of the same shape, no epilogue: the GEMM ceiling the fused
  rows are measured against (targets, issue 16: the bare GEMM >= 95% of it, fc1+gelu >= 1.15x
  ``eager`` and fc2+res >= 1.1x ``eager``).

``flops`` counts 2 per multiply-add (forward one GEMM per linear, fwd+bwd three). ``bytes`` is the
minimum traffic of the fused op: inputs read once, outputs (and, for fwd+bwd, the saved
pre-activation and the gradients) written once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from uvit_fast.bench.core import Case, uvit_backend
from uvit_fast.ops import fused_linear, fused_linear_reference, fused_mlp, fused_mlp_reference

BATCH = 128
D, HIDDEN = 1152, 4608

PASSES = ("fwd", "fwd+bwd")
PROVIDERS = ("eager", "compile", "uvit_fast", "uvit_fast_auto", "addmm_activation", "linear")


@dataclass(frozen=True)
class _Spec:
    op: str  # "fused_linear" or "fused_mlp"
    name: str  # the row's layer, e.g. "fc1+gelu"
    preset: str
    L: int
    K: int
    N: int
    H: int = 0  # the MLP's hidden width (fused_mlp only)
    activation: Optional[str] = None
    residual: bool = False
    gate: bool = False  # per-sample (DiT's adaLN gate)
    stream32: bool = False  # the residual stream (residual, output, its gradient) in float32: autocast training
    B: int = BATCH

    @property
    def M(self) -> int:
        return self.B * self.L

    @property
    def label(self) -> str:
        dims = f"K={self.K}, H={self.H}, N={self.N}" if self.op == "fused_mlp" else f"K={self.K}, N={self.N}"
        stream = ", fp32 residual stream" if self.stream32 else ""
        return f"{self.preset} {self.name} B={self.B} L={self.L} (M={self.M}, {dims}{stream})"


UVIT, DIT = "U-ViT-H/2", "DiT-XL/2"
SPECS: List[_Spec] = [
    _Spec("fused_linear", "proj+res", UVIT, 258, D, D, residual=True),
    _Spec("fused_linear", "qkv", UVIT, 258, D, 3 * D),
    _Spec("fused_linear", "fc1+gelu", UVIT, 258, D, HIDDEN, activation="gelu"),
    _Spec("fused_linear", "fc2+res", UVIT, 258, HIDDEN, D, residual=True),
    _Spec("fused_linear", "fc1+gelu_tanh", DIT, 256, D, HIDDEN, activation="gelu_tanh"),
    _Spec("fused_linear", "fc2+res+gate", DIT, 256, HIDDEN, D, residual=True, gate=True),
    _Spec("fused_mlp", "mlp+res", UVIT, 258, D, D, H=HIDDEN, activation="gelu", residual=True),
    _Spec("fused_mlp", "mlp+res+gate", DIT, 256, D, D, H=HIDDEN, activation="gelu_tanh", residual=True, gate=True),
    # bf16 / fp16 autocast training: the linears in 16 bits, the block's residual stream in float32
    _Spec("fused_linear", "fc2+res", UVIT, 258, HIDDEN, D, residual=True, stream32=True),
    _Spec("fused_mlp", "mlp+res", UVIT, 258, D, D, H=HIDDEN, activation="gelu", residual=True, stream32=True),
]

_slot: Dict[str, Any] = {}


def _inputs(spec: _Spec, device: torch.device, dtype: torch.dtype) -> Dict[str, Any]:
    """The tensors of ``spec`` (allocated on first use; one spec's tensors alive at a time)."""
    key = (spec, str(device), dtype)
    if _slot.get("key") != key:
        _slot.clear()
        g = torch.Generator(device=device).manual_seed(0)

        def rnd(*shape, s=1.0):
            t = torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * s
            return t.to(dtype).requires_grad_(True)

        B, L = spec.B, spec.L
        t: Dict[str, Optional[torch.Tensor]] = {"x": rnd(B, L, spec.K)}
        if spec.op == "fused_mlp":
            t.update(w1=rnd(spec.H, spec.K, s=spec.K ** -0.5), b1=rnd(spec.H, s=0.02),
                     w2=rnd(spec.N, spec.H, s=spec.H ** -0.5), b2=rnd(spec.N, s=0.02))
        else:
            t.update(w=rnd(spec.N, spec.K, s=spec.K ** -0.5), b=rnd(spec.N, s=0.02))
        stream = torch.float32 if spec.stream32 else dtype
        t["residual"] = rnd(B, L, spec.N).to(stream).detach().requires_grad_(True) if spec.residual else None
        t["gate"] = rnd(B, spec.N) if spec.gate else None
        grad = torch.randn(B, L, spec.N, generator=g, device=device, dtype=torch.float32).to(stream)
        _slot.update(key=key, tensors=t, grad=grad)
    return _slot


def _leaves(t: Dict[str, Optional[torch.Tensor]]) -> List[torch.Tensor]:
    return [v for v in t.values() if v is not None]


def _call(spec: _Spec, t, fn_linear: Callable, fn_mlp: Callable, **kw) -> torch.Tensor:
    if spec.op == "fused_mlp":
        return fn_mlp(t["x"], t["w1"], t["b1"], t["w2"], t["b2"], activation=spec.activation,
                      residual=t["residual"], gate=t["gate"], **kw)
    return fn_linear(t["x"], t["w"], t["b"], activation=spec.activation, residual=t["residual"], gate=t["gate"], **kw)


def _addmm_activation(spec: _Spec, t) -> torch.Tensor:
    from uvit_fast.ops.fused_linear import _addmm_activation_linear, _epilogue_reference

    if spec.op == "fused_mlp":
        h = _addmm_activation_linear(t["x"], t["w1"], t["b1"], spec.activation, None)
        y = F.linear(h, t["w2"], t["b2"])
    else:
        y = _addmm_activation_linear(t["x"], t["w"], t["b"], spec.activation, None)
    return _epilogue_reference(y, t["residual"], t["gate"])


def _chain(spec: _Spec, provider: str) -> Callable[[Dict[str, Any]], Tuple[torch.Tensor, List[torch.Tensor]]]:
    """``f(slot) -> (output, the leaves its gradients are taken for)``."""
    if provider.startswith("uvit_fast"):
        backend = uvit_backend(provider)
        return lambda s: (_call(spec, s["tensors"], fused_linear, fused_mlp, backend=backend), _leaves(s["tensors"]))
    if provider == "addmm_activation":
        return lambda s: (_addmm_activation(spec, s["tensors"]), _leaves(s["tensors"]))
    if provider == "linear":
        def bare(s):
            t = s["tensors"]
            if spec.op == "fused_mlp":
                return F.linear(F.linear(t["x"], t["w1"], t["b1"]), t["w2"], t["b2"]), [t["x"], t["w1"], t["b1"], t["w2"], t["b2"]]
            return F.linear(t["x"], t["w"], t["b"]), [t["x"], t["w"], t["b"]]
        return bare
    ref_linear, ref_mlp = fused_linear_reference, fused_mlp_reference
    if provider == "compile":
        ref_linear = torch.compile(fused_linear_reference, dynamic=False)
        ref_mlp = torch.compile(fused_mlp_reference, dynamic=False)
    return lambda s: (_call(spec, s["tensors"], ref_linear, ref_mlp), _leaves(s["tensors"]))


def _cost(spec: _Spec, dtype: torch.dtype, pass_: str) -> Tuple[int, int]:
    """(bytes, flops) of the fused op."""
    e = torch.finfo(dtype).bits // 8
    s = 4 if spec.stream32 else e  # the residual stream's element size
    M = spec.M
    layers = [(spec.K, spec.H), (spec.H, spec.N)] if spec.op == "fused_mlp" else [(spec.K, spec.N)]
    gemm = sum(2 * M * k * n for k, n in layers)
    epi = (M * spec.N * s if spec.residual else 0) + (spec.B * spec.N * e if spec.gate else 0)
    fwd = sum(M * k + n * k + n for k, n in layers) * e + M * spec.N * s + epi
    if spec.op == "fused_mlp":
        fwd += M * spec.H * e  # h written (read back as fc2's input: counted in fc2's M * k)
    # backward: read grad, the saved inputs and weights; write every gradient; the MLP saves z too
    saved = (2 * M * spec.H if spec.op == "fused_mlp" else (M * spec.N if spec.activation or spec.gate else 0)) * e
    bwd = fwd + saved + M * spec.N * s + epi
    return {"fwd": fwd, "fwd+bwd": fwd + bwd}[pass_], {"fwd": gemm, "fwd+bwd": 3 * gemm}[pass_]


def _make_fn(spec: _Spec, provider: str, pass_: str, device: torch.device, dtype: torch.dtype):
    chain = _chain(spec, provider)
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


def _addmm_skip(spec: _Spec, pass_: str) -> Optional[str]:
    if pass_ != "fwd":
        return "torch._addmm_activation has no autograd"
    if spec.activation != "gelu_tanh":
        return f"torch._addmm_activation's CUDA GELU is the tanh form, not this row's {spec.activation!r}"
    return None


def cases(device: torch.device, dtype: torch.dtype) -> List[Case]:
    """Every shape x pass x provider; the ``uvit_fast`` and ``addmm_activation`` rows need CUDA."""
    device = torch.device(device)
    out: List[Case] = []
    for spec in SPECS:
        for pass_ in PASSES:
            nbytes, flops = _cost(spec, dtype, pass_)
            for provider in PROVIDERS:
                needs_cuda, skip = False, None
                if provider.startswith("uvit_fast"):
                    needs_cuda = True
                    skip = "the Triton kernel at preset sizes needs CUDA (the CPU interpreter is far too slow)"
                elif provider == "addmm_activation":
                    if _addmm_skip(spec, pass_) is not None:
                        continue  # it does not compute this row's function (or has no backward)
                    needs_cuda = True
                    skip = "torch._addmm_activation's GELU is the erf form on a CPU, not this row's tanh form"
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
                    skip_reason=skip,
                    extra={
                        "preset": spec.preset,
                        "layer": spec.name,
                        "M": spec.M,
                        "K": spec.K,
                        "N": spec.N,
                        "H": spec.H,
                        "activation": spec.activation,
                        "ceiling_provider": "linear",
                        "dtype": str(dtype).replace("torch.", ""),
                    },
                ))
    return out
