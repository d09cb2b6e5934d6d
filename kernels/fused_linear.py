"""GEMMs with fused epilogues for the linears of a transformer block (qkv, proj, fc1, fc2).

``out = residual + gate * act(x @ weight.T + bias)`` in one kernel, and the GEMMs of its backward
with the activation's derivative, the gate and the bias gradient fused in. ``weight`` is read in
place in nn.Linear's ``(N, K)`` layout (no transpose copy). Kernels:

* forward (:func:`fused_linear_forward`): persistent programs (one or a few per SM) walk the
  ``(BLOCK_M, BLOCK_N)`` output tiles in grouped order (``GROUP_M`` row tiles share their column
  tiles, for L2 reuse). The K loop accumulates in fp32; the epilogue adds the bias, optionally
  stores the pre-activation, applies the activation, multiplies by the gate row
  ``gate[m // gate_rows]`` and adds the residual, then stores once. The x and weight tiles are read
  through tensor descriptors (TMA) on sm_90 when the operands allow it (16-byte aligned base and
  row strides, unit column stride), through masked pointer loads otherwise (sm_80, the
  interpreter, strided views): a constexpr ``USE_TMA`` chosen by the launcher.
* backward, input (:func:`fused_linear_backward_input`): ``dx = (grad * gate) @ weight``; the gate
  scales the grad tile in the prologue, and the epilogue multiplies by ``act'(preact_input)`` when
  asked: fc2's input gradient lands directly as the gradient of fc1's pre-activation. Like the
  weight gradient, it reads its grad and weight (x) tiles through tensor descriptors on sm_90 when
  the operands allow it, through pointers otherwise.
* backward, weight (:func:`fused_linear_backward_weight`): ``dweight = (grad * gate).T @ x``; the
  programs of the first column tile also sum their (gated) grad tiles into ``dbias``. The long
  reduction over ``M = B*L`` rows is split in parts when the output tiles alone do not fill the
  GPU: fp32 partials, added in a fixed order afterwards (deterministic, no atomics).
* backward, gate (:func:`fused_linear_backward_gate`): ``dgate[g] = sum over g's rows of
  grad * act(preact)``, one program per (gate row, column block), rows in a fixed order.
* :func:`activation_backward`: ``grad * act'(preact)``, elementwise.

Activations: ``None``, ``"gelu"`` (erf), ``"gelu_tanh"`` (tanh approximation, written as
``x * sigmoid(2u)``, which equals ``0.5 x (1 + tanh(u))``), ``"silu"``, ``"quick_gelu"``
(``x * sigmoid(1.702 x)``, OpenAI CLIP's). They are evaluated in fp32.

Every operand is addressed through its strides; row offsets are int64; all accumulation is fp32.
fp32 operands use ``input_precision="ieee"`` unless PyTorch allows TF32 matmuls (as F.linear).
Launch: ``triton.autotune`` over tile configs on the GPU (shared-memory pruning per GPU); under
``TRITON_INTERPRET=1`` one small config is pinned. This module never imports ``uvit_fast``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._precision import tf32_matmul_allowed
from ._utils import empty, launch, on_inputs_device
from ._utils import SMEM_LIMIT, SMEM_LIMIT_OTHER, SMEM_LIMIT_SM80  # noqa: F401 - read by tests
from ._utils import capability as _capability, smem_limit as _smem_limit

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip() == "1"

ACTIVATIONS = (None, "gelu", "gelu_tanh", "silu", "quick_gelu")
_ACT_CODE = {None: 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "quick_gelu": 4}

INTERPRET_PROGRAMS = 3  # persistent programs under the interpreter (an odd count: programs share tiles unevenly)



# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
def _set_desc_blocks(nargs):
    """Autotune pre-hook: a config's tile sizes become the tensor descriptors' block shapes (the x
    and weight tiles of the K loop; the output, pre-activation and residual tiles of the epilogue)."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    epi = [bm, bn // (4 if nargs.get("EPI_QUARTERS") else 2)]  # the epilogue runs in column halves (quarters)
    for name, block in (("X", [bm, bk]), ("W", [bn, bk]), ("OUT", epi), ("PRE", epi), ("RES", epi)):
        if isinstance(nargs.get(name), TensorDescriptor):
            nargs[name].block_shape = block


def _set_bwd_input_blocks(nargs):
    """Pre-hook of the input gradient: grad tiles ``[BM, BK]``, weight tiles ``[BK, BN]``."""
    if isinstance(nargs.get("DY"), TensorDescriptor):
        nargs["DY"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        nargs["W"].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_N"]]


def _set_bwd_weight_blocks(nargs):
    """Pre-hook of the weight gradient: grad tiles ``[BK, BM]`` (used transposed), x tiles ``[BK, BN]``."""
    if isinstance(nargs.get("DY"), TensorDescriptor):
        nargs["DY"].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_M"]]
        nargs["X"].block_shape = [nargs["BLOCK_K"], nargs["BLOCK_N"]]


def _make_configs(shapes, hook=None):
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=4, num_stages=1,
                              pre_hook=hook)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s,
                      pre_hook=hook)
        for bm, bn, bk, w, s in shapes
    ]


# BLOCK_M, BLOCK_N, BLOCK_K, warps, stages. The forward's U-ViT-H/2 shapes: K 1152 (qkv, proj, fc1) or
# 4608 (fc2), N 1152-4608, M = B*258: the large tiles first; the 64-row ones for small M (sampling
# with a small batch, CLIP's 77 tokens).
_FWD_SHAPES = [
    (128, 256, 64, 8, 3),
    (128, 256, 64, 8, 4),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
]
# the backward GEMMs (one program per tile): the configs of kernels/skip_concat_linear.py, plus 128x128x64 in
# 3 stages (8 warps) for a float32 grad next to 16-bit operands, whose 4-stage pipeline no longer fits
_BWD_SHAPES = [
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 128, 64, 8, 3),  # fits with float32 grad tiles and a gate (autocast's float32 residual stream)
    (128, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 128, 32, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 32, 32, 4, 5),
    (32, 64, 32, 4, 5),
]
_FWD_CONFIGS = _make_configs(_FWD_SHAPES, hook=_set_desc_blocks)
_BWD_INPUT_CONFIGS = _make_configs(_BWD_SHAPES, hook=_set_bwd_input_blocks)
_BWD_WEIGHT_CONFIGS = _make_configs(_BWD_SHAPES, hook=_set_bwd_weight_blocks)


def _smem_bytes(config, elem_size: int, tma_epilogue: bool = False, gate_tiles: bool = False, *, b_elem=None,
                out_elem=None, gate_elem=None) -> int:
    """Shared memory of a config: ``stages`` buffers of an A tile (``elem_size`` bytes per element)
    and a B tile (``b_elem``, default ``elem_size``), and of a gate tile of A's shape (``gate_elem``)
    when the backward pipelines one alongside A, plus, for the forward's TMA epilogue, the staging
    buffer of one ``(BLOCK_M, BLOCK_N / 2)`` output half (Triton's allocation compiled for sm_90:
    144 KiB + 32 KiB for 128x256x64 in 3 stages, bf16), or of one ``(BLOCK_M, BLOCK_N / 4)`` quarter
    when the output is wider than x (``out_elem``: a float32 output under bf16 autocast, whose
    epilogue runs in quarters; the same 32 KiB). The backward's A tiles are float32 when the grad is
    (the float32 residual stream's)."""
    k = config.kwargs
    b_elem = elem_size if b_elem is None else b_elem
    a_bytes = k["BLOCK_M"] * elem_size
    if gate_tiles:
        a_bytes += k["BLOCK_M"] * (elem_size if gate_elem is None else gate_elem)
    smem = config.num_stages * (a_bytes + k["BLOCK_N"] * b_elem) * k["BLOCK_K"]
    if tma_epilogue:
        out_elem = elem_size if out_elem is None else out_elem
        smem += k["BLOCK_M"] * (k["BLOCK_N"] // (4 if out_elem > elem_size else 2)) * out_elem
    return smem


def _elem(named_args, *names) -> int:
    """Element size of the first of ``names`` that is a tensor or a tensor descriptor (its base)."""
    for name in names:
        v = named_args.get(name)
        v = v.base if isinstance(v, TensorDescriptor) else v
        if isinstance(v, torch.Tensor):
            return v.element_size()
    return next(v for v in named_args.values() if isinstance(v, torch.Tensor)).element_size()


def _prune(configs, named_args, tma_epilogue: bool, gate_tiles: bool, heavy: bool, sizes=None):
    """Drop configs over the GPU's shared-memory limit for the operands' element sizes (fp32 doubles
    a buffer; ``sizes``: :func:`_smem_bytes`'s keyword element sizes). Before Hopper (mma.sync), and
    for ``heavy`` variants (a gate or an activation applied through pointer loads), the configs
    whose fp32 accumulator takes 128 or more registers per thread are dropped too: they spill
    (sm_80, as the skip-linear GEMMs; sm_90: 16-1000 B per thread at 128x256, 256x128 and 128x128
    with 4 warps for the gated or act' backward GEMMs). Keeps at least the smallest config."""
    t = next(v for v in named_args.values() if isinstance(v, (torch.Tensor, TensorDescriptor)))
    cap = _capability(t.base if isinstance(t, TensorDescriptor) else t)
    sizes = dict(sizes or {})
    elem = sizes.pop("a_elem", None) or _elem(named_args, "X", "DY")

    def smem(c):
        return _smem_bytes(c, elem, tma_epilogue, gate_tiles, **sizes)

    kept = [c for c in configs if smem(c) <= _smem_limit(cap)]
    if (cap is not None and cap[0] < 9) or heavy:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 128 * 32 * c.num_warps]
    return kept or [min(configs, key=smem)]


def _prune_fwd(configs, named_args, **kwargs):
    """The forward: the TMA epilogue's staging buffer counts; on the pointer path an epilogue beyond
    the bias (activation, gate, residual) makes the variant heavy. The TMA forward compiled for
    sm_90 spills nothing at any config (bf16, U-ViT-H/2 and DiT-XL/2 shapes)."""
    tma = bool(kwargs.get("USE_TMA", False))
    heavy = not tma and bool(kwargs.get("ACTIVATION", 0) or kwargs.get("HAS_GATE") or kwargs.get("HAS_RES"))
    sizes = {"a_elem": _elem(named_args, "X"), "b_elem": _elem(named_args, "W", "X"),
             "out_elem": _elem(named_args, "OUT", "X")}
    return _prune(configs, named_args, tma_epilogue=tma, gate_tiles=False, heavy=heavy, sizes=sizes)


def _prune_bwd(configs, named_args, **kwargs):
    """The backward GEMMs: a gate tile is pipelined alongside each grad tile; gate or act' is heavy."""
    gate = bool(kwargs.get("HAS_GATE", False))
    # with TMA tiles too (sm_90): still 24-152 B spilled per thread at the 128-register configs
    heavy = gate or bool(kwargs.get("ACT_INPUT"))
    sizes = {"a_elem": _elem(named_args, "DY"), "b_elem": _elem(named_args, "W", "X", "DY"),
             "gate_elem": _elem(named_args, "GATE", "DY")}
    kept = _prune(configs, named_args, tma_epilogue=False, gate_tiles=gate, heavy=heavy, sizes=sizes)
    if "X" in named_args and sizes["a_elem"] > sizes["b_elem"]:
        # the weight gradient of a float32 grad (the float32 residual stream) next to 16-bit x: its
        # grad tile, used transposed and summed into dbias, is held in fp32; compiled for sm_90 the
        # configs with 64 or more of its registers per thread spilled (128x128x64 with 4 warps: 216 B;
        # 128x64x64 with a gate: 56 B)
        kept = [c for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] < 128 * 16 * c.num_warps] or kept[-1:]
    return kept


_PRUNE_FWD = {"early_config_prune": _prune_fwd}
_PRUNE_BWD = {"early_config_prune": _prune_bwd}


# --------------------------------------------------------------------------------------------
# activations (fp32)
# --------------------------------------------------------------------------------------------
# constants written out inside the jit functions (module-level tl.constexpr globals fail under the
# interpreter): 0.7071067811865476 = 1/sqrt(2), 0.3989422804014327 = 1/sqrt(2 pi),
# 0.7978845608028654 = sqrt(2/pi), 0.044715 (the tanh form's cubic term), 1.702 (quick_gelu)


@triton.jit
def _act(x, ACTIVATION: tl.constexpr):
    """``act(x)`` for the activation code (0 none, 1 gelu, 2 gelu_tanh, 3 silu, 4 quick_gelu)."""
    if ACTIVATION == 1:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACTIVATION == 2:
        # 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
        return x * tl.sigmoid(2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x))
    elif ACTIVATION == 3:
        return x * tl.sigmoid(x)
    elif ACTIVATION == 4:
        return x * tl.sigmoid(1.702 * x)
    else:
        return x


@triton.jit
def _act_grad(x, ACTIVATION: tl.constexpr):
    """``act'(x)``."""
    if ACTIVATION == 1:
        return 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACTIVATION == 2:
        s = tl.sigmoid(2.0 * 0.7978845608028654 * (x + 0.044715 * x * x * x))
        return s + x * s * (1.0 - s) * (2.0 * 0.7978845608028654) * (1.0 + 3.0 * 0.044715 * x * x)
    elif ACTIVATION == 3:
        s = tl.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    elif ACTIVATION == 4:
        s = tl.sigmoid(1.702 * x)
        return s + 1.702 * x * s * (1.0 - s)
    else:
        return tl.full(x.shape, 1.0, tl.float32)


@triton.jit
def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped tile order (GROUP_M row tiles share their column tiles) for L2 reuse."""
    width = GROUP_M * num_pid_n
    group_id = tile // width
    first_m = group_id * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % width) % group_size
    pid_n = (tile % width) // group_size
    return pid_m, pid_n


# --------------------------------------------------------------------------------------------
# forward: out[M, N] = residual + gate[m // gate_rows] * act(x @ weight.T + bias)
# --------------------------------------------------------------------------------------------
@triton.autotune(configs=_FWD_CONFIGS, key=["M_BUCKET", "N", "K", "ACTIVATION", "HAS_GATE", "HAS_RES", "STORE_PRE",
                                          "USE_TMA", "Y_ROUND", "EPI_QUARTERS"], prune_configs_by=_PRUNE_FWD)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _fused_linear_fwd_kernel(
    X,
    W,
    BIAS,
    RES,
    GATE,
    OUT,
    PRE,
    M,
    N,
    K,
    M_BUCKET,
    gate_rows,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_b,
    stride_rm,
    stride_rn,
    stride_gg,
    stride_gn,
    stride_om,
    stride_on,
    stride_pm,
    stride_pn,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_RES: tl.constexpr,
    STORE_PRE: tl.constexpr,
    USE_TMA: tl.constexpr,
    Y_ROUND: tl.constexpr,
    EPI_QUARTERS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """With ``USE_TMA`` X, W, OUT, PRE and RES are tensor descriptors (TMA loads of the K loop's tiles,
    TMA loads/stores of the epilogue's; out-of-bounds elements load as zeros and are not stored),
    else pointers with masked loads and stores (the ``stride_*`` arguments). RES and GATE are read in
    their own dtypes and OUT written in its own (wider than x's under autocast with a float32
    residual stream); ``Y_ROUND`` (0, or 1 / 2 for float16 / bfloat16) rounds ``act(...)`` to the
    linear's dtype before the gate and residual, as eager's ``residual + gate * y`` sees a 16-bit y."""
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
        if USE_TMA:
            for ks in range(0, k_steps):
                a = X.load([pid_m * BLOCK_M, ks * BLOCK_K])
                b = W.load([pid_n * BLOCK_N, ks * BLOCK_K])
                acc = tl.dot(a, b.T, acc, input_precision=INPUT_PRECISION)
        else:
            a_ptrs = X + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
            b_ptrs = W + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn  # b[k, n] = weight[n, k]
            for ks in range(0, k_steps):
                if EVEN_K:
                    a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
                    b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
                else:
                    mask_k = offs_k < K - ks * BLOCK_K
                    a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                    b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
                a_ptrs += BLOCK_K * stride_xk
                b_ptrs += BLOCK_K * stride_wk

        # the epilogue in two column halves (BLOCK_M, BLOCK_N // 2): half the registers live at a time
        # (the whole tile's epilogue spilled at 128x256 compiled for sm_90); in quarters when the
        # output is wider than x (a float32 residual stream: its float32 residual and output tiles
        # take twice the registers; in halves, DiT's fc2 with a bf16 gate spilled 8 B at 128x256)
        halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        acc0, acc1 = tl.split(halves)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        if EPI_QUARTERS:
            acc00, acc01 = tl.split(tl.permute(tl.reshape(acc0, (BLOCK_M, 2, BLOCK_N // 4)), (0, 2, 1)))
            acc10, acc11 = tl.split(tl.permute(tl.reshape(acc1, (BLOCK_M, 2, BLOCK_N // 4)), (0, 2, 1)))
            _epilogue(acc00, m0, n0, offs_m, mask_m, BIAS, RES, GATE, OUT, PRE, N, gate_rows, stride_b,
                      stride_rm, stride_rn, stride_gg, stride_gn, stride_om, stride_on, stride_pm, stride_pn,
                      HAS_BIAS, ACTIVATION, HAS_GATE, HAS_RES, STORE_PRE, USE_TMA, Y_ROUND, BLOCK_N // 4)
            _epilogue(acc01, m0, n0 + BLOCK_N // 4, offs_m, mask_m, BIAS, RES, GATE, OUT, PRE, N, gate_rows, stride_b,
                      stride_rm, stride_rn, stride_gg, stride_gn, stride_om, stride_on, stride_pm, stride_pn,
                      HAS_BIAS, ACTIVATION, HAS_GATE, HAS_RES, STORE_PRE, USE_TMA, Y_ROUND, BLOCK_N // 4)
            _epilogue(acc10, m0, n0 + BLOCK_N // 2, offs_m, mask_m, BIAS, RES, GATE, OUT, PRE, N, gate_rows, stride_b,
                      stride_rm, stride_rn, stride_gg, stride_gn, stride_om, stride_on, stride_pm, stride_pn,
                      HAS_BIAS, ACTIVATION, HAS_GATE, HAS_RES, STORE_PRE, USE_TMA, Y_ROUND, BLOCK_N // 4)
            _epilogue(acc11, m0, n0 + 3 * (BLOCK_N // 4), offs_m, mask_m, BIAS, RES, GATE, OUT, PRE, N, gate_rows, stride_b,
                      stride_rm, stride_rn, stride_gg, stride_gn, stride_om, stride_on, stride_pm, stride_pn,
                      HAS_BIAS, ACTIVATION, HAS_GATE, HAS_RES, STORE_PRE, USE_TMA, Y_ROUND, BLOCK_N // 4)
        else:
            _epilogue(acc0, m0, n0, offs_m, mask_m, BIAS, RES, GATE, OUT, PRE, N, gate_rows, stride_b,
                      stride_rm, stride_rn, stride_gg, stride_gn, stride_om, stride_on, stride_pm, stride_pn,
                      HAS_BIAS, ACTIVATION, HAS_GATE, HAS_RES, STORE_PRE, USE_TMA, Y_ROUND, BLOCK_N // 2)
            _epilogue(acc1, m0, n0 + BLOCK_N // 2, offs_m, mask_m, BIAS, RES, GATE, OUT, PRE, N, gate_rows,
                      stride_b, stride_rm, stride_rn, stride_gg, stride_gn, stride_om, stride_on, stride_pm,
                      stride_pn, HAS_BIAS, ACTIVATION, HAS_GATE, HAS_RES, STORE_PRE, USE_TMA, Y_ROUND, BLOCK_N // 2)


@triton.jit
def _epilogue(acc, m0, n0, offs_m, mask_m, BIAS, RES, GATE, OUT, PRE, N, gate_rows, stride_b, stride_rm, stride_rn,
              stride_gg, stride_gn, stride_om, stride_on, stride_pm, stride_pn,
              HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr,
              STORE_PRE: tl.constexpr, USE_TMA: tl.constexpr, Y_ROUND: tl.constexpr, EPI_N: tl.constexpr):
    """The forward's epilogue on the ``(BLOCK_M, EPI_N)`` fp32 tile at ``(m0, n0)``: bias, the
    pre-activation's store, activation (rounded to the linear's dtype when ``Y_ROUND``), gate (row m
    uses ``gate[m // gate_rows]``), residual, and the store (TMA descriptors or masked pointers, as
    the K loop). The gate and residual are converted to fp32 from whatever dtype they have."""
    offs_n = n0.to(tl.int64) + tl.arange(0, EPI_N)
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n * stride_b, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if STORE_PRE:
        if USE_TMA:
            PRE.store([m0, n0], acc.to(PRE.dtype))
        else:
            tl.store(PRE + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn,
                     acc.to(PRE.dtype.element_ty), mask=mask)
    acc = _act(acc, ACTIVATION)
    if Y_ROUND == 1:
        acc = acc.to(tl.float16).to(tl.float32)
    elif Y_ROUND == 2:
        acc = acc.to(tl.bfloat16).to(tl.float32)
    if HAS_GATE:
        g_rows = offs_m // gate_rows
        g = tl.load(GATE + g_rows[:, None] * stride_gg + offs_n[None, :] * stride_gn, mask=mask, other=0.0)
        acc = acc * g.to(tl.float32)
    if USE_TMA:
        if HAS_RES:
            acc += RES.load([m0, n0]).to(tl.float32)
        OUT.store([m0, n0], acc.to(OUT.dtype))
    else:
        if HAS_RES:
            r = tl.load(RES + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0)
            acc += r.to(tl.float32)
        tl.store(OUT + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 acc.to(OUT.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# backward, input: dx[M, K] = ((grad * gate) @ weight) * act'(preact_input)
# --------------------------------------------------------------------------------------------
@triton.autotune(configs=_BWD_INPUT_CONFIGS, key=["M_BUCKET", "N", "K", "HAS_GATE", "ACT_INPUT", "USE_TMA"],
                 prune_configs_by=_PRUNE_BWD)
@triton.heuristics({"EVEN_R": lambda args: args["N"] % args["BLOCK_K"] == 0})
@triton.jit
def _fused_linear_bwd_input_kernel(
    DY,
    W,
    GATE,
    PRE_IN,
    DX,
    M,
    N,
    K,
    M_BUCKET,
    gate_rows,
    stride_dym,
    stride_dyn,
    stride_wn,
    stride_wk,
    stride_gg,
    stride_gn,
    stride_pm,
    stride_pk,
    stride_dxm,
    stride_dxk,
    HAS_GATE: tl.constexpr,
    ACT_INPUT: tl.constexpr,
    USE_TMA: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_R: tl.constexpr,
):
    # output tile (BLOCK_M rows of dx, BLOCK_N columns of K); the reduction runs over N in BLOCK_K steps.
    # With USE_TMA, DY and W are tensor descriptors (zero padding past N and M: no masks on the tiles)
    pid = tl.program_id(0)
    pid_m, pid_n = _tile_coords(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_c = offs_c < K
    if not USE_TMA:
        a_ptrs = DY + offs_m[:, None] * stride_dym + offs_r[None, :] * stride_dyn
        b_ptrs = W + offs_r[:, None] * stride_wn + offs_c[None, :] * stride_wk  # b[r, c] = weight[r, c]
    g_ptrs = GATE + (offs_m // gate_rows)[:, None] * stride_gg + offs_r[None, :] * stride_gn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(0, N, BLOCK_K):
        if EVEN_R:
            mask_a = mask_m[:, None]
            mask_b = mask_c[None, :]
        else:
            mask_r = offs_r < N - r
            mask_a = mask_m[:, None] & mask_r[None, :]
            mask_b = mask_r[:, None] & mask_c[None, :]
        if USE_TMA:
            a = DY.load([pid_m * BLOCK_M, r])
            b = W.load([r, pid_n * BLOCK_N])
        else:
            a = tl.load(a_ptrs, mask=mask_a, other=0.0)
            b = tl.load(b_ptrs, mask=mask_b, other=0.0)
        # the grad tile (any dtype: float32 under autocast's float32 residual stream) times the gate in
        # fp32, rounded to the weight's dtype as eager rounds the gradient of its 16-bit y
        if HAS_GATE:
            g = tl.load(g_ptrs, mask=mask_a, other=0.0)
            a = (a.to(tl.float32) * g.to(tl.float32)).to(b.dtype)
        else:
            a = a.to(b.dtype)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if not USE_TMA:
            a_ptrs += BLOCK_K * stride_dyn
            b_ptrs += BLOCK_K * stride_wn
        g_ptrs += BLOCK_K * stride_gn
    if ACT_INPUT != 0:
        # act' in two column halves: the whole tile's GELU' spilled ~1000 B/thread at 128 accumulator
        # registers per thread compiled for sm_90
        acc0, acc1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
        c0 = pid_n.to(tl.int64) * BLOCK_N
        _bwd_input_epilogue(acc0, offs_m, mask_m, c0, PRE_IN, DX, K, stride_pm, stride_pk, stride_dxm, stride_dxk,
                            ACT_INPUT, BLOCK_N // 2)
        _bwd_input_epilogue(acc1, offs_m, mask_m, c0 + BLOCK_N // 2, PRE_IN, DX, K, stride_pm, stride_pk, stride_dxm,
                            stride_dxk, ACT_INPUT, BLOCK_N // 2)
    else:
        tl.store(DX + offs_m[:, None] * stride_dxm + offs_c[None, :] * stride_dxk, acc.to(DX.dtype.element_ty),
                 mask=mask_m[:, None] & mask_c[None, :])


@triton.jit
def _bwd_input_epilogue(acc, offs_m, mask_m, c0, PRE_IN, DX, K, stride_pm, stride_pk, stride_dxm, stride_dxk,
                        ACT_INPUT: tl.constexpr, EPI_N: tl.constexpr):
    """``dx[:, c0:c0 + EPI_N] = acc * act'(preact_input)`` for one column part of the tile."""
    offs_c = c0 + tl.arange(0, EPI_N)
    mask = mask_m[:, None] & (offs_c < K)[None, :]
    z = tl.load(PRE_IN + offs_m[:, None] * stride_pm + offs_c[None, :] * stride_pk, mask=mask, other=0.0)
    acc = acc * _act_grad(z.to(tl.float32), ACT_INPUT)
    tl.store(DX + offs_m[:, None] * stride_dxm + offs_c[None, :] * stride_dxk, acc.to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# backward, weight: dW[N, K] = (grad * gate)^T @ x; dbias[N] = sum_m grad * gate
# --------------------------------------------------------------------------------------------
@triton.autotune(configs=_BWD_WEIGHT_CONFIGS, key=["M_BUCKET", "N", "K", "HAS_GATE", "HAS_DBIAS", "USE_TMA"],
                 prune_configs_by=_PRUNE_BWD)
@triton.heuristics({"EVEN_R": lambda args: args["M"] % args["BLOCK_K"] == 0 and args["chunk"] % args["BLOCK_K"] == 0})
@triton.jit
def _fused_linear_bwd_weight_kernel(
    DY,
    X,
    GATE,
    DW,
    DB,
    M,
    N,
    K,
    M_BUCKET,
    chunk,
    gate_rows,
    stride_dym,
    stride_dyn,
    stride_xm,
    stride_xk,
    stride_gg,
    stride_gn,
    stride_dwn,
    stride_dwk,
    stride_dws,
    stride_dbs,
    HAS_GATE: tl.constexpr,
    HAS_DBIAS: tl.constexpr,
    USE_TMA: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_R: tl.constexpr,
):
    pid = tl.program_id(0)
    # split of the reduction over M: rows [split * chunk, min(M, (split + 1) * chunk)); with more
    # than one split DW/DB are fp32 workspaces (splits, N, K) / (splits, N), summed afterwards
    split = tl.program_id(1)
    row0 = split.to(tl.int64) * chunk
    rows = tl.minimum(M - row0, chunk)
    DW = DW + split.to(tl.int64) * stride_dws
    DB = DB + split.to(tl.int64) * stride_dbs
    # tile rows run over the N output features, tile columns over K; the reduction over the M rows
    pid_r, pid_c = _tile_coords(pid, tl.cdiv(N, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)
    offs_n = pid_r.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = row0 + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_c = offs_c < K
    if not USE_TMA:
        a_ptrs = DY + offs_n[:, None] * stride_dyn + offs_m[None, :] * stride_dym  # a[n, m] = grad[m, n]
        b_ptrs = X + offs_m[:, None] * stride_xm + offs_c[None, :] * stride_xk
    sum_dy = (pid_c == 0) & HAS_DBIAS  # the first column tile also reduces its grad tiles into dbias
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    col_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    # With USE_TMA, DY and X are tensor descriptors over all M rows: a part's tiles stop at its end
    # because the launcher makes every part but the last a whole number of BLOCK_K steps (rows past
    # M load as zeros)
    for r in range(0, rows, BLOCK_K):
        if EVEN_R:
            mask_a = mask_n[:, None]
            mask_b = mask_c[None, :]
        else:
            mask_r = tl.arange(0, BLOCK_K) < rows - r
            mask_a = mask_n[:, None] & mask_r[None, :]
            mask_b = mask_r[:, None] & mask_c[None, :]
        if USE_TMA:
            m0 = (row0 + r).to(tl.int32)
            a = DY.load([m0, pid_r * BLOCK_M]).T  # [BK, BM] tile of grad, used as a[n, m]
            b = X.load([m0, pid_c * BLOCK_N])
        else:
            a = tl.load(a_ptrs, mask=mask_a, other=0.0)
            b = tl.load(b_ptrs, mask=mask_b, other=0.0)
        if HAS_GATE:
            g_ptrs = GATE + ((offs_m + r) // gate_rows)[None, :] * stride_gg + offs_n[:, None] * stride_gn
            g = tl.load(g_ptrs, mask=mask_a, other=0.0)
            a32 = a.to(tl.float32) * g.to(tl.float32)
            a = a32.to(b.dtype)
        else:
            a32 = a.to(tl.float32)
            a = a.to(b.dtype)  # a no-op unless grad is wider (float32) than x
        # grad (any dtype) * gate is rounded to x's dtype, as eager's gradient of its 16-bit y; dbias sums
        # the unrounded fp32 values
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if sum_dy:
            col_sum += tl.sum(a32, axis=1)
        if not USE_TMA:
            a_ptrs += BLOCK_K * stride_dym
            b_ptrs += BLOCK_K * stride_xm
    if sum_dy:
        tl.store(DB + offs_n, col_sum.to(DB.dtype.element_ty), mask=mask_n)
    tl.store(DW + offs_n[:, None] * stride_dwn + offs_c[None, :] * stride_dwk,
             acc.to(DW.dtype.element_ty), mask=mask_n[:, None] & mask_c[None, :])


@triton.jit
def _sum_splits_kernel(WS, OUT, n, splits, BLOCK: tl.constexpr):
    """``OUT[i] = sum_s WS[s, i]`` over the fp32 partials, added in split order (0, 1, ...): the same
    bits on every run (no atomics)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ws = WS + offs  # advanced by n per split (64-bit pointers: splits * n may pass 2**31)
    for _ in range(0, splits):
        acc += tl.load(ws, mask=mask, other=0.0)
        ws += n
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# backward, gate: dgate[g, n] = sum over rows m of group g of grad[m, n] * act(preact[m, n])
# --------------------------------------------------------------------------------------------
@triton.jit
def _fused_linear_bwd_gate_kernel(
    DY,
    PRE,
    DG,
    M,
    N,
    gate_rows,
    stride_dym,
    stride_dyn,
    stride_pm,
    stride_pn,
    stride_dgg,
    stride_dgn,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    g = tl.program_id(0)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    row0 = g.to(tl.int64) * gate_rows
    end = tl.minimum(row0 + gate_rows, M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(0, gate_rows, BLOCK_M):
        offs_m = row0 + r + tl.arange(0, BLOCK_M)
        mask = (offs_m < end)[:, None] & mask_n[None, :]
        dy = tl.load(DY + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn, mask=mask, other=0.0)
        z = tl.load(PRE + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn, mask=mask, other=0.0)
        acc += dy.to(tl.float32) * _act(z.to(tl.float32), ACTIVATION)
    tl.store(DG + g.to(tl.int64) * stride_dgg + offs_n * stride_dgn, tl.sum(acc, axis=0).to(DG.dtype.element_ty),
             mask=mask_n)


# --------------------------------------------------------------------------------------------
# activation backward: grad * act'(preact), elementwise
# --------------------------------------------------------------------------------------------
@triton.jit
def _activation_bwd_kernel(
    DY,
    PRE,
    DX,
    M,
    N,
    stride_dym,
    stride_dyn,
    stride_pm,
    stride_pn,
    stride_dxm,
    stride_dxn,
    ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    dy = tl.load(DY + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn, mask=mask, other=0.0)
    z = tl.load(PRE + offs_m[:, None] * stride_pm + offs_n[None, :] * stride_pn, mask=mask, other=0.0)
    dx = dy.to(tl.float32) * _act_grad(z.to(tl.float32), ACTIVATION)
    tl.store(DX + offs_m[:, None] * stride_dxm + offs_n[None, :] * stride_dxn, dx.to(DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _input_precision(dtype: torch.dtype) -> str:
    """``"ieee"`` for fp32 unless PyTorch allows TF32 matmuls (then ``"tf32"``, as cuBLAS would)."""
    if dtype == torch.float32 and not _INTERPRET and tf32_matmul_allowed():
        return "tf32"
    return "ieee"


def m_bucket(M: int) -> int:
    """The autotune key for the row count: ``M`` rounded up to a power of two."""
    return triton.next_power_of_2(max(1, M))


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRET_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _act_code(activation) -> int:
    if activation not in _ACT_CODE:
        raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}")
    return _ACT_CODE[activation]


def _shape_text(t) -> str:
    return "None" if t is None else str(tuple(t.shape))


def _check_matrix(name: str, t, rows=None, cols=None, dtype=None, device=None) -> None:
    """``t`` is a 2-D floating tensor of ``(rows, cols)`` (None: any) with ``dtype`` on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor; got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D; got shape {_shape_text(t)}")
    if (rows is not None and t.shape[0] != rows) or (cols is not None and t.shape[1] != cols):
        want = f"({'*' if rows is None else rows}, {'*' if cols is None else cols})"
        raise ValueError(f"{name} must have shape {want}; got {_shape_text(t)}")
    _check_dtype_device(name, t, dtype, device)


def _check_dtype_device(name: str, t, dtype, device) -> None:
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}; got {t.dtype}")
    if dtype is None and t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{name} must be float16, bfloat16 or float32; got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def _check_float_dtype(name: str, dtype) -> torch.dtype:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{name} must be torch.float16, torch.bfloat16 or torch.float32; got {dtype}")
    return dtype


def _check_gate(gate, gate_rows: int, M: int, N: int, dtype, device) -> None:
    if gate is None:
        return
    if int(gate_rows) < 1:
        raise ValueError(f"gate_rows must be >= 1; got {gate_rows}")
    _check_matrix("gate", gate, cols=N, dtype=dtype, device=device)
    if gate.shape[0] * gate_rows != M:
        raise ValueError(f"gate of shape {_shape_text(gate)} with gate_rows={gate_rows} covers "
                         f"{gate.shape[0] * gate_rows} rows; the GEMM has M={M}")


def _tma_ok(t: torch.Tensor) -> bool:
    """Whether a 2-D operand can be read through a TMA descriptor: 16-byte aligned base and row
    stride, unit column stride, and a row of at least 16 bytes."""
    e = t.element_size()
    return (t.stride(1) == 1 and (t.stride(0) * e) % 16 == 0 and t.data_ptr() % 16 == 0
            and t.shape[1] * e >= 16 and t.shape[0] > 0)


def use_tma(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, residual=None) -> bool:
    """The forward reads and writes its tiles through tensor descriptors: on sm_90 (Hopper's TMA units)
    when every 2-D operand allows it (:func:`_tma_ok`: x, weight, out and the residual); pointers on
    sm_80, the interpreter and other layouts (e.g. a strided view, or rows of ``N * elem`` bytes not a
    multiple of 16)."""
    return _tma_operands(x, weight, out, residual)


def _tma_operands(*tensors) -> bool:
    """On sm_90, every given 2-D operand can be read through a descriptor (:func:`_tma_ok`)."""
    cap = _capability(tensors[0])
    if cap is None or cap[0] != 9:
        return False
    return all(_tma_ok(t) for t in tensors if t is not None)


def _descriptor(t: torch.Tensor) -> TensorDescriptor:
    """A TMA descriptor over a 2-D operand; its block shape is a placeholder that each autotune
    config's pre-hook sets to the config's tiles."""
    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [16, 16])


def _programs_per_sm(meta, elem_size: int) -> int:
    """Persistent programs per SM for a config, from its tiles alone (the grid function sees the
    kernel's arguments, not the config's warps and stages): one for tiles of 128x128 and more (their
    pipelines take 128-224 KiB of shared memory compiled for sm_90, and 8-warp ones fill the register
    file) and for fp32 operands; two for the smaller 16-bit tiles (at most 104 KiB each)."""
    if meta["BLOCK_M"] * meta["BLOCK_N"] >= 128 * 128 or elem_size >= 4:
        return 1
    return 2


def out_dtype_of(dtype: torch.dtype, residual=None, gate=None) -> torch.dtype:
    """The forward's output dtype for a linear in ``dtype``: ``promote(dtype, gate, residual)``, as
    eager's ``residual + gate * y`` (float32 for a float32 residual stream under 16-bit autocast)."""
    for t in (residual, gate):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


_Y_ROUND = {torch.float16: 1, torch.bfloat16: 2}


@on_inputs_device
def fused_linear_forward(x, weight, bias=None, *, activation=None, residual=None, gate=None, gate_rows=1,
                         store_preact=False, out_dtype=None, _use_tma=None):
    """``out = residual + gate[m // gate_rows] * act(x @ weight.T + bias)`` in one GEMM.

    ``x (M, K)`` any strides; ``weight (N, K)``; ``bias (N,)``; ``residual (M, N)``; ``gate (G, N)``
    with ``G * gate_rows == M``. The residual and the gate may be float16, bfloat16 or float32
    whatever x's dtype (under autocast: a float32 residual stream, a float32 or 16-bit gate); they
    are read in their own dtypes and the epilogue runs in fp32. Returns ``(out, preact)``:
    ``out (M, N)`` contiguous in ``out_dtype``, ``preact = x @ weight.T + bias`` (M, N) in x's dtype
    when ``store_preact``, else an empty ``(0,)`` tensor.

    ``out_dtype`` (default :func:`out_dtype_of`: x's dtype when the residual and gate have it) is
    x's dtype or float32, never narrower than ``promote(x, residual, gate)``. When it is wider than
    x's dtype, ``act(x @ weight.T + bias)`` is rounded to x's dtype before the gate and residual, the
    rounding point of eager's 16-bit ``y`` in ``residual + gate * y``. ``_use_tma`` overrides
    :func:`use_tma` (tests)."""
    _check_matrix("x", x)
    M, K = x.shape
    dev, dt = x.device, x.dtype
    _check_matrix("weight", weight, cols=K, dtype=dt, device=dev)
    N = weight.shape[0]
    code = _act_code(activation)
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != N:
            raise ValueError(f"bias must have shape ({N},); got {_shape_text(bias)}")
        _check_dtype_device("bias", bias, dt, dev)
    if residual is not None:
        _check_matrix("residual", residual, rows=M, cols=N, device=dev)
    _check_gate(gate, gate_rows, M, N, None, dev)
    odt = _check_out_dtype(out_dtype, dt, residual, gate)
    out = empty(M, N, dtype=odt, device=dev)
    pre = empty(M, N, dtype=dt, device=dev) if store_preact else empty(0, dtype=dt, device=dev)
    y_round = _Y_ROUND.get(dt, 0) if odt != dt else 0
    if M == 0 or N == 0:
        return out, pre
    if K == 0:  # no reduction: act(bias) broadcast
        z = torch.zeros(M, N, dtype=torch.float32, device=dev) + (0 if bias is None else bias.float())
        if store_preact:
            pre.copy_(z)
        h = _act_torch(z, activation)
        h = h.to(dt).float() if y_round else h
        h = h * (gate.float().repeat_interleave(gate_rows, 0) if gate is not None else 1)
        out.copy_(h + (residual.float() if residual is not None else 0))
        return out, pre
    tma = use_tma(x, weight, out, residual) if _use_tma is None else bool(_use_tma)
    if tma:
        x_arg, w_arg, out_arg = _descriptor(x), _descriptor(weight), _descriptor(out)
        pre_arg = _descriptor(pre) if store_preact else out_arg
        res_arg = _descriptor(residual) if residual is not None else out_arg
    else:
        x_arg, w_arg, out_arg = x, weight, out
        pre_arg = pre if store_preact else out
        res_arg = residual if residual is not None else out
    sms = _sm_count(dev)
    elem = x.element_size()

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(tiles, sms * _programs_per_sm(meta, elem)),)

    launch(_fused_linear_fwd_kernel, grid,
        x_arg, w_arg,
        bias if bias is not None else out,
        res_arg,
        gate if gate is not None else out,
        out_arg, pre_arg,
        M, N, K, m_bucket(M), int(gate_rows),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        bias.stride(0) if bias is not None else 0,
        residual.stride(0) if residual is not None else 0, residual.stride(1) if residual is not None else 0,
        gate.stride(0) if gate is not None else 0, gate.stride(1) if gate is not None else 0,
        out.stride(0), out.stride(1),
        pre.stride(0) if store_preact else 0, pre.stride(1) if store_preact else 0,
        HAS_BIAS=bias is not None, ACTIVATION=code, HAS_GATE=gate is not None, HAS_RES=residual is not None,
        STORE_PRE=bool(store_preact), USE_TMA=tma, Y_ROUND=y_round, EPI_QUARTERS=odt != dt,
        INPUT_PRECISION=_input_precision(dt),
    )
    return out, pre


def _check_out_dtype(out_dtype, dtype, residual, gate) -> torch.dtype:
    """``out_dtype`` (None: :func:`out_dtype_of`) is x's dtype or float32 and holds the residual and
    the gate without narrowing them."""
    want = out_dtype_of(dtype, residual, gate)
    if out_dtype is None:
        return want
    if out_dtype not in (dtype, torch.float32) or torch.promote_types(out_dtype, want) != out_dtype:
        raise TypeError(
            f"out_dtype must be x's dtype ({dtype}) or torch.float32, at least promote(x, residual, gate) = {want}; "
            f"got {out_dtype} (residual {None if residual is None else residual.dtype}, "
            f"gate {None if gate is None else gate.dtype})")
    return out_dtype


def _act_torch(z: torch.Tensor, activation) -> torch.Tensor:
    """``act(z)`` in plain PyTorch (the forward's degenerate K == 0 case: no GEMM to fuse into)."""
    if activation is None:
        return z
    if activation == "gelu":
        return torch.nn.functional.gelu(z)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(z, approximate="tanh")
    if activation == "silu":
        return torch.nn.functional.silu(z)
    return z * torch.sigmoid(1.702 * z)


@on_inputs_device
def fused_linear_backward_input(grad, weight, *, gate=None, gate_rows=1, act_input=None, preact_input=None,
                                _use_tma=None):
    """``dx (M, K) = ((grad * gate[m // gate_rows]) @ weight) * act_input'(preact_input)`` (the last
    factor only when ``act_input`` is given; ``preact_input (M, K)`` in weight's dtype). Output in
    weight's dtype (the linear's). ``grad`` and ``gate`` may be wider (float32 under autocast with a
    float32 residual stream): ``grad * gate`` is formed in fp32 and rounded to weight's dtype before
    the dot, as eager rounds the gradient of its 16-bit ``y``. grad and weight are read through TMA
    descriptors on sm_90 when they allow it (``_use_tma`` overrides)."""
    _check_matrix("grad", grad)
    M, N = grad.shape
    dev = grad.device
    _check_matrix("weight", weight, rows=N, device=dev)
    dt = weight.dtype
    K = weight.shape[1]
    _check_gate(gate, gate_rows, M, N, None, dev)
    code = _act_code(act_input)
    if code != 0:
        if preact_input is None:
            raise ValueError(f"act_input={act_input!r} needs preact_input of shape ({M}, {K})")
        _check_matrix("preact_input", preact_input, rows=M, cols=K, dtype=dt, device=dev)
    dx = empty(M, K, dtype=dt, device=dev)
    if M == 0 or K == 0:
        return dx
    if N == 0:
        return dx.zero_()
    tma = _tma_operands(grad, weight) if _use_tma is None else bool(_use_tma)
    grad_arg, w_arg = (_descriptor(grad), _descriptor(weight)) if tma else (grad, weight)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)  # noqa: E731
    launch(_fused_linear_bwd_input_kernel, grid,
        grad_arg, w_arg, gate if gate is not None else grad, preact_input if code != 0 else grad, dx,
        M, N, K, m_bucket(M), int(gate_rows),
        grad.stride(0), grad.stride(1), weight.stride(0), weight.stride(1),
        gate.stride(0) if gate is not None else 0, gate.stride(1) if gate is not None else 0,
        preact_input.stride(0) if code != 0 else 0, preact_input.stride(1) if code != 0 else 0,
        dx.stride(0), dx.stride(1),
        HAS_GATE=gate is not None, ACT_INPUT=code, USE_TMA=tma, INPUT_PRECISION=_input_precision(dt),
    )
    return dx


SPLIT_WAVES = 4  # aim for this many waves of weight-gradient programs
MAX_SPLITS = 8
MIN_SPLIT_ROWS = 1024  # each split reduces at least this many rows (16 steps of BLOCK_K=64)
SPLIT_ROW_ALIGN = 256  # split boundaries on multiples of every BLOCK_K


def weight_grad_splits(M: int, N: int, K: int, num_sms: int) -> int:
    """How many parts the weight gradient's reduction over ``M`` rows is split into: enough for
    ``SPLIT_WAVES`` waves of programs on ``num_sms`` SMs when the ``(N, K)`` output alone gives fewer
    (counted in 128x128 tiles), at most ``MAX_SPLITS``, each part at least ``MIN_SPLIT_ROWS`` rows.
    A function of the shapes and the GPU only, so a run is repeatable."""
    tiles = triton.cdiv(N, 128) * triton.cdiv(K, 128)
    splits = min(MAX_SPLITS, triton.cdiv(SPLIT_WAVES * num_sms, tiles), max(1, M // MIN_SPLIT_ROWS))
    return max(1, splits)


@on_inputs_device
def fused_linear_backward_weight(grad, x, *, gate=None, gate_rows=1, compute_bias=True, splits=None, _use_tma=None):
    """``dweight (N, K) = (grad * gate).T @ x`` and ``dbias (N,)`` = column sums of ``grad * gate``
    (an empty ``(0,)`` tensor when not ``compute_bias``), in x's dtype. ``grad`` and ``gate`` may be
    wider than x (float32): ``grad * gate`` is formed in fp32, rounded to x's dtype for the dot (as
    eager's 16-bit gradient) and summed unrounded into ``dbias``.

    The reduction over the ``M`` rows is split into ``splits`` parts (default
    :func:`weight_grad_splits`): each part writes fp32 partial sums into a workspace, then one pass
    adds them in a fixed order (deterministic, no atomics) and casts. ``splits`` pins the count.
    grad and x are read through TMA descriptors on sm_90 when they allow it (``_use_tma`` overrides)."""
    _check_matrix("grad", grad)
    M, N = grad.shape
    dev = grad.device
    _check_matrix("x", x, rows=M, device=dev)
    dt = x.dtype
    K = x.shape[1]
    _check_gate(gate, gate_rows, M, N, None, dev)
    dw = empty(N, K, dtype=dt, device=dev)
    db = empty(N if compute_bias else 0, dtype=dt, device=dev)
    if N == 0:
        return dw, db
    if M == 0 or K == 0:
        dw.zero_()
        if compute_bias:
            g = grad.float() if gate is None else grad.float() * gate.float().repeat_interleave(gate_rows, 0)
            db.copy_(g.sum(0))
        return dw, db
    if splits is None:
        splits = weight_grad_splits(M, N, K, _sm_count(dev) if dev.type == "cuda" else 1)
    splits = max(1, min(int(splits), M))
    tma = _tma_operands(grad, x) if _use_tma is None else bool(_use_tma)
    chunk = triton.cdiv(M, splits)
    if splits > 1 and (tma or not _INTERPRET):  # descriptor tiles must not cross a part's end
        chunk = triton.cdiv(chunk, SPLIT_ROW_ALIGN) * SPLIT_ROW_ALIGN
    splits = triton.cdiv(M, chunk)
    if splits > 1:
        dw_out = empty(splits, N, K, dtype=torch.float32, device=dev)
        db_out = empty(splits, N if compute_bias else 1, dtype=torch.float32, device=dev)
    else:
        dw_out, db_out = dw, (db if compute_bias else dw)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]), splits)  # noqa: E731
    grad_arg, x_arg = (_descriptor(grad), _descriptor(x)) if tma else (grad, x)
    launch(_fused_linear_bwd_weight_kernel, grid,
        grad_arg, x_arg, gate if gate is not None else grad, dw_out, db_out,
        M, N, K, m_bucket(M), chunk, int(gate_rows),
        grad.stride(0), grad.stride(1), x.stride(0), x.stride(1),
        gate.stride(0) if gate is not None else 0, gate.stride(1) if gate is not None else 0,
        dw_out.stride(-2), dw_out.stride(-1),
        dw_out.stride(0) if splits > 1 else 0, db_out.stride(0) if splits > 1 else 0,
        HAS_GATE=gate is not None, HAS_DBIAS=bool(compute_bias), USE_TMA=tma, INPUT_PRECISION=_input_precision(dt),
    )
    if splits > 1:
        for ws, out in ((dw_out, dw), (db_out, db)):
            if out.numel():
                block = 1024
                _sum_splits_kernel[(triton.cdiv(out.numel(), block),)](ws, out, out.numel(), splits, BLOCK=block)
    return dw, db


GATE_BLOCK_M = 16
GATE_BLOCK_N = 128


@on_inputs_device
def fused_linear_backward_gate(grad, preact, *, activation=None, gate_rows, num_gates, out_dtype=None):
    """``dgate (num_gates, N)``: ``dgate[g, n] = sum over m with m // gate_rows == g of
    grad[m, n] * act(preact[m, n])``, fp32 sums in a fixed row order, output in ``out_dtype``
    (default grad's dtype; the op passes the gate's). grad and preact may differ in dtype (a float32
    grad of the residual stream, a 16-bit pre-activation)."""
    _check_matrix("grad", grad)
    M, N = grad.shape
    dev = grad.device
    dt = grad.dtype if out_dtype is None else _check_float_dtype("out_dtype", out_dtype)
    _check_matrix("preact", preact, rows=M, cols=N, device=dev)
    code = _act_code(activation)
    if int(gate_rows) < 1 or int(num_gates) < 0 or int(num_gates) * int(gate_rows) != M:
        raise ValueError(f"num_gates={num_gates} x gate_rows={gate_rows} must equal the rows of grad "
                         f"{_shape_text(grad)}")
    dg = empty(int(num_gates), N, dtype=dt, device=dev)
    if num_gates == 0 or N == 0:
        return dg
    block_m = min(GATE_BLOCK_M, triton.next_power_of_2(int(gate_rows)))
    _fused_linear_bwd_gate_kernel[(int(num_gates), triton.cdiv(N, GATE_BLOCK_N))](
        grad, preact, dg, M, N, int(gate_rows),
        grad.stride(0), grad.stride(1), preact.stride(0), preact.stride(1), dg.stride(0), dg.stride(1),
        ACTIVATION=code, BLOCK_M=block_m, BLOCK_N=GATE_BLOCK_N,
    )
    return dg


ACT_BLOCK_M = 8
ACT_BLOCK_N = 256


@on_inputs_device
def activation_backward(grad, preact, activation, *, out_dtype=None):
    """``grad * act'(preact)`` (both ``(M, N)``, any strides, each in its own dtype), one elementwise
    pass in fp32; output contiguous in ``out_dtype`` (default grad's dtype; the op passes the
    pre-activation's, the linear's, as eager's gradient of its 16-bit pre-activation)."""
    _check_matrix("grad", grad)
    M, N = grad.shape
    _check_matrix("preact", preact, rows=M, cols=N, device=grad.device)
    code = _act_code(activation)
    odt = grad.dtype if out_dtype is None else _check_float_dtype("out_dtype", out_dtype)
    dx = empty(M, N, dtype=odt, device=grad.device)
    if M == 0 or N == 0:
        return dx
    _activation_bwd_kernel[(triton.cdiv(M, ACT_BLOCK_M), triton.cdiv(N, ACT_BLOCK_N))](
        grad, preact, dx, M, N,
        grad.stride(0), grad.stride(1), preact.stride(0), preact.stride(1), dx.stride(0), dx.stride(1),
        ACTIVATION=code, BLOCK_M=ACT_BLOCK_M, BLOCK_N=ACT_BLOCK_N,
    )
    return dx


__all__ = [
    "ACTIVATIONS",
    "fused_linear_forward",
    "fused_linear_backward_input",
    "fused_linear_backward_weight",
    "fused_linear_backward_gate",
    "activation_backward",
    "out_dtype_of",
    "use_tma",
    "weight_grad_splits",
]
