"""pytest-benchmark suite for softmax: the same cases as `python -m fastdl.bench`.

    pytest benchmarks/bench_softmax.py --benchmark-only [--benchmark-json out.json]

On a GPU each round ends with a synchronize, so the time is the kernel's, not the
launch's; python -m fastdl.bench (CUDA events) is the reference for committed numbers.
"""
import pytest
import torch

import fastdl
from fastdl.bench import softmax as cases_module

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = cases_module.cases(DEVICE, quick=True)


def _ids(case):
    return f"{case.direction}-{str(case.dtype).replace('torch.', '')}-{'x'.join(map(str, case.shape))}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
@pytest.mark.parametrize("impl_index", range(2 + len([b for b in fastdl.available_backends(DEVICE.type) if b != "torch"])))
def bench_softmax(benchmark, case, impl_index):
    impl = case.impls()[impl_index]
    benchmark.group = f"softmax-{_ids(case)}"
    benchmark.name = impl.name
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def run():
        impl.fn()
        sync()

    with fastdl.use_backend(impl.backend or "auto"):
        run()  # warm up (compiles torch.compile / Triton)
        benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
