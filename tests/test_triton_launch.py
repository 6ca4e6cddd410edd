"""How the Triton launchers pick num_warps (fastdl/triton/_launch.py: tuned_num_warps).

The SASS behind these numbers is checked by tests/triton_compile_check.py (no spills at
any warp count offered); here, that the right counts are offered, in both modes.
"""
import pytest

triton = pytest.importorskip("triton")

from fastdl.triton import _launch  # noqa: E402
from fastdl.triton import layer_norm as norm_kernels  # noqa: E402
from fastdl.triton import softmax as softmax_kernels  # noqa: E402

# (kernel, launch constexprs, warp counts offered, the first the default)
OFFERED = [
    # softmax forward holds the row: 16384 values over 4 warps would be 128 a thread
    (softmax_kernels._softmax_forward_tile_kernel, dict(BLOCK_COLS=16384, ROWS=1), [8, 16]),
    (softmax_kernels._softmax_forward_tile_kernel, dict(BLOCK_COLS=64, ROWS=64), [4, 8, 16]),
    # its backward holds dy and y
    (softmax_kernels._softmax_backward_tile_kernel, dict(BLOCK_COLS=16384, ROWS=1), [16]),
    (softmax_kernels._softmax_backward_tile_kernel, dict(BLOCK_COLS=1024, ROWS=4), [4, 8, 16]),
    # the loop kernels hold a chunk and two per-lane accumulators: 8 warps first
    (softmax_kernels._softmax_forward_loop_kernel, dict(BLOCK_COLS=4096), [8, 16]),
    (softmax_kernels._softmax_backward_chunk_dot_kernel, dict(BLOCK_COLS=4096), [8, 16]),
    (softmax_kernels._softmax_chunk_write_kernel, dict(BLOCK_COLS=4096, BLOCK_CHUNKS=2), [8, 4, 16]),
    (norm_kernels._norm_forward_tile_kernel, dict(BLOCK_COLS=16384, ROWS=1), [16]),
    (norm_kernels._norm_forward_tile_kernel, dict(BLOCK_COLS=1024, ROWS=4), [4, 8, 16]),
    # norm backward holds x, dy and g: 8192 columns spill ~700 times at 4 warps
    (norm_kernels._norm_backward_tile_kernel, dict(BLOCK_COLS=8192, ROWS=1), [16]),
    (norm_kernels._norm_backward_tile_kernel, dict(BLOCK_COLS=1024, ROWS=4), [8, 16]),
    (norm_kernels._norm_forward_loop_kernel, dict(BLOCK_COLS=2048), [8, 4, 16]),
    (norm_kernels._norm_backward_loop_kernel, dict(BLOCK_COLS=2048), [8, 4, 16]),
    # no choice fits (a tile far past the launchers' limits, as the tune tool may try): the most warps
    (norm_kernels._norm_backward_tile_kernel, dict(BLOCK_COLS=65536, ROWS=1), [16]),
]


@pytest.mark.parametrize("kernel, launch, expected", OFFERED,
                         ids=[f"{k.fn.__name__.strip('_')}-{'x'.join(map(str, launch.values()))}"
                              for k, launch, _ in OFFERED])
def test_offered_num_warps(kernel, launch, expected):
    assert kernel.offered_num_warps(launch) == expected


def _dummy_kernel():
    @triton.jit
    def kernel(x_ptr, BLOCK_COLS: triton.language.constexpr, ROWS: triton.language.constexpr):
        pass

    return kernel


@pytest.mark.parametrize("block_cols, rows, expected", [(8192, 1, [16]), (1024, 4, [8, 16]), (64, 16, [4, 8, 16])])
def test_autotuner_times_only_the_offered(block_cols, rows, expected, monkeypatch):
    monkeypatch.setattr(_launch, "AUTOTUNE", True)
    monkeypatch.setattr(_launch, "INTERPRET", False)
    tuned = _launch.tuned_num_warps(4, 8, 16, key=["BLOCK_COLS", "ROWS"], live_tiles=3)(_dummy_kernel())
    assert isinstance(tuned, triton.runtime.Autotuner)
    # Triton's own pruning call, as a launch makes it: positional args in nargs, constexprs as kwargs
    tuned.nargs = {"x_ptr": None}
    pruned = tuned.prune_configs({"BLOCK_COLS": block_cols, "ROWS": rows})
    assert [config.num_warps for config in pruned] == expected


@pytest.mark.parametrize("block_cols, rows, expected", [(8192, 1, 16), (1024, 4, 8), (64, 16, 4)])
def test_without_autotuning_the_first_offered(block_cols, rows, expected, monkeypatch):
    monkeypatch.setattr(_launch, "AUTOTUNE", False)
    tuned = _launch.tuned_num_warps(4, 8, 16, key=["BLOCK_COLS", "ROWS"], live_tiles=3)(_dummy_kernel())
    assert isinstance(tuned, triton.runtime.Heuristics)
    assert tuned.values["num_warps"]({"x_ptr": None, "BLOCK_COLS": block_cols, "ROWS": rows}) == expected
