"""Flash attention (FA2-style online softmax) for ``(B, L, H, D)`` tensors, forward and backward.

Kernels first, then the launchers :func:`attention_forward` and :func:`attention_backward`.

Head dims are split into a power-of-two main part ``D0`` plus a remainder, so 72 runs as 64 + 8
instead of being padded to 128 (see ``head_dim_split``). The remainder enters two kinds of dot:

* as the *reduction* dim (``q k^T``, ``dO v^T``): tensor cores need K >= 16 for 16-bit inputs, so
  the remainder is loaded ``DRK = max(16, next_pow2(rem))`` wide with zero padding;
* as an *output* dim (``p v``, ``p^T dO``, ``ds q``, ``ds k``): N = 8 is a native MMA shape, so the
  remainder is loaded only ``DRN = next_pow2(rem)`` wide.

For head_dim 72 the work is 64 + 16 on the reduction dots and exactly 72 on the output dots.
Causal masking is top-left aligned (query ``i`` sees keys ``0..i``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._utils import empty

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def head_dim_split(head_dim: int):
    """``(D0, REM, DRK, DRN)``: main power-of-two part ``D0`` (at least 16), remainder ``REM``,
    and the padded remainder widths for reduction dots (``DRK``) and output dots (``DRN``).

    ``REM == 0`` means no remainder part. The work per output dot is ``D0 + DRN``; it equals
    ``head_dim`` unless ``head_dim < 16`` or ``REM`` is not a power of two.
    """
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}]; got {head_dim}")
    d0 = max(16, 1 << (head_dim.bit_length() - 1))
    rem = max(0, head_dim - d0)
    if rem == 0:
        return d0, 0, 16, 16  # DRK/DRN unused (HAS_REM is False); any valid width
    drn = triton.next_power_of_2(rem)
    drk = max(16, drn)
    return d0, rem, drk, drn


def padded_work(head_dim: int):
    """``(reduction_width, output_width)`` actually computed for ``head_dim`` (for the docs/tests)."""
    d0, rem, drk, drn = head_dim_split(head_dim)
    return (d0 + drk, d0 + drn) if rem else (d0, d0)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(base, offs_r, offs_c, stride_r, stride_c, n_rows, N_COLS: tl.constexpr,
               MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    """Load ``[len(offs_r), len(offs_c)]`` at ``base``; rows ``>= n_rows`` and columns
    ``>= N_COLS`` read as zero when the matching MASK flag is set."""
    ptrs = base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    if MASK_R:
        if MASK_C:
            x = tl.load(ptrs, mask=(offs_r[:, None] < n_rows) & (offs_c[None, :] < N_COLS), other=0.0)
        else:
            x = tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
    else:
        if MASK_C:
            x = tl.load(ptrs, mask=offs_c[None, :] < N_COLS, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store_tile(base, x, offs_r, offs_c, stride_r, stride_c, n_rows, N_COLS: tl.constexpr, MASK_C: tl.constexpr):
    ptrs = base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    if MASK_C:
        tl.store(ptrs, x, mask=(offs_r[:, None] < n_rows) & (offs_c[None, :] < N_COLS))
    else:
        tl.store(ptrs, x, mask=offs_r[:, None] < n_rows)


@triton.jit
def _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, K_bh, V_bh,
               stride_kn, stride_kd, stride_vn, stride_vd,
               offs_m, lo, hi, Lk, qk_scale,
               HEAD_DIM: tl.constexpr, D0: tl.constexpr, REM: tl.constexpr, DRK: tl.constexpr,
               DRN: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax update over key blocks ``[lo, hi)``; boundary/causal masks only if MASKED."""
    offs_j = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    offs_rk = tl.arange(0, DRK)
    offs_rn = tl.arange(0, DRN)
    for start_n in range(lo, hi, BLOCK_N):
        start_n64 = tl.cast(start_n, tl.int64)
        kb = K_bh + start_n64 * stride_kn
        vb = V_bh + start_n64 * stride_vn
        n_left = Lk - start_n
        k0 = _load_tile(kb, offs_j, offs_d0, stride_kn, stride_kd, n_left, HEAD_DIM, MASKED, D0 > HEAD_DIM)
        qk = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        if REM > 0:
            k1 = _load_tile(kb + D0 * stride_kd, offs_j, offs_rk, stride_kn, stride_kd, n_left, REM, MASKED, DRK > REM)
            qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PREC)
        qk = qk * qk_scale
        if MASKED:
            offs_n = start_n + offs_j
            valid = offs_n[None, :] < Lk
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = _load_tile(vb, offs_j, offs_d0, stride_vn, stride_vd, n_left, HEAD_DIM, MASKED, D0 > HEAD_DIM)
        acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=DOT_PREC)
        if REM > 0:
            v1 = _load_tile(vb + D0 * stride_vd, offs_j, offs_rn, stride_vn, stride_vd, n_left, REM, MASKED, DRN > REM)
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc0, acc1, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, STATS,
              stride_qb, stride_qm, stride_qh, stride_qd,
              stride_kb, stride_kn, stride_kh, stride_kd,
              stride_vb, stride_vn, stride_vh, stride_vd,
              stride_ob, stride_om, stride_oh, stride_od,
              H, Lq, Lk, qk_scale,
              HEAD_DIM: tl.constexpr, D0: tl.constexpr, REM: tl.constexpr, DRK: tl.constexpr,
              DRN: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # 1-D grid: query blocks of one (batch, head) are adjacent (K/V reuse in L2), no 65535 limit.
    pid = tl.program_id(0)
    n_mb = tl.cdiv(Lq, BLOCK_M)
    pid_m = pid % n_mb
    pid_bh = pid // n_mb
    if CAUSAL:
        pid_m = n_mb - 1 - pid_m  # heaviest (last) query blocks first
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M

    Q_blk = Q + off_b * stride_qb + off_h * stride_qh + start_m.to(tl.int64) * stride_qm
    K_bh = K + off_b * stride_kb + off_h * stride_kh
    V_bh = V + off_b * stride_vb + off_h * stride_vh
    O_blk = O + off_b * stride_ob + off_h * stride_oh + start_m.to(tl.int64) * stride_om

    offs_r = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_r
    offs_d0 = tl.arange(0, D0)
    offs_rk = tl.arange(0, DRK)
    offs_rn = tl.arange(0, DRN)
    m_left = Lq - start_m

    q0 = _load_tile(Q_blk, offs_r, offs_d0, stride_qm, stride_qd, m_left, HEAD_DIM, True, D0 > HEAD_DIM)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if REM > 0:
        q1 = _load_tile(Q_blk + D0 * stride_qd, offs_r, offs_rk, stride_qm, stride_qd, m_left, REM, True, DRK > REM)
        acc1 = tl.zeros([BLOCK_M, DRN], dtype=tl.float32)
    else:
        q1 = q0
        acc1 = acc0
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Key blocks [0, u_hi) need no mask; [u_hi, hi) get the Lk-boundary (and causal) mask.
    lk_full = (Lk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(Lk, start_m + BLOCK_M)
        u_hi = tl.minimum(lk_full, ((start_m + 1) // BLOCK_N) * BLOCK_N)
    else:
        hi = Lk
        u_hi = lk_full
    acc0, acc1, l_i, m_i = _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, K_bh, V_bh,
                                      stride_kn, stride_kd, stride_vn, stride_vd,
                                      offs_m, 0, u_hi, Lk, qk_scale,
                                      HEAD_DIM, D0, REM, DRK, DRN, False, CAUSAL, DOT_PREC, BLOCK_N)
    acc0, acc1, l_i, m_i = _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, K_bh, V_bh,
                                      stride_kn, stride_kd, stride_vn, stride_vd,
                                      offs_m, u_hi, hi, Lk, qk_scale,
                                      HEAD_DIM, D0, REM, DRK, DRN, True, CAUSAL, DOT_PREC, BLOCK_N)

    l_rcp = 1.0 / l_i
    _store_tile(O_blk, (acc0 * l_rcp[:, None]).to(O.dtype.element_ty), offs_r, offs_d0, stride_om, stride_od,
                m_left, HEAD_DIM, D0 > HEAD_DIM)
    if REM > 0:
        _store_tile(O_blk + D0 * stride_od, (acc1 * l_rcp[:, None]).to(O.dtype.element_ty), offs_r, offs_rn,
                    stride_om, stride_od, m_left, REM, DRN > REM)
    # The log-sum-exp, in split form: STATS[b, h, 0] = row max, STATS[b, h, 1] = log2(row sum),
    # both fp32 in base 2 of logits * scale * log2(e). The backward recomputes p = exp2((s - max) -
    # log2 sum); one number max + log2 sum (~1000 at scale 30) would lose ~1e-4 to rounding.
    row_ok = offs_m < Lq
    STATS_bh = STATS + pid_bh.to(tl.int64) * 2 * Lq
    tl.store(STATS_bh + offs_m, m_i, mask=row_ok)
    tl.store(STATS_bh + Lq + offs_m, tl.log2(l_i), mask=row_ok)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA,
                    stride_ob, stride_om, stride_oh, stride_od,
                    stride_db, stride_dm, stride_dh, stride_dd,
                    H, Lq,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[b, h, m] = sum_d dO[b, m, h, d] * O[b, m, h, d] (fp32)."""
    pid = tl.program_id(0)
    n_mb = tl.cdiv(Lq, BLOCK_M)
    pid_m = pid % n_mb
    pid_bh = pid // n_mb
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_left = Lq - start_m
    o = _load_tile(O + off_b * stride_ob + off_h * stride_oh + start_m.to(tl.int64) * stride_om,
                   offs_r, offs_d, stride_om, stride_od, m_left, HEAD_DIM, True, BLOCK_D > HEAD_DIM)
    do = _load_tile(DO + off_b * stride_db + off_h * stride_dh + start_m.to(tl.int64) * stride_dm,
                    offs_r, offs_d, stride_dm, stride_dd, m_left, HEAD_DIM, True, BLOCK_D > HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    offs_m = start_m + offs_r
    tl.store(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _bwd_dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q_bh, DO_bh, STATS_bh, DELTA_bh,
                    stride_qm, stride_qd, stride_dm, stride_dd,
                    offs_n, lo, hi, Lq, qk_scale,
                    HEAD_DIM: tl.constexpr, D0: tl.constexpr, REM: tl.constexpr, DRK: tl.constexpr,
                    DRN: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks ``[lo, hi)`` (works on transposed
    scores ``s^T = k q^T`` so no register transpose of P is needed)."""
    offs_i = tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, D0)
    offs_rk = tl.arange(0, DRK)
    offs_rn = tl.arange(0, DRN)
    for start_m in range(lo, hi, BLOCK_M):
        start_m64 = tl.cast(start_m, tl.int64)
        qb = Q_bh + start_m64 * stride_qm
        dob = DO_bh + start_m64 * stride_dm
        m_left = Lq - start_m
        offs_m = start_m + offs_i
        q0 = _load_tile(qb, offs_i, offs_d0, stride_qm, stride_qd, m_left, HEAD_DIM, MASKED, D0 > HEAD_DIM)
        sT = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)
        if REM > 0:
            q1 = _load_tile(qb + D0 * stride_qd, offs_i, offs_rk, stride_qm, stride_qd, m_left, REM, MASKED, DRK > REM)
            sT = tl.dot(k1, tl.trans(q1), sT, input_precision=DOT_PREC)
        if MASKED:
            row_ok = offs_m < Lq
            m_row = tl.load(STATS_bh + offs_m, mask=row_ok, other=0.0)
            log2_l = tl.load(STATS_bh + Lq + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA_bh + offs_m, mask=row_ok, other=0.0)
        else:
            m_row = tl.load(STATS_bh + offs_m)
            log2_l = tl.load(STATS_bh + Lq + offs_m)
            delta = tl.load(DELTA_bh + offs_m)
        xT = sT * qk_scale - m_row[None, :]
        if MASKED:
            valid = offs_m[None, :] < Lq
            if CAUSAL:
                valid = valid & (offs_m[None, :] >= offs_n[:, None])
            xT = tl.where(valid, xT, float("-inf"))
        pT = tl.exp2(xT - log2_l[None, :])
        do0 = _load_tile(dob, offs_i, offs_d0, stride_dm, stride_dd, m_left, HEAD_DIM, MASKED, D0 > HEAD_DIM)
        dv0 = tl.dot(pT.to(do0.dtype), do0, dv0, input_precision=DOT_PREC)
        dpT = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)
        if REM > 0:
            do1 = _load_tile(dob + D0 * stride_dd, offs_i, offs_rk, stride_dm, stride_dd, m_left, REM, MASKED, DRK > REM)
            dpT = tl.dot(v1, tl.trans(do1), dpT, input_precision=DOT_PREC)
            if DRN != DRK:  # narrow copies for the output-dim dots
                do1n = _load_tile(dob + D0 * stride_dd, offs_i, offs_rn, stride_dm, stride_dd, m_left, REM, MASKED, DRN > REM)
                q1n = _load_tile(qb + D0 * stride_qd, offs_i, offs_rn, stride_qm, stride_qd, m_left, REM, MASKED, DRN > REM)
            else:
                do1n = do1
                q1n = q1
            dv1 = tl.dot(pT.to(do1n.dtype), do1n, dv1, input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk0 = tl.dot(dsT.to(q0.dtype), q0, dk0, input_precision=DOT_PREC)
        if REM > 0:
            dk1 = tl.dot(dsT.to(q1n.dtype), q1n, dk1, input_precision=DOT_PREC)
    return dk0, dk1, dv0, dv1


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, STATS, DELTA, DK, DV,
                   stride_qb, stride_qm, stride_qh, stride_qd,
                   stride_kb, stride_kn, stride_kh, stride_kd,
                   stride_vb, stride_vn, stride_vh, stride_vd,
                   stride_db, stride_dm, stride_dh, stride_dd,
                   stride_dkb, stride_dkn, stride_dkh, stride_dkd,
                   stride_dvb, stride_dvn, stride_dvh, stride_dvd,
                   H, Lq, Lk, scale, qk_scale,
                   HEAD_DIM: tl.constexpr, D0: tl.constexpr, REM: tl.constexpr, DRK: tl.constexpr,
                   DRN: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    n_nb = tl.cdiv(Lk, BLOCK_N)
    pid_n = pid % n_nb
    pid_bh = pid // n_nb
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    start_n = pid_n * BLOCK_N
    start_n64 = tl.cast(start_n, tl.int64)

    Q_bh = Q + off_b * stride_qb + off_h * stride_qh
    DO_bh = DO + off_b * stride_db + off_h * stride_dh
    STATS_bh = STATS + pid_bh.to(tl.int64) * 2 * Lq
    DELTA_bh = DELTA + pid_bh.to(tl.int64) * Lq
    K_blk = K + off_b * stride_kb + off_h * stride_kh + start_n64 * stride_kn
    V_blk = V + off_b * stride_vb + off_h * stride_vh + start_n64 * stride_vn

    offs_j = tl.arange(0, BLOCK_N)
    offs_n = start_n + offs_j
    offs_d0 = tl.arange(0, D0)
    offs_rk = tl.arange(0, DRK)
    offs_rn = tl.arange(0, DRN)
    n_left = Lk - start_n

    k0 = _load_tile(K_blk, offs_j, offs_d0, stride_kn, stride_kd, n_left, HEAD_DIM, True, D0 > HEAD_DIM)
    v0 = _load_tile(V_blk, offs_j, offs_d0, stride_vn, stride_vd, n_left, HEAD_DIM, True, D0 > HEAD_DIM)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    if REM > 0:
        k1 = _load_tile(K_blk + D0 * stride_kd, offs_j, offs_rk, stride_kn, stride_kd, n_left, REM, True, DRK > REM)
        v1 = _load_tile(V_blk + D0 * stride_vd, offs_j, offs_rk, stride_vn, stride_vd, n_left, REM, True, DRK > REM)
        dk1 = tl.zeros([BLOCK_N, DRN], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, DRN], dtype=tl.float32)
    else:
        k1 = k0
        v1 = v0
        dk1 = dk0
        dv1 = dv0

    # Query blocks: [lo, mid) straddle the causal diagonal (masked), [mid, lq_full) need no mask,
    # [max(mid, lq_full), lq_ceil) hold the Lq tail (masked).
    lq_full = (Lq // BLOCK_M) * BLOCK_M
    lq_ceil = tl.cdiv(Lq, BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    else:
        lo = 0
        mid = 0
    dk0, dk1, dv0, dv1 = _bwd_dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q_bh, DO_bh, STATS_bh, DELTA_bh,
                                         stride_qm, stride_qd, stride_dm, stride_dd,
                                         offs_n, lo, tl.minimum(mid, lq_ceil), Lq, qk_scale,
                                         HEAD_DIM, D0, REM, DRK, DRN, True, CAUSAL, DOT_PREC, BLOCK_M)
    dk0, dk1, dv0, dv1 = _bwd_dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q_bh, DO_bh, STATS_bh, DELTA_bh,
                                         stride_qm, stride_qd, stride_dm, stride_dd,
                                         offs_n, mid, lq_full, Lq, qk_scale,
                                         HEAD_DIM, D0, REM, DRK, DRN, False, CAUSAL, DOT_PREC, BLOCK_M)
    dk0, dk1, dv0, dv1 = _bwd_dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q_bh, DO_bh, STATS_bh, DELTA_bh,
                                         stride_qm, stride_qd, stride_dm, stride_dd,
                                         offs_n, tl.maximum(mid, lq_full), lq_ceil, Lq, qk_scale,
                                         HEAD_DIM, D0, REM, DRK, DRN, True, CAUSAL, DOT_PREC, BLOCK_M)

    DK_blk = DK + off_b * stride_dkb + off_h * stride_dkh + start_n64 * stride_dkn
    DV_blk = DV + off_b * stride_dvb + off_h * stride_dvh + start_n64 * stride_dvn
    _store_tile(DK_blk, (dk0 * scale).to(DK.dtype.element_ty), offs_j, offs_d0, stride_dkn, stride_dkd,
                n_left, HEAD_DIM, D0 > HEAD_DIM)
    _store_tile(DV_blk, dv0.to(DV.dtype.element_ty), offs_j, offs_d0, stride_dvn, stride_dvd,
                n_left, HEAD_DIM, D0 > HEAD_DIM)
    if REM > 0:
        _store_tile(DK_blk + D0 * stride_dkd, (dk1 * scale).to(DK.dtype.element_ty), offs_j, offs_rn,
                    stride_dkn, stride_dkd, n_left, REM, DRN > REM)
        _store_tile(DV_blk + D0 * stride_dvd, dv1.to(DV.dtype.element_ty), offs_j, offs_rn,
                    stride_dvn, stride_dvd, n_left, REM, DRN > REM)


@triton.jit
def _bwd_dq_inner(dq0, dq1, q0, q1, do0, do1, m_row, log2_l, delta, K_bh, V_bh,
                  stride_kn, stride_kd, stride_vn, stride_vd,
                  offs_m, lo, hi, Lk, qk_scale,
                  HEAD_DIM: tl.constexpr, D0: tl.constexpr, REM: tl.constexpr, DRK: tl.constexpr,
                  DRN: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_j = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    offs_rk = tl.arange(0, DRK)
    offs_rn = tl.arange(0, DRN)
    for start_n in range(lo, hi, BLOCK_N):
        start_n64 = tl.cast(start_n, tl.int64)
        kb = K_bh + start_n64 * stride_kn
        vb = V_bh + start_n64 * stride_vn
        n_left = Lk - start_n
        k0 = _load_tile(kb, offs_j, offs_d0, stride_kn, stride_kd, n_left, HEAD_DIM, MASKED, D0 > HEAD_DIM)
        v0 = _load_tile(vb, offs_j, offs_d0, stride_vn, stride_vd, n_left, HEAD_DIM, MASKED, D0 > HEAD_DIM)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
        if REM > 0:
            k1 = _load_tile(kb + D0 * stride_kd, offs_j, offs_rk, stride_kn, stride_kd, n_left, REM, MASKED, DRK > REM)
            v1 = _load_tile(vb + D0 * stride_vd, offs_j, offs_rk, stride_vn, stride_vd, n_left, REM, MASKED, DRK > REM)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=DOT_PREC)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=DOT_PREC)
        x = s * qk_scale - m_row[:, None]
        if MASKED:
            offs_n = start_n + offs_j
            valid = offs_n[None, :] < Lk
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            x = tl.where(valid, x, float("-inf"))
        p = tl.exp2(x - log2_l[:, None])
        ds = p * (dp - delta[:, None])
        dq0 = tl.dot(ds.to(k0.dtype), k0, dq0, input_precision=DOT_PREC)
        if REM > 0:
            if DRN != DRK:
                k1n = _load_tile(kb + D0 * stride_kd, offs_j, offs_rn, stride_kn, stride_kd, n_left, REM, MASKED, DRN > REM)
            else:
                k1n = k1
            dq1 = tl.dot(ds.to(k1n.dtype), k1n, dq1, input_precision=DOT_PREC)
    return dq0, dq1


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, STATS, DELTA, DQ,
                 stride_qb, stride_qm, stride_qh, stride_qd,
                 stride_kb, stride_kn, stride_kh, stride_kd,
                 stride_vb, stride_vn, stride_vh, stride_vd,
                 stride_db, stride_dm, stride_dh, stride_dd,
                 stride_dqb, stride_dqm, stride_dqh, stride_dqd,
                 H, Lq, Lk, scale, qk_scale,
                 HEAD_DIM: tl.constexpr, D0: tl.constexpr, REM: tl.constexpr, DRK: tl.constexpr,
                 DRN: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    n_mb = tl.cdiv(Lq, BLOCK_M)
    pid_m = pid % n_mb
    pid_bh = pid // n_mb
    if CAUSAL:
        pid_m = n_mb - 1 - pid_m
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M
    start_m64 = tl.cast(start_m, tl.int64)

    Q_blk = Q + off_b * stride_qb + off_h * stride_qh + start_m64 * stride_qm
    DO_blk = DO + off_b * stride_db + off_h * stride_dh + start_m64 * stride_dm
    K_bh = K + off_b * stride_kb + off_h * stride_kh
    V_bh = V + off_b * stride_vb + off_h * stride_vh

    offs_r = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_r
    offs_d0 = tl.arange(0, D0)
    offs_rk = tl.arange(0, DRK)
    offs_rn = tl.arange(0, DRN)
    m_left = Lq - start_m

    q0 = _load_tile(Q_blk, offs_r, offs_d0, stride_qm, stride_qd, m_left, HEAD_DIM, True, D0 > HEAD_DIM)
    do0 = _load_tile(DO_blk, offs_r, offs_d0, stride_dm, stride_dd, m_left, HEAD_DIM, True, D0 > HEAD_DIM)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if REM > 0:
        q1 = _load_tile(Q_blk + D0 * stride_qd, offs_r, offs_rk, stride_qm, stride_qd, m_left, REM, True, DRK > REM)
        do1 = _load_tile(DO_blk + D0 * stride_dd, offs_r, offs_rk, stride_dm, stride_dd, m_left, REM, True, DRK > REM)
        dq1 = tl.zeros([BLOCK_M, DRN], dtype=tl.float32)
    else:
        q1 = q0
        do1 = do0
        dq1 = dq0
    row_ok = offs_m < Lq
    STATS_bh = STATS + pid_bh.to(tl.int64) * 2 * Lq
    m_row = tl.load(STATS_bh + offs_m, mask=row_ok, other=0.0)
    log2_l = tl.load(STATS_bh + Lq + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, mask=row_ok, other=0.0)

    lk_full = (Lk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(Lk, start_m + BLOCK_M)
        u_hi = tl.minimum(lk_full, ((start_m + 1) // BLOCK_N) * BLOCK_N)
    else:
        hi = Lk
        u_hi = lk_full
    dq0, dq1 = _bwd_dq_inner(dq0, dq1, q0, q1, do0, do1, m_row, log2_l, delta, K_bh, V_bh,
                             stride_kn, stride_kd, stride_vn, stride_vd,
                             offs_m, 0, u_hi, Lk, qk_scale,
                             HEAD_DIM, D0, REM, DRK, DRN, False, CAUSAL, DOT_PREC, BLOCK_N)
    dq0, dq1 = _bwd_dq_inner(dq0, dq1, q0, q1, do0, do1, m_row, log2_l, delta, K_bh, V_bh,
                             stride_kn, stride_kd, stride_vn, stride_vd,
                             offs_m, u_hi, hi, Lk, qk_scale,
                             HEAD_DIM, D0, REM, DRK, DRN, True, CAUSAL, DOT_PREC, BLOCK_N)

    DQ_blk = DQ + off_b * stride_dqb + off_h * stride_dqh + start_m64 * stride_dqm
    _store_tile(DQ_blk, (dq0 * scale).to(DQ.dtype.element_ty), offs_r, offs_d0, stride_dqm, stride_dqd,
                m_left, HEAD_DIM, D0 > HEAD_DIM)
    if REM > 0:
        _store_tile(DQ_blk + D0 * stride_dqd, (dq1 * scale).to(DQ.dtype.element_ty), offs_r, offs_rn,
                    stride_dqm, stride_dqd, m_left, REM, DRN > REM)


# --------------------------------------------------------------------------------------------
# Launch configuration: autotuned on GPU over a small list; a single pinned config under the
# interpreter (autotune would run every config there).
# --------------------------------------------------------------------------------------------

_KEY = ["Lq", "Lk", "HEAD_DIM", "CAUSAL", "DOT_PREC"]
_INTERPRET_FWD = {"BLOCK_M": 64, "BLOCK_N": 32}
_INTERPRET_DKDV = {"BLOCK_M": 32, "BLOCK_N": 64}
_INTERPRET_DQ = {"BLOCK_M": 64, "BLOCK_N": 32}


def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


def _fwd_configs():
    if _INTERPRET:
        return [triton.Config(dict(_INTERPRET_FWD), num_warps=4, num_stages=1)]
    return [_cfg(bm, bn, w, s) for bm, bn, w, s in (
        (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (128, 128, 8, 2),
        (64, 64, 4, 3), (64, 32, 4, 4), (64, 64, 4, 4), (64, 128, 4, 2),
    )]


def _dkdv_configs():
    if _INTERPRET:
        return [triton.Config(dict(_INTERPRET_DKDV), num_warps=4, num_stages=1)]
    return [_cfg(bm, bn, w, s) for bm, bn, w, s in (
        (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3), (16, 128, 8, 3), (64, 128, 4, 2),
    )]


def _dq_configs():
    if _INTERPRET:
        return [triton.Config(dict(_INTERPRET_DQ), num_warps=4, num_stages=1)]
    return [_cfg(bm, bn, w, s) for bm, bn, w, s in (
        (128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 32, 4, 3),
    )]


def _prune(configs, named_args, **kwargs):
    """Drop tiles larger than the sequence (short L) and, above head_dim 128, the biggest tiles
    (registers / shared memory). Always keeps at least one config."""
    head_dim = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 64))
    cap_m = max(16, triton.next_power_of_2(int(named_args.get("Lq", 1 << 20))))
    cap_n = max(16, triton.next_power_of_2(int(named_args.get("Lk", 1 << 20))))
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if bm > cap_m or bn > cap_n:
            continue
        if head_dim > 128 and bm * bn > 64 * 64:
            continue
        kept.append(c)
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


_attn_fwd_tuned = triton.autotune(_fwd_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune})(_attn_fwd)
_attn_bwd_dkdv_tuned = triton.autotune(_dkdv_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune})(
    _attn_bwd_dkdv)
_attn_bwd_dq_tuned = triton.autotune(_dq_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune})(
    _attn_bwd_dq)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _dot_precision(dtype: torch.dtype, input_precision):
    if dtype != torch.float32:
        return None  # 16-bit tensor-core dot; the flag only matters for fp32 operands
    return "ieee" if input_precision is None else input_precision


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"attention kernel supports {SUPPORTED_DTYPES}; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention kernel wants (B, L, H, D) tensors; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Lq, H, D = q.shape
    if k.shape[0] != B or k.shape[2] != H or k.shape[3] != D or v.shape != k.shape:
        raise ValueError(f"attention kernel: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    if D > MAX_HEAD_DIM or Lq == 0 or k.shape[1] == 0:
        raise ValueError(f"attention kernel: unsupported shape q {tuple(q.shape)}, k {tuple(k.shape)}")


def _blocks(kernel, tuned, default, block_m, block_n):
    """(kernel to launch, extra launch kwargs): explicit block sizes bypass the autotuner."""
    if block_m is None and block_n is None:
        return tuned, {}
    bm = default["BLOCK_M"] if block_m is None else block_m
    bn = default["BLOCK_N"] if block_n is None else block_n
    return kernel, {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": 4, "num_stages": 1 if _INTERPRET else 2}


def logsumexp(stats: torch.Tensor) -> torch.Tensor:
    """Natural-log LSE ``(B, H, Lq)`` of the scaled logits from the forward's ``(B, H, 2, Lq)`` stats."""
    return (stats[:, :, 0] + stats[:, :, 1]) * LN2


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                      scale=None, input_precision=None, block_m=None, block_n=None):
    """Flash-attention forward on ``(B, L, H, D)`` tensors of any strides.

    Returns ``(out, stats)``: ``out`` ``(B, Lq, H, D)`` contiguous in q's dtype; ``stats``
    ``(B, H, 2, Lq)`` float32, the log-sum-exp of each row in split form (see :func:`logsumexp`).
    ``input_precision`` applies to fp32 inputs only (default ``"ieee"``, exact fp32).
    """
    _check(q, k, v)
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    scale = D ** -0.5 if scale is None else float(scale)
    d0, rem, drk, drn = head_dim_split(D)
    out = empty(B, Lq, H, D, dtype=q.dtype, device=q.device)
    stats = empty(B, H, 2, Lq, dtype=torch.float32, device=q.device)
    kernel, extra = _blocks(_attn_fwd, _attn_fwd_tuned, _INTERPRET_FWD, block_m, block_n)
    grid = lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]) * B * H,)  # noqa: E731
    kernel[grid](
        q, k, v, out, stats,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, Lq, Lk, scale * LOG2E,
        HEAD_DIM=D, D0=d0, REM=rem, DRK=drk, DRN=drn, CAUSAL=bool(causal),
        DOT_PREC=_dot_precision(q.dtype, input_precision), **extra,
    )
    return out, stats


def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, stats: torch.Tensor, *, causal: bool = False, scale=None,
                       dq=None, dk=None, dv=None, input_precision=None, block_m=None, block_n=None):
    """Flash-attention backward: ``(dq, dk, dv)`` shaped like q, k, v.

    ``dq``/``dk``/``dv`` may be given as preallocated (strided) outputs, e.g. views of one packed
    ``(B, L, 3, H, D)`` gradient; otherwise they are allocated contiguous. ``block_m``/``block_n``
    (tests only) pin the tiles of both backward kernels instead of autotuning.
    """
    _check(q, k, v)
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    scale = D ** -0.5 if scale is None else float(scale)
    d0, rem, drk, drn = head_dim_split(D)
    dev = q.device
    if tuple(dout.shape) != tuple(q.shape) or tuple(out.shape) != tuple(q.shape) or tuple(stats.shape) != (B, H, 2, Lq):
        raise ValueError(f"attention backward: dout {tuple(dout.shape)}, out {tuple(out.shape)}, stats {tuple(stats.shape)} "
                         f"do not match q {tuple(q.shape)}")
    stats = stats.contiguous()
    dq = empty(B, Lq, H, D, dtype=q.dtype, device=dev) if dq is None else dq
    dk = empty(B, Lk, H, D, dtype=k.dtype, device=dev) if dk is None else dk
    dv = empty(B, Lk, H, D, dtype=v.dtype, device=dev) if dv is None else dv
    for name, g, t in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if g.shape != t.shape or g.dtype != t.dtype:
            raise ValueError(f"attention backward: {name} {tuple(g.shape)} {g.dtype} must match {tuple(t.shape)} {t.dtype}")

    delta = empty(B, H, Lq, dtype=torch.float32, device=dev)
    block_d = triton.next_power_of_2(D)
    bm_delta = 16 if _INTERPRET else max(16, min(128, 8192 // block_d))
    _attn_bwd_delta[(triton.cdiv(Lq, bm_delta) * B * H,)](
        out, dout, delta, *out.stride(), *dout.stride(), H, Lq,
        HEAD_DIM=D, BLOCK_M=bm_delta, BLOCK_D=block_d, num_warps=4,
    )

    prec = _dot_precision(q.dtype, input_precision)
    common = dict(HEAD_DIM=D, D0=d0, REM=rem, DRK=drk, DRN=drn, CAUSAL=bool(causal), DOT_PREC=prec)
    kernel, extra = _blocks(_attn_bwd_dkdv, _attn_bwd_dkdv_tuned, _INTERPRET_DKDV, block_m, block_n)
    kernel[lambda meta: (triton.cdiv(Lk, meta["BLOCK_N"]) * B * H,)](
        q, k, v, dout, stats, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
        H, Lq, Lk, scale, scale * LOG2E, **common, **extra,
    )
    kernel, extra = _blocks(_attn_bwd_dq, _attn_bwd_dq_tuned, _INTERPRET_DQ, block_m, block_n)
    kernel[lambda meta: (triton.cdiv(Lq, meta["BLOCK_M"]) * B * H,)](
        q, k, v, dout, stats, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
        H, Lq, Lk, scale, scale * LOG2E, **common, **extra,
    )
    return dq, dk, dv


def attention_qkvpacked_backward(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, stats: torch.Tensor, *,
                                 causal: bool = False, scale=None, input_precision=None):
    """Backward of attention on a packed ``(B, L, 3, H, D)`` qkv: one packed gradient, written in place
    by the kernels through strided views (no per-slice zero-fill and sum)."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"attention backward: qkv must be (B, L, 3, H, D); got {tuple(qkv.shape)}")
    dqkv = empty(*qkv.shape, dtype=qkv.dtype, device=qkv.device)
    q, k, v = qkv.unbind(2)
    dq, dk, dv = dqkv.unbind(2)
    attention_backward(dout, q, k, v, out, stats, causal=causal, scale=scale, dq=dq, dk=dk, dv=dv,
                       input_precision=input_precision)
    return dqkv


__all__ = ["attention_forward", "attention_backward", "attention_qkvpacked_backward", "logsumexp",
           "head_dim_split", "padded_work", "MAX_HEAD_DIM", "SUPPORTED_DTYPES"]
