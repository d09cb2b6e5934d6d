"""A small DDIM sampler with classifier-free guidance for the noise-prediction models here.

Both U-ViT and DiT predict the noise ``eps`` of a discrete-time diffusion with 1000 steps
(DiT with ``learn_sigma`` returns ``[eps, sigma]``; only ``eps`` is used). This sampler is a
demonstration of running the fused models end to end, not a reproduction of the papers'
FID setups (DiT uses 250 DDPM steps, U-ViT DPM-Solver).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

import torch
import torch.nn as nn


def linear_betas(steps: int = 1000, start: float = 1e-4, end: float = 0.02) -> torch.Tensor:
    """The linear schedule of DDPM / ADM / DiT, float64."""
    return torch.linspace(start, end, steps, dtype=torch.float64)


def sd_betas(steps: int = 1000, start: float = 0.00085, end: float = 0.012) -> torch.Tensor:
    """The "scaled linear" schedule of latent diffusion, used by the latent U-ViT models."""
    return torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2


def null_label(model: nn.Module) -> int:
    """The class index used for the unconditional branch of classifier-free guidance:
    DiT's extra embedding row (``num_classes``, present when it was built with label dropout),
    or U-ViT's last class (1000 of 1001: its guided presets add one null class to ImageNet's
    1000). Raises ValueError for a model with no known null class (e.g. the 1000-class
    ImageNet-64 U-ViTs, trained without guidance): pass ``null_cond`` yourself there."""
    if hasattr(model, "y_embedder"):
        emb = model.y_embedder
        if emb.embedding_table.num_embeddings <= emb.num_classes:
            raise ValueError(
                f"null_label: the DiT has no null class (class_dropout_prob=0: its label table has "
                f"{emb.embedding_table.num_embeddings} rows for {emb.num_classes} classes)"
            )
        return emb.num_classes
    n = getattr(model, "num_classes", -1)
    if n <= 0:
        raise ValueError("null_label: the model is not class-conditional")
    if n != 1001:
        raise ValueError(
            f"null_label: this U-ViT has {n} classes and no known null class (U-ViT's guided presets "
            f"have 1001, the last being the null class); pass null_cond yourself"
        )
    return n - 1


#: the options of uvit_fast.cuda_graph that ddim_sample(cuda_graph={...}) passes on
_CUDA_GRAPH_OPTIONS = frozenset({"warmup", "max_graphs", "clone_outputs", "on_cpu", "backend"})


@torch.no_grad()
def ddim_sample(
    model: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    *,
    steps: int = 50,
    cond: Optional[torch.Tensor] = None,
    null_cond: Optional[torch.Tensor] = None,
    cfg_scale: float = 1.0,
    betas: Optional[torch.Tensor] = None,
    progress: bool = False,
    cuda_graph: Union[bool, Mapping[str, Any]] = False,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from ``noise`` ``(B, C, H, W)``.

    Args:
        model: ``model(x, t)`` or ``model(x, t, cond)`` returning at least ``C`` channels of eps.
        cond: labels ``(B,)`` or context ``(B, ...)``; None for unconditional models.
        null_cond: the unconditional input for guidance (e.g. ``full((B,), null_label(model))``).
        cfg_scale: guidance scale; ``1`` runs only the conditional branch.
        betas: the training noise schedule (default :func:`linear_betas`).
        cuda_graph: ``True`` captures the denoiser call with its guidance (the cat of the two
            branches, the model, the chunk and the combination) as one CUDA graph, with the step's
            timestep tensor as an input, and replays it at every step (:func:`uvit_fast.cuda_graph`;
            a mapping passes its options, e.g. ``{"warmup": 1}``). Needs CUDA tensors (CPU is a
            ValueError); the samples equal the eager sampler's. See docs/cuda_graphs.md.
    """
    if steps < 1:
        raise ValueError(f"ddim_sample: steps must be >= 1; got {steps}")
    if cfg_scale != 1.0 and (cond is None or null_cond is None):
        raise ValueError("ddim_sample: classifier-free guidance needs both cond and null_cond")
    if not isinstance(cuda_graph, (bool, Mapping)):
        raise TypeError(f"ddim_sample: cuda_graph must be a bool or a mapping of cuda_graph options; "
                        f"got {type(cuda_graph).__name__}")
    betas = linear_betas() if betas is None else betas.double()
    abar = torch.cumprod(1 - betas, 0)
    T = len(abar)
    ts = torch.linspace(T - 1, 0, steps).round().long().tolist()
    x = noise
    B, C = x.shape[:2]
    if cfg_scale == 1.0:
        null_cond = None  # unused: not an input of the graph

    def denoise(x, tt, cond, null_cond, cfg_scale):
        if cfg_scale != 1.0:
            out = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([cond, null_cond]))
            e_c, e_u = out[:, :C].chunk(2)
            return e_u + cfg_scale * (e_c - e_u)
        return (model(x, tt) if cond is None else model(x, tt, cond))[:, :C]

    step = denoise
    if cuda_graph is not False:
        from uvit_fast.cuda_graphs import cuda_graph as capture

        options = {} if cuda_graph is True else dict(cuda_graph)
        unknown = sorted(set(options) - _CUDA_GRAPH_OPTIONS)
        if unknown:
            raise ValueError(f"ddim_sample: unknown cuda_graph option(s) {', '.join(map(repr, unknown))}; "
                             f"choose from {', '.join(sorted(_CUDA_GRAPH_OPTIONS))}")
        step = capture(denoise, x, torch.full((B,), float(ts[0]), device=x.device), cond, null_cond, cfg_scale,
                       **options)
    iterator = ts
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(ts, desc="ddim", leave=False)
    for i, t in enumerate(iterator):
        tt = torch.full((B,), float(t), device=x.device)
        eps = step(x, tt, cond, null_cond, cfg_scale)  # a graph's eps is overwritten by the next step
        a_t = abar[t].item()
        a_prev = abar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
    return x
