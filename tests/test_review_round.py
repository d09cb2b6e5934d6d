"""Regression tests for bugs found by a review of measured dispatch (issue #15) and the fused linears
(issue #16), used as a U-ViT / DiT user would: autocast, torch.compile, tune(), the cache."""
import pytest
import torch
import torch._dynamo

from uvit_fast import dispatch, ops
from uvit_fast.dispatch import Dispatcher, TuneCache
from uvit_fast.ops import _runtime


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """Timing on (CPU under the interpreter), a fresh decision table, cache file and pin table."""
    monkeypatch.setenv(dispatch.ENV_TUNE, "1")
    disp = Dispatcher(TuneCache(tmp_path / "tune.json"))
    monkeypatch.setattr(dispatch, "_DISPATCHER", disp)
    monkeypatch.setattr(_runtime, "_PINNED", {})
    torch._dynamo.reset()
    yield disp
    torch._dynamo.reset()


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
