"""Every fused model family traces into one graph: ``torch._dynamo.explain`` finds no graph break,
with the Triton kernels forced (``use_backend("triton")``, under the interpreter here) and with
measured dispatch on (``auto`` + ``UVIT_FAST_TUNE=1``: the run-time dispatch ops are traced).
One graph per forward is what ``torch.compile(mode="reduce-overhead")`` needs to capture the
forward as one CUDA graph (docs/cuda_graphs.md)."""
import pytest
import torch
import torch._dynamo

import uvit_fast
from uvit_fast import create_model
from uvit_fast.testing import randomize_


def _clip():
    return create_model("clip_vit_b32", embed_dim=16, img_size=16, patch_size=8, vision_layers=1, vision_width=32, vision_heads=1,
                        context_length=6, vocab_size=50, transformer_width=32, transformer_heads=1, transformer_layers=1)


# family -> (model builder, which part of example_inputs(2) it takes, the method traced)
FAMILIES = {
    "uvit": (lambda: create_model("cifar10_uvit_small", img_size=8, patch_size=4, depth=2, embed_dim=32, num_heads=1), None, None),
    "uvit_t2i": (lambda: create_model("mscoco_uvit_small", img_size=8, patch_size=4, depth=2, embed_dim=32, num_heads=1, clip_dim=16,
                                      num_clip_token=5), None, None),
    "dit": (lambda: create_model("DiT-S/8", input_size=16, depth=1, hidden_size=32, num_heads=1), None, None),
    "vit": (lambda: create_model("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, embed_dim=32, num_heads=1,
                                 num_classes=10), None, None),
    "clip_image": (_clip, slice(0, 1), "encode_image"),
    "clip_text": (_clip, slice(1, 2), "encode_text"),
}


def _case(family):
    build, part, method = FAMILIES[family]
    torch.manual_seed(0)
    model = randomize_(build()).eval()  # DiT's zero-initialised layers would make its output zero
    inputs = model.example_inputs(2)
    if part is not None:
        inputs = inputs[part]
    return (getattr(model, method) if method else model), inputs


def _explain(fn, inputs):
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(fn)(*inputs)
    torch._dynamo.reset()
    return explanation


def _custom_ops(explanation):
    """The uvit_fast ops each traced graph calls, by name."""
    return {str(node.target).split(".")[1] for gm in explanation.graphs for node in gm.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("uvit_fast.")}


def _check(explanation):
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("family", [  # the quick subset keeps DiT
    f if f == "dit" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES])
def test_no_graph_break_on_the_triton_kernels(family):
    fn, inputs = _case(family)
    with uvit_fast.use_backend("triton"):
        explanation = _explain(fn, inputs)
    _check(explanation)
    ops = _custom_ops(explanation)
    # the kernels' own ops are in the graph, not the run-time dispatch ops
    assert {"attention_qkvpacked_fwd", "fused_mlp_fc1", "fused_mlp_fc2", "fused_linear"} <= ops, ops
    assert not any(op.endswith("_dispatch") for op in ops), ops


@pytest.fixture
def measuring(fresh):
    """Measured dispatch on: the ``fresh`` fixture (UVIT_FAST_TUNE=1, a fresh decision table, the op
    plans refreshed on the way in and out)."""
    return fresh


@pytest.mark.parametrize("family", [
    "dit", *(pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES if f != "dit")])
def test_no_graph_break_with_measured_dispatch(family, measuring):
    fn, inputs = _case(family)
    explanation = _explain(fn, inputs)
    _check(explanation)
    ops = _custom_ops(explanation)
    assert any(op.endswith("_dispatch") for op in ops), ops  # the run-time dispatch ops, traced
    assert measuring.decisions(), "the traced graph ran no dispatch op"


@pytest.mark.slow
def test_reduce_overhead_compiles_without_a_break_and_equals_eager():
    """On CPU ``mode="reduce-overhead"`` has no CUDA graphs to take, but it must compile the fused
    model as one graph (``fullgraph=True`` raises on a break) and compute what eager computes."""
    torch._dynamo.reset()
    fn, inputs = _case("dit")
    with uvit_fast.use_backend("triton"), torch.no_grad():
        expected = fn(*inputs)
        compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
        out = compiled(*inputs)
        again = compiled(*[torch.randn_like(a) if a.is_floating_point() else a for a in inputs])
    torch._dynamo.reset()
    # inductor fuses the PyTorch code between the kernels: fp32 rounding differs slightly
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert again.shape == out.shape and not torch.equal(again, out)

