"""pytest-benchmark suite for softmax / log_softmax: the cases of `python -m fastdl.bench
--ops softmax --quick` (see benchmarks/_suite.py)."""
import pytest
from _suite import DEVICE, IMPL_NAMES, case_id, run_impl

from fastdl.bench import softmax


@pytest.mark.parametrize("case", softmax.cases(DEVICE, quick=True), ids=case_id)
@pytest.mark.parametrize("impl_name", IMPL_NAMES)
def bench_softmax(benchmark, case, impl_name):
    run_impl(benchmark, case, impl_name)
