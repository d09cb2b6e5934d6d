"""Fused decoder linear + unpatchify (2-D images and 3-D video tubelets).

Forward, one launch::

    img[b, c, tg*t + a, hh*p1 + i, ww*p2 + j] = tokens[b, E + l] @ W[n].T + bias[n]

with ``l = (tg, hh, ww)`` in row-major grid order and ``n = (a, i, j, c)`` (``C`` fastest),
which is upstream's ``B (h w) (p1 p2 C) -> B C (h p1) (w p2)``. The ``E`` leading
(non-patch) tokens are never read. The image address of GEMM element ``(m, n)`` separates
into ``row_off(m) + col_off(n)``, so the rearrange is just the pointer tile of the store.

Backward:

* ``dtokens[b, E + l] = dimg_patch[m] @ W`` (gathering the image gradient with the same
  map); rows ``< E`` are written as zeros by extra programs of the same launch.
* ``dW = dimg_patch.T @ tokens`` and ``dbias`` (fused into the ``pid_d == 0`` programs),
  reduced over ``M = B*L`` in ``S`` deterministic splits into fp32 partials (no atomics).

This module never imports ``uvit_fast``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._utils import empty, launch, patch_row_offsets, on_inputs_device

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


def _configs(pairs, warps_stages):
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_X": bx}, num_warps=w, num_stages=s)
        for (bm, bx), (w, s) in zip(pairs, warps_stages)
    ]


if _INTERPRET:  # autotune would run every config in the interpreter: pin one
    _GEMM_CONFIGS = _configs([(32, 32)], [(4, 1)])
else:
    # the 128-row tiles run with 8 warps: with 4 they spill (136 B per thread compiled for sm_90)
    _GEMM_CONFIGS = _configs([(64, 64), (128, 64), (128, 32), (64, 128)], [(4, 3), (8, 3), (8, 4), (4, 3)])


# --------------------------------------------------------------------------- index helpers
@triton.jit
def _image_col_offsets(offs_n, C, s_c, s_t, s_h, s_w,
                       PH: tl.constexpr, PW: tl.constexpr):
    """Offset of output feature ``n = (a, i, j, c)`` (upstream's ``(p1 p2 C)``) inside a patch."""
    c = offs_n % C
    r = offs_n // C
    j = r % PW
    r = r // PW
    i = r % PH
    a = r // PH
    return c * s_c + a * s_t + i * s_h + j * s_w


@triton.jit
def _token_row_offsets(offs_m, L, E, s_b, s_l):
    b = offs_m // L
    l = offs_m % L
    return b.to(tl.int64) * s_b + (E + l).to(tl.int64) * s_l


# --------------------------------------------------------------------------- forward
@triton.autotune(configs=_GEMM_CONFIGS, key=["D", "NOUT"])
@triton.jit
def _decoder_unpatchify_fwd_kernel(
    t_ptr, w_ptr, b_ptr, out_ptr,
    M, L, E, D, NOUT, C, Gh, Gw,
    st_b, st_l, st_d,
    sw_n, sw_d,
    so_b, so_c, so_t, so_h, so_w,
    PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """img[patch m, n] = sum_d tokens[m, d] W[n, d] + bias[n]; BLOCK_X is the reduction block
    over D, BLOCK_N tiles the output features."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < NOUT
    row_t = _token_row_offsets(offs_m, L, E, st_b, st_l)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_X):
        offs_d = d0 + tl.arange(0, BLOCK_X)
        mask_d = offs_d < D
        a = tl.load(t_ptr + row_t[:, None] + offs_d[None, :] * st_d,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * sw_n + offs_d[:, None] * sw_d,
                    mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    row_o = patch_row_offsets(offs_m, L, Gh, Gw, so_b, so_t, so_h, so_w, PT, PH, PW)
    col_o = _image_col_offsets(offs_n, C, so_c, so_t, so_h, so_w, PH, PW)
    tl.store(out_ptr + row_o[:, None] + col_o[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------- backward: tokens
@triton.autotune(configs=_GEMM_CONFIGS, key=["D", "NOUT"])
@triton.jit
def _decoder_unpatchify_dtok_kernel(
    g_ptr, w_ptr, dt_ptr,
    M, L, E, BE, D, NOUT, C, Gh, Gw,
    sg_b, sg_c, sg_t, sg_h, sg_w,
    sw_n, sw_d,
    sd_b, sd_l, sd_d,
    PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dtokens[m, d] = sum_n dimg[patch m, n] W[n, d]; BLOCK_X tiles D, BLOCK_N is the
    reduction block over the output features. Programs past the GEMM tiles zero the
    ``E`` leading rows."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    n_gemm = tl.cdiv(M, BLOCK_M)
    offs_d = pid_d * BLOCK_X + tl.arange(0, BLOCK_X)
    mask_d = offs_d < D
    if pid_m < n_gemm:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        row_g = patch_row_offsets(offs_m, L, Gh, Gw, sg_b, sg_t, sg_h, sg_w, PT, PH, PW)
        acc = tl.zeros((BLOCK_M, BLOCK_X), dtype=tl.float32)
        for n0 in range(0, NOUT, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < NOUT
            col_g = _image_col_offsets(offs_n, C, sg_c, sg_t, sg_h, sg_w, PH, PW)
            g = tl.load(g_ptr + row_g[:, None] + col_g[None, :],
                        mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            w = tl.load(w_ptr + offs_n[:, None] * sw_n + offs_d[None, :] * sw_d,
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            acc = tl.dot(g.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
        row_d = _token_row_offsets(offs_m, L, E, sd_b, sd_l)
        tl.store(dt_ptr + row_d[:, None] + offs_d[None, :] * sd_d, acc.to(dt_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_d[None, :])
    else:
        offs_r = (pid_m - n_gemm) * BLOCK_M + tl.arange(0, BLOCK_M)
        b = (offs_r // E).to(tl.int64)
        e = (offs_r % E).to(tl.int64)
        zero = tl.zeros((BLOCK_M, BLOCK_X), dtype=dt_ptr.dtype.element_ty)
        tl.store(dt_ptr + (b * sd_b + e * sd_l)[:, None] + offs_d[None, :] * sd_d, zero,
                 mask=(offs_r < BE)[:, None] & mask_d[None, :])


# --------------------------------------------------------------------------- backward: weight, bias
@triton.jit
def _decoder_unpatchify_dw_kernel(
    g_ptr, t_ptr, dw_ptr, db_ptr,
    M, L, E, D, NOUT, C, Gh, Gw, blocks_per_split,
    sg_b, sg_c, sg_t, sg_h, sg_w,
    st_b, st_l, st_d,
    PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_X: tl.constexpr,
):
    """Split ``s`` of dW[n, d] = sum_m dimg[patch m, n] tokens[m, d] (fp32 partial) and, from
    the ``pid_d == 0`` programs, of dbias[n] = sum_m dimg[patch m, n].

    Computed transposed, ``dW^T[d, n] = tokens^T[d, m] @ dimg[m, n]``: the accumulator has
    ``BLOCK_X`` (64 on the GPU) rows whatever ``NOUT`` is, so on sm_90 the dot lowers to ``wgmma``
    (which needs 64-row tiles); as ``BLOCK_N x BLOCK_X`` it had ``BLOCK_N`` = 16-32 rows for the
    usual patch outputs (p*p*C = 16 or 32) and fell back to ``mma.sync``."""
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < NOUT
    offs_d = pid_d * BLOCK_X + tl.arange(0, BLOCK_X)
    mask_d = offs_d < D
    col_g = _image_col_offsets(offs_n, C, sg_c, sg_t, sg_h, sg_w, PH, PW)
    acc = tl.zeros((BLOCK_X, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    mb_start = pid_s * blocks_per_split
    mb_end = tl.minimum(mb_start + blocks_per_split, tl.cdiv(M, BLOCK_M))
    for mb in range(mb_start, mb_end):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        row_g = patch_row_offsets(offs_m, L, Gh, Gw, sg_b, sg_t, sg_h, sg_w, PT, PH, PW)
        g = tl.load(g_ptr + row_g[:, None] + col_g[None, :],
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        row_t = _token_row_offsets(offs_m, L, E, st_b, st_l)
        aT = tl.load(t_ptr + row_t[None, :] + offs_d[:, None] * st_d,
                     mask=mask_d[:, None] & mask_m[None, :], other=0.0)
        acc = tl.dot(aT, g.to(aT.dtype), acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            if pid_d == 0:
                db += tl.sum(g.to(tl.float32), axis=0)
    base = pid_s.to(tl.int64) * NOUT * D
    tl.store(dw_ptr + base + offs_n[None, :] * D + offs_d[:, None], acc,
             mask=mask_d[:, None] & mask_n[None, :])
    if HAS_BIAS:
        if pid_d == 0:
            tl.store(db_ptr + pid_s.to(tl.int64) * NOUT + offs_n, db, mask=mask_n)


# --------------------------------------------------------------------------- launchers
def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: still exercise the split-M reduction


def _as_5d(t: torch.Tensor):
    if t.dim() == 4:
        sb, sc, sh, sw = t.stride()
        return sb, sc, 0, sh, sw
    return t.stride()


def _check(tokens, weight, patch, grid):
    if tokens.dtype not in _SUPPORTED or weight.dtype != tokens.dtype:
        raise TypeError(
            f"decoder_unpatchify kernel: tokens and weight must share one of float16/bfloat16/float32; "
            f"got {tokens.dtype} and {weight.dtype}"
        )
    if len(patch) != len(grid) or len(patch) not in (2, 3):
        raise ValueError(f"decoder_unpatchify kernel: patch {patch} and grid {grid} must both have 2 or 3 entries")


def _geometry(patch, grid):
    patch, grid = tuple(int(p) for p in patch), tuple(int(g) for g in grid)
    if len(patch) == 2:
        patch, grid = (1,) + patch, (1,) + grid
    return patch, grid


@on_inputs_device
def decoder_unpatchify_forward(tokens, weight, bias, patch, grid, extras=0):
    """``unpatchify(F.linear(tokens[:, extras:], weight, bias), patch, C, grid)``.

    tokens ``(B, extras + L, D)`` (any strides), weight ``(P*C, D)`` with features ordered
    ``((t,) p1, p2, C)``, bias ``(P*C,)``, patch ``(p1, p2)`` or ``(t, p1, p2)``, grid
    ``(h, w)`` or ``(T', h, w)``. Returns a contiguous ``(B, C, (T,) H, W)`` in tokens' dtype.
    """
    _check(tokens, weight, patch, grid)
    bias = bias.contiguous() if bias is not None else None  # the kernel reads bias at unit stride
    spatial = [g * p for g, p in zip(grid, patch)]
    (PT, PH, PW), (Gt, Gh, Gw) = _geometry(patch, grid)
    B, _, D = tokens.shape
    NOUT = weight.shape[0]
    C = NOUT // (PT * PH * PW)
    L = Gt * Gh * Gw
    E = int(extras)
    M = B * L
    out = empty(B, C, *spatial, dtype=tokens.dtype, device=tokens.device)
    if out.numel() == 0:
        return out
    BN = _block(NOUT, 32 if _INTERPRET else 64)

    def launch_grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(NOUT, BN))

    launch(_decoder_unpatchify_fwd_kernel, launch_grid,
        tokens, weight, bias if bias is not None else out, out,
        M, L, E, D, NOUT, C, Gh, Gw,
        *tokens.stride(), *weight.stride(), *_as_5d(out),
        PT=PT, PH=PH, PW=PW, HAS_BIAS=bias is not None,
        DOT_PRECISION=_dot_precision(tokens.dtype), BLOCK_N=BN,
    )
    return out


@on_inputs_device
def decoder_unpatchify_backward(grad, tokens, weight, patch, grid, extras=0,
                                need_tokens=True, need_weight=True, need_bias=True):
    """Gradients of :func:`decoder_unpatchify_forward`.

    grad: the image gradient ``(B, C, (T,) H, W)``, any strides. Returns
    ``(dtokens, dweight, dbias)`` shaped like tokens (zero rows for the extras), weight and
    ``(P*C,)``; an entry that was not asked for is an empty ``(0,)`` tensor.
    """
    _check(tokens, weight, patch, grid)
    (PT, PH, PW), (Gt, Gh, Gw) = _geometry(patch, grid)
    B, T, D = tokens.shape
    NOUT = weight.shape[0]
    C = NOUT // (PT * PH * PW)
    L = Gt * Gh * Gw
    E = int(extras)
    M = B * L
    dev = tokens.device
    # outputs not asked for: distinct empty tensors (custom-op outputs must not alias)
    dt, dw, db = (torch.empty(0, dtype=tokens.dtype, device=dev) for _ in range(3))
    prec = _dot_precision(tokens.dtype)
    sg = _as_5d(grad)

    if need_tokens:
        dt = empty(B, T, D, dtype=tokens.dtype, device=dev)
        if dt.numel():
            BN = _block(NOUT, 32 if _INTERPRET else 64)

            def launch_grid(meta):
                return (triton.cdiv(M, meta["BLOCK_M"]) + triton.cdiv(B * E, meta["BLOCK_M"]),
                        triton.cdiv(D, meta["BLOCK_X"]))

            launch(_decoder_unpatchify_dtok_kernel, launch_grid,
                grad, weight, dt,
                M, L, E, B * E, D, NOUT, C, Gh, Gw,
                *sg, *weight.stride(), *dt.stride(),
                PT=PT, PH=PH, PW=PW, DOT_PRECISION=prec, BLOCK_N=BN,
            )

    if need_bias and not need_weight:  # frozen weight: a plain per-feature sum is all that is left
        db = _bias_grad_torch(grad, patch, C).to(tokens.dtype)
        need_bias = False
    if need_weight or need_bias:
        if M == 0:
            dw_full = torch.zeros(NOUT, D, dtype=torch.float32, device=dev)
            db_full = torch.zeros(NOUT, dtype=torch.float32, device=dev)
        else:
            BM, BX = (32, 32) if _INTERPRET else (64, 64)
            BN = _block(NOUT, 32 if _INTERPRET else 64)
            tiles = triton.cdiv(NOUT, BN) * triton.cdiv(D, BX)
            n_mblocks = triton.cdiv(M, BM)
            splits = max(1, min(n_mblocks, triton.cdiv(4 * _num_sms(dev), tiles)))
            per = triton.cdiv(n_mblocks, splits)
            splits = triton.cdiv(n_mblocks, per)
            dw_part = empty(splits, NOUT, D, dtype=torch.float32, device=dev)
            db_part = empty(splits, NOUT, dtype=torch.float32, device=dev) if need_bias else dw_part
            _decoder_unpatchify_dw_kernel[(triton.cdiv(NOUT, BN), triton.cdiv(D, BX), splits)](
                grad, tokens, dw_part, db_part,
                M, L, E, D, NOUT, C, Gh, Gw, per,
                *sg, *tokens.stride(),
                PT=PT, PH=PH, PW=PW, HAS_BIAS=bool(need_bias), DOT_PRECISION=prec,
                BLOCK_M=BM, BLOCK_N=BN, BLOCK_X=BX, num_warps=4,
            )
            dw_full = dw_part.sum(0) if splits > 1 else dw_part[0]
            db_full = (db_part.sum(0) if splits > 1 else db_part[0]) if need_bias else None
        if need_weight:
            dw = dw_full.to(weight.dtype)
        if need_bias:
            db = db_full.to(tokens.dtype)
    return dt, dw, db


def _bias_grad_torch(grad, patch, C):
    """dbias[(p..., c)] = sum over batch and grid of the image gradient, in PyTorch."""
    n = len(patch)
    B = grad.shape[0]
    shape = [B, C]
    for s, p in zip(grad.shape[2:], patch):
        shape += [s // p, p]
    g = grad.reshape(shape)  # (B, C, g0, p0, g1, p1[, g2, p2])
    dims = [0] + [2 + 2 * i for i in range(n)]
    s = g.sum(dim=dims, dtype=torch.float32)  # (C, p0, p1[, p2])
    return s.permute(*range(1, n + 1), 0).reshape(-1)
