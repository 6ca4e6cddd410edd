"""Benchmarks: `python -m fastdl.bench` (what `make bench` runs).

Each op module lists its cases: fastdl/bench/<op>.py with `cases(device, quick)`.
"""
from fastdl.bench import softmax

OPS = {"softmax": softmax}
