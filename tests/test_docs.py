"""The README, LICENSE and CHANGELOG agree with the code: every ``uvit_fast.X`` the README names
exists, the README's facts (head dims, versions) match the source, the license is the one
pyproject names."""
import importlib
import re
from pathlib import Path

import uvit_fast

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def _resolves(dotted: str) -> bool:
    obj = uvit_fast
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:
            obj = importlib.import_module("uvit_fast." + ".".join(parts[: i + 1]))
        except ImportError:
            return False
    return True


def test_every_uvit_fast_name_in_the_readme_exists():
    names = sorted(set(re.findall(r"\buvit_fast\.([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)", README)))
    assert "create_model" in names and "text_to_image_context" in names
    missing = [n for n in names if not _resolves(n)]
    assert not missing, missing


def test_readme_calls_text_to_image_context_qualified():
    """A reader copies the call: it must say where the function comes from, and that must work."""
    calls = [README[m.start() - 10:m.end()] for m in re.finditer(r"text_to_image_context\(", README)]
    assert calls and all(c.endswith("uvit_fast.text_to_image_context(") for c in calls), calls
    from uvit_fast.models import text_to_image_context

    assert uvit_fast.text_to_image_context is text_to_image_context


def test_supported_section_matches_the_source():
    from uvit_fast.kernels.attention import MAX_HEAD_DIM

    section = README[README.index("## Supported"):README.index("## Layout")]
    assert f"1 to {MAX_HEAD_DIM}" in section
    for dep in re.findall(r'"(torch>=[\d.]+|triton>=[\d.]+)', PYPROJECT):
        assert f"`{dep}`" in section, dep
    assert "sm_90" in section and "sm_80" in section and "nothing has run on a GPU yet" in section


def test_readme_states_both_test_durations():
    assert 'python -m pytest -m "not slow"' in README
    start = README.index("Test time on a 2-core")
    paragraph = " ".join(README[start:README.index("\n\n", start)].split())
    assert re.search(r"the full suite \d+ min \d+ s", paragraph), paragraph
    assert re.search(r"the quick subset \d+ min \d+ s", paragraph), paragraph
    assert "TODO" not in paragraph


def test_license_is_the_apache_2_text_pyproject_names():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text and "END OF TERMS AND CONDITIONS" in text
    assert re.search(r'license\s*=\s*\{\s*text\s*=\s*"Apache-2.0"', PYPROJECT)


def test_changelog_has_unreleased_and_the_current_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    version = re.search(r'^version\s*=\s*"([^"]+)"', PYPROJECT, re.M).group(1)
    assert version == uvit_fast.__version__
    assert "## Unreleased" in text and f"## {version} - " in text
    assert text.index("## Unreleased") < text.index(f"## {version}")


def test_install_hints_in_readme_use_editable_installs():
    assert "uvit-fast[" not in README.replace('pip install -e ".[', "")


def test_sample_ddim_help_keeps_the_line_continuation_of_its_gpu_command():
    """The example's docstring is its --help text; a backslash-newline in a plain string is eaten,
    which glued the GPU command's two lines together with a run of spaces."""
    import ast

    doc = ast.get_docstring(ast.parse((ROOT / "examples" / "sample_ddim.py").read_text()), clean=False)
    assert "imagenet256_uvit_huge.pth \\\n        --steps 50" in doc, doc


def test_python_floor_is_the_one_torch_2_9_needs_and_the_readme_says_it():
    """torch 2.9 (the floor in dependencies) is published for Python >= 3.10 only: a lower
    requires-python lets pip start on 3.9 and fail on torch with no word about Python."""
    assert re.search(r'"torch>=2\.9"', PYPROJECT)
    assert re.search(r'^requires-python\s*=\s*">=3\.10"', PYPROJECT, re.M)
    section = README[README.index("## Supported"):README.index("## Layout")]
    assert "Python >= 3.10" in section


def test_ops_section_says_which_ops_have_a_backend_and_a_reference():
    """'Each op takes backend= and has a *_reference twin' must hold for every op the README's ops
    table lists, or the README must name the op as an exception."""
    import inspect

    import uvit_fast.ops as ops

    section = README[README.index("## The ops"):README.index("### Choosing the backend")]
    intro = section[:section.index("| op |")]
    table_ops = re.findall(r"^\| `([a-z_]+)\(", section, re.M)
    table_ops += re.findall(r"`, `([a-z_]+)\(", section)
    assert "attention_qkvpacked" in table_ops and "unpatchify" in table_ops, table_ops
    for name in table_ops:
        fn = getattr(ops, name)
        full = "backend" in inspect.signature(fn).parameters and hasattr(ops, f"{name}_reference")
        assert full or f"`{name}`" in intro, name


def test_ci_runs_exactly_the_readme_test_command():
    """.ci/run's command is the README's test command, and both run the suite on every core."""
    command = re.search(r"^pip install torch==[\d.]+ && pip install -e \"\.\[test\]\" && python -m pytest.*$", README, re.M)
    assert command, "the README's test command"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command.group(0) in ci, ci
    assert "-n auto" in command.group(0) and "pytest-xdist" in PYPROJECT
