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
from hypothesis import HealthCheck, settings  # noqa: E402

# Hypothesis profiles (tests/test_properties.py; docs/testing.md). "ci", the default: a fixed
# seed (derandomize) and a bounded budget, so that CI is reproducible and about a minute long.
# "deep", by hand: HYPOTHESIS_PROFILE=deep python -m pytest tests/test_properties.py
_PROFILE_SLOW_OK = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=10, derandomize=True, print_blob=True, **_PROFILE_SLOW_OK)
settings.register_profile("deep", max_examples=200, derandomize=False, print_blob=True, **_PROFILE_SLOW_OK)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# pytest-xdist (`-n auto`, the README's command): the workers share the machine's cores, so each
# keeps its share of PyTorch's intra-op threads instead of one thread per core each
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


EXTENDED = os.environ.get("UVIT_FAST_EXTENDED", "0") == "1"


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.extended`` cases (each repeats, in another dtype, backend or at a larger size, a
    case the default run keeps) run only with ``UVIT_FAST_EXTENDED=1``, so that the full suite fits
    CI's 15 minutes on 2 cores; docs/testing.md lists them."""
    if EXTENDED:
        return
    skip = pytest.mark.skip(reason="extended case (a heavier repeat of one the default run keeps): "
                                   "set UVIT_FAST_EXTENDED=1 to run it (docs/testing.md)")
    for item in items:
        if "extended" in item.keywords:
            item.add_marker(skip)


def _shape_independent_dot():
    """The interpreter's ``tl.dot`` for fp32 and fp16 operands with an fp32 accumulator: each element
    the float64 sum rounded once to fp32, whatever the tile shape or the machine. The interpreter
    computes a dot with ``np.matmul`` on float32 (the BLAS sgemm), whose rounding depends on the
    operand shapes and on the BLAS kernel the CPU gets: the same kernel gave 16- and 32-row tile
    steps that disagreed (tests/test_attention.py). A GPU's dot is an FMA chain in one order for
    every tile shape. The kernels still accumulate across their K tiles
    in fp32. bf16 operands keep the interpreter's own dot (its bf16 dot is wrong anyway). Returns
    the function that undoes the patch."""
    import numpy as np
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    plain = builder.create_dot
    operands = (np.float32, np.float16)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype in operands and b.data.dtype in operands and d.data.dtype == np.float32:
            exact = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64)) + d.data
            return interpreter.TensorHandle(exact.astype(np.float32), d.dtype.scalar)
        return plain(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot

    def undo():
        builder.create_dot = plain
    return undo


@pytest.fixture(scope="module")
def shape_independent_dot():
    """:func:`_shape_independent_dot` for a whole test module (``pytestmark`` or an autouse fixture
    there); not session-wide: the float64 dot costs up to 3x the interpreter's own on fp32 GEMM
    tiles, and the suite has minutes of interpreter GEMMs."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        yield  # compiled kernels: the GPU's own dot
        return
    undo = _shape_independent_dot()
    try:
        yield
    finally:
        undo()


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_plans():
    """Every test starts with no stored op plans (uvit_fast.ops._hot): a test's monkeypatched
    environment or dispatch table is read by its first call of each signature, as in a new process.
    A test that changes the environment between two op calls calls ``refresh_settings()`` itself."""
    from uvit_fast._backend import refresh_settings

    refresh_settings()
    yield


@pytest.fixture
def restore_fp32_precision():
    """Puts ``torch.backends.cuda.matmul.fp32_precision`` back after a test that changes it."""
    m = torch.backends.cuda.matmul
    old = getattr(m, "fp32_precision", None)
    yield
    if old is not None:
        m.fp32_precision = old


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """Measured dispatch on (CPU under the interpreter: UVIT_FAST_TUNE=1) with a fresh process-wide
    decision table on a temporary cache file, a fresh pin table for the compiled dispatch ops and a
    fresh dynamo cache. Yields the table (a ``uvit_fast.dispatch.Dispatcher``)."""
    import torch._dynamo

    from uvit_fast import dispatch
    from uvit_fast._backend import refresh_settings
    from uvit_fast.ops import _runtime

    monkeypatch.setenv(dispatch.ENV_TUNE, "1")
    table = dispatch.Dispatcher(dispatch.TuneCache(tmp_path / "tune.json"))
    monkeypatch.setattr(dispatch, "_DISPATCHER", table)
    monkeypatch.setattr(_runtime, "_PINNED", {})
    refresh_settings()
    torch._dynamo.reset()
    yield table
    refresh_settings()  # the plans of this table's decisions go with it
    torch._dynamo.reset()


@pytest.fixture
def no_tf32():
    """fp32 matmuls exact while the test runs (``F.linear`` with TF32 off is the fp32 baseline, and
    the kernels follow the same flag); put back afterwards. Only CUDA has TF32."""
    if DEVICE.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
