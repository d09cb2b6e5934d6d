"""``uvit-fast bench --suite sampling``: the DDIM-step rows (skipped on a CPU, with the reason),
the host rows (measured in a subprocess: per op call and per forward, with ratios computed from the
measured numbers), the JSON / markdown output, the arguments."""
import json
import math

import pytest
import torch

from uvit_fast.bench import host, runner, sampling
from uvit_fast.cli import main
from uvit_fast.models import create_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def quick_result():
    """One quick CPU run, shrunk: depth 1, one op, DiT-XL/2's forward, few calls (the subprocess
    imports torch and decides the dispatch keys under the interpreter: most of its time)."""
    policy = runner.Policy(CPU, quick=True)
    return runner.run_suite("sampling", CPU, torch.float32, policy, ops=["adaln_layer_norm", "forward", "ddim"],
                            progress=False, sampling={"depth": 1, "host_calls": (60, 6), "host_models": ("DiT-XL/2",)})


@pytest.mark.slow  # the quick_result fixture runs the suite (8 s)
def test_ddim_rows_are_skipped_on_cpu_with_the_reason(quick_result):
    ddim = [r for r in quick_result["rows"] if r["op"].startswith("ddim step")]
    assert {r["provider"] for r in ddim} == set(sampling.PROVIDERS)
    assert {r["extra"]["batch"] for r in ddim} == set(sampling.BATCHES_QUICK)
    assert {r["extra"]["model"] for r in ddim} == set(sampling.GPU_MODELS)
    assert len(ddim) == len(sampling.PROVIDERS) * len(sampling.BATCHES_QUICK) * len(sampling.GPU_MODELS)
    for r in ddim:
        assert r["status"] == "skipped" and "needs CUDA" in r["reason"]
        assert "ms" not in r  # nothing invented


@pytest.mark.slow  # the quick_result fixture runs the suite (8 s)
def test_host_op_rows_and_their_ratios(quick_result):
    rows = {r["provider"]: r for r in quick_result["rows"] if r["op"] == "host op adaln_layer_norm"}
    assert set(rows) >= {"reference", "torch", "auto"}
    for r in rows.values():
        assert r["status"] == "ok" and r["us"] > 0 and r["reps"] == 60
        assert r["shape"].startswith("CPU, 1 thread: ")  # every CPU timing says so
        assert math.isclose(r["ms"], r["us"] / 1e3)
        assert r["us_p20"] <= r["us"] <= r["us_p80"]
    assert math.isclose(rows["torch"]["ratio"], rows["torch"]["us"] / rows["reference"]["us"])
    auto = rows["auto"]
    # under the interpreter the decision is PyTorch (the interpreted kernel loses)
    assert auto["chosen"] == "torch"
    assert math.isclose(auto["ratio"], auto["us"] / rows["torch"]["us"])
    assert math.isclose(auto["extra_us"], auto["us"] - rows["torch"]["us"])


@pytest.mark.slow  # the quick_result fixture runs the suite (8 s)
def test_host_forward_rows_keep_the_depth_given(quick_result):
    fwd = {r["provider"]: r for r in quick_result["rows"] if r["op"] == "host forward DiT-XL/2"}
    assert set(fwd) == {"plain", "fused"}
    assert "depth=1 width=64" in fwd["plain"]["shape"] and fwd["plain"]["shape"].startswith("CPU, 1 thread")
    assert math.isclose(fwd["fused"]["ratio"], fwd["fused"]["us"] / fwd["plain"]["us"])
    assert "ratio" not in fwd["plain"]
    assert fwd["fused"]["first_call_s"] > 0  # the decisions were taken before timing
    env = quick_result["meta"]["host"]
    assert env["threads"] == 1 and env["env"]["UVIT_FAST_TUNE"] == "1" and env["env"]["TRITON_INTERPRET"] == "1"


@pytest.mark.slow  # the quick_result fixture runs the suite (8 s)
def test_output_json_and_markdown(quick_result, tmp_path):
    json_path, md_path = runner.save(quick_result, str(tmp_path / "s.json"))
    data = json.loads(open(json_path).read())
    assert data["meta"]["suite"] == "sampling"
    assert any(r.get("ratio_desc", "").startswith("backend='torch' / reference") for r in data["rows"])
    md = open(md_path).read()
    assert "| host us | ratio |" in md and "CPU, 1 thread: B=1 L=6 D=64" in md
    assert "needs CUDA: a GPU-sized sampling row" in md  # the skipped rows' reason
    text = runner.format_text(quick_result)
    assert "host rows: CPU, 1 thread" in text and "host forward DiT-XL/2" in text
    assert "CPU timings (wall clock); the DDIM-step rows need CUDA" in text
    # a CUDA run's header says how its steps were timed, not that they are CPU timings
    cuda = dict(quick_result, meta=dict(quick_result["meta"], device_type="cuda"))
    assert "slope between a short and a long run" in runner.format_text(cuda)
    assert "CPU timings" not in runner.format_markdown(cuda).split("\n| suite")[0]


def test_time_ddim_step_on_a_tiny_model():
    model = create_model("DiT-S/8", input_size=8, hidden_size=32, num_heads=2, depth=1).eval()
    noise = torch.randn(1, 4, 8, 8)
    y = torch.tensor([3])
    t = sampling.time_ddim_step(model, noise, y, torch.full((1,), 1000), short=1, long=3, reps=2)
    assert t["steps"] == [1, 3] and t["ms_long_run"] > 0 and t["ms_short_run"] > 0
    assert math.isclose(t["ms"], (t["ms_long_run"] - t["ms_short_run"]) / 2)
    assert t["ms_per_step_incl_setup"] == pytest.approx(t["ms_long_run"] / 3)


def test_bad_arguments(capsys):
    with pytest.raises(ValueError, match="unknown --op nope for --suite sampling; choose from: adaln_layer_norm"):
        runner.select_modules("sampling", ["nope"])
    with pytest.raises(ValueError, match="--width must be an even integer"):
        sampling.run(CPU, torch.float32, quick=True, ops=["ddim"], width=3)
    with pytest.raises(ValueError, match="--depth must be a non-negative integer"):
        sampling.run(CPU, torch.float32, quick=True, ops=["ddim"], depth=-1)
    with pytest.raises(ValueError, match="long .3. must be more steps than short .3."):
        sampling.time_ddim_step(None, torch.zeros(1), None, None, short=3, long=3, reps=1)
    with pytest.raises(ValueError, match="reps must be a positive integer"):
        sampling.time_ddim_step(None, torch.zeros(1), None, None, short=1, long=3, reps=0)
    with pytest.raises(ValueError, match="unknown --provider fast for --suite sampling; choose from: eager"):
        sampling.run(CPU, torch.float32, quick=True, ops=["ddim"], providers=["fast"])
    with pytest.raises(ValueError, match="calls must be a positive integer"):
        host.time_calls(lambda: None, 0)
    with pytest.raises(ValueError, match="time_interleaved: calls must be a positive integer"):
        host.time_interleaved({"a": lambda: None}, -1)
    with pytest.raises(ValueError, match="host: unknown op nope"):
        host.measure_ops(CPU, torch.float32, 1, ["nope"])
    assert main(["bench", "--suite", "ops", "--depth", "2", "--no-progress"]) == 2
    assert "--depth and --width apply only to --suite sampling" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--suite", "sampling", "--depth", "-1"])
    assert "must be a non-negative integer" in capsys.readouterr().err


def test_ddim_only_selection_runs_no_subprocess(monkeypatch):
    def boom(**kwargs):
        raise AssertionError("no host rows were asked for")

    monkeypatch.setattr(host, "run_subprocess", boom)
    rows, env = sampling.run(CPU, torch.float32, quick=True, ops=["ddim"])
    assert rows and all(r["status"] == "skipped" for r in rows) and env == {}
    rows, _ = sampling.run(CPU, torch.float32, quick=True, ops=["ddim"], providers=["eager"])
    reasons = {r["provider"]: r["reason"] for r in rows}
    assert "needs CUDA" in reasons["eager"] and reasons["compile"] == "provider 'compile' not selected (--provider)"


@pytest.mark.slow
def test_cli_quick_run_writes_results(tmp_path, capsys):
    out = tmp_path / "sampling.json"
    assert main(["bench", "--suite", "sampling", "--quick", "--depth", "1", "--op", "attention", "--op", "forward",
                 "--no-progress", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    ops = {r["op"] for r in data["rows"] if r["status"] == "ok"}
    assert ops == {"host op attention", "host forward imagenet256_uvit_huge", "host forward DiT-XL/2"}
    assert "host us" in capsys.readouterr().out


@pytest.mark.parametrize("provider", ["eager", "uvit_fast"])
def test_ddim_row_code_path_on_cpu(provider):
    # the body a CUDA run times, run here on CPU shrunk, in float32 (the fused model's ops on
    # PyTorch: auto on CPU tensors without tuning); the cuda_graph and compile providers need a GPU
    slot = sampling._Models(CPU, torch.float32, {"depth": 1, "hidden_size": 64, "num_heads": 2, "input_size": 8})
    row = sampling.measure_row({"extra": {}}, slot, "DiT-XL/2", provider, 1, (1, 2, 1))
    assert row["status"] == "ok", row.get("error")
    assert row["ms_long_run"] > 0 and math.isclose(row["ms"], row["ms_long_run"] - row["ms_short_run"])
    # one step of a tiny model is within the noise of a loaded machine: the slope may come out <= 0
    if row["ms"] > 0:
        assert row["samples_per_s"] == pytest.approx(1 / (row["ms"] * 1e-3))
    else:
        assert row["samples_per_s"] is None and "not positive" in row["extra"]["slope_note"]
    assert set(slot.cache) == {"eager": {"plain"}, "uvit_fast": {"fused"}}[provider]


def test_time_interleaved_calls_each_function_in_rounds():
    order = []
    t = host.time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 40)
    warm = max(3, 40 // 20)
    assert order[: 2 * warm] == ["a", "b"] * warm  # warm-up rounds first
    rounds = [order[i:i + 2] for i in range(2 * warm, len(order), 2)]
    assert len(rounds) == 40 and all(sorted(r) == ["a", "b"] for r in rounds)  # one call of each per round
    assert {tuple(r) for r in rounds} == {("a", "b"), ("b", "a")}  # in shuffled order: no fixed neighbour
    assert set(t) == {"a", "b"} and all(v["us_min"] <= v["us"] <= v["us_p80"] for v in t.values())
