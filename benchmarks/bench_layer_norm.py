"""pytest-benchmark suite for layer_norm, rms_norm and the fused add + layer_norm: the
cases of `python -m fastdl.bench --ops layer_norm --quick` (see benchmarks/_suite.py)."""
import pytest
from _suite import DEVICE, IMPL_NAMES, case_id, run_impl

from fastdl.bench import layer_norm


@pytest.mark.parametrize("case", layer_norm.cases(DEVICE, quick=True), ids=case_id)
@pytest.mark.parametrize("impl_name", IMPL_NAMES)
def bench_layer_norm(benchmark, case, impl_name):
    run_impl(benchmark, case, impl_name)
