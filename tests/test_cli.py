"""The ``uvit-fast`` console script and ``uvit-fast info``."""
import json
import shutil
import subprocess
import sys

import pytest

from uvit_fast.cli import info, main


def test_info_reports_versions_and_backends():
    data = info()
    assert data["torch"] and data["python"] and "sdpa" in data["attention_backends"]
    assert data["cuda_available"] in (True, False)
    assert data["tune_cache"].endswith("tune.json") and data["auto_measures"] in (True, False)


@pytest.mark.parametrize("interpret, listed", [
    pytest.param("0", None, marks=pytest.mark.slow),  # a fresh process each (3 s): one in the quick subset
    ("1", "triton (interpreter)"),
])
def test_info_lists_triton_only_where_it_can_run(interpret, listed):
    """Without CUDA the kernels run only under the interpreter (set before triton is imported:
    a fresh process)."""
    import os

    env = {**os.environ, "TRITON_INTERPRET": interpret, "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-m", "uvit_fast.cli", "info", "--json"], capture_output=True,
                         text=True, timeout=120, env=env, check=True)
    backends = json.loads(out.stdout)["attention_backends"]
    if json.loads(out.stdout)["cuda_available"]:
        pytest.skip("a CUDA device is visible: triton is listed as it runs there")
    triton = [b for b in backends if b.startswith("triton")]
    assert triton == ([listed] if listed else [])


@pytest.mark.slow  # a fresh process (3 s); test_module_entry_and_help keeps one in the quick subset
def test_console_script_info_json():
    exe = shutil.which("uvit-fast")
    if exe is None:
        pytest.skip("the uvit-fast console script is not on PATH (package not installed with pip)")
    out = subprocess.run([exe, "info", "--json"], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout)["uvit_fast"]


@pytest.mark.slow  # a subprocess
def test_module_entry_and_help(capsys):
    assert main([]) == 0
    assert "profile" in capsys.readouterr().out
    out = subprocess.run([sys.executable, "-m", "uvit_fast.cli", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "attention_backends" in out.stdout


_HELP_PROBE = """
import sys
from uvit_fast.cli import SUBCOMMANDS, main
names = sys.argv[1:] or [None, *SUBCOMMANDS]
for name in names:
    try:
        main(['--help'] if name is None else [name, '--help'])
    except SystemExit as exc:
        assert exc.code == 0, (name, exc.code)
heavy = sorted(m for m in ('torch', 'triton', 'numpy') if m in sys.modules)
print('IMPORTED', heavy, len(names))
"""


def test_every_help_answers_without_importing_torch():
    """``--help`` of the top level and of every registered subcommand builds the parser from
    torch-free code (uvit_fast.cli_args), so it answers at once."""
    from uvit_fast.cli_args import SUBCOMMANDS

    out = subprocess.run([sys.executable, "-c", _HELP_PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"IMPORTED [] {len(SUBCOMMANDS) + 1}" in out.stdout, out.stdout[-2000:]
    for name in SUBCOMMANDS:
        assert name in out.stdout  # listed by the top-level help


def test_version_flag(capsys):
    import uvit_fast

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"uvit-fast {uvit_fast.__version__}"
    out = subprocess.run([sys.executable, "-m", "uvit_fast.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and uvit_fast.__version__ in out.stdout


@pytest.mark.slow  # a subprocess
def test_lazy_package_exports_keep_optimize_a_function():
    """``import uvit_fast`` is lazy; importing the submodule ``uvit_fast.optimize`` must not
    replace the function ``uvit_fast.optimize`` (Python binds submodules to their package)."""
    probe = (
        "import sys, uvit_fast\n"
        "assert 'torch' not in sys.modules\n"
        "import uvit_fast.optimize\n"
        "assert callable(uvit_fast.optimize) and uvit_fast.optimize.__name__ == 'optimize', uvit_fast.optimize\n"
        "from uvit_fast import create_model, text_to_image_context, ops, OptimizeReport\n"
        "assert uvit_fast.models.UViT and uvit_fast.layers.PatchEmbed and uvit_fast.sampling.ddim_sample\n"
        "assert not hasattr(uvit_fast, 'no_such_name')\n"
        "assert set(uvit_fast.__all__) <= set(dir(uvit_fast))\n"
        "print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


def test_models_lists_filtered_names_with_profiler_counts(capsys):
    from uvit_fast.profiler import count_flops

    assert main(["models", "dit-s"]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines() if line.startswith("DiT-")]
    assert [line[0] for line in lines] == ["DiT-S/2", "DiT-S/4", "DiT-S/8"]
    ref = count_flops("DiT-S/2")
    assert lines[0][1:4] == ["DiT", str(ref["tokens"]), f"{ref['params'] / 1e6:.1f}M"]
    assert float(lines[0][4]) == pytest.approx(ref["gflops"], abs=0.01)
    assert lines[0][1:4] == ["DiT", "256", "33.0M"]  # DiT paper: 33M parameters at 256 tokens


@pytest.mark.slow
def test_models_without_filter_lists_every_create_model_name(capsys):
    import uvit_fast

    assert main(["models", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["model"] for r in rows] == uvit_fast.list_models()
    assert {r["arch"] for r in rows} >= {"UViT", "UViTT2I", "DiT", "ViT", "ViViT", "CLIP"}
    assert all(r["params"] > 0 and r["gflops"] > 0 and r["tokens"] > 0 for r in rows)


def test_unknown_names_in_the_cli_get_suggestions(capsys):
    assert main(["models", "no-such-thing"]) == 2
    assert "no model name matches 'no-such-thing'" in capsys.readouterr().err
    assert main(["profile", "--model", "DiT-XL-2"]) == 2
    assert "unknown model 'DiT-XL-2'; did you mean 'DiT-XL/2'?" in capsys.readouterr().err


def test_tune_with_an_unknown_name_or_override_is_one_line_and_exit_2(capsys):
    assert main(["tune", "DiT-XL-2"]) == 2
    assert "uvit-fast tune: unknown model 'DiT-XL-2'; did you mean 'DiT-XL/2'?" in capsys.readouterr().err
    assert main(["tune", "DiT-S/2", "--set", "img_size=8"]) == 2
    assert "input_size" in capsys.readouterr().err
    assert main(["tune", "DiT-S/2", "--set", "depth"]) == 2
    assert "--set takes KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--out", "--md"])
def test_bench_unwritable_output_fails_before_the_work(tmp_path, capsys, flag):
    """A bad --out / --md is a one-line error with exit 2 before any row runs (it was a
    FileNotFoundError traceback after the whole benchmark)."""
    import time

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    start = time.perf_counter()
    rc = main(["bench", "--suite", "ops", "--op", "skip_concat_linear", "--quick", "--no-progress",
               flag, str(blocker / "sub" / "x.json")])
    err = capsys.readouterr().err
    assert rc == 2 and f"uvit-fast bench: {flag} {blocker / 'sub' / 'x.json'}: {blocker} is not a folder" in err, err
    assert time.perf_counter() - start < 5
    assert main(["bench", "--suite", "ops", "--op", "skip_concat_linear", flag, str(tmp_path)]) == 2
    assert "is a folder; give a file name" in capsys.readouterr().err


@pytest.mark.slow  # a subprocess
def test_python_dash_m_uvit_fast_is_the_console_script():
    """Without the console script on PATH (a venv not activated), ``python -m uvit_fast`` works too."""
    import uvit_fast

    out = subprocess.run([sys.executable, "-m", "uvit_fast", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"uvit-fast {uvit_fast.__version__}", out.stderr
    out = subprocess.run([sys.executable, "-m", "uvit_fast", "bench", "--op", "nope"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "unknown --op nope" in out.stderr, out.stderr[-2000:]


def test_model_names_given_as_examples_in_the_help_exist():
    """A newcomer copies the example from ``--help``: every model name a help text offers after
    'e.g.' for a create_model name is one create_model accepts."""
    import re

    import uvit_fast
    from uvit_fast.cli_args import SUBCOMMANDS, build_parser

    parser = build_parser("test")
    names = set(uvit_fast.list_models())
    examples = []
    for command in SUBCOMMANDS:
        sub = parser._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            m = re.search(r"create_model name, e\.g\. (.+)$", action.help or "")
            if m:
                examples += [w.strip(" .,()") for w in m.group(1).split(" or ")]
    assert examples, "no help text gives an example model name"
    assert not [e for e in examples if e not in names], examples


@pytest.mark.slow  # a subprocess
def test_kernels_with_a_kernel_filter_that_matches_nothing_is_an_error():
    """``uvit-fast kernels --kernel NAME`` with a NAME no kernel has compiled nothing and exited 0
    with an empty report; it is now exit 2 naming the kernels the cases launch."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiling needs it unset
    out = subprocess.run([sys.executable, "-m", "uvit_fast.cli", "kernels", "--op", "adaln", "--shape", "dit-xl2",
                          "--dtype", "fp16", "--kernel", "nope", "--no-progress"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "no kernel name contains 'nope'; the selected cases launch: _adaln_fwd_kernel, _adaln_bwd_kernel" \
        in out.stderr, out.stderr[-2000:]
