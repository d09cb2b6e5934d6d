"""Test configuration. Without CUDA the Triton kernels run under the interpreter, which must
be switched on before ``triton`` is imported."""
import os
import sys

if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        if "triton" in sys.modules:  # too late to switch the interpreter on
            raise RuntimeError("tests/conftest.py: triton was imported before TRITON_INTERPRET could be set")
        os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("UVIT_FAST_POISON", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
