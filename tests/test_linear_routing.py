"""The blocks' linears on the fused path (issue 16's routing): U-ViT, DiT, ViT, ViViT and CLIP, and
``optimize`` on the upstream-structured U-ViT / DiT / timm ViT, run qkv and proj through
``ops.fused_linear`` and the MLP with its residual add (DiT: and ``gate_mlp``) as one ``ops.fused_mlp``
call, only where the module computes exactly that; anything else is called as before.

* routing counts (PyTorch path, fast): every block's linears reach the ops, with the right
  activation, residual and gate; the plain path calls neither;
* on the Triton kernels (interpreter, float32): each family's fused model against the plain model in
  float32 and float64, output and every parameter gradient within the 2x rule, and the kernels'
  custom ops dispatched forward and backward (the routing cannot silently fall back);
* the modules that cannot be routed (hooks, a Linear subclass with its own forward, unknown
  activations, active dropout, a norm inside the MLP, timm's GluMlp layout) run their own forward.
"""
from __future__ import annotations

import collections
import contextlib
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import uvit_fast
from uvit_fast import layers, ops
from uvit_fast.layers import mlp_parts, set_fused
from uvit_fast.models import CLIP, DiT, UViT, UViTT2I, ViT, ViViT
from uvit_fast.testing import assert_parity, randomize_

import upstream_modules as up


class _OpCounter(TorchDispatchMode):
    """Counts the ``uvit_fast::`` custom ops dispatched inside the block, by op name."""

    def __init__(self):
        super().__init__()
        self.n = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("uvit_fast."):
            self.n[name.split(".")[1]] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _spy(monkeypatch):
    """Records every ``ops.fused_linear`` / ``ops.fused_mlp`` call the layers make (name, activation,
    whether a residual and a gate were folded in), then runs the real op."""
    calls = []
    real_linear, real_mlp = ops.fused_linear, ops.fused_mlp

    def linear(x, weight, bias=None, **kw):
        calls.append(("linear", kw.get("activation"), kw.get("residual") is not None, kw.get("gate") is not None))
        return real_linear(x, weight, bias, **kw)

    def mlp(x, w1, b1, w2, b2, **kw):
        calls.append(("mlp", kw.get("activation"), kw.get("residual") is not None, kw.get("gate") is not None))
        return real_mlp(x, w1, b1, w2, b2, **kw)

    monkeypatch.setattr(ops, "fused_linear", linear)
    monkeypatch.setattr(ops, "fused_mlp", mlp)
    yield calls


# --------------------------------------------------------------------------- the families
# small, awkward sizes: head dims 72 / 80 / 40, token counts 18, 16, 10, 5, 7, MLP widths 288 / 320
def _uvit():
    m = UViT(img_size=8, patch_size=2, in_chans=3, embed_dim=72, depth=2, num_heads=1, num_classes=5)
    g = torch.Generator().manual_seed(1)
    return m, (torch.randn(1, 3, 8, 8, generator=g), torch.rand(1, generator=g) * 999, torch.tensor([3])), 3


def _uvit_mid():
    """depth 0: the mid-block alone (one block; the fast U-ViT run on the Triton kernels)."""
    m = UViT(img_size=8, patch_size=2, in_chans=3, embed_dim=72, depth=0, num_heads=1, num_classes=5)
    g = torch.Generator().manual_seed(1)
    return m, (torch.randn(1, 3, 8, 8, generator=g), torch.rand(1, generator=g) * 999, torch.tensor([3])), 1


def _uvit_t2i():
    m = UViTT2I(img_size=8, patch_size=4, in_chans=3, embed_dim=40, depth=2, num_heads=1, clip_dim=24,
                num_clip_token=5)
    g = torch.Generator().manual_seed(2)
    return m, (torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, generator=g) * 999,
               torch.randn(2, 5, 24, generator=g)), 3


def _dit():
    m = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=72, depth=1, num_heads=1, num_classes=5)
    g = torch.Generator().manual_seed(3)
    return m, (torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g) * 999, torch.tensor([1, 5])), 1


def _vit():
    m = ViT(img_size=12, patch_size=4, embed_dim=80, depth=1, num_heads=1, num_classes=7)
    return m, (torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(4)),), 1


def _vivit():
    m = ViViT(num_frames=4, img_size=8, patch_size=4, tubelet_size=2, embed_dim=40, depth=1, num_heads=1,
              variant=2, temporal_depth=1, num_classes=5)
    return m, (torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(5)),), 2


def _clip():
    m = CLIP(embed_dim=12, image_resolution=8, vision_layers=1, vision_width=40, vision_patch_size=4,
             context_length=7, vocab_size=50, transformer_width=40, transformer_heads=1, transformer_layers=1,
             vision_heads=1)
    text = torch.tensor([[48, 5, 9, 49, 0, 0, 0], [48, 7, 3, 2, 11, 6, 49]])  # SOT ... EOT (the largest id)
    return m, (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(6)), text), 2


FAMILIES = {"uvit": _uvit, "uvit_mid": _uvit_mid, "uvit_t2i": _uvit_t2i, "dit": _dit, "vit": _vit, "vivit": _vivit, "clip": _clip}
# the MLP activation of each family: exact GELU (U-ViT, timm ViT), tanh GELU (DiT), QuickGELU (OpenAI CLIP)
ACTIVATION = {"uvit": "gelu", "uvit_mid": "gelu", "uvit_t2i": "gelu", "dit": "gelu_tanh", "vit": "gelu", "vivit": "gelu",
              "clip": "quick_gelu"}


def _build(family, dtype=torch.float32):
    model, args, blocks = FAMILIES[family]()
    randomize_(model, seed=7)  # also re-randomises DiT's zero-initialised gates and output
    model = model.to(dtype).eval()
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    return model, args, blocks


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _run(model, args, backend="auto", counter=None):
    """Forward and backward of a fixed random projection of the output; output and gradients on the CPU."""
    model.zero_grad(set_to_none=True)
    with uvit_fast.use_backend(backend), (counter or contextlib.nullcontext()):
        out = _first(model(*args))
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        (out.double() * g.to(out.device)).sum().backward()
    grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach().cpu(), grads


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_block_routes_its_linears(family, monkeypatch):
    """qkv and proj reach fused_linear, the MLP with its residual (DiT: and gate) fused_mlp, once per
    block, with the family's activation; the plain path calls neither."""
    model, args, blocks = _build(family)
    with _spy(monkeypatch) as calls:
        model(*args)
    gated = family == "dit"
    assert calls.count(("linear", None, False, False)) == 2 * blocks, calls
    assert calls.count(("mlp", ACTIVATION[family], True, gated)) == blocks, calls
    assert len(calls) == 3 * blocks, calls
    calls.clear()
    set_fused(model, False)
    with _spy(monkeypatch) as calls:
        model(*args)
    assert calls == []


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cpu_default_path_equals_plain_pytorch_exactly(family):
    """On CPU ``auto`` the ops run PyTorch: the fused model's linears give the plain model's numbers.
    float64, so that the fused kernels of the other ops (LayerNorm, attention) fall back to PyTorch too;
    the routed linears and the MLP + residual (+ gate) are then the same ops in the same order."""
    model, args, _ = _build(family, torch.float64)
    plain = set_fused(copy.deepcopy(model), False)
    out, grads = _run(model, args)
    out_p, grads_p = _run(plain, args)
    torch.testing.assert_close(out, out_p, rtol=1e-12, atol=1e-12)
    assert grads.keys() == grads_p.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], grads_p[n], rtol=1e-10, atol=1e-12, msg=n)


# the custom ops the Triton path must dispatch per block: forward (qkv, proj; fc1, fc2) and backward
def _check_kernels_ran(counts, blocks, gated):
    assert counts["fused_linear"] == 2 * blocks, counts
    assert counts["fused_mlp_fc1"] == counts["fused_mlp_fc2"] == blocks, counts
    # backward: every one of the 4 GEMMs of a block gets an input gradient and a weight gradient
    assert counts["fused_linear_backward_input"] >= 3 * blocks, counts
    assert counts["fused_linear_backward_weight"] == 4 * blocks, counts
    if gated:
        assert counts["fused_linear_backward_gate"] == blocks, counts


# the Triton runs take 4-8 s each under the interpreter on the 2-core machine (about 1 s a GEMM forward
# and backward): U-ViT's mid-block, DiT (per-sample gate), ViT (exact GELU, no gate) and CLIP (QuickGELU,
# causal text). U-ViT's three blocks with the long skip and T2I run on the kernels in
# tests/test_optimize.py, ViViT in tests/test_vit_family.py (slow set), with the same op checks.
@pytest.mark.parametrize("family", [
    "dit",  # the quick subset keeps DiT's gated block
    *(pytest.param(f, marks=pytest.mark.slow) for f in ("uvit_mid", "vit", "clip")),
])
def test_triton_linears_match_plain_within_parity_rule(family, device):
    """float32 on the Triton kernels (the interpreter on CPU) vs the plain model in float32, both against
    float64: output and every parameter gradient within 2x, and the linear kernels ran forward and backward."""
    model, args, blocks = _build(family)
    plain = set_fused(copy.deepcopy(model), False)
    ref = copy.deepcopy(plain).double()
    counter = _OpCounter()
    on_device = tuple(a.to(device) for a in args)
    out, grads = _run(model.to(device), on_device, "triton", counter)
    _check_kernels_ran(counter.n, blocks, gated=family == "dit")
    out_p, grads_p = _run(plain.to(device), on_device)
    out64, grads64 = _run(ref, tuple(a.double() if a.is_floating_point() else a for a in args))
    rel = 1e-5 if device.type == "cpu" else 2e-3  # a GPU's float32 tl.dot may round its inputs to TF32
    assert_parity(out, out_p, out64, atol=rel * out64.abs().max().item(), name=f"{family} output")
    assert grads.keys() == grads_p.keys() == grads64.keys()
    for n, g64 in grads64.items():
        assert_parity(grads[n], grads_p[n], g64, atol=rel * (1 + g64.abs().max().item()), name=f"{family} grad {n}")


# --------------------------------------------------------------------------- optimize
def _upstream(kind):
    g = torch.Generator().manual_seed(11)
    if kind == "uvit":
        m = up.UViT(img_size=8, patch_size=2, in_chans=4, embed_dim=24, depth=2, num_heads=3, num_classes=5)
        args = (torch.randn(1, 4, 8, 8, generator=g), torch.rand(1, generator=g) * 999, torch.tensor([3]))
        return m, args, 3
    if kind == "dit":
        m = up.DiT(input_size=8, patch_size=2, hidden_size=24, depth=2, num_heads=3, num_classes=6)
        return m, (torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, generator=g) * 999, torch.tensor([1, 6])), 2
    cls = up.VisionTransformer if kind == "vit" else up.VisionTransformerPre116
    return cls(img_size=8, patch_size=4, embed_dim=24, depth=2, num_heads=2), (torch.randn(2, 3, 8, 8, generator=g),), 2


@pytest.mark.parametrize("kind", ["uvit", "dit", "vit", "vit_pre116"])
def test_optimize_routes_upstream_linears(kind, monkeypatch):
    """The upstream-structured U-ViT / DiT and the timm mirror (1.0.31 and before 1.0.16): every block's
    linears reach the ops after ``optimize``, and the result is the upstream model's."""
    base, args, blocks = _upstream(kind)
    randomize_(base.double().eval(), seed=12)
    args = tuple(a.double() if a.is_floating_point() else a for a in args)
    fused, report = uvit_fast.optimize(copy.deepcopy(base))
    assert report.replaced and not report.left_alone, str(report)
    with _spy(monkeypatch) as calls:
        out = fused(*args)
    act = "gelu_tanh" if kind == "dit" else "gelu"
    assert calls.count(("linear", None, False, False)) == 2 * blocks, calls
    assert calls.count(("mlp", act, True, kind == "dit")) == blocks, calls
    torch.testing.assert_close(out, base(*args), rtol=1e-10, atol=1e-12)


# On the Triton kernels, optimize's upstream U-ViT (three kinds, long skips), DiT and timm mirror are
# checked within the 2x rule with fused_linear / fused_mlp_fc1 / fc2 dispatched forward and backward by
# tests/test_optimize.py::test_optimized_matches_upstream_outputs_and_gradients (slow set).


# --------------------------------------------------------------------------- what is not routed
class _LoraLinear(nn.Linear):
    """A Linear subclass with its own forward (a LoRA-style adapter): routing its weight would drop it."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.delta = nn.Parameter(torch.full((self.out_features,), 0.5))

    def forward(self, x):
        return super().forward(x) + self.delta


class _MyGELU(nn.GELU):
    def forward(self, x):
        return super().forward(x) * 1.5


def _vit_block_model():
    m = ViT(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=3).double().eval()
    return randomize_(m, seed=14), (torch.randn(2, 3, 8, 8, dtype=torch.float64),)


def _unroutable(kind, m):
    blk = m.blocks[0]
    if kind == "hook_on_fc1":
        seen = []
        blk.mlp.fc1.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
        return seen
    if kind == "hook_on_mlp":
        blk.mlp.register_forward_pre_hook(lambda mod, i: (i[0] * 2,))
    elif kind == "lora_fc2":
        old = blk.mlp.fc2
        blk.mlp.fc2 = _LoraLinear(old.in_features, old.out_features).double()
        blk.mlp.fc2.load_state_dict(old.state_dict(), strict=False)
    elif kind == "custom_act":
        blk.mlp.act = _MyGELU()
    elif kind == "relu":
        blk.mlp.act = nn.ReLU()
    elif kind == "dropout_training":
        blk.mlp.drop = nn.Dropout(0.5)
        m.train()
    elif kind == "norm_in_mlp":
        blk.mlp.norm = nn.LayerNorm(blk.mlp.fc1.out_features).double()
    return None


def _plain_vit_forward(m, x):
    """The same model on the plain path, with the same hooks and sub-modules (dropout seeded alike)."""
    set_fused(m, False)
    torch.manual_seed(0)
    out = m(x)
    set_fused(m, True)
    return out


@pytest.mark.parametrize("kind", ["hook_on_fc1", "hook_on_mlp", "lora_fc2", "custom_act", "relu",
                                  "dropout_training", "norm_in_mlp"])
def test_unroutable_mlps_run_their_own_forward(kind, monkeypatch):
    """An MLP the fused op does not compute exactly is called as the module (its hooks fire, its
    subclass's forward and its dropout run): the fused path then equals the plain one."""
    m, (x,) = _vit_block_model()
    seen = _unroutable(kind, m)
    assert mlp_parts(m.blocks[0].mlp) is None
    with _spy(monkeypatch) as calls:
        torch.manual_seed(0)
        out = m(x)
    assert not any(c[0] == "mlp" for c in calls), calls
    assert calls.count(("linear", None, False, False)) == 2  # the attention's linears are still routed
    if seen is not None:
        assert len(seen) == 1  # the hook fired on the fused path
    torch.testing.assert_close(out, _plain_vit_forward(m, x), rtol=1e-12, atol=1e-12)


def test_unroutable_attention_linears_are_called():
    """A qkv with a forward hook and a proj that is a Linear subclass with its own forward are called."""
    m, (x,) = _vit_block_model()
    attn = m.blocks[0].attn
    seen = []
    attn.qkv.register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    old = attn.proj
    attn.proj = _LoraLinear(old.in_features, old.out_features).double()
    attn.proj.load_state_dict(old.state_dict(), strict=False)
    assert not layers.is_plain_linear(attn.qkv) and not layers.is_plain_linear(attn.proj)
    out = m(x)
    assert len(seen) == 1
    torch.testing.assert_close(out, _plain_vit_forward(m, x), rtol=1e-12, atol=1e-12)


def test_glu_mlp_layout_is_not_routed():
    """timm's GluMlp has Mlp's children but a fc1 twice as wide whose output it chunks: not fc2(act(fc1))."""

    class GluMlp(nn.Module):
        def __init__(self, d, hidden):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(d, 2 * hidden), nn.SiLU(), nn.Linear(hidden, d)

        def forward(self, x):
            a, b = self.fc1(x).chunk(2, dim=-1)
            return self.fc2(a * self.act(b))

    class Mlp(GluMlp):  # named Mlp, but its widths still give it away
        pass

    assert mlp_parts(GluMlp(8, 16)) is None and mlp_parts(Mlp(8, 16)) is None


def test_activation_names():
    """The activation modules the fused op computes, by the class that defines their forward."""
    assert layers.activation_name(nn.GELU()) == "gelu"
    assert layers.activation_name(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert layers.activation_name(nn.SiLU()) == "silu"
    assert layers.activation_name(layers.QuickGELU()) == "quick_gelu"
    assert layers.activation_name(_MyGELU()) is None
    assert layers.activation_name(nn.ReLU()) is None
    assert layers.activation_name(nn.Identity()) is None
    clip_mlp = CLIP(embed_dim=8, image_resolution=8, vision_layers=1, vision_width=16, vision_patch_size=4,
                    context_length=5, vocab_size=20, transformer_width=16, transformer_heads=1,
                    transformer_layers=1, vision_heads=1).transformer.resblocks[0].mlp
    fc1, act, fc2 = mlp_parts(clip_mlp)
    assert (fc1, act, fc2) == (clip_mlp.c_fc, "quick_gelu", clip_mlp.c_proj)


def test_state_dict_keys_and_parameter_order_unchanged():
    """Routing adds no module, parameter or buffer: the keys equal the plain model's and upstream's."""
    for family in FAMILIES:
        model, _, _ = _build(family)
        plain = set_fused(copy.deepcopy(model), False)
        assert list(model.state_dict()) == list(plain.state_dict())
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
    base, _, _ = _upstream("dit")
    keys = list(base.state_dict())
    fused, _ = uvit_fast.optimize(base)
    assert list(fused.state_dict()) == keys
