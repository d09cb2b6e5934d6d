"""Deployment paths (docs/drop_in.md, "Deploying"): TorchScript, torch.jit.trace, torch.export, AOTInductor.

* ``torch.jit.script`` of a fused model (and of an ``optimize``'d timm / U-ViT / DiT) scripts its
  plain-PyTorch twin (``__prepare_scriptable__``): the upstream math on the same parameters, equal to
  the eager model in float64; the eager model keeps its fused modules.
* ``torch.jit.trace`` records the plain path too (aten ops only).
* ``torch.export`` keeps the kernels: the exported program holds the ``uvit_fast::`` ops, survives
  ``torch.export.save`` / ``load``, exports a dynamic batch and equals eager.
* AOTInductor on CPU packages the PyTorch path (``use_backend("torch")``); the package runs in a
  fresh process. A package holding the ``uvit_fast::`` ops needs ``import uvit_fast`` where it runs.
"""
import copy
import io
import os
import subprocess
import sys
import textwrap
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import uvit_fast
from uvit_fast import layers
from uvit_fast.models import create_model
from uvit_fast.testing import randomize_

import upstream_modules as up

F64 = dict(rtol=0, atol=1e-12)  # float64: equal up to rounding


# --------------------------------------------------------------------------- small models of every family
def _fused(family: str, dtype=torch.float64) -> nn.Module:
    """A small ``create_model`` model of ``family`` (fused=True), random weights, eval mode."""
    small = dict(embed_dim=16, depth=2, num_heads=2)
    if family == "uvit":
        m = create_model("imagenet64_uvit_mid", img_size=8, patch_size=2, num_classes=5, **small)
    elif family == "uvit_t2i":
        m = create_model("mscoco_uvit_small", img_size=8, patch_size=2, clip_dim=12, num_clip_token=3, **small)
    elif family == "dit":
        m = create_model("DiT-S/8", input_size=8, patch_size=4, hidden_size=16, depth=2, num_heads=2, num_classes=5)
    elif family == "vit":
        m = create_model("vit_tiny_patch16_224", img_size=8, patch_size=4, num_classes=3, **small)
    elif family in ("vivit1", "vivit2"):
        m = create_model(f"vivit_b_16x2_model{family[-1]}", num_frames=4, img_size=8, patch_size=4, num_classes=3,
                         temporal_depth=1, **small)
    elif family == "clip":
        m = create_model("clip_vit_b32", embed_dim=8, image_resolution=8, vision_layers=1, vision_width=16,
                         vision_patch_size=4, vision_heads=2, context_length=6, vocab_size=20, transformer_width=16,
                         transformer_heads=2, transformer_layers=1)
    else:
        raise AssertionError(family)
    return randomize_(m).to(dtype).eval()


def _inputs(model: nn.Module, batch: int = 2, dtype=torch.float64, seed: int = 1):
    torch.manual_seed(seed)
    return model.example_inputs(batch, dtype=dtype)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _classes(m: nn.Module):
    return [type(x) for x in m.modules()]


def _graph_ops(script_module) -> set:
    return {n.kind() for n in script_module.inlined_graph.nodes()}


# --------------------------------------------------------------------------- TorchScript: the fused models
SCRIPT_FAMILIES = ["uvit", "uvit_t2i", "dit", "vit", "vivit1", "vivit2", "clip"]


@pytest.mark.parametrize("family", SCRIPT_FAMILIES)
def test_torchscript_fused_model_runs_the_upstream_math(family):
    """``torch.jit.script`` of a fused model gives its plain twin: equal to eager in float64, the same
    state_dict (the same Parameter objects), no ``uvit_fast`` op in the graph, savable; the eager model
    keeps its fused modules."""
    model = _fused(family)
    classes = _classes(model)
    scripted = torch.jit.script(model)
    assert _classes(model) == classes  # the eager model was not touched
    inputs = _inputs(model)
    with torch.no_grad():
        ref, out = model(*inputs), scripted(*inputs)
    torch.testing.assert_close(_first(out), _first(ref), **F64)
    assert sorted(scripted.state_dict()) == sorted(model.state_dict())
    shared = {k: v.data_ptr() for k, v in model.state_dict().items()}
    assert {k: v.data_ptr() for k, v in scripted.state_dict().items()} == shared  # shared, not copied
    assert not [k for k in _graph_ops(scripted) if k.startswith("uvit_fast")]
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    with torch.no_grad():
        torch.testing.assert_close(_first(torch.jit.load(buf)(*inputs)), _first(ref), **F64)


def test_torchscript_clip_keeps_encode_methods():
    model = _fused("clip")
    scripted = torch.jit.script(model)
    image, text = _inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted.encode_image(image), model.encode_image(image), **F64)
        torch.testing.assert_close(scripted.encode_text(text), model.encode_text(text), **F64)


# --------------------------------------------------------------------------- TorchScript: optimize()'d upstream models
# timm's own modules are scriptable (timm tests it); the structural mirrors in upstream_modules.py are
# not (no annotations), so these subclasses add timm's annotated forwards, nothing else.
class ScriptableLayerNorm(up.LayerNorm):
    """``timm.layers.LayerNorm`` as timm 1.0.31 writes it (scriptable: fast-norm off under TorchScript)."""

    __module__ = "timm.layers.norm"
    __qualname__ = "LayerNorm"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class ScriptableAttention(up.TimmAttention):
    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj_drop(self.proj(self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))))


class ScriptableBlock(up.TimmBlock):
    def __init__(self, dim, num_heads, *args, **kwargs):
        super().__init__(dim, num_heads, *args, **kwargs)
        self.attn = ScriptableAttention(dim, num_heads, qkv_bias=True)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ScriptablePatchEmbed(up.PatchEmbed):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class ScriptableViT(nn.Module):
    """timm ``VisionTransformer``'s structure and (class-token, no-mask) forward, scriptable."""

    def __init__(self, img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2, num_classes=7):
        super().__init__()
        self.num_prefix_tokens = 1
        self.patch_embed = ScriptablePatchEmbed(img_size, patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.blocks = nn.Sequential(*[ScriptableBlock(embed_dim, num_heads, norm_layer=ScriptableLayerNorm)
                                      for _ in range(depth)])
        self.norm = ScriptableLayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def test_torchscript_optimized_timm_vit():
    """The issue: timm's test_model_forward_torchscript stopped at optimize.py's ``_output_fmt``. Now
    ``torch.jit.script`` of an ``optimize``'d timm ViT scripts timm's own code on the same parameters."""
    ref = randomize_(ScriptableViT()).double().eval()
    model, report = uvit_fast.optimize(copy.deepcopy(ref))
    assert not report.left_alone and len(report.replaced) == 4, str(report)
    classes = _classes(model)
    scripted = torch.jit.script(model)
    assert _classes(model) == classes and type(model.blocks[0]).__name__ == "FusedScriptableBlock"
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), ref(x), **F64)
        torch.testing.assert_close(model(x), ref(x), **F64)
    assert sorted(scripted.state_dict()) == sorted(ref.state_dict())
    # TorchScript compiled timm's classes, none of the generated Fused ones
    names = {m.original_name for m in scripted.modules()}
    assert {"ScriptableViT", "ScriptableBlock", "ScriptableAttention", "ScriptableLayerNorm", "ScriptablePatchEmbed"} <= names
    assert not [n for n in names if n.startswith("Fused")], names


def _upstream(kind):
    """A small upstream-structured model (tests/upstream_modules.py) and its inputs."""
    if kind == "vit":
        return up.VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=7), \
            (torch.randn(2, 3, 8, 8),)
    if kind == "dit":
        return up.DiT(patch_size=4, hidden_size=16, depth=1), \
            (torch.randn(2, 4, 8, 8), torch.tensor([3.0, 500.0]), torch.tensor([1, 4]))
    m = up.UViT(img_size=8, patch_size=4, embed_dim=16, depth=2, num_classes=5 if kind == "uvit_cond" else -1,
                t2i=kind == "uvit_t2i", clip_dim=12, num_clip_token=3)
    inputs = (torch.randn(2, 3, 8, 8), torch.tensor([3.0, 500.0]))
    if kind == "uvit_cond":
        inputs += (torch.tensor([1, 4]),)
    elif kind == "uvit_t2i":
        inputs += (torch.randn(2, 3, 12),)
    return m, inputs


@pytest.mark.parametrize("kind", ["uvit", "uvit_cond", "uvit_t2i", "dit"])
def test_torchscript_optimized_upstream_uvit_dit(kind):
    """An ``optimize``'d upstream U-ViT / DiT scripts :class:`ScriptUViT` / :class:`ScriptDiT` on its
    own parameters: equal to the upstream model in float64."""
    ref, inputs = _upstream(kind)
    ref = randomize_(ref).double().eval()
    inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    model, report = uvit_fast.optimize(copy.deepcopy(ref))
    assert not report.left_alone, str(report)
    scripted = torch.jit.script(model)
    assert type(model).__name__ == f"Fused{type(ref).__name__}"
    with torch.no_grad():
        torch.testing.assert_close(scripted(*inputs), ref(*inputs), **F64)
    assert sorted(scripted.state_dict()) == sorted(ref.state_dict())


# --------------------------------------------------------------------------- torch.jit.trace, raw ops
def test_jit_trace_records_the_plain_path():
    """While ``torch.jit.trace`` records, the fused modules run their plain path (with the kernels
    forced, a traced graph would otherwise hold ops that differ between invocations and fail
    trace's check): the graph has aten ops only and equals the unfused model (float32: the kernels
    run for trace's check, which reruns the model eagerly)."""
    model = _fused("dit", torch.float32)
    inputs = _inputs(model, dtype=torch.float32)
    plain = layers.set_fused(copy.deepcopy(model), False)
    with uvit_fast.use_backend("triton"), torch.no_grad():
        traced = torch.jit.trace(model, inputs)
    assert not [k for k in _graph_ops(traced) if k.startswith("uvit_fast")]
    with torch.no_grad():
        torch.testing.assert_close(traced(*inputs), plain(*inputs), rtol=0, atol=1e-6)


def test_jit_script_of_a_raw_op_is_refused():
    """The ops take keyword-only arguments, which TorchScript cannot compile: script the modules."""
    with pytest.raises(torch.jit.frontend.NotSupportedError, match="keyword-only arguments"):
        torch.jit.script(uvit_fast.ops.attention)


# --------------------------------------------------------------------------- torch.export keeps the kernels
def _export_case(model, inputs, batch_dim_inputs):
    """Export with the kernels forced and a dynamic batch; save / load; compare to eager at two batches."""
    batch = torch.export.Dim("batch", min=1, max=16)
    shapes = tuple({0: batch} if i in batch_dim_inputs else None for i in range(len(inputs)))
    with uvit_fast.use_backend("triton"):
        ep = torch.export.export(model, inputs, dynamic_shapes=shapes)
        ops = {str(n.target) for n in ep.graph.nodes if str(n.target).startswith("uvit_fast.")}
        buf = io.BytesIO()
        torch.export.save(ep, buf)
        buf.seek(0)
        loaded = torch.export.load(buf).module()
        for b in (2, 3):
            args = tuple(torch.cat([t] * 2)[:b] if i in batch_dim_inputs else t for i, t in enumerate(inputs))
            with torch.no_grad():
                torch.testing.assert_close(_first(loaded(*args)), _first(model(*args)), rtol=1e-5, atol=1e-5)
    return ops


EXPORT_FUSED = {
    "uvit": {"uvit_fast.patchify_embed.default", "uvit_fast.skip_concat_linear.default",
             "uvit_fast.attention_qkvpacked_fwd.default", "uvit_fast.decoder_unpatchify.default"},
    "uvit_t2i": {"uvit_fast.patchify_embed.default", "uvit_fast.attention_qkvpacked_fwd.default"},
    "dit": {"uvit_fast.adaln_layer_norm.default", "uvit_fast.residual_adaln_layer_norm.default",
            "uvit_fast.attention_qkvpacked_fwd.default", "uvit_fast.decoder_unpatchify.default"},
    "vit": {"uvit_fast.patchify_embed.default", "uvit_fast.attention_qkvpacked_fwd.default",
            "uvit_fast.fused_mlp_fc1.default"},
    "clip": {"uvit_fast.patchify_embed.default", "uvit_fast.attention_qkvpacked_fwd.default",
             "uvit_fast.residual_adaln_layer_norm.default"},
}


# the interpreter is slow: DiT (and the optimized timm ViT below) run in the full suite, the rest extended
_EXTENDED = pytest.mark.extended


@pytest.mark.slow
@pytest.mark.parametrize("family", [f if f == "dit" else pytest.param(f, marks=_EXTENDED) for f in EXPORT_FUSED])
def test_export_fused_model_keeps_the_kernels(family):
    model = _fused(family, torch.float32)
    inputs = _inputs(model, dtype=torch.float32)
    batched = set(range(len(inputs)))
    ops = _export_case(model, inputs, batched)
    assert EXPORT_FUSED[family] <= ops, sorted(ops)


@pytest.mark.slow
@pytest.mark.parametrize("kind", [k if k == "vit" else pytest.param(k, marks=_EXTENDED)
                                  for k in ["uvit", "uvit_cond", "uvit_t2i", "dit", "vit"]])
def test_export_optimized_upstream_model_keeps_the_kernels(kind):
    ref, inputs = _upstream(kind)
    ref = randomize_(ref).eval()
    model, report = uvit_fast.optimize(copy.deepcopy(ref))
    assert not report.left_alone, str(report)
    ops = _export_case(model, inputs, set(range(len(inputs))))
    assert {"uvit_fast.patchify_embed.default", "uvit_fast.attention_qkvpacked_fwd.default"} <= ops, sorted(ops)
    with torch.no_grad():
        torch.testing.assert_close(model(*inputs), ref(*inputs), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- AOTInductor
_RUN_PACKAGE = textwrap.dedent("""
    import sys, torch
    {imports}
    package, data, tol = sys.argv[1], sys.argv[2], float(sys.argv[3])
    d = torch.load(data)
    run = torch._inductor.aoti_load_package(package)
    out = run(*d["inputs"])
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, d["expected"], rtol=tol, atol=tol)
    print("PACKAGE OK")
""")


def _fresh_process(package, inputs, expected, tmp_path, tol, imports=""):
    """Run ``package`` on ``inputs`` in a new Python process (importing only torch, and ``imports``)."""
    data = tmp_path / "data.pt"
    torch.save({"inputs": inputs, "expected": expected}, data)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if imports:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", _RUN_PACKAGE.format(imports=imports), str(package), str(data),
                           str(tol)], capture_output=True, text=True, env=env, timeout=300)


def _aoti_torch_path(model, inputs, tmp_path, tol=1e-9):
    with uvit_fast.use_backend("torch"):
        ep = torch.export.export(model, inputs)
    assert not [n for n in ep.graph.nodes if str(n.target).startswith("uvit_fast.")]
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "model.pt2"))
    with torch.no_grad():
        expected = _first(model(*inputs))
    proc = _fresh_process(package, inputs, expected, tmp_path, tol)
    assert proc.returncode == 0 and "PACKAGE OK" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
def test_aoti_package_of_the_pytorch_path_runs_in_a_fresh_process(tmp_path):
    """AOTInductor on CPU: export on the PyTorch path (aten ops only), compile and package, load the
    package in a fresh process that never imports uvit_fast, equal to eager in float64."""
    model = _fused("vit")
    model.blocks = model.blocks[:1]
    _aoti_torch_path(model, _inputs(model), tmp_path)


@pytest.mark.extended
@pytest.mark.parametrize("family", ["uvit", "uvit_t2i", "dit", "clip"])
def test_aoti_package_of_the_pytorch_path_every_family(family, tmp_path):
    """As above; the diffusion models compute the timestep sinusoid in float32 (as upstream), where
    Inductor's sin / cos round differently from ATen's (measured: 6e-6 on DiT), hence 1e-5 there."""
    model = _fused(family)
    _aoti_torch_path(model, _inputs(model), tmp_path, tol=1e-9 if family == "clip" else 1e-5)


@pytest.mark.extended
def test_aoti_package_with_the_kernels_needs_uvit_fast_where_it_runs(tmp_path):
    """A package exported with the kernels holds the ``uvit_fast::`` ops as calls back into Python (they
    are ``torch.library.custom_op``s, not ``triton_op``s): a process without uvit_fast gets torch's
    clear refusal; with ``import uvit_fast`` (and the interpreter on CPU) it runs the kernels."""
    model = _fused("dit", torch.float32)
    model.blocks = model.blocks[:1]
    inputs = _inputs(model, dtype=torch.float32)
    with uvit_fast.use_backend("triton"):
        ep = torch.export.export(model, inputs)
        package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "kernels.pt2"))
        with torch.no_grad():
            expected = model(*inputs)
    proc = _fresh_process(package, inputs, expected, tmp_path, 1e-4)
    assert proc.returncode != 0 and "Could not find schema for uvit_fast::" in proc.stderr, proc.stderr[-3000:]
    # `import uvit_fast` alone imports the ops lazily: uvit_fast.ops registers them
    proc = _fresh_process(package, inputs, expected, tmp_path, 1e-4, imports="import uvit_fast.ops")
    assert proc.returncode == 0 and "PACKAGE OK" in proc.stdout, proc.stderr[-3000:]
