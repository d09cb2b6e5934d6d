"""Every op case of ``uvit_fast.bench.<op>`` under pytest-benchmark."""
import pytest

from _cases import DEVICE, DTYPE, bench_case, collect
from uvit_fast.bench.runner import discover_op_modules


@pytest.mark.parametrize("module,index,skip", collect(discover_op_modules(), DEVICE, DTYPE))
def test_op(benchmark, module, index, skip):
    bench_case(benchmark, module, index, skip, DEVICE, DTYPE)
