"""Upstream compatibility of the models: presets, state_dict layouts, parameter counts,
output parity against independent float64 references, checkpoints and input errors."""
import math

import numpy as np
import pytest
import torch

from uvit_fast import create_model, list_models, load_upstream_checkpoint
from uvit_fast.layers import set_fused
from uvit_fast.models import DiT, UViT, UViTT2I, model_config
from uvit_fast.models.dit import sincos_pos_embed_2d

from upstream_reference import dit_keys, dit_reference, randomize_, uvit_keys, uvit_reference

UVIT_NAMES = [
    "cifar10_uvit_small", "celeba64_uvit_small", "imagenet64_uvit_mid", "imagenet64_uvit_large",
    "imagenet256_uvit_large", "imagenet256_uvit_huge", "imagenet512_uvit_large", "imagenet512_uvit_huge",
    "mscoco_uvit_small", "mscoco_uvit_small_deep",
]
DIT_NAMES = [f"DiT-{s}/{p}" for s in ("XL", "L", "B", "S") for p in (2, 4, 8)]

# From the facts file's preset table: (img, patch, in_chans, embed_dim, depth, heads, num_classes, conv)
FACTS_UVIT = {
    "cifar10_uvit_small": (32, 2, 3, 512, 12, 8, -1, True),
    "celeba64_uvit_small": (64, 4, 3, 512, 12, 8, -1, True),
    "imagenet64_uvit_mid": (64, 4, 3, 768, 16, 12, 1000, True),
    "imagenet64_uvit_large": (64, 4, 3, 1024, 20, 16, 1000, True),
    "imagenet256_uvit_large": (32, 2, 4, 1024, 20, 16, 1001, True),
    "imagenet256_uvit_huge": (32, 2, 4, 1152, 28, 16, 1001, False),
    "imagenet512_uvit_large": (64, 4, 4, 1024, 20, 16, 1001, True),
    "imagenet512_uvit_huge": (64, 4, 4, 1152, 28, 16, 1001, False),
    "mscoco_uvit_small": (32, 2, 4, 512, 12, 8, None, True),
    "mscoco_uvit_small_deep": (32, 2, 4, 512, 16, 8, None, True),
}
FACTS_DIT = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def _meta(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def _facts_layout(name):
    if name.startswith("DiT"):
        size, p = name[4:].split("/")
        depth, hidden, heads = FACTS_DIT[size]
        return dit_keys(patch_size=int(p), hidden_size=hidden, depth=depth, num_heads=heads)
    img, p, c, d, depth, heads, nc, conv = FACTS_UVIT[name]
    t2i = nc is None
    return uvit_keys(img_size=img, patch_size=p, in_chans=c, embed_dim=d, depth=depth, num_heads=heads,
                     num_classes=-1 if t2i else nc, conv=conv, t2i=t2i)


def test_list_models_has_every_upstream_name():
    assert list_models()[: len(UVIT_NAMES + DIT_NAMES)] == UVIT_NAMES + DIT_NAMES


@pytest.mark.parametrize("name", UVIT_NAMES + DIT_NAMES)
def test_state_dict_layout_matches_upstream(name):
    model = _meta(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _facts_layout(name)


@pytest.mark.parametrize("name", UVIT_NAMES + DIT_NAMES)
def test_parameter_order_matches_upstream(name):
    """state_dict() and parameters() list the keys in upstream's registration order (an optimizer's
    saved state is matched by position: upstream's optimizer.pth must resume on ours)."""
    model = _meta(name)
    want = list(_facts_layout(name))
    assert list(model.state_dict()) == want
    assert [n for n, _ in model.named_parameters()] == want


def test_vit_parameter_order_matches_timm_structure():
    """timm's VisionTransformer order (cls_token, pos_embed, patch_embed, blocks, norm, head), from the
    upstream-structured module of the tests, at a small config; every ViT preset follows the pattern."""
    import upstream_modules as up
    from uvit_fast.models import ViT

    cfg = dict(img_size=16, patch_size=4, num_classes=7, embed_dim=32, depth=2, num_heads=2)
    assert list(ViT(**cfg).state_dict()) == list(up.VisionTransformer(**cfg).state_dict())
    model = _meta("vit_base_patch16_224")
    block = [f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
             for p in ("weight", "bias")]
    want = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    want += [f"blocks.{i}.{k}" for i in range(12) for k in block]
    want += ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    assert list(model.state_dict()) == want


@pytest.mark.parametrize(
    "name, millions",
    [("cifar10_uvit_small", 44), ("mscoco_uvit_small_deep", 58), ("imagenet64_uvit_mid", 131),
     ("imagenet64_uvit_large", 287), ("imagenet256_uvit_huge", 501), ("DiT-XL/2", 675)],
)
def test_parameter_counts_match_papers(name, millions):
    n = sum(p.numel() for p in _meta(name).parameters())
    assert round(n / 1e6) == millions


def test_head_dim_72_for_huge_models():
    for name in ("imagenet256_uvit_huge", "DiT-XL/2"):
        attn = next(m for m in _meta(name).modules() if hasattr(m, "head_dim"))
        assert attn.head_dim == 72


def test_create_model_overrides_and_unknown_name():
    m = _meta("DiT-S/8", input_size=64, learn_sigma=False)
    assert m.pos_embed.shape == (1, 64, 384) and m.out_channels == 4
    assert model_config("imagenet256_uvit_huge")["conv"] is False
    with pytest.raises(ValueError, match="unknown model 'uvit-nope'"):
        create_model("uvit-nope")


def test_dit_sincos_table_follows_upstream_grid_order():
    # Written from the MAE/DiT convention: meshgrid(w, h) => first half of the channels
    # encodes the column index, second half the row index; each half is [sin, cos].
    D, g = 16, 3
    w, h = np.meshgrid(np.arange(g, dtype=np.float64), np.arange(g, dtype=np.float64))

    def one(pos, dim):
        omega = 1.0 / 10000 ** (np.arange(dim // 2) / (dim / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], 1)

    expected = np.concatenate([one(w, D // 2), one(h, D // 2)], 1)
    np.testing.assert_allclose(sincos_pos_embed_2d(D, g), expected, rtol=0, atol=1e-12)
    m = DiT(input_size=6, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=3)
    assert not m.pos_embed.requires_grad
    torch.testing.assert_close(m.pos_embed[0].double(), torch.from_numpy(expected), atol=1e-6, rtol=0)


def test_dit_init_follows_upstream():
    """Upstream initialises the patch conv like a Linear (xavier weight, zero bias) and zeroes
    every adaLN output layer and the final linear; the other Linear biases are zero too."""
    m = DiT(input_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=5)
    assert torch.count_nonzero(m.x_embedder.proj.bias) == 0
    w = m.x_embedder.proj.weight
    bound = math.sqrt(6.0 / (w.shape[0] + w[0].numel()))  # xavier-uniform on the flattened weight
    assert w.abs().max() <= bound and w.abs().max() > 0.5 * bound
    zeroed = [b.adaLN_modulation[-1] for b in m.blocks] + [m.final_layer.adaLN_modulation[-1], m.final_layer.linear]
    assert all(torch.count_nonzero(p) == 0 for layer in zeroed for p in layer.parameters())
    assert all(torch.count_nonzero(mod.bias) == 0 for mod in m.modules() if isinstance(mod, torch.nn.Linear))


# --------------------------------------------------------------------------- output parity
UVIT_SMALL = dict(img_size=12, patch_size=2, in_chans=3, embed_dim=30, depth=4, num_heads=3)

UVIT_CASES = {
    "uncond": dict(),
    "cond": dict(num_classes=7),
    "no_conv_no_skip": dict(num_classes=7, conv=False, skip=False),
    "mlp_time_qkv_bias": dict(mlp_time_embed=True, qkv_bias=True),
    "odd_heads_patch4": dict(img_size=16, patch_size=4, in_chans=4, embed_dim=35, num_heads=5, depth=2, num_classes=3),
}


def _inputs(B, C, size, dtype, num_classes=None):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, C, size, size, generator=g, dtype=dtype)
    t = torch.rand(B, generator=g) * 999
    y = torch.randint(0, num_classes, (B,), generator=g) if num_classes else None
    return x, t, y


def _check_parity(model, ref_fn, dtype, args_ref, args_model):
    sd = {k: v.double() for k, v in model.state_dict().items()}
    ref = ref_fn(sd, *args_ref)
    for fused in (False, True):
        set_fused(model, fused)
        out = model(*args_model)
        assert out.dtype == dtype and out.shape == ref.shape
        tol = 1e-10 if dtype == torch.float64 else 2e-4 * ref.abs().max().item()
        err = (out.double() - ref).abs().max().item()
        assert err <= tol, f"fused={fused}: max error {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", list(UVIT_CASES))
def test_uvit_matches_reference(case, dtype):
    cfg = {**UVIT_SMALL, **UVIT_CASES[case]}
    torch.manual_seed(0)
    model = UViT(**cfg).to(dtype).eval()
    randomize_(model, generator=torch.Generator().manual_seed(2))
    for B in (1, 2):
        x, t, y = _inputs(B, cfg["in_chans"], cfg["img_size"], dtype, cfg.get("num_classes"))
        _check_parity(model, lambda sd, *a: uvit_reference(sd, cfg, *a), dtype,
                      (x.double(), t, y), (x, t, y))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_uvit_t2i_matches_reference(dtype):
    cfg = dict(UVIT_SMALL, clip_dim=24, num_clip_token=5)
    model = UViTT2I(**cfg).to(dtype).eval()
    randomize_(model, generator=torch.Generator().manual_seed(3))
    x, t, _ = _inputs(1, 3, 12, dtype)
    ctx = torch.randn(1, 5, 24, dtype=dtype)
    _check_parity(model, lambda sd, *a: uvit_reference(sd, cfg, *a, t2i=True), dtype,
                  (x.double(), t, None, ctx.double()), (x, t, ctx))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_dit_matches_reference(dtype, learn_sigma):
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=36, depth=2, num_heads=3,
               num_classes=5, learn_sigma=learn_sigma)
    model = DiT(**cfg).to(dtype).eval()
    randomize_(model, std=0.15, generator=torch.Generator().manual_seed(4))  # re-randomises the zero-init layers
    assert model.final_layer.linear.weight.abs().min() > 0
    for B in (1, 3):
        x, t, y = _inputs(B, 4, 8, dtype, 6)  # label 5 is the null class (num_classes + 1 rows)
        _check_parity(model, lambda sd, *a: dit_reference(sd, cfg, *a), dtype, (x.double(), t, y), (x, t, y))


def test_dit_forward_with_cfg():
    model = DiT(input_size=8, patch_size=4, hidden_size=16, depth=1, num_heads=2, num_classes=3).double().eval()
    randomize_(model)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([10.0, 10.0])
    y = torch.tensor([1, 3])  # conditional, null class
    both = model(torch.cat([x[:1], x[:1]]), t, y)
    cond, uncond = both[:1], both[1:]
    guided = uncond + 4.0 * (cond - uncond)
    # upstream's default guides only the first three channels; the rest is each half's own output
    out = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
    torch.testing.assert_close(out[:, :3], guided[:, :3].expand(2, -1, -1, -1))
    torch.testing.assert_close(out[:, 3:], both[:, 3:])
    # guidance_channels=None: all in_channels, the standard choice
    out = model.forward_with_cfg(x, t, y, cfg_scale=4.0, guidance_channels=None)
    torch.testing.assert_close(out[:, :4], guided[:, :4].expand(2, -1, -1, -1))
    torch.testing.assert_close(out[:, 4:], both[:, 4:])
    # the same weights in the upstream structure give the same guided output
    import upstream_modules

    up = upstream_modules.DiT(input_size=8, patch_size=4, hidden_size=16, depth=1, num_heads=2, num_classes=3)
    up.double().eval().load_state_dict(model.state_dict())
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, 4.0), up.forward_with_cfg(x, t, y, 4.0))
    with pytest.raises(ValueError, match="batch must be even"):
        model.forward_with_cfg(x[:1], t[:1], y[:1], 4.0)
    with pytest.raises(ValueError, match=r"guidance_channels must be an int in \[1, 8\].*got 9"):
        model.forward_with_cfg(x, t, y, 4.0, guidance_channels=9)


def test_dit_label_dropout_only_in_training():
    model = DiT(input_size=4, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=3,
                class_dropout_prob=1.0)
    randomize_(model)
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([1.0, 2.0]), torch.tensor([0, 1])
    null = torch.tensor([3, 3])
    model.train()
    torch.testing.assert_close(model(x, t, y), model.eval()(x, t, null))
    # in eval the labels are kept (the assertion above alone would pass if eval dropped them too)
    assert not torch.allclose(model(x, t, y), model(x, t, null))


@pytest.mark.slow
def test_gradient_checkpointing_matches():
    cfg = dict(UVIT_SMALL, num_classes=4)
    a = UViT(**cfg).double()
    b = UViT(**cfg, use_checkpoint=True).double()
    b.load_state_dict(a.state_dict())
    x, t, y = _inputs(2, 3, 12, torch.float64, 4)
    a(x, t, y).square().sum().backward()
    b(x, t, y).square().sum().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.slow
def test_load_upstream_checkpoint_roundtrip(tmp_path):
    src = create_model("DiT-S/8", input_size=16, depth=2)
    randomize_(src)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "ema": src.state_dict()}, path)
    loaded = load_upstream_checkpoint("DiT-S/8", path, input_size=16, depth=2, key="model")
    for k, v in src.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    plain = tmp_path / "plain.pth"
    torch.save(src.state_dict(), plain)
    assert load_upstream_checkpoint(create_model("DiT-S/8", input_size=16, depth=2), plain) is not None


@pytest.mark.slow
def test_load_dit_training_checkpoint(tmp_path):
    """DiT's train.py saves {"model", "ema", "opt", "args": argparse.Namespace}; the EMA weights load."""
    import argparse

    src = create_model("DiT-S/8", input_size=16, depth=1)
    randomize_(src)
    opt = torch.optim.AdamW(src.parameters())
    src(torch.randn(1, 4, 16, 16), torch.ones(1), torch.tensor([1])).sum().backward()
    opt.step()
    path = tmp_path / "0000100.pt"
    torch.save({"model": src.state_dict(), "ema": src.state_dict(), "opt": opt.state_dict(),
                "args": argparse.Namespace(model="DiT-S/8", image_size=128, lr=None)}, path)
    loaded = load_upstream_checkpoint("DiT-S/8", path, input_size=16, depth=1)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


def test_load_upstream_checkpoint_reports_mismatch(tmp_path):
    sd = create_model("DiT-S/8", input_size=16, depth=2).state_dict()
    sd.pop("pos_embed")
    sd["extra.weight"] = torch.zeros(1)
    sd["x_embedder.proj.bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"(?s)missing keys: pos_embed.*unexpected keys: extra.weight.*"
                                         r"x_embedder.proj.bias: checkpoint \(5,\) vs model \(384,\)"):
        load_upstream_checkpoint("DiT-S/8", sd, input_size=16, depth=2)


def test_upstream_layout_state_dict_loads_strictly():
    """A state_dict built only from the facts' key list loads into our model strictly."""
    cfg = dict(img_size=8, patch_size=2, in_chans=4, embed_dim=16, depth=2, num_heads=2, num_classes=5)
    sd = {k: torch.randn(s) for k, s in uvit_keys(**cfg).items()}
    model = load_upstream_checkpoint(UViT(**cfg), sd)
    torch.testing.assert_close(model.pos_embed, sd["pos_embed"])


# --------------------------------------------------------------------------- input errors
@pytest.fixture(scope="module")
def cond_uvit():
    return UViT(img_size=8, patch_size=2, in_chans=3, embed_dim=16, depth=2, num_heads=2, num_classes=5).eval()


def test_bad_inputs_raise_clear_errors(cond_uvit):
    m = cond_uvit
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([0, 4])
    with pytest.raises(ValueError, match=r"image size 8x9 is not divisible by the patch size 2"):
        m(torch.randn(2, 3, 8, 9), t, y)
    with pytest.raises(ValueError, match=r"x is 10x10 but the model was built for 8x8"):
        m(torch.randn(2, 3, 10, 10), t, y)
    with pytest.raises(ValueError, match=r"x has 4 channels but the model was built with in_chans=3"):
        m(torch.randn(2, 4, 8, 8), t, y)
    with pytest.raises(ValueError, match=r"timesteps must have shape \(2,\).*got \(3,\)"):
        m(x, torch.ones(3), y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\); got values in \[0, 5\]"):
        m(x, t, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"class-conditional.*y is required"):
        m(x, t)
    with pytest.raises(TypeError, match=r"y must have an integer dtype"):
        m(x, t, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\)"):
        m(torch.randn(3, 8, 8), t, y)
    with pytest.raises(ValueError, match="img_size 30 is not divisible by patch_size 4"):
        UViT(img_size=30, patch_size=4)


def test_inputs_on_another_device_than_x_raise_clear_errors():
    """Timesteps, labels or context left on the CPU next to x on an accelerator (here: meta)."""
    with torch.device("meta"):
        uvit = UViT(img_size=8, patch_size=2, embed_dim=16, depth=2, num_heads=2, num_classes=5)
        dit = DiT(input_size=8, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=5)
        t2i = UViTT2I(img_size=8, patch_size=2, embed_dim=16, depth=2, num_heads=2, clip_dim=12, num_clip_token=4)
        x, t, y = torch.randn(2, 3, 8, 8), torch.ones(2), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="UViT: timesteps are on cpu but x is on meta"):
        uvit(x, torch.ones(2), y)
    with pytest.raises(ValueError, match="UViT: y is on cpu but x is on meta"):
        uvit(x, t, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="DiT: y is on cpu but x is on meta"):
        dit(torch.randn(2, 4, 8, 8, device="meta"), t, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="UViTT2I: context is on cpu but x is on meta"):
        t2i(x, t, torch.randn(2, 4, 12))
    with pytest.raises(TypeError, match=r"y must have an integer dtype \(int64 or int32\); got torch.uint8"):
        uvit(x, t, torch.zeros(2, dtype=torch.uint8, device="meta"))


def test_scalar_timestep_broadcasts(cond_uvit):
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 4])
    torch.testing.assert_close(cond_uvit(x, 5.0, y), cond_uvit(x, torch.tensor([5.0, 5.0]), y))


def test_uncond_rejects_labels_and_t2i_checks_context():
    m = UViT(img_size=8, patch_size=2, embed_dim=16, depth=2, num_heads=2)
    with pytest.raises(ValueError, match="model is unconditional"):
        m(torch.randn(1, 3, 8, 8), torch.ones(1), torch.tensor([0]))
    t2i = UViTT2I(img_size=8, patch_size=2, embed_dim=16, depth=2, num_heads=2, clip_dim=12, num_clip_token=4)
    with pytest.raises(ValueError, match=r"context must have shape \(1, 4, 12\).*got \(1, 77, 12\)"):
        t2i(torch.randn(1, 3, 8, 8), torch.ones(1), torch.randn(1, 77, 12))


def test_dit_rejects_label_outside_table():
    m = DiT(input_size=4, patch_size=2, hidden_size=16, depth=1, num_heads=2, num_classes=3).eval()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        m(torch.randn(1, 4, 4, 4), torch.ones(1), torch.tensor([4]))


@pytest.mark.slow
def test_presets_run_forward_at_reduced_depth():
    """Every preset's real widths, patches and token counts run end to end (depth cut to 1-2)."""
    for name in ("imagenet256_uvit_huge", "mscoco_uvit_small", "DiT-XL/8"):
        kw = {"depth": 2} if "uvit" in name else {"depth": 1}
        m = create_model(name, **kw).eval()
        cfg = model_config(name)
        size = cfg.get("img_size", cfg.get("input_size", 32))
        C = cfg.get("in_chans", cfg.get("in_channels", 4))
        x = torch.randn(1, C, size, size)
        with torch.no_grad():
            if isinstance(m, UViTT2I):
                out = m(x, torch.ones(1), torch.randn(1, 77, 768))
            else:
                out = m(x, torch.ones(1), torch.tensor([3]))
        assert out.shape[-2:] == x.shape[-2:] and torch.isfinite(out).all()
        assert math.prod(out.shape[:1]) == 1


@pytest.mark.parametrize("name", ["cifar10_uvit_small", "imagenet64_uvit_mid", "mscoco_uvit_small", "DiT-B/4"])
def test_example_inputs_run(name):
    with torch.device("meta"):
        m = create_model(name, fused=False)
        args = m.example_inputs(2)
        out = m(*args)
    assert out.shape[0] == 2 and out.shape[-2:] == args[0].shape[-2:]
