"""Fused patchify + patch embedding (2-D images and 3-D video tubelets).

Forward, one launch::

    out[b, :E]     = prefix[b] + pos_embed[b, :E]
    out[b, E + l]  = patch(x)[b, l] @ W.T + bias + pos_embed[b, E + l]

``patch(x)[b, l]`` is gathered straight from the image with its strides (no unfold
tensor): the patch projection is a Conv2d/Conv3d weight ``[D, C, (t,) p1, p2]`` read as
``[D, K]`` with ``K`` ordered ``(C, (t,) p1, p2)`` exactly as the conv weight is laid out,
so state_dicts do not change. A 2-D image is handled as a video with ``T = t = 1``.

Row ``m`` of the GEMM is ``(b, l)`` with ``l = (tg, hh, ww)`` in row-major grid order, and
column ``k`` of the reduction is ``(c, a, i, j)``. The image address of element ``(m, k)``
separates into ``row_off(m) + col_off(k)``, which is what makes the gather (and the
inverse scatter of the image gradient) a plain 2-D pointer tile.

Backward:

* ``dx``: ``dpatch = dtokens @ W`` (one GEMM over D) stored back through the same
  ``row_off + col_off`` map: kernel = stride, so every image element is written exactly once.
* ``dW`` (and ``dbias``, fused: the ``pid_k == 0`` programs also sum the gradient rows):
  ``dtokens.T @ patch(x)``, reduced over ``M = B*L`` in ``S`` deterministic splits into an
  fp32 ``[S, D, K]`` buffer that is summed afterwards (no atomics).
* ``dpos_embed`` / ``dprefix`` are slices / batch sums of the output gradient; the op layer
  computes them with PyTorch reductions.

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


def _configs(block_m, block_n, warps_stages):
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for (bm, bn), (w, s) in zip(zip(block_m, block_n), warps_stages)
    ]


if _INTERPRET:  # autotune would run every config in the interpreter: pin one
    _GEMM_CONFIGS = _configs([32], [32], [(4, 1)])
else:
    # 128x64 with 8 warps: with 4 the dx kernel spills (8-24 B per thread compiled for sm_90)
    _GEMM_CONFIGS = _configs([64, 128, 128, 64], [128, 128, 64, 64], [(4, 3), (8, 3), (8, 3), (4, 4)])


# --------------------------------------------------------------------------- index helpers
@triton.jit
def _patch_col_offsets(offs_k, s_c, s_t, s_h, s_w,
                       PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
    """Offset of element ``k = (c, a, i, j)`` (conv-weight order) inside a patch."""
    c = offs_k // (PT * PH * PW)
    r = offs_k % (PT * PH * PW)
    a = r // (PH * PW)
    r = r % (PH * PW)
    i = r // PW
    j = r % PW
    return c * s_c + a * s_t + i * s_h + j * s_w


@triton.jit
def _token_row_offsets(offs_m, L, E, s_b, s_l):
    """Offset of patch token ``m = b*L + l`` in a (B, E+L, D) sequence (int64)."""
    b = offs_m // L
    l = offs_m % L
    return b.to(tl.int64) * s_b + (E + l).to(tl.int64) * s_l


# --------------------------------------------------------------------------- forward
@triton.autotune(configs=_GEMM_CONFIGS, key=["D", "K"])
@triton.jit
def _patchify_embed_fwd_kernel(
    x_ptr, w_ptr, b_ptr, pre_ptr, pos_ptr, out_ptr,
    M, L, E, BE, D, K, Gh, Gw,
    sx_b, sx_c, sx_t, sx_h, sx_w,
    sw_n, sw_c, sw_t, sw_h, sw_w,
    spre_b, spre_l, spre_d,
    spos_b, spos_l, spos_d,
    so_b, so_l, so_d,
    PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_PREFIX: tl.constexpr, HAS_POS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_gemm = tl.cdiv(M, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D
    if pid_m < n_gemm:
        # ---- patch tokens: gathered GEMM + bias + pos_embed
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        row_x = patch_row_offsets(offs_m, L, Gh, Gw, sx_b, sx_t, sx_h, sx_w, PT, PH, PW)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            col_x = _patch_col_offsets(offs_k, sx_c, sx_t, sx_h, sx_w, PT, PH, PW)
            col_w = _patch_col_offsets(offs_k, sw_c, sw_t, sw_h, sw_w, PT, PH, PW)
            a = tl.load(x_ptr + row_x[:, None] + col_x[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptr + offs_n[None, :] * sw_n + col_w[:, None],
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        if HAS_POS:
            row_p = _token_row_offsets(offs_m, L, E, spos_b, spos_l)
            acc += tl.load(pos_ptr + row_p[:, None] + offs_n[None, :] * spos_d,
                           mask=mask, other=0.0).to(tl.float32)
        row_o = _token_row_offsets(offs_m, L, E, so_b, so_l)
        tl.store(out_ptr + row_o[:, None] + offs_n[None, :] * so_d,
                 acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # ---- prefix tokens: copy (+ their pos_embed rows); only launched when E > 0
        offs_r = (pid_m - n_gemm) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (offs_r < BE)[:, None] & mask_n[None, :]
        b = (offs_r // E).to(tl.int64)
        e = (offs_r % E).to(tl.int64)
        v = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_PREFIX:
            v += tl.load(pre_ptr + (b * spre_b + e * spre_l)[:, None] + offs_n[None, :] * spre_d,
                         mask=mask, other=0.0).to(tl.float32)
        if HAS_POS:
            v += tl.load(pos_ptr + (b * spos_b + e * spos_l)[:, None] + offs_n[None, :] * spos_d,
                         mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + (b * so_b + e * so_l)[:, None] + offs_n[None, :] * so_d,
                 v.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- backward: image
@triton.autotune(configs=_GEMM_CONFIGS, key=["D", "K"])
@triton.jit
def _patchify_embed_dx_kernel(
    g_ptr, w_ptr, dx_ptr,
    M, L, E, D, K, Gh, Gw,
    sg_b, sg_l, sg_d,
    sw_n, sw_c, sw_t, sw_h, sw_w,
    sd_b, sd_c, sd_t, sd_h, sd_w,
    PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx[patch m, k] = sum_n dtokens[m, n] * W[n, k]; BLOCK_K tiles the output columns,
    BLOCK_N is the reduction block over D."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    row_g = _token_row_offsets(offs_m, L, E, sg_b, sg_l)
    col_w = _patch_col_offsets(offs_k, sw_c, sw_t, sw_h, sw_w, PT, PH, PW)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, D, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < D
        g = tl.load(g_ptr + row_g[:, None] + offs_n[None, :] * sg_d,
                    mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * sw_n + col_w[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(g.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    row_d = patch_row_offsets(offs_m, L, Gh, Gw, sd_b, sd_t, sd_h, sd_w, PT, PH, PW)
    col_d = _patch_col_offsets(offs_k, sd_c, sd_t, sd_h, sd_w, PT, PH, PW)
    tl.store(dx_ptr + row_d[:, None] + col_d[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])


# --------------------------------------------------------------------------- backward: weight, bias
@triton.jit
def _patchify_embed_dw_kernel(
    g_ptr, x_ptr, dw_ptr, db_ptr,
    M, L, E, D, K, Gh, Gw, blocks_per_split,
    sg_b, sg_l, sg_d,
    sx_b, sx_c, sx_t, sx_h, sx_w,
    PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Split ``s`` of dW[n, k] = sum_m dtokens[m, n] * patch[m, k] (fp32 partial) and, from
    the ``pid_k == 0`` programs, of dbias[n] = sum_m dtokens[m, n]."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    col_x = _patch_col_offsets(offs_k, sx_c, sx_t, sx_h, sx_w, PT, PH, PW)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    mb_start = pid_s * blocks_per_split
    mb_end = tl.minimum(mb_start + blocks_per_split, tl.cdiv(M, BLOCK_M))
    for mb in range(mb_start, mb_end):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        row_g = _token_row_offsets(offs_m, L, E, sg_b, sg_l)
        gt = tl.load(g_ptr + offs_n[:, None] * sg_d + row_g[None, :],
                     mask=mask_n[:, None] & mask_m[None, :], other=0.0)
        row_x = patch_row_offsets(offs_m, L, Gh, Gw, sx_b, sx_t, sx_h, sx_w, PT, PH, PW)
        a = tl.load(x_ptr + row_x[:, None] + col_x[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(gt.to(a.dtype), a, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            if pid_k == 0:
                db += tl.sum(gt.to(tl.float32), axis=1)
    base = pid_s.to(tl.int64) * D * K
    tl.store(dw_ptr + base + offs_n[:, None] * K + offs_k[None, :], acc,
             mask=mask_n[:, None] & mask_k[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(db_ptr + pid_s.to(tl.int64) * D + offs_n, db, mask=mask_n)


# --------------------------------------------------------------------------- launchers
def _block_k(K: int) -> int:
    if K <= 16:
        return 16
    return 32 if (_INTERPRET or K <= 32) else 64


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact fp32 products on the GPU too (TF32 would lose ~3 digits).
    return "ieee" if dtype == torch.float32 else "tf32"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: still exercise the split-M reduction


def _as_5d(t: torch.Tensor):
    """Strides (b, c, t, h, w) of a 4-D or 5-D tensor; a 2-D image has T = 1, stride 0."""
    if t.dim() == 4:
        sb, sc, sh, sw = t.stride()
        return sb, sc, 0, sh, sw
    return t.stride()


def _geometry(x: torch.Tensor, weight: torch.Tensor):
    patch = tuple(weight.shape[2:])
    grid = tuple(s // p for s, p in zip(x.shape[2:], patch))
    if len(patch) == 2:
        patch, grid = (1,) + patch, (1,) + grid
    return patch, grid


def _check(x, weight):
    if x.dtype not in _SUPPORTED or weight.dtype != x.dtype:
        raise TypeError(
            f"patchify_embed kernel: x and weight must share one of float16/bfloat16/float32; "
            f"got {x.dtype} and {weight.dtype}"
        )


def _out_dtype(x, prefix, pos_embed):
    dt = x.dtype
    for t in (prefix, pos_embed):
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    return dt


@on_inputs_device
def patchify_embed_forward(x, weight, bias=None, prefix=None, pos_embed=None):
    """``cat([prefix, conv(x, weight, bias, stride=patch).flatten(2).mT], 1) + pos_embed``.

    x ``(B, C, H, W)`` / ``(B, C, T, H, W)``, weight ``(D, C, p1, p2)`` / ``(D, C, t, p1, p2)``,
    bias ``(D,)``, prefix ``(B or 1, E, D)``, pos_embed ``(B or 1, E + L, D)``; any strides.
    Returns a contiguous ``(B, E + L, D)`` in ``promote(x, prefix, pos_embed)`` dtype.
    """
    _check(x, weight)
    (PT, PH, PW), (Gt, Gh, Gw) = _geometry(x, weight)
    B = x.shape[0]
    D = weight.shape[0]
    K = weight[0].numel()
    L = Gt * Gh * Gw
    E = prefix.shape[1] if prefix is not None else 0
    bias = bias.contiguous() if bias is not None else None  # the kernel reads bias at unit stride
    out = empty(B, E + L, D, dtype=_out_dtype(x, prefix, pos_embed), device=x.device)
    if out.numel() == 0:
        return out
    M = B * L
    dummy = out
    spre = (0 if prefix.shape[0] == 1 else prefix.stride(0), prefix.stride(1), prefix.stride(2)) \
        if prefix is not None else (0, 0, 0)
    spos = (0 if pos_embed.shape[0] == 1 else pos_embed.stride(0), pos_embed.stride(1), pos_embed.stride(2)) \
        if pos_embed is not None else (0, 0, 0)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) + triton.cdiv(B * E, meta["BLOCK_M"]),
                triton.cdiv(D, meta["BLOCK_N"]))

    launch(_patchify_embed_fwd_kernel, grid,
        x, weight, bias if bias is not None else dummy,
        prefix if prefix is not None else dummy, pos_embed if pos_embed is not None else dummy, out,
        M, L, E, B * E, D, K, Gh, Gw,
        *_as_5d(x), weight.stride(0), *_as_5d(weight)[1:],
        *spre, *spos, *out.stride(),
        PT=PT, PH=PH, PW=PW,
        HAS_BIAS=bias is not None, HAS_PREFIX=prefix is not None, HAS_POS=pos_embed is not None,
        DOT_PRECISION=_dot_precision(x.dtype), BLOCK_K=_block_k(K),
    )
    return out


@on_inputs_device
def patchify_embed_backward(grad, x, weight, extras=0, need_x=True, need_weight=True, need_bias=True):
    """Gradients of the patch part of :func:`patchify_embed_forward`.

    grad ``(B, E + L, D)`` (any dtype and strides; rows ``< extras`` are ignored).
    Returns ``(dx, dweight, dbias)`` shaped like x, weight and ``(D,)`` in x's dtype; an
    entry that was not asked for is an empty ``(0,)`` tensor.
    """
    _check(x, weight)
    (PT, PH, PW), (Gt, Gh, Gw) = _geometry(x, weight)
    B = x.shape[0]
    D = weight.shape[0]
    K = weight[0].numel()
    L = Gt * Gh * Gw
    E = int(extras)
    M = B * L
    dev = x.device
    # outputs not asked for: distinct empty tensors (custom-op outputs must not alias)
    dx, dw, db = (torch.empty(0, dtype=x.dtype, device=dev) for _ in range(3))
    prec = _dot_precision(x.dtype)
    sg = grad.stride()

    if need_x:
        dx = empty(*x.shape, dtype=x.dtype, device=dev)
        if dx.numel():
            BK = _block_k(K)

            def grid(meta):
                return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, BK))

            launch(_patchify_embed_dx_kernel, grid,
                grad, weight, dx,
                M, L, E, D, K, Gh, Gw,
                *sg, weight.stride(0), *_as_5d(weight)[1:], *_as_5d(dx),
                PT=PT, PH=PH, PW=PW, DOT_PRECISION=prec, BLOCK_K=BK,
            )

    if need_bias and not need_weight:  # frozen weight: a plain column sum is all that is left
        db = grad[:, E:].sum(dim=(0, 1), dtype=torch.float32).to(x.dtype)
        need_bias = False
    if need_weight or need_bias:
        if M == 0:
            dw_full = torch.zeros(D, K, dtype=torch.float32, device=dev)
            db_full = torch.zeros(D, dtype=torch.float32, device=dev)
        else:
            BM, BN = (32, 32) if _INTERPRET else (64, 64)
            BK = _block_k(K)
            tiles = triton.cdiv(D, BN) * triton.cdiv(K, BK)
            n_mblocks = triton.cdiv(M, BM)
            splits = max(1, min(n_mblocks, triton.cdiv(4 * _num_sms(dev), tiles)))
            per = triton.cdiv(n_mblocks, splits)
            splits = triton.cdiv(n_mblocks, per)
            dw_part = empty(splits, D, K, dtype=torch.float32, device=dev)
            db_part = empty(splits, D, dtype=torch.float32, device=dev) if need_bias else dw_part
            _patchify_embed_dw_kernel[(triton.cdiv(D, BN), triton.cdiv(K, BK), splits)](
                grad, x, dw_part, db_part,
                M, L, E, D, K, Gh, Gw, per,
                *sg, *_as_5d(x),
                PT=PT, PH=PH, PW=PW, HAS_BIAS=bool(need_bias), DOT_PRECISION=prec,
                BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=4,
            )
            dw_full = dw_part.sum(0) if splits > 1 else dw_part[0]
            db_full = (db_part.sum(0) if splits > 1 else db_part[0]) if need_bias else None
        if need_weight:
            dw = dw_full.to(weight.dtype).reshape(weight.shape)
        if need_bias:
            db = db_full.to(x.dtype)
    return dx, dw, db
