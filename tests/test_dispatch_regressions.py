"""Regression tests for bugs found by a review of measured dispatch (issue #15) and the fused linears
(issue #16), used as a U-ViT / DiT user would: autocast, torch.compile, tune(), the cache."""
import pytest
import torch
import torch._dynamo

from uvit_fast import dispatch, ops
from uvit_fast.dispatch import Dispatcher, TuneCache


def _torch_wins(monkeypatch):
    """Every candidate 'timed' without running it: the first (PyTorch) one is fastest."""
    def factory(device_type):
        times = iter(range(1, 100))
        return lambda fn: float(next(times))
    monkeypatch.setattr(dispatch, "default_timer", factory)


def _linear_call(x, w, b, s):
    return ops.fused_linear(x, w, b)


def _skip_call(x, w, b, s):
    return ops.skip_concat_linear(x, s, w, b)


@pytest.mark.parametrize("call, width", [(_linear_call, 1), (_skip_call, 2)], ids=["fused_linear", "skip_concat_linear"])
def test_compiled_inference_under_autocast_reuses_the_eager_decision(fresh, monkeypatch, call, width):
    """Inference keys are shared between eager calls (tune(training=False)) and a compiled graph: under
    autocast the compiled key used the dtypes after autocast's cast (bfloat16,bfloat16,...) where the
    eager key has the caller's (float32,...), so a compiled sampler timed again what tune() decided."""
    _torch_wins(monkeypatch)
    torch.manual_seed(0)
    x, s = torch.randn(1, 77, 72), torch.randn(1, 77, 72)
    w, b = torch.randn(80, 72 * width), torch.randn(80)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = call(x, w, b, s)
        keys = set(fresh.decisions())
        compiled = torch.compile(call, fullgraph=True, backend="aot_eager")(x, w, b, s)
    assert len(keys) == 1
    assert set(fresh.decisions()) == keys, f"compiled inference measured {set(fresh.decisions()) - keys}"
    torch.testing.assert_close(compiled, eager)


def test_a_cache_file_that_is_not_utf8_is_ignored_with_a_warning_and_rewritten(tmp_path):
    """A corrupt cache file is ignored with a warning (issue #15), binary garbage included: reading it
    raised UnicodeDecodeError (a ValueError, not an OSError) out of load() and store(), so every
    measured op call failed until the file was deleted by hand."""
    path = tmp_path / "tune.json"
    path.write_bytes(b"\xff\xfe{\x00garbage")
    cache = TuneCache(path)
    with pytest.warns(UserWarning, match="corrupt"):
        assert cache.load() == {}
    disp = Dispatcher(cache)
    key = dispatch.make_key("op", [torch.zeros(2)], training=False, rows=2)
    with pytest.warns(UserWarning, match="corrupt"):
        decision = disp.decide(key, {"torch": lambda: None, "triton": lambda: None}, lambda fn: 1.0)
    assert decision.choice == "torch"
    assert set(TuneCache(path).load()) == {str(key)}  # rewritten as a valid file


def test_measuring_inside_a_non_reentrant_checkpoint_trains(fresh, monkeypatch):
    """U-ViT's use_checkpoint (torch.utils.checkpoint, use_reentrant=False) with measured dispatch (the
    default on CUDA): the first step timed the candidates' forward and backward under the
    checkpoint's saved-tensor hooks, so the checkpoint counted the timing runs' saved tensors and
    backward raised CheckpointError (a different number of tensors saved in forward and recompute)."""
    import torch.utils.checkpoint as cp

    def timer_factory(device_type):
        return lambda fn: (fn(), 1.0)[1]  # each candidate runs once; a tie keeps PyTorch

    monkeypatch.setattr(dispatch, "default_timer", timer_factory)
    torch.manual_seed(0)
    x = torch.randn(1, 7, 8, requires_grad=True)
    w, b = torch.randn(12, 8, requires_grad=True), torch.randn(12, requires_grad=True)

    def block(x):
        return ops.fused_linear(x, w, b, activation="gelu")

    out = cp.checkpoint(block, x, use_reentrant=False)
    got = torch.autograd.grad(out.sum(), (x, w, b))
    assert len(fresh.decisions()) == 1  # measured inside the checkpointed forward
    expected = torch.autograd.grad(ops.fused_linear_reference(x, w, b, activation="gelu").sum(), (x, w, b))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.slow
def test_a_checkpointed_uvit_trains_while_measuring(fresh, monkeypatch):
    """The user-level form of the test above: create_model(..., use_checkpoint=True), a first training
    step with measured dispatch (every candidate run once, PyTorch kept): it trains, and every
    gradient equals the PyTorch path's."""
    import copy

    import uvit_fast
    from uvit_fast import create_model

    monkeypatch.setattr(dispatch, "default_timer", lambda device_type: (lambda fn: (fn(), 1.0)[1]))
    torch.manual_seed(0)
    model = create_model("cifar10_uvit_small", depth=1, embed_dim=72, num_heads=1, img_size=8, use_checkpoint=True)
    ref = copy.deepcopy(model)
    args = model.example_inputs(1)
    model(*args).square().mean().backward()
    assert fresh.decisions()  # the step measured
    with uvit_fast.use_backend("torch"):
        ref(*args).square().mean().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize("mlp", [False, True], ids=["fused_linear", "fused_mlp"])
def test_compiled_training_times_the_triton_backward_the_graph_runs(fresh, monkeypatch, mlp):
    """A gate that needs no gradient (DiT fine-tuned with a frozen adaLN, LoRA-style): the forward
    stores no pre-activation, and the compiled training key timed every candidate's backward for
    every floating input, the gate's included, so the Triton candidate always failed its timing
    ('the backward needs the pre-activation') and could never be chosen."""
    monkeypatch.setattr(dispatch, "default_timer", lambda device_type: (lambda fn: (fn(), 1.0)[1]))
    torch.manual_seed(0)
    x = torch.randn(1, 7, 8, requires_grad=True)
    w = torch.randn(12, 8, requires_grad=True)
    gate = torch.randn(1, 8 if mlp else 12)  # frozen conditioning

    def fn(x, w):
        if mlp:
            return ops.fused_mlp(x, w, None, w.t(), None, gate=gate, residual=x)
        return ops.fused_linear(x, w, None, gate=gate)

    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(x, w)
    got = torch.autograd.grad(out.sum(), (x, w))
    (decision,) = fresh.decisions().values()
    assert decision.errors == {} and decision.timings_ms["triton"] is not None
    ref = (ops.fused_mlp_reference(x, w, None, w.t(), None, gate=gate, residual=x) if mlp
           else ops.fused_linear_reference(x, w, None, gate=gate))
    for g, e in zip(got, torch.autograd.grad(ref.sum(), (x, w))):
        torch.testing.assert_close(g, e)
