"""The errors a newcomer meets first: unknown model names, constructor arguments of another
model family, checkpoints that do not fit a model built with overrides, inputs of the wrong
dtype on either path, and TRITON_INTERPRET set too late."""
import os
import subprocess
import sys
import types

import pytest
import torch

import uvit_fast
from uvit_fast import _backend
from uvit_fast.models import create_model, filter_models, load_upstream_checkpoint, suggest_models


@pytest.mark.parametrize(
    "wrong, right",
    [("DiT-XL-2", "DiT-XL/2"), ("dit-s/2", "DiT-S/2"), ("DIT_B_4", "DiT-B/4"), ("imagenet256-uvit-huge", "imagenet256_uvit_huge")],
)
def test_unknown_model_suggests_the_name(wrong, right):
    assert suggest_models(wrong)[0] == right
    with pytest.raises(ValueError, match=f"unknown model '{wrong}'; did you mean '{right}'"):
        create_model(wrong)


def test_misspelt_model_gets_close_names():
    hint = suggest_models("imagenet256_uvit_hug")
    assert hint[0] == "imagenet256_uvit_huge"
    with pytest.raises(ValueError, match="did you mean 'imagenet256_uvit_huge'"):
        create_model("imagenet256_uvit_hug")
    assert suggest_models("zzzzzz") == []
    with pytest.raises(ValueError, match=r"unknown model 'zzzzzz'; uvit_fast.list_models\(\)"):
        create_model("zzzzzz")


def test_filter_models_ignores_case_and_separators():
    assert filter_models("dit-xl") == ["DiT-XL/2", "DiT-XL/4", "DiT-XL/8"]
    assert filter_models("UViT_Huge") == ["imagenet256_uvit_huge", "imagenet512_uvit_huge"]
    assert filter_models(None) == uvit_fast.list_models()
    assert filter_models("nothing-like-this") == []


def test_argument_of_the_other_family_is_named():
    with pytest.raises(TypeError, match=r"DiT has no argument 'img_size'; DiT's argument for the \(latent\) image size is 'input_size'"):
        create_model("DiT-S/2", img_size=64)
    with pytest.raises(TypeError, match=r"UViT has no argument 'input_size'; .* is 'img_size'"):
        create_model("cifar10_uvit_small", input_size=32)
    with pytest.raises(TypeError, match="DiT has no argument 'dept'; did you mean 'depth'"):
        create_model("DiT-S/2", dept=3)
    with torch.device("meta"):
        assert create_model("DiT-S/2", input_size=64).pos_embed.shape[1] == 1024


def test_checkpoint_mismatch_names_the_overrides():
    with torch.device("meta"):
        sd = create_model("cifar10_uvit_small", fused=False).state_dict()
        small = create_model("cifar10_uvit_small", depth=3, fused=False)
    with pytest.raises(ValueError, match=r"does not match the model create_model\('cifar10_uvit_small', depth=3\)") as exc:
        load_upstream_checkpoint(small, sd)
    assert "unexpected keys" in str(exc.value)
    # a model built from the preset alone is named by the preset
    with torch.device("meta"):
        other = create_model("celeba64_uvit_small", fused=False)
    with pytest.raises(ValueError, match="does not match the model celeba64_uvit_small\n"):
        load_upstream_checkpoint(other, sd)


_INPUTS = {
    "DiT-S/2": lambda x: (x, torch.tensor([3]), torch.tensor([1])),
    "cifar10_uvit_small": lambda x: (x, torch.tensor([3])),
    "vit_tiny_patch16_224": lambda x: (x,),
}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("name", list(_INPUTS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["f64", "f16"])
def test_input_dtype_error_is_the_same_on_both_paths(name, fused, dtype):
    model = create_model(name, depth=1, fused=fused).eval()
    shape = model.example_inputs(1)[0].shape
    want = rf"patchify_embed: x, weight, bias must share one dtype; got x {dtype}, weight torch.float32"
    with pytest.raises(TypeError, match=want), torch.no_grad():
        model(*_INPUTS[name](torch.randn(shape, dtype=dtype)))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_context_dtype_error_is_the_same_on_both_paths(fused):
    model = create_model("mscoco_uvit_small", depth=1, fused=fused).eval()
    x, t, context = model.example_inputs(1)
    with pytest.raises(TypeError, match=r"UViTT2I: context has dtype torch.float64 but the model's weights are torch.float32"):
        with torch.no_grad():
            model(x, t, context.double())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts fp16 context: allowed
        assert model(x, t, context.half()).shape == x.shape


def test_gpu_built_kernels_under_the_interpreter_are_a_backend_error(monkeypatch):
    """A kernel module holding a @triton.jit function built without the interpreter, while
    TRITON_INTERPRET=1 is set: a BackendError saying to set it before the import."""
    pytest.importorskip("triton")
    from triton.runtime.jit import JITFunction

    def kernel(x):  # never launched
        pass

    fake = types.ModuleType("uvit_fast.kernels._gpu_built_probe")
    fake.kernel = JITFunction(kernel)
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(_backend.BackendError, match=r"set TRITON_INTERPRET=1 before importing uvit_fast or triton") as exc:
        _backend.check_triton_device("attention", torch.device("cpu"))
    assert "uvit_fast.kernels._gpu_built_probe" in str(exc.value)
    monkeypatch.delitem(sys.modules, fake.__name__)
    if not _backend.compiled_before_interpreter():  # this process was started with the interpreter
        _backend.check_triton_device("attention", torch.device("cpu"))


_LATE_INTERPRET = """
import os, torch
import uvit_fast
x = torch.randn(1, 258, 72)
w, b = torch.randn(72), torch.randn(72)
uvit_fast.ops.adaln_layer_norm(x, None, None, w, b, 1e-6, backend="torch")  # triton is imported now
os.environ["TRITON_INTERPRET"] = "1"
try:
    uvit_fast.ops.adaln_layer_norm(x, None, None, w, b, 1e-6, backend="triton")
except uvit_fast.BackendError as exc:
    print("BACKEND_ERROR", exc)
"""


@pytest.mark.slow
def test_interpreter_set_after_import_in_a_fresh_process():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _LATE_INTERPRET], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "BACKEND_ERROR adaln_layer_norm: TRITON_INTERPRET=1 was set after triton" in out.stdout, out.stdout
    assert "before importing uvit_fast or triton" in out.stdout


def test_install_hints_work_without_pypi():
    """uvit-fast is not on PyPI: every hint that names an extra says how to install it from a
    checkout (pip install -e ".[extra]")."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [*root.glob("uvit_fast/**/*.py"), *root.glob("kernels/*.py"), *root.glob("benchmarks/*.py"),
             *root.glob("examples/*.py"), *root.glob("docs/*.md"), *root.glob("*.md"), *root.glob("scripts/*")]
    bad = []
    for path in files:
        if not path.is_file():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if re.search(r"uvit-fast\[", line) and '-e ".[' not in line and "-e \\\".[" not in line:
                bad.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("part, first", [("vit-tiny", "vit_tiny_patch16_224"), ("vivit", "vivit_b_16x2_model1"),
                                         ("DiT-XL", "DiT-XL/2"), ("uvit-h", "imagenet256_uvit_huge")])
def test_part_of_a_name_suggests_the_names_containing_it(part, first):
    """A short form a user types (timm's 'vit-tiny', 'DiT-XL') names the full names, in list order
    (difflib alone found nothing for 'vit-tiny' and put DiT-XL/8 first)."""
    assert suggest_models(part)[0] == first
    with pytest.raises(ValueError, match=f"unknown model '{part}'; did you mean '{first}'"):
        create_model(part)


@pytest.mark.parametrize("override, exc, match", [
    ({"patch_size": 0}, ValueError, r"patch_size must be a positive int; got 0"),
    ({"num_heads": 0}, ValueError, r"num_heads must be a positive int; got 0"),
    ({"hidden_size": -8}, ValueError, r"hidden_size must be a positive int; got -8"),
    ({"depth": "abc"}, TypeError, r"depth must be an int >= 0; got 'abc'"),
    ({"depth": True}, TypeError, r"depth must be an int >= 0; got True"),
    ({"depth": -1}, ValueError, r"depth must be an int >= 0; got -1"),
    ({"mlp_ratio": 0.0}, ValueError, r"mlp_ratio must be a positive number; got 0.0"),
])
def test_create_model_names_a_bad_size(override, exc, match):
    """A zero or non-integer size is a clear error naming it (it used to end in a ZeroDivisionError or
    a TypeError deep in a constructor; `uvit-fast tune --set` passes these through)."""
    from uvit_fast import create_model

    with pytest.raises(exc, match=match):
        create_model("DiT-S/8", **override)
