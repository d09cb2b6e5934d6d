"""Backend selection: the backend argument, UVIT_FAST_BACKEND, use_backend, and clear errors."""
import os
import subprocess
import sys

import pytest
import torch

import uvit_fast
from uvit_fast import ops
from uvit_fast._backend import BackendError, get_backend, load_kernel, resolve

from upstream_reference import randomize_


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("UVIT_FAST_BACKEND", raising=False)
    assert get_backend() == "auto"
    assert resolve("auto", "op", torch.randn(2)) == "torch"


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("UVIT_FAST_BACKEND", "triton")
    assert get_backend() == "triton"
    assert resolve("auto", "op", torch.randn(2)) == "triton"  # CPU is fine: the interpreter is on
    assert resolve("torch", "op", torch.randn(2)) == "torch"  # an explicit argument wins
    monkeypatch.setenv("UVIT_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="UVIT_FAST_BACKEND must be one of"):
        get_backend()


def test_use_backend_nests_and_restores(monkeypatch):
    monkeypatch.setenv("UVIT_FAST_BACKEND", "torch")
    with uvit_fast.use_backend("triton"):
        assert get_backend() == "triton"
        with uvit_fast.use_backend("auto"):
            assert get_backend() == "auto"
        assert get_backend() == "triton"
    assert get_backend() == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        with uvit_fast.use_backend("gpu"):
            pass


def test_unknown_backend_argument():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.adaln_layer_norm(x, backend="cuda")
    with pytest.raises(ValueError, match=r"attention: backend must be one of"):
        ops.attention(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8), backend="magic")


def test_mixed_devices_are_rejected():
    with pytest.raises(ValueError, match="one device"):
        resolve("auto", "op", torch.randn(2), torch.randn(2, device="meta"))


def test_missing_kernel_is_not_implemented_naming_the_op():
    with pytest.raises(NotImplementedError, match="some_op: the Triton kernel is not implemented"):
        load_kernel("some_op", "no_such_kernel_module")


@pytest.mark.slow
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch, uvit_fast\n"
        "from uvit_fast._backend import BackendError\n"
        "x = torch.randn(2, 4, 8)\n"
        "try:\n"
        "    uvit_fast.ops.adaln_layer_norm(x, backend='triton')\n"
        "except BackendError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERR adaln_layer_norm: backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1" in out.stdout, out.stderr
    assert issubclass(BackendError, ValueError)


def test_fused_model_runs_on_the_torch_backend_under_use_backend():
    m = uvit_fast.create_model("DiT-S/8", input_size=16, depth=1).eval()
    randomize_(m)  # DiT zero-initialises its output layers
    x, t, y = torch.randn(1, 4, 16, 16), torch.ones(1), torch.tensor([2])
    with uvit_fast.use_backend("torch"):
        a = m(x, t, y)
    m_ref = uvit_fast.create_model("DiT-S/8", input_size=16, depth=1, fused=False).eval()
    m_ref.load_state_dict(m.state_dict())
    assert a.abs().max() > 0
    torch.testing.assert_close(a, m_ref(x, t, y))


def test_use_backend_is_seen_by_other_threads(monkeypatch):
    """Autograd runs backward (and checkpoint recomputation) on its own threads."""
    import threading

    monkeypatch.delenv("UVIT_FAST_BACKEND", raising=False)
    seen = []
    with uvit_fast.use_backend("torch"):
        th = threading.Thread(target=lambda: seen.append(get_backend()))
        th.start()
        th.join()
    assert seen == ["torch"] and get_backend() == "auto"
