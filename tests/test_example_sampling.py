"""examples/sample_ddim.py as a user runs it: help text and defaults for every option, a clear
error for presets that are not diffusion models, and a tiny sampling run."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "sample_ddim.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("sample_ddim_example", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_option_has_help_and_a_default(example):
    parser = example.build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in options} >= {"model", "checkpoint", "depth", "steps", "cfg", "batch", "dtype", "seed", "out"}
    for action in options:
        assert action.help and "(default: " in action.help, action.dest
    assert "samples are noise" in parser.format_help()


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "clip_vit_b32", "vivit_b_16x2_model1"])
def test_non_diffusion_preset_is_a_clear_error(example, name, capsys):
    with pytest.raises(SystemExit) as exc:
        example.main(["--model", name])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--model {name} is not a diffusion model" in err and "DiT-S/8" in err
    assert "Traceback" not in err and "positional arguments" not in err


def test_unknown_preset_suggests_names(example, capsys):
    with pytest.raises(SystemExit):
        example.main(["--model", "dit-s/8"])
    assert "did you mean 'DiT-S/8'" in capsys.readouterr().err


def test_tiny_run_in_process(example, tmp_path, capsys):
    out = tmp_path / "samples.pt"
    result = example.main(["--model", "DiT-S/8", "--depth", "1", "--steps", "2", "--batch", "1", "--out", str(out)])
    captured = capsys.readouterr()
    assert "random weights (no --checkpoint): the samples are noise" in captured.err
    assert result.shape == (1, 4, 32, 32) and torch.isfinite(result).all()
    assert torch.equal(torch.load(out), result.cpu())


@pytest.mark.slow
def test_tiny_run_in_a_subprocess(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--model", "cifar10_uvit_small", "--depth", "1", "--steps", "2", "--batch", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cifar10_uvit_small on cpu: 1 samples x 2 steps" in out.stdout or "on cuda" in out.stdout
    assert "samples are noise" in out.stderr
    bad = subprocess.run([sys.executable, str(SCRIPT), "--model", "vit_tiny_patch16_224"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "is not a diffusion model" in bad.stderr and "Traceback" not in bad.stderr


def test_bad_checkpoint_is_a_usage_error_not_a_traceback(example, tmp_path, capsys):
    """A missing file or another preset's checkpoint exits 2 with the loader's message."""
    with pytest.raises(SystemExit) as exc:
        example.main(["--model", "DiT-S/8", "--depth", "1", "--checkpoint", str(tmp_path / "nope.pth")])
    assert exc.value.code == 2
    assert f"--checkpoint {tmp_path / 'nope.pth'}: [Errno 2] No such file" in capsys.readouterr().err
    other = tmp_path / "other.pth"
    import uvit_fast

    torch.save(uvit_fast.create_model("DiT-S/8", depth=2).state_dict(), other)
    with pytest.raises(SystemExit) as exc:
        example.main(["--model", "DiT-S/8", "--depth", "1", "--checkpoint", str(other)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "does not match the model create_model('DiT-S/8', depth=1)" in err and "Traceback" not in err
