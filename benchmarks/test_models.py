"""Model rows (forward and training step) of ``uvit_fast.bench.models`` under pytest-benchmark."""
import pytest

from _cases import DEVICE, DTYPE, bench_case, collect


@pytest.mark.parametrize("module,index,skip", collect(["models"], DEVICE, DTYPE))
def test_model(benchmark, module, index, skip):
    bench_case(benchmark, module, index, skip, DEVICE, DTYPE)
