"""pytest-benchmark suite: the same cases as ``uvit-fast bench`` (``pytest benchmarks --benchmark-only``).

Cases are listed at collection from ``uvit_fast.bench.<op>.cases(device, dtype)`` and built
again, one op module at a time, when its first test runs (so only one module's tensors are
alive). On a CPU the same policy as ``uvit-fast bench`` applies: GPU rows, ``compile`` and
``uvit_fast`` rows and all but the first shape of each op are skipped with the reason.
"""
import pytest


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("benchmark"):
        raise pytest.UsageError("benchmarks/ needs pytest-benchmark: pip install 'uvit-fast[test]'")
