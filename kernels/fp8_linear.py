"""FP8 (e4m3) W8A8 linears: row-wise quantization and the GEMM with the fused epilogue.

* :func:`quantize_rows`: ``x (M, K)`` in float16 / bfloat16 / float32 to ``(x_q, scale)``, one scale
  per row: ``scale[m]`` is the smallest power of two with ``amax(|x[m]|) / scale[m] <= 448`` (amax at
  least EPS) and ``x_q[m] = e4m3(x[m] / scale[m])``, rounded to nearest even (saturated at +-448).
  Power-of-two scales (as the MX formats' shared exponents) make the scaling exact: the only
  rounding is e4m3's, so every backend gives the same bits, and e4m3 being a floating format, a
  normal value's relative precision does not depend on where in the range the scale puts it. One program per ``BLOCK_M`` rows: a pass over K for
  the amax, a second one that quantizes (the rows are in L1/L2 by then).
* :func:`fp8_linear_forward`: ``out = residual + gate[m // gate_rows] * act((x_q @ w_q.T) * x_scale[m]
  * w_scale[n] + bias)``. ``w_q (N, K)`` is nn.Linear's layout in e4m3 with one scale per output
  channel. Persistent programs in grouped tile order, fp32 accumulation of the exact e4m3 products,
  the dequantization on the accumulator tile, then :mod:`kernels.fused_linear`'s epilogue (bias,
  activation, gate, residual) and one store in ``out_dtype``. On sm_90 the x and weight tiles come
  through TMA descriptors and ``tl.dot`` of two e4m3 tiles is an FP8 wgmma (K-major A and B: x's
  rows and the weight's rows are both K-contiguous, as wgmma's FP8 form needs); pointer loads where
  the layout does not allow TMA (K not a multiple of 16, strided views) and under the interpreter.

Rounding to e4m3 is done explicitly in fp32 bits (:func:`kernels._fp8.round_e4m3`) before the conversion, which is
then exact: the interpreter's float32-to-e4m3 conversion drops the carry into the exponent (31.08
became 16), and the explicit rounding gives the same bits as PyTorch's ``.to(torch.float8_e4m3fn)``
on the interpreter and on the GPU. The GEMM needs a GPU with FP8 tensor cores (sm_89 and newer);
the launchers refuse others. This module never imports ``uvit_fast``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._fp8 import EPS, FP8_DTYPE, FP8_MAX, quantize_tile, round_e4m3, row_scale  # noqa: F401
from ._utils import empty, launch, on_inputs_device
from ._utils import capability as _capability, smem_limit as _smem_limit
from .fused_linear import (
    _act,
    _act_code,
    _check_gate,
    _check_matrix,
    _descriptor,
    _epilogue,
    _set_desc_blocks,
    _shape_text,
    _sm_count,
    _tile_coords,
    _tma_ok,
    m_bucket,
)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip() == "1"

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_Y_ROUND = {torch.float16: 1, torch.bfloat16: 2}


# --------------------------------------------------------------------------------------------
# rounding and quantization
# --------------------------------------------------------------------------------------------
@triton.jit
def _row_tile(X, X2, rows, c, mask_m, K, K1, stride_xm, stride_xk, stride_x2m, stride_x2k, HAS_X2: tl.constexpr):
    """Columns ``c`` of the rows, in fp32: of ``X`` below ``K1`` and of ``X2`` from ``K1`` on (the
    concat ``[X, X2]`` without materialising it) when ``HAS_X2``; zeros outside ``K``."""
    if HAS_X2:
        a = tl.load(X + rows[:, None] * stride_xm + c[None, :] * stride_xk,
                    mask=mask_m[:, None] & (c[None, :] < K1), other=0.0).to(tl.float32)
        b = tl.load(X2 + rows[:, None] * stride_x2m + (c[None, :] - K1) * stride_x2k,
                    mask=mask_m[:, None] & (c[None, :] >= K1) & (c[None, :] < K), other=0.0).to(tl.float32)
        return a + b
    return tl.load(X + rows[:, None] * stride_xm + c[None, :] * stride_xk,
                   mask=mask_m[:, None] & (c[None, :] < K), other=0.0).to(tl.float32)


@triton.jit
def _quantize_rows_kernel(X, X2, Q, S, M, K, K1, stride_xm, stride_xk, stride_x2m, stride_x2k, stride_qm,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_X2: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < M
    cols = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = _row_tile(X, X2, rows, cols + k0, mask_m, K, K1, stride_xm, stride_xk, stride_x2m, stride_x2k, HAS_X2)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    scale, inverse = row_scale(amax)
    tl.store(S + rows, scale, mask=mask_m)
    for k0 in range(0, K, BLOCK_K):
        x = _row_tile(X, X2, rows, cols + k0, mask_m, K, K1, stride_xm, stride_xk, stride_x2m, stride_x2k, HAS_X2)
        tl.store(Q + rows[:, None] * stride_qm + cols[None, :] + k0, quantize_tile(x, inverse),
                 mask=mask_m[:, None] & (cols[None, :] + k0 < K))


def _check_fp8_device(name: str, t: torch.Tensor) -> None:
    """The kernels need FP8 conversions and tensor cores: sm_89 or newer (or the interpreter)."""
    cap = _capability(t)
    if cap is not None and tuple(cap) < (8, 9):
        raise ValueError(f"{name} is on a GPU of compute capability {cap[0]}.{cap[1]}; the FP8 kernels need "
                         f"8.9 or newer (Ada, Hopper)")


def quantize_block_k(K: int) -> int:
    """The quantize kernel's column block: the power of two in [128, 1024] (<= 128 under the
    interpreter) that pads K least, the larger on a tie (K = 1152: 128, 9 full steps; 1024 would
    leave 896 of its second step's columns masked, as compiled for sm_90; K = 4608: 512)."""
    if _INTERPRET or K <= 128:
        return min(triton.next_power_of_2(K), 128)
    return min((1024, 512, 256, 128), key=lambda b: (triton.cdiv(K, b) * b - K, -b))


@on_inputs_device
def quantize_rows(x: torch.Tensor, x2=None):
    """``(x_q (M, K) float8_e4m3fn contiguous, scale (M,) float32)`` of a 2-D ``x`` of any strides;
    with ``x2 (M, K2)``, of the rows of ``[x, x2]`` (``K = K1 + K2``; U-ViT's long-skip concat, which
    is never materialised in 16 bits): one scale per row over both halves."""
    _check_matrix("x", x)
    _check_fp8_device("x", x)
    M, K1 = x.shape
    if x2 is not None:
        _check_matrix("x2", x2, rows=M, device=x.device)
    K = K1 + (x2.shape[1] if x2 is not None else 0)
    q = empty(M, K, dtype=FP8_DTYPE, device=x.device)
    s = empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return q, s
    if K == 0:
        s.fill_(2.0 ** -48)  # the scale of amax EPS
        return q, s
    block_k = quantize_block_k(K1 if x2 is not None and x2.shape[1] == K1 else K)
    block_m = max(1, min(16, 4096 // block_k))
    launch(_quantize_rows_kernel, (triton.cdiv(M, block_m),), x, x2 if x2 is not None else x, q, s, M, K, K1,
           x.stride(0), x.stride(1), *(x2.stride() if x2 is not None else (0, 0)), q.stride(0),
           BLOCK_M=block_m, BLOCK_K=block_k, HAS_X2=x2 is not None, num_warps=4)
    return q, s


# --------------------------------------------------------------------------------------------
# the GEMM
# --------------------------------------------------------------------------------------------
# BLOCK_M, BLOCK_N, BLOCK_K, warps, stages: 128-byte K tiles (BLOCK_K = 128 e4m3), as the bf16
# kernel's 64; the 64-row tiles for small M (sampling at batch 1-8)
_FWD_SHAPES = [
    (128, 256, 128, 8, 3),
    (128, 256, 128, 8, 4),
    (256, 128, 128, 8, 3),
    (128, 128, 128, 8, 4),
    (128, 128, 128, 4, 4),
    (64, 128, 128, 4, 4),
    (64, 64, 128, 4, 4),
]


def _configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4,
                              num_stages=1, pre_hook=_set_desc_blocks)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w,
                          num_stages=s, pre_hook=_set_desc_blocks) for bm, bn, bk, w, s in _FWD_SHAPES]


#: the partial row maxima of an ``amax_out`` GEMM are per this many columns, whatever the config
MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _configs())


def smem_bytes(config, out_elem: int, tma_epilogue: bool, a_elem: int = 1) -> int:
    """Shared memory of a config: ``stages`` buffers of the e4m3 x and weight tiles, plus the TMA
    epilogue's staging buffer of one ``(BLOCK_M, BLOCK_N / 2)`` output half (quarter when the
    output is float32, as in :mod:`kernels.fused_linear`), plus on the TMA path one 8-byte mbarrier
    per stage. Compiled for sm_90 (Triton 3.9, bfloat16 output, every config of ``_FWD_SHAPES`` at
    U-ViT-H/2 and DiT-XL/2) the kernel's shared memory was the tiles and staging buffer plus 24 B
    at 3 stages and 32 B at 4 (e.g. 128x256x128: 180248 B at 3 stages, 229408 B at 4), which this
    now gives exactly; without the barriers the estimate was that much low (no config within 32 B
    of a limit, so no prune decision changes). The pointer path compiled for sm_90 took the tiles
    alone (147456 B for 128x256x128 at 3 stages), as this gives without ``tma_epilogue``."""
    k = config.kwargs
    # a_elem 2: A_QUANT's 16-bit x tiles, counted in every stage (an upper bound: compiled for sm_90
    # the kernel took 16-32 KiB less, e.g. 180280 B for 128x128x128 in 4 stages against 213024 B here)
    smem = config.num_stages * (k["BLOCK_M"] * a_elem + k["BLOCK_N"]) * k["BLOCK_K"]
    if tma_epilogue:
        smem += k["BLOCK_M"] * (k["BLOCK_N"] // (4 if out_elem >= 4 else 2)) * out_elem
        smem += 8 * config.num_stages  # the TMA loads' mbarriers
    return smem


def _prune(configs, named_args, **kwargs):
    """Drop configs over the GPU's shared memory; on the pointer path with an epilogue beyond the
    bias, drop those whose fp32 accumulator takes 128 or more registers per thread (as the bf16 kernel)."""
    out = named_args["OUT"]
    out_t = getattr(out, "base", out)
    cap = _capability(out_t)
    tma = bool(kwargs.get("USE_TMA", False))
    a_elem = 2 if kwargs.get("A_QUANT") else 1

    def smem(c):
        return smem_bytes(c, out_t.element_size(), tma, a_elem)

    kept = [c for c in configs if smem(c) <= _smem_limit(cap)]
    heavy = not tma and bool(kwargs.get("ACTIVATION", 0) or kwargs.get("HAS_GATE") or kwargs.get("HAS_RES"))
    if heavy:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 128 * 32 * c.num_warps]
    if kwargs.get("A_QUANT"):
        # the x tile is quantized in registers (fp32) beside the accumulator: compiled for sm_90 (fc2 of
        # U-ViT-H/2 and DiT-XL/2, bf16) 128x256 with 8 warps spilled 56 B/thread and 128x128 with 4
        # warps 488-536 B at 255 registers; the configs whose x tile plus accumulator take at most 128
        # fp32 registers per thread did not spill
        k = lambda c: c.kwargs  # noqa: E731
        kept = [c for c in kept
                if k(c)["BLOCK_M"] * (k(c)["BLOCK_K"] + k(c)["BLOCK_N"]) <= 128 * 32 * c.num_warps]
    return kept or [min(configs, key=smem)]


@triton.jit
def _amax_epilogue(acc, m0, n0, offs_m, mask_m, BIAS, OUT, N, stride_b, stride_om, stride_on,
                   HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, USE_TMA: tl.constexpr, EPI_N: tl.constexpr):
    """The epilogue of a GEMM whose output is the next FP8 GEMM's input (``AMAX_OUT``: fc1 before
    fc2): bias, activation, the store in the output's dtype, and the absolute maximum of each row's
    stored values over this ``(BLOCK_M, EPI_N)`` part (returned, fp32)."""
    offs_n = n0.to(tl.int64) + tl.arange(0, EPI_N)
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n * stride_b, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    acc = _act(acc, ACTIVATION)
    if USE_TMA:
        y = acc.to(OUT.dtype)
        OUT.store([m0, n0], y)
    else:
        y = acc.to(OUT.dtype.element_ty)
        tl.store(OUT + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on, y, mask=mask)
    return tl.max(tl.where(mask, tl.abs(y.to(tl.float32)), 0.0), axis=1)


@triton.autotune(configs=_configs(), key=["M_BUCKET", "N", "K", "ACTIVATION", "HAS_GATE", "HAS_RES", "USE_TMA",
                                          "Y_ROUND", "EPI_QUARTERS", "A_QUANT", "AMAX_OUT"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
                    "AMAX_SLOTS": lambda args: args["BLOCK_N"] // MIN_BLOCK_N})
@triton.jit
def _fp8_linear_fwd_kernel(
    X, W, XS, WS, BIAS, RES, GATE, OUT, XA, AMAX,
    M, N, K, M_BUCKET, gate_rows, TA,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_xs, stride_ws, stride_b,
    stride_rm, stride_rn, stride_gg, stride_gn, stride_om, stride_on, stride_xa, stride_am,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr,
    USE_TMA: tl.constexpr, Y_ROUND: tl.constexpr, EPI_QUARTERS: tl.constexpr,
    A_QUANT: tl.constexpr, AMAX_OUT: tl.constexpr, BLOCK_TA: tl.constexpr, AMAX_SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """X, W (and OUT, RES) are TMA descriptors with ``USE_TMA``, else pointers (``stride_*``). The K
    loop accumulates e4m3 products in fp32; the row and column scales multiply the accumulator tile;
    the epilogue is :func:`kernels.fused_linear._epilogue` (``STORE_PRE`` off).

    ``A_QUANT`` (fc2 after fc1): X holds 16-bit activations, not e4m3; each row's scale comes from
    the ``TA`` partial maxima fc1 wrote in XA (``(M, TA)``), and every x tile is quantized in
    registers (:func:`kernels._fp8.quantize_tile`) before its dot: the bits the quantize kernel
    would have written, without its pass over x. ``AMAX_OUT`` (fc1 before fc2; no gate, residual or
    float32 output): the epilogue also writes the absolute maximum of each row's stored values over
    each ``MIN_BLOCK_N`` columns to AMAX (``(M, cdiv(N, MIN_BLOCK_N))``: ``AMAX_SLOTS`` slots per
    tile, the same value in each, so that the layout does not depend on the config)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_steps = tl.cdiv(K, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if A_QUANT:  # the rows' scales from fc1's partial maxima
            offs_ta = tl.arange(0, BLOCK_TA)
            part = tl.load(XA + offs_m[:, None] * stride_xa + offs_ta[None, :],
                           mask=mask_m[:, None] & (offs_ta[None, :] < TA), other=0.0)
            xs, x_inv = row_scale(tl.max(part, axis=1))
        else:
            xs = tl.load(XS + offs_m * stride_xs, mask=mask_m, other=0.0)
            x_inv = xs
        if USE_TMA:
            for ks in range(0, k_steps):
                a = X.load([pid_m * BLOCK_M, ks * BLOCK_K])
                if A_QUANT:
                    a = quantize_tile(a.to(tl.float32), x_inv)
                b = W.load([pid_n * BLOCK_N, ks * BLOCK_K])
                acc = tl.dot(a, b.T, acc)
        else:
            a_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
            b_ptrs = W + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # b[k, n] = w_q[n, k]
            for ks in range(0, k_steps):
                if EVEN_K:
                    a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
                    b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
                else:
                    mask_k = offs_k < K - ks * BLOCK_K
                    a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                    b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                if A_QUANT:
                    a = quantize_tile(a.to(tl.float32), x_inv)
                acc = tl.dot(a, b, acc)
                a_ptrs += BLOCK_K * stride_xk
                b_ptrs += BLOCK_K * stride_wk
        ws = tl.load(WS + offs_n * stride_ws, mask=mask_n, other=0.0)
        acc = acc * xs[:, None] * ws[None, :]

        # the epilogue in column halves (quarters for a float32 output), as the bf16 kernel's
        halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        acc0, acc1 = tl.split(halves)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        if AMAX_OUT:
            amax = tl.maximum(
                _amax_epilogue(acc0, m0, n0, offs_m, mask_m, BIAS, OUT, N, stride_b, stride_om, stride_on,
                               HAS_BIAS, ACTIVATION, USE_TMA, BLOCK_N // 2),
                _amax_epilogue(acc1, m0, n0 + BLOCK_N // 2, offs_m, mask_m, BIAS, OUT, N, stride_b, stride_om,
                               stride_on, HAS_BIAS, ACTIVATION, USE_TMA, BLOCK_N // 2))
            slots = pid_n * AMAX_SLOTS + tl.arange(0, AMAX_SLOTS)
            n_slots = tl.cdiv(N, BLOCK_N // AMAX_SLOTS)
            tl.store(AMAX + offs_m[:, None] * stride_am + slots[None, :],
                     tl.broadcast_to(amax[:, None], (BLOCK_M, AMAX_SLOTS)),
                     mask=mask_m[:, None] & (slots[None, :] < n_slots))
        elif EPI_QUARTERS:
            acc00, acc01 = tl.split(tl.permute(tl.reshape(acc0, (BLOCK_M, 2, BLOCK_N // 4)), (0, 2, 1)))
            acc10, acc11 = tl.split(tl.permute(tl.reshape(acc1, (BLOCK_M, 2, BLOCK_N // 4)), (0, 2, 1)))
            _epilogue(acc00, m0, n0, offs_m, mask_m, BIAS, RES, GATE, OUT, OUT, N, gate_rows, stride_b,
                      stride_rm, stride_rn, stride_gg, stride_gn, stride_om, stride_on, 0, 0,
                      HAS_BIAS, ACTIVATION, HAS_GATE, HAS_RES, False, USE_TMA, Y_ROUND, BLOCK_N // 4)
            _epilogue(acc01, m0, n0 + BLOCK_N // 4, offs_m, mask_m, BIAS, RES, GATE, OUT, OUT, N, gate_rows,
                      stride_b, stride_rm, stride_rn, stride_gg, stride_gn, stride_om, stride_on, 0, 0,
                      HAS_BIAS, ACTIVATION, HAS_GATE, HAS_RES, False, USE_TMA, Y_ROUND, BLOCK_N // 4)
            _epilogue(acc10, m0, n0 + BLOCK_N // 2, offs_m, mask_m, BIAS, RES, GATE, OUT, OUT, N, gate_rows,
                      stride_b, stride_rm, stride_rn, stride_gg, stride_gn, stride_om, stride_on, 0, 0,
                      HAS_BIAS, ACTIVATION, HAS_GATE, HAS_RES, False, USE_TMA, Y_ROUND, BLOCK_N // 4)
            _epilogue(acc11, m0, n0 + 3 * (BLOCK_N // 4), offs_m, mask_m, BIAS, RES, GATE, OUT, OUT, N, gate_rows,
                      stride_b, stride_rm, stride_rn, stride_gg, stride_gn, stride_om, stride_on, 0, 0,
                      HAS_BIAS, ACTIVATION, HAS_GATE, HAS_RES, False, USE_TMA, Y_ROUND, BLOCK_N // 4)
        else:
            _epilogue(acc0, m0, n0, offs_m, mask_m, BIAS, RES, GATE, OUT, OUT, N, gate_rows, stride_b,
                      stride_rm, stride_rn, stride_gg, stride_gn, stride_om, stride_on, 0, 0,
                      HAS_BIAS, ACTIVATION, HAS_GATE, HAS_RES, False, USE_TMA, Y_ROUND, BLOCK_N // 2)
            _epilogue(acc1, m0, n0 + BLOCK_N // 2, offs_m, mask_m, BIAS, RES, GATE, OUT, OUT, N, gate_rows,
                      stride_b, stride_rm, stride_rn, stride_gg, stride_gn, stride_om, stride_on, 0, 0,
                      HAS_BIAS, ACTIVATION, HAS_GATE, HAS_RES, False, USE_TMA, Y_ROUND, BLOCK_N // 2)


def use_tma(x_q, w_q, out, residual=None) -> bool:
    """TMA on sm_90 when every 2-D operand allows it (16-byte aligned rows: K a multiple of 16 for
    the e4m3 operands)."""
    cap = _capability(x_q)
    if cap is None or cap[0] != 9:
        return False
    return all(_tma_ok(t) for t in (x_q, w_q, out, residual) if t is not None)


def _check_scale(name: str, s, n: int, device) -> None:
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"{name} must be a tensor; got {type(s).__name__}")
    if s.dtype != torch.float32 or s.dim() != 1 or s.shape[0] != n:
        raise ValueError(f"{name} must be a float32 tensor of shape ({n},); got {s.dtype} {_shape_text(s)}")
    if s.device != device:
        raise ValueError(f"{name} is on {s.device}, expected {device}")


@on_inputs_device
def fp8_linear_forward(x_q, x_scale, w_q, w_scale, bias=None, *, activation=None, residual=None, gate=None,
                       gate_rows=1, out_dtype=torch.bfloat16, x_amax=None, amax_out=False, _use_tma=None):
    """``residual + gate[m // gate_rows] * act((x_q @ w_q.T) * x_scale[:, None] * w_scale + bias)``.

    ``x_q (M, K)`` and ``w_q (N, K)`` float8_e4m3fn (any strides; TMA needs unit column strides and
    16-byte aligned rows); ``x_scale (M,)``, ``w_scale (N,)`` float32; ``bias (N,)``, ``residual
    (M, N)`` and ``gate (G, N)`` (``G * gate_rows == M``) in float16 / bfloat16 / float32, read in
    their own dtypes. Returns ``out (M, N)`` contiguous in ``out_dtype`` (bfloat16, float16 or
    float32). When the epilogue has a gate or a residual and ``out_dtype`` is 16-bit,
    ``act(...)`` is rounded to ``out_dtype`` before them, as eager's ``residual + gate * y`` with a
    16-bit ``y``.

    The MLP's pair (fc1 then fc2) without a quantize pass between them:

    * ``amax_out=True`` (fc1: no gate or residual, a 16-bit ``out_dtype``) returns ``(out, amax)``,
      ``amax (M, cdiv(N, MIN_BLOCK_N))`` float32: the absolute maxima of ``out``'s stored values per
      ``MIN_BLOCK_N`` columns of each row;
    * ``x_amax=amax`` (fc2): ``x_q`` is that 16-bit ``out`` (``x_scale`` None), quantized in the
      kernel with each row's scale from the maxima, which gives the bits :func:`quantize_rows` would."""
    if x_amax is not None:
        _check_matrix("x", x_q)
        if x_scale is not None:
            raise ValueError("x_scale must be None with x_amax (the row scales come from x_amax)")
    for name, t in (("x_q", x_q), ("w_q", w_q)):
        if x_amax is not None and name == "x_q":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor; got {type(t).__name__}")
        if t.dtype != FP8_DTYPE:
            raise TypeError(f"{name} must be torch.float8_e4m3fn; got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D; got shape {_shape_text(t)}")
    M, K = x_q.shape
    dev = x_q.device
    if w_q.shape[1] != K:
        raise ValueError(f"w_q must have shape (N, {K}) for x_q {_shape_text(x_q)}; got {_shape_text(w_q)}")
    if w_q.device != dev:
        raise ValueError(f"w_q is on {w_q.device}, expected {dev}")
    _check_fp8_device("x_q", x_q)
    N = w_q.shape[0]
    if x_amax is not None:
        _check_matrix("x_amax", x_amax, rows=M, dtype=torch.float32, device=dev)
        if x_amax.stride(1) != 1:
            raise ValueError("x_amax must have unit column stride")
    else:
        _check_scale("x_scale", x_scale, M, dev)
    _check_scale("w_scale", w_scale, N, dev)
    code = _act_code(activation)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be torch.bfloat16, torch.float16 or torch.float32; got {out_dtype}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != N:
            raise ValueError(f"bias must be a tensor of shape ({N},); got {_shape_text(bias)}")
        _check_matrix("bias", bias.view(1, N), device=dev)
    if residual is not None:
        _check_matrix("residual", residual, rows=M, cols=N, device=dev)
    _check_gate(gate, gate_rows, M, N, None, dev)
    if amax_out and (residual is not None or gate is not None or out_dtype == torch.float32):
        raise ValueError("amax_out needs a 16-bit out_dtype and no residual or gate (fc1 before fc2)")
    out = empty(M, N, dtype=out_dtype, device=dev)
    amax = empty(M, triton.cdiv(N, MIN_BLOCK_N), dtype=torch.float32, device=dev) if amax_out else None
    if M == 0 or N == 0:
        return (out, amax) if amax_out else out
    y_round = _Y_ROUND.get(out_dtype, 0) if (gate is not None or residual is not None) else 0
    if K == 0:  # no reduction: act(bias) broadcast
        from .fused_linear import _act_torch
        z = torch.zeros(M, N, dtype=torch.float32, device=dev) + (0 if bias is None else bias.float())
        h = _act_torch(z, activation)
        h = h.to(out_dtype).float() if y_round else h
        h = h * (gate.float().repeat_interleave(gate_rows, 0) if gate is not None else 1)
        out.copy_(h + (residual.float() if residual is not None else 0))
        if amax_out:
            pad = amax.shape[1] * MIN_BLOCK_N - N
            a = torch.nn.functional.pad(out.float().abs(), (0, pad)).view(M, -1, MIN_BLOCK_N).amax(-1)
            amax.copy_(a)
        return (out, amax) if amax_out else out
    tma = use_tma(x_q, w_q, out, residual) if _use_tma is None else bool(_use_tma)
    if tma:
        x_arg, w_arg, out_arg = _descriptor(x_q), _descriptor(w_q), _descriptor(out)
        res_arg = _descriptor(residual) if residual is not None else out_arg
    else:
        x_arg, w_arg, out_arg = x_q, w_q, out
        res_arg = residual if residual is not None else out
    sms = _sm_count(dev)

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        per_sm = 1 if meta["BLOCK_M"] * meta["BLOCK_N"] >= 128 * 128 else 2
        return (min(tiles, sms * per_sm),)

    ta = x_amax.shape[1] if x_amax is not None else 1
    launch(_fp8_linear_fwd_kernel, grid,
           x_arg, w_arg, x_scale if x_scale is not None else w_scale, w_scale,
           bias if bias is not None else out, res_arg, gate if gate is not None else out, out_arg,
           x_amax if x_amax is not None else w_scale, amax if amax is not None else w_scale,
           M, N, K, m_bucket(M), int(gate_rows), ta,
           x_q.stride(0), x_q.stride(1), w_q.stride(0), w_q.stride(1),
           x_scale.stride(0) if x_scale is not None else 0, w_scale.stride(0),
           bias.stride(0) if bias is not None else 0,
           residual.stride(0) if residual is not None else 0, residual.stride(1) if residual is not None else 0,
           gate.stride(0) if gate is not None else 0, gate.stride(1) if gate is not None else 0,
           out.stride(0), out.stride(1),
           x_amax.stride(0) if x_amax is not None else 0, amax.stride(0) if amax is not None else 0,
           HAS_BIAS=bias is not None, ACTIVATION=code, HAS_GATE=gate is not None, HAS_RES=residual is not None,
           USE_TMA=tma, Y_ROUND=y_round, EPI_QUARTERS=out.element_size() >= 4,
           A_QUANT=x_amax is not None, AMAX_OUT=bool(amax_out),
           BLOCK_TA=triton.next_power_of_2(ta))
    return (out, amax) if amax_out else out
