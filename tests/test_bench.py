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
    assert ok["bound"] in ("memory", "compute") and ok["ceiling_frac"] > 0
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
    assert "kernel exploded" in text and "skipped module fake_broken" in text and "ceilings" in text


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
    assert {"copy_gbps", "gemm_tflops"} <= set(data["ceilings"])
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
    assert main(["bench", "--max-shapes", "0"]) == 2
    with pytest.raises(SystemExit):
        main(["bench", "--suite", "everything"])


def test_quick_env(monkeypatch, fake_modules, tmp_path):
    monkeypatch.setenv(runner.QUICK_ENV, "1")
    out = tmp_path / "q.json"
    assert main(["bench", "--suite", "ops", "--op", "fake_ok", "--no-progress", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["meta"]["quick"] is True


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


def test_models_suite_cpu_policy(tmp_path):
    policy = runner.Policy(CPU, quick=True)
    result = runner.run_suite("models", CPU, torch.float32, policy, progress=False)
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    assert ok and all(r["samples_per_s"] > 0 and "tflops" in r for r in ok)
    skipped = [r for r in result["rows"] if r["status"] == "skipped"]
    assert any("needs CUDA" in r["reason"] for r in skipped)
