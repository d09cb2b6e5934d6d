"""pytest-benchmark suite: the same cases as ``uvit-fast bench`` (``pytest benchmarks --benchmark-only``).

Cases are listed at collection from ``uvit_fast.bench.<op>.cases(device, dtype)`` and built
again, one op module at a time, when its first test runs (so only one module's tensors are
alive). On a CPU the same policy as ``uvit-fast bench`` applies: GPU rows, ``compile`` and
``uvit_fast`` rows and all but the first shape of each op are skipped with the reason, and
the two options that change it exist here too, under the same names: ``--cpu-compile`` and
``--max-shapes N`` (``pytest benchmarks --benchmark-only --max-shapes 2``).
"""
import pytest

import _cases


def pytest_addoption(parser):
    group = parser.getgroup("uvit-fast benchmarks")
    group.addoption("--cpu-compile", action="store_true", default=False,
                    help="on CPU, also run the torch.compile rows (as uvit-fast bench --cpu-compile)")
    group.addoption("--max-shapes", type=int, default=None, metavar="N",
                    help="on CPU, run the first N shapes of each op (default 1; as uvit-fast bench --max-shapes)")


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("benchmark"):
        raise pytest.UsageError('benchmarks/ needs pytest-benchmark: pip install -e ".[test]"')
    max_shapes = config.getoption("--max-shapes")
    if max_shapes is not None and max_shapes < 1:
        raise pytest.UsageError(f"--max-shapes must be >= 1; got {max_shapes}")
    _cases.OPTIONS.update(cpu_compile=config.getoption("--cpu-compile"), max_shapes=max_shapes)
