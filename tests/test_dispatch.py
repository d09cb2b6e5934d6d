"""The measured-dispatch core (uvit_fast.dispatch): decisions with injected timings, key bucketing,
the cache file (round trip, versions, corruption, concurrent writers) and the report."""
import json
from pathlib import Path
import subprocess
import sys
import textwrap

import pytest
import torch

from uvit_fast import dispatch
from uvit_fast.dispatch import Decision, Dispatcher, TuneCache, bucket, choose, make_key


def _timer(times):
    """A timer that returns the injected time of each candidate (by the function's name)."""
    def timer(fn):
        return times[fn()]
    return timer


def _cands(*names):
    return {n: (lambda n=n: n) for n in names}


@pytest.mark.parametrize(
    "times, expected",
    [
        ({"torch": 2.0, "triton": 1.0}, "triton"),
        ({"torch": 1.0, "triton": 2.0}, "torch"),
        ({"torch": 1.5, "triton": 1.5}, "torch"),  # a tie keeps the baseline (first) candidate
    ],
)
def test_choose_keeps_the_fastest_and_ties_go_to_the_baseline(times, expected):
    d = choose("k", _cands("torch", "triton"), _timer(times))
    assert d.choice == expected
    assert d.timings_ms == times
    assert d.errors == {}


def test_choose_records_a_failing_candidate_and_keeps_the_other():
    def broken():
        raise RuntimeError("out of resources: shared memory")

    d = choose("k", {"torch": lambda: "torch", "triton": broken}, _timer({"torch": 3.0}))
    assert d.choice == "torch"
    assert d.timings_ms == {"torch": 3.0, "triton": None}
    assert "out of resources" in d.errors["triton"]


def test_choose_raises_when_every_candidate_fails():
    def broken():
        raise ValueError("nope")

    with pytest.raises(ValueError, match="nope"):
        choose("k", {"torch": broken, "triton": broken}, _timer({}))
    with pytest.raises(ValueError, match="no candidates"):
        choose("k", {}, _timer({}))


@pytest.mark.parametrize("n, b", [(0, 0), (1, 1), (2, 2), (3, 4), (256, 256), (257, 512), (516, 1024)])
def test_bucket_is_the_next_power_of_two(n, b):
    assert bucket(n) == b


def test_key_buckets_rows_and_keeps_dims_exact():
    x = torch.empty(2, 258, 72)
    k1 = make_key("attention", [x, None], training=False, rows=4 * 16, dims=(258, 72))
    k2 = make_key("attention", [x], training=False, rows=3 * 16, dims=(258, 72))  # partial batch: same bucket
    k3 = make_key("attention", [x], training=True, rows=4 * 16, dims=(258, 72))
    k4 = make_key("attention", [x.half()], training=False, rows=4 * 16, dims=(258, 72))
    assert str(k1) == str(k2) == "attention|infer|64x258x72|float32|cpu"
    assert len({str(k1), str(k3), str(k4)}) == 3
    with pytest.raises(ValueError, match="at least one tensor"):
        make_key("attention", [None], training=False, rows=1)


def test_cache_round_trip(tmp_path):
    cache = TuneCache(tmp_path / "sub" / "tune.json")
    d = Decision("a|infer|64|float16|NVIDIA H200", "triton", {"torch": 2.0, "triton": 1.0}, {"xformers": "missing"})
    cache.store({d.key: d})
    loaded = cache.load()
    assert list(loaded) == [d.key]
    got = loaded[d.key]
    assert (got.choice, got.timings_ms, got.errors, got.source) == ("triton", d.timings_ms, d.errors, "cache")


def test_cache_path_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_CACHE, str(tmp_path / "x.json"))
    assert TuneCache().path == tmp_path / "x.json"
    monkeypatch.delenv(dispatch.ENV_CACHE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert TuneCache().path == tmp_path / "c" / "uvit_fast" / "tune.json"


@pytest.mark.parametrize(
    "text, why",
    [
        ("{not json", "corrupt"),
        (json.dumps({"format": 99, "decisions": {}}), "corrupt"),
        (json.dumps({"format": dispatch.CACHE_FORMAT, "versions": {"torch": "0.0"}, "decisions": {}}), "written by"),
    ],
)
def test_corrupt_or_foreign_cache_is_ignored_with_a_warning(tmp_path, text, why):
    path = tmp_path / "tune.json"
    path.write_text(text)
    with pytest.warns(UserWarning, match=why):
        assert TuneCache(path).load() == {}
    # the next write replaces it with a valid file
    d = Decision("k", "torch", {"torch": 1.0})
    TuneCache(path).store({"k": d})
    assert TuneCache(path).load()["k"].choice == "torch"


def test_a_decision_whose_choice_was_not_timed_is_corrupt(tmp_path):
    path = tmp_path / "tune.json"
    payload = {"format": dispatch.CACHE_FORMAT, "versions": dispatch.versions(),
               "decisions": {"k": {"choice": "triton", "timings_ms": {"torch": 1.0}}}}
    path.write_text(json.dumps(payload))
    with pytest.warns(UserWarning, match="corrupt"):
        assert TuneCache(path).load() == {}


def test_dispatcher_measures_once_then_reuses_the_decision(tmp_path):
    calls = []

    def timer(fn):
        calls.append(fn())
        return {"torch": 2.0, "triton": 1.0}[calls[-1]]

    disp = Dispatcher(TuneCache(tmp_path / "t.json"))
    key = make_key("skip_concat_linear", [torch.empty(4, 8)], training=True, rows=4, dims=(8, 8))
    assert disp.decide(key, _cands("torch", "triton"), timer).choice == "triton"
    assert disp.decide(key, _cands("torch", "triton"), timer).choice == "triton"
    assert calls == ["torch", "triton"]  # timed once
    # a new process (a fresh dispatcher on the same file) takes the stored decision without timing
    fresh = Dispatcher(TuneCache(tmp_path / "t.json"))
    d = fresh.decide(key, _cands("torch", "triton"), timer)
    assert (d.choice, d.source) == ("triton", "cache")
    assert calls == ["torch", "triton"]
    assert "skip_concat_linear|train|4x8x8|float32|cpu: triton (cache; torch 2.000 ms, triton 1.000 ms)" in (
        dispatch.format_decisions(fresh.decisions())
    )


def test_report_names_failures():
    d = Decision("k", "torch", {"torch": 1.0, "triton": None}, {"triton": "CompilationError: x"})
    text = dispatch.format_decisions({"k": d})
    assert "k: torch (measured; torch 1.000 ms, triton failed)" in text
    assert "triton failed: CompilationError: x" in text
    assert dispatch.format_decisions({}) == "no dispatch decisions in this process"


def test_install_marks_broadcast_decisions():
    disp = Dispatcher(TuneCache("/nonexistent/never-written.json"))
    disp._loaded = True  # nothing to read
    disp.install({"k": Decision("k", "triton", {"torch": 2.0, "triton": 1.0})})
    assert disp.decisions()["k"].source == "broadcast"


@pytest.mark.parametrize("value, cuda, cpu", [(None, True, False), ("0", False, False), ("1", True, True)])
def test_tuning_switch(monkeypatch, value, cuda, cpu):
    if value is None:
        monkeypatch.delenv(dispatch.ENV_TUNE, raising=False)
    else:
        monkeypatch.setenv(dispatch.ENV_TUNE, value)
    assert dispatch.tuning_enabled("cuda") is cuda
    assert dispatch.tuning_enabled("cpu") is cpu


_WRITER = textwrap.dedent(
    """
    import sys
    from uvit_fast.dispatch import Decision, TuneCache
    path, rank = sys.argv[1], sys.argv[2]
    cache = TuneCache(path)
    for i in range(40):
        key = f"op{rank}|infer|{i}|float16|gpu"
        cache.store({key: Decision(key, "torch", {"torch": float(i), "triton": float(i) + 1})})
    """
)


@pytest.mark.slow
def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = tmp_path / "tune.json"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(r)]) for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    loaded = TuneCache(path).load()
    assert len(loaded) == 80
    assert {k.split("|")[0] for k in loaded} == {"op0", "op1"}


# ------------------------------------------------------------------------------------------------
# Wiring: resolve() answers "measure", each op times its candidates and runs the winner.
# ------------------------------------------------------------------------------------------------
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from uvit_fast import _backend, ops  # noqa: E402


class _Ops(TorchDispatchMode):
    """Records the names of the ops that run (uvit_fast::* means the Triton path ran)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))

    @property
    def fused(self):
        return any(n.startswith("uvit_fast.") for n in self.names)


def _ordered_timer(times):
    """Injected timings by candidate order (torch first); the candidates are not run."""
    it = iter(times)
    return lambda fn: next(it)


def test_resolve_measures_only_when_asked(monkeypatch):
    x = torch.randn(2)
    monkeypatch.delenv(dispatch.ENV_TUNE, raising=False)
    assert _backend.resolve("auto", "op", x) == "torch"  # CPU: timing is off unless UVIT_FAST_TUNE=1
    monkeypatch.setenv(dispatch.ENV_TUNE, "0")
    assert _backend.resolve("auto", "op", x) == "torch"
    monkeypatch.setenv(dispatch.ENV_TUNE, "1")
    assert _backend.resolve("auto", "op", x) == "measure"
    assert _backend.resolve("triton", "op", x) == "triton"  # forced paths stay forced
    assert _backend.resolve("torch", "op", x) == "torch"
    with _backend.use_backend("torch"):
        assert _backend.resolve("auto", "op", x) == "torch"
    with _backend.use_backend("triton"):
        assert _backend.resolve("auto", "op", x) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # no way to run Triton on CPU tensors: nothing to time
    assert _backend.resolve("auto", "op", x) == "torch"


def test_tune_forces_measuring_but_not_against_tune_0(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_TUNE, raising=False)
    with dispatch.forced():
        assert _backend.resolve("auto", "op", torch.randn(2)) == "measure"
    monkeypatch.setenv(dispatch.ENV_TUNE, "0")
    with dispatch.forced():
        assert _backend.resolve("auto", "op", torch.randn(2)) == "torch"


def _op_calls():
    """(name, call) for every wired op at small, awkward interpreter shapes."""
    B, L, D = 1, 77, 72
    x, br = torch.randn(B, L, D), torch.randn(B, L, D)
    mod, w = torch.randn(B, D), torch.randn(D)
    img, pw = torch.randn(B, 3, 8, 12), torch.randn(D, 3, 4, 4)
    tok, dw = torch.randn(B, 1 + 6, D), torch.randn(4 * 4 * 3, D)
    q, k, v = (torch.randn(B, 77, 2, 72) for _ in range(3))
    qkv = torch.randn(B, 77, 3, 2, 72)
    return [
        ("adaln_layer_norm", lambda: ops.adaln_layer_norm(x, mod, mod, w, w)),
        ("residual_adaln_layer_norm", lambda: ops.residual_adaln_layer_norm(x, br, mod, mod, mod, w, w)),
        ("skip_concat_linear", lambda: ops.skip_concat_linear(x, br, torch.randn(D, 2 * D), w)),
        ("patchify_embed", lambda: ops.patchify_embed(img, pw, w, prefix=torch.randn(B, 1, D))),
        ("decoder_unpatchify", lambda: ops.decoder_unpatchify(tok, dw, None, patch_size=4, grid=(2, 3), extras=1)),
        ("attention", lambda: ops.attention(q, k, v, causal=True)),
        ("attention_qkvpacked", lambda: ops.attention_qkvpacked(qkv)),
    ]


@pytest.mark.parametrize("name, call", _op_calls(), ids=[n for n, _ in _op_calls()])
@pytest.mark.parametrize("winner", ["torch", "triton"])
def test_each_op_runs_the_measured_winner(fresh, monkeypatch, name, call, winner):
    attention = name.startswith("attention")
    # candidate order: torch (sdpa, torch for attention) first, then triton (then nothing on CPU)
    times = ([1.0, 1.0, 2.0] if winner == "torch" else [3.0, 3.0, 1.0]) if attention else (
        [1.0, 2.0] if winner == "torch" else [2.0, 1.0])
    monkeypatch.setattr(dispatch, "default_timer", lambda device_type: _ordered_timer(times))
    for _ in range(2):  # the second call takes the stored decision (the timer would run out)
        with _Ops() as seen:
            call()
        assert seen.fused is (winner == "triton"), seen.names[:5]
    (key, decision), = fresh.decisions().items()
    expected = ("sdpa" if attention else "torch") if winner == "torch" else "triton"
    assert key.startswith(name + "[") and "|infer|" in key
    assert decision.choice == expected
    assert decision.timings_ms == dict(zip(decision.timings_ms, times))
    assert len(dispatch.TuneCache(fresh.cache.path).load()) == 1  # and the file has it


def test_a_failing_triton_candidate_keeps_torch_and_records_why(fresh, monkeypatch):
    import uvit_fast.ops.adaln as adaln_mod

    def broken(*args, **kwargs):  # (the plan passes call=, the direct launch)
        raise RuntimeError("out of resources: shared memory, required 300000")

    monkeypatch.setattr(adaln_mod, "_adaln_layer_norm_triton", broken)
    monkeypatch.setattr(dispatch, "default_timer", lambda device_type: lambda fn: (fn(), 5.0)[1])
    x = torch.randn(1, 77, 72)
    with _Ops() as seen:
        ops.adaln_layer_norm(x)
    assert not seen.fused
    (d,) = fresh.decisions().values()
    assert d.choice == "torch" and d.timings_ms == {"torch": 5.0, "triton": None}
    assert "out of resources" in d.errors["triton"]
    assert "triton failed: RuntimeError: out of resources" in dispatch.dispatch_report()


def test_a_training_decision_times_forward_and_backward_and_leaves_grad_alone(fresh, monkeypatch):
    runs = []

    def timer(fn):
        with _Ops() as seen:
            grads = fn()
        runs.append((seen.fused, grads))
        return 1.0

    monkeypatch.setattr(dispatch, "default_timer", lambda device_type: timer)
    x = torch.randn(1, 77, 72, requires_grad=True)
    w = torch.randn(72, requires_grad=True)
    ops.adaln_layer_norm(x, weight=w).sum().backward()
    key, d = next(iter(fresh.decisions().items()))
    assert "|train|" in key and d.choice == "torch"  # a tie keeps PyTorch
    (torch_fused, torch_grads), (triton_fused, triton_grads) = runs
    assert (torch_fused, triton_fused) == (False, True)
    # each candidate ran its own backward: gradients of x and w against the same grad_output
    for a, b in zip(torch_grads, triton_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # the user's .grad holds exactly one backward (the real call's), not the timing runs'
    torch.testing.assert_close(w.grad, torch.ones(1, 77, 72).mul(
        torch.nn.functional.layer_norm(x.detach(), (72,))).sum((0, 1)))


def test_inference_under_no_grad_is_an_inference_key(fresh, monkeypatch):
    monkeypatch.setattr(dispatch, "default_timer", lambda device_type: _ordered_timer([1.0, 2.0]))
    x = torch.randn(1, 77, 72, requires_grad=True)
    with torch.no_grad():
        ops.adaln_layer_norm(x)
    assert "|infer|" in next(iter(fresh.decisions()))


def test_float64_is_not_timed(fresh, monkeypatch):
    monkeypatch.setattr(dispatch, "default_timer", lambda device_type: pytest.fail("timed"))
    ops.adaln_layer_norm(torch.randn(1, 5, 8, dtype=torch.float64))
    ops.skip_concat_linear(*(torch.randn(1, 5, 8, dtype=torch.float64) for _ in range(2)),
                           torch.randn(8, 16, dtype=torch.float64))
    assert fresh.decisions() == {}


# ------------------------------------------------------------------------------------------------
# tune(), the report, the CLI and the real run under the interpreter
# ------------------------------------------------------------------------------------------------
import uvit_fast  # noqa: E402
from uvit_fast.models import create_model  # noqa: E402

_TINY_DIT = dict(input_size=16, depth=1, hidden_size=64, num_heads=2)
_TINY_OPS = {"adaln_layer_norm", "residual_adaln_layer_norm", "attention_qkvpacked", "patchify_embed", "decoder_unpatchify",
             "fused_linear", "fused_mlp"}


def test_tune_collects_every_op_of_the_model_with_injected_timings(fresh, monkeypatch):
    monkeypatch.delenv(dispatch.ENV_TUNE)  # tune() measures on CPU without UVIT_FAST_TUNE=1
    monkeypatch.setattr(dispatch, "default_timer", lambda device_type: lambda fn: 1.0)
    model = create_model("DiT-S/8", **_TINY_DIT)
    report = uvit_fast.tune(model, *model.example_inputs(2), training=True)
    assert {k.split("[")[0] for k in report.decisions} == _TINY_OPS
    assert all("|train|" in k for k in report.decisions)
    assert all(p.grad is None for p in model.parameters())  # autograd.grad: .grad untouched
    assert set(report.choices.values()) == {"torch", "sdpa"}  # ties keep the PyTorch path
    text = str(report)
    assert text.count("\n") + 1 == len(report.decisions) and "triton 1.000 ms" in text
    assert uvit_fast.dispatch_report() == dispatch.format_decisions(fresh.decisions())
    # a second tune takes the stored decisions without timing
    monkeypatch.setattr(dispatch, "default_timer", lambda device_type: pytest.fail("timed twice"))
    again = uvit_fast.tune(model, *model.example_inputs(2), training=True)
    assert again.choices == report.choices
    # inference keys are separate decisions
    monkeypatch.setattr(dispatch, "default_timer", lambda device_type: lambda fn: 1.0)
    infer = uvit_fast.tune(model, *model.example_inputs(2), training=False)
    assert all("|infer|" in k for k in infer.decisions) and len(infer.decisions) == len(report.decisions)
    assert {k.split("[")[0] for k in infer.decisions} == _TINY_OPS


def test_tune_report_says_why_nothing_was_measured(fresh):
    model = create_model("DiT-S/8", fused=False, **_TINY_DIT)
    report = uvit_fast.tune(model, *model.example_inputs(1), training=False)
    assert report.decisions == {} and "TRITON_INTERPRET=1" in str(report) and "fused=False" in str(report)


def test_tune_refuses_when_timing_is_off(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_TUNE, "0")
    with pytest.raises(RuntimeError, match="UVIT_FAST_TUNE=0"):
        uvit_fast.tune(torch.nn.Linear(2, 2), torch.randn(1, 2))
    monkeypatch.setenv(dispatch.ENV_TUNE, "1")
    with pytest.raises(TypeError, match="nn.Module"):
        uvit_fast.tune(lambda x: x, torch.randn(1, 2))


@pytest.mark.slow
def test_real_run_under_the_interpreter_keeps_pytorch_everywhere(fresh, monkeypatch):
    """No injected timer: the interpreter is far slower than PyTorch, so every op keeps the
    PyTorch path, the cache file records it, and a fresh process-wide table reads it back."""
    model = create_model("DiT-S/8", **_TINY_DIT)
    x, t, y = model.example_inputs(2)
    with _Ops() as seen:
        out = model(x, t, y)  # UVIT_FAST_TUNE=1 (the fixture): the plain forward measures
    assert out.shape == (2, 8, 16, 16)  # learn_sigma: twice the input channels
    decisions = fresh.decisions()
    assert {k.split("[")[0] for k in decisions} == _TINY_OPS
    for d in decisions.values():
        assert d.choice in ("torch", "sdpa"), d
        assert d.timings_ms["triton"] is not None and d.timings_ms["triton"] > d.timings_ms[d.choice]
    stored = TuneCache(fresh.cache.path).load()
    assert {k: d.choice for k, d in stored.items()} == {k: d.choice for k, d in decisions.items()}
    # a new process (a fresh table on the same file) runs the stored choice without timing
    monkeypatch.setattr(dispatch, "_DISPATCHER", Dispatcher(TuneCache(fresh.cache.path)))
    monkeypatch.setattr(dispatch, "default_timer", lambda device_type: pytest.fail("timed again"))
    with _Ops() as seen:
        torch.testing.assert_close(model(x, t, y), out)
    assert not seen.fused
    assert all(d.source == "cache" for d in dispatch.dispatcher().decisions().values())


@pytest.mark.slow
def test_cli_tune_subprocess(tmp_path):
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1", dispatch.ENV_CACHE: str(tmp_path / "t.json")}
    env.pop(dispatch.ENV_TUNE, None)
    cmd = [sys.executable, "-m", "uvit_fast.cli", "tune", "DiT-S/8", "--batch", "2", "--training", "--json"]
    cmd += [f"--set={k}={v}" for k, v in _TINY_DIT.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {r["key"].split("[")[0] for r in rows} == _TINY_OPS
    assert all(r["choice"] in ("torch", "sdpa") and "|train|" in r["key"] for r in rows)
    assert set(TuneCache(tmp_path / "t.json").load()) == {r["key"] for r in rows}


def test_cli_tune_arguments():
    from uvit_fast.cli import build_parser

    args = build_parser().parse_args(["tune", "DiT-XL/2", "--batch", "4", "--training", "--set", "depth=2"])
    assert (args.model, args.batch, args.training, args.set, args._run) == (
        "DiT-XL/2", 4, True, ["depth=2"], "uvit_fast.tuning:run")
    from uvit_fast.tuning import _override

    assert _override("depth=2") == ("depth", 2) and _override("x=abc") == ("x", "abc")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        _override("depth")


@pytest.mark.parametrize("name", [
    "adaln_layer_norm", "attention", "patch_embed", "skip_concat_linear",
    pytest.param("models", marks=pytest.mark.slow),  # counts every preset's FLOPs
])
def test_bench_has_an_auto_row_beside_every_triton_row(name):
    import importlib

    from uvit_fast.bench.core import uvit_backend

    assert (uvit_backend("uvit_fast"), uvit_backend("uvit_fast_auto")) == ("triton", "auto")
    cases = importlib.import_module(f"uvit_fast.bench.{name}").cases(torch.device("cpu"), torch.float32)

    def rows(provider):
        return {(c.op, c.shape, c.pass_) for c in cases if c.provider == provider}

    assert rows("uvit_fast") and rows("uvit_fast_auto") == rows("uvit_fast")
    assert all(c.needs_cuda for c in cases if c.provider == "uvit_fast_auto")


def _tune_worker(rank, world, init_file, out_dir):
    import datetime
    import os

    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ[dispatch.ENV_CACHE] = os.path.join(out_dir, f"tune{rank}.json")
    os.environ[dispatch.ENV_TUNE] = "1"  # on CPU, auto follows decisions only with timing on (CUDA: by default)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        if rank == 0:  # later candidates measure faster: the Triton kernel wins every op
            count = iter(range(1000))
            dispatch.default_timer = lambda device_type: lambda fn: 100.0 - next(count)
        else:
            def never(device_type):
                raise AssertionError("rank 1 timed an op")
            dispatch.default_timer = never
        torch.manual_seed(0)
        model = create_model("DiT-S/8", **_TINY_DIT)
        report = uvit_fast.tune(model, *model.example_inputs(2), training=False)
        with torch.no_grad(), _Ops() as seen:  # every rank now runs the kernels rank 0 chose
            model(*model.example_inputs(2))
        rows = {k: (d.choice, d.source) for k, d in report.decisions.items()}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"rows": rows, "fused": seen.fused}))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as tests/test_distributed.py: gloo's teardown can hang at exit


@pytest.mark.slow
def test_distributed_tune_decides_on_rank_0_and_broadcasts(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_tune_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert {k.split("[")[0] for k in r0["rows"]} == _TINY_OPS
    assert {k: c for k, (c, _) in r0["rows"].items()} == {k: c for k, (c, _) in r1["rows"].items()}
    assert all(c == "triton" and s == "measured" for c, s in r0["rows"].values())
    assert all(s == "broadcast" for _, s in r1["rows"].values())
    assert r0["fused"] and r1["fused"]
    assert (tmp_path / "tune0.json").exists() and not (tmp_path / "tune1.json").exists()


def test_attention_candidates_leave_out_the_math_reference_at_large_scores():
    from uvit_fast.ops.attention import _attention_candidates

    small = torch.empty(1, 77, 2, 72, device="meta")
    large = torch.empty(64, 1025, 24, 64, device="meta")  # U-ViT-H/2 at 512 px: 6.4 GB of fp32 scores
    assert list(_attention_candidates(small, small, False, None)) == ["sdpa", "torch", "triton"]
    assert list(_attention_candidates(large, large, False, None)) == ["sdpa", "triton"]


@pytest.mark.parametrize("winner", ["torch", "triton"])
def test_clip_fp32_layer_norm_is_measured_against_its_float32_path(fresh, monkeypatch, winner):
    """CLIP's LayerNormFp32 times the kernel against the plain float32 path (not the op's own PyTorch
    path, which would normalise in the input's dtype) and runs the winner."""
    from uvit_fast.layers import LayerNormFp32

    torch.manual_seed(0)
    ln = LayerNormFp32(72)
    x, br = torch.randn(1, 77, 72).half(), torch.randn(1, 77, 72).half()
    monkeypatch.setattr(dispatch, "default_timer",
                        lambda device_type: _ordered_timer([1.0, 2.0] if winner == "torch" else [2.0, 1.0]))
    with _Ops() as seen:
        out = ln(x)
    assert seen.fused is (winner == "triton")
    expected = torch.nn.functional.layer_norm(x.float(), (72,), ln.weight, ln.bias, 1e-5).half()
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
    monkeypatch.setattr(dispatch, "default_timer",
                        lambda device_type: _ordered_timer([1.0, 2.0] if winner == "torch" else [2.0, 1.0]))
    with _Ops() as seen:
        x_new, h = ln.residual(x, br)
    assert seen.fused is (winner == "triton")
    torch.testing.assert_close(h, torch.nn.functional.layer_norm((x + br).float(), (72,), ln.weight, ln.bias).half(),
                               rtol=1e-3, atol=1e-3)
    keys = sorted(k.split("[")[0] for k in fresh.decisions())
    assert keys == ["layer_norm_fp32", "residual_layer_norm_fp32"]
    assert all(d.choice == winner for d in fresh.decisions().values())


@pytest.mark.parametrize("call_ms, runs", [(0.01, 10), (20.0, 4), (400.0, 2)])
def test_cpu_timer_runs_fewer_times_as_a_call_gets_slower(monkeypatch, call_ms, runs):
    """Microsecond calls: a warm-up and 9 timed runs; tens of milliseconds (an interpreted
    kernel): three timed runs once 30 ms are spent; a third of a second or more: one."""
    now = [0.0]
    monkeypatch.setattr(dispatch, "_clock", lambda: now[0])
    calls = []

    def fn():
        calls.append(1)
        now[0] += call_ms / 1e3

    assert dispatch.cpu_timer(fn) == pytest.approx(call_ms)
    assert len(calls) == runs
