"""Measured dispatch under torch.compile(fullgraph=True): the graph holds one run-time dispatch op per
fused op (uvit_fast.ops._runtime), and the decision is taken inside it each time the graph runs,
never while tracing; its backward runs the candidate the forward ran."""
import pytest
import torch
import torch._dynamo

from uvit_fast import dispatch, ops
from uvit_fast.dispatch import Dispatcher


def _winner_timer(monkeypatch, winner, log=None):
    """Time every candidate by running it once (so a failing one fails), then report ``winner`` fastest.
    Fails the test if called while tracing."""
    def factory(device_type):
        def timer(fn):
            assert not torch.compiler.is_compiling(), "timed while tracing"
            fn()
            name = factory.order.pop(0)
            if log is not None:
                log.append(name)
            return 1.0 if name == winner else 2.0
        return timer

    real_decide = Dispatcher.decide

    def decide(self, key, candidates, timer):
        factory.order = list(candidates)
        return real_decide(self, key, candidates, timer)

    monkeypatch.setattr(Dispatcher, "decide", decide)
    monkeypatch.setattr(dispatch, "default_timer", factory)


class _Graphs:
    """A torch.compile backend that records the dynamo graphs and then runs them through AOTAutograd
    (aot_eager), so forward and backward graphs are built as Inductor would get them."""

    def __init__(self):
        self.codes = []

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        self.codes.append(gm.code)
        return aot_eager(gm, example_inputs)


def _calls():
    """(name, compiled function, reference, inputs) at small, awkward interpreter shapes."""
    B, L, D = 1, 77, 72

    def r(*shape):
        return torch.randn(*shape, requires_grad=True)

    return {
        "skip_concat_linear": (
            lambda h, s, w, b: ops.skip_concat_linear(h, s, w, b), ops.skip_concat_linear_reference,
            lambda: (r(B, L, D), r(B, L, D), r(D, 2 * D), r(D))),
        "adaln_layer_norm": (
            lambda x, sh, sc, w, b: ops.adaln_layer_norm(x, sh, sc, w, b, 1e-6),
            lambda x, sh, sc, w, b: ops.adaln_layer_norm_reference(x, sh, sc, w, b, 1e-6),
            lambda: (r(B, L, D), r(B, D), r(B, D), r(D), r(D))),
        "residual_adaln_layer_norm": (
            lambda x, br, g, sh, sc: torch.cat(ops.residual_adaln_layer_norm(x, br, g, sh, sc), -1),
            lambda x, br, g, sh, sc: torch.cat(ops.residual_adaln_layer_norm_reference(x, br, g, sh, sc), -1),
            lambda: (r(B, L, D), r(B, L, D), r(B, D), r(B, D), r(B, D))),
        "attention": (
            lambda q, k, v: ops.attention(q, k, v, causal=True),
            lambda q, k, v: ops.attention_reference(q, k, v, causal=True),
            lambda: (r(B, L, 2, D), r(B, L, 2, D), r(B, L, 2, D))),
        "attention_qkvpacked": (
            lambda qkv: ops.attention_qkvpacked(qkv), lambda qkv: ops.attention_reference(*qkv.unbind(2)),
            lambda: (r(B, L, 3, 2, D),)),
        "patchify_embed": (
            lambda x, w, b, pre, pos: ops.patchify_embed(x, w, b, prefix=pre, pos_embed=pos),
            lambda x, w, b, pre, pos: ops.patchify_embed_reference(x, w, b, prefix=pre, pos_embed=pos),
            lambda: (r(B, 3, 8, 12), r(D, 3, 4, 4), r(D), r(B, 1, D), r(1, 7, D))),
        "fused_linear": (
            lambda x, w, b, res, g: ops.fused_linear(x, w, b, activation="gelu", residual=res, gate=g),
            lambda x, w, b, res, g: ops.fused_linear_reference(x, w, b, activation="gelu", residual=res, gate=g),
            lambda: (r(2, 33, D), r(40, D), r(40), r(2, 33, 40), r(2, 40))),
        "fused_mlp": (
            lambda x, w1, b1, w2, b2, res, g: ops.fused_mlp(x, w1, b1, w2, b2, activation="gelu_tanh", residual=res, gate=g),
            lambda x, w1, b1, w2, b2, res, g: ops.fused_mlp_reference(
                x, w1, b1, w2, b2, activation="gelu_tanh", residual=res, gate=g),
            lambda: (r(2, 33, D), r(96, D), r(96), r(D, 96), r(D), r(2, 33, D), r(2, D))),
        "decoder_unpatchify": (
            lambda t, w, b: ops.decoder_unpatchify(t, w, b, patch_size=4, grid=(2, 3), extras=1),
            lambda t, w, b: ops.decoder_unpatchify_reference(t, w, b, patch_size=4, grid=(2, 3), extras=1),
            lambda: (r(B, 7, D), r(48, D), r(48))),
    }


_FAST = {("skip_concat_linear", "torch"), ("adaln_layer_norm", "triton")}
_CASES = [
    pytest.param(name, winner, id=f"{name}-{winner}", marks=() if (name, winner) in _FAST else pytest.mark.slow)
    for name in _calls() for winner in ("torch", "triton")
]


@pytest.mark.parametrize("name, winner", _CASES)
def test_compiled_op_decides_at_run_time_and_its_backward_matches(fresh, monkeypatch, name, winner):
    fn, ref, make = _calls()[name]
    torch.manual_seed(0)
    args = make()
    graphs = _Graphs()
    best = ("sdpa" if name.startswith("attention") else "torch") if winner == "torch" else "triton"
    _winner_timer(monkeypatch, best)
    out = torch.compile(fn, fullgraph=True, backend=graphs)(*args)
    (code,) = graphs.codes
    assert f"uvit_fast.{name}_dispatch" in code  # the graph holds the dispatch op, not a path
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, args, grad)
    expected_out = ref(*args)
    expected = torch.autograd.grad(expected_out, args, grad)
    torch.testing.assert_close(out, expected_out, rtol=1e-4, atol=1e-4)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)
    (key, decision), = fresh.decisions().items()  # measured when the graph ran, under its own key
    assert key.startswith(f"{name}[") and ",compiled]|train|" in key
    assert decision.choice == best and decision.source == "measured"
    assert set(decision.timings_ms) >= {"triton", best}


class _CountKernel:
    """Counts the Triton launches of skip_concat_linear's forward."""

    def __init__(self, monkeypatch):
        from uvit_fast.ops import skip_linear

        self.calls = 0
        real = skip_linear._kernel

        def kernel():
            module = real()
            counter = self

            class Wrapped:
                def __getattr__(self, attr):
                    value = getattr(module, attr)
                    if attr == "skip_concat_linear_forward":
                        def counted(*a, **k):
                            counter.calls += 1
                            return value(*a, **k)
                        return counted
                    return value
            return Wrapped()

        monkeypatch.setattr(skip_linear, "_kernel", kernel)


def test_the_same_graph_follows_a_new_decision_without_recompiling(fresh, monkeypatch):
    torch.manual_seed(0)
    h, s, w, b = (t.detach() for t in _calls()["skip_concat_linear"][2]())
    graphs = _Graphs()
    compiled = torch.compile(lambda *a: ops.skip_concat_linear(*a), fullgraph=True, backend=graphs)
    kernel = _CountKernel(monkeypatch)
    _winner_timer(monkeypatch, "torch")
    with torch.no_grad():
        first = compiled(h, s, w, b)
    timed = kernel.calls  # the Triton candidate ran while timing
    with torch.no_grad():
        compiled(h, s, w, b)
    assert kernel.calls == timed  # the stored decision: PyTorch, nothing timed again
    # a new decision (another process's cache, tune(), ...) reaches the same compiled graph
    fresh.clear()
    fresh.cache.path.unlink()
    _winner_timer(monkeypatch, "triton")
    with torch.no_grad():
        second = compiled(h, s, w, b)
    assert kernel.calls > timed + 1  # timed again, then the kernel ran
    assert len(graphs.codes) == 1  # one trace for all of it
    torch.testing.assert_close(second, first, rtol=1e-4, atol=1e-4)
    (decision,) = fresh.decisions().values()
    assert decision.choice == "triton"


def test_a_backward_runs_the_candidate_its_forward_ran(fresh, monkeypatch):
    """The training decision is pinned: a decision table changed between forward and backward
    (a tune() broadcast, clear()) does not mix a PyTorch forward with a Triton backward."""
    torch.manual_seed(0)
    args = _calls()["adaln_layer_norm"][2]()
    fn, ref = _calls()["adaln_layer_norm"][:2]
    _winner_timer(monkeypatch, "torch")
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    (key,) = fresh.decisions()
    fresh.install({key: dispatch.Decision(key, "triton", {"torch": 2.0, "triton": 1.0})})
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, args, grad)
    expected = torch.autograd.grad(ref(*args), args, grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)  # PyTorch's own backward, bit for bit


def test_a_failing_candidate_under_compile_is_recorded_and_the_other_kept(fresh, monkeypatch):
    from uvit_fast.ops import skip_linear

    def broken():
        raise RuntimeError("out of resources: shared memory, required: 300000")

    monkeypatch.setattr(skip_linear, "_kernel", broken)
    _winner_timer(monkeypatch, "triton")
    monkeypatch.setattr(dispatch, "default_timer", lambda device_type: lambda fn: (fn(), 1.0)[1])
    h, s, w, b = (t.detach() for t in _calls()["skip_concat_linear"][2]())
    with torch.no_grad():
        out = torch.compile(lambda *a: ops.skip_concat_linear(*a), fullgraph=True, backend="aot_eager")(h, s, w, b)
    torch.testing.assert_close(out, ops.skip_concat_linear_reference(h, s, w, b))
    (decision,) = fresh.decisions().values()
    assert decision.choice == "torch" and decision.timings_ms["triton"] is None
    assert "out of resources" in decision.errors["triton"]


@pytest.mark.slow
def test_dynamic_shapes_take_one_decision_per_row_bucket_in_one_graph(fresh, monkeypatch):
    w = torch.randn(72)
    graphs = _Graphs()
    compiled = torch.compile(lambda x, w: ops.adaln_layer_norm(x, weight=w), fullgraph=True, backend=graphs,
                             dynamic=True)
    _winner_timer(monkeypatch, "torch")
    # floats stay constants (eps), so that the only symbols are the sizes
    with torch.no_grad(), torch._dynamo.config.patch(specialize_float=True):
        for L in (77, 100, 300):  # buckets 128, 128, 512
            x = torch.randn(1, L, 72)
            torch.testing.assert_close(compiled(x, w), ops.adaln_layer_norm_reference(x, weight=w))
    (code,) = graphs.codes
    assert "torch.SymInt" in code
    assert sorted(k.split("|")[2] for k in fresh.decisions()) == ["128x72", "512x72"]


def test_inference_keys_are_shared_with_eager_calls(fresh, monkeypatch):
    """An eager call (or tune()) decides an inference key; the compiled graph takes it, untimed."""
    x, w = torch.randn(1, 77, 72), torch.randn(72)
    _winner_timer(monkeypatch, "triton")
    ops.adaln_layer_norm(x, weight=w)
    monkeypatch.setattr(dispatch, "default_timer", lambda device_type: pytest.fail("timed again"))
    with torch.no_grad():
        out = torch.compile(lambda x, w: ops.adaln_layer_norm(x, weight=w), fullgraph=True, backend="aot_eager")(x, w)
    torch.testing.assert_close(out, ops.adaln_layer_norm_reference(x, weight=w), rtol=1e-4, atol=1e-4)
    assert len(fresh.decisions()) == 1


def test_compile_without_measuring_traces_the_plain_choice(monkeypatch):
    """UVIT_FAST_TUNE=0: no dispatch op; auto is the untimed default (PyTorch on CPU)."""
    monkeypatch.setenv(dispatch.ENV_TUNE, "0")
    graphs = _Graphs()
    torch._dynamo.reset()
    x, w = torch.randn(1, 77, 72), torch.randn(72)
    torch.compile(lambda x, w: ops.adaln_layer_norm(x, weight=w), fullgraph=True, backend=graphs)(x, w)
    assert "uvit_fast" not in graphs.codes[0] and "layer_norm" in graphs.codes[0]
    torch._dynamo.reset()


def test_dispatch_ops_pass_opcheck(fresh, monkeypatch):
    """torch.library.opcheck on a dispatch op and its backward op (schema, fake, autograd registration)."""
    _winner_timer(monkeypatch, "torch")
    h, s, w, b = _calls()["skip_concat_linear"][2]()
    key = ("skip_concat_linear[bias=1]", False, 77, [72, 72])
    torch.library.opcheck(torch.ops.uvit_fast.skip_concat_linear_dispatch, (h.detach(), s.detach(), w.detach(), b.detach(), *key),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.slow
def test_a_compiled_model_trains_with_run_time_decisions(fresh):
    """A whole fused DiT under torch.compile(fullgraph=True) with real timings (the interpreter loses
    every op): each op decides when the graph first runs, and the forward and every gradient equal
    the eager model's on the PyTorch path."""
    import uvit_fast
    from uvit_fast import create_model

    torch.manual_seed(0)
    model = create_model("DiT-S/8", input_size=16, depth=1, hidden_size=64, num_heads=2).eval()
    x, t, y = model.example_inputs(2)
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x, t, y)
    out.square().mean().backward()
    got = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    with uvit_fast.use_backend("torch"):
        expected = model(x, t, y)
    expected.square().mean().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert {n for n, g in got.items() if g is None} == {n for n, p in model.named_parameters() if p.grad is None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    decisions = fresh.decisions()
    assert {"adaln_layer_norm", "attention_qkvpacked", "patchify_embed", "decoder_unpatchify"} <= {
        k.split("[")[0] for k in decisions}
    for key, d in decisions.items():
        assert ",compiled]|train|" in key and d.choice in ("torch", "sdpa"), (key, d)
        assert d.timings_ms["triton"] > d.timings_ms[d.choice]
