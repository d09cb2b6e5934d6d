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


def test_console_script_info_json():
    exe = shutil.which("uvit-fast")
    if exe is None:
        pytest.skip("the uvit-fast console script is not on PATH (package not installed with pip)")
    out = subprocess.run([exe, "info", "--json"], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout)["uvit_fast"]


def test_module_entry_and_help(capsys):
    assert main([]) == 0
    assert "profile" in capsys.readouterr().out
    out = subprocess.run([sys.executable, "-m", "uvit_fast.cli", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "attention_backends" in out.stdout
