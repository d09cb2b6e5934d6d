"""Property-based tests (hypothesis) of every op in :mod:`uvit_fast.ops` against its
``*_reference`` twin, on the Triton kernels (``backend="triton"``; on CPU under the interpreter,
with outputs NaN-poisoned before launch by ``UVIT_FAST_POISON=1``).

Each example draws small awkward shapes (1, primes, tile tails), a dtype (fp32/fp16), a memory
layout for every tensor (contiguous, transposed storage, a strided slice with NaN in the gaps,
a stride-0 broadcast of modulation/prefix/position tensors), optional arguments, and a random
subset of inputs that require grad. It checks, against a float64 run of the reference:

* the output(s): shape, dtype, and the 2x rule (:func:`uvit_fast.testing.assert_parity`);
* every requested gradient by the same rule, and that unrequested ones stay ``None``;
* NaN/Inf in an input: non-finite outputs exactly where the reference has them, parity elsewhere;
* a zero-size batch: the reference's result (empty output of the right shape and dtype, zero
  gradients) or the reference's error.

The example budget comes from the hypothesis profile (``tests/conftest.py``; ``docs/testing.md``):
``ci`` by default (fixed seed, bounded), ``HYPOTHESIS_PROFILE=deep`` to search harder by hand.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Set, Tuple

import pytest
import torch
from hypothesis import note, settings
from hypothesis import strategies as st
from hypothesis import given

import uvit_fast  # noqa: F401  (registers the torch.library ops)
from uvit_fast import ops
from uvit_fast.testing import assert_parity, assert_same_nonfinite

FP = (torch.float32, torch.float16)  # the interpreter's bf16 dots are wrong: bf16 is proven on GPUs
#: the ``ci`` profile's max_examples; tests ask for multiples of it (``deep`` raises it)
BASE = settings.default.max_examples


def examples(n: int) -> settings:
    """``n`` examples in the ``ci`` profile, scaled up with the profile's ``max_examples``."""
    return settings(max_examples=max(1, n * BASE // 10))


# ----------------------------------------------------------------------------- the case model
@dataclass
class Arg:
    """One tensor argument: its values (float32 master copy, in the argument's shape, or in the
    broadcast source shape for ``expand``) and how it is laid out in memory."""

    value: torch.Tensor
    layout: str = "contig"  # contig | transposed | strided | expand
    expand_to: Optional[Tuple[int, ...]] = None
    dim: int = -1  # the dim that ``strided`` slices
    dtype: Optional[torch.dtype] = None  # its own dtype (mixed-dtype calls); None: the case's


@dataclass
class Case:
    op: Callable
    ref: Callable
    args: Dict[str, Optional[Arg]]
    dtype: torch.dtype
    grads: Set[str] = field(default_factory=set)
    kwargs: Dict[str, object] = field(default_factory=dict)
    gen: Optional[torch.Generator] = None
    #: inputs whose NaN/Inf the kernel may legitimately keep out of some outputs that the reference
    #: spoils (see :func:`attention_case`)
    loose: Set[str] = field(default_factory=set)
    #: the float64 run's function when it is not ``ref`` (see :func:`_residual_ref64`)
    ref64: Optional[Callable] = None


def _store(a: Arg, dtype: torch.dtype, requires_grad: bool):
    """``(leaf, argument)``: the leaf owns the memory, the argument is the laid-out view of it."""
    v = a.value.to(dtype)
    if a.layout == "transposed":  # stored with dims ``dim`` and -1 swapped
        leaf = v.transpose(a.dim, -1).contiguous().requires_grad_(requires_grad)
        return leaf, leaf.transpose(a.dim, -1)
    if a.layout == "channels_last":  # (B, C, *spatial) stored as (B, *spatial, C)
        leaf = v.movedim(1, -1).contiguous().requires_grad_(requires_grad)
        return leaf, leaf.movedim(-1, 1)
    if a.layout == "strided":
        d = a.dim % v.dim()
        shape = list(v.shape)
        shape[d] *= 2
        big = torch.full(shape, float("nan"), dtype=dtype)  # gaps a kernel must not read
        idx = [slice(None)] * v.dim()
        idx[d] = slice(0, None, 2)
        big[tuple(idx)] = v
        leaf = big.requires_grad_(requires_grad)
        return leaf, leaf[tuple(idx)]
    if a.layout == "expand":
        leaf = v.clone().requires_grad_(requires_grad)
        return leaf, leaf.expand(a.expand_to)
    leaf = v.clone().requires_grad_(requires_grad)
    return leaf, leaf


def _build(case: Case, dtype: torch.dtype):
    leaves, args = {}, {}
    for name, a in case.args.items():
        if a is None:
            args[name] = None
            continue
        if dtype == torch.float64:  # the reference sees the values the kernel sees
            own = a.dtype or case.dtype
            leaves[name], args[name] = _store(Arg(a.value.to(own).double(), a.layout, a.expand_to, a.dim), dtype,
                                              name in case.grads)
            continue
        leaves[name], args[name] = _store(a, a.dtype or dtype, name in case.grads)
    return leaves, args


def _as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _run(case: Case):
    """Kernel, plain PyTorch in the same dtype, and float64: ``[(leaves, outputs)] * 3``."""
    runs = []
    for dtype, fn in ((case.dtype, "op"), (case.dtype, "ref"), (torch.float64, "ref")):
        leaves, args = _build(case, dtype)
        if fn == "op":
            out = case.op(**args, **case.kwargs, backend="triton")
        elif dtype == torch.float64 and case.ref64 is not None:
            out = case.ref64(**args, **case.kwargs)
        else:
            out = case.ref(**args, **case.kwargs)
        runs.append((leaves, _as_list(out)))
    return runs


def _describe(case: Case) -> str:
    parts = []
    for n, a in case.args.items():
        if a is not None:
            shape = tuple(a.expand_to) if a.layout == "expand" else tuple(a.value.shape)
            dt = f":{a.dtype}" if a.dtype is not None else ""
            parts.append(f"{n}{shape}:{a.layout}{dt}{'*' if n in case.grads else ''}")
    return f"{case.dtype} {case.kwargs} " + " ".join(parts)


def check_case(case: Case) -> None:
    """Outputs and every requested gradient against float64, by the 2x rule."""
    note(_describe(case))
    (k_leaves, k_out), (b_leaves, b_out), (r_leaves, r_out) = _run(case)
    assert len(k_out) == len(b_out)
    for i, (o, b, r) in enumerate(zip(k_out, b_out, r_out)):
        if o.dtype != b.dtype:
            raise AssertionError(f"output {i}: dtype {o.dtype} != reference {b.dtype}")
        assert_parity(o, b, r, name=f"output {i}")
        if o.requires_grad != b.requires_grad:
            raise AssertionError(f"output {i}: requires_grad {o.requires_grad} != reference {b.requires_grad}")
    if not case.grads:
        return
    gys = [torch.randn(o.shape, generator=case.gen) for o in k_out]
    for outs, leaves, dt in ((k_out, k_leaves, None), (b_out, b_leaves, None), (r_out, r_leaves, torch.float64)):
        pairs = [(o, g.to(dt or o.dtype)) for o, g in zip(outs, gys) if o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    for name, leaf in k_leaves.items():
        if name not in case.grads:
            if leaf.grad is not None:
                raise AssertionError(f"d{name}: a gradient for an input that does not require grad")
            continue
        if leaf.grad is None:
            raise AssertionError(f"d{name}: requested but None")
        if leaf.grad.dtype != leaf.dtype:
            raise AssertionError(f"d{name}: dtype {leaf.grad.dtype} != input dtype {leaf.dtype}")
        assert_parity(leaf.grad, b_leaves[name].grad, r_leaves[name].grad, name=f"d{name}")


def _no_new_nonfinite(out: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    """``out`` is finite wherever ``ref`` is (it may be finite where ``ref`` is not)."""
    bad = ~torch.isfinite(out) & torch.isfinite(ref)
    if bad.any():
        raise AssertionError(f"{name}: non-finite where the reference is finite at {bad.nonzero().tolist()[:5]}")


def check_nonfinite(case: Case, name: str, data) -> None:
    """Put NaN/+Inf/-Inf into a few elements of input ``name``: the forward is non-finite exactly
    where the float64 reference is (or, for ``case.loose``, no NaN/Inf where the reference has a
    number), gradients have no NaN/Inf where the reference's are finite, and the finite parts pass
    the 2x rule."""
    a = case.args[name]
    flat = a.value.reshape(-1)
    n_bad = data.draw(st.integers(1, min(3, flat.numel())), label="n_nonfinite")
    for _ in range(n_bad):
        pos = data.draw(st.integers(0, flat.numel() - 1), label="position")
        flat[pos] = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]), label="value")
    note(_describe(case) + f" non-finite in {name}")
    (k_leaves, k_out), (b_leaves, b_out), (r_leaves, r_out) = _run(case)
    for i, (o, b, r) in enumerate(zip(k_out, b_out, r_out)):
        if name in case.loose:
            _no_new_nonfinite(o, r, f"output {i}")
        else:
            assert_same_nonfinite(o, r, name=f"output {i}")
        ok = torch.isfinite(r) & torch.isfinite(b)
        assert_parity(o[ok], b[ok], r[ok], name=f"output {i} (finite part)")
    if not case.grads:
        return
    gys = [torch.randn(o.shape, generator=case.gen) for o in k_out]
    for outs, dt in ((k_out, None), (b_out, None), (r_out, torch.float64)):
        pairs = [(o, g.to(dt or o.dtype)) for o, g in zip(outs, gys) if o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    for n in case.grads:
        g, bg, rg = k_leaves[n].grad, b_leaves[n].grad, r_leaves[n].grad
        _no_new_nonfinite(g, rg, f"d{n}")
        ok = torch.isfinite(rg) & torch.isfinite(bg)
        assert_parity(g[ok], bg[ok], rg[ok], name=f"d{n} (finite part)")


def check_empty_batch(case: Case) -> None:
    """B = 0: whatever the reference does (an empty result and zero gradients, or an error)."""
    note(_describe(case))
    b_leaves, b_args = _build(case, case.dtype)
    try:
        b_out = _as_list(case.ref(**b_args, **case.kwargs))
    except Exception as exc:  # the reference's error is the spec
        with pytest.raises(type(exc)):
            _, k_args = _build(case, case.dtype)
            case.op(**k_args, **case.kwargs, backend="triton")
        return
    k_leaves, k_args = _build(case, case.dtype)
    k_out = _as_list(case.op(**k_args, **case.kwargs, backend="triton"))
    for i, (o, b) in enumerate(zip(k_out, b_out)):
        if o.shape != b.shape or o.dtype != b.dtype:
            raise AssertionError(f"output {i}: {tuple(o.shape)} {o.dtype} != reference {tuple(b.shape)} {b.dtype}")
    if not case.grads:
        return
    for outs in (k_out, b_out):
        pairs = [(o, torch.ones_like(o)) for o in outs if o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    for name in case.grads:
        g, bg = k_leaves[name].grad, b_leaves[name].grad
        if g is None or g.shape != bg.shape:
            raise AssertionError(f"d{name}: {None if g is None else tuple(g.shape)} != reference {tuple(bg.shape)}")
        if not torch.equal(g, bg):  # e.g. a weight gradient summed over no rows: zeros, not poison
            raise AssertionError(f"d{name}: {g} != reference {bg}")


# ----------------------------------------------------------------------------- strategies
#: sizes: 1, primes and tile tails (17 = 16 + 1, 33 = 32 + 1, ...)
SMALL = (1, 2, 3, 5, 7)
WIDTHS = (1, 2, 3, 5, 8, 13, 16, 17, 31, 33, 64, 65)


def _gen(data) -> torch.Generator:
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))


def _randn(gen, *shape, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale + offset


def _layout(data, shape, label, *, allow=("contig", "transposed", "strided")) -> Tuple[str, int]:
    if len(shape) < 2:
        allow = tuple(x for x in allow if x != "transposed")
    layout = data.draw(st.sampled_from(allow), label=f"{label} layout")
    dim = -1
    if layout == "strided":
        dim = data.draw(st.integers(0, len(shape) - 1), label=f"{label} strided dim")
    elif layout == "transposed":
        dim = data.draw(st.integers(0, len(shape) - 2), label=f"{label} transposed dim")
    return layout, dim


def _arg(data, gen, label, shape, *, scale=1.0, offset=0.0, allow=("contig", "transposed", "strided")) -> Arg:
    layout, dim = _layout(data, shape, label, allow=allow)
    return Arg(_randn(gen, *shape, scale=scale, offset=offset), layout, dim=dim)


def _broadcast_arg(data, gen, label, full, *, n_lead=None, scale=1.0, offset=0.0) -> Arg:
    """A tensor that the op broadcasts along its first ``n_lead`` dims (default: all but the
    last): passed at its full shape, or with size-1 dims there, or as a stride-0 ``expand``."""
    n_lead = len(full) - 1 if n_lead is None else n_lead
    ones = tuple(data.draw(st.booleans(), label=f"{label} broadcast dim {i}") for i in range(n_lead))
    small = tuple(1 if o else s for o, s in zip(ones, full[:n_lead])) + tuple(full[n_lead:])
    if small != tuple(full) and data.draw(st.booleans(), label=f"{label} expanded view"):
        return Arg(_randn(gen, *small, scale=scale, offset=offset), "expand", expand_to=tuple(full))
    return _arg(data, gen, label, small, scale=scale, offset=offset)


def _grads(data, names) -> Set[str]:
    return set(data.draw(st.sets(st.sampled_from(sorted(names))), label="requires_grad"))


def _batch(data, batch):
    return data.draw(batch if batch is not None else st.sampled_from((1, 2, 3)), label="B")


# ----------------------------------------------------------------------------- op cases
#: LayerNorm of two values is +-1 (up to eps) and ill-conditioned where they are within ~sqrt(eps):
#: there the 2x comparison of two roundings is a coin toss, so the norms skip D = 2 (1 and 3 stay)
ADALN_WIDTHS = tuple(d for d in WIDTHS if d != 2)


def adaln_case(data, *, residual=False, batch=None, widths=ADALN_WIDTHS) -> Case:
    gen = _gen(data)
    dtype = data.draw(st.sampled_from(FP), label="dtype")
    B = _batch(data, batch)
    L = data.draw(st.sampled_from(SMALL + (16, 17)), label="L")
    D = data.draw(st.sampled_from(widths), label="D")
    mods = ("gate", "shift", "scale") if residual else ("shift", "scale")
    args: Dict[str, Optional[Arg]] = {}
    if residual or data.draw(st.booleans(), label="modulated"):
        x_shape = (B, L, D)
    else:  # plain LayerNorm over the last dim of any rank
        x_shape = ((B, L, D), (B, D), (D,))[data.draw(st.integers(0, 2), label="x rank")]
        mods = ()
    args["x"] = _arg(data, gen, "x", x_shape, scale=2.0, offset=0.5)
    if residual:
        args["branch"] = _arg(data, gen, "branch", x_shape)
    for m in ("gate", "shift", "scale") if residual else ("shift", "scale"):
        if m not in mods or not data.draw(st.booleans(), label=f"has {m}"):
            args[m] = None
            continue
        per_token = data.draw(st.booleans(), label=f"{m} per token")
        full = (B, L, D) if per_token else (B, D)
        args[m] = _broadcast_arg(data, gen, m, full, scale=0.5)
        if m != "gate":  # shift/scale in another dtype than x (fp32 conditioning, fp16 activations);
            # a wider gate widens x_new, which F.layer_norm then refuses with narrower weights
            args[m].dtype = data.draw(st.sampled_from((None,) + FP), label=f"{m} dtype")
    for name, off in (("weight", 1.0), ("bias", 0.0)):
        args[name] = _arg(data, gen, name, (D,), scale=0.5, offset=off) if data.draw(st.booleans(), label=f"has {name}") else None
    kwargs = dict(
        eps=data.draw(st.sampled_from((1e-5, 1e-6)), label="eps"),
        scale_offset=data.draw(st.sampled_from((0.0, 1.0)), label="scale_offset"),
    )
    present = [n for n, a in args.items() if a is not None]
    if residual:
        case = Case(ops.residual_adaln_layer_norm, ops.residual_adaln_layer_norm_reference, args, dtype,
                    _grads(data, present), kwargs, gen)
        case.ref64 = _residual_ref64(dtype)
        return case
    return Case(ops.adaln_layer_norm, ops.adaln_layer_norm_reference, args, dtype, _grads(data, present), kwargs, gen)


def _residual_ref64(dtype: torch.dtype) -> Callable:
    """The float64 specification of the residual op: ``h`` normalises the returned ``x_new``,
    a tensor in the inputs' dtype, so the float64 run rounds ``x_new`` to it before the norm (the
    plain PyTorch run does the same). Without that, the shared x_new rounding dominates both
    errors when ``h`` is fp32 (fp16 x with an fp32 scale) and the 2x comparison is a coin toss."""
    def ref(x, branch, gate=None, shift=None, scale=None, weight=None, bias=None, eps=1e-5, scale_offset=1.0):
        x_new, _ = ops.residual_adaln_layer_norm_reference(x, branch, gate)
        rounded = x_new.to(dtype).to(x_new.dtype)
        return x_new, ops.adaln_layer_norm_reference(rounded, shift, scale, weight, bias, eps, scale_offset)
    return ref


def skip_case(data, *, batch=None) -> Case:
    gen = _gen(data)
    dtype = data.draw(st.sampled_from(FP), label="dtype")
    B = _batch(data, batch)
    L = data.draw(st.sampled_from(SMALL + (17, 33)), label="L")
    D = data.draw(st.sampled_from(WIDTHS), label="D")
    N = data.draw(st.sampled_from(WIDTHS), label="N")
    shape = (B, L, D) if data.draw(st.booleans(), label="3-D") else (B * L, D)
    args = {
        "h": _arg(data, gen, "h", shape),
        "skip": _arg(data, gen, "skip", shape),
        "weight": _arg(data, gen, "weight", (N, 2 * D), scale=(2 * D) ** -0.5),
        "bias": _arg(data, gen, "bias", (N,)) if data.draw(st.booleans(), label="has bias") else None,
    }
    present = [n for n, a in args.items() if a is not None]
    return Case(ops.skip_concat_linear, ops.skip_concat_linear_reference, args, dtype, _grads(data, present), {}, gen)


def patch_embed_case(data, *, video=False, batch=None) -> Case:
    gen = _gen(data)
    dtype = data.draw(st.sampled_from(FP), label="dtype")
    B = _batch(data, batch)
    C = data.draw(st.sampled_from((1, 3, 4)), label="C")
    D = data.draw(st.sampled_from((1, 5, 8, 17, 33)), label="D")
    n = 3 if video else 2
    patch = tuple(data.draw(st.sampled_from((1, 2, 3)), label=f"p{i}") for i in range(n))
    grid = tuple(data.draw(st.sampled_from((1, 2, 3, 5)), label=f"g{i}") for i in range(n))
    spatial = tuple(g * p for g, p in zip(grid, patch))
    L = math.prod(grid)
    args: Dict[str, Optional[Arg]] = {}
    x_shape = (B, C, *spatial)
    args["x"] = _arg(data, gen, "x", x_shape, allow=("contig", "transposed", "strided", "channels_last"))
    args["weight"] = _arg(data, gen, "weight", (D, C, *patch), scale=(C * math.prod(patch)) ** -0.5)
    args["bias"] = _arg(data, gen, "bias", (D,)) if data.draw(st.booleans(), label="has bias") else None
    E = data.draw(st.sampled_from((0, 1, 2)), label="E")
    args["prefix"] = _broadcast_arg(data, gen, "prefix", (B, E, D), n_lead=1) if E else None
    if data.draw(st.booleans(), label="has pos_embed"):
        args["pos_embed"] = _broadcast_arg(data, gen, "pos_embed", (B, E + L, D), n_lead=1, scale=0.5)
    else:
        args["pos_embed"] = None
    present = [n for n, a in args.items() if a is not None]
    return Case(ops.patchify_embed, ops.patchify_embed_reference, args, dtype, _grads(data, present), {}, gen)


def decoder_case(data, *, batch=None) -> Case:
    gen = _gen(data)
    dtype = data.draw(st.sampled_from(FP), label="dtype")
    B = _batch(data, batch)
    video = data.draw(st.booleans(), label="video")
    n = 3 if video else 2
    patch = tuple(data.draw(st.sampled_from((1, 2, 3)), label=f"p{i}") for i in range(n))
    grid = tuple(data.draw(st.sampled_from((1, 2, 3, 5)), label=f"g{i}") for i in range(n))
    C = data.draw(st.sampled_from((1, 3, 4)), label="C")
    Dm = data.draw(st.sampled_from((1, 5, 8, 17, 33)), label="D")
    E = data.draw(st.sampled_from((0, 1, 2)), label="extras")
    K = math.prod(patch) * C
    args = {
        "tokens": _arg(data, gen, "tokens", (B, E + math.prod(grid), Dm)),
        "weight": _arg(data, gen, "weight", (K, Dm), scale=Dm ** -0.5),
        "bias": _arg(data, gen, "bias", (K,)) if data.draw(st.booleans(), label="has bias") else None,
    }
    square = not video and grid[0] == grid[1] and data.draw(st.booleans(), label="grid=None")
    kwargs = dict(patch_size=patch, grid=None if square else grid, extras=E)
    present = [n for n, a in args.items() if a is not None]
    return Case(ops.decoder_unpatchify, ops.decoder_unpatchify_reference, args, dtype, _grads(data, present), kwargs, gen)


HEAD_DIMS = (1, 8, 16, 20, 33, 64, 72)
SEQ = (1, 2, 5, 13, 17, 33, 65)


def _packed_reference(qkv, *, causal=False, scale=None):
    return ops.attention_reference(*qkv.unbind(2), causal=causal, scale=scale)


def attention_case(data, *, packed=False, batch=None, seqs=SEQ) -> Case:
    gen = _gen(data)
    dtype = data.draw(st.sampled_from(FP), label="dtype")
    B = _batch(data, st.sampled_from((1, 2)) if batch is None else batch)
    H = data.draw(st.sampled_from((1, 2, 3)), label="H")
    D = data.draw(st.sampled_from(HEAD_DIMS), label="head_dim")
    Lq = data.draw(st.sampled_from(seqs), label="Lq")
    Lk = Lq if packed or data.draw(st.booleans(), label="Lk == Lq") else data.draw(st.sampled_from(seqs), label="Lk")
    kwargs = dict(
        causal=data.draw(st.booleans(), label="causal"),
        scale=data.draw(st.sampled_from((None, 0.5)), label="scale"),
    )
    if packed:
        args = {"qkv": _arg(data, gen, "qkv", (B, Lq, 3, H, D))}
        op, ref = ops.attention_qkvpacked, _packed_reference
    else:
        args = {
            "q": _arg(data, gen, "q", (B, Lq, H, D)),
            "k": _arg(data, gen, "k", (B, Lk, H, D)),
            "v": _arg(data, gen, "v", (B, Lk, H, D)),
        }
        op, ref = ops.attention, ops.attention_reference
    # causal: the reference multiplies the masked (zero) probabilities by future values, so an
    # Inf/NaN in a future v spoils earlier rows (0 * inf); the kernel skips fully masked key tiles
    loose = {"v", "qkv"} if kwargs["causal"] else set()
    return Case(op, ref, args, dtype, _grads(data, list(args)), kwargs, gen, loose)


def _video_embed_case(data, **kw):
    return patch_embed_case(data, video=True, **kw)


def _residual_case(data, **kw):
    return adaln_case(data, residual=True, **kw)


def _packed_case(data, **kw):
    return attention_case(data, packed=True, **kw)


#: every op, by name: the builder of its cases
BUILDERS = {
    "adaln_layer_norm": adaln_case,
    "residual_adaln_layer_norm": _residual_case,
    "skip_concat_linear": skip_case,
    "patchify_embed_2d": patch_embed_case,
    "patchify_embed_3d": _video_embed_case,
    "decoder_unpatchify": decoder_case,
    "attention": attention_case,
    "attention_qkvpacked": _packed_case,
}
#: attention costs ~10x the others under the interpreter: shorter sequences in the quick tests
QUICK_KW = {"attention": dict(seqs=(1, 5, 17)), "attention_qkvpacked": dict(seqs=(1, 5, 17))}
OPS = sorted(BUILDERS)
#: the quick subset (-m "not slow") leaves out the attention ops' property tests: 1.5-4 min each
#: on 2 loaded cores even at the short QUICK_KW sequences (the full suite runs them)
QUICK_OPS = [pytest.param(op, marks=pytest.mark.slow) if op.startswith("attention") else op for op in OPS]


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("op", QUICK_OPS)
@examples(3)
@given(data=st.data())
def test_parity_quick(op, data):
    """Forward and requested gradients vs float64 (2x rule), random shapes, layouts, dtypes."""
    check_case(BUILDERS[op](data, **QUICK_KW.get(op, {})))


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
@examples(8)
@given(data=st.data())
def test_parity(op, data):
    check_case(BUILDERS[op](data))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's, on NaN/Inf data inside the interpreter
@pytest.mark.parametrize("op", QUICK_OPS)
@examples(3)
@given(data=st.data())
def test_nonfinite_inputs_propagate_as_reference(op, data):
    case = BUILDERS[op](data, **QUICK_KW.get(op, {}))
    name = data.draw(st.sampled_from(sorted(n for n, a in case.args.items() if a is not None)), label="poisoned")
    check_nonfinite(case, name, data)


@pytest.mark.parametrize("op", OPS)
@examples(4)
@given(data=st.data())
def test_empty_batch_as_reference(op, data):
    check_empty_batch(BUILDERS[op](data, batch=st.just(0), **QUICK_KW.get(op, {})))


@examples(20)
@given(data=st.data())
def test_patchify_unpatchify_round_trip(data):
    """``unpatchify(patchify(x)) == x`` for any layout of x, and patchify is the token layout of the
    patch embedding: ``patchify(x) @ W.reshape(D, C, *p).movedim(1, -1).flatten(1).T == conv``."""
    gen = _gen(data)
    video = data.draw(st.booleans(), label="video")
    n = 3 if video else 2
    B = data.draw(st.sampled_from((0, 1, 2)), label="B")
    C = data.draw(st.sampled_from((1, 3, 4)), label="C")
    patch = tuple(data.draw(st.sampled_from((1, 2, 3)), label=f"p{i}") for i in range(n))
    grid = tuple(data.draw(st.sampled_from((1, 2, 3, 5)), label=f"g{i}") for i in range(n))
    shape = (B, C, *(g * p for g, p in zip(grid, patch)))
    a = _arg(data, gen, "x", shape, allow=("contig", "transposed", "strided", "channels_last"))
    _, x = _store(Arg(a.value.double(), a.layout, dim=a.dim), torch.float64, False)
    tokens = ops.patchify(x, patch)
    assert tokens.shape == (B, math.prod(grid), math.prod(patch) * C)
    back = ops.unpatchify(tokens, patch, C, None if (not video and grid[0] == grid[1]) else grid)
    assert torch.equal(back, x)
    w = _randn(gen, 4, C, *patch).double()
    conv = ops.patchify_embed_reference(x, w)
    assert torch.allclose(tokens @ w.movedim(1, -1).reshape(4, -1).T, conv, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- regressions
# Minimal deterministic reductions of what the property tests found.
@pytest.mark.parametrize("which", ["weight", "bias"])
def test_regression_adaln_strided_affine(which):
    """A strided weight/bias view (stride 2) was read at unit stride: the second element came
    from the gap (NaN here, silently another value in real memory)."""
    x = torch.tensor([[[0.3, -1.2, 2.0]]])
    big = torch.tensor([1.5, float("nan"), -0.5, float("nan"), 2.0, float("nan")])
    kw = {which: big[::2]}
    out = ops.adaln_layer_norm(x, **kw, backend="triton")
    ref = ops.adaln_layer_norm_reference(x, **kw)
    torch.testing.assert_close(out, ref)


def test_regression_decoder_unpatchify_strided_bias():
    """The decoder read a strided bias view at unit stride."""
    tokens = torch.randn(1, 4, 3)
    weight = torch.randn(8, 3)
    bias = torch.arange(16.0)[::2]
    out = ops.decoder_unpatchify(tokens, weight, bias, patch_size=2, grid=(2, 2), backend="triton")
    ref = ops.decoder_unpatchify_reference(tokens, weight, bias, patch_size=2, grid=(2, 2))
    torch.testing.assert_close(out, ref)


def test_regression_patchify_embed_strided_bias():
    """The patch embedding read a strided bias view at unit stride."""
    x = torch.randn(1, 2, 4, 4)
    weight = torch.randn(5, 2, 2, 2)
    bias = torch.arange(10.0)[::2]
    out = ops.patchify_embed(x, weight, bias, backend="triton")
    ref = ops.patchify_embed_reference(x, weight, bias)
    torch.testing.assert_close(out, ref)


def test_regression_residual_x_new_requires_grad_as_reference():
    """x_new = x + gate * branch does not depend on the norm's weight: with only the weight
    requiring grad, x_new must not require grad (it did, unlike the reference)."""
    x, branch = torch.randn(1, 2, 4), torch.randn(1, 2, 4)
    weight = torch.ones(4, requires_grad=True)
    x_new, h = ops.residual_adaln_layer_norm(x, branch, weight=weight, backend="triton")
    rx_new, rh = ops.residual_adaln_layer_norm_reference(x, branch, weight=weight)
    assert (x_new.requires_grad, h.requires_grad) == (rx_new.requires_grad, rh.requires_grad) == (False, True)
    x.requires_grad_(True)
    x_new, _ = ops.residual_adaln_layer_norm(x, branch, weight=weight, backend="triton")
    assert x_new.requires_grad


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's, on NaN/Inf data inside the interpreter
@pytest.mark.parametrize("Lk", [5, 40])
def test_regression_attention_minus_inf_scores_in_first_key_block(Lk):
    """-inf in keys gives -inf scores; the reference's softmax gives them weight 0. When a whole
    first key block scored -inf, the online softmax computed exp(-inf - -inf) = NaN and the row
    stayed NaN although later keys were finite."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 3, 1, 16, generator=g).abs()
    k, v = torch.randn(2, 1, Lk, 1, 16, generator=g)
    k[:, : Lk - 2, :, 0] = float("-inf")
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref_leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
    out = ops.attention(*leaves, backend="triton")
    ref = ops.attention_reference(*ref_leaves)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    dout = torch.randn(out.shape, generator=g)
    out.backward(dout)
    ref.backward(dout.double())
    for name, a, r in zip("qkv", leaves, ref_leaves):
        assert_same_nonfinite(a.grad, r.grad, name=f"d{name}")
        ok = torch.isfinite(r.grad)
        torch.testing.assert_close(a.grad.double()[ok], r.grad[ok], rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's, on NaN/Inf data inside the interpreter
def test_regression_attention_nan_row_spares_keys_it_cannot_see():
    """Causal: a query row that is NaN (its score with an +inf key is +inf) must not spoil the
    key gradients of the keys it is masked from; the reference's masked_fill passes them no
    gradient. The kernel's backward multiplied the masked zeros by the row's NaN."""
    q = torch.tensor([1.0, -1.0, -0.5, -2.0, -1.5]).reshape(1, 5, 1, 1)
    k = torch.tensor([float("inf"), 0.5, -1.0, 2.0, 0.25]).reshape(1, 5, 1, 1)
    v = torch.tensor([0.3, -0.7, 1.1, 0.2, -0.4]).reshape(1, 5, 1, 1)
    dout = torch.tensor([0.5, -1.0, 0.25, 2.0, 1.0]).reshape(1, 5, 1, 1)
    grads = []
    for fn, dt in ((lambda *a: ops.attention(*a, causal=True, backend="triton"), torch.float32),
                   (lambda *a: ops.attention_reference(*a, causal=True), torch.float64)):
        leaves = [t.to(dt).clone().requires_grad_(True) for t in (q, k, v)]
        fn(*leaves).backward(dout.to(dt))
        grads.append(leaves[1].grad)
    dk, ref_dk = grads
    assert torch.isfinite(ref_dk[0, 1:]).all()
    assert_same_nonfinite(dk, ref_dk, name="dk")
    torch.testing.assert_close(dk[0, 1:].double(), ref_dk[0, 1:], rtol=1e-5, atol=1e-6)
