"""The measured-dispatch core (uvit_fast.dispatch): decisions with injected timings, key bucketing,
the cache file (round trip, versions, corruption, concurrent writers) and the report."""
import json
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
