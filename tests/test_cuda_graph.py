"""``uvit_fast.cuda_graph`` and ``ddim_sample(cuda_graph=True)``.

Without a GPU the capture state machine runs on CPU tensors through a simulated backend: its
"capture" runs the function once (as a real capture does not compute, it then fills the outputs
with NaN) and keeps it; its "replay" runs it again on the static input buffers and writes the
results into the static outputs. The real-CUDA tests at the end run when a GPU runs the suite."""
import contextlib
import importlib
import types
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

import uvit_fast
from uvit_fast import create_model, dispatch
from uvit_fast.cuda_graphs import CudaGraphRunner, cuda_graph
from uvit_fast.ops import _hot, adaln
from uvit_fast.sampling import ddim_sample, null_label
from uvit_fast.testing import randomize_
fl_mod = importlib.import_module("uvit_fast.ops.fused_linear")

CUDA = torch.cuda.is_available()


class SimBackend:
    """The runner's CUDA calls, simulated on CPU tensors; ``events`` records them in order."""

    device_type = "cpu"

    def __init__(self):
        self.events = []
        self.capturing = False
        self.on_side_stream = False
        self.pools = []

    def pool(self):
        self.pools.append(object())
        self.events.append("pool")
        return self.pools[-1]

    def new_graph(self):
        self.events.append("new_graph")
        return types.SimpleNamespace(fn=None, outputs=None, pool=None)

    @contextlib.contextmanager
    def side_stream(self, device):
        self.events.append("side_stream")
        self.on_side_stream = True
        try:
            yield
        finally:
            self.on_side_stream = False

    def capture(self, graph, fn, pool):
        self.events.append("capture")
        self.capturing = True
        try:
            out = fn()
        finally:
            self.capturing = False
        graph.fn, graph.outputs, graph.pool = fn, out, pool
        for t in tree_flatten(out)[0]:  # a real capture computes nothing: only a replay fills them
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.fill_(float("nan"))
        return out

    def replay(self, graph):
        self.events.append("replay")
        for static, new in zip(tree_flatten(graph.outputs)[0], tree_flatten(graph.fn())[0]):
            if isinstance(static, torch.Tensor):
                static.copy_(new)


class Counting(nn.Module):
    """A linear layer that counts its calls and notes where each ran (side stream, capture)."""

    def __init__(self, backend=None):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.backend = backend
        self.calls = []

    def forward(self, x, scale=1.0):
        b = self.backend
        self.calls.append("capture" if b and b.capturing else "side" if b and b.on_side_stream else "plain")
        return self.lin(x) * scale


def _graphs(runner):
    return list(runner.graphs.values())


# ------------------------------------------------------------------------------------------------
# the state machine


def test_warmup_on_the_side_stream_then_one_capture():
    sim = SimBackend()
    model = Counting(sim)
    x = torch.randn(2, 4)
    runner = cuda_graph(model, x, warmup=3, backend=sim)
    assert isinstance(runner, CudaGraphRunner)
    assert model.calls == ["side", "side", "side", "capture"]
    assert sim.events == ["side_stream", "pool", "new_graph", "capture"]
    assert len(runner.graphs) == 1


def test_warmup_zero_captures_at_once():
    sim = SimBackend()
    model = Counting(sim)
    cuda_graph(model, torch.randn(2, 4), warmup=0, backend=sim)
    assert model.calls == ["capture"]


def test_replay_copies_inputs_into_static_buffers_and_returns_static_outputs():
    sim = SimBackend()
    model = Counting(sim)
    runner = cuda_graph(model, torch.randn(2, 4), backend=sim)
    (entry,) = _graphs(runner)
    x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
    out1 = runner(x1)
    assert out1 is entry.outputs  # the graph's own buffer
    assert torch.equal(entry.static_inputs[0], x1) and entry.static_inputs[0] is not x1
    with torch.no_grad():
        expected1, expected2 = model(x1), model(x2)
    assert torch.equal(out1, expected1)
    kept = out1.clone()
    out2 = runner(x2)
    assert out2 is out1 and torch.equal(out2, expected2)  # the next replay overwrote it
    assert not torch.equal(out1, kept)
    assert sim.events.count("capture") == 1 and sim.events.count("replay") == 2


def test_clone_outputs_returns_copies():
    sim = SimBackend()
    runner = cuda_graph(Counting(sim), torch.randn(2, 4), backend=sim, clone_outputs=True)
    a = runner(torch.randn(2, 4))
    a_values = a.clone()
    b = runner(torch.randn(2, 4))
    assert a is not b and torch.equal(a, a_values) and not torch.equal(a, b)


def test_outputs_have_no_autograd_history():
    sim = SimBackend()
    out = cuda_graph(Counting(sim), torch.randn(2, 4), backend=sim)(torch.randn(2, 4, requires_grad=True))
    assert not out.requires_grad and out.grad_fn is None


def test_new_shape_dtype_or_constant_is_a_new_capture_with_the_shared_pool():
    sim = SimBackend()
    model = Counting(sim).double()
    runner = cuda_graph(model, torch.randn(2, 4, dtype=torch.float64), 2.0, backend=sim, warmup=1)
    cases = [(torch.randn(5, 4, dtype=torch.float64), 2.0),  # shape
             (torch.randn(2, 4, dtype=torch.float64), 3.0)]  # a non-tensor constant
    for x, scale in cases:
        with torch.no_grad():
            assert torch.equal(runner(x, scale), model(x, scale))
    assert len(runner.graphs) == 3 and sim.events.count("capture") == 3
    # the same signatures again: replays only
    runner(torch.randn(5, 4, dtype=torch.float64), 2.0)
    runner(torch.randn(2, 4, dtype=torch.float64), 2.0)
    assert sim.events.count("capture") == 3
    # one pool for every graph of the runner
    assert len(sim.pools) == 1 and {g.graph.pool for g in _graphs(runner)} == {sim.pools[0]}
    # another dtype is another signature (the model's check then fails in the warm-up: Linear is float64)
    with pytest.raises(RuntimeError, match="dtype"):
        runner(torch.randn(2, 4), 2.0)


def test_keyword_arguments_are_part_of_the_signature():
    sim = SimBackend()
    model = Counting(sim)
    x = torch.randn(2, 4)
    runner = cuda_graph(model, x, scale=2.0, backend=sim)
    with torch.no_grad():
        assert torch.equal(runner(x, scale=2.0), model(x, scale=2.0))
        assert torch.equal(runner(x, scale=4.0), model(x, scale=4.0))
    assert len(runner.graphs) == 2


def test_autocast_state_is_part_of_the_signature():
    sim = SimBackend()
    model = Counting(sim)
    x = torch.randn(2, 4)
    runner = cuda_graph(model, x, backend=sim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = runner(x)
    assert out.dtype == torch.bfloat16 and len(runner.graphs) == 2
    assert runner(x).dtype == torch.float32


def test_max_graphs_then_eager_with_one_warning():
    sim = SimBackend()
    model = Counting(sim)
    runner = cuda_graph(model, torch.randn(2, 4), backend=sim, max_graphs=1)
    x3 = torch.randn(3, 4)
    with pytest.warns(UserWarning, match=r"1 graphs captured \(max_graphs=1\); calls with another signature run eagerly"):
        out = runner(x3)
    with torch.no_grad():
        assert torch.equal(out, model(x3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        runner(torch.randn(4, 4))
    assert runner.eager_calls == 2 and len(runner.graphs) == 1 and sim.events.count("capture") == 1


def test_nested_outputs_match_eager():
    class Tree(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x, y):
            h = self.a(x)
            return {"h": h, "pair": (self.b(h) + y, h.sum(-1)), "list": [x * 2]}

    sim = SimBackend()
    model = Tree()
    x, y = torch.randn(3, 4), torch.randn(3, 2)
    runner = cuda_graph(model, x, y, backend=sim)
    x2, y2 = torch.randn(3, 4), torch.randn(3, 2)
    out = runner(x2, y2)
    with torch.no_grad():
        ref = model(x2, y2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_a_plain_function_works():
    sim = SimBackend()
    runner = cuda_graph(lambda a, b: a @ b + 1, torch.randn(2, 3), torch.randn(3, 2), backend=sim)
    a, b = torch.randn(2, 3), torch.randn(3, 2)
    assert torch.equal(runner(a, b), a @ b + 1)


# ------------------------------------------------------------------------------------------------
# measured dispatch: every key decided in the warm-up, none while capturing


@pytest.fixture
def tuned(fresh):
    """Measured dispatch on: the ``fresh`` fixture (UVIT_FAST_TUNE=1, a fresh decision table, the op
    plans refreshed on the way in and out)."""
    return fresh


def _tiny_dit():
    torch.manual_seed(0)
    return randomize_(create_model("DiT-S/8", input_size=16, depth=1, hidden_size=32, num_heads=1)).eval()


@pytest.mark.parametrize("warmup", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_dispatch_keys_are_decided_before_capture(tuned, monkeypatch, warmup):
    sim = SimBackend()
    timed_while = []
    choose = dispatch.choose

    def watching_choose(key, candidates, timer):
        timed_while.append("capture" if sim.capturing else "side" if sim.on_side_stream else "plain")
        return choose(key, candidates, timer)

    monkeypatch.setattr(dispatch, "choose", watching_choose)
    model = _tiny_dit()
    x, t, y = model.example_inputs(2)
    runner = cuda_graph(model, x, t, y, warmup=warmup, backend=sim)
    decided = dict(tuned.decisions())
    assert timed_while and decided, "measured dispatch did not run"
    if warmup:
        assert set(timed_while) == {"side"}  # every key timed in the warm-up, none while capturing
    else:
        # no warm-up: the first calls of each key time inside the capture (what dispatch's
        # rule for capturing streams must then cover on a GPU)
        assert set(timed_while) == {"capture"}
    n = len(timed_while)
    x2 = torch.randn_like(x)
    out = runner(x2, t, y)
    assert len(timed_while) == n and tuned.decisions().keys() == decided.keys()  # replays time nothing
    with torch.no_grad():
        torch.testing.assert_close(out, model(x2, t, y), rtol=0, atol=0)


def test_without_warmup_the_capture_rule_times_nothing_while_capturing(tuned, monkeypatch):
    """``warmup=0`` with dispatch's rule for capturing streams (``dispatch.stream_capturing``, here
    told when the simulated capture runs): the captured forward runs PyTorch, undecided."""
    sim = SimBackend()
    timed_while = []
    choose = dispatch.choose

    def watching_choose(key, candidates, timer):
        timed_while.append("capture" if sim.capturing else "plain")
        return choose(key, candidates, timer)

    monkeypatch.setattr(dispatch, "choose", watching_choose)
    monkeypatch.setattr(dispatch, "stream_capturing", lambda: sim.capturing)
    monkeypatch.setattr(_hot, "stream_capturing", lambda: sim.capturing)  # (imported by name there)
    model = _tiny_dit()
    x, t, y = model.example_inputs(2)
    cuda_graph(model, x, t, y, warmup=0, backend=sim)
    assert sim.events.count("capture") == 1
    assert timed_while == [] and tuned.decisions() == {}
    # and no plan was stored while capturing: the next (plain) call of each op makes its own
    assert not any(len(p) for p in (adaln._ADALN_PLANS, adaln._RESIDUAL_PLANS, fl_mod._LINEAR_PLANS, fl_mod._MLP_PLANS))
    # (a real replay runs no Python; the simulated one would decide the keys, so none is made here)


# ------------------------------------------------------------------------------------------------
# arguments and CPU tensors


def test_cpu_tensors_raise_by_default():
    model = Counting()
    with pytest.raises(ValueError, match=r"cuda_graph: CUDA graphs need CUDA tensors; got example input 0 on cpu; "
                                         r"call the model directly on CPU"):
        cuda_graph(model, torch.randn(2, 4))
    assert model.calls == []


def test_cpu_tensors_run_eagerly_with_on_cpu_eager():
    model = Counting()
    with pytest.warns(UserWarning, match=r"example input 0 is on cpu; no CUDA graph, the model runs eagerly"):
        runner = cuda_graph(model, torch.randn(2, 4), on_cpu="eager")
    assert model.calls == [] and not runner.graphs
    x = torch.randn(2, 4)
    out = runner(x)
    assert torch.equal(out, model.lin(x).detach()) and runner.eager_calls == 1 and not out.requires_grad
    with pytest.raises(ValueError, match=r"this runner's graphs are on cpu; got argument 0 \(tensor \(2, 4\) float32 on meta\)"):
        runner(x.to("meta"))  # an eager runner belongs to its device too


@pytest.mark.parametrize("call, exc, match", [
    (lambda: cuda_graph(Counting()), ValueError, r"example_inputs are required"),
    (lambda: cuda_graph(3, torch.randn(1)), TypeError, r"model must be an nn.Module or a callable; got int"),
    (lambda: cuda_graph(Counting(), torch.randn(1), warmup=-1), ValueError, r"warmup must be an int >= 0; got -1"),
    (lambda: cuda_graph(Counting(), torch.randn(1), warmup=1.5), ValueError, r"warmup must be an int >= 0; got 1.5"),
    (lambda: cuda_graph(Counting(), torch.randn(1), max_graphs=0), ValueError, r"max_graphs must be an int >= 1; got 0"),
    (lambda: cuda_graph(Counting(), torch.randn(1), on_cpu="skip"), ValueError, r"on_cpu must be 'raise' or 'eager'; got 'skip'"),
    (lambda: cuda_graph(Counting(), 2.0, 3), ValueError, r"example_inputs hold no tensor"),
    (lambda: cuda_graph(Counting(), (torch.randn(1),)), TypeError,
     r"example input 0 is a tuple; pass the tensors as top-level arguments"),
    (lambda: cuda_graph(Counting(), torch.randn(1), clone_outputs="no"), TypeError,
     r"clone_outputs must be True or False; got 'no'"),
])
def test_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bad_call_arguments():
    sim = SimBackend()
    runner = cuda_graph(lambda x, c=None: x + 1, torch.randn(2), backend=sim)
    with pytest.raises(TypeError, match=r"argument 1 \(list \[1, 2\]\) is not hashable"):
        runner(torch.randn(2), [1, 2])
    with pytest.raises(TypeError, match=r"argument 'c' is a tuple holding tensors; pass tensors as top-level"):
        runner(torch.randn(2), c=(torch.randn(2),))
    with pytest.raises(ValueError, match=r"this runner's graphs are on cpu; got argument 0 \(tensor \(2,\) float32 on "
                                         r"meta\); call the model directly, or make one runner per device"):
        runner(torch.randn(2, device="meta"))


def test_a_host_sync_during_capture_is_explained():
    class Syncing(SimBackend):
        def capture(self, graph, fn, pool):
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    with pytest.raises(RuntimeError, match=r"cuda_graph: capturing the model failed .*A host sync inside the "
                                           r"forward \(\.item\(\), int\(tensor\)"):
        cuda_graph(Counting(), torch.randn(2, 4), backend=Syncing())


# ------------------------------------------------------------------------------------------------
# ddim_sample(cuda_graph=True)


def _sample(model, noise, sim, **kw):
    eager = ddim_sample(model, noise, **kw)
    graphed = ddim_sample(model, noise, cuda_graph={"backend": sim, "warmup": 1}, **kw)
    return eager, graphed


def test_ddim_graph_path_equals_eager_with_guidance_bit_for_bit():
    torch.manual_seed(0)
    # random weights: DiT's zero-initialised gates and final layer would make eps zero
    model = randomize_(create_model("DiT-S/8", input_size=16, depth=2, hidden_size=64, num_heads=2)).eval()
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    noise = torch.randn(2, 4, 16, 16)
    y = torch.tensor([3, 7])
    sim = SimBackend()
    eager, graphed = _sample(model, noise, sim, steps=4, cond=y, null_cond=torch.full_like(y, null_label(model)),
                             cfg_scale=4.0)
    hook.remove()
    assert torch.equal(eager, graphed)
    assert not torch.equal(eager, ddim_sample(lambda x, t: torch.zeros_like(x), noise, steps=4))  # eps != 0
    # one capture of the guided call (batch 2B: cat inside the graph), then one replay per step
    assert sim.events.count("capture") == 1 and sim.events.count("replay") == 4
    assert calls == [4] * 4 + [4] * (1 + 1 + 4)  # eager 4 steps; warm-up, capture, 4 replays


def test_ddim_graph_path_unconditional_and_the_timestep_is_an_input():
    torch.manual_seed(0)
    model = randomize_(create_model("cifar10_uvit_small", img_size=8, depth=2, embed_dim=32, num_heads=1)).eval()
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[1][0].item()))
    noise = torch.randn(1, 3, 8, 8)
    sim = SimBackend()
    eager, graphed = _sample(model, noise, sim, steps=3)
    hook.remove()
    assert torch.equal(eager, graphed) and len(sim.events) and sim.events.count("capture") == 1
    # the replays ran with each step's timestep, copied into the graph's static buffer
    assert seen[-3:] == seen[:3] == [999.0, 500.0, 0.0]


def test_ddim_graph_path_with_an_oracle_in_float64():
    x0 = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)

    def oracle(x, t, cond):
        a = abar[t.long()].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0.repeat(x.shape[0] // 2, 1, 1, 1) * cond.view(-1, 1, 1, 1)) / (1 - a).sqrt()

    cond, null = torch.full((2,), 2.0, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    eager, graphed = _sample(oracle, torch.randn_like(x0), SimBackend(), steps=5, cond=cond, null_cond=null,
                             cfg_scale=3.0)
    assert torch.equal(eager, graphed)
    torch.testing.assert_close(graphed, 4 * x0, rtol=1e-6, atol=1e-6)


def test_ddim_cuda_graph_on_cpu_raises_and_bad_option_type():
    model = Counting()
    with pytest.raises(ValueError, match=r"CUDA graphs need CUDA tensors; got example input 0 on cpu"):
        ddim_sample(lambda x, t: x, torch.randn(1, 2, 2, 2), steps=2, cuda_graph=True)
    with pytest.raises(TypeError, match=r"cuda_graph must be a bool or a mapping of cuda_graph options; got str"):
        ddim_sample(model, torch.randn(1, 2, 2, 2), steps=2, cuda_graph="yes")


# ------------------------------------------------------------------------------------------------
# real CUDA graphs (for the day a GPU runs the suite)


@pytest.mark.skipif(not CUDA, reason="captures real CUDA graphs: needs a CUDA GPU")
def test_real_cuda_graph_replays_equal_eager_on_a_fused_model():
    torch.manual_seed(0)
    model = randomize_(create_model("cifar10_uvit_small", img_size=16, depth=2, embed_dim=64, num_heads=2)).cuda().eval()
    x, t = model.example_inputs(2, device="cuda")
    runner = uvit_fast.cuda_graph(model, x, t)
    for _ in range(2):
        x2, t2 = torch.randn_like(x), torch.randint(0, 1000, t.shape, device="cuda").float()
        out = runner(x2, t2)
        with torch.no_grad():
            torch.testing.assert_close(out, model(x2, t2), rtol=1e-5, atol=1e-5)
    out4 = runner(torch.randn(4, *x.shape[1:], device="cuda"), torch.ones(4, device="cuda"))
    assert out4.shape[0] == 4 and len(runner.graphs) == 2


@pytest.mark.skipif(not CUDA, reason="captures real CUDA graphs: needs a CUDA GPU")
def test_real_cuda_graph_ddim_with_guidance_equals_eager():
    torch.manual_seed(0)
    model = randomize_(create_model("DiT-S/8", input_size=16, depth=2, hidden_size=64, num_heads=2)).cuda().eval()
    noise = torch.randn(2, 4, 16, 16, device="cuda")
    y = torch.tensor([3, 7], device="cuda")
    kw = dict(steps=5, cond=y, null_cond=torch.full_like(y, null_label(model)), cfg_scale=4.0)
    torch.testing.assert_close(ddim_sample(model, noise, cuda_graph=True, **kw), ddim_sample(model, noise, **kw),
                               rtol=1e-5, atol=1e-5)


def test_ddim_sample_names_an_unknown_cuda_graph_option():
    from uvit_fast.sampling import ddim_sample

    with pytest.raises(ValueError, match=r"ddim_sample: unknown cuda_graph option\(s\) 'warmpu'; choose from backend, "):
        ddim_sample(lambda x, t: x, torch.randn(1, 2, 4, 4), steps=2, cuda_graph={"warmpu": 1})
