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

from ._utils import empty, launch, on_inputs_device

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


# Alignment hints (``ALIGNED``). The launcher sets the flag only when every batch/head/row stride
# is a multiple of 8 elements, the last dim is contiguous and every pointer is 16-byte aligned
# (:func:`_aligned`); then 16-bit tiles load as 16-byte vectors and through ``cp.async``. Without
# it a head stride such as 72 (not divisible by 16, so not specialised by Triton) makes every
# access a scalar 2-byte load. A wrong hint would be undefined behaviour, so the flag is never set
# blindly. ``tl.multiple_of`` must mark the op that *computes* the offset (a hint on an argument
# does nothing), so each helper computes its offset and marks it.


@triton.jit
def _mul8(a, b, ALIGNED: tl.constexpr):
    """``a * b`` (element offsets, scalar or tensor), a multiple of 8 when ``ALIGNED``."""
    x = a * b
    if ALIGNED:
        x = tl.multiple_of(x, 8)
    return x


@triton.jit
def _off2(a, sa, b, sb, ALIGNED: tl.constexpr):
    """``a * sa + b * sb``, a multiple of 8 when ``ALIGNED``."""
    x = a * sa + b * sb
    if ALIGNED:
        x = tl.multiple_of(x, 8)
    return x


@triton.jit
def _off3(a, sa, b, sb, c, sc, ALIGNED: tl.constexpr):
    """``a * sa + b * sb + c * sc``, a multiple of 8 when ``ALIGNED``."""
    x = a * sa + b * sb + c * sc
    if ALIGNED:
        x = tl.multiple_of(x, 8)
    return x


@triton.jit
def _first_half(x, ROWS: tl.constexpr, HALF: tl.constexpr):
    """Columns ``[0, HALF)`` of a ``[ROWS, 2 * HALF]`` tile, taken from registers. The output-dim
    dots need the remainder only ``DRN`` wide while the reduction dots load it ``DRK = 2 * DRN``
    wide (head_dim 72: 8 and 16); a second, narrow load of e.g. ``[32, 8]`` by 8 warps would be
    one 2-byte element per thread (compiled for sm_90: scalar loads in the main loop)."""
    lo, hi = tl.split(tl.permute(tl.reshape(x, [ROWS, 2, HALF]), [0, 2, 1]))
    return lo


@triton.jit
def _load_tile(base, offs_r, offs_c, stride_r, stride_c, n_rows, N_COLS: tl.constexpr,
               MASK_R: tl.constexpr, MASK_C: tl.constexpr, ALIGNED: tl.constexpr):
    """Load ``[len(offs_r), len(offs_c)]`` at ``base``; rows ``>= n_rows`` and columns
    ``>= N_COLS`` read as zero when the matching MASK flag is set."""
    ptrs = base + _mul8(offs_r, stride_r, ALIGNED)[:, None] + offs_c[None, :] * stride_c
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
def _store_tile(base, x, offs_r, offs_c, stride_r, stride_c, n_rows, N_COLS: tl.constexpr, MASK_C: tl.constexpr, ALIGNED: tl.constexpr):
    ptrs = base + _mul8(offs_r, stride_r, ALIGNED)[:, None] + offs_c[None, :] * stride_c
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
               DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr):
    """Online-softmax update over key blocks ``[lo, hi)``; boundary/causal masks only if MASKED."""
    offs_j = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    offs_rk = tl.arange(0, DRK)
    offs_rn = tl.arange(0, DRN)
    for start_n in range(lo, hi, BLOCK_N):
        start_n64 = tl.cast(start_n, tl.int64)
        kb = K_bh + _mul8(start_n64, stride_kn, ALIGNED)
        vb = V_bh + _mul8(start_n64, stride_vn, ALIGNED)
        n_left = Lk - start_n
        k0 = _load_tile(kb, offs_j, offs_d0, stride_kn, stride_kd, n_left, HEAD_DIM, MASKED, D0 > HEAD_DIM, ALIGNED)
        qk = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        if REM > 0:
            k1 = _load_tile(kb + D0 * stride_kd, offs_j, offs_rk, stride_kn, stride_kd, n_left, REM, MASKED, DRK > REM, ALIGNED)
            qk = tl.dot(q1, tl.trans(k1), qk, input_precision=DOT_PREC)
        qk = qk * qk_scale
        if MASKED:
            offs_n = start_n + offs_j
            valid = offs_n[None, :] < Lk
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])
            qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # no finite score in the row yet (-inf inputs): subtract 0, as -inf - -inf is NaN
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = _load_tile(vb, offs_j, offs_d0, stride_vn, stride_vd, n_left, HEAD_DIM, MASKED, D0 > HEAD_DIM, ALIGNED)
        acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=DOT_PREC)
        if REM > 0:
            v1 = _load_tile(vb + D0 * stride_vd, offs_j, offs_rn, stride_vn, stride_vd, n_left, REM, MASKED, DRN > REM, ALIGNED)
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc0, acc1, l_i, m_i


@triton.jit
def _fwd_block(Q, K, V, O, STATS,
               stride_qb, stride_qm, stride_qh, stride_qd,
               stride_kb, stride_kn, stride_kh, stride_kd,
               stride_vb, stride_vn, stride_vh, stride_vd,
               stride_ob, stride_om, stride_oh, stride_od,
               pid_bh, start_m, H, Lq, Lk, qk_scale,
               HEAD_DIM: tl.constexpr, D0: tl.constexpr, REM: tl.constexpr, DRK: tl.constexpr,
               DRN: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N_TAIL: tl.constexpr, ALIGNED: tl.constexpr):
    """Rows ``[start_m, start_m + BLOCK_M)`` of one (batch, head): output and row statistics."""
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    start_m64 = tl.cast(start_m, tl.int64)
    Q_blk = Q + _off3(off_b, stride_qb, off_h, stride_qh, start_m64, stride_qm, ALIGNED)
    K_bh = K + _off2(off_b, stride_kb, off_h, stride_kh, ALIGNED)
    V_bh = V + _off2(off_b, stride_vb, off_h, stride_vh, ALIGNED)
    O_blk = O + _off3(off_b, stride_ob, off_h, stride_oh, start_m64, stride_om, ALIGNED)

    offs_r = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_r
    offs_d0 = tl.arange(0, D0)
    offs_rk = tl.arange(0, DRK)
    offs_rn = tl.arange(0, DRN)
    m_left = Lq - start_m

    q0 = _load_tile(Q_blk, offs_r, offs_d0, stride_qm, stride_qd, m_left, HEAD_DIM, True, D0 > HEAD_DIM, ALIGNED)
    acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if REM > 0:
        q1 = _load_tile(Q_blk + D0 * stride_qd, offs_r, offs_rk, stride_qm, stride_qd, m_left, REM, True, DRK > REM, ALIGNED)
        acc1 = tl.zeros([BLOCK_M, DRN], dtype=tl.float32)
    else:
        q1 = q0
        acc1 = acc0
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # Key blocks [0, u_hi) need no mask. The rest is masked: causal, the blocks on the diagonal
    # (BLOCK_N wide); otherwise only the Lk tail, in BLOCK_N_TAIL steps (e.g. 258 = 4 x 64 + 16).
    lk_full = (Lk // BLOCK_N) * BLOCK_N
    if CAUSAL:
        u_hi = tl.minimum(lk_full, ((start_m + 1) // BLOCK_N) * BLOCK_N)
        acc0, acc1, l_i, m_i = _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, K_bh, V_bh,
                                          stride_kn, stride_kd, stride_vn, stride_vd,
                                          offs_m, 0, u_hi, Lk, qk_scale,
                                          HEAD_DIM, D0, REM, DRK, DRN, False, CAUSAL, DOT_PREC, BLOCK_N, ALIGNED)
        acc0, acc1, l_i, m_i = _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, K_bh, V_bh,
                                          stride_kn, stride_kd, stride_vn, stride_vd,
                                          offs_m, u_hi, tl.minimum(Lk, start_m + BLOCK_M), Lk, qk_scale,
                                          HEAD_DIM, D0, REM, DRK, DRN, True, CAUSAL, DOT_PREC, BLOCK_N, ALIGNED)
    else:
        acc0, acc1, l_i, m_i = _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, K_bh, V_bh,
                                          stride_kn, stride_kd, stride_vn, stride_vd,
                                          offs_m, 0, lk_full, Lk, qk_scale,
                                          HEAD_DIM, D0, REM, DRK, DRN, False, CAUSAL, DOT_PREC, BLOCK_N, ALIGNED)
        acc0, acc1, l_i, m_i = _fwd_inner(acc0, acc1, l_i, m_i, q0, q1, K_bh, V_bh,
                                          stride_kn, stride_kd, stride_vn, stride_vd,
                                          offs_m, lk_full, Lk, Lk, qk_scale,
                                          HEAD_DIM, D0, REM, DRK, DRN, True, CAUSAL, DOT_PREC, BLOCK_N_TAIL, ALIGNED)

    l_rcp = 1.0 / l_i
    _store_tile(O_blk, (acc0 * l_rcp[:, None]).to(O.dtype.element_ty), offs_r, offs_d0, stride_om, stride_od,
                m_left, HEAD_DIM, D0 > HEAD_DIM, ALIGNED)
    if REM > 0:
        _store_tile(O_blk + D0 * stride_od, (acc1 * l_rcp[:, None]).to(O.dtype.element_ty), offs_r, offs_rn,
                    stride_om, stride_od, m_left, REM, DRN > REM, ALIGNED)
    # The log-sum-exp, in split form: STATS[b, h, 0] = row max, STATS[b, h, 1] = log2(row sum),
    # both fp32 in base 2 of logits * scale * log2(e). The backward recomputes p = exp2((s - max) -
    # log2 sum); one number max + log2 sum (~1000 at scale 30) would lose ~1e-4 to rounding.
    row_ok = offs_m < Lq
    STATS_bh = STATS + pid_bh.to(tl.int64) * 2 * Lq
    tl.store(STATS_bh + offs_m, m_i, mask=row_ok)
    tl.store(STATS_bh + Lq + offs_m, tl.log2(l_i), mask=row_ok)


@triton.jit
def _attn_fwd(Q, K, V, O, STATS,
              stride_qb, stride_qm, stride_qh, stride_qd,
              stride_kb, stride_kn, stride_kh, stride_kd,
              stride_vb, stride_vn, stride_vh, stride_vd,
              stride_ob, stride_om, stride_oh, stride_od,
              H, Lq, Lk, n_main, n_tail, qk_scale,
              HEAD_DIM: tl.constexpr, D0: tl.constexpr, REM: tl.constexpr, DRK: tl.constexpr,
              DRN: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_M_TAIL: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_N_TAIL: tl.constexpr, ALIGNED: tl.constexpr):
    # 1-D grid, (n_main + n_tail) programs per (batch, head), adjacent (K/V reuse in L2, no 65535
    # limit): n_main full BLOCK_M row tiles, then n_tail BLOCK_M_TAIL tiles for the Lq tail, so a
    # 258-token sequence costs 2 x 128 + 16 rows of work, not 3 x 128.
    pid = tl.program_id(0)
    per_bh = n_main + n_tail
    pid_bh = pid // per_bh
    j = pid % per_bh
    if j < n_main:
        if CAUSAL:
            j = n_main - 1 - j  # heaviest (last) row tiles first
        _fwd_block(Q, K, V, O, STATS,
                   stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
                   stride_vb, stride_vn, stride_vh, stride_vd, stride_ob, stride_om, stride_oh, stride_od,
                   pid_bh, j * BLOCK_M, H, Lq, Lk, qk_scale,
                   HEAD_DIM, D0, REM, DRK, DRN, CAUSAL, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_N_TAIL, ALIGNED)
    else:
        _fwd_block(Q, K, V, O, STATS,
                   stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
                   stride_vb, stride_vn, stride_vh, stride_vd, stride_ob, stride_om, stride_oh, stride_od,
                   pid_bh, n_main * BLOCK_M + (j - n_main) * BLOCK_M_TAIL, H, Lq, Lk, qk_scale,
                   HEAD_DIM, D0, REM, DRK, DRN, CAUSAL, DOT_PREC, BLOCK_M_TAIL, BLOCK_N, BLOCK_N_TAIL, ALIGNED)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA,
                    stride_ob, stride_om, stride_oh, stride_od,
                    stride_db, stride_dm, stride_dh, stride_dd,
                    H, Lq,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr):
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
    o = _load_tile(O + _off3(off_b, stride_ob, off_h, stride_oh, start_m.to(tl.int64), stride_om, ALIGNED),
                   offs_r, offs_d, stride_om, stride_od, m_left, HEAD_DIM, True, BLOCK_D > HEAD_DIM, ALIGNED)
    do = _load_tile(DO + _off3(off_b, stride_db, off_h, stride_dh, start_m.to(tl.int64), stride_dm, ALIGNED),
                    offs_r, offs_d, stride_dm, stride_dd, m_left, HEAD_DIM, True, BLOCK_D > HEAD_DIM, ALIGNED)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    offs_m = start_m + offs_r
    tl.store(DELTA + pid_bh.to(tl.int64) * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _bwd_dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q_bh, DO_bh, STATS_bh, DELTA_bh,
                    stride_qm, stride_qd, stride_dm, stride_dd,
                    offs_n, lo, hi, Lq, qk_scale,
                    HEAD_DIM: tl.constexpr, D0: tl.constexpr, REM: tl.constexpr, DRK: tl.constexpr,
                    DRN: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, ALIGNED: tl.constexpr):
    """Accumulate dK, dV of one key tile over query rows ``[lo, hi)`` in BLOCK_M steps (works on
    transposed scores ``s^T = k q^T``, so P never needs a register transpose)."""
    offs_i = tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, D0)
    offs_rk = tl.arange(0, DRK)
    offs_rn = tl.arange(0, DRN)
    for start_m in range(lo, hi, BLOCK_M):
        start_m64 = tl.cast(start_m, tl.int64)
        qb = Q_bh + _mul8(start_m64, stride_qm, ALIGNED)
        dob = DO_bh + _mul8(start_m64, stride_dm, ALIGNED)
        m_left = Lq - start_m
        offs_m = start_m + offs_i
        q0 = _load_tile(qb, offs_i, offs_d0, stride_qm, stride_qd, m_left, HEAD_DIM, MASKED, D0 > HEAD_DIM, ALIGNED)
        sT = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)
        if REM > 0:
            q1 = _load_tile(qb + D0 * stride_qd, offs_i, offs_rk, stride_qm, stride_qd, m_left, REM, MASKED, DRK > REM, ALIGNED)
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
        do0 = _load_tile(dob, offs_i, offs_d0, stride_dm, stride_dd, m_left, HEAD_DIM, MASKED, D0 > HEAD_DIM, ALIGNED)
        dv0 = tl.dot(pT.to(do0.dtype), do0, dv0, input_precision=DOT_PREC)
        dpT = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)
        if REM > 0:
            do1 = _load_tile(dob + D0 * stride_dd, offs_i, offs_rk, stride_dm, stride_dd, m_left, REM, MASKED, DRK > REM, ALIGNED)
            dpT = tl.dot(v1, tl.trans(do1), dpT, input_precision=DOT_PREC)
            if DRK == 2 * DRN:  # narrow copies for the output-dim dots, from registers
                do1n = _first_half(do1, BLOCK_M, DRN)
                q1n = _first_half(q1, BLOCK_M, DRN)
            elif DRN != DRK:  # narrow copies for the output-dim dots
                do1n = _load_tile(dob + D0 * stride_dd, offs_i, offs_rn, stride_dm, stride_dd, m_left, REM, MASKED, DRN > REM, ALIGNED)
                q1n = _load_tile(qb + D0 * stride_qd, offs_i, offs_rn, stride_qm, stride_qd, m_left, REM, MASKED, DRN > REM, ALIGNED)
            else:
                do1n = do1
                q1n = q1
            dv1 = tl.dot(pT.to(do1n.dtype), do1n, dv1, input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        if MASKED:  # masked scores pass no gradient, even from a NaN row (as masked_fill's backward)
            dsT = tl.where(valid, dsT, 0.0)
        dk0 = tl.dot(dsT.to(q0.dtype), q0, dk0, input_precision=DOT_PREC)
        if REM > 0:
            dk1 = tl.dot(dsT.to(q1n.dtype), q1n, dk1, input_precision=DOT_PREC)
    return dk0, dk1, dv0, dv1


@triton.jit
def _dkdv_block(Q, K, V, DO, STATS, DELTA, DK, DV,
                stride_qb, stride_qm, stride_qh, stride_qd,
                stride_kb, stride_kn, stride_kh, stride_kd,
                stride_vb, stride_vn, stride_vh, stride_vd,
                stride_db, stride_dm, stride_dh, stride_dd,
                stride_dkb, stride_dkn, stride_dkh, stride_dkd,
                stride_dvb, stride_dvn, stride_dvh, stride_dvd,
                pid_bh, start_n, H, Lq, Lk, scale, qk_scale,
                HEAD_DIM: tl.constexpr, D0: tl.constexpr, REM: tl.constexpr, DRK: tl.constexpr,
                DRN: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_M_TAIL: tl.constexpr, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr):
    """dK, dV of keys ``[start_n, start_n + BLOCK_N)`` of one (batch, head)."""
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    start_n64 = tl.cast(start_n, tl.int64)

    Q_bh = Q + _off2(off_b, stride_qb, off_h, stride_qh, ALIGNED)
    DO_bh = DO + _off2(off_b, stride_db, off_h, stride_dh, ALIGNED)
    STATS_bh = STATS + pid_bh.to(tl.int64) * 2 * Lq
    DELTA_bh = DELTA + pid_bh.to(tl.int64) * Lq
    K_blk = K + _off3(off_b, stride_kb, off_h, stride_kh, start_n64, stride_kn, ALIGNED)
    V_blk = V + _off3(off_b, stride_vb, off_h, stride_vh, start_n64, stride_vn, ALIGNED)

    offs_j = tl.arange(0, BLOCK_N)
    offs_n = start_n + offs_j
    offs_d0 = tl.arange(0, D0)
    offs_rk = tl.arange(0, DRK)
    offs_rn = tl.arange(0, DRN)
    n_left = Lk - start_n

    k0 = _load_tile(K_blk, offs_j, offs_d0, stride_kn, stride_kd, n_left, HEAD_DIM, True, D0 > HEAD_DIM, ALIGNED)
    v0 = _load_tile(V_blk, offs_j, offs_d0, stride_vn, stride_vd, n_left, HEAD_DIM, True, D0 > HEAD_DIM, ALIGNED)
    dk0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], dtype=tl.float32)
    if REM > 0:
        k1 = _load_tile(K_blk + D0 * stride_kd, offs_j, offs_rk, stride_kn, stride_kd, n_left, REM, True, DRK > REM, ALIGNED)
        v1 = _load_tile(V_blk + D0 * stride_vd, offs_j, offs_rk, stride_vn, stride_vd, n_left, REM, True, DRK > REM, ALIGNED)
        dk1 = tl.zeros([BLOCK_N, DRN], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, DRN], dtype=tl.float32)
    else:
        k1 = k0
        v1 = v0
        dk1 = dk0
        dv1 = dv0

    # Query rows: [lo, min(mid, lq_full)) straddle the causal diagonal (masked), [mid, lq_full)
    # need no mask, [max(lo, lq_full), Lq) is the Lq tail (masked, in steps of BLOCK_M_TAIL, at
    # most BLOCK_M: a tail step over the main step would only pad more rows and shared memory).
    TAIL_M: tl.constexpr = BLOCK_M_TAIL if BLOCK_M_TAIL < BLOCK_M else BLOCK_M
    lq_full = (Lq // BLOCK_M) * BLOCK_M
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    else:
        lo = 0
        mid = 0
    dk0, dk1, dv0, dv1 = _bwd_dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q_bh, DO_bh, STATS_bh, DELTA_bh,
                                         stride_qm, stride_qd, stride_dm, stride_dd,
                                         offs_n, lo, tl.minimum(mid, lq_full), Lq, qk_scale,
                                         HEAD_DIM, D0, REM, DRK, DRN, True, CAUSAL, DOT_PREC, BLOCK_M, ALIGNED)
    dk0, dk1, dv0, dv1 = _bwd_dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q_bh, DO_bh, STATS_bh, DELTA_bh,
                                         stride_qm, stride_qd, stride_dm, stride_dd,
                                         offs_n, mid, lq_full, Lq, qk_scale,
                                         HEAD_DIM, D0, REM, DRK, DRN, False, CAUSAL, DOT_PREC, BLOCK_M, ALIGNED)
    dk0, dk1, dv0, dv1 = _bwd_dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q_bh, DO_bh, STATS_bh, DELTA_bh,
                                         stride_qm, stride_qd, stride_dm, stride_dd,
                                         offs_n, tl.maximum(lo, lq_full), Lq, Lq, qk_scale,
                                         HEAD_DIM, D0, REM, DRK, DRN, True, CAUSAL, DOT_PREC, TAIL_M, ALIGNED)

    DK_blk = DK + _off3(off_b, stride_dkb, off_h, stride_dkh, start_n64, stride_dkn, ALIGNED)
    DV_blk = DV + _off3(off_b, stride_dvb, off_h, stride_dvh, start_n64, stride_dvn, ALIGNED)
    _store_tile(DK_blk, (dk0 * scale).to(DK.dtype.element_ty), offs_j, offs_d0, stride_dkn, stride_dkd,
                n_left, HEAD_DIM, D0 > HEAD_DIM, ALIGNED)
    _store_tile(DV_blk, dv0.to(DV.dtype.element_ty), offs_j, offs_d0, stride_dvn, stride_dvd,
                n_left, HEAD_DIM, D0 > HEAD_DIM, ALIGNED)
    if REM > 0:
        _store_tile(DK_blk + D0 * stride_dkd, (dk1 * scale).to(DK.dtype.element_ty), offs_j, offs_rn,
                    stride_dkn, stride_dkd, n_left, REM, DRN > REM, ALIGNED)
        _store_tile(DV_blk + D0 * stride_dvd, dv1.to(DV.dtype.element_ty), offs_j, offs_rn,
                    stride_dvn, stride_dvd, n_left, REM, DRN > REM, ALIGNED)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, STATS, DELTA, DK, DV,
                   stride_qb, stride_qm, stride_qh, stride_qd,
                   stride_kb, stride_kn, stride_kh, stride_kd,
                   stride_vb, stride_vn, stride_vh, stride_vd,
                   stride_db, stride_dm, stride_dh, stride_dd,
                   stride_dkb, stride_dkn, stride_dkh, stride_dkd,
                   stride_dvb, stride_dvn, stride_dvh, stride_dvd,
                   H, Lq, Lk, n_main, n_tail, scale, qk_scale,
                   HEAD_DIM: tl.constexpr, D0: tl.constexpr, REM: tl.constexpr, DRK: tl.constexpr,
                   DRN: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_M_TAIL: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_N_TAIL: tl.constexpr, ALIGNED: tl.constexpr):
    # programs: n_main full BLOCK_N key tiles then n_tail BLOCK_N_TAIL tiles per (batch, head)
    pid = tl.program_id(0)
    per_bh = n_main + n_tail
    pid_bh = pid // per_bh
    j = pid % per_bh
    if j < n_main:
        _dkdv_block(Q, K, V, DO, STATS, DELTA, DK, DV,
                    stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
                    stride_vb, stride_vn, stride_vh, stride_vd, stride_db, stride_dm, stride_dh, stride_dd,
                    stride_dkb, stride_dkn, stride_dkh, stride_dkd, stride_dvb, stride_dvn, stride_dvh, stride_dvd,
                    pid_bh, j * BLOCK_N, H, Lq, Lk, scale, qk_scale,
                    HEAD_DIM, D0, REM, DRK, DRN, CAUSAL, DOT_PREC, BLOCK_M, BLOCK_M_TAIL, BLOCK_N, ALIGNED)
    else:
        _dkdv_block(Q, K, V, DO, STATS, DELTA, DK, DV,
                    stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
                    stride_vb, stride_vn, stride_vh, stride_vd, stride_db, stride_dm, stride_dh, stride_dd,
                    stride_dkb, stride_dkn, stride_dkh, stride_dkd, stride_dvb, stride_dvn, stride_dvh, stride_dvd,
                    pid_bh, n_main * BLOCK_N + (j - n_main) * BLOCK_N_TAIL, H, Lq, Lk, scale, qk_scale,
                    HEAD_DIM, D0, REM, DRK, DRN, CAUSAL, DOT_PREC, BLOCK_M, BLOCK_M_TAIL, BLOCK_N_TAIL, ALIGNED)


@triton.jit
def _bwd_dq_inner(dq0, dq1, q0, q1, do0, do1, m_row, log2_l, delta, K_bh, V_bh,
                  stride_kn, stride_kd, stride_vn, stride_vd,
                  offs_m, lo, hi, Lk, qk_scale,
                  HEAD_DIM: tl.constexpr, D0: tl.constexpr, REM: tl.constexpr, DRK: tl.constexpr,
                  DRN: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                  DOT_PREC: tl.constexpr, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr):
    offs_j = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, D0)
    offs_rk = tl.arange(0, DRK)
    offs_rn = tl.arange(0, DRN)
    for start_n in range(lo, hi, BLOCK_N):
        start_n64 = tl.cast(start_n, tl.int64)
        kb = K_bh + _mul8(start_n64, stride_kn, ALIGNED)
        vb = V_bh + _mul8(start_n64, stride_vn, ALIGNED)
        n_left = Lk - start_n
        k0 = _load_tile(kb, offs_j, offs_d0, stride_kn, stride_kd, n_left, HEAD_DIM, MASKED, D0 > HEAD_DIM, ALIGNED)
        v0 = _load_tile(vb, offs_j, offs_d0, stride_vn, stride_vd, n_left, HEAD_DIM, MASKED, D0 > HEAD_DIM, ALIGNED)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
        if REM > 0:
            k1 = _load_tile(kb + D0 * stride_kd, offs_j, offs_rk, stride_kn, stride_kd, n_left, REM, MASKED, DRK > REM, ALIGNED)
            v1 = _load_tile(vb + D0 * stride_vd, offs_j, offs_rk, stride_vn, stride_vd, n_left, REM, MASKED, DRK > REM, ALIGNED)
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
            if DRK == 2 * DRN:
                k1n = _first_half(k1, BLOCK_N, DRN)
            elif DRN != DRK:
                k1n = _load_tile(kb + D0 * stride_kd, offs_j, offs_rn, stride_kn, stride_kd, n_left, REM, MASKED, DRN > REM, ALIGNED)
            else:
                k1n = k1
            dq1 = tl.dot(ds.to(k1n.dtype), k1n, dq1, input_precision=DOT_PREC)
    return dq0, dq1


@triton.jit
def _dq_block(Q, K, V, DO, STATS, DELTA, DQ,
              stride_qb, stride_qm, stride_qh, stride_qd,
              stride_kb, stride_kn, stride_kh, stride_kd,
              stride_vb, stride_vn, stride_vh, stride_vd,
              stride_db, stride_dm, stride_dh, stride_dd,
              stride_dqb, stride_dqm, stride_dqh, stride_dqd,
              pid_bh, start_m, H, Lq, Lk, scale, qk_scale,
              HEAD_DIM: tl.constexpr, D0: tl.constexpr, REM: tl.constexpr, DRK: tl.constexpr,
              DRN: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N_TAIL: tl.constexpr, ALIGNED: tl.constexpr):
    """dQ of rows ``[start_m, start_m + BLOCK_M)`` of one (batch, head)."""
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    start_m64 = tl.cast(start_m, tl.int64)

    Q_blk = Q + _off3(off_b, stride_qb, off_h, stride_qh, start_m64, stride_qm, ALIGNED)
    DO_blk = DO + _off3(off_b, stride_db, off_h, stride_dh, start_m64, stride_dm, ALIGNED)
    K_bh = K + _off2(off_b, stride_kb, off_h, stride_kh, ALIGNED)
    V_bh = V + _off2(off_b, stride_vb, off_h, stride_vh, ALIGNED)

    offs_r = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_r
    offs_d0 = tl.arange(0, D0)
    offs_rk = tl.arange(0, DRK)
    offs_rn = tl.arange(0, DRN)
    m_left = Lq - start_m

    q0 = _load_tile(Q_blk, offs_r, offs_d0, stride_qm, stride_qd, m_left, HEAD_DIM, True, D0 > HEAD_DIM, ALIGNED)
    do0 = _load_tile(DO_blk, offs_r, offs_d0, stride_dm, stride_dd, m_left, HEAD_DIM, True, D0 > HEAD_DIM, ALIGNED)
    dq0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
    if REM > 0:
        q1 = _load_tile(Q_blk + D0 * stride_qd, offs_r, offs_rk, stride_qm, stride_qd, m_left, REM, True, DRK > REM, ALIGNED)
        do1 = _load_tile(DO_blk + D0 * stride_dd, offs_r, offs_rk, stride_dm, stride_dd, m_left, REM, True, DRK > REM, ALIGNED)
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
    TAIL_N: tl.constexpr = BLOCK_N_TAIL if BLOCK_N_TAIL < BLOCK_N else BLOCK_N  # the Lk tail's step
    if CAUSAL:
        u_hi = tl.minimum(lk_full, ((start_m + 1) // BLOCK_N) * BLOCK_N)
        dq0, dq1 = _bwd_dq_inner(dq0, dq1, q0, q1, do0, do1, m_row, log2_l, delta, K_bh, V_bh,
                                 stride_kn, stride_kd, stride_vn, stride_vd,
                                 offs_m, 0, u_hi, Lk, qk_scale,
                                 HEAD_DIM, D0, REM, DRK, DRN, False, CAUSAL, DOT_PREC, BLOCK_N, ALIGNED)
        dq0, dq1 = _bwd_dq_inner(dq0, dq1, q0, q1, do0, do1, m_row, log2_l, delta, K_bh, V_bh,
                                 stride_kn, stride_kd, stride_vn, stride_vd,
                                 offs_m, u_hi, tl.minimum(Lk, start_m + BLOCK_M), Lk, qk_scale,
                                 HEAD_DIM, D0, REM, DRK, DRN, True, CAUSAL, DOT_PREC, BLOCK_N, ALIGNED)
    else:
        dq0, dq1 = _bwd_dq_inner(dq0, dq1, q0, q1, do0, do1, m_row, log2_l, delta, K_bh, V_bh,
                                 stride_kn, stride_kd, stride_vn, stride_vd,
                                 offs_m, 0, lk_full, Lk, qk_scale,
                                 HEAD_DIM, D0, REM, DRK, DRN, False, CAUSAL, DOT_PREC, BLOCK_N, ALIGNED)
        dq0, dq1 = _bwd_dq_inner(dq0, dq1, q0, q1, do0, do1, m_row, log2_l, delta, K_bh, V_bh,
                                 stride_kn, stride_kd, stride_vn, stride_vd,
                                 offs_m, lk_full, Lk, Lk, qk_scale,
                                 HEAD_DIM, D0, REM, DRK, DRN, True, CAUSAL, DOT_PREC, TAIL_N, ALIGNED)

    DQ_blk = DQ + _off3(off_b, stride_dqb, off_h, stride_dqh, start_m64, stride_dqm, ALIGNED)
    _store_tile(DQ_blk, (dq0 * scale).to(DQ.dtype.element_ty), offs_r, offs_d0, stride_dqm, stride_dqd,
                m_left, HEAD_DIM, D0 > HEAD_DIM, ALIGNED)
    if REM > 0:
        _store_tile(DQ_blk + D0 * stride_dqd, (dq1 * scale).to(DQ.dtype.element_ty), offs_r, offs_rn,
                    stride_dqm, stride_dqd, m_left, REM, DRN > REM, ALIGNED)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, STATS, DELTA, DQ,
                 stride_qb, stride_qm, stride_qh, stride_qd,
                 stride_kb, stride_kn, stride_kh, stride_kd,
                 stride_vb, stride_vn, stride_vh, stride_vd,
                 stride_db, stride_dm, stride_dh, stride_dd,
                 stride_dqb, stride_dqm, stride_dqh, stride_dqd,
                 H, Lq, Lk, n_main, n_tail, scale, qk_scale,
                 HEAD_DIM: tl.constexpr, D0: tl.constexpr, REM: tl.constexpr, DRK: tl.constexpr,
                 DRN: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_M_TAIL: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_N_TAIL: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    per_bh = n_main + n_tail
    pid_bh = pid // per_bh
    j = pid % per_bh
    if j < n_main:
        if CAUSAL:
            j = n_main - 1 - j
        _dq_block(Q, K, V, DO, STATS, DELTA, DQ,
                  stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
                  stride_vb, stride_vn, stride_vh, stride_vd, stride_db, stride_dm, stride_dh, stride_dd,
                  stride_dqb, stride_dqm, stride_dqh, stride_dqd,
                  pid_bh, j * BLOCK_M, H, Lq, Lk, scale, qk_scale,
                  HEAD_DIM, D0, REM, DRK, DRN, CAUSAL, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_N_TAIL, ALIGNED)
    else:
        _dq_block(Q, K, V, DO, STATS, DELTA, DQ,
                  stride_qb, stride_qm, stride_qh, stride_qd, stride_kb, stride_kn, stride_kh, stride_kd,
                  stride_vb, stride_vn, stride_vh, stride_vd, stride_db, stride_dm, stride_dh, stride_dd,
                  stride_dqb, stride_dqm, stride_dqh, stride_dqd,
                  pid_bh, n_main * BLOCK_M + (j - n_main) * BLOCK_M_TAIL, H, Lq, Lk, scale, qk_scale,
                  HEAD_DIM, D0, REM, DRK, DRN, CAUSAL, DOT_PREC, BLOCK_M_TAIL, BLOCK_N, BLOCK_N_TAIL, ALIGNED)


# --------------------------------------------------------------------------------------------
# Launch configuration.
#
# Program tiles (rows per program of the forward and dQ kernels, keys per program of the dK/dV
# kernel) are chosen by a heuristic, so the launcher can cover the sequence with full tiles plus
# small tail tiles (`_split`). The loop step over the other sequence is autotuned on GPU over a
# short list (with warps and stages); under the interpreter one pinned config (autotune would run
# every config there).
# --------------------------------------------------------------------------------------------

TAIL_STEP = 16  # forward: loop step over the last, partial block of the other sequence
# Backward: the loops over the last, partial block of the other sequence step 32 rows for 16-bit
# inputs (capped at the main step in the kernels), 16 for fp32. Compiled for sm_90 at head_dim 72,
# a 16-row step left the 8-column remainder tile of 16-bit inputs as one 2-byte scalar load per
# thread (8 warps); at 32 rows every load of those loops is a 16-byte cp.async, with no spills
# (docs/attention.md). fp32 has no 2-byte loads to remove, and there 32 rows cost registers (TF32
# dQ first config: 195 registers, no spills -> 255 and 8 B spilled), so fp32 keeps 16. The cost for
# 16-bit: the last partial block is padded to 32 rows (L = 258: 288 rows computed per program
# instead of 272), untimed. Accuracy is the same for either step (tests/test_attention.py::
# test_backward_tail_step_does_not_change_the_gradients).
BWD_TAIL_STEPS = {torch.float16: 32, torch.bfloat16: 32, torch.float32: 16}
_INTERPRET_TILE = 64
_INTERPRET_STEP = 32
_sm_count_cache = {}


def _num_sms(device: torch.device) -> int:
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _sm_count_cache:
        _sm_count_cache[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _sm_count_cache[key]


def _program_tile(L: int, bh: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> int:
    """128 rows for 16-bit inputs up to head_dim 128 when that still gives >= 2 programs per SM;
    else 64."""
    if _INTERPRET or device.type != "cuda":
        return _INTERPRET_TILE
    if head_dim > 128 or dtype == torch.float32:
        return 64
    if (L // 128) * bh < 2 * _num_sms(device):
        return 64
    return 128


def _split(L: int, tile: int):
    """``(n_main, tail_tile, n_tail)``: ``L`` rows as ``n_main`` full ``tile`` programs plus
    ``n_tail`` programs of ``tail_tile`` (16 or 32) rows for the remainder."""
    n_main = L // tile
    rest = L - n_main * tile
    tail = min(tile, 16 if rest <= 16 else 32)
    return n_main, tail, triton.cdiv(rest, tail)


_KEY = ["Lq", "Lk", "HEAD_DIM", "CAUSAL", "DOT_PREC", "BLOCK_M", "BLOCK_N", "n_main", "ALIGNED"]


def _step_configs(name: str, steps_warps_stages):
    if _INTERPRET:
        return [triton.Config({name: _INTERPRET_STEP}, num_warps=4, num_stages=1)]
    return [triton.Config({name: s}, num_warps=w, num_stages=st) for s, w, st in steps_warps_stages]


# Configs that spill registers with 16-bit inputs at head_dim >= 64, as (step, warps, stages).
# Compiled for sm_90 (L 258, bf16; docs/attention.md lists the numbers) at head_dim 72 with 128-
# and 64-row program tiles, with and without the causal mask, and at head_dim 64: each of these
# spills (12 B to 2.6 KB per thread, at 255 registers) in at least one of those cases, while the
# configs kept spill nothing in any.
_SPILLING_FWD = {(64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 8, 2)}
_SPILLING_DKDV = {(64, 8, 2), (32, 4, 3), (64, 4, 3)}
_SPILLING_DQ = {(64, 4, 3)}


def _prune_step(name: str, seq: str, spilling):
    def prune(configs, named_args, **kwargs):
        """Drop steps longer than the other sequence and, above head_dim 128, steps over 64; with
        16-bit inputs at head_dim >= 64, the configs known to spill."""
        args = dict(named_args, **kwargs)
        head_dim = args.get("HEAD_DIM", 64)
        cap = max(16, triton.next_power_of_2(int(args.get(seq, 1 << 20))))
        kept = [c for c in configs if c.kwargs[name] <= cap and (head_dim <= 128 or c.kwargs[name] <= 64)]
        q = args.get("Q")
        if q is not None and q.dtype != torch.float32 and head_dim >= 64:
            kept = [c for c in kept if (c.kwargs[name], c.num_warps, c.num_stages) not in spilling] or kept
        return kept or [min(configs, key=lambda c: c.kwargs[name])]
    return prune


# (step, warps, stages) of the GPU autotune lists; the forward's first, BN64 w8 s3, is spill-free
FWD_STEPS = ((64, 8, 3), (64, 4, 3), (32, 4, 3), (128, 8, 2), (64, 4, 4), (32, 4, 4), (128, 4, 2))

_attn_fwd_tuned = triton.autotune(
    _step_configs("BLOCK_N", FWD_STEPS),
    key=_KEY, prune_configs_by={"early_config_prune": _prune_step("BLOCK_N", "Lk", _SPILLING_FWD)})(_attn_fwd)
_attn_bwd_dkdv_tuned = triton.autotune(
    _step_configs("BLOCK_M", ((32, 8, 3), (64, 8, 2), (32, 4, 3), (64, 4, 3), (16, 8, 3))),
    key=_KEY, prune_configs_by={"early_config_prune": _prune_step("BLOCK_M", "Lq", _SPILLING_DKDV)})(_attn_bwd_dkdv)
_attn_bwd_dq_tuned = triton.autotune(
    # (16, 8, 3) is needed for fp32 at head_dim 256 (64-row tiles): the other configs take 264-401 KiB
    # of shared memory there, over an H100's 227 KiB (tests/test_attention.py checks it offline)
    _step_configs("BLOCK_N", ((32, 8, 3), (64, 8, 2), (32, 4, 3), (64, 4, 3), (16, 8, 3))),
    key=_KEY, prune_configs_by={"early_config_prune": _prune_step("BLOCK_N", "Lk", _SPILLING_DQ)})(_attn_bwd_dq)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _aligned(*tensors: torch.Tensor) -> bool:
    """The ``ALIGNED`` flag (see ``_mul8``): every tensor has a contiguous last dim, every other
    stride a multiple of 8 elements and a 16-byte aligned data pointer."""
    return all(t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0
               for t in tensors)


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


def _launch(tuned, kernel, step_name: str, step, grid, args, consts):
    """Autotuned launch, or (``step`` given: tests) the plain kernel with that step."""
    if step is None:
        launch(tuned, grid, *args, **consts)
    else:
        kernel[grid](*args, **consts, **{step_name: step}, num_warps=4, num_stages=1 if _INTERPRET else 2)


def logsumexp(stats: torch.Tensor) -> torch.Tensor:
    """Natural-log LSE ``(B, H, Lq)`` of the scaled logits from the forward's ``(B, H, 2, Lq)`` stats."""
    return (stats[:, :, 0] + stats[:, :, 1]) * LN2


@on_inputs_device
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                      scale=None, input_precision=None, block_m=None, block_n=None):
    """Flash-attention forward on ``(B, L, H, D)`` tensors of any strides.

    Returns ``(out, stats)``: ``out`` ``(B, Lq, H, D)`` contiguous in q's dtype; ``stats``
    ``(B, H, 2, Lq)`` float32, the log-sum-exp of each row in split form (see :func:`logsumexp`).
    ``input_precision`` applies to fp32 inputs only (default ``"ieee"``, exact fp32).
    ``block_m`` (rows per program) / ``block_n`` (key step) pin the tiles (tests).
    """
    _check(q, k, v)
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    scale = D ** -0.5 if scale is None else float(scale)
    d0, rem, drk, drn = head_dim_split(D)
    out = empty(B, Lq, H, D, dtype=q.dtype, device=q.device)
    stats = empty(B, H, 2, Lq, dtype=torch.float32, device=q.device)
    tile = block_m or _program_tile(Lq, B * H, D, q.dtype, q.device)
    n_main, tail, n_tail = _split(Lq, tile)
    _launch(_attn_fwd_tuned, _attn_fwd, "BLOCK_N", block_n, ((n_main + n_tail) * B * H,), (
        q, k, v, out, stats,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, Lq, Lk, n_main, n_tail, scale * LOG2E,
    ), dict(HEAD_DIM=D, D0=d0, REM=rem, DRK=drk, DRN=drn, CAUSAL=bool(causal),
            DOT_PREC=_dot_precision(q.dtype, input_precision),
            BLOCK_M=tile, BLOCK_M_TAIL=tail, BLOCK_N_TAIL=TAIL_STEP, ALIGNED=_aligned(q, k, v, out)))
    return out, stats


@on_inputs_device
def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, stats: torch.Tensor, *, causal: bool = False, scale=None,
                       dq=None, dk=None, dv=None, input_precision=None, block_m=None, block_n=None):
    """Flash-attention backward: ``(dq, dk, dv)`` shaped like q, k, v.

    ``dq``/``dk``/``dv`` may be given as preallocated (strided) outputs, e.g. views of one packed
    ``(B, L, 3, H, D)`` gradient; otherwise they are allocated contiguous. ``block_m``/``block_n``
    (tests only) pin the tiles of both backward kernels instead of autotuning: query rows per
    program / key step of the dQ kernel, query step / keys per program of the dK/dV kernel.
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
        HEAD_DIM=D, BLOCK_M=bm_delta, BLOCK_D=block_d, ALIGNED=_aligned(out, dout), num_warps=4,
    )

    tail_step = BWD_TAIL_STEPS[q.dtype]
    common = dict(HEAD_DIM=D, D0=d0, REM=rem, DRK=drk, DRN=drn, CAUSAL=bool(causal),
                  DOT_PREC=_dot_precision(q.dtype, input_precision),
                  ALIGNED=_aligned(q, k, v, dout, dq, dk, dv))
    tile_n = block_n or _program_tile(Lk, B * H, D, q.dtype, dev)
    n_main, tail, n_tail = _split(Lk, tile_n)
    _launch(_attn_bwd_dkdv_tuned, _attn_bwd_dkdv, "BLOCK_M", block_m, ((n_main + n_tail) * B * H,), (
        q, k, v, dout, stats, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *dv.stride(),
        H, Lq, Lk, n_main, n_tail, scale, scale * LOG2E,
    ), dict(common, BLOCK_M_TAIL=tail_step, BLOCK_N=tile_n, BLOCK_N_TAIL=tail))
    tile_m = block_m or _program_tile(Lq, B * H, D, q.dtype, dev)
    n_main, tail, n_tail = _split(Lq, tile_m)
    _launch(_attn_bwd_dq_tuned, _attn_bwd_dq, "BLOCK_N", block_n, ((n_main + n_tail) * B * H,), (
        q, k, v, dout, stats, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(),
        H, Lq, Lk, n_main, n_tail, scale, scale * LOG2E,
    ), dict(common, BLOCK_M=tile_m, BLOCK_M_TAIL=tail, BLOCK_N_TAIL=tail_step))
    return dq, dk, dv


@on_inputs_device
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
