"""The ViT family on the same kernels: ViT (timm layout), ViViT (Models 1 and 2), CLIP (OpenAI
layout). Presets and state_dict layouts, float64 parity of the plain and fused paths against
independent functional references (forward and every parameter gradient), the CLIP ->
U-ViT text-to-image path, input errors, and one small run on the Triton kernels."""
import importlib

import pytest
import torch
from uvit_fast.testing import CustomOpRecorder

import uvit_fast
from uvit_fast import create_model, list_models, ops
from uvit_fast.layers import LayerNormFp32, set_fused
from uvit_fast.models import CLIP, UViTT2I, ViT, ViViT, contrastive_loss, model_config, text_to_image_context
from uvit_fast.models.clip import clip_config_from_state_dict, openai_state_dict
from uvit_fast.models.vivit import inflate_patch_embed, vivit_state_dict_from_vit

from upstream_reference import randomize_, uvit_reference
from vit_family_reference import (
    clip_keys,
    clip_loss_reference,
    clip_reference,
    clip_text_hidden_reference,
    vit_keys,
    vit_reference,
    vivit_keys,
    vivit_reference,
)

# Written from the facts file / timm / OpenAI names: (patch, width, depth, heads)
FACTS_VIT = {
    "vit_tiny_patch16_224": (16, 192, 12, 3),
    "vit_small_patch16_224": (16, 384, 12, 6),
    "vit_base_patch16_224": (16, 768, 12, 12),
    "vit_large_patch16_224": (16, 1024, 24, 16),
    "vit_huge_patch14_224": (14, 1280, 32, 16),
}
FACTS_VIVIT = {"vivit_b_16x2_model1": 1, "vivit_b_16x2_model2": 2}
# (embed_dim, patch, vision width, vision layers, text width, text heads); text layers 12
FACTS_CLIP = {
    "clip_vit_b32": (512, 32, 768, 12, 512, 8),
    "clip_vit_b16": (512, 16, 768, 12, 512, 8),
    "clip_vit_l14": (768, 14, 1024, 24, 768, 12),
}
NAMES = list(FACTS_VIT) + list(FACTS_VIVIT) + list(FACTS_CLIP)


def _meta(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def _facts_layout(name):
    if name in FACTS_VIT:
        p, d, depth, _ = FACTS_VIT[name]
        # timm's default tag for vit_huge_patch14_224 is orig_in21k: no classifier head
        return vit_keys(img_size=224, patch_size=p, embed_dim=d, depth=depth,
                        num_classes=0 if name == "vit_huge_patch14_224" else 1000)
    if name in FACTS_VIVIT:
        return vivit_keys(num_frames=32, img_size=224, patch_size=16, tubelet_size=2, num_classes=400,
                          embed_dim=768, depth=12, variant=FACTS_VIVIT[name], temporal_depth=4)
    e, p, vw, vl, tw, _ = FACTS_CLIP[name]
    return clip_keys(embed_dim=e, image_resolution=224, vision_layers=vl, vision_width=vw, vision_patch_size=p,
                     context_length=77, vocab_size=49408, transformer_width=tw, transformer_layers=12)


def test_presets_registered():
    names = list_models()
    assert all(n in names for n in NAMES)
    assert model_config("vit_huge_patch14_224")["patch_size"] == 14


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_layout_matches_documented(name):
    got = {k: tuple(v.shape) for k, v in _meta(name).state_dict().items()}
    assert got == _facts_layout(name)


@pytest.mark.parametrize("name, params", [
    # timm / OpenAI published parameter counts
    ("vit_tiny_patch16_224", 5_717_416), ("vit_base_patch16_224", 86_567_656),
    ("vit_large_patch16_224", 304_326_632), ("vit_huge_patch14_224", 630_764_800),
    ("clip_vit_b32", 151_277_313), ("clip_vit_b16", 149_620_737), ("clip_vit_l14", 427_616_513),
])
def test_parameter_counts(name, params):
    assert sum(p.numel() for p in _meta(name).parameters()) == params


def test_token_counts_and_head_dims():
    vit_b, vit_h, l14 = _meta("vit_base_patch16_224"), _meta("vit_huge_patch14_224"), _meta("clip_vit_l14")
    assert vit_b.pos_embed.shape[1] == 197 and vit_b.blocks[0].attn.head_dim == 64
    assert vit_h.blocks[0].attn.head_dim == 80
    assert l14.visual.positional_embedding.shape[0] == 257
    assert l14.visual.transformer.resblocks[0].attn.num_heads == 16
    assert l14.transformer.resblocks[0].attn.num_heads == 12
    m1, m2 = _meta("vivit_b_16x2_model1"), _meta("vivit_b_16x2_model2")
    assert m1.pos_embed.shape[1] == 1 + 16 * 196 and m2.pos_embed.shape[1] == 197
    assert m2.temporal_pos_embed.shape[1] == 17


@pytest.mark.parametrize("name", NAMES)
def test_meta_example_inputs_run(name):
    """What the profiler does: build on meta, run example_inputs(1), fused path included."""
    with torch.device("meta"):
        m = create_model(name)
        out = m(*m.example_inputs(1))
    outs = out if isinstance(out, tuple) else (out,)
    assert all(o.shape[0] == 1 for o in outs)


# --------------------------------------------------------------------------- parity helpers
def _ref_grads(ref_fn, model, g_fn):
    """Reference output and d(loss)/d(weight) for every state_dict entry, in float64."""
    sd = {k: v.detach().double().requires_grad_(v.is_floating_point()) for k, v in model.state_dict().items()}
    out = ref_fn(sd)
    loss = g_fn(out)
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, [sd[n] for n in names], allow_unused=True)
    return out, dict(zip(names, grads))


def _model_grads(model, run, g_fn):
    model.zero_grad(set_to_none=True)
    out = run()
    g_fn(out).backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


def _err(a, ref):
    if isinstance(ref, tuple):
        return max(_err(x, r) for x, r in zip(a, ref))
    return (a.detach().double() - ref.detach()).abs().max().item()


def _scale(ref):
    if isinstance(ref, tuple):
        return max(_scale(r) for r in ref)
    return max(1.0, ref.detach().abs().max().item())


def _check_model(model, run, ref_fn, g_fn, dtype):
    """Plain and fused paths vs the float64 reference: output and every parameter gradient.

    float64: both within 1e-9 (relative to the magnitude). float32: the plain path within
    1e-4; the fused path within 2x the plain path's error + 1e-5 (relative)."""
    ref_out, ref_g = _ref_grads(ref_fn, model, g_fn)
    assert all(g is not None for g in ref_g.values()), [n for n, g in ref_g.items() if g is None]
    results = {}
    for fused in (False, True):
        set_fused(model, fused)
        out, grads = _model_grads(model, run, g_fn)
        assert set(grads) == set(ref_g)
        results[fused] = [("output", _err(out, ref_out), _scale(ref_out))]
        results[fused] += [(n, _err(grads[n], ref_g[n]), _scale(ref_g[n])) for n in ref_g]
        for o in (out if isinstance(out, tuple) else (out,)):
            assert o.dtype == dtype
    for (name, e_plain, s), (_, e_fused, _) in zip(results[False], results[True]):
        if dtype == torch.float64:
            assert e_plain <= 1e-9 * s and e_fused <= 1e-9 * s, (name, e_plain, e_fused, s)
        else:
            assert e_plain <= 1e-4 * s, (name, "plain", e_plain, s)
            assert e_fused <= 2 * e_plain + 1e-5 * s, (name, "fused", e_fused, e_plain, s)


def _weights(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


DTYPES = [torch.float64, torch.float32]


# --------------------------------------------------------------------------- ViT
VIT_SMALL = dict(img_size=8, patch_size=4, in_chans=3, num_classes=5, embed_dim=24, depth=2, num_heads=3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 2])
def test_vit_parity(dtype, batch):
    model = ViT(**VIT_SMALL).to(dtype)
    randomize_(model, generator=torch.Generator().manual_seed(1))
    x = _weights((batch, 3, 8, 8), 2)
    g = _weights((batch, 5), 3)
    _check_model(model, lambda: model(x.to(dtype)), lambda sd: vit_reference(sd, VIT_SMALL, x),
                 lambda out: (out.double() * g).sum(), dtype)


def test_vit_features_and_no_head():
    cfg = dict(VIT_SMALL, num_classes=0)
    model = ViT(**cfg).double()
    randomize_(model)
    assert not any(k.startswith("head") for k in model.state_dict())
    x = _weights((2, 3, 8, 8), 4)
    ref = vit_reference({k: v for k, v in model.state_dict().items()}, cfg, x)
    for fused in (False, True):
        set_fused(model, fused)
        torch.testing.assert_close(model(x), ref)
        assert model.forward_features(x).shape == (2, 5, 24)


# --------------------------------------------------------------------------- ViViT
VIVIT_SMALL = dict(num_frames=4, img_size=8, patch_size=4, tubelet_size=2, in_chans=3, num_classes=5,
                   embed_dim=24, depth=2, num_heads=3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", [1, 2])
def test_vivit_parity(dtype, variant):
    cfg = dict(VIVIT_SMALL, variant=variant, temporal_depth=2, temporal_heads=2)
    model = ViViT(**cfg).to(dtype)
    randomize_(model, generator=torch.Generator().manual_seed(5))
    x = _weights((2, 3, 4, 8, 8), 6)
    g = _weights((2, 5), 7)
    _check_model(model, lambda: model(x.to(dtype)), lambda sd: vivit_reference(sd, cfg, x),
                 lambda out: (out.double() * g).sum(), dtype)


def test_vivit_tanh_gelu_option():
    cfg = dict(VIVIT_SMALL, variant=1, depth=1, gelu_approximate="tanh")
    model = ViViT(**cfg).double()
    randomize_(model)
    x = _weights((1, 3, 4, 8, 8), 8)
    torch.testing.assert_close(model(x), vivit_reference(dict(model.state_dict()), cfg, x))


@pytest.mark.parametrize("variant", [1, 2])
def test_vivit_from_image_vit(variant):
    """ViT weights with filter inflation ("average"): on a static video, every spatial
    sequence (Model 2) / the class token (Model 1 with tiled pos_embed) sees the image."""
    vit = ViT(**dict(VIT_SMALL, num_classes=0)).double()
    randomize_(vit)
    cfg = dict(VIVIT_SMALL, variant=variant, temporal_depth=1)
    vivit = ViViT(**cfg).double()
    vivit.load_state_dict(vivit_state_dict_from_vit(vit.state_dict(), vivit, method="average"))
    frame = _weights((1, 3, 8, 8), 9)
    video = frame.unsqueeze(2).expand(1, 3, 4, 8, 8)
    feats = vit(frame)  # (1, D) normalised class token
    if variant == 2:
        seen = {}
        vivit.norm.register_forward_hook(lambda m, i, o: seen.setdefault("cls", o))
        vivit(video)
        torch.testing.assert_close(seen["cls"], feats.expand(2, -1))
    else:
        tokens = vivit.patch_embed.embed(video, vivit.cls_token, vivit.pos_embed)
        image_tokens = vit.patch_embed.embed(frame, vit.cls_token, vit.pos_embed)
        torch.testing.assert_close(tokens, torch.cat([image_tokens, image_tokens[:, 1:]], dim=1))
    w = inflate_patch_embed(vit.patch_embed.proj.weight, 2, "central_frame")
    assert torch.equal(w[:, :, 1], vit.patch_embed.proj.weight) and not w[:, :, 0].any()
    with pytest.raises(ValueError, match="method must be 'central_frame' or 'average'"):
        inflate_patch_embed(vit.patch_embed.proj.weight, 2, "mean")


def test_vivit_input_errors():
    m = ViViT(**dict(VIVIT_SMALL, depth=1))
    with pytest.raises(ValueError, match=r"x has 5 frames, which is not divisible by the tubelet's temporal size 2"):
        m(torch.randn(1, 3, 5, 8, 8))
    with pytest.raises(ValueError, match=r"x has 6 frames of 8x8 but the model was built for num_frames=4"):
        m(torch.randn(1, 3, 6, 8, 8))
    with pytest.raises(ValueError, match=r"frame size 8x9 is not divisible by the patch size 4"):
        m(torch.randn(1, 3, 4, 8, 9))
    with pytest.raises(ValueError, match=r"x must be a video of shape \(B, C, T, H, W\); got \(1, 3, 8, 8\)"):
        m(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="num_frames 5 is not divisible by tubelet_size 2"):
        ViViT(**dict(VIVIT_SMALL, num_frames=5))
    with pytest.raises(ValueError, match="variant must be 1"):
        ViViT(**dict(VIVIT_SMALL, variant=3))


# --------------------------------------------------------------------------- CLIP
CLIP_SMALL = dict(embed_dim=12, image_resolution=8, vision_layers=2, vision_width=16, vision_patch_size=4,
                  context_length=7, vocab_size=50, transformer_width=16, transformer_heads=2, transformer_layers=2,
                  vision_heads=2)


def _tokens(B, L, V, seed):
    """SOT, random ids, EOT (V - 1, the largest id) at a varying position, zero padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V - 2, (B, L), generator=g)
    for b in range(B):
        eot = 1 + (b * 3) % (L - 1)
        ids[b, 0], ids[b, eot], ids[b, eot + 1:] = V - 2, V - 1, 0
    return ids


def _small_clip(dtype, seed=10):
    model = CLIP(**CLIP_SMALL).to(dtype)
    randomize_(model, generator=torch.Generator().manual_seed(seed))
    return model


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_parity_logits_and_loss(dtype):
    model = _small_clip(dtype)
    image, text = _weights((3, 3, 8, 8), 11), _tokens(3, 7, 50, 12)
    g = _weights((3, 3), 13)

    def g_fn(out, loss_fn=None):
        li, lt = out
        return (loss_fn or contrastive_loss)(li, lt) + (li.double() * g).sum()

    def ref(sd):
        return clip_reference(sd, image, text, 2, 2)

    _check_model(model, lambda: model(image.to(dtype), text), ref, g_fn, dtype)
    # the loss function against its own written-out reference
    li, lt = ref({k: v.double() for k, v in model.state_dict().items()})
    torch.testing.assert_close(contrastive_loss(li, lt), clip_loss_reference(li, lt))
    torch.testing.assert_close(contrastive_loss(li), clip_loss_reference(li, li.T))


def test_clip_text_shorter_than_context_and_hidden_states():
    model = _small_clip(torch.float64)
    sd = dict(model.state_dict())
    text = _tokens(2, 5, 50, 14)
    hidden = clip_text_hidden_reference(sd, text, 2)
    for fused in (False, True):
        set_fused(model, fused)
        torch.testing.assert_close(model.text_hidden_states(text), hidden)
        eot = hidden[torch.arange(2), text.argmax(-1)] @ sd["text_projection"]
        torch.testing.assert_close(model.encode_text(text), eot)
    # causal: padding after the EOT token does not change the features
    padded = torch.cat([text, torch.zeros(2, 2, dtype=text.dtype)], dim=1)
    torch.testing.assert_close(model.encode_text(padded), model.encode_text(text))


def test_clip_example_inputs_layout():
    model = _small_clip(torch.float32)
    image, text = model.example_inputs(4)
    assert image.shape == (4, 3, 8, 8) and text.shape == (4, 7) and text.dtype == torch.long
    assert (text.max(-1).values == 49).all() and (text >= 0).all()
    eot = text.argmax(-1)
    for b in range(4):
        assert (text[b, eot[b] + 1:] == 0).all() and (text[b, :eot[b]] < 49).all()
    li, lt = model(image, text)
    assert li.shape == (4, 4) and torch.equal(lt, li.T)


def test_clip_input_errors():
    model = _small_clip(torch.float32)
    image, text = _weights((2, 3, 8, 8), 15).float(), _tokens(2, 7, 50, 16)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 50\) \(the vocabulary\); got values in \[0, 50\]"):
        model.encode_text(torch.where(text == 49, 50, text))
    with pytest.raises(ValueError, match=r"got values in \[-1, 49\]"):
        model(image, torch.where(text == 0, -1, text))
    with pytest.raises(ValueError, match=r"text has 8 tokens but the context length is 7"):
        model.encode_text(torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="text must hold integer token ids"):
        model.encode_text(text.float())
    with pytest.raises(ValueError, match=r"text must have shape \(B, L\)"):
        model.encode_text(text[0])
    with pytest.raises(ValueError, match=r"CLIP.encode_image: x is 16x16 but the model was built for 8x8"):
        model.encode_image(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"square logits; got logits_per_image \(2, 3\)"):
        contrastive_loss(torch.randn(2, 3))


def test_clip_openai_checkpoint_round_trip():
    """Config inference from an OpenAI-layout state_dict (with the JIT files' extra entries)."""
    cfg = dict(embed_dim=32, image_resolution=16, vision_layers=2, vision_width=128, vision_patch_size=8,
               context_length=9, vocab_size=40, transformer_width=64, transformer_heads=1, transformer_layers=3)
    src = CLIP(**cfg)
    sd = dict(src.state_dict(), input_resolution=torch.tensor(16), context_length=torch.tensor(9),
              vocab_size=torch.tensor(40))
    assert clip_config_from_state_dict(sd) == cfg
    loaded = uvit_fast.load_upstream_checkpoint(CLIP(**clip_config_from_state_dict(sd)), openai_state_dict(sd))
    torch.testing.assert_close(loaded.visual.proj, src.visual.proj)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_clip_layernorm_in_fp32(dtype):
    """OpenAI's LayerNorm: float32 math, result in the input's dtype (also under autocast)."""
    ln = LayerNormFp32(16)
    randomize_(ln)
    x = (torch.randn(3, 5, 16) * 4 + 2).to(dtype)
    expected = torch.nn.functional.layer_norm(x.float(), (16,), ln.weight, ln.bias, 1e-5).to(dtype)
    for fused in (False, True):
        ln.fused = fused
        out = ln(x)
        assert out.dtype == dtype
        if fused:  # the kernel (or, on CPU, torch's half LayerNorm) rounds once more at most
            torch.testing.assert_close(out, expected)
        else:
            assert torch.equal(out, expected)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert ln(x).dtype == dtype
        x_new, h = ln.residual(x, x)
        assert h.dtype == x_new.dtype == dtype


# --------------------------------------------------------------------------- text-to-image
def test_clip_text_to_uvit_t2i_end_to_end():
    """CLIP text tower -> UViTT2I context (clip_dim = text width), random weights, forward and
    backward through both models, against the two float64 references chained."""
    clip = _small_clip(torch.float64, seed=17)
    t2i_cfg = dict(img_size=8, patch_size=2, in_chans=4, embed_dim=16, depth=2, num_heads=2,
                   clip_dim=CLIP_SMALL["transformer_width"], num_clip_token=CLIP_SMALL["context_length"])
    t2i = UViTT2I(**t2i_cfg).double()
    randomize_(t2i, generator=torch.Generator().manual_seed(18))
    tokens = _tokens(2, 7, 50, 19)
    x, t = _weights((2, 4, 8, 8), 20), torch.tensor([3.0, 500.0])
    csd = dict(clip.state_dict())
    expected = uvit_reference(dict(t2i.state_dict()), t2i_cfg, x, t, None,
                              clip_text_hidden_reference(csd, tokens, 2), t2i=True)
    for fused in (False, True):
        set_fused(clip, fused)
        set_fused(t2i, fused)
        clip.zero_grad()
        out = t2i(x, t, text_to_image_context(clip, tokens))
        torch.testing.assert_close(out, expected)
        out.square().sum().backward()
        assert clip.token_embedding.weight.grad.abs().sum() > 0
        assert clip.visual.proj.grad is None  # the image tower is not used


@pytest.mark.slow
def test_clip_l14_text_tower_feeds_mscoco_uvit():
    """The real widths: CLIP ViT-L/14's text tower (77 x 768) into mscoco_uvit_small
    (depths cut to 1 / 2)."""
    clip = create_model("clip_vit_l14", vision_layers=1, transformer_layers=1).eval()
    t2i = create_model("mscoco_uvit_small", depth=2).eval()
    _, tokens = clip.example_inputs(1)
    with torch.no_grad():
        ctx = text_to_image_context(clip, tokens)
        assert ctx.shape == (1, 77, 768)
        out = t2i(torch.randn(1, 4, 32, 32), torch.ones(1), ctx)
    assert out.shape == (1, 4, 32, 32) and torch.isfinite(out).all()
    with pytest.raises(TypeError, match="clip must be a uvit_fast CLIP model"):
        text_to_image_context(t2i, tokens)


# --------------------------------------------------------------------------- Triton kernels
def _triton_missing(need_causal=False, need_3d=False):
    """Why the Triton path cannot run here (None when every kernel the models need works)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    x = torch.randn(1, 5, 2, 8)
    probes = {
        "patchify_embed": lambda: ops.patchify_embed(torch.randn(1, 3, 4, 4), torch.randn(16, 3, 2, 2),
                                                     prefix=torch.randn(1, 1, 16), backend="triton"),
        "adaln_layer_norm": lambda: ops.adaln_layer_norm(torch.randn(2, 16), eps=1e-6, backend="triton"),
        "residual_adaln_layer_norm": lambda: ops.residual_adaln_layer_norm(
            torch.randn(1, 2, 16), torch.randn(1, 2, 16), eps=1e-6, backend="triton"),
        "attention": lambda: ops.attention(x, x, x, causal=need_causal, backend="triton"),
    }
    if need_3d:
        probes["patchify_embed (3-D)"] = lambda: ops.patchify_embed(
            torch.randn(1, 3, 2, 4, 4), torch.randn(16, 3, 2, 2, 2), backend="triton")
    for name, probe in probes.items():
        try:
            probe()
        except NotImplementedError as exc:
            return f"the {name} Triton kernel is not available yet ({exc})"
        except uvit_fast._backend.BackendError as exc:
            return f"the Triton backend cannot run here ({exc})"
    return None


@pytest.mark.parametrize("which", ["vit", "vivit", "clip"])
@pytest.mark.slow
def test_fused_models_on_triton_kernels(which, device):
    reason = _triton_missing(need_causal=which == "clip", need_3d=which == "vivit")
    if reason:
        pytest.skip(reason)
    if which == "vit":
        cfg = dict(VIT_SMALL, depth=1)
        model, x = ViT(**cfg), _weights((2, 3, 8, 8), 21)
        run, ref = (lambda: model(x.float().to(device))), (lambda sd: vit_reference(sd, cfg, x))
    elif which == "vivit":
        cfg = dict(VIVIT_SMALL, depth=1, variant=2, temporal_depth=1)
        model, x = ViViT(**cfg), _weights((1, 3, 4, 8, 8), 22)
        run, ref = (lambda: model(x.float().to(device))), (lambda sd: vivit_reference(sd, cfg, x))
    else:
        model = CLIP(**dict(CLIP_SMALL, vision_layers=1, transformer_layers=1))
        text = _tokens(2, 7, 50, 23)
        run = lambda: model.encode_text(text.to(device))  # noqa: E731

        def ref(sd):
            hidden = clip_text_hidden_reference(sd, text, 2)
            return hidden[torch.arange(2), text.argmax(-1)] @ sd["text_projection"]
    randomize_(model, generator=torch.Generator().manual_seed(24))
    ref_out, ref_g = _ref_grads(ref, model, lambda o: o.double().square().sum())
    model.to(device)
    set_fused(model, False)
    base_out, base_g = _model_grads(model, run, lambda o: o.double().square().sum())
    base_g = {k: v.clone() for k, v in base_g.items() if v is not None}
    set_fused(model, True)
    with uvit_fast.use_backend("triton"), CustomOpRecorder() as rec:
        out, grads = _model_grads(model, run, lambda o: o.double().square().sum())
    wanted = ("attention", "layer_norm", "fused_linear") + (("patchify_embed",) if which != "clip" else ())
    assert any("fused_mlp_fc1" in op for op in rec.ops) and any("fused_mlp_fc2" in op for op in rec.ops), rec.ops
    for part in wanted:  # the kernels really ran, forward and backward
        assert any(part in op and "backward" not in op and "bwd" not in op for op in rec.ops), (part, rec.ops)
        assert any(part in op and ("backward" in op or "bwd" in op) for op in rec.ops), (part, rec.ops)
    s = _scale(ref_out)
    assert _err(out.cpu(), ref_out) <= 2 * _err(base_out.cpu(), ref_out) + 1e-5 * s
    for n, gb in base_g.items():
        s = _scale(ref_g[n])
        e, eb = _err(grads[n].cpu(), ref_g[n]), _err(gb.cpu(), ref_g[n])
        # GPU fp32 GEMMs may use TF32: allow for it there
        tol = 2 * eb + (1e-5 if device.type == "cpu" else 2e-3) * s
        assert e <= tol, (n, e, eb)
