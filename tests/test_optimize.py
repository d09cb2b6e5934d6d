"""``uvit_fast.optimize`` on upstream-structured models: same outputs and gradients, shared
parameters, a readable report, idempotence, checkpointing, autocast, compile, training."""
import contextlib
import copy

import pytest
import torch

import uvit_fast
from uvit_fast import layers
from uvit_fast.models.dit import DiTBlock
from uvit_fast.models.uvit import Block
from uvit_fast.testing import CustomOpRecorder, assert_parity, randomize_

import upstream_modules as up

BACKENDS = ["torch", "triton"]


_randomize = randomize_


def _build(kind, **kw):
    g = torch.Generator().manual_seed(1)
    if kind == "uvit_uncond":
        m = up.UViT(img_size=8, patch_size=2, embed_dim=24, depth=2, num_heads=2, **kw)
        args = (torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, generator=g) * 999)
    elif kind == "uvit_cond":
        m = up.UViT(img_size=8, patch_size=2, in_chans=4, embed_dim=24, depth=2, num_heads=3, num_classes=5,
                    mlp_time_embed=True, **kw)
        args = (torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, generator=g) * 999, torch.tensor([3]))
    elif kind == "uvit_t2i":
        m = up.UViT(img_size=8, patch_size=4, embed_dim=24, depth=2, num_heads=2, t2i=True, clip_dim=12,
                    num_clip_token=3, **kw)
        args = (torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, generator=g) * 999, torch.randn(2, 3, 12, generator=g))
    elif kind == "dit":
        m = up.DiT(input_size=8, patch_size=2, hidden_size=24, depth=2, num_heads=3, num_classes=6, **kw)
        args = (torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g) * 999, torch.tensor([1, 6]))
    elif kind == "vit":  # timm 1.0.31's structure (timm.layers.LayerNorm norms, masks in Block.forward)
        m = up.VisionTransformer(img_size=8, patch_size=4, embed_dim=24, depth=2, num_heads=2, **kw)
        args = (torch.randn(2, 3, 8, 8, generator=g),)
    else:  # timm before 1.0.16: plain nn.LayerNorm, Block.forward(x)
        m = up.VisionTransformerPre116(img_size=8, patch_size=4, embed_dim=24, depth=2, num_heads=2, **kw)
        args = (torch.randn(2, 3, 8, 8, generator=g),)
    return _randomize(m).eval(), args


KINDS = ["uvit_uncond", "uvit_cond", "uvit_t2i", "dit", "vit", "vit_pre116"]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _run(model, args, dtype, backend=None, recorder=None):
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    with uvit_fast.use_backend(backend or "auto"), (recorder or contextlib.nullcontext()):
        out = model(*args)
        out.square().mean().backward()
    return out.detach(), _grads(model)


# the kernels each structure must run on, forward and backward
# (fused_linear: qkv and proj; its backward GEMMs also run the MLP's, whose forward is fused_mlp_fc1/fc2)
KERNELS = {
    "uvit_uncond": ("patchify_embed", "adaln_layer_norm", "attention", "skip_concat_linear", "decoder_unpatchify",
                    "fused_linear"),
    "dit": ("patchify_embed", "adaln_layer_norm", "attention", "decoder_unpatchify", "fused_linear"),
    "vit": ("patchify_embed", "adaln_layer_norm", "attention", "fused_linear"),
}
KERNELS["uvit_cond"] = KERNELS["uvit_t2i"] = KERNELS["uvit_uncond"]
KERNELS["vit_pre116"] = KERNELS["vit"]


# the Triton runs (5-11 s each under the interpreter on 2 cores) are slow; the quick subset keeps the torch runs
@pytest.mark.parametrize("backend", [b if b != "triton" else pytest.param(b, marks=pytest.mark.slow) for b in BACKENDS])
@pytest.mark.parametrize("kind", KINDS)
def test_optimized_matches_upstream_outputs_and_gradients(kind, backend):
    """float64 on the PyTorch backend: equal to rounding. float32 on the Triton kernels (the
    interpreter on CPU; the kernels do not take float64): within 2x the error of the upstream
    structure in float32, both against float64."""
    base, args = _build(kind)
    dtype = torch.float64 if backend == "torch" else torch.float32
    fused, report = uvit_fast.optimize(copy.deepcopy(base).to(dtype))
    assert report.replaced and not report.left_alone, str(report)
    rec = CustomOpRecorder()
    out, grads = _run(fused, args, dtype, backend, rec)
    if backend == "triton":
        bwd = lambda op: "backward" in op or "bwd" in op  # noqa: E731
        for k in KERNELS[kind]:
            assert any(k in op and not bwd(op) for op in rec.ops), (k, rec.ops)
            assert any(k in op and bwd(op) for op in rec.ops), (k, rec.ops)
        assert any("fused_mlp_fc1" in op for op in rec.ops) and any("fused_mlp_fc2" in op for op in rec.ops), rec.ops
    out_ref, grads_ref = _run(copy.deepcopy(base).to(dtype), args, dtype)
    assert grads.keys() == grads_ref.keys()
    if dtype == torch.float64:
        torch.testing.assert_close(out, out_ref, rtol=1e-9, atol=1e-9)
        for n in grads_ref:
            torch.testing.assert_close(grads[n], grads_ref[n], rtol=1e-8, atol=1e-9, msg=n)
        return
    out64, grads64 = _run(copy.deepcopy(base).double(), args, torch.float64)
    assert_parity(out, out_ref, out64, atol=1e-5 * out64.abs().max().item(), name=f"{kind} output")
    for n in grads64:
        g64 = grads64[n]
        assert_parity(grads[n], grads_ref[n], g64, atol=1e-5 * (1 + g64.abs().max().item()), name=f"{kind} grad {n}")


@pytest.mark.parametrize("kind", ["uvit_cond", "uvit_t2i", "dit"])
def test_optimized_models_have_example_inputs(kind):
    model, args = _build(kind)
    model, _ = uvit_fast.optimize(model)
    ex = model.example_inputs(3)
    assert [tuple(a.shape[1:]) for a in ex] == [tuple(a.shape[1:]) for a in args]
    assert model(*ex).shape[0] == 3


def test_parameters_are_shared_and_keys_unchanged():
    model, _ = _build("uvit_cond")
    ids = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    model, report = uvit_fast.optimize(model)
    assert sorted(id(p) for p in model.parameters()) == sorted(ids)
    assert sorted(model.state_dict()) == sorted(keys)
    assert isinstance(model, up.UViT) and type(model).__name__ == "FusedUViT"
    assert all(isinstance(b, Block) for b in model.in_blocks)
    assert isinstance(model.norm, layers.LayerNorm)
    text = str(report)
    assert "uvit_fast.optimize: uvit" in text and "out_blocks.0: block -> fused LayerNorm/residual" in text
    assert "skip linear without the concat" in text


@pytest.mark.parametrize("kind", ["uvit_cond", "uvit_t2i", "dit"])
def test_optimized_model_pickles_and_deep_copies(kind, tmp_path):
    """torch.save(model) / torch.load and copy.deepcopy keep the generated Fused class (rebuilt from
    the model's own class) and the fused forward."""
    model, args = _build(kind)
    model, _ = uvit_fast.optimize(model)
    torch.save(model, tmp_path / "model.pt")
    with torch.no_grad():
        expected = model(*args)
        for m in (torch.load(tmp_path / "model.pt", weights_only=False), copy.deepcopy(model)):
            assert type(m).__name__ == type(model).__name__ and isinstance(m, type(model).__mro__[1])
            assert [type(a) for a in m.modules()] == [type(b) for b in model.modules()]
            torch.testing.assert_close(m(*args), expected, rtol=0, atol=0)
            _, again = uvit_fast.optimize(m)
            assert "already optimized" in str(again)


def test_optimize_twice_is_a_noop():
    model, args = _build("dit")
    model, first = uvit_fast.optimize(model)
    blocks = list(model.blocks)
    out = model(*args)
    model, second = uvit_fast.optimize(model)
    assert first.replaced and not second.replaced
    assert "already optimized" in str(second)
    assert list(model.blocks) == blocks and all(isinstance(b, DiTBlock) for b in blocks)
    torch.testing.assert_close(model(*args), out)


def test_unsupported_parts_are_left_alone_with_a_reason():
    model, args = _build("vit")
    model.blocks[1].attn.attn_drop.p = 0.1
    model.blocks[0].ls1 = torch.nn.Linear(24, 24)  # not a plain pre-norm block any more
    model, report = uvit_fast.optimize(model)
    left = dict(report.left_alone)
    assert "attn_drop has dropout p=0.1" in left["blocks.1"]
    assert "block has ls1 (Linear)" in left["blocks.0"]
    assert isinstance(model.norm, layers.LayerNorm)


def test_modules_with_extra_parts_are_left_alone():
    """A block or attention holding something the fused module would not run (a learned
    attention bias, as BEiT's, or an added cross-attention) keeps its own forward."""

    class BiasedAttention(up.TimmAttention):
        def __init__(self, dim, heads):
            super().__init__(dim, heads, qkv_bias=True)
            self.rel_bias = torch.nn.Parameter(torch.randn(dim))

        def forward(self, x, attn_mask=None, is_causal=False):
            return super().forward(x, attn_mask, is_causal) + self.rel_bias

    class CrossBlock(up.DiTBlock):
        def __init__(self, D, heads):
            super().__init__(D, heads)
            self.cross_attn = torch.nn.Linear(D, D)

        def forward(self, x, c):
            x = super().forward(x, c)
            return x + self.cross_attn(x)

    vit, vargs = _build("vit")
    vit.blocks[0].attn = _randomize(BiasedAttention(24, 2), seed=3)
    dit, dargs = _build("dit")
    dit.blocks[1] = _randomize(CrossBlock(24, 3), seed=4)
    for model, args, path, why in ((vit, vargs, "blocks.0", "attention BiasedAttention also has rel_bias"),
                                   (dit, dargs, "blocks.1", "DiT block CrossBlock also has cross_attn")):
        ref = copy.deepcopy(model)
        model, report = uvit_fast.optimize(model)
        assert why in dict(report.left_alone)[path], str(report)
        with torch.no_grad():
            torch.testing.assert_close(model(*args), ref(*args))


def test_nested_model_and_unrecognised_tree():
    class Wrapper(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

    inner, args = _build("dit")
    ref = copy.deepcopy(inner)
    w, report = uvit_fast.optimize(Wrapper(inner))
    assert report.kind == "dit" and type(w.net).__name__ == "FusedDiT"
    torch.testing.assert_close(w.net(*args), ref(*args))
    _, empty = uvit_fast.optimize(torch.nn.Linear(3, 3))
    assert not empty.replaced and "nothing changed" in str(empty)


@pytest.mark.slow
def test_compiled_model_is_optimized_inside():
    """torch.compile's wrapper forwards attribute look-ups to the model; the model it holds is
    optimized, not the wrapper."""
    inner, args = _build("dit")
    ref = copy.deepcopy(inner)
    compiled, report = uvit_fast.optimize(torch.compile(inner, backend="eager"))
    assert report.kind == "dit" and not report.left_alone, str(report)
    assert type(compiled).__name__ == "OptimizedModule" and type(compiled._orig_mod).__name__ == "FusedDiT"
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), ref(*args))


def test_our_own_model_is_switched_to_fused():
    m = uvit_fast.create_model("DiT-S/8", input_size=16, depth=1, fused=False)
    m, report = uvit_fast.optimize(m)
    assert all(mod.fused for mod in m.modules() if hasattr(mod, "fused"))
    assert "a uvit_fast model" in str(report)


@pytest.mark.parametrize(
    "name, kw, shape",
    [
        ("vit_tiny_patch16_224", dict(img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2), (1, 3, 16, 16)),
        ("vivit_b_16x2_model2", dict(num_frames=4, img_size=16, patch_size=8, embed_dim=24, depth=1, num_heads=2,
                                     temporal_depth=1, num_classes=3), (1, 3, 4, 16, 16)),
        ("clip_vit_b32", dict(embed_dim=8, img_size=16, patch_size=8, vision_width=64, vision_layers=1,
                              transformer_width=16, transformer_heads=2, transformer_layers=1, vocab_size=20,
                              context_length=5), (1, 3, 16, 16)),
    ],
)
def test_our_vit_family_models_are_switched_not_rebuilt(name, kw, shape):
    """ViT, ViViT and CLIP of this package are recognised by class (not as timm ViTs, whose blocks
    would be rebuilt, or not at all) and every module is switched to fused=True."""
    m = uvit_fast.create_model(name, fused=False, **kw).eval()
    _randomize(m, std=0.1)
    args = (torch.randn(shape),) + ((torch.randint(1, 19, (1, 5)),) if name.startswith("clip") else ())
    with torch.no_grad():
        ref = m(*args)
    modules = list(m.modules())
    m, report = uvit_fast.optimize(m)
    assert "a uvit_fast model; switched to fused=True" in str(report) and not report.replaced
    assert list(m.modules()) == modules  # nothing rebuilt
    assert all(mod.fused for mod in m.modules() if hasattr(mod, "fused"))
    with torch.no_grad():
        out = m(*args)
    for a, b in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_and_training_mode():
    ref, args = _build("uvit_cond", use_checkpoint=True)
    ref = ref.double().train()
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    fused, _ = uvit_fast.optimize(copy.deepcopy(ref))
    assert all(b.use_checkpoint for b in fused.in_blocks)
    ref(*args).sum().backward()
    fused(*args).sum().backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=n)


AUTOCAST_CASES = [("torch", torch.bfloat16), ("torch", torch.float16), ("triton", torch.float16)]
if torch.cuda.is_available():
    AUTOCAST_CASES.append(("triton", torch.bfloat16))  # the CPU interpreter cannot do a bf16 tl.dot


@pytest.mark.parametrize("backend, dtype", AUTOCAST_CASES)
@pytest.mark.parametrize("kind", ["uvit_cond", "dit", "vit"])
def test_autocast_within_dtype_rule(kind, backend, dtype, device):
    ref, args = _build(kind)
    gold_model = copy.deepcopy(ref).double()
    args64 = tuple(a.double() if a.is_floating_point() else a for a in args)
    ref, args = ref.to(device), tuple(a.to(device) for a in args)
    with torch.no_grad():
        gold = gold_model(*args64)
        fused, _ = uvit_fast.optimize(copy.deepcopy(ref))
        with torch.autocast(device.type, dtype=dtype), uvit_fast.use_backend(backend):
            out_ref = ref(*args)
            out = fused(*args)
    assert out.dtype == out_ref.dtype
    atol = (2e-2 if dtype == torch.bfloat16 else 3e-3) * gold.abs().max().item()
    assert_parity(out.float().cpu(), out_ref.float().cpu(), gold, atol=atol, name=f"{kind} under {dtype} autocast")


def test_training_step_matches_after_adamw():
    ref, args = _build("dit")
    ref = ref.double().train()
    ref.y_embedder.dropout_prob = 0.0  # deterministic labels for the comparison
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    fused, _ = uvit_fast.optimize(copy.deepcopy(ref))
    target = torch.randn_like(ref(*args))
    losses = {}
    for name, m in (("ref", ref), ("fused", fused)):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
        loss = torch.nn.functional.mse_loss(m(*args), target)
        loss.backward()
        losses[name] = [loss.item()]
        opt.step()
        opt.zero_grad()
        losses[name].append(torch.nn.functional.mse_loss(m(*args), target).item())
    assert losses["fused"] == pytest.approx(losses["ref"], rel=1e-10)
    for (n, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-10, msg=n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["dit", pytest.param("vit", marks=pytest.mark.slow)])  # vit: fused in place
@pytest.mark.slow
def test_torch_compile_fullgraph(kind, backend):
    ref, args = _build(kind)
    fused, _ = uvit_fast.optimize(copy.deepcopy(ref))
    with uvit_fast.use_backend(backend):
        compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
        out = compiled(*args)
        out.square().mean().backward()
    expected = ref(*args)
    expected.square().mean().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for (n, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=n)
