"""``uvit-fast bench``: case discovery (tolerating missing and broken modules), the CPU policy,
ceilings, JSON / markdown output, the model rows."""
import json
import math
import sys
import textwrap

import pytest
import torch

import uvit_fast.bench as bench_pkg
from uvit_fast.bench import models as bench_models
from uvit_fast.bench import runner
from uvit_fast.bench.core import Case
from uvit_fast.cli import main

CPU = torch.device("cpu")

FAKE_OK = '''
import torch
from uvit_fast.bench.core import Case

CALLS = {"n": 0}


def _work():
    CALLS["n"] += 1
    a = torch.randn(64, 64)
    return a @ a


def _boom():
    raise RuntimeError("kernel exploded")


def cases(device, dtype):
    out = []
    for shape in ("small", "big"):
        for provider in ("eager", "compile", "uvit_fast", "sdpa_math"):
            out.append(Case("ops", "fake_op", shape, "fwd", provider, _work, bytes=3 * 64 * 64 * 4,
                            flops=2 * 64 ** 3, needs_cuda=provider == "uvit_fast",
                            skip_reason="Triton kernel: needs CUDA" if provider == "uvit_fast" else None,
                            extra={"batch": 4, "not_json": object()}))
    out.append(Case("ops", "fake_op", "small", "bwd", "eager", _boom, bytes=1))
    return out
'''


@pytest.fixture
def fake_modules(tmp_path, monkeypatch):
    """Case modules on the package path: fake_ok (works), fake_broken (import fails),
    fake_raises (cases() raises), fake_nocases (no cases function)."""
    (tmp_path / "fake_ok.py").write_text(textwrap.dedent(FAKE_OK))
    (tmp_path / "fake_broken.py").write_text("raise ImportError('missing dependency: flash_attn_9')\n")
    (tmp_path / "fake_raises.py").write_text("def cases(device, dtype):\n    raise ValueError('bad shape table')\n")
    (tmp_path / "fake_nocases.py").write_text("X = 1\n")
    monkeypatch.setattr(bench_pkg, "__path__", list(bench_pkg.__path__) + [str(tmp_path)])
    names = ["fake_ok", "fake_broken", "fake_raises", "fake_nocases"]
    yield names
    for n in names:
        sys.modules.pop(f"uvit_fast.bench.{n}", None)


def test_discovery_finds_known_and_new_modules(fake_modules):
    found = runner.discover_op_modules()
    assert found[: len(runner.OP_MODULES)] == list(runner.OP_MODULES)
    assert set(fake_modules) <= set(found)
    assert not {"core", "runner", "models", "__init__"} & set(found)


def test_load_cases_tolerates_broken_modules(fake_modules):
    cases, reason = runner.load_cases("fake_ok", CPU, torch.float32)
    assert reason is None and len(cases) == 9 and all(isinstance(c, Case) for c in cases)
    for name, match in [
        ("fake_broken", "import failed: ImportError: missing dependency: flash_attn_9"),
        ("fake_raises", "cases\\(\\) raised ValueError: bad shape table"),
        ("fake_nocases", "defines no cases"),
        ("no_such_op_module", "module not found"),
    ]:
        cases, reason = runner.load_cases(name, CPU, torch.float32)
        assert cases == [] and reason is not None
        assert __import__("re").search(match, reason), reason


def test_policy_cpu_and_cuda():
    def case(provider, needs_cuda=False, skip=None):
        return Case("ops", "op", "s", "fwd", provider, lambda: None, needs_cuda=needs_cuda, skip_reason=skip)

    cpu = runner.Policy(CPU)
    assert cpu.skip_reason(case("eager"), 0) is None
    assert cpu.skip_reason(case("sdpa_math"), 0) is None
    assert "--max-shapes" in cpu.skip_reason(case("eager"), 1)
    assert "torch.compile on CPU" in cpu.skip_reason(case("compile"), 0)
    assert "interpreter" in cpu.skip_reason(case("uvit_fast"), 0)
    assert cpu.skip_reason(case("uvit_fast", True, "kernel needs CUDA"), 0) == "kernel needs CUDA"
    assert cpu.skip_reason(case("flash_attn", True), 0) == "needs CUDA"
    assert runner.Policy(CPU, cpu_compile=True).skip_reason(case("compile"), 0) is None
    assert runner.Policy(CPU, max_shapes=3).skip_reason(case("eager"), 2) is None
    assert "--provider" in runner.Policy(CPU, providers=["compile"]).skip_reason(case("eager"), 0)
    # on CUDA (the policy only; nothing runs): every provider and shape runs
    gpu = runner.Policy(torch.device("cuda"))
    for p in ("eager", "compile", "uvit_fast"):
        assert gpu.skip_reason(case(p, needs_cuda=True), 7) is None
    assert gpu.skip_reason(case("flash_attn", skip="flash-attn not installed"), 0) == "flash-attn not installed"
    assert gpu.op_budget is None and cpu.op_budget == runner.CPU_BUDGET[0]


def test_ceilings_cpu():
    """measure_ceilings works on a CPU (run_suite calls it on CUDA only)."""
    c = runner.measure_ceilings(CPU, torch.float32, quick=True)
    assert c["copy_gbps"] > 0 and c["gemm_tflops"] > 0
    assert "MiB" in c["copy_desc"] and "float32" in c["gemm_desc"]


def test_run_suite_rows(fake_modules, monkeypatch):
    monkeypatch.setattr(runner, "OP_MODULES", ("no_such_op_module",) + runner.OP_MODULES)
    policy = runner.Policy(CPU, quick=True)
    result = runner.run_suite("ops", CPU, torch.float32, policy,
                              ops=["no_such_op_module"] + fake_modules, progress=False)
    rows = result["rows"]
    by = {(r["shape"], r["pass"], r["provider"]): r for r in rows}
    ok = by[("small", "fwd", "eager")]
    assert ok["status"] == "ok" and ok["reps"] >= 1
    assert ok["ms_p20"] <= ok["ms"] <= ok["ms_p80"]
    assert ok["gbps"] == pytest.approx(3 * 64 * 64 * 4 / (ok["ms"] * 1e-3) / 1e9)
    assert ok["tflops"] == pytest.approx(2 * 64 ** 3 / (ok["ms"] * 1e-3) / 1e12)
    # no ceilings on a CPU (its GEMM rate depends on the shape: rows beat any one square GEMM)
    assert result["ceilings"] == {} and "ceiling_frac" not in ok and "bound" not in ok
    assert ok["samples_per_s"] == pytest.approx(4 / (ok["ms"] * 1e-3))
    assert ok["speedup_vs_eager"] == pytest.approx(1.0)
    assert "not_json" not in ok["extra"] and ok["extra"]["batch"] == 4
    sdpa = by[("small", "fwd", "sdpa_math")]
    assert sdpa["status"] == "ok" and sdpa["speedup_vs_eager"] == pytest.approx(ok["ms"] / sdpa["ms"])
    assert by[("small", "fwd", "compile")]["status"] == "skipped"
    assert by[("small", "fwd", "uvit_fast")]["reason"] == "Triton kernel: needs CUDA"
    assert "--max-shapes" in by[("big", "fwd", "eager")]["reason"]
    err = by[("small", "bwd", "eager")]
    assert err["status"] == "error" and "kernel exploded" in err["error"]
    skipped = {s["module"]: s["reason"] for s in result["skipped_modules"]}
    assert set(skipped) == {"no_such_op_module", "fake_broken", "fake_raises", "fake_nocases"}
    assert result["meta"]["device"].startswith("CPU") and result["meta"]["suite"] == "ops"
    text = runner.format_text(result)
    assert "kernel exploded" in text and "skipped module fake_broken" in text
    assert "% ceiling" not in text and "No '% of ceiling' column on a CPU" in text
    md = runner.format_markdown(result)
    assert "% ceiling" not in md.replace("No '% of ceiling'", "") and "| vs eager |" in md


def test_ceiling_fractions_when_ceilings_are_measured(fake_modules):
    """With measured ceilings (what a CUDA run has), rows get their fraction and the column."""
    cases, _ = runner.load_cases("fake_ok", CPU, torch.float32)
    policy = runner.Policy(CPU, quick=True)
    ceilings = {"copy_gbps": 1e6, "gemm_tflops": 1e3, "copy_desc": "x", "gemm_desc": "y"}
    row = runner.run_case(cases[0], CPU, policy, ceilings, None)
    assert row["bound"] in ("memory", "compute") and 0 < row["ceiling_frac"] < 1
    text = runner.format_text({"meta": runner.environment(CPU, torch.float32) | {"quick": True},
                               "ceilings": ceilings, "rows": [row], "skipped_modules": []})
    assert "% ceiling" in text and "ceilings (measured in this run)" in text


def test_unknown_provider_or_op_is_an_error_before_any_measurement(fake_modules, monkeypatch, tmp_path, capsys):
    measured = []
    monkeypatch.setattr(runner, "measure_ceilings", lambda *a, **k: measured.append(1) or {})
    policy = runner.Policy(CPU, quick=True, providers=["nope"])
    with pytest.raises(ValueError, match=r"unknown --provider nope; the selected cases have: compile, eager, sdpa_math, uvit_fast"):
        runner.run_suite("ops", CPU, torch.float32, policy, ops=["fake_ok"], progress=False)
    out = tmp_path / "never.json"
    assert main(["bench", "--provider", "nope", "--op", "fake_ok", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown --provider nope" in err and "eager" in err
    assert main(["bench", "--suite", "ops", "--op", "nope", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown --op nope for --suite ops; choose from: adaln_layer_norm, patch_embed" in err
    assert not out.exists() and not measured


@pytest.mark.parametrize("module", [
    "skip_concat_linear", "adaln_layer_norm",
    *(pytest.param(m, marks=pytest.mark.slow) for m in ("patch_embed", "attention", "models")),
])
def test_cpu_rows_name_no_cuda_only_provider(module):
    """On a CPU the rows that run are named for what they are: no cuBLAS/cuDNN/flash names."""
    cases, reason = runner.load_cases(module, CPU, torch.float32)
    assert reason is None, (module, reason)
    policy = runner.Policy(CPU, cpu_compile=True)
    names = {c.provider for c in cases if policy.skip_reason(c, 0) is None}
    assert "eager" in names
    if module == "skip_concat_linear":
        assert "linear_no_concat" in names
    cuda_only = {n for n in names if any(k in n for k in ("cublas", "cudnn", "flash", "efficient", "xformers"))}
    assert not cuda_only, cuda_only


def test_default_output_goes_to_benchmarks_results():
    path = runner.default_out(CPU, "ops")
    assert "benchmarks/results/uvit-fast-bench-ops-cpu" in path.replace("\\", "/")
    assert runner.results_dir().name == "results" and runner.results_dir().parent.name == "benchmarks"


def test_pytest_benchmark_skip_reasons_name_options_pytest_has():
    """The CPU skip reasons point to --cpu-compile and --max-shapes: both exist for
    ``uvit-fast bench`` and for ``pytest benchmarks`` (benchmarks/conftest.py)."""
    import importlib.util
    import re
    from pathlib import Path

    policy = runner.Policy(CPU)
    reasons = [policy.skip_reason(Case("ops", "op", "s", "fwd", "compile", lambda: None), 0),
               policy.skip_reason(Case("ops", "op", "s", "fwd", "eager", lambda: None), 3)]
    named = {m for r in reasons for m in re.findall(r"--[a-z][a-z-]+", r)}
    assert named == {"--cpu-compile", "--max-shapes"}

    conftest = Path(__file__).resolve().parents[1] / "benchmarks" / "conftest.py"
    sys.path.insert(0, str(conftest.parent))
    try:
        spec = importlib.util.spec_from_file_location("_bench_conftest", conftest)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(conftest.parent))

    class Group:
        options = []

        def addoption(self, *names, **kw):
            self.options += names

    class Parser:
        group = Group()

        def getgroup(self, *a, **k):
            return self.group

    parser = Parser()
    mod.pytest_addoption(parser)
    assert named <= set(parser.group.options)
    from uvit_fast.cli import build_parser

    bench_help = build_parser()._subparsers._group_actions[0].choices["bench"].format_help()
    assert all(opt in bench_help for opt in named)


def test_time_budget_skips_the_rest(fake_modules):
    policy = runner.Policy(CPU, quick=True, time_budget=1e-9, max_shapes=2)
    result = runner.run_suite("ops", CPU, torch.float32, policy, ops=["fake_ok"], progress=False)
    ran = [r for r in result["rows"] if r["status"] != "skipped"]
    assert len(ran) == 1  # the first case runs, then the op's budget is gone
    assert any("time budget" in r.get("reason", "") for r in result["rows"])


def test_cli_writes_valid_json_and_markdown(fake_modules, tmp_path, capsys):
    out = tmp_path / "res" / "bench.json"
    assert main(["bench", "--suite", "ops", "--op", "fake_ok", "--op", "fake_broken", "--quick",
                 "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fake_op" in printed and str(out) in printed
    data = json.loads(out.read_text())  # allow_nan=False on write: strict JSON
    meta = data["meta"]
    for key in ("device", "torch", "triton", "git_commit", "git_dirty", "date", "dtype", "python"):
        assert key in meta
    assert meta["torch"] == torch.__version__
    assert data["ceilings"] == {}  # CPU: not measured (see measure_ceilings)
    assert {r["status"] for r in data["rows"]} == {"ok", "skipped", "error"}
    assert data["skipped_modules"][0]["module"] == "fake_broken"
    md = out.with_suffix(".md").read_text()
    assert md.startswith("# uvit-fast bench: CPU") and "| suite | op | shape |" in md
    assert "fake_op" in md and "skipped module fake_broken" in md
    # --strict turns raised rows / skipped modules into exit 1
    assert main(["bench", "--suite", "ops", "--op", "fake_ok", "--quick", "--no-progress", "--strict",
                 "--out", str(tmp_path / "s.json")]) == 1


def test_cli_bad_arguments(capsys):
    assert main(["bench", "--op", "nonexistent_op", "--quick", "--no-progress", "--suite", "models"]) == 2
    assert "unknown --op nonexistent_op" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--max-shapes", "0"])
    assert exc.value.code == 2 and "must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--suite", "everything"])


def test_quick_env(monkeypatch, fake_modules, tmp_path):
    monkeypatch.setenv(runner.QUICK_ENV, "1")
    out = tmp_path / "q.json"
    assert main(["bench", "--suite", "ops", "--op", "fake_ok", "--no-progress", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["meta"]["quick"] is True


@pytest.mark.slow
def test_real_ops_suite_on_this_device(tmp_path):
    """The real case modules: whatever exists runs (CPU: torch rows only), the rest is reported."""
    policy = runner.Policy(CPU if not torch.cuda.is_available() else torch.device("cuda"), quick=True,
                           time_budget=2.0)
    device = policy.device
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    result = runner.run_suite("ops", device, dtype, policy, progress=False)
    json_path, _ = runner.save(result, str(tmp_path / "ops.json"))
    data = json.loads(open(json_path).read())
    modules = {r["op"] for r in data["rows"]} | {s["module"] for s in data["skipped_modules"]}
    assert modules, "no op rows and no skipped modules"
    errors = [r for r in data["rows"] if r["status"] == "error"]
    assert not errors, errors[0]
    if device.type == "cpu":
        for r in data["rows"]:
            if r["provider"] == "uvit_fast" or r["provider"].startswith("compile"):
                assert r["status"] == "skipped" and r["reason"]
        for r in data["rows"]:
            if r["status"] == "ok":
                assert math.isfinite(r["ms"]) and r["ms"] > 0


@pytest.mark.slow
def test_model_cases_cpu():
    cases = bench_models.cases(CPU, torch.float32)
    cpu_rows = [c for c in cases if not c.needs_cuda]
    gpu_rows = [c for c in cases if c.needs_cuda]
    assert {c.pass_ for c in cpu_rows} == {"fwd", "train"} and {c.provider for c in cpu_rows} == {"eager"}
    assert {c.provider for c in gpu_rows} >= {"eager", "compile", "uvit_fast"}
    assert any("imagenet256_uvit_huge" == c.op for c in gpu_rows) and any("DiT-XL/2" == c.op for c in gpu_rows)
    assert all(c.flops and c.flops > 0 and c.extra["batch"] > 0 for c in cases)
    fwd = next(c for c in cpu_rows if c.pass_ == "fwd")
    train = next(c for c in cpu_rows if c.pass_ == "train" and c.op == fwd.op)
    assert train.flops == pytest.approx(3 * fwd.flops * train.extra["batch"] / fwd.extra["batch"], rel=1e-9)
    out = fwd.fn()
    assert out.shape[0] == fwd.extra["batch"] and torch.isfinite(out).all()
    loss0 = float(train.fn())
    loss1 = float(train.fn())
    assert math.isfinite(loss0) and math.isfinite(loss1)
    bench_models.release()


@pytest.mark.slow
def test_models_suite_cpu_policy(tmp_path):
    policy = runner.Policy(CPU, quick=True)
    result = runner.run_suite("models", CPU, torch.float32, policy, progress=False)
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    assert ok and all(r["samples_per_s"] > 0 and "tflops" in r for r in ok)
    skipped = [r for r in result["rows"] if r["status"] == "skipped"]
    assert any("needs CUDA" in r["reason"] for r in skipped)
