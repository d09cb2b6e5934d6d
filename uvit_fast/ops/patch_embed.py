"""Patchify + patch embedding (2-D images, 3-D video tubelets) and decoder + unpatchify.

Token layout everywhere is upstream U-ViT / DiT's: patches in row-major grid order
(``(h w)``, or ``(T h w)`` for video) and, inside a patch, the last dimension ordered
``(p1 p2 C)`` (``(t p1 p2 C)`` for video).
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from uvit_fast._backend import load_kernel, resolve
from uvit_fast.dispatch import measure
from uvit_fast.ops._hot import Direct, Plans, may_run_direct, types_of
from uvit_fast.ops._runtime import DispatchOp
from uvit_fast.ops._autocast import autocast_cast, autocast_dtype
from uvit_fast.ops._checks import as_tuple, check_same_device, check_tensor, shape_str

PatchSize = Union[int, Sequence[int]]

#: dtypes the Triton kernels compute in (fp64 and others go to the PyTorch path under "auto")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _effective_dtype(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    if t is None:
        return None
    if dtype is None or t.dtype == torch.float64:
        return t.dtype
    return dtype


def _check_gemm_dtypes(op: str, names: Tuple[str, ...], tensors, device: torch.device) -> None:
    """conv / linear need one dtype for input, weight and bias (after autocast's casts)."""
    ac = autocast_dtype(device)
    eff = [(n, _effective_dtype(t, ac)) for n, t in zip(names, tensors) if t is not None]
    if len({d for _, d in eff}) > 1:
        desc = ", ".join(f"{n} {d}" for n, d in eff)
        where = f" under autocast({ac})" if ac is not None else ""
        raise TypeError(f"{op}: {', '.join(n for n, _ in eff)} must share one dtype{where}; got {desc}")


def _grid_of(op: str, x: torch.Tensor, patch: Tuple[int, ...]) -> Tuple[int, ...]:
    spatial = tuple(x.shape[2:])
    names = ("T", "H", "W") if len(spatial) == 3 else ("H", "W")
    for n, s, p in zip(names, spatial, patch):
        if s % p:
            raise ValueError(
                f"{op}: input {n}={s} is not divisible by the patch size {p} "
                f"(input shape {tuple(x.shape)}, patch {patch})"
            )
    return tuple(s // p for s, p in zip(spatial, patch))


def _token_grid(op: str, n_tokens: int, grid, n_dims: int) -> Tuple[int, ...]:
    if grid is None:
        if n_dims != 2:
            raise ValueError(f"{op}: grid is required for 3-D (video) patches")
        side = math.isqrt(n_tokens)
        if side * side != n_tokens:
            raise ValueError(
                f"{op}: {n_tokens} patch tokens do not form a square grid; pass grid=(h, w)"
            )
        return (side, side)
    g = as_tuple(op, "grid", grid, n_dims)
    if math.prod(g) != n_tokens:
        raise ValueError(f"{op}: grid {g} has {math.prod(g)} cells but there are {n_tokens} patch tokens")
    return g


# --------------------------------------------------------------------------- data movement
def patchify(x: torch.Tensor, patch_size: PatchSize) -> torch.Tensor:
    """Image ``(B, C, H, W)`` -> tokens ``(B, h*w, p1*p2*C)``; video ``(B, C, T, H, W)`` ->
    ``(B, T'*h*w, t*p1*p2*C)``. Exactly upstream's
    ``rearrange('B C (h p1) (w p2) -> B (h w) (p1 p2 C)')`` (and its 3-D analogue)."""
    op = "patchify"
    check_tensor(op, "x", x, (4, 5), floating=False)
    patch = as_tuple(op, "patch_size", patch_size, x.dim() - 2)
    grid = _grid_of(op, x, patch)
    B, C = x.shape[:2]
    n = len(patch)
    shape = [B, C]
    for g, p in zip(grid, patch):
        shape += [g, p]
    y = x.reshape(shape)
    # (B, C, g0, p0, g1, p1[, g2, p2]) -> (B, g..., p..., C)
    perm = [0] + [2 + 2 * i for i in range(n)] + [3 + 2 * i for i in range(n)] + [1]
    return y.permute(perm).reshape(B, math.prod(grid), math.prod(patch) * C)


def _patch_dims(value) -> int:
    """3 for a sequence of three (a 3-D tubelet or video grid), else 2; never raises (a bad value
    meets ``as_tuple``'s clear error afterwards)."""
    try:
        return 3 if not isinstance(value, (int, float)) and len(value) == 3 else 2
    except TypeError:
        return 2


def unpatchify(
    tokens: torch.Tensor, patch_size: PatchSize, channels: int, grid: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, L, p1*p2*C)`` -> ``(B, C, h*p1, w*p2)``.

    ``grid`` is ``(h, w)`` (``(T', h, w)`` for video); ``None`` means a square 2-D grid,
    as upstream assumes.
    """
    op = "unpatchify"
    check_tensor(op, "tokens", tokens, 3, floating=False)
    n = _patch_dims(patch_size)
    if grid is not None and _patch_dims(grid) == 3:
        n = 3
    patch = as_tuple(op, "patch_size", patch_size, n)
    B, L, K = tokens.shape
    if not isinstance(channels, int) or channels <= 0:
        raise ValueError(f"{op}: channels must be a positive int; got {channels!r}")
    if K != math.prod(patch) * channels:
        raise ValueError(
            f"{op}: tokens have last dim {K} but patch {patch} x channels {channels} "
            f"needs {math.prod(patch) * channels} (tokens shape {tuple(tokens.shape)})"
        )
    g = _token_grid(op, L, grid, n)
    y = tokens.reshape([B, *g, *patch, channels])
    # (B, g..., p..., C) -> (B, C, g0, p0, g1, p1[, g2, p2])
    perm = [0, 2 * n + 1]
    for i in range(n):
        perm += [1 + i, 1 + n + i]
    return y.permute(perm).reshape([B, channels, *(gi * pi for gi, pi in zip(g, patch))])


# --------------------------------------------------------------------------- patchify + embed
def _check_patchify_embed(x, weight, bias, prefix, pos_embed):
    op = "patchify_embed"
    check_tensor(op, "x", x, (4, 5))
    check_tensor(op, "weight", weight, x.dim())
    check_tensor(op, "bias", bias, 1, optional=True)
    check_tensor(op, "prefix", prefix, 3, optional=True)
    check_tensor(op, "pos_embed", pos_embed, 3, optional=True)
    check_same_device(op, x=x, weight=weight, bias=bias, prefix=prefix, pos_embed=pos_embed)
    _check_gemm_dtypes(op, ("x", "weight", "bias"), (x, weight, bias), x.device)
    D, C = weight.shape[:2]
    if x.shape[1] != C:
        raise ValueError(
            f"{op}: x has {x.shape[1]} channels but weight {tuple(weight.shape)} expects {C} "
            f"(x shape {tuple(x.shape)})"
        )
    patch = tuple(weight.shape[2:])
    grid = _grid_of(op, x, patch)
    L = math.prod(grid)
    B = x.shape[0]
    if bias is not None and bias.shape[0] != D:
        raise ValueError(f"{op}: bias has shape {shape_str(bias)} but weight {tuple(weight.shape)} needs ({D},)")
    E = 0
    if prefix is not None:
        E = prefix.shape[1]
        if prefix.shape[0] not in (1, B) or prefix.shape[2] != D:
            raise ValueError(
                f"{op}: prefix must have shape ({B} or 1, E, {D}); got {shape_str(prefix)}"
            )
    if pos_embed is not None:
        if pos_embed.shape[0] not in (1, B) or tuple(pos_embed.shape[1:]) != (E + L, D):
            raise ValueError(
                f"{op}: pos_embed must have shape (1 or {B}, {E + L}, {D}) for {E} prefix tokens "
                f"and {L} patches; got {shape_str(pos_embed)}"
            )
    return patch, grid


def patchify_embed_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    prefix: Optional[torch.Tensor] = None,
    pos_embed: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Plain PyTorch specification of :func:`patchify_embed` (upstream's conv/flatten/cat/add chain)."""
    patch = tuple(weight.shape[2:])
    conv = F.conv2d if x.dim() == 4 else F.conv3d
    tokens = conv(x, weight, bias, stride=patch).flatten(2).transpose(1, 2)
    if prefix is not None:
        prefix = prefix.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([prefix, tokens], dim=1)
    if pos_embed is not None:
        tokens = tokens + pos_embed
    return tokens


def patchify_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    prefix: Optional[torch.Tensor] = None,
    pos_embed: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Patch embedding straight into the final token sequence.

    Args:
        x: image ``(B, C, H, W)`` or video ``(B, C, T, H, W)``.
        weight: the patch projection as a conv weight, ``(D, C, p1, p2)`` or ``(D, C, t, p1, p2)``;
            kernel = stride = the patch. H, W (and T) must be divisible by it; non-square images are fine.
        bias: ``(D,)`` or None.
        prefix: extra tokens ``(B or 1, E, D)`` placed before the patches (time, label,
            context or class tokens), or None (E = 0).
        pos_embed: ``(1 or B, E + L, D)`` added to every token, or None.

    Returns:
        ``(B, E + L, D)`` with ``L = (H/p1)*(W/p2)`` (times ``T/t``), the dtype that the
        reference chain ``cat(prefix, conv(x)) + pos_embed`` produces:
        ``promote_types(x.dtype, prefix.dtype, pos_embed.dtype)``. Under ``torch.autocast``
        x, weight and bias are cast to the autocast dtype first (as autocast casts a conv's
        arguments), so fp32 ``prefix``/``pos_embed`` give an fp32 result, as upstream's AMP
        forward does. x, weight and bias must share one dtype (after autocast).

    The Triton path (``backend="triton"``, or ``"auto"`` on CUDA) computes in float16,
    bfloat16 or float32 with fp32 accumulation; under ``"auto"`` other dtypes (float64) use
    the PyTorch reference.
    """
    sig, plan = _EMBED_PLANS.lookup(backend, x, weight, bias, prefix, pos_embed)
    if plan is None:  # the first call of this signature (uvit_fast.ops._hot)
        plan = _EMBED_PLANS.put(sig, _embed_plan(x, weight, bias, prefix, pos_embed, backend))
    return plan(x, weight, bias, prefix, pos_embed)


def _embed_plan(x, weight, bias, prefix, pos_embed, backend):
    """The checks, the backend and the decision of one call signature: the function that runs it,
    taking ``(x, weight, bias, prefix, pos_embed)``."""
    _check_patchify_embed(x, weight, bias, prefix, pos_embed)
    choice = resolve(backend, "patchify_embed", x, weight, bias, prefix, pos_embed)
    if choice in ("triton", "measure") and backend != "triton" and not _embed_dtypes_ok(x, prefix, pos_embed):
        choice = "torch"  # "auto": dtypes the kernel does not compute in (e.g. float64)
    if choice == "measure":  # time both paths once per key (uvit_fast.dispatch)
        extra = prefix.shape[1] if prefix is not None else 0
        tensors = (x, weight, bias, prefix, pos_embed)
        key = dict(
            rows=x.shape[0] * math.prod([s // p for s, p in zip(x.shape[2:], weight.shape[2:])]),
            dims=(*x.shape[1:], *weight.shape[2:], weight.shape[0], extra),
            flags=",".join(f"{n}={int(t is not None)}" for n, t in (("bias", bias), ("prefix", prefix), ("pos", pos_embed))),
        )
        if torch.compiler.is_compiling():  # decided inside the graph, when it runs
            return functools.partial(_patchify_embed_triton, call=_EMBED_DISPATCH.bind("patchify_embed", tensors, **key))
        triton = functools.partial(_patchify_embed_triton, call=_EMBED_DIRECT if may_run_direct(tensors) else None)
        choice = measure("patchify_embed", tensors, {"torch": _embed_reference, "triton": triton}, **key)
    if choice == "torch":
        return _embed_reference
    return functools.partial(_patchify_embed_triton, call=_EMBED_DIRECT if may_run_direct((x, weight, bias, prefix, pos_embed)) else None)


def _embed_reference(x, weight, bias, prefix, pos_embed):
    return patchify_embed_reference(x, weight, bias, prefix=prefix, pos_embed=pos_embed)


_EMBED_PLANS = Plans("patchify_embed")


def _embed_dtypes_ok(x, prefix, pos_embed) -> bool:
    dts = [_effective_dtype(x, autocast_dtype(x.device))]
    dts += [t.dtype for t in (prefix, pos_embed) if t is not None]
    return all(d in _KERNEL_DTYPES for d in dts)


def _embed_out_dtype(x, prefix, pos_embed) -> torch.dtype:
    dt = x.dtype
    for t in (prefix, pos_embed):
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    return dt


def _patchify_embed_triton(x, weight, bias, prefix, pos_embed, call=None):
    # Autocast: the reference's conv runs in the autocast dtype (x, weight and bias are cast),
    # while cat/add then promote against prefix/pos_embed as usual. Cast the conv operands
    # here, outside the custom op, and the op's own dtype rule does the rest.
    ac = autocast_dtype(x.device)
    x, weight, bias = (autocast_cast(t, ac) for t in (x, weight, bias))
    if not _embed_dtypes_ok(x, prefix, pos_embed):
        desc = ", ".join(f"{n} {t.dtype}" for n, t in (("x", x), ("prefix", prefix), ("pos_embed", pos_embed))
                         if t is not None)
        raise TypeError(
            f"patchify_embed: the Triton kernel supports float16, bfloat16 and float32; got {desc} "
            f"(use backend='torch')"
        )
    return (call or torch.ops.uvit_fast.patchify_embed)(x, weight, bias, prefix, pos_embed)


@torch.library.custom_op("uvit_fast::patchify_embed", mutates_args=())
def _patchify_embed_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    prefix: Optional[torch.Tensor],
    pos_embed: Optional[torch.Tensor],
) -> torch.Tensor:
    kernel = load_kernel("patchify_embed", "patchify_embed")
    return kernel.patchify_embed_forward(x, weight, bias, prefix, pos_embed)


@_patchify_embed_op.register_fake
def _(x, weight, bias, prefix, pos_embed):
    L = 1
    for s, p in zip(x.shape[2:], weight.shape[2:]):
        L = L * (s // p)
    E = prefix.shape[1] if prefix is not None else 0
    return x.new_empty((x.shape[0], E + L, weight.shape[0]), dtype=_embed_out_dtype(x, prefix, pos_embed))


@torch.library.custom_op("uvit_fast::patchify_embed_backward", mutates_args=())
def _patchify_embed_backward_op(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    extras: int,
    need_x: bool,
    need_weight: bool,
    need_bias: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)``; entries not asked for are empty ``(0,)`` tensors."""
    kernel = load_kernel("patchify_embed", "patchify_embed")
    return kernel.patchify_embed_backward(grad, x, weight, extras, need_x, need_weight, need_bias)


@_patchify_embed_backward_op.register_fake
def _(grad, x, weight, extras, need_x, need_weight, need_bias):
    none = x.new_empty((0,))
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else none,
        weight.new_empty(weight.shape) if need_weight else none,
        x.new_empty((weight.shape[0],)) if need_bias else none,
    )


def _patchify_embed_setup_context(ctx, inputs, output):
    x, weight, bias, prefix, pos_embed = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.batch = x.shape[0]
    ctx.extras = prefix.shape[1] if prefix is not None else 0
    ctx.prefix_meta = None if prefix is None else (prefix.shape[0], prefix.dtype)
    ctx.pos_meta = None if pos_embed is None else (pos_embed.shape[0], pos_embed.dtype)


def _sum_to_batch(g: torch.Tensor, batch: int, target_batch: int) -> torch.Tensor:
    return g.sum(0, keepdim=True) if target_batch == 1 and batch != 1 else g


def _patchify_embed_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    need_x, need_w, need_b, need_pre, need_pos = ctx.needs_input_grad
    need_b = need_b and ctx.has_bias
    dx = dw = db = dpre = dpos = None
    if need_x or need_w or need_b:
        gx, gw, gb = torch.ops.uvit_fast.patchify_embed_backward(
            grad, x, weight, ctx.extras, need_x, need_w, need_b
        )
        dx = gx if need_x else None
        dw = gw if need_w else None
        db = gb if need_b else None
    if need_pre and ctx.prefix_meta is not None:
        pb, pdt = ctx.prefix_meta
        dpre = _sum_to_batch(grad[:, : ctx.extras], ctx.batch, pb).to(pdt)
    if need_pos and ctx.pos_meta is not None:
        pb, pdt = ctx.pos_meta
        dpos = _sum_to_batch(grad, ctx.batch, pb).to(pdt)
    return dx, dw, db, dpre, dpos


_patchify_embed_op.register_autograd(_patchify_embed_backward, setup_context=_patchify_embed_setup_context)
_EMBED_DIRECT = Direct(_patchify_embed_op)  # inference plans: the body without the dispatcher (ops._hot)


# --------------------------------------------------------------------------- decoder + unpatchify
def _check_decoder_unpatchify(tokens, weight, bias, patch_size, grid, extras):
    op = "decoder_unpatchify"
    check_tensor(op, "tokens", tokens, 3)
    check_tensor(op, "weight", weight, 2)
    check_tensor(op, "bias", bias, 1, optional=True)
    check_same_device(op, tokens=tokens, weight=weight, bias=bias)
    _check_gemm_dtypes(op, ("tokens", "weight", "bias"), (tokens, weight, bias), tokens.device)
    n = 2
    if _patch_dims(patch_size) == 3:
        n = 3
    patch = as_tuple(op, "patch_size", patch_size, n)
    if not isinstance(extras, int) or isinstance(extras, bool) or extras < 0:
        raise ValueError(f"{op}: extras must be a non-negative int; got {extras!r}")
    B, T, D = tokens.shape
    if extras >= T:
        raise ValueError(f"{op}: extras={extras} leaves no patch tokens in tokens of shape {tuple(tokens.shape)}")
    K = weight.shape[0]
    if weight.shape[1] != D:
        raise ValueError(f"{op}: weight {tuple(weight.shape)} does not match tokens width {D} (tokens {tuple(tokens.shape)})")
    P = math.prod(patch)
    if K % P:
        raise ValueError(f"{op}: weight has {K} output features, not a multiple of the patch volume {P}")
    if bias is not None and bias.shape[0] != K:
        raise ValueError(f"{op}: bias has shape {shape_str(bias)} but weight {tuple(weight.shape)} needs ({K},)")
    g = _token_grid(op, T - extras, grid, n)
    return patch, g, K // P


def decoder_unpatchify_reference(
    tokens: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    patch_size: PatchSize,
    grid: Optional[Sequence[int]] = None,
    extras: int = 0,
) -> torch.Tensor:
    """Plain PyTorch specification of :func:`decoder_unpatchify`."""
    n = _patch_dims(patch_size)
    patch = as_tuple("decoder_unpatchify", "patch_size", patch_size, n)
    channels = weight.shape[0] // math.prod(patch)
    out = F.linear(tokens[:, extras:], weight, bias)
    return unpatchify(out, patch, channels, grid)


def decoder_unpatchify(
    tokens: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    patch_size: PatchSize,
    grid: Optional[Sequence[int]] = None,
    extras: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Final linear on the patch tokens only, written straight into the image.

    Args:
        tokens: ``(B, extras + L, D)``; the first ``extras`` tokens are skipped.
        weight: ``(p1*p2*C, D)`` (``(t*p1*p2*C, D)`` for video), an ``nn.Linear`` weight whose
            output features are ordered ``(p1 p2 C)`` as upstream's ``decoder_pred``.
        bias: ``(p1*p2*C,)`` or None.
        patch_size: int, ``(p1, p2)`` or ``(t, p1, p2)``.
        grid: ``(h, w)`` or ``(T', h, w)``; None means a square 2-D grid.
        extras: number of leading non-patch tokens.

    Returns:
        ``(B, C, h*p1, w*p2)`` (or ``(B, C, T'*t, h*p1, w*p2)``), contiguous, in the dtype of
        ``F.linear(tokens, weight, bias)``: tokens' dtype, or the autocast dtype under
        ``torch.autocast`` (tokens, weight and bias are cast like autocast casts a linear's
        arguments). tokens, weight and bias must share one dtype (after autocast).
    """
    # (the types too: patch_size=2.0 or extras=True hash as 2 and 1, and must meet the checks)
    sig, plan = _DECODER_PLANS.lookup((backend, patch_size, types_of(patch_size), grid, types_of(grid), extras, type(extras)), tokens, weight, bias)
    if plan is None:  # the first call of this signature (uvit_fast.ops._hot)
        plan = _DECODER_PLANS.put(sig, _decoder_plan(tokens, weight, bias, patch_size, grid, extras, backend))
    return plan(tokens, weight, bias)


def _decoder_plan(tokens, weight, bias, patch_size, grid, extras, backend):
    """The checks, the backend and the decision of one call signature: the function that runs it,
    taking ``(tokens, weight, bias)`` (the patch, grid and extras are the signature's)."""
    patch, g, channels = _check_decoder_unpatchify(tokens, weight, bias, patch_size, grid, extras)
    choice = resolve(backend, "decoder_unpatchify", tokens, weight, bias)
    if choice in ("triton", "measure") and backend != "triton" and not _decoder_dtypes_ok(tokens):
        choice = "torch"  # "auto": dtypes the kernel does not compute in (e.g. float64)
    direct = _DECODER_DIRECT if may_run_direct((tokens, weight, bias)) else None
    if choice == "measure":  # time both paths once per key (uvit_fast.dispatch)
        key = dict(rows=tokens.shape[0] * math.prod(g), dims=(*patch, *g, extras, *weight.shape),
                   flags=f"bias={int(bias is not None)}")
        if torch.compiler.is_compiling():  # decided inside the graph, when it runs
            call = _DECODER_DISPATCH.bind("decoder_unpatchify", (tokens, weight, bias), **key)
            return lambda t, w, b: _decoder_unpatchify_triton(t, w, b, patch, g, extras, call=call)
        choice = measure("decoder_unpatchify", (tokens, weight, bias), {
            "torch": lambda t, w, b: decoder_unpatchify_reference(t, w, b, patch_size=patch, grid=g, extras=extras),
            "triton": lambda t, w, b: _decoder_unpatchify_triton(t, w, b, patch, g, extras, call=direct),
        }, **key)
    if choice == "torch":  # the reference's math, its rearrange's shapes fixed by the signature
        B, n = tokens.shape[0], len(patch)
        perm = [0, 2 * n + 1] + [d for i in range(n) for d in (1 + i, 1 + n + i)]
        split, image = [B, *g, *patch, channels], [B, channels, *(gi * pi for gi, pi in zip(g, patch))]
        return lambda t, w, b: F.linear(t[:, extras:], w, b).reshape(split).permute(perm).reshape(image)
    return lambda t, w, b: _decoder_unpatchify_triton(t, w, b, patch, g, extras, call=direct)


_DECODER_PLANS = Plans("decoder_unpatchify")


def _decoder_dtypes_ok(tokens) -> bool:
    return _effective_dtype(tokens, autocast_dtype(tokens.device)) in _KERNEL_DTYPES


def _decoder_unpatchify_triton(tokens, weight, bias, patch, grid, extras, call=None):
    # Autocast: the reference's linear runs in the autocast dtype and unpatchify keeps it.
    ac = autocast_dtype(tokens.device)
    tokens, weight, bias = (autocast_cast(t, ac) for t in (tokens, weight, bias))
    if not _decoder_dtypes_ok(tokens):
        raise TypeError(
            f"decoder_unpatchify: the Triton kernel supports float16, bfloat16 and float32; "
            f"got tokens {tokens.dtype} (use backend='torch')"
        )
    return (call or torch.ops.uvit_fast.decoder_unpatchify)(tokens, weight, bias, list(patch), list(grid), extras)


@torch.library.custom_op("uvit_fast::decoder_unpatchify", mutates_args=())
def _decoder_unpatchify_op(
    tokens: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    patch: List[int],
    grid: List[int],
    extras: int,
) -> torch.Tensor:
    kernel = load_kernel("decoder_unpatchify", "decoder_unpatchify")
    return kernel.decoder_unpatchify_forward(tokens, weight, bias, patch, grid, extras)


@_decoder_unpatchify_op.register_fake
def _(tokens, weight, bias, patch, grid, extras):
    channels = weight.shape[0] // math.prod(patch)
    return tokens.new_empty((tokens.shape[0], channels, *(g * p for g, p in zip(grid, patch))))


@torch.library.custom_op("uvit_fast::decoder_unpatchify_backward", mutates_args=())
def _decoder_unpatchify_backward_op(
    grad: torch.Tensor,
    tokens: torch.Tensor,
    weight: torch.Tensor,
    patch: List[int],
    grid: List[int],
    extras: int,
    need_tokens: bool,
    need_weight: bool,
    need_bias: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dtokens, dweight, dbias)``; entries not asked for are empty ``(0,)`` tensors."""
    kernel = load_kernel("decoder_unpatchify", "decoder_unpatchify")
    return kernel.decoder_unpatchify_backward(
        grad, tokens, weight, patch, grid, extras, need_tokens, need_weight, need_bias
    )


@_decoder_unpatchify_backward_op.register_fake
def _(grad, tokens, weight, patch, grid, extras, need_tokens, need_weight, need_bias):
    none = tokens.new_empty((0,))
    return (
        tokens.new_empty(tokens.shape) if need_tokens else none,
        weight.new_empty(weight.shape) if need_weight else none,
        tokens.new_empty((weight.shape[0],)) if need_bias else none,
    )


def _decoder_unpatchify_setup_context(ctx, inputs, output):
    tokens, weight, bias, patch, grid, extras = inputs
    ctx.save_for_backward(tokens, weight)
    ctx.has_bias = bias is not None
    ctx.geometry = (list(patch), list(grid), extras)


def _decoder_unpatchify_backward(ctx, grad):
    tokens, weight = ctx.saved_tensors
    need_t, need_w, need_b = ctx.needs_input_grad[:3]
    need_b = need_b and ctx.has_bias
    dt = dw = db = None
    if need_t or need_w or need_b:
        patch, grid, extras = ctx.geometry
        gt, gw, gb = torch.ops.uvit_fast.decoder_unpatchify_backward(
            grad, tokens, weight, patch, grid, extras, need_t, need_w, need_b
        )
        dt = gt if need_t else None
        dw = gw if need_w else None
        db = gb if need_b else None
    return dt, dw, db, None, None, None


_decoder_unpatchify_op.register_autograd(
    _decoder_unpatchify_backward, setup_context=_decoder_unpatchify_setup_context
)
_DECODER_DIRECT = Direct(_decoder_unpatchify_op)  # inference plans: the body without the dispatcher (ops._hot)


# Under torch.compile with measured dispatch: the decision inside the graph (uvit_fast.ops._runtime).
_EMBED_DISPATCH = DispatchOp(
    "patchify_embed", torch.ops.uvit_fast.patchify_embed, _patchify_embed_setup_context, _patchify_embed_backward,
    n_diff=1, candidates=lambda *args: {
        "torch": lambda x, w, b, pre, pos: (patchify_embed_reference(x, w, b, prefix=pre, pos_embed=pos),)
    },
)
_DECODER_DISPATCH = DispatchOp(
    "decoder_unpatchify", torch.ops.uvit_fast.decoder_unpatchify, _decoder_unpatchify_setup_context,
    _decoder_unpatchify_backward, n_diff=1, candidates=lambda *args: {
        "torch": lambda t, w, b, patch, grid, extras: (
            decoder_unpatchify_reference(t, w, b, patch_size=tuple(patch), grid=tuple(grid), extras=extras),
        )
    },
)


# ----------------------------------------------------------------------------------------------
# FLOP formulas (torch.utils.flop_counter): each kernel's GEMM, as the reference's conv / linear counts
# it, so that FlopCounterMode sees the same FLOPs on the fused path as on the plain one.
# ----------------------------------------------------------------------------------------------
def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import register_flop_formula

    def embed_gemm(x_shape, w_shape) -> int:
        patches = x_shape[0] * math.prod(s // p for s, p in zip(x_shape[2:], w_shape[2:]))
        return 2 * patches * w_shape[0] * math.prod(w_shape[1:])  # rows x D x (C * patch)

    @register_flop_formula(torch.ops.uvit_fast.patchify_embed)
    def _embed(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
        return embed_gemm(x_shape, w_shape)

    @register_flop_formula(torch.ops.uvit_fast.patchify_embed_backward)
    def _embed_bwd(grad_shape, x_shape, w_shape, extras, need_x, need_weight, need_bias, *args, out_shape=None,
                   **kwargs) -> int:
        return embed_gemm(x_shape, w_shape) * (int(need_x) + int(need_weight))

    def decoder_gemm(tokens_shape, w_shape, extras) -> int:
        return 2 * tokens_shape[0] * (tokens_shape[1] - extras) * w_shape[0] * w_shape[1]

    @register_flop_formula(torch.ops.uvit_fast.decoder_unpatchify)
    def _decoder(tokens_shape, w_shape, bias_shape, patch, grid, extras, *args, out_shape=None, **kwargs) -> int:
        return decoder_gemm(tokens_shape, w_shape, extras)

    @register_flop_formula(torch.ops.uvit_fast.decoder_unpatchify_backward)
    def _decoder_bwd(grad_shape, tokens_shape, w_shape, patch, grid, extras, need_tokens, need_weight, need_bias,
                     *args, out_shape=None, **kwargs) -> int:
        return decoder_gemm(tokens_shape, w_shape, extras) * (int(need_tokens) + int(need_weight))


_register_flop_formulas()
