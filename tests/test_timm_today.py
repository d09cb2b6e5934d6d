"""``uvit_fast.optimize`` on timm ViTs as timm builds them today (1.0.31) and before 1.0.16.

Three sources of the same structure: ``mirror`` (tests/upstream_modules.py, timm 1.0.31's
structure from the facts file: ``timm.layers.LayerNorm`` norms, masks in ``Block.forward``,
``forward_intermediates``), ``pre116`` (the older structure: plain ``nn.LayerNorm``,
``Block.forward(x)``) and ``timm`` (the real library, where it imports: timm imports torchvision,
and this machine's pinned CPU torch has no torchvision build beside it, so these are skipped here).

After ``optimize`` every timm API must give what it gave before, in float64 equal to rounding,
and the fused ops must actually run on the calls they cover.
"""
import contextlib
import copy
from unittest import mock

import pytest
import torch

import uvit_fast
from uvit_fast import layers
from uvit_fast.testing import CustomOpRecorder, assert_parity, randomize_

import upstream_modules as up

NO_TIMM = "timm imports torchvision, which has no build beside the pinned CPU torch here; runs wherever timm imports"
SOURCES = ["mirror", "timm"]
CFG = dict(img_size=16, patch_size=4, embed_dim=24, depth=3, num_heads=2, num_classes=7)


_randomize = randomize_


def _build(source, dtype=torch.float64, **kw):
    cfg = {**CFG, **kw}
    if source == "mirror":
        m = up.VisionTransformer(**cfg)
    elif source == "pre116":
        m = up.VisionTransformerPre116(**cfg)
    else:
        timm = pytest.importorskip("timm", reason=NO_TIMM)
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False, **cfg)
    return _randomize(m).to(dtype).eval()


def _pair(source, **kw):
    ref = _build(source, **kw)
    fused, report = uvit_fast.optimize(copy.deepcopy(ref))
    assert not report.left_alone, str(report)
    return ref, fused, report


def _x(shape=(2, 3, 16, 16), dtype=torch.float64, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


FUSED_OPS = ("patchify_embed", "adaln_layer_norm", "residual_adaln_layer_norm", "attention_qkvpacked")


@contextlib.contextmanager
def _op_calls():
    """The ``uvit_fast.ops`` functions called inside (on any backend: CustomOpRecorder sees only
    the Triton path's custom ops, and float64 runs the PyTorch path)."""
    called = set()
    with contextlib.ExitStack() as stack:
        for name in FUSED_OPS:
            real = getattr(uvit_fast.ops, name)
            fake = mock.patch.object(uvit_fast.ops, name, side_effect=lambda *a, _r=real, _n=name, **k: (called.add(_n), _r(*a, **k))[1])
            stack.enter_context(fake)
        yield called


def _close(a, b, msg=""):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=msg)


def _tree_close(a, b, path="out"):
    if isinstance(a, torch.Tensor):
        _close(a, b, path)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _tree_close(a[k], b[k], f"{path}[{k!r}]")
    else:
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _tree_close(u, v, f"{path}[{i}]")


# --------------------------------------------------------------------------- norm recognition
class CustomForwardLayerNorm(torch.nn.LayerNorm):
    def forward(self, x):
        return super().forward(x) * 2


class PlainSubclass(up.LayerNorm):  # a subclass of timm's LayerNorm that keeps its forward
    pass


NORMS = {
    # name: (factory, fused?, reason fragment when refused)
    "nn.LayerNorm": (lambda d: torch.nn.LayerNorm(d, eps=1e-6), True, None),
    "timm LayerNorm": (lambda d: up.LayerNorm(d), True, None),
    "timm LayerNorm, no affine": (lambda d: up.LayerNorm(d, affine=False), True, None),
    "subclass keeping timm's forward": (lambda d: PlainSubclass(d), True, None),
    "timm LayerNorm in fast-norm mode": (lambda d: up.LayerNorm(d, fast_norm=True), False, "fast-norm mode"),
    "timm LayerNormFp32": (lambda d: up.LayerNormFp32(d), False, "timm.layers.norm.LayerNormFp32) is not known"),
    "timm LayerNorm2d": (lambda d: up.LayerNorm2d(d), False, "timm.layers.norm.LayerNorm2d) is not known"),
    "LayerNorm with its own forward": (lambda d: CustomForwardLayerNorm(d), False, "CustomForwardLayerNorm) is not known"),
    "timm RmsNorm": (lambda d: up.RmsNorm(d), False, "RmsNorm, not a LayerNorm"),
    "2-D nn.LayerNorm": (lambda d: torch.nn.LayerNorm((4, d)), False, "over the last 2 dims"),
}


@pytest.mark.parametrize("name", list(NORMS))
def test_norm_classes_recognised_or_refused(name):
    """Norms that compute exactly F.layer_norm over the last dim are fused; look-alikes are left
    alone with the reason, and the block keeps its own forward."""
    make, fused_ok, why = NORMS[name]
    model = _build("mirror")
    blk = model.blocks[1]
    blk.norm1 = make(24).double()
    if name in ("2-D nn.LayerNorm", "timm LayerNorm2d"):  # would not run on (B, L, D) tokens: only the refusal
        _, report = uvit_fast.optimize(model)
        assert why in dict(report.left_alone)["blocks.1"], str(report)
        return
    _randomize(blk.norm1, seed=5)
    ref = copy.deepcopy(model)
    model, report = uvit_fast.optimize(model)
    left = dict(report.left_alone)
    if fused_ok:
        assert "blocks.1" not in left and isinstance(blk.norm1, layers.LayerNorm), str(report)
        assert isinstance(blk.norm1, type(ref.blocks[1].norm1))  # still an instance of its own class
    else:
        assert why in left["blocks.1"], str(report)
        assert type(blk.norm1) is type(ref.blocks[1].norm1)
    x = _x()
    with torch.no_grad():
        _close(model(x), ref(x))


def test_fast_norm_differs_from_layer_norm_under_autocast():
    """Why fast-norm mode is refused: under bf16 autocast it computes in bf16, F.layer_norm in fp32."""
    fast, plain = up.LayerNorm(64, fast_norm=True), up.LayerNorm(64)
    x = torch.randn(2, 5, 64) * 3 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = fast(x), plain(x)
    assert a.dtype == torch.bfloat16 and b.dtype == torch.float32


ATTENTIONS = {
    "gated": (dict(gated=True), "also has gate"),
    "qk_norm": (dict(qk_norm=True, norm_layer=up.LayerNorm), "has q_norm (LayerNorm)"),
    "scale_norm": (dict(scale_norm=True, norm_layer=up.LayerNorm), "has norm (LayerNorm)"),
    "attn_head_dim 8": (dict(attn_head_dim=8), "are not packed q, k, v"),
}


@pytest.mark.parametrize("name", list(ATTENTIONS))
def test_attention_variants_are_left_alone(name):
    """timm 1.0.31's Attention options the fused attention does not compute keep timm's block."""
    kw, why = ATTENTIONS[name]
    ref = _build("mirror")
    ref.blocks[2].attn = _randomize(up.TimmAttention(24, 2, qkv_bias=True, **kw), seed=7).double()
    model, report = uvit_fast.optimize(copy.deepcopy(ref))
    assert why in dict(report.left_alone)["blocks.2"], str(report)
    assert "blocks.1" in dict(report.replaced)
    x = _x()
    with torch.no_grad():
        _close(model(x), ref(x))


@pytest.mark.parametrize("source", SOURCES)
def test_average_pooled_vit(source):
    """global_pool='avg': timm's final norm is Identity and fc_norm normalises the pooled tokens."""
    ref, fused, report = _pair(source, global_pool="avg")
    assert [p for p, _ in report.replaced] == ["blocks.0", "blocks.1", "blocks.2", "patch_embed"], str(report)
    x = _x()
    with torch.no_grad():
        _close(fused(x), ref(x))


def test_post_norm_block_is_left_alone():
    """timm's ResPostBlock has the pre-norm block's children but normalises after attention."""
    ref = _build("mirror", block_fn=up.ResPostBlock)
    model, report = uvit_fast.optimize(copy.deepcopy(ref))
    assert "post-norm" in dict(report.left_alone)["blocks.0"], str(report)
    x = _x()
    with torch.no_grad():
        _close(model(x), ref(x))


def _rope(n, head_dim, seed=4):
    angle = torch.rand(n, head_dim // 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 6
    angle = angle.repeat_interleave(2, dim=-1)
    return angle.sin(), angle.cos()


def test_block_taking_rope_is_left_alone():
    """timm's EvaBlock and EvaAttention (qkv_bias=False: no q/v bias parameters) take ``rope``, and
    Eva.forward_features calls ``blk(x, rope=...)``: the fused block raised TypeError there (and
    would have dropped the rotation). A block or attention whose forward takes arguments the fused
    one does not keep timm's code."""
    ref = _build("mirror", block_fn=up.EvaBlock)
    model, report = uvit_fast.optimize(copy.deepcopy(ref))
    left = dict(report.left_alone)
    assert all("rope" in left.get(f"blocks.{i}", "") for i in range(3)), str(report)
    assert type(model.blocks[0]) is up.EvaBlock and type(model.blocks[0].attn) is up.EvaAttention
    tokens, rope = _x((2, 17, 24)), _rope(17, 12)
    with torch.no_grad():
        for kw in ({}, dict(rope=rope), dict(rope=rope, is_causal=True)):
            _close(model.blocks[0](tokens, **kw), ref.blocks[0](tokens, **kw), str(kw))
        assert not torch.allclose(ref.blocks[0](tokens, rope=rope), ref.blocks[0](tokens))


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_real_timm_eva_is_left_alone(qkv_bias):
    """Real timm's Eva (EVA-02 with rotary embeddings): its blocks keep timm's code, the output is timm's."""
    timm = pytest.importorskip("timm", reason=NO_TIMM)
    ref = timm.create_model("eva02_tiny_patch14_224", pretrained=False, qkv_bias=qkv_bias, **CFG)
    ref = _randomize(ref).double().eval()
    model, report = uvit_fast.optimize(copy.deepcopy(ref))
    assert all(f"blocks.{i}" in dict(report.left_alone) for i in range(3)), str(report)
    assert not any(p.startswith("blocks") for p, _ in report.replaced), str(report)
    x = _x()
    with torch.no_grad():
        _close(model(x), ref(x))


def test_hybrid_patch_embedding_is_left_alone():
    """timm's HybridEmbed (hybrid ViTs) runs a CNN ``backbone`` before its patch-sized ``proj``: the
    fused patch embedding skipped the backbone (a ValueError on every forward of
    vit_small_r26_s32_224). It keeps timm's code; the blocks are still fused."""
    ref = _build("mirror")
    ref.patch_embed = _randomize(up.HybridEmbed(img_size=16, patch_size=2, embed_dim=24), seed=3).double()
    model, report = uvit_fast.optimize(copy.deepcopy(ref))
    assert "backbone" in dict(report.left_alone)["patch_embed"], str(report)
    assert "blocks.0" in dict(report.replaced)
    x = _x()
    with torch.no_grad():
        _close(model(x), ref(x))


def test_real_timm_hybrid_vit():
    timm = pytest.importorskip("timm", reason=NO_TIMM)
    ref = timm.create_model("vit_small_r26_s32_224", pretrained=False, img_size=64, depth=2, num_classes=7)
    ref = _randomize(ref, std=0.05).double().eval()
    model, report = uvit_fast.optimize(copy.deepcopy(ref))
    assert "backbone" in dict(report.left_alone)["patch_embed"], str(report)
    assert "blocks.1" in dict(report.replaced), str(report)
    x = _x((1, 3, 64, 64))
    with torch.no_grad():
        _close(model(x), ref(x))


# --------------------------------------------------------------------------- timm's APIs after optimize
@pytest.mark.parametrize("source", ["mirror", "pre116", "timm"])
def test_blocks_norm_and_patch_embed_fused_in_place(source):
    """Every block, the final norm and the patch embedding are fused (the bug: only the patch
    embedding was); each keeps its own class as a base and its identity."""
    ref, fused, report = _pair(source)
    paths = [p for p, _ in report.replaced]
    assert paths == ["blocks.0", "blocks.1", "blocks.2", "norm", "patch_embed"], str(report)
    for a, b in zip(ref.modules(), fused.modules()):
        assert isinstance(b, type(a)), (type(a), type(b))
    assert sorted(fused.state_dict()) == sorted(ref.state_dict())
    x = _x()
    with _op_calls() as called:
        out = fused(x)
        out.square().sum().backward()
    assert called == set(FUSED_OPS), called
    out_ref = ref(x)
    out_ref.square().sum().backward()
    _close(out, out_ref)
    for (n, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
        _close(b.grad, a.grad, n)


@pytest.mark.parametrize("source", SOURCES)
def test_patch_embed_attributes_and_methods(source):
    ref, fused, _ = _pair(source)
    pe, pe_ref = fused.patch_embed, ref.patch_embed
    assert pe.grid_size == pe_ref.grid_size == (4, 4)
    assert pe.num_patches == pe_ref.num_patches == 16
    assert pe.feat_ratio() == 4 and tuple(pe.feat_ratio(as_scalar=False)) == (4, 4)
    assert pe.dynamic_feat_size((16, 12)) == pe_ref.dynamic_feat_size((16, 12)) == (4, 3)
    assert fused.dynamic_img_size is False and pe.dynamic_img_pad is False
    x = _x()
    _close(pe(x), pe_ref(x))
    with pytest.raises(AssertionError):  # timm's own check of the input size still runs
        pe(_x((1, 3, 12, 16)))


def _masks():
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(2, 1, 17, 17, generator=g) > 0.4
    keep[..., 0] = True  # every query sees the class token
    bias = torch.randn(2, 2, 17, 17, generator=g, dtype=torch.float64)
    return {"bool mask": keep, "float mask": bias}


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES)
def test_forward_features_with_mask_and_causal(source):
    """Calls with attn_mask or is_causal run timm's own block and attention code (fused norms);
    the masked result and its gradients equal timm's; no fused attention runs for them."""
    ref, fused, _ = _pair(source)
    x = _x()
    calls = [dict(attn_mask=m) for m in _masks().values()] + [dict(is_causal=True), {}]
    for kw in calls:
        for m in (ref, fused):
            m.zero_grad()
        with _op_calls() as called:
            out = fused.forward_features(x, **kw)
            out.square().sum().backward()
        assert ("attention_qkvpacked" in called) == (not kw) and "adaln_layer_norm" in called, (kw, called)
        out_ref = ref.forward_features(x, **kw)
        out_ref.square().sum().backward()
        _close(out, out_ref, str(kw))
        for (n, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
            if a.grad is not None:
                _close(b.grad, a.grad, f"{kw} {n}")
    # the mask changes the result: the comparison above is not of unmasked runs
    with torch.no_grad():
        assert not torch.allclose(fused.forward_features(x, attn_mask=_masks()["bool mask"]), fused.forward_features(x))


@pytest.mark.parametrize("source", SOURCES)
def test_block_forward_signature(source):
    ref, fused, _ = _pair(source)
    tokens = _x((2, 17, 24))
    mask = _masks()["bool mask"]
    with torch.no_grad():
        for kw in ({}, dict(attn_mask=None, is_causal=False), dict(attn_mask=mask), dict(is_causal=True)):
            _close(fused.blocks[0](tokens, **kw), ref.blocks[0](tokens, **kw), str(kw))
            _close(fused.blocks[0].attn(tokens, **kw), ref.blocks[0].attn(tokens, **kw), str(kw))


INTERMEDIATE_CALLS = [
    dict(),
    dict(output_fmt="NLC"),
    dict(indices=2, norm=True),
    dict(indices=[0, -1], return_prefix_tokens=True),
    dict(indices=[1], stop_early=True, intermediates_only=True),
    dict(output_dict=True, return_prefix_tokens=True),
    dict(output_dict=True, intermediates_only=True, output_fmt="NLC"),
    dict(indices=[0, 2], attn_mask="bool mask"),
    dict(is_causal=True, output_fmt="NLC"),
]


@pytest.mark.parametrize("source", SOURCES)
def test_forward_intermediates_every_option(source):
    """forward_intermediates raised AttributeError ('PatchEmbed' object has no attribute
    'dynamic_feat_size') after optimize; now every output_fmt and option gives timm's result."""
    ref, fused, _ = _pair(source)
    x = _x()
    with torch.no_grad():
        for kw in INTERMEDIATE_CALLS:
            kw = {k: (_masks()[v] if k == "attn_mask" else v) for k, v in kw.items()}
            _tree_close(fused.forward_intermediates(x, **kw), ref.forward_intermediates(x, **kw), str(kw))
        # NCHW maps are (B, D, H/p, W/p)
        _, inter = fused.forward_intermediates(x)
        assert [tuple(t.shape) for t in inter] == [(2, 24, 4, 4)] * 3


@pytest.mark.parametrize("source", SOURCES)
def test_dynamic_img_size(source):
    """dynamic_img_size: the patch embedding writes NHWC (fused, viewed) and other input sizes
    resample the position embedding in timm's code."""
    ref, fused, _ = _pair(source, dynamic_img_size=True)
    assert fused.dynamic_img_size and not fused.patch_embed.flatten
    assert getattr(fused.patch_embed.output_fmt, "value", fused.patch_embed.output_fmt) == "NHWC"
    for shape in ((2, 3, 16, 16), (1, 3, 12, 20)):
        x = _x(shape)
        with torch.no_grad(), _op_calls() as called:
            out = fused(x)
            inter = fused.forward_intermediates(x, intermediates_only=True)
        assert called == set(FUSED_OPS), called
        with torch.no_grad():
            _close(out, ref(x), str(shape))
            _tree_close(inter, ref.forward_intermediates(x, intermediates_only=True))
        assert tuple(inter[0].shape[-2:]) == (shape[2] // 4, shape[3] // 4)


@pytest.mark.parametrize("source", SOURCES)
def test_dynamic_img_pad(source):
    """dynamic_img_pad: patch-divisible inputs run the fused patch embedding; others are padded by
    timm's own forward (the fused path never sees them)."""
    ref, fused, _ = _pair(source, dynamic_img_size=True, dynamic_img_pad=True)
    for shape, fusable in (((1, 3, 16, 20), True), ((1, 3, 14, 18), False)):
        x = _x(shape)
        with torch.no_grad(), _op_calls() as called:
            out = fused(x)
            inter = fused.forward_intermediates(x, intermediates_only=True)
        assert ("patchify_embed" in called) == fusable, (shape, called)
        with torch.no_grad():
            _close(out, ref(x), str(shape))
            _tree_close(inter, ref.forward_intermediates(x, intermediates_only=True))
        assert tuple(inter[0].shape[-2:]) == (-(-shape[2] // 4), -(-shape[3] // 4))


@pytest.mark.parametrize("source", SOURCES)
def test_optimize_twice_changes_nothing(source):
    _, fused, _ = _pair(source)
    classes = [type(m) for m in fused.modules()]
    fused, again = uvit_fast.optimize(fused)
    assert not again.replaced and not again.left_alone and "already optimized" in str(again)
    assert [type(m) for m in fused.modules()] == classes


@pytest.mark.parametrize("source", SOURCES)
def test_grad_checkpointing_and_reset_classifier(source):
    ref, fused, _ = _pair(source)
    for m in (ref, fused):
        m.set_grad_checkpointing(True)
        m.train()
    assert fused.grad_checkpointing
    x = _x()
    fused(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
        _close(b.grad, a.grad, n)
    for m in (ref, fused):
        m.eval()
        m.reset_classifier(3)
        _randomize(m.head.double(), seed=9)
    assert fused.head.out_features == 3
    with torch.no_grad():
        _close(fused(x), ref(x))
    fused.reset_classifier(0)
    with torch.no_grad():
        assert fused(x).shape == (2, 24)


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES)
def test_triton_kernels_within_parity_rule(source):
    """float32 on the Triton kernels (the interpreter on CPU): forward and every gradient within 2x
    timm's own float32 error against float64."""
    ref64 = _build(source)
    ref32 = copy.deepcopy(ref64).float()
    fused, report = uvit_fast.optimize(copy.deepcopy(ref32))
    assert not report.left_alone, str(report)
    x64 = _x((1, 3, 16, 16))
    outs = {}
    for name, m, x, backend in (("fused", fused, x64.float(), "triton"), ("ref32", ref32, x64.float(), "torch"),
                                ("ref64", ref64, x64, "torch")):
        rec = CustomOpRecorder()
        with uvit_fast.use_backend(backend), rec:
            out = m.forward_features(x)
            out.square().mean().backward()
        outs[name] = (out.detach(), {n: p.grad for n, p in m.named_parameters()}, rec.ops)
    for op in ("patchify_embed", "adaln_layer_norm", "residual_adaln_layer_norm", "attention"):
        assert any(op in o for o in outs["fused"][2]), (op, outs["fused"][2])
    out, grads, _ = outs["fused"]
    assert_parity(out, outs["ref32"][0], outs["ref64"][0], atol=1e-5, name="forward_features")
    for n, g64 in outs["ref64"][1].items():
        if g64 is not None:
            assert_parity(grads[n], outs["ref32"][1][n], g64, atol=1e-5 * (1 + g64.abs().max().item()), name=n)


def test_set_fused_false_runs_timms_own_code():
    ref, fused, _ = _pair("mirror")
    layers.set_fused(fused, False)
    x = _x()
    with torch.no_grad(), _op_calls() as called:
        out = fused(x)
    assert not called, called
    with torch.no_grad():
        torch.testing.assert_close(out, ref(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- vit_huge_patch14_224
def test_vit_huge_preset_has_no_head_as_timms_default_tag():
    """timm's vit_huge_patch14_224 resolves to the orig_in21k tag: num_classes=0, no head keys."""
    with torch.device("meta"):
        ours = uvit_fast.create_model("vit_huge_patch14_224")
    keys = ours.state_dict()
    assert not any(k.startswith("head") for k in keys) and ours.num_classes == 0
    assert sum(p.numel() for p in ours.parameters()) == 630_764_800  # timm: 630.8M for orig_in21k


@pytest.mark.slow
def test_vit_huge_preset_loads_timms_state_dict_strictly():
    timm = pytest.importorskip("timm", reason=NO_TIMM)
    with torch.device("meta"):
        theirs = timm.create_model("vit_huge_patch14_224", pretrained=False)
        ours = uvit_fast.create_model("vit_huge_patch14_224")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)


@pytest.mark.parametrize("source", ["mirror", "pre116", "timm"])
def test_pickle_and_deepcopy_round_trip(source, tmp_path):
    """torch.save(model) / torch.load and copy.deepcopy of an optimized timm ViT give a model with
    the same fused classes and outputs. (The 1.0.31 mirror is deep-copied only: its norm class
    names the module timm.layers.norm, which pickle cannot import where timm is absent.)"""
    _, fused, _ = _pair(source)
    copies = [copy.deepcopy(fused)]
    if source != "mirror":
        torch.save(fused, tmp_path / "model.pt")
        copies.append(torch.load(tmp_path / "model.pt", weights_only=False))
    x = _x()
    with torch.no_grad():
        expected = fused(x)
    for m in copies:
        assert [type(a) for a in m.modules()] == [type(b) for b in fused.modules()]
        assert m.blocks[0].attn.qkv.weight is not fused.blocks[0].attn.qkv.weight
        with torch.no_grad(), _op_calls() as called:
            _close(m(x), expected)
        assert called == set(FUSED_OPS), called
