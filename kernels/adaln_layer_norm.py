"""AdaLN-modulated LayerNorm with the DiT gated residual: Triton kernels and launchers.

Forward, one program per row (row = one token of ``x`` viewed as ``(B, L, D)``)::

    x_new = x + gate * branch          (residual variant only; ``x + branch`` without gate)
    z     = LN(x_new) * weight + bias  (weight / bias optional)
    y     = z * (scale_offset + scale) + shift   (scale / shift optional)

Modulation tensors (``shift``, ``scale``, ``gate``) are ``(B', D)`` per sample or
``(B', L', D)`` with ``B'`` in ``{1, B}`` and ``L'`` in ``{1, L}``; broadcast dims are read
with stride 0 (no expanded copies). Statistics are computed in fp32 and the fp32 ``mean`` and
``rstd`` are saved per row.

Backward: a 2-D grid ``(B, C)``; program ``(b, c)`` walks a contiguous chunk of the rows of
sample ``b``, writes ``dx`` (and ``dbranch``, per-token modulation grads) per row, and keeps
fp32 register accumulators for the reductions over tokens (``dweight``, ``dbias`` and the
per-sample ``dshift`` / ``dscale`` / ``dgate``), which it writes to an fp32 partial buffer
``(B, C, D)``; the launcher sums the partials in torch. No atomics.

This module never imports ``uvit_fast``.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._fp8 import FP8_DTYPE, quantize_row
from ._utils import empty, row_launch_config, on_inputs_device


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _adaln_fwd_kernel(
    X, BR, G, SH, SC, W, BI,          # inputs (unused pointers are dummies)
    XN, Y, MEAN, RSTD, YS,            # outputs: x_new (residual only), y, fp32 stats, y's row scale (QUANT)
    L, D,
    sx_b, sx_l, sx_d,
    sbr_b, sbr_l, sbr_d,
    sg_b, sg_l, sg_d,
    ssh_b, ssh_l, ssh_d,
    ssc_b, ssc_l, ssc_d,
    eps, scale_offset,
    HAS_RES: tl.constexpr, HAS_GATE: tl.constexpr,
    HAS_SHIFT: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_D: tl.constexpr, QUANT: tl.constexpr = False,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    l = row - b * L
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D

    x = tl.load(X + b * sx_b + l * sx_l + cols * sx_d, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        br = tl.load(BR + b * sbr_b + l * sbr_l + cols * sbr_d, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            g = tl.load(G + b * sg_b + l * sg_l + cols * sg_d, mask=mask, other=0.0).to(tl.float32)
            x = x + g * br
        else:
            x = x + br
        xn_out = x.to(XN.dtype.element_ty)
        tl.store(XN + row * D + cols, xn_out, mask=mask)
        # normalise the stored (rounded) x_new, so that h == LN(x_new) for the returned x_new
        x = xn_out.to(tl.float32)

    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / D
    rstd = tl.rsqrt(var + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)

    y = xc * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(BI + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        sc = tl.load(SC + b * ssc_b + l * ssc_l + cols * ssc_d, mask=mask, other=0.0).to(tl.float32)
        y = y * (sc + scale_offset)
    if HAS_SHIFT:
        y = y + tl.load(SH + b * ssh_b + l * ssh_l + cols * ssh_d, mask=mask, other=0.0).to(tl.float32)
    if QUANT:  # y in e4m3 with its row scale (kernels/_fp8.py), for an FP8 GEMM's input
        q, row_scale = quantize_row(y, mask)
        tl.store(Y + row * D + cols, q, mask=mask)
        tl.store(YS + row, row_scale)
    else:
        tl.store(Y + row * D + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _adaln_bwd_kernel(
    DY, DXN, XN, BR, G, SC, W, BI, MEAN, RSTD,   # inputs (unused pointers are dummies)
    DX, DBR, DG_TOK, DSH_TOK, DSC_TOK,          # per-row outputs (N, D)
    DG_PART, DSH_PART, DSC_PART, DW_PART, DB_PART,  # fp32 partials (B * C, D)
    L, D, rows_per_prog,
    sdy_b, sdy_l, sdy_d,
    sdxn_b, sdxn_l, sdxn_d,
    sxn_b, sxn_l, sxn_d,
    sbr_b, sbr_l, sbr_d,
    sg_b, sg_l, sg_d,
    ssc_b, ssc_l, ssc_d,
    scale_offset,
    HAS_RES: tl.constexpr, HAS_DXN: tl.constexpr,
    HAS_GATE: tl.constexpr, GATE_TOK: tl.constexpr,
    HAS_SHIFT: tl.constexpr, SHIFT_TOK: tl.constexpr,
    HAS_SCALE: tl.constexpr, SCALE_TOK: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D

    l_start = c * rows_per_prog
    l_end = tl.minimum(l_start + rows_per_prog, L)

    w = tl.zeros([BLOCK_D], dtype=tl.float32) + 1.0
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    bias = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_B:
        bias = tl.load(BI + cols, mask=mask, other=0.0).to(tl.float32)
    # per-sample modulation rows are loaded once per program
    sc_row = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_SCALE:
        if not SCALE_TOK:
            sc_row = tl.load(SC + b * ssc_b + cols * ssc_d, mask=mask, other=0.0).to(tl.float32)
    g_row = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_GATE:
        if not GATE_TOK:
            g_row = tl.load(G + b * sg_b + cols * sg_d, mask=mask, other=0.0).to(tl.float32)

    acc_dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_dsh = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_dsc = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc_dg = tl.zeros([BLOCK_D], dtype=tl.float32)

    for l32 in range(l_start, l_end):
        row = b * L + l32  # int64 (b is), so are the offsets below
        l = row - b * L
        dy = tl.load(DY + b * sdy_b + l * sdy_l + cols * sdy_d, mask=mask, other=0.0).to(tl.float32)
        xn = tl.load(XN + b * sxn_b + l * sxn_l + cols * sxn_d, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (xn - mean) * rstd, 0.0)

        if HAS_SHIFT:
            if SHIFT_TOK:
                tl.store(DSH_TOK + row * D + cols, dy.to(DSH_TOK.dtype.element_ty), mask=mask)
            else:
                acc_dsh += dy
        dz = dy
        if HAS_SCALE:
            if SCALE_TOK:
                s = tl.load(SC + b * ssc_b + l * ssc_l + cols * ssc_d, mask=mask, other=0.0).to(tl.float32)
            else:
                s = sc_row
            z = xhat * w + bias
            dsc = dy * z
            if SCALE_TOK:
                tl.store(DSC_TOK + row * D + cols, dsc.to(DSC_TOK.dtype.element_ty), mask=mask)
            else:
                acc_dsc += dsc
            dz = dy * (s + scale_offset)
        if HAS_W:
            acc_dw += dz * xhat
        if HAS_B:
            acc_db += dz
        dxhat = dz * w
        c1 = tl.sum(xhat * dxhat, axis=0) / D
        c2 = tl.sum(dxhat, axis=0) / D
        dx = tl.where(mask, (dxhat - (xhat * c1 + c2)) * rstd, 0.0)
        if HAS_DXN:
            dx += tl.load(DXN + b * sdxn_b + l * sdxn_l + cols * sdxn_d, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * D + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_RES:
            if HAS_GATE:
                br = tl.load(BR + b * sbr_b + l * sbr_l + cols * sbr_d, mask=mask, other=0.0).to(tl.float32)
                if GATE_TOK:
                    g = tl.load(G + b * sg_b + l * sg_l + cols * sg_d, mask=mask, other=0.0).to(tl.float32)
                    tl.store(DG_TOK + row * D + cols, (dx * br).to(DG_TOK.dtype.element_ty), mask=mask)
                else:
                    g = g_row
                    acc_dg += dx * br
                tl.store(DBR + row * D + cols, (dx * g).to(DBR.dtype.element_ty), mask=mask)

    part = (b * n_chunks + c) * D + cols
    if HAS_W:
        tl.store(DW_PART + part, acc_dw, mask=mask)
    if HAS_B:
        tl.store(DB_PART + part, acc_db, mask=mask)
    if HAS_SHIFT:
        if not SHIFT_TOK:
            tl.store(DSH_PART + part, acc_dsh, mask=mask)
    if HAS_SCALE:
        if not SCALE_TOK:
            tl.store(DSC_PART + part, acc_dsc, mask=mask)
    if HAS_GATE:
        if not GATE_TOK:
            tl.store(DG_PART + part, acc_dg, mask=mask)


# ----------------------------------------------------------------------------------------------
# launch helpers
# ----------------------------------------------------------------------------------------------
def _as_rows3(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``(B, L, D)``: 3-D tensors as they are, anything else as ``(1, N, D)`` (a view
    whenever ``reshape`` can make one)."""
    if x.dim() == 3:
        return x
    return x.reshape(1, math.prod(x.shape[:-1]), x.shape[-1])


def _mod_strides(t: Optional[torch.Tensor]) -> Tuple[int, int, int]:
    """(sample, token, feature) strides of a modulation tensor, 0 on broadcast dims."""
    if t is None:
        return 0, 0, 0
    if t.dim() == 2:
        return (t.stride(0) if t.shape[0] != 1 else 0), 0, t.stride(1)
    return (
        t.stride(0) if t.shape[0] != 1 else 0,
        t.stride(1) if t.shape[1] != 1 else 0,
        t.stride(2),
    )


def _per_token(t: Optional[torch.Tensor]) -> bool:
    """True for ``(B', L, D)`` modulation with ``L > 1`` (grad elementwise), False for per-sample."""
    return t is not None and t.dim() == 3 and t.shape[1] != 1


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_chunks(device: torch.device, B: int, L: int, programs: Optional[int]) -> int:
    """Chunks per sample of the backward grid: about 4 programs per SM in total (8 programs on
    the CPU interpreter, so that small test shapes still split samples into uneven chunks)."""
    if programs is None:
        if device.type == "cuda":
            programs = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        else:
            programs = 8
    return max(1, min(L, triton.cdiv(programs, max(B, 1))))


def _dummy(device: torch.device) -> torch.Tensor:
    return torch.empty(1, dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
@on_inputs_device
def _forward(x, branch, gate, shift, scale, weight, bias, eps, scale_offset, out_dtype, xn_dtype, quant=False):
    D = x.shape[-1]
    device = x.device
    # the kernels read weight and bias (D,) at unit stride: copy a strided view (D elements)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    x3 = _as_rows3(x)
    B, L = x3.shape[0], x3.shape[1]
    N = B * L
    has_res = branch is not None
    br3 = _as_rows3(branch) if has_res else None
    xn = empty(*x.shape, dtype=xn_dtype, device=device) if has_res else None
    y = empty(*x.shape, dtype=FP8_DTYPE if quant else out_dtype, device=device)
    mean = empty(N, dtype=torch.float32, device=device)
    rstd = empty(N, dtype=torch.float32, device=device)
    y_scale = empty(*x.shape[:-1], dtype=torch.float32, device=device) if quant else None
    if N == 0 or D == 0:
        if D == 0:  # LayerNorm over an empty dim: NaN statistics, as PyTorch
            mean.fill_(float("nan"))
            rstd.fill_(float("nan"))
        return (xn, y, mean, rstd, y_scale) if quant else (xn, y, mean, rstd)
    BLOCK_D, num_warps = row_launch_config(D)
    dummy = _dummy(device)
    _adaln_fwd_kernel[(N,)](
        x3, br3 if has_res else dummy, gate if gate is not None else dummy,
        shift if shift is not None else dummy, scale if scale is not None else dummy,
        weight if weight is not None else dummy, bias if bias is not None else dummy,
        xn if has_res else dummy, y, mean, rstd, y_scale if quant else dummy,
        L, D,
        *x3.stride(),
        *(br3.stride() if has_res else (0, 0, 0)),
        *_mod_strides(gate),
        *_mod_strides(shift),
        *_mod_strides(scale),
        eps, scale_offset,
        HAS_RES=has_res, HAS_GATE=gate is not None,
        HAS_SHIFT=shift is not None, HAS_SCALE=scale is not None,
        HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_D=BLOCK_D, num_warps=num_warps, QUANT=quant,
    )
    return (xn, y, mean, rstd, y_scale) if quant else (xn, y, mean, rstd)


def adaln_layer_norm_forward(
    x: torch.Tensor,
    shift: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    scale_offset: float,
    out_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y = (LN(x) * weight + bias) * (scale_offset + scale) + shift``.

    ``x`` is ``(B, L, D)`` when modulated, else any ``(..., D)``. Returns ``(y, mean, rstd)``:
    ``y`` contiguous with ``x``'s shape in ``out_dtype``, ``mean``/``rstd`` fp32 of shape ``(rows,)``.
    """
    _, y, mean, rstd = _forward(x, None, None, shift, scale, weight, bias, eps, scale_offset, out_dtype, None)
    return y, mean, rstd


def adaln_layer_norm_fp8_forward(x, shift, scale, weight, bias, eps: float, scale_offset: float, branch=None,
                                 gate=None, xn_dtype=None):
    """:func:`adaln_layer_norm_forward` (with ``branch``: :func:`residual_adaln_layer_norm_forward`)
    writing ``y`` in float8_e4m3fn with one float32 scale per row (:mod:`kernels._fp8`), computed from
    the fp32 ``y`` (not rounded to a 16-bit dtype first). Returns ``(x_new or None, y_q, y_scale)``;
    ``y_scale`` has ``x.shape[:-1]``. Inference only: no statistics are returned."""
    xn, y, _, _, y_scale = _forward(x, branch, gate, shift, scale, weight, bias, eps, scale_offset, None,
                                    xn_dtype, quant=True)
    return xn, y, y_scale


def residual_adaln_layer_norm_forward(
    x: torch.Tensor,
    branch: torch.Tensor,
    gate: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    scale_offset: float,
    out_dtype: torch.dtype,
    xn_dtype: torch.dtype,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x_new = x + gate * branch`` (stored in ``xn_dtype``), then :func:`adaln_layer_norm_forward`
    of the stored ``x_new``. Returns ``(x_new, y, mean, rstd)``."""
    return _forward(x, branch, gate, shift, scale, weight, bias, eps, scale_offset, out_dtype, xn_dtype)


def _reduce_mod(part: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-sample fp32 partials ``(B, C, D)`` -> the gradient of modulation ``t`` (its shape, dtype)."""
    g = part.sum(1)
    if t.shape[0] == 1 and g.shape[0] != 1:
        g = g.sum(0, keepdim=True)
    return g.reshape(t.shape).to(t.dtype)


def _reduce_tok(buf: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-token grad ``(B, L, D)`` -> the gradient of ``t`` (sums the batch dim when broadcast)."""
    if t.shape[0] == 1 and buf.shape[0] != 1:
        buf = buf.sum(0, keepdim=True)
    return buf.to(t.dtype)


@on_inputs_device
def adaln_layer_norm_backward(
    dy: torch.Tensor,
    dx_new: Optional[torch.Tensor],
    x_new: torch.Tensor,
    branch: Optional[torch.Tensor],
    gate: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    scale_offset: float,
    dx_dtype: torch.dtype,
    *,
    residual: bool = False,
    programs: Optional[int] = None,
):
    """Gradients of the (residual) AdaLN LayerNorm.

    ``x_new`` is the normalised input (``x`` for the plain op, the returned ``x_new`` for the
    residual op); ``dx_new`` the incoming gradient of the returned ``x_new`` (residual op, may be
    None). ``shift`` is only used for its shape. Returns ``(dx, dbranch, dgate, dshift, dscale,
    dweight, dbias)``, each None where the input is absent; with ``residual`` and no ``gate``,
    ``dbranch`` is None too (it equals ``dx``). ``programs`` overrides the backward grid size hint.
    """
    D = x_new.shape[-1]
    device = x_new.device
    # the kernels read weight and bias (D,) at unit stride: copy a strided view (D elements)
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    xn3 = _as_rows3(x_new)
    B, L = xn3.shape[0], xn3.shape[1]
    N = B * L
    dy3 = dy.reshape(xn3.shape)
    dxn3 = dx_new.reshape(xn3.shape) if dx_new is not None else None
    br3 = branch.reshape(xn3.shape) if branch is not None else None
    has_gate = gate is not None
    gate_tok, shift_tok, scale_tok = _per_token(gate), _per_token(shift), _per_token(scale)

    C = _num_chunks(device, B, L, programs) if N > 0 else 1
    rows_per_prog = triton.cdiv(L, C) if N > 0 else 1
    C = triton.cdiv(L, rows_per_prog) if N > 0 else 1

    def part(flag):
        return empty(B, C, D, dtype=torch.float32, device=device) if flag else None

    def tok(t):
        # per-token grad straight in t's dtype, or fp32 when it must still be summed over batch
        if t.shape[0] == 1 and B != 1:
            return empty(B, L, D, dtype=torch.float32, device=device)
        return empty(B, L, D, dtype=t.dtype, device=device)

    dx = empty(*x_new.shape, dtype=dx_dtype, device=device)
    dbr = empty(*x_new.shape, dtype=branch.dtype, device=device) if (residual and has_gate) else None
    dg_tok = tok(gate) if gate_tok else None
    dsh_tok = tok(shift) if shift_tok else None
    dsc_tok = tok(scale) if scale_tok else None
    dg_part = part(has_gate and not gate_tok)
    dsh_part = part(shift is not None and not shift_tok)
    dsc_part = part(scale is not None and not scale_tok)
    dw_part = part(weight is not None)
    db_part = part(bias is not None)

    if N > 0 and D > 0:
        BLOCK_D, num_warps = row_launch_config(D)
        dummy = _dummy(device)

        def p(t):
            return t if t is not None else dummy

        _adaln_bwd_kernel[(B, C)](
            dy3, p(dxn3), xn3, p(br3), p(gate), p(scale), p(weight), p(bias), mean, rstd,
            dx, p(dbr), p(dg_tok), p(dsh_tok), p(dsc_tok),
            p(dg_part), p(dsh_part), p(dsc_part), p(dw_part), p(db_part),
            L, D, rows_per_prog,
            *dy3.stride(),
            *(dxn3.stride() if dxn3 is not None else (0, 0, 0)),
            *xn3.stride(),
            *(br3.stride() if br3 is not None else (0, 0, 0)),
            *_mod_strides(gate),
            *_mod_strides(scale),
            scale_offset,
            HAS_RES=residual, HAS_DXN=dxn3 is not None,
            HAS_GATE=has_gate, GATE_TOK=gate_tok,
            HAS_SHIFT=shift is not None, SHIFT_TOK=shift_tok,
            HAS_SCALE=scale is not None, SCALE_TOK=scale_tok,
            HAS_W=weight is not None, HAS_B=bias is not None,
            BLOCK_D=BLOCK_D, num_warps=num_warps,
        )
    else:  # nothing to launch: every gradient is zero
        for t in (dx, dbr, dg_tok, dsh_tok, dsc_tok, dg_part, dsh_part, dsc_part, dw_part, db_part):
            if t is not None:
                t.zero_()
        if dxn3 is not None:
            dx.copy_(dx_new)

    dgate = None
    if has_gate:
        dgate = _reduce_tok(dg_tok, gate) if gate_tok else _reduce_mod(dg_part, gate)
    dshift = None
    if shift is not None:
        dshift = _reduce_tok(dsh_tok, shift) if shift_tok else _reduce_mod(dsh_part, shift)
    dscale = None
    if scale is not None:
        dscale = _reduce_tok(dsc_tok, scale) if scale_tok else _reduce_mod(dsc_part, scale)
    dweight = dw_part.sum((0, 1)).to(weight.dtype) if weight is not None else None
    dbias = db_part.sum((0, 1)).to(bias.dtype) if bias is not None else None
    return dx, dbr, dgate, dshift, dscale, dweight, dbias
