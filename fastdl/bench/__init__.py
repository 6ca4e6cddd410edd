"""Benchmarks: `python -m fastdl.bench` (what `make bench` runs).

Each op module lists its cases: fastdl/bench/<op>.py with `cases(device, quick)`.
"""
from fastdl.bench import layer_norm, softmax

OPS = {"softmax": softmax, "layer_norm": layer_norm}
