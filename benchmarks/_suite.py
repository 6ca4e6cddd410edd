"""Shared by the pytest-benchmark suites (benchmarks/bench_<op>.py): the cases are those
of `python -m fastdl.bench` (fastdl/bench/<op>.py, quick sizes), one benchmark per case x
implementation, grouped by case so pytest-benchmark compares the implementations.

    pytest benchmarks/ --benchmark-only [--benchmark-json out.json]

On a GPU each round ends with a synchronize, so a round times the whole call: the host's
part and the kernels'. python -m fastdl.bench's device times (CUDA graph replay, the host
left out) and its host-timed rows are the reference for committed numbers.
"""
import pytest
import torch

import fastdl
from fastdl.bench import harness

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# every implementation a case may have here; a case without one skips it (apex: layer_norm only)
IMPL_NAMES = ["torch", "torch.compile", "apex"] + [f"fastdl-{b}" for b in harness.fastdl_backends(DEVICE)]


def case_id(case: harness.Case) -> str:
    dtype = str(case.dtype).replace("torch.", "")
    return f"{case.op}-{case.direction}-{dtype}-{'x'.join(map(str, case.shape))}"


def run_impl(benchmark, case: harness.Case, impl_name: str):
    """Times one implementation of the case with pytest-benchmark's `benchmark` fixture."""
    impls = {impl.name: impl for impl in case.impls()}
    if impl_name not in impls:
        pytest.skip(f"{case_id(case)} has no {impl_name} implementation here")
    impl = impls[impl_name]
    benchmark.group = case_id(case)
    benchmark.name = impl_name
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def once():
        impl.fn()
        sync()

    with fastdl.use_backend(impl.backend or "auto"):
        once()  # warm up (compiles torch.compile / Triton)
        benchmark.pedantic(once, rounds=20, iterations=1, warmup_rounds=2)
