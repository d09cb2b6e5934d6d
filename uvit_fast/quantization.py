"""``uvit_fast.quantize(model, "fp8")``: W8A8 FP8 inference for the transformer blocks' linears.

Each chosen ``nn.Linear`` becomes an :class:`FP8Linear` in place: its weight quantized once to
float8_e4m3fn with one float32 scale per output channel, its activations quantized per row (token)
at every call (:func:`uvit_fast.ops.quantize_fp8`), and the GEMM run by
:func:`uvit_fast.ops.fp8_linear` with the epilogue fused (a block's MLP: fc1's activation, fc2's
gate and residual; see :func:`uvit_fast.layers.mlp_residual`).

Which linears: the plain ``nn.Linear`` modules inside the model's blocks (a child of an indexed
``nn.ModuleList``: timm's ``blocks.3``, U-ViT's ``in_blocks`` / ``mid_block`` / ``out_blocks``,
diffusers' ``transformer_blocks``), apart from those that run once per sample rather than once per
token and would not pay for their quantization (a module path with ``adaLN``, ``modulation``,
``norm`` or ``emb`` in it: DiT's adaLN, diffusers' AdaLayerNorm linears), and those whose in or out
features are below 128 or not a multiple of 16 (FP8 tiles; too small to gain). Everything else
stays in its dtype: the embedders, the final layer, attention itself (the report lists each with
the reason). ``skip`` adds patterns (``fnmatch``, on module paths) to keep.

The quantized model is for inference: its weights are buffers, and a forward that would record a
graph is a TypeError. ``state_dict`` holds the float8 weights (``...weight``) and their scales
(``...weight_scale``); loading it into a model quantized the same way restores them exactly.
Loading a float checkpoint into a quantized model quantizes its weights as they arrive; the usual
way is to load the upstream checkpoint first, then call :func:`quantize`.

On a CUDA GPU without FP8 tensor cores (compute capability below 8.9: A100, V100), ``quantize``
changes nothing and says so in the report. On CPU the model is quantized and runs the reference
math (dequantized operands in float32): an emulation, for accuracy studies and tests.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from uvit_fast.ops.fp8 import (
    FP8_DTYPE, OUT_DTYPES, FP8Activation, fp8_linear, fp8_mlp, quantize_fp8, quantize_fp8_concat,
    quantize_fp8_weight,
)

MODES = ("fp8",)
MIN_FEATURES = 128
_PER_SAMPLE = ("adaln", "modulation", "norm", "emb")


class FP8Linear(nn.Module):
    """``nn.Linear`` with an e4m3 weight (buffer ``weight``, ``(out, in)``), its per-output-channel
    float32 scales (buffer ``weight_scale``) and the original ``bias``. ``forward(x)`` quantizes
    ``x``'s rows, runs :func:`uvit_fast.ops.fp8_linear` and returns ``x``'s dtype (bfloat16,
    float16 or float32; bfloat16 for others)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype or torch.bfloat16, device=device))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "FP8Linear":
        """The FP8 twin of ``linear``: its weight quantized, its bias kept (detached) in its dtype."""
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device, dtype=w.dtype)
        m.weight, m.weight_scale = quantize_fp8_weight(w.detach())
        if linear.bias is not None:
            m.bias = linear.bias.detach().clone()
        return m

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"weight=float8_e4m3fn (per-channel scales), activations=float8_e4m3fn (per-row scales)"

    def forward(self, x: torch.Tensor, *, activation: Optional[str] = None, residual: Optional[torch.Tensor] = None,
                gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``residual + gate * act(linear(x))`` with the epilogue in the GEMM (:func:`fp8_linear`).
        ``x``: a tensor (quantized per row here, :func:`quantize_fp8`) or an :class:`FP8Activation`
        a norm kernel already wrote (:meth:`uvit_fast.layers.LayerNorm.quantized`)."""
        if isinstance(x, FP8Activation):
            x_q, x_scale, dtype = x
        else:
            (x_q, x_scale), dtype = quantize_fp8(x), x.dtype
        out_dtype = dtype if dtype in OUT_DTYPES else torch.bfloat16
        return fp8_linear(x_q, x_scale, self.weight, self.weight_scale, self.bias, activation=activation,
                          residual=residual, gate=gate, out_dtype=out_dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A float weight (an unquantized checkpoint) is quantized as it loads; its scale then comes
        from it, not from the state dict."""
        w = state_dict.get(prefix + "weight")
        if isinstance(w, torch.Tensor) and w.dtype != FP8_DTYPE and w.is_floating_point():
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {prefix}weight: copying a param with shape {tuple(w.shape)}, "
                                  f"the shape in current model is {(self.out_features, self.in_features)}.")
                return
            state_dict = dict(state_dict)
            q, s = quantize_fp8_weight(w.to(self.weight.device))
            state_dict[prefix + "weight"] = q
            state_dict.setdefault(prefix + "weight_scale", s)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def fp8_mlp_forward(fc1: FP8Linear, activation: Optional[str], fc2: FP8Linear, x, residual=None, gate=None):
    """``residual + gate * fc2(act(fc1(x)))`` for two :class:`FP8Linear` (``x``: a tensor or an
    :class:`FP8Activation`): one :func:`uvit_fast.ops.fp8.fp8_mlp` call, whose Triton path quantizes
    fc2's input inside fc2 from the row maxima fc1's epilogue wrote (no quantize pass between them).
    A float32 activation stream runs the two linears one after the other."""
    if isinstance(x, FP8Activation):
        x_q, x_scale, dtype = x
    else:
        (x_q, x_scale), dtype = quantize_fp8(x), x.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        h = fc1(FP8Activation(x_q, x_scale, dtype), activation=activation)
        return fc2(h, residual=residual, gate=gate)
    return fp8_mlp(x_q, x_scale, fc1.weight, fc1.weight_scale, fc1.bias, fc2.weight, fc2.weight_scale, fc2.bias,
                   activation=activation, residual=residual, gate=gate, out_dtype=dtype)


class FP8SkipLinear(FP8Linear):
    """U-ViT's long-skip :class:`uvit_fast.layers.SkipLinear` (``Linear(2D, D)`` on ``cat([h, skip])``)
    in FP8: ``forward(h, skip)`` quantizes the rows of the concat in one kernel without writing it
    in 16 bits (:func:`uvit_fast.ops.fp8.quantize_fp8_concat`), then one FP8 GEMM. Same state_dict
    keys as :class:`FP8Linear`."""

    def forward(self, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        dtype = torch.promote_types(h.dtype, skip.dtype)
        x_q, x_scale = quantize_fp8_concat(h, skip)
        return super().forward(FP8Activation(x_q, x_scale, dtype))


@dataclass
class QuantizeReport:
    """What :func:`quantize` did: ``quantized`` module paths, ``kept`` as ``(path, reason)``."""

    mode: str = "fp8"
    quantized: List[str] = field(default_factory=list)
    kept: List[Tuple[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def quantized_fraction(self) -> float:
        """Fraction of the model's linear weights (by element count) now in FP8, filled by :func:`quantize`."""
        return self._fraction

    _fraction: float = 0.0

    def __str__(self) -> str:
        lines = [f"uvit_fast.quantize: {self.mode}"]
        lines += [f"  note: {n}" for n in self.notes]
        lines.append(f"  quantized ({len(self.quantized)} linears, {100 * self._fraction:.1f}% of the linear weights):")
        lines += [f"    {p}" for p in self.quantized]
        lines.append(f"  kept in their dtype ({len(self.kept)}):")
        lines += [f"    {p or '<root>'}: {why}" for p, why in self.kept]
        return "\n".join(lines)


def _is_plain_linear(m: nn.Module) -> bool:
    from uvit_fast.layers import is_plain_linear

    return is_plain_linear(m)


def _is_skip_linear(m: nn.Module) -> bool:
    """This package's U-ViT long-skip linear (becomes an :class:`FP8SkipLinear`)."""
    from uvit_fast.layers import SkipLinear, _no_hooks

    return type(m) is SkipLinear and _no_hooks(m)


def _in_block(model: nn.Module, path: str) -> bool:
    """Whether ``path`` passes through an indexed child of an ``nn.ModuleList`` (a block)."""
    parts = path.split(".")
    mod = model
    for i, part in enumerate(parts[:-1]):
        mod = getattr(mod, part)
        if isinstance(mod, nn.ModuleList) and parts[i + 1].isdigit():
            return True
    return False


def _keep_reason(model: nn.Module, path: str, m: nn.Module, skip: Tuple[str, ...]) -> Optional[str]:
    if any(fnmatch.fnmatchcase(path, p) for p in skip):
        return "matches skip"
    if not (_is_plain_linear(m) or _is_skip_linear(m)):
        return "not a plain nn.Linear (a subclass with its own forward, or hooks)"
    lowered = path.lower()
    if not _in_block(model, path):
        return "outside the transformer blocks (embedders, the final layer, heads): kept"
    if any(w in lowered for w in _PER_SAMPLE):
        return "per-sample conditioning linear (adaLN / norm / embedding): one row per sample, would not pay"
    K, N = m.in_features, m.out_features
    if min(K, N) < MIN_FEATURES or K % 16 or N % 16:
        return f"{K} -> {N} features: below {MIN_FEATURES} or not a multiple of 16 (FP8 tiles), would not pay"
    return None


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first floating parameter or buffer (CPU when it has none)."""
    p = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    return torch.device("cpu") if p is None else p.device


def _device_note(device: torch.device) -> Tuple[bool, Optional[str]]:
    """``(go on, note)`` for a model on ``device``."""
    if device.type == "cpu":
        return True, ("on CPU: the FP8 linears run the reference math (float32 on the dequantized operands), "
                      "an emulation for accuracy and tests, not a speedup")
    if device.type == "meta":
        return True, "on the meta device: shapes only"
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if tuple(cap) < (8, 9):
            return False, (f"{device} has compute capability {cap[0]}.{cap[1]}: no FP8 tensor cores (8.9 or newer "
                           f"needed); the model is left unchanged in its dtype")
        return True, None
    return False, f"FP8 linears run on CUDA (or CPU, emulated); the model is on {device}: left unchanged"


def quantize(model: nn.Module, mode: str = "fp8", *, skip: Iterable[str] = ()) -> QuantizeReport:
    """Quantize ``model``'s block linears to FP8 in place (module docstring) and return the report.

    Works on :func:`uvit_fast.create_model` models and on upstream U-ViT / DiT, timm and diffusers
    models, before or after :func:`uvit_fast.optimize`. ``skip``: ``fnmatch`` patterns of module
    paths to keep in their dtype. Calling it again quantizes nothing more."""
    if mode not in MODES:
        raise ValueError(f"quantize: mode must be one of {MODES}; got {mode!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize: model must be an nn.Module; got {type(model).__name__}")
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    report = QuantizeReport(mode=mode)
    go, note = _device_note(_model_device(model))
    if note:
        report.notes.append(note)
    total = done = 0
    todo = []
    for path, m in model.named_modules():
        if isinstance(m, FP8Linear):
            total += m.weight.numel()
            done += m.weight.numel()
            report.quantized.append(path)
            continue
        if not isinstance(m, nn.Linear):
            continue
        total += m.weight.numel()
        why = _keep_reason(model, path, m, skip) if go else "left unchanged (see the note)"
        if why is None:
            todo.append((path, m))
            done += m.weight.numel()
        else:
            report.kept.append((path, why))
    if go:
        for path, m in todo:
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, name, (FP8SkipLinear if _is_skip_linear(m) else FP8Linear).from_linear(m))
            report.quantized.append(path)
        report.notes.append("attention (softmax(QK^T)V) stays in its dtype; the model is for inference only")
    else:
        done = 0
    report._fraction = done / total if total else 0.0
    return report
