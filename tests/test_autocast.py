"""Mixed precision as users run it: every model family at its preset depth and token layout
(only the width shrunk, for CPU time), under ``torch.autocast`` bf16/fp16 and cast wholesale to
bf16/fp16, forward and backward.

The rule: a fused model computes what the plain model (``fused=False``, the upstream math)
computes, in the same dtypes -- every module's output dtype, the output dtype and every gradient's
dtype are the plain model's -- and its error against a float64 copy is at most 3x the plain model's.
Under autocast the plain path's residual stream is float32 wherever upstream's is (the in-blocks
of U-ViT: the patch tokens are cat-ed with float32 time / label tokens and float32 pos_embed), and
the autocast dtype where upstream's is (U-ViT's out-blocks, after the long-skip linear): the fused
path must not narrow it.

CPU autocast leaves ``layer_norm`` in the input dtype while CUDA autocast runs it in float32 (so it
returns float32): :func:`test_dtypes_follow_cuda_autocast` checks the CUDA rules without a GPU, on
fake CUDA tensors (``FakeTensorMode``), where the Triton path runs the custom ops' fake kernels.
Models run in ``eval()``: DiT drops labels at random in training mode.
"""
from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode

import uvit_fast
from uvit_fast import create_model, list_models
from uvit_fast.layers import set_fused
from uvit_fast.models import UViT, UViTT2I
from uvit_fast.ops import skip_concat_linear, skip_concat_linear_reference
from uvit_fast.testing import CustomOpRecorder, max_abs_err

ON_CUDA = torch.cuda.is_available()
# The fused model's PyTorch path on CPU tensors, as a CPU user runs it: "auto" gives the PyTorch
# references of every op and SDPA for attention. (backend="torch" would run attention_reference,
# the einsum specification, which under autocast rounds the scores to bf16/fp16 where SDPA and the
# Triton kernel keep them in fp32: up to ~4x SDPA's gradient error on CLIP's biases.)
CPU_PATH = "auto"
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Preset depth and token layout; width 64 with head dim 32 (CLIP's text tower and ViViT too).
FAMILIES = {
    "uvit_uncond": ("cifar10_uvit_small", dict(embed_dim=64, num_heads=2)),  # 13 blocks, 1 + 256 tokens
    "uvit_cond": ("imagenet256_uvit_huge", dict(embed_dim=64, num_heads=2)),  # 29 blocks, 2 + 256 tokens
    "uvit_t2i": ("mscoco_uvit_small", dict(embed_dim=64, num_heads=2)),  # 13 blocks, 1 + 77 + 256 tokens
    "dit": ("DiT-XL/2", dict(hidden_size=64, num_heads=2)),  # 28 blocks, 256 tokens
    "vit": ("vit_base_patch16_224", dict(embed_dim=64, num_heads=2)),  # 12 blocks, 197 tokens
    "vivit": ("vivit_b_16x2_model2", dict(embed_dim=64, num_heads=2)),  # 12 + 4 blocks, 16 x 197 + 17 tokens
    "clip": ("clip_vit_b32", dict(vision_width=64, vision_heads=2, transformer_width=64, transformer_heads=2,
                                  embed_dim=32)),  # 12 + 12 blocks, 50 and 77 tokens
}
# The quick set: preset depth and the same kinds of tokens (extras, context, class tokens), fewer patches.
FAST = {
    "uvit_uncond": ("cifar10_uvit_small", dict(embed_dim=32, num_heads=1, img_size=8)),
    "uvit_cond": ("imagenet256_uvit_huge", dict(embed_dim=32, num_heads=1, img_size=8)),
    "uvit_t2i": ("mscoco_uvit_small", dict(embed_dim=32, num_heads=1, img_size=8, clip_dim=40)),
    "dit": ("DiT-XL/2", dict(hidden_size=32, num_heads=1, input_size=8)),
    "vit": ("vit_base_patch16_224", dict(embed_dim=32, num_heads=1, img_size=64)),
    "vivit": ("vivit_b_16x2_model2", dict(embed_dim=32, num_heads=1, img_size=32, num_frames=4)),
    "clip": ("clip_vit_b32", dict(vision_width=32, vision_heads=1, transformer_width=32, transformer_heads=1,
                                  embed_dim=16, img_size=64, context_length=19)),
}
# 5 blocks (U-ViT: two long skips) and few tokens, for the Triton kernels under the interpreter
SMALL = {
    "uvit_uncond": ("cifar10_uvit_small", dict(embed_dim=64, num_heads=2, depth=4, img_size=16)),
    "uvit_cond": ("imagenet256_uvit_huge", dict(embed_dim=64, num_heads=2, depth=4, img_size=8)),
    "uvit_t2i": ("mscoco_uvit_small", dict(embed_dim=64, num_heads=2, depth=4, img_size=16, clip_dim=40,
                                            num_clip_token=13)),
    "dit": ("DiT-XL/2", dict(hidden_size=64, num_heads=2, depth=5, input_size=8)),
    "vit": ("vit_base_patch16_224", dict(embed_dim=64, num_heads=2, depth=5, img_size=64)),
    "vivit": ("vivit_b_16x2_model2", dict(embed_dim=64, num_heads=2, depth=3, temporal_depth=2, img_size=32,
                                          num_frames=4)),
    "clip": ("clip_vit_b32", dict(vision_width=64, vision_heads=2, transformer_width=64, transformer_heads=2,
                                  embed_dim=32, img_size=64, vision_layers=3, transformer_layers=2,
                                  context_length=19)),
}
# (table, dtype) pairs: the quick set in bf16, everything else in the slow set; the full token
# counts in fp16 repeat the bf16 ones at the slowest size, so they are extended (UVIT_FAST_EXTENDED=1)
CASES = [pytest.param("fast", "bf16", id="fast-bf16"), pytest.param("fast", "fp16", id="fast-fp16",
         marks=pytest.mark.slow)] + [
    pytest.param("full", dt, id=f"full-{dt}",
                 marks=[pytest.mark.slow] + ([pytest.mark.extended] if dt == "fp16" else []))
    for dt in LOW]
TABLES = {"fast": FAST, "full": FAMILIES, "small": SMALL}


def _family_cases():
    """(family, table, dt) for every family and case; ViViT at full size (12 + 4 blocks over
    16 x 197 + 17 tokens: 20 s a run on 2 cores) is extended, its fast-table run stays."""
    for case in CASES:
        table, dt = case.values
        for family in FAMILIES:
            marks = list(case.marks)
            if family == "vivit" and table == "full" and pytest.mark.extended not in marks:
                marks.append(pytest.mark.extended)
            yield pytest.param(family, table, dt, id=f"{family}-{case.id}", marks=marks)


# --------------------------------------------------------------------------- helpers
def _randomize_(model: torch.nn.Module) -> None:
    """Random weights of a sane scale everywhere (DiT zero-initialises its gates and output)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=g) * (0.7 / math.sqrt(fan_in)))
            elif p.dim() == 1:
                is_norm_weight = name.endswith(".weight") and ("norm" in name or ".ln_" in name)
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if is_norm_weight else 0.0))


def _models(family, table):
    """(fused, plain, float64 plain) with the same random weights, in eval mode."""
    name, overrides = table[family]
    fused = create_model(name, **overrides).eval()
    _randomize_(fused)
    plain = set_fused(copy.deepcopy(fused), False)
    ref = copy.deepcopy(plain).double()
    return fused, plain, ref


def _inputs(model, dtype=None):
    torch.manual_seed(1)
    ex = model.example_inputs(2)
    return tuple(e.to(dtype) if dtype is not None and e.is_floating_point() else e for e in ex)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _dtypes_of(model):
    """Forward hooks recording every named module's output dtypes; returns (record, handles)."""
    rec = {}

    def hook(name):
        def f(mod, inputs, out):
            outs = out if isinstance(out, tuple) else (out,)
            rec[name] = tuple(o.dtype for o in outs if isinstance(o, torch.Tensor))
        return f

    # not on the modules the fused path routes through ops.fused_linear / fused_mlp without calling them
    # (each block's attention linears, its MLP and the MLP's children): a hook on one keeps it on its own
    # forward (uvit_fast.layers.is_plain_linear), so hooking them would keep the fused linears from running
    routed = set()
    for blk in model.modules():
        if hasattr(blk, "attn") and hasattr(blk, "mlp"):
            routed |= {id(m) for m in blk.mlp.modules()}
            routed |= {id(getattr(blk.attn, a)) for a in ("qkv", "proj", "out_proj") if hasattr(blk.attn, a)}
    return rec, [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n and id(m) not in routed]


def _run(model, inputs, autocast_dtype=None, backend="auto"):
    """Forward (recording module dtypes) and backward of a fixed random projection of the output."""
    model.zero_grad(set_to_none=True)
    rec, handles = _dtypes_of(model)
    ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    try:
        with uvit_fast.use_backend(backend):
            with ctx:
                out = _first(model(*inputs))
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
            (out.double() * g).sum().backward()
    finally:
        for h in handles:
            h.remove()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out, rec, grads


def _check_against_plain(family, fused_run, plain_run, ref_run, factor=3.0):
    (out_f, rec_f, g_f), (out_p, rec_p, g_p), (out_r, _, g_r) = fused_run, plain_run, ref_run
    assert out_f.dtype == out_p.dtype, f"{family}: output {out_f.dtype}, plain path {out_p.dtype}"
    both = [n for n in rec_p if n in rec_f]
    assert both, f"{family}: no module ran on both paths"
    wrong = {n: (rec_f[n], rec_p[n]) for n in both if rec_f[n] != rec_p[n]}
    assert not wrong, f"{family}: module output dtypes (fused, plain) differ: {wrong}"
    assert torch.isfinite(out_f).all(), f"{family}: non-finite output"
    err, base = max_abs_err(out_f, out_r), max_abs_err(out_p, out_r)
    assert err <= factor * base + 1e-6 * out_r.abs().max().item(), (
        f"{family}: output error {err:.3e} > {factor} x the plain path's {base:.3e}")
    assert set(g_f) == set(g_p) == set(g_r), f"{family}: different sets of parameters got gradients"
    for n, gr in g_r.items():
        assert g_f[n].dtype == g_p[n].dtype, f"{family} {n}: grad dtype {g_f[n].dtype}, plain {g_p[n].dtype}"
        err, base = max_abs_err(g_f[n], gr), max_abs_err(g_p[n], gr)
        atol = 1e-3 * gr.abs().max().item() + 1e-30
        assert err <= factor * base + atol, (
            f"{family} {n}: gradient error {err:.3e} > {factor} x the plain path's {base:.3e} + {atol:.1e}")


# --------------------------------------------------------------------------- autocast, PyTorch path
@pytest.mark.parametrize("family, table, dt", _family_cases())
def test_autocast_at_preset_depth_matches_plain(family, table, dt):
    fused, plain, ref = _models(family, TABLES[table])
    inputs = _inputs(fused)
    runs = [_run(fused, inputs, LOW[dt], backend=CPU_PATH), _run(plain, inputs, LOW[dt]),
            _run(ref, _inputs(ref, torch.float64))]
    _check_against_plain(family, *runs)
    rec = runs[0][1]
    if family.startswith("uvit"):
        # the residual stream is not narrowed: float32 through the in-blocks, as upstream's
        assert rec["in_blocks.0"] == (torch.float32,) and rec["mid_block"] == (torch.float32,)
        assert rec["out_blocks.0"] == (LOW[dt],)


# --------------------------------------------------------------------------- low-precision weights
@pytest.mark.parametrize("family, table, dt", _family_cases())
def test_model_cast_to_low_precision_matches_plain(family, table, dt):
    """``model.to(torch.bfloat16)`` (no autocast) runs on the fused path as on the plain one."""
    fused, plain, ref = _models(family, TABLES[table])
    fused, plain = fused.to(LOW[dt]), plain.to(LOW[dt])
    inputs = _inputs(fused, LOW[dt])
    runs = [_run(fused, inputs, backend=CPU_PATH), _run(plain, inputs), _run(ref, _inputs(ref, torch.float64))]
    _check_against_plain(family, *runs)
    assert runs[0][0].dtype == LOW[dt]


# --------------------------------------------------------------------------- Triton kernels (fp16)
# the default run keeps autocast for U-ViT (long skips), DiT (adaLN) and CLIP (fp32 LayerNorm, causal
# text); the other combinations (fp16 weights: 30 s each on the interpreter since the linears run
# there too) are extended (UVIT_FAST_EXTENDED=1)
_TRITON_DEFAULT = {("uvit_cond", "autocast"), ("dit", "autocast"), ("clip", "autocast")}


@pytest.mark.slow
@pytest.mark.skipif(ON_CUDA, reason="the interpreter run; on a GPU the same test runs with the real kernels below")
@pytest.mark.parametrize("family, mode", [
    pytest.param(f, m, id=f"{f}-{m}", marks=[] if (f, m) in _TRITON_DEFAULT else [pytest.mark.extended])
    for m in ("autocast", "weights") for f in SMALL])
def test_fp16_on_triton_kernels_matches_plain(family, mode):
    """fp16 (the interpreter's bf16 ``tl.dot`` is wrong), 5 blocks, every kernel forward and backward."""
    fused, plain, ref = _models(family, SMALL)
    if mode == "weights":
        fused, plain = fused.half(), plain.half()
    inputs = _inputs(fused, torch.float16 if mode == "weights" else None)
    ac = torch.float16 if mode == "autocast" else None
    with CustomOpRecorder() as ops:
        fused_run = _run(fused, inputs, ac, backend="triton")
    runs = [fused_run, _run(plain, inputs, ac), _run(ref, _inputs(ref, torch.float64))]
    _check_against_plain(family, *runs)
    # the linears: fused_linear (qkv, proj) and its backward GEMMs, which the MLP's fused_mlp_fc1/fc2 also run
    assert any("fused_mlp_fc1" in o for o in ops.ops) and any("fused_mlp_fc2" in o for o in ops.ops), ops.ops
    wanted = ["attention", "layer_norm", "fused_linear"] + (["patchify_embed"] if family != "clip" else [])
    wanted += ["skip_concat_linear"] if family.startswith("uvit") else []
    wanted += ["decoder_unpatchify"] if family.startswith(("uvit", "dit")) else []
    for part in wanted:
        assert any(part in o and "backward" not in o and "bwd" not in o for o in ops.ops), (part, ops.ops)
        assert any(part in o and ("backward" in o or "bwd" in o) for o in ops.ops), (part, ops.ops)


# --------------------------------------------------------------------------- the long skip, mixed dtypes
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("h_dt, skip_dt", [(torch.float16, torch.float32), (torch.float32, torch.float16),
                                           (torch.float32, torch.float32), (torch.float16, torch.float16)])
def test_skip_concat_linear_mixed_dtypes_under_autocast(h_dt, skip_dt, backend):
    """U-ViT under autocast hands the out-blocks' skip linear h in the autocast dtype and a float32
    skip (or float32 h after the mid block). The reference ``linear(cat([h, skip]))`` promotes in the
    cat, then autocast casts to fp16: the fused op gives the same values, dtypes and gradient dtypes."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, 77, 72, generator=g).to(h_dt).requires_grad_()
    skip = torch.randn(1, 77, 72, generator=g).to(skip_dt).requires_grad_()
    w = (torch.randn(72, 144, generator=g) / 12).requires_grad_()
    b = torch.randn(72, generator=g).requires_grad_()
    dy = torch.randn(1, 77, 72, generator=g)
    with torch.autocast("cpu", dtype=torch.float16):
        out = skip_concat_linear(h, skip, w, b, backend=backend)
        ref = skip_concat_linear_reference(h, skip, w, b)
    assert out.dtype == ref.dtype == torch.float16
    got = torch.autograd.grad(out, (h, skip, w, b), dy.half())
    want = torch.autograd.grad(ref, (h, skip, w, b), dy.half())
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    for a, e, name in zip(got, want, ("h", "skip", "weight", "bias")):
        assert a.dtype == e.dtype, f"grad of {name}: {a.dtype} vs the reference's {e.dtype}"
        torch.testing.assert_close(a.float(), e.float(), rtol=5e-3, atol=5e-3, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_skip_concat_linear_mixed_dtypes_without_autocast(backend):
    """Outside autocast the cat promotes (fp16 h, fp32 skip -> fp32), and the weight must have that dtype."""
    h = torch.randn(2, 19, 24).half()
    skip, w, b = torch.randn(2, 19, 24), torch.randn(24, 48) / 7, torch.randn(24)
    out = skip_concat_linear(h, skip, w, b, backend=backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, skip_concat_linear_reference(h, skip, w, b), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match=r"weight must have the dtype of h and skip \(torch.float32\).*float16"):
        skip_concat_linear(h, skip, w.half(), b, backend=backend)


# --------------------------------------------------------------------------- the README snippet
UVIT_PRESETS = [n for n in list_models() if n.startswith(("cifar10", "celeba", "imagenet", "mscoco"))]


def test_readme_presets_listed():
    from uvit_fast.models import model_config
    built = {n: create_model(n, embed_dim=16, num_heads=1, depth=0).__class__ for n in UVIT_PRESETS}
    assert len(UVIT_PRESETS) == 10 and all(c in (UViT, UViTT2I) for c in built.values())
    assert all(model_config(n)["depth"] >= 12 for n in UVIT_PRESETS)


@pytest.mark.parametrize("dt", list(LOW))
@pytest.mark.slow  # a check of the README's snippet; the quick subset runs autocast in the tests above
@pytest.mark.parametrize("name", UVIT_PRESETS)
def test_readme_autocast_snippet_runs_for_every_uvit_preset(name, dt):
    """The README's drop-in snippet with ``.cuda()`` removed (CPU autocast), preset depth, width 64."""
    model = uvit_fast.create_model(name, embed_dim=64, num_heads=2)
    model = model.eval()
    C, S = model.in_chans, model.img_size
    x = torch.randn(8, C, S, S)
    t = torch.randint(0, 1000, (8,))
    cond = ()
    if isinstance(model, UViTT2I):
        cond = (torch.randn(8, 77, 768),)
    elif model.num_classes > 0:
        cond = (torch.randint(0, 1000, (8,)),)  # class 1000 is the null class for guidance
    with torch.autocast("cpu", dtype=LOW[dt]):
        eps = model(x, t, *cond)
    ref = uvit_fast.create_model(name, embed_dim=64, num_heads=2, fused=False).eval()
    ref.load_state_dict(model.state_dict())
    with torch.autocast("cpu", dtype=LOW[dt]):
        expect = ref(x, t, *cond)
    assert eps.shape == x.shape and eps.dtype == expect.dtype == LOW[dt]
    assert torch.isfinite(eps).all()
    torch.testing.assert_close(eps, expect, rtol=0, atol=0)  # the CPU fused path is the plain math


# --------------------------------------------------------------------------- CUDA autocast rules
class _BasicIndexing(TorchFunctionMode):
    """``tensor[...]`` for fake CUDA tensors on a machine without CUDA: Python indexing asks for a
    CUDA device guard, which a CPU-only build lacks; the same views through plain aten ops do not."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not torch.Tensor.__getitem__:
            return func(*args, **(kwargs or {}))
        t, idx = args
        idx = idx if isinstance(idx, tuple) else (idx,)
        if all(isinstance(i, torch.Tensor) for i in idx):
            return torch.ops.aten.index.Tensor(t, list(idx))
        out, dim = t, 0
        real = sum(i is not None and i is not Ellipsis for i in idx)
        for i in idx:
            if i is Ellipsis:
                dim += t.dim() - real
            elif i is None:
                out, dim = out.unsqueeze(dim), dim + 1
            elif isinstance(i, int):
                out = out.select(dim, i)
            elif isinstance(i, slice):
                start, stop, step = i.indices(out.shape[dim])
                out, dim = torch.ops.aten.slice.Tensor(out, dim, start, stop, step), dim + 1
            else:
                raise NotImplementedError(f"fake-CUDA indexing with {type(i).__name__}")
        return out


@contextlib.contextmanager
def _cuda_autocast(dtype):
    """CUDA autocast switched on directly (``torch.autocast("cuda")`` refuses without a GPU)."""
    prev = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", dtype)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", prev[0])
        torch.set_autocast_dtype("cuda", prev[1])


def test_fake_cuda_sees_cuda_autocast_rules():
    """The check below can fail: on fake CUDA tensors autocast applies CUDA's rules (layer_norm in
    float32), not CPU's (layer_norm left in the input dtype)."""
    x = torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.layer_norm(x.bfloat16(), (8,)).dtype == torch.bfloat16
    with FakeTensorMode(allow_non_fake_inputs=True):
        xc = torch.empty(2, 8, device="cuda", dtype=torch.bfloat16)
        with _cuda_autocast(torch.bfloat16):
            assert torch.nn.functional.layer_norm(xc, (8,)).dtype == torch.float32
            assert torch.nn.functional.linear(xc.float(), torch.empty(3, 8, device="cuda")).dtype == torch.bfloat16


@pytest.mark.skipif(ON_CUDA, reason="a GPU runs the real CUDA autocast in the tests above")
@pytest.mark.parametrize("dt", [d if d == "bf16" else pytest.param(d, marks=pytest.mark.slow) for d in LOW])
@pytest.mark.parametrize("family", list(SMALL))
def test_dtypes_follow_cuda_autocast(family, dt, monkeypatch):
    """Under CUDA autocast every module of the fused model on the Triton path (the custom ops' fake
    kernels) outputs the dtype the plain model's does: forward only (autograd on fake CUDA tensors
    needs a CUDA device guard)."""
    name, overrides = SMALL[family]
    fused = create_model(name, **overrides).eval()
    plain = create_model(name, fused=False, **overrides).eval()
    inputs = _inputs(fused)
    # the label / token range checks read values, which fake tensors do not have
    monkeypatch.setattr("uvit_fast.models.uvit.check_labels", lambda *a, **k: None)
    monkeypatch.setattr("uvit_fast.models.dit.check_labels", lambda *a, **k: None)
    monkeypatch.setattr(uvit_fast.models.CLIP, "_check_text", lambda *a, **k: None)
    with FakeTensorMode(allow_non_fake_inputs=True), _BasicIndexing():
        def to_cuda(t):
            return torch.empty(t.shape, dtype=t.dtype, device="cuda")

        fused = fused._apply(to_cuda).requires_grad_(False)
        plain = plain._apply(to_cuda).requires_grad_(False)
        inputs = tuple(to_cuda(t) for t in inputs)
        records = []
        for model, backend in ((fused, "triton"), (plain, "torch")):
            rec, handles = _dtypes_of(model)
            with uvit_fast.use_backend(backend), _cuda_autocast(LOW[dt]), torch.no_grad():
                out = _first(model(*inputs))
            for h in handles:
                h.remove()
            records.append((out.dtype, rec))
    (out_f, rec_f), (out_p, rec_p) = records
    assert out_f == out_p == LOW[dt]
    wrong = {n: (rec_f[n], rec_p[n]) for n in rec_p if n in rec_f and rec_f[n] != rec_p[n]}
    assert not wrong, f"module output dtypes (fused, plain) differ: {wrong}"
    if family.startswith("uvit"):  # upstream's stream: float32 in-blocks, autocast-dtype out-blocks
        assert rec_f["in_blocks.0"] == (torch.float32,) and rec_f["out_blocks.0"] == (LOW[dt],)
        assert rec_f["in_blocks.0.norm1"] == (torch.float32,)  # layer_norm: float32 under CUDA autocast
