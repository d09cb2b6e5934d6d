"""Patchify + patch embedding (2-D images, 3-D video tubelets) and decoder + unpatchify.

Token layout everywhere is upstream U-ViT / DiT's: patches in row-major grid order
(``(h w)``, or ``(T h w)`` for video) and, inside a patch, the last dimension ordered
``(p1 p2 C)`` (``(t p1 p2 C)`` for video).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from uvit_fast._backend import load_kernel, resolve
from uvit_fast.ops._checks import as_tuple, check_same_device, check_tensor, shape_str

PatchSize = Union[int, Sequence[int]]


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


def unpatchify(
    tokens: torch.Tensor, patch_size: PatchSize, channels: int, grid: Optional[Sequence[int]] = None
) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``(B, L, p1*p2*C)`` -> ``(B, C, h*p1, w*p2)``.

    ``grid`` is ``(h, w)`` (``(T', h, w)`` for video); ``None`` means a square 2-D grid,
    as upstream assumes.
    """
    op = "unpatchify"
    check_tensor(op, "tokens", tokens, 3, floating=False)
    n = 3 if (not isinstance(patch_size, int) and len(tuple(patch_size)) == 3) else 2
    if grid is not None and not isinstance(grid, int) and len(tuple(grid)) == 3:
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
        reference chain ``cat(prefix, conv(x)) + pos_embed`` produces.
    """
    _check_patchify_embed(x, weight, bias, prefix, pos_embed)
    if resolve(backend, "patchify_embed", x, weight, bias, prefix, pos_embed) == "torch":
        return patchify_embed_reference(x, weight, bias, prefix=prefix, pos_embed=pos_embed)
    return _patchify_embed_triton(x, weight, bias, prefix, pos_embed)


def _patchify_embed_triton(x, weight, bias, prefix, pos_embed):
    load_kernel("patchify_embed", "patchify_embed")
    raise NotImplementedError("patchify_embed: the Triton kernel is not implemented yet; use backend='torch'")


# --------------------------------------------------------------------------- decoder + unpatchify
def _check_decoder_unpatchify(tokens, weight, bias, patch_size, grid, extras):
    op = "decoder_unpatchify"
    check_tensor(op, "tokens", tokens, 3)
    check_tensor(op, "weight", weight, 2)
    check_tensor(op, "bias", bias, 1, optional=True)
    check_same_device(op, tokens=tokens, weight=weight, bias=bias)
    n = 2
    if not isinstance(patch_size, int) and len(tuple(patch_size)) == 3:
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
    n = 3 if (not isinstance(patch_size, int) and len(tuple(patch_size)) == 3) else 2
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
        ``(B, C, h*p1, w*p2)`` (or ``(B, C, T'*t, h*p1, w*p2)``).
    """
    patch, g, channels = _check_decoder_unpatchify(tokens, weight, bias, patch_size, grid, extras)
    if resolve(backend, "decoder_unpatchify", tokens, weight, bias) == "torch":
        return decoder_unpatchify_reference(tokens, weight, bias, patch_size=patch, grid=g, extras=extras)
    return _decoder_unpatchify_triton(tokens, weight, bias, patch, g, extras)


def _decoder_unpatchify_triton(tokens, weight, bias, patch, grid, extras):
    load_kernel("decoder_unpatchify", "decoder_unpatchify")
    raise NotImplementedError("decoder_unpatchify: the Triton kernel is not implemented yet; use backend='torch'")
