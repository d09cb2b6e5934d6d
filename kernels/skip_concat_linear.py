"""U-ViT's long-skip ``Linear(cat([h, skip], -1))`` without the concat.

``y = h @ W1^T + skip @ W2^T + b`` with ``W1 = weight[:, :D]`` and ``W2 = weight[:, D:]`` read in
place from the unchanged ``(N, 2D)`` weight (no copy, no concat). Three tiled GEMM kernels:

* forward: one program per ``(BLOCK_M, BLOCK_N)`` tile of ``y``; the K loop runs over ``h``
  (against ``W1``) and then over ``skip`` (against ``W2``) into one fp32 accumulator; bias is added
  in the epilogue.
* backward, inputs: ``[dh | dskip] = dy @ W`` as one GEMM over ``2 * cdiv(D, BLOCK_N)`` column tiles;
  a tile of the first half is stored into ``dh``, of the second half into ``dskip`` (two separate
  outputs, no ``(M, 2D)`` buffer, no tile straddles the two halves).
* backward, weight: ``dW = dy^T @ [h | skip]`` with the same column-tile split: tiles of the first half
  read ``h`` and write ``dW[:, :D]``, those of the second read ``skip`` and write ``dW[:, D:]``. The
  programs of the first column tile also sum their ``dy`` tiles into ``dbias`` (fp32), so ``dy`` is
  not read a second time for the bias gradient.

Every operand is addressed through its strides (row and column), so strided views -- e.g. a
``(B, L, D)`` slice of a larger buffer -- are read in place; leading dims are flattened with
``reshape``, which is a view whenever the strides allow it (otherwise one copy). Row offsets are
int64. All accumulation is fp32. fp32 operands use ``input_precision="ieee"`` unless PyTorch allows
TF32 for matmuls (``torch.backends.cuda.matmul.fp32_precision``, or the legacy ``allow_tf32``),
matching ``F.linear``.

Launch: ``triton.autotune`` over a list of tile configs on the GPU (key: M, N, D and the dtypes);
under ``TRITON_INTERPRET=1`` a single small config is pinned, because the interpreter would run every
config.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._utils import empty, launch, on_inputs_device
from ._utils import SMEM_LIMIT, SMEM_LIMIT_OTHER, SMEM_LIMIT_SM80  # noqa: F401 - read by tests
from ._utils import capability as _capability, smem_limit as _smem_limit
from ._precision import tf32_matmul_allowed

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip() == "1"


def _configs():
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=4, num_stages=1)]
    shapes = [
        # BLOCK_M, BLOCK_N, BLOCK_K, warps, stages
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 128, 32, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 32, 32, 4, 5),
        (32, 64, 32, 4, 5),  # 4 warps: with 2 the input-gradient kernel spills (16 B, sm_90)
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in shapes
    ]


_CONFIGS = _configs()


def _smem_bytes(config, elem_size: int) -> int:
    """Shared memory of a config's pipeline: ``stages`` buffers of an A and a B tile. It matches
    what Triton allocates compiled for sm_90 (e.g. 147456 B for 128x256x64 in 3 stages, bf16)."""
    k = config.kwargs
    return config.num_stages * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * elem_size


def _prune_smem(configs, named_args, **kwargs):
    """Drop configs over the GPU's shared-memory limit for the operands' element size: fp32 (TF32
    or exact) doubles every buffer, so on an H100 128x256x64 in 3 stages and the 128x128x64
    4-stage configs need 256-288 KiB and would only fail to compile. Before Hopper (mma.sync) the
    configs whose fp32 accumulator takes 128 or more registers per thread (128x256 with 8 warps,
    128x128 with 4) are dropped too: compiled for sm_80 in fp16 they spill (16-272 B per thread at
    255 registers). Keeps at least the smallest config."""
    t = next(v for v in named_args.values() if isinstance(v, torch.Tensor))
    cap = _capability(t)
    elem = t.element_size()
    kept = [c for c in configs if _smem_bytes(c, elem) <= _smem_limit(cap)]
    if cap is not None and cap[0] < 9:  # mma.sync
        kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 128 * 32 * c.num_warps]
    return kept or [min(configs, key=lambda c: _smem_bytes(c, elem))]


_PRUNE = {"early_config_prune": _prune_smem}


@triton.jit
def _tile_coords(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped tile order (GROUP_M row tiles share their column tiles) for L2 reuse."""
    width = GROUP_M * num_pid_n
    group_id = pid // width
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size
    return pid_m, pid_n


@triton.jit
def _mma_loop(
    acc,
    A,
    stride_am,
    stride_ak,
    offs_m,
    mask_m,
    B,
    stride_bk,
    stride_bn,
    offs_n,
    mask_n,
    K,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    sum_a,
    INPUT_PRECISION: tl.constexpr,
):
    """``acc += A[offs_m, :K] @ B[:K, offs_n]``; when ``sum_a`` (a constexpr or a runtime flag that is
    uniform over the program) it also returns ``sum_k A[offs_m, k]`` in fp32, else zeros.

    ``offs_m``/``offs_n`` are int64 row/column indices; masked elements load as 0.
    """
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    a_step = BLOCK_K * stride_ak
    b_step = BLOCK_K * stride_bk
    row_sum = tl.zeros((acc.shape[0],), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        else:
            mask_k = offs_k < K - k
            a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if sum_a:
            row_sum += tl.sum(a.to(tl.float32), axis=1)
        a_ptrs += a_step
        b_ptrs += b_step
    return acc, row_sum


# --------------------------------------------------------------------------------------------
# forward: y[M, N] = h[M, D] @ weight[:, :D]^T + skip[M, D] @ weight[:, D:]^T + bias
# --------------------------------------------------------------------------------------------
@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "D"], prune_configs_by=_PRUNE)
@triton.heuristics({"EVEN_K": lambda args: args["D"] % args["BLOCK_K"] == 0})
@triton.jit
def _skip_concat_linear_fwd_kernel(
    H,
    S,
    W,
    BIAS,
    Y,
    M,
    N,
    D,
    M_BUCKET,
    stride_hm,
    stride_hk,
    stride_sm,
    stride_sk,
    stride_wn,
    stride_wk,
    stride_ym,
    stride_yn,
    stride_b,
    HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_coords(pid, num_pid_m, num_pid_n, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # K over h against W1 = weight[:, :D]: b[k, n] = weight[n, k]
    acc, _ = _mma_loop(acc, H, stride_hm, stride_hk, offs_m, mask_m,
                       W, stride_wk, stride_wn, offs_n, mask_n, D,
                       BLOCK_K, EVEN_K, False, INPUT_PRECISION)
    # K over skip against W2 = weight[:, D:]: b[k, n] = weight[n, D + k]
    acc, _ = _mma_loop(acc, S, stride_sm, stride_sk, offs_m, mask_m,
                       W + D * stride_wk, stride_wk, stride_wn, offs_n, mask_n, D,
                       BLOCK_K, EVEN_K, False, INPUT_PRECISION)
    if HAS_BIAS:
        b = tl.load(BIAS + offs_n * stride_b, mask=mask_n, other=0.0)
        acc += b.to(tl.float32)[None, :]
    y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# --------------------------------------------------------------------------------------------
# backward, inputs: [dh | dskip][M, 2D] = dy[M, N] @ weight[N, 2D], stored as two outputs
# --------------------------------------------------------------------------------------------
@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "D"], prune_configs_by=_PRUNE)
@triton.heuristics({"EVEN_K": lambda args: args["N"] % args["BLOCK_K"] == 0})
@triton.jit
def _skip_concat_linear_bwd_input_kernel(
    DY,
    W,
    DH,
    DS,
    M,
    N,
    D,
    M_BUCKET,
    stride_dym,
    stride_dyn,
    stride_wn,
    stride_wk,
    stride_dhm,
    stride_dhk,
    stride_dsm,
    stride_dsk,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    tiles_per_half = tl.cdiv(D, BLOCK_N)
    pid_m, pid_n = _tile_coords(pid, num_pid_m, 2 * tiles_per_half, GROUP_M)
    half = pid_n // tiles_per_half  # 0: columns of dh, 1: columns of dskip
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = (pid_n - half * tiles_per_half).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_d = offs_d < D

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # b[k, j] = weight[k, half * D + j]
    w_half = W + (half * D).to(tl.int64) * stride_wk
    acc, _ = _mma_loop(acc, DY, stride_dym, stride_dyn, offs_m, mask_m,
                       w_half, stride_wn, stride_wk, offs_d, mask_d, N,
                       BLOCK_K, EVEN_K, False, INPUT_PRECISION)
    mask = mask_m[:, None] & mask_d[None, :]
    if half == 0:
        tl.store(DH + offs_m[:, None] * stride_dhm + offs_d[None, :] * stride_dhk,
                 acc.to(DH.dtype.element_ty), mask=mask)
    else:
        tl.store(DS + offs_m[:, None] * stride_dsm + offs_d[None, :] * stride_dsk,
                 acc.to(DS.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# backward, weight: dW[N, 2D] = dy[M, N]^T @ [h | skip][M, 2D]; dbias[N] = sum_m dy[m, :]
# --------------------------------------------------------------------------------------------
@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "D", "HAS_DBIAS"], prune_configs_by=_PRUNE)
@triton.heuristics({"EVEN_K": lambda args: args["M"] % args["BLOCK_K"] == 0 and args["chunk"] % args["BLOCK_K"] == 0})
@triton.jit
def _skip_concat_linear_bwd_weight_kernel(
    DY,
    H,
    S,
    DW,
    DB,
    M,
    N,
    D,
    M_BUCKET,
    chunk,
    stride_dym,
    stride_dyn,
    stride_hm,
    stride_hk,
    stride_sm,
    stride_sk,
    stride_dwn,
    stride_dwk,
    stride_dws,
    stride_dbs,
    HAS_DBIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    pid = tl.program_id(0)
    # split of the reduction over M: rows [split * chunk, min(M, (split + 1) * chunk)); with more
    # than one split, DW/DB are fp32 workspaces (splits, N, 2D) / (splits, N), summed afterwards
    split = tl.program_id(1)
    row0 = split.to(tl.int64) * chunk
    rows = tl.minimum(M - row0, chunk)
    DY = DY + row0 * stride_dym
    H = H + row0 * stride_hm
    S = S + row0 * stride_sm
    DW = DW + split.to(tl.int64) * stride_dws
    DB = DB + split.to(tl.int64) * stride_dbs
    num_pid_n_rows = tl.cdiv(N, BLOCK_M)  # tile rows run over the N output features
    tiles_per_half = tl.cdiv(D, BLOCK_N)
    pid_r, pid_c = _tile_coords(pid, num_pid_n_rows, 2 * tiles_per_half, GROUP_M)
    half = pid_c // tiles_per_half  # 0: dW[:, :D] from h, 1: dW[:, D:] from skip
    offs_r = pid_r.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = (pid_c - half * tiles_per_half).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = offs_r < N
    mask_d = offs_d < D

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # a[r, k] = dy[k, r] (K runs over the M rows); b[k, j] = x[k, j] with x = h or skip. One loop
    # for both halves (two loops, one per branch, doubled the shared memory of the pipeline: 288
    # KiB for 128x256x64 in 3 stages when no bias gradient was computed, compiled for sm_90).
    if half == 0:
        X = H
        stride_xm = stride_hm
        stride_xk = stride_hk
    else:
        X = S
        stride_xm = stride_sm
        stride_xk = stride_sk
    # the first column tile of dW also reduces its dy tiles into dbias
    sum_dy = (pid_c == 0) & HAS_DBIAS
    acc, row_sum = _mma_loop(acc, DY, stride_dyn, stride_dym, offs_r, mask_r,
                             X, stride_xm, stride_xk, offs_d, mask_d, rows,
                             BLOCK_K, EVEN_K, sum_dy, INPUT_PRECISION)
    if sum_dy:
        tl.store(DB + offs_r, row_sum.to(DB.dtype.element_ty), mask=mask_r)
    col = offs_d + half * D
    tl.store(DW + offs_r[:, None] * stride_dwn + col[None, :] * stride_dwk,
             acc.to(DW.dtype.element_ty), mask=mask_r[:, None] & mask_d[None, :])


@triton.jit
def _sum_splits_kernel(WS, OUT, n, splits, BLOCK: tl.constexpr):
    """``OUT[i] = sum_s WS[s, i]`` over the fp32 partials of the split weight gradient, added in
    split order (0, 1, ...): the same bits on every run (no atomics)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = WS + offs  # int64 offsets; stepping the pointer by n never forms splits * n in int32
    for _ in range(0, splits):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += n
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _input_precision(dtype: torch.dtype) -> str:
    """``"ieee"`` for fp32 unless PyTorch allows TF32 matmuls (then ``"tf32"``, as cuBLAS would)."""
    if dtype == torch.float32 and not _INTERPRET and tf32_matmul_allowed():
        return "tf32"
    return "ieee"


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``(..., K) -> (M, K)``: a view when the leading dims can be flattened by strides, else a copy."""
    return t.reshape(-1, t.shape[-1])


@on_inputs_device
def skip_concat_linear_forward(h, skip, weight, bias=None):
    """``cat([h, skip], -1) @ weight.T + bias`` without the concat. Returns ``(..., N)`` in h's dtype."""
    D = h.shape[-1]
    N = weight.shape[0]
    h2, s2 = _rows(h), _rows(skip)
    M = h2.shape[0]
    y = empty(M, N, dtype=h.dtype, device=h.device)
    if M > 0 and N > 0:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        launch(_skip_concat_linear_fwd_kernel, grid,
            h2, s2, weight, bias if bias is not None else y, y,
            M, N, D, m_bucket(M),
            h2.stride(0), h2.stride(1), s2.stride(0), s2.stride(1),
            weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
            bias.stride(0) if bias is not None else 0,
            HAS_BIAS=bias is not None,
            INPUT_PRECISION=_input_precision(h.dtype),
        )
    return y.view(*h.shape[:-1], N)


@on_inputs_device
def skip_concat_linear_backward_input(grad_out, weight):
    """``dh, dskip`` with ``[dh | dskip] = grad_out @ weight``, each ``(..., D)``, written directly."""
    N = weight.shape[0]
    D = weight.shape[1] // 2
    dy = _rows(grad_out)
    M = dy.shape[0]
    dh = empty(M, D, dtype=grad_out.dtype, device=grad_out.device)
    ds = empty(M, D, dtype=grad_out.dtype, device=grad_out.device)
    if M > 0 and D > 0:
        if N == 0:
            dh.zero_()
            ds.zero_()
        else:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * 2 * triton.cdiv(D, meta["BLOCK_N"]),)  # noqa: E731
            launch(_skip_concat_linear_bwd_input_kernel, grid,
                dy, weight, dh, ds,
                M, N, D, m_bucket(M),
                dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1),
                dh.stride(0), dh.stride(1), ds.stride(0), ds.stride(1),
                INPUT_PRECISION=_input_precision(grad_out.dtype),
            )
    lead = grad_out.shape[:-1]
    return dh.view(*lead, D), ds.view(*lead, D)


SPLIT_WAVES = 4  # aim for this many waves of weight-gradient programs
MAX_SPLITS = 8
MIN_SPLIT_ROWS = 1024  # each split reduces at least this many rows (16 steps of BLOCK_K=64)
SPLIT_ROW_ALIGN = 256  # split boundaries on multiples of every BLOCK_K


def weight_grad_splits(M: int, N: int, D: int, num_sms: int) -> int:
    """How many parts the weight gradient's reduction over ``M`` rows is split into: enough for
    ``SPLIT_WAVES`` waves of programs on ``num_sms`` SMs when the ``(N, 2D)`` output alone gives
    fewer (counted in 128x128 tiles), at most ``MAX_SPLITS``, each part at least
    ``MIN_SPLIT_ROWS`` rows. A function of the shapes and the GPU only, so a run is repeatable."""
    tiles = triton.cdiv(N, 128) * 2 * triton.cdiv(D, 128)
    splits = min(MAX_SPLITS, triton.cdiv(SPLIT_WAVES * num_sms, tiles), max(1, M // MIN_SPLIT_ROWS))
    return max(1, splits)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def m_bucket(M: int) -> int:
    """The autotune key for the row count: ``M`` rounded up to a power of two, so a new batch size
    (classifier-free guidance doubles it, the last partial batch) does not re-benchmark."""
    return triton.next_power_of_2(max(1, M))


@on_inputs_device
def skip_concat_linear_backward_weight(grad_out, h, skip, compute_bias=True, splits=None):
    """``dweight (N, 2D)`` (halves written in place, no concat) and ``dbias (N,)`` (fp32 sums;
    shape ``(0,)`` when ``compute_bias`` is False).

    The reduction over the ``M`` rows is split into ``splits`` parts (default
    :func:`weight_grad_splits`) when the output tiles alone do not fill the GPU: each part writes
    fp32 partial sums into a workspace, then one pass adds them in a fixed order (deterministic,
    no atomics) and casts. ``splits`` pins the count (tests)."""
    N = grad_out.shape[-1]
    D = h.shape[-1]
    dy, h2, s2 = _rows(grad_out), _rows(h), _rows(skip)
    M = dy.shape[0]
    dev = grad_out.device
    dw = empty(N, 2 * D, dtype=grad_out.dtype, device=dev)
    db = empty(N if compute_bias else 0, dtype=grad_out.dtype, device=dev)
    if N == 0:
        return dw, db
    if M == 0 or D == 0:
        dw.zero_()
        if compute_bias:
            db.copy_(dy.float().sum(0))
        return dw, db
    if splits is None:
        splits = weight_grad_splits(M, N, D, _sm_count(dev))
    splits = max(1, min(int(splits), M))
    chunk = triton.cdiv(M, splits)
    if splits > 1 and not _INTERPRET:
        chunk = triton.cdiv(chunk, SPLIT_ROW_ALIGN) * SPLIT_ROW_ALIGN
    splits = triton.cdiv(M, chunk)
    if splits > 1:
        dw_out = empty(splits, N, 2 * D, dtype=torch.float32, device=dev)
        db_out = empty(splits, N if compute_bias else 1, dtype=torch.float32, device=dev)
    else:
        dw_out, db_out = dw, (db if compute_bias else dw)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * 2 * triton.cdiv(D, meta["BLOCK_N"]), splits)  # noqa: E731
    launch(_skip_concat_linear_bwd_weight_kernel, grid,
        dy, h2, s2, dw_out, db_out,
        M, N, D, m_bucket(M), chunk,
        dy.stride(0), dy.stride(1), h2.stride(0), h2.stride(1), s2.stride(0), s2.stride(1),
        dw_out.stride(-2), dw_out.stride(-1),
        dw_out.stride(0) if splits > 1 else 0, db_out.stride(0) if splits > 1 else 0,
        HAS_DBIAS=compute_bias,
        INPUT_PRECISION=_input_precision(grad_out.dtype),
    )
    if splits > 1:
        for ws, out in ((dw_out, dw), (db_out, db)):
            if out.numel():
                block = 1024
                _sum_splits_kernel[(triton.cdiv(out.numel(), block),)](ws, out, out.numel(), splits, BLOCK=block)
    return dw, db
