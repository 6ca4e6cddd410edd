"""The CUDA C++ kernels (kernels/*.cu) run on the CPU, under the emulator of
tests/cpp/cuda_emu (see tests/emulated_cuda.py), against the float64 reference: every
kernel shape (warp and block tiles, the loop and block-per-row kernels, long rows held
packed in registers, the long-row split), every dtype, misaligned and strided rows,
special values, deterministic parameter gradients. Built with AddressSanitizer and UBSan,
and every vector access's alignment checked (FASTDL_CHECK_ALIGNED, kernels/common/types.cuh),
so a read or write past a buffer, a misaligned 16-byte access or a barrier some threads
skip fails the test.

This is not the GPU: timing, the memory model and the compiler's device code are not
emulated (device math is the host's libm). The GPU tests (tests/test_softmax.py and
tests/test_layer_norm.py on CUDA tensors) run the same kernels on the H100.
The emulated device has FASTDL_EMU_SMS = 4 SMs, so small inputs reach the paths that
large ones reach on 132 SMs (the split of few long rows, several rows a backward block).
"""
import math
import platform
from pathlib import Path

import pytest
import torch

import emulated_cuda
from fastdl import reference as R
from fastdl.bench.tune import CUDA_TILE_KERNELS as TILE_KERNELS
from conftest import (ON_CI, TOLERANCE, assert_close, assert_norm_nans_as_torchs, hard_statistics_rows,
                      nonfinite_rows)

ROOT = Path(__file__).resolve().parents[1]
# with a GPU the kernels themselves run (tests/test_softmax.py, tests/test_layer_norm.py)
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels themselves")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.fixture(scope="module")
def runner():
    why = emulated_cuda.missing_tools()
    if why:
        if ON_CI:
            pytest.fail(f"the CUDA emulator cannot be built on the CI machine: {why}")
        pytest.skip(why)
    return emulated_cuda.build(ROOT / "build" / "cuda-emu")


def _run(runner, tmp_path, op, inputs, outputs, settings, offsets=None, env=None):
    # the threads' order between barriers: another per test (conftest seeds torch per test id).
    # The kernels the tests name, unless a test's env says otherwise: the tiles, and the tiles' own
    # parameter-gradient sums (TILE_KERNELS; test_cuda_defaults_for_16_bit_rows runs the launchers'
    # defaults: a test that wants them gives these keys None).
    env = {"FASTDL_EMU_SEED": str(torch.initial_seed() % 2**32), **TILE_KERNELS, **(env or {})}
    env = {key: value for key, value in env.items() if value is not None}
    result = emulated_cuda.run(runner, op, tmp_path, inputs, outputs, settings, offsets, env)
    assert result.returncode == 0, f"{op} failed (exit {result.returncode}):\n{result.stderr[-6000:]}"
    return result


def _rows(rows, cols, dtype, layout, scale=3.0):
    """A (rows, cols) input laid out as `layout`: contiguous, strided (row stride cols + 3:
    rows off 16-byte boundaries), padded (row stride a whole number of 16-byte vectors past
    cols: aligned, not contiguous, when cols is a whole number of vectors), vector rows (row
    stride cols rounded up to 16 elements: every row on a 16-byte boundary, whatever cols) or
    offset (contiguous, base one element off)."""
    if layout == "strided":
        return (torch.randn(rows, cols + 3) * scale).to(dtype)[:, :cols], 0
    if layout == "padded":
        return (torch.randn(rows, cols + 16) * scale).to(dtype)[:, :cols], 0
    if layout == "vector rows":
        return (torch.randn(rows, -(-cols // 16) * 16) * scale).to(dtype)[:, :cols], 0
    return (torch.randn(rows, cols) * scale).to(dtype), 1 if layout == "offset" else 0


def _kernels(result):
    return [line.split(" grid=")[0].split("<")[0] for line in result.launches]


# ---------------------------------------------------------------------------------
# softmax
# ---------------------------------------------------------------------------------
# (rows, cols): warp tiles with a partial last block, 128- and 512-thread tiles, the largest
# tile (fp64: the block kernel), and long rows: split on 4 SMs (3 rows < 16 blocks wanted)
# blocks the split aims for on the emulated device: 4 SMs x 4 resident 512-thread blocks
EMU_SPLIT_TARGET = 4 * (2048 // 512)
SOFTMAX_SHAPES = [(5, 1), (9, 37), (3, 1000), (2, 5000), (1, 16384), (3, 20000)]


def _softmax_forward(runner, tmp_path, x, offset, log, workspace="full", env=None, out_dtype=None):
    rows, cols = x.shape
    out_dtype = out_dtype or x.dtype
    result = _run(runner, tmp_path, "softmax_forward", {"x": x}, {"y": (out_dtype, rows * cols)},
                  {"dtype": emulated_cuda.DTYPE_NAMES[x.dtype], "rows": rows, "cols": cols, "x_stride": x.stride(0),
                   "log": log, "workspace": workspace, "out_dtype": emulated_cuda.DTYPE_NAMES[out_dtype]},
                  offsets={"x": offset}, env=env)
    return result.outputs["y"].view(rows, cols), result


def _softmax_backward(runner, tmp_path, dy, y, log, offsets=None, env=None, dx_dtype=None):
    rows, cols = y.shape
    dx_dtype = dx_dtype or y.dtype
    result = _run(runner, tmp_path, "softmax_backward", {"dy": dy, "y": y}, {"dx": (dx_dtype, rows * cols)},
                  {"dtype": emulated_cuda.DTYPE_NAMES[y.dtype], "rows": rows, "cols": cols, "dy_stride": dy.stride(0),
                   "y_stride": y.stride(0), "log": log, "dx_dtype": emulated_cuda.DTYPE_NAMES[dx_dtype]},
                  offsets=offsets, env=env)
    return result.outputs["dx"].view(rows, cols), result


def _softmax_ref(x, log):
    x = x.double()
    return torch.log_softmax(x, -1) if log else torch.softmax(x, -1)


def _expected_kernels(dtype, cols, split):
    tile_max = 8192 if dtype == torch.float64 else 16384
    if cols <= tile_max:
        return "tile"
    return "chunk" if split else "block"


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_forward_and_backward(runner, tmp_path, dtype, shape, log):
    rows, cols = shape
    x, _ = _rows(rows, cols, dtype, "contiguous")
    y, result = _softmax_forward(runner, tmp_path / "fwd", x, 0, log)
    ref = _softmax_ref(x, log)
    assert_close(y, ref, dtype, "forward")
    kind = _expected_kernels(dtype, cols, split=rows < EMU_SPLIT_TARGET)
    assert all(kind in k for k in _kernels(result)), result.launches

    dy = torch.randn(rows, cols).to(dtype)
    y_in = ref.to(dtype)
    dx, out = _softmax_backward(runner, tmp_path / "bwd", dy, y_in, log)
    assert_close(dx, R.softmax_backward(dy.double(), y_in.double(), -1, log), dtype, "backward")
    assert all(kind in k for k in _kernels(out)), out.launches


@pytest.mark.parametrize("layout", ["strided", "padded", "offset"])
@pytest.mark.parametrize("cols", [37, 1000, 5000, 20000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softmax_row_layouts(runner, tmp_path, dtype, cols, layout):
    """Rows off 16-byte boundaries take the scalar paths, padded rows the vector ones;
    strided gradients and outputs in the backward too."""
    rows = 3
    x, offset = _rows(rows, cols, dtype, layout)
    for log in (False, True):
        y, _ = _softmax_forward(runner, tmp_path / f"fwd{log}", x, offset, log)
        assert_close(y, _softmax_ref(x, log), dtype, f"forward log={log}")
        dy, dy_offset = _rows(rows, cols, dtype, layout, scale=1.0)
        y_in, y_offset = _rows(rows, cols, dtype, layout)
        y_in.copy_(_softmax_ref(x, log))
        dx, _ = _softmax_backward(runner, tmp_path / f"bwd{log}", dy, y_in, log,
                                  offsets={"dy": dy_offset, "y": y_offset})
        assert_close(dx, R.softmax_backward(dy.double(), y_in.double(), -1, log), dtype, f"backward log={log}")


@pytest.mark.parametrize("layout", ["contiguous", "offset"])
@pytest.mark.parametrize("rows,cols", [(5, 37), (3, 1000), (1, 16384), (2, 20000), (EMU_SPLIT_TARGET, 40000)],
                         ids=["warp", "tile", "largest-tile", "split", "block"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_softmax_of_16_bit_x_in_fp32(runner, tmp_path, dtype, rows, cols, layout):
    """y written in fp32 from a 16-bit x (the cast of torch.softmax(x, dtype=float32) and of
    CUDA autocast fused), and the backward from fp32 dy and y with dx in x's dtype: as right
    as the fp32 kernels (y unrounded: fp32 tolerance), through the tile, split and block
    kernels (never the packed ones), aligned rows and rows one element off (the kernels that
    walk rows in steps then go an element at a time). Any other pair of dtypes is refused."""
    x, offset = _rows(rows, cols, dtype, layout)
    kind = _expected_kernels(dtype, cols, split=rows < EMU_SPLIT_TARGET)
    for log in (False, True):
        y, result = _softmax_forward(runner, tmp_path / f"fwd{log}", x, offset, log, out_dtype=torch.float32)
        assert y.dtype == torch.float32
        assert_close(y, _softmax_ref(x, log), torch.float32, f"forward log={log}")
        assert all(kind in k for k in _kernels(result)), result.launches
        dy = torch.randn(rows, cols)
        # dy and y also 16 bytes past a 32-byte boundary: 16-byte aligned, but a vector of 8
        # floats (one of dx's 16-byte vectors) then starts mid-way; the rows are cut by dx's
        for shift in (0, 4):
            dx, back = _softmax_backward(runner, tmp_path / f"bwd{log}{shift}", dy, y, log, dx_dtype=dtype,
                                         offsets={"dy": shift, "y": shift})
            assert dx.dtype == dtype
            assert_close(dx, R.softmax_backward(dy.double(), y.double(), -1, log), dtype, f"backward log={log}")
            assert all(kind in k for k in _kernels(back)), back.launches
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(AssertionError, match="cudaErrorInvalidValue"):
        _softmax_forward(runner, tmp_path / "other", x, offset, False, out_dtype=other)
    with pytest.raises(AssertionError, match="cudaErrorInvalidValue"):
        _softmax_backward(runner, tmp_path / "other_bwd", torch.randn(rows, cols).double(),
                          torch.rand(rows, cols).double(), False, dx_dtype=dtype)


@pytest.mark.parametrize("how", ["split_off", "no_workspace", "short_workspace", "many_chunks"])
def test_softmax_long_rows_every_way(runner, tmp_path, how):
    """The long-row split off (FASTDL_CUDA_SPLIT_PER_SM=0), the workspace missing or a byte
    short (one block a row instead), and as many chunks as the row has steps. The packed
    forward, which would take these rows unsplit, left out (FASTDL_CUDA_PACKED_ROWS=0)."""
    rows, cols, dtype = 2, 3 * 4096 * 2 + 5, torch.float32  # 6 whole steps and a partial one
    x, _ = _rows(rows, cols, dtype, "contiguous")
    env = {"FASTDL_CUDA_SPLIT_PER_SM": {"split_off": "0", "many_chunks": "100000"}.get(how, "4"),
           "FASTDL_CUDA_PACKED_ROWS": "0"}
    workspace = {"no_workspace": "none", "short_workspace": "short"}.get(how, "full")
    y, result = _softmax_forward(runner, tmp_path, x, 0, False, workspace=workspace, env=env)
    assert_close(y, _softmax_ref(x, False), dtype)
    kinds = _kernels(result)
    if how == "many_chunks":
        assert kinds[0] == "softmax_forward_chunk_stats_kernel" and "grid=(7,2,1)" in result.launches[0], kinds
    else:
        assert kinds == ["softmax_forward_block_kernel"], kinds


def _packed(dtype, cols, log):
    """Whether aligned rows of `cols` go to the packed kernels (kernels/softmax.cu): up to 32
    values a thread of 1024, 64 for 16-bit softmax."""
    return cols <= 32768 or (dtype != torch.float32 and not log)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("cols", [20000, 40000, 20001, 40001, 50257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_softmax_packed_rows(runner, tmp_path, dtype, cols, log):
    """Long rows, enough of them not to be split, held in registers as they are (the packed
    kernel): up to 32 values a thread (32768 columns), 64 for 16-bit softmax; longer ones the
    block kernel. Aligned rows, and contiguous rows of an odd length (each row but the first
    off a 16-byte boundary by its own amount: every head and tail length over the rows), whose
    ragged columns a thread each holds beside the vectors. Special values (_special_rows) in
    the first rows; and the same rows through the block kernel with FASTDL_CUDA_PACKED_ROWS=0,
    as right."""
    rows = EMU_SPLIT_TARGET  # as many rows as the split aims for: none split
    x = torch.cat([_special_rows(cols, dtype), _rows(rows - 10, cols, dtype, "contiguous")[0]])
    expected = (torch.log_softmax if log else torch.softmax)(x.double(), -1).to(dtype).double()
    packed = _packed(dtype, cols, log)
    for env, kernel in (({}, "softmax_forward_packed_kernel" if packed else "softmax_forward_block_kernel"),
                        ({"FASTDL_CUDA_PACKED_ROWS": "0"}, "softmax_forward_block_kernel")):
        y, result = _softmax_forward(runner, tmp_path / str(len(env)), x, 0, log, env=env)
        assert _kernels(result) == [kernel], result.launches
        assert torch.equal(y.isnan(), expected.isnan()), f"NaN where torch has none or none where it has ({env})"
        fin = ~expected.isnan()
        torch.testing.assert_close(y.double()[fin], expected[fin], rtol=TOLERANCE[dtype] * 10, atol=TOLERANCE[dtype])
        assert_close(y[10:], _softmax_ref(x[10:], log), dtype, f"random rows ({env})")


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("cols", [2049, 4096, 8200, 12001, 16384])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_softmax_packed_tiles(runner, tmp_path, dtype, cols, log):
    """FASTDL_CUDA_PACKED_TILES=1: the forward of rows of the tiles' lengths from 2049 columns by
    the packed kernel, in blocks of the fewest of 128, 256 and 512 threads whose 32 values each
    hold the row. Aligned rows, and contiguous rows of an odd length (each off a 16-byte boundary
    by its own amount, the ragged columns held beside the vectors); special values in the first
    rows. Rows whose input and output are off by different amounts take the tile kernel."""
    env = {"FASTDL_CUDA_PACKED_TILES": "1"}
    x = torch.cat([_special_rows(cols, dtype), _rows(6, cols, dtype, "contiguous")[0]])
    expected = (torch.log_softmax if log else torch.softmax)(x.double(), -1).to(dtype).double()
    y, result = _softmax_forward(runner, tmp_path / "packed", x, 0, log, env=env)
    threads = next(t for t in (128, 256, 512) if t * 32 >= cols)
    assert _kernels(result) == ["softmax_forward_packed_kernel"], result.launches
    assert _block_threads(result) == [threads], result.launches
    assert torch.equal(y.isnan(), expected.isnan()), "NaN where torch has none or none where it has"
    fin = ~expected.isnan()
    torch.testing.assert_close(y.double()[fin], expected[fin], rtol=TOLERANCE[dtype] * 10, atol=TOLERANCE[dtype])
    assert_close(y[10:], _softmax_ref(x[10:], log), dtype, "random rows")
    strided, _ = _rows(3, cols, dtype, "strided")  # row stride cols + 3, y's cols: off by other amounts
    y, result = _softmax_forward(runner, tmp_path / "strided", strided, 0, log, env=env)
    assert _kernels(result) == ["softmax_forward_tile_kernel"], result.launches
    assert_close(y, _softmax_ref(strided, log), dtype, "strided rows")


def _edge_heavy_backward_inputs(rows, cols, dtype, log):
    """(dy, y) of contiguous (rows, cols) rows whose first and last columns carry most of the
    row's dot product (softmax: y's mass there; log_softmax: dy's sum): in rows off a 16-byte
    boundary these are ragged columns, so a kernel that drops them from the dot product misses
    by far more than the tolerance, where random rows would hide the loss of a few terms."""
    x, _ = _rows(rows, cols, dtype, "contiguous")
    x[:, [0, -1]] += 20
    dy, _ = _rows(rows, cols, dtype, "contiguous", scale=1.0)
    dy[:, [0, -1]] = torch.tensor([300.0, -200.0]).to(dtype)
    return dy, _softmax_ref(x, log).to(dtype)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("cols", [2056, 4096, 8200, 12008, 16384])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_softmax_backward_packed_tiles(runner, tmp_path, dtype, cols, log):
    """FASTDL_CUDA_PACKED_TILES=1: the backward of rows of the tiles' lengths from 2049 columns
    by the packed kernel (y held for softmax, dy for log_softmax), in blocks of the fewest of
    128, 256 and 512 threads whose 32 values each hold the row; against float64. Aligned rows,
    and contiguous rows of an odd width (after the first, each off a 16-byte boundary by its
    own amount, dy, y and dx alike: the ragged columns held beside); rows whose dy is off by
    other amounts than y's and dx's take the tile kernel."""
    env = {"FASTDL_CUDA_PACKED_TILES": "1"}
    threads = next(t for t in (128, 256, 512) if t * 32 >= cols)
    for width in (cols, cols - 1):
        dy, y = _edge_heavy_backward_inputs(7, width, dtype, log)
        dx, result = _softmax_backward(runner, tmp_path / str(width), dy, y, log, env=env)
        assert _kernels(result) == ["softmax_backward_packed_kernel"], result.launches
        assert _block_threads(result) == [threads], result.launches
        assert_close(dx, R.softmax_backward(dy.double(), y.double(), -1, log), dtype, f"dx, {width} columns")
    strided_dy, _ = _rows(3, cols, dtype, "strided", scale=1.0)  # row stride cols + 3: off by other amounts
    y = _softmax_ref(_rows(3, cols, dtype, "contiguous")[0], log).to(dtype)
    dx, result = _softmax_backward(runner, tmp_path / "strided", strided_dy, y, log, env=env)
    assert _kernels(result) == ["softmax_backward_tile_kernel"], result.launches
    assert_close(dx, R.softmax_backward(strided_dy.double(), y.double(), -1, log), dtype, "dx of strided dy")


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("cols", [20000, 40000, 20001, 40001, 50257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_softmax_backward_packed_rows(runner, tmp_path, dtype, cols, log):
    """The packed backward (y held for softmax, dy for log_softmax; the other input read a
    pack at a time) on the rows the packed forward takes; longer ones the block kernel.
    Aligned rows, and contiguous rows of an odd length (each row but the first off a 16-byte
    boundary by its own amount, dy, y and dx alike: every head and tail length over the rows),
    whose ragged columns a thread each holds. Against float64, and as right as the block
    kernel with FASTDL_CUDA_PACKED_ROWS=0."""
    rows = EMU_SPLIT_TARGET  # as many rows as the split aims for: none split
    dy, y = _edge_heavy_backward_inputs(rows, cols, dtype, log)
    expected = R.softmax_backward(dy.double(), y.double(), -1, log)
    packed = _packed(dtype, cols, log)
    for env, kernel in (({}, "softmax_backward_packed_kernel" if packed else "softmax_backward_block_kernel"),
                        ({"FASTDL_CUDA_PACKED_ROWS": "0"}, "softmax_backward_block_kernel")):
        dx, result = _softmax_backward(runner, tmp_path / str(len(env)), dy, y, log, env=env)
        assert _kernels(result) == [kernel], result.launches
        assert_close(dx, expected, dtype, f"dx ({env})")


@pytest.mark.parametrize("blocks_per_sm, grid", [("1", 4), ("2", 8), ("3", 11), ("0", 11)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softmax_block_kernels_walk_rows(runner, tmp_path, dtype, blocks_per_sm, grid):
    """FASTDL_CUDA_LOOP_BLOCKS_PER_SM: the block kernels in a block a row (0), or at most K blocks
    an SM (the emulated device's 4), each walking rows blockIdx.x, + gridDim.x, ...: 11 rows of
    an odd width (off 16-byte boundaries alike), forward and backward, softmax and log_softmax,
    against float64; a row walked twice or skipped fails (outputs poisoned)."""
    env = {"FASTDL_CUDA_SPLIT_PER_SM": "0", "FASTDL_CUDA_PACKED_ROWS": "0",
           "FASTDL_CUDA_LOOP_BLOCKS_PER_SM": blocks_per_sm}
    x, _ = _rows(11, 20001, dtype, "contiguous")
    for log in (False, True):
        y, result = _softmax_forward(runner, tmp_path / f"fwd{log}", x, 0, log, env=env)
        assert _kernels(result) == ["softmax_forward_block_kernel"] and f"grid=({grid},1,1)" in result.launches[0]
        assert_close(y, _softmax_ref(x, log), dtype, f"forward log={log}")
        dy, y_in = _edge_heavy_backward_inputs(11, 20001, dtype, log)
        dx, result = _softmax_backward(runner, tmp_path / f"bwd{log}", dy, y_in, log, env=env)
        assert _kernels(result) == ["softmax_backward_block_kernel"] and f"grid=({grid},1,1)" in result.launches[0]
        assert_close(dx, R.softmax_backward(dy.double(), y_in.double(), -1, log), dtype, f"backward log={log}")


SOFTMAX_LONG_ROW_WAYS = {"block": {"FASTDL_CUDA_SPLIT_PER_SM": "0", "FASTDL_CUDA_PACKED_ROWS": "0"},
                         "packed": {"FASTDL_CUDA_SPLIT_PER_SM": "0"}, "split": None}


@pytest.mark.parametrize("layout", ["contiguous", "padded"])
@pytest.mark.parametrize("way", SOFTMAX_LONG_ROW_WAYS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_rows_equally_off_16_byte_boundaries(runner, tmp_path, dtype, way, layout):
    """Rows of an odd length (20001 columns: as with a 50257-wide vocabulary, rows after the
    first start off a 16-byte boundary, input and output rows by the same amount): the block
    and split kernels cut every row into a ragged head, whole vectors and a ragged tail; the
    packed kernels hold the whole vectors and give each ragged column to a thread. A vector
    access off a boundary fails the emulator's alignment check; a column missed or taken twice,
    here (padded rows too: x's row stride 16 elements past cols, so its rows and y's are off
    alike)."""
    rows, cols = 3, 20001
    env = SOFTMAX_LONG_ROW_WAYS[way]
    x, _ = _rows(rows, cols, dtype, layout)
    packed_forward = way == "packed" and dtype != torch.float64
    for log in (False, True):
        y, result = _softmax_forward(runner, tmp_path / f"fwd{log}", x, 0, log, env=env)
        assert_close(y, _softmax_ref(x, log), dtype, f"forward log={log}")
        kind = "chunk" if way == "split" else "packed" if packed_forward else "block"
        assert all(kind in k for k in _kernels(result)), result.launches
        dy, _ = _rows(rows, cols, dtype, layout, scale=1.0)
        y_in, _ = _rows(rows, cols, dtype, layout)
        y_in.copy_(_softmax_ref(x, log))
        dx, out = _softmax_backward(runner, tmp_path / f"bwd{log}", dy, y_in, log, env=env)
        assert_close(dx, R.softmax_backward(dy.double(), y_in.double(), -1, log), dtype, f"backward log={log}")
        assert all(kind in k for k in _kernels(out)), out.launches


# one row length in each tile the shape sweeps above leave out: a warp x 16, 128 x 16, 512 x 8
TILE_EDGE_COLS = [300, 1500, 3000]


@pytest.mark.parametrize("cols", TILE_EDGE_COLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_softmax_remaining_tiles(runner, tmp_path, dtype, cols):
    rows = 5
    x, _ = _rows(rows, cols, dtype, "contiguous")
    for log in (False, True):
        y, result = _softmax_forward(runner, tmp_path / str(log), x, 0, log)
        assert_close(y, _softmax_ref(x, log), dtype, f"log={log}")
        assert _kernels(result) == ["softmax_forward_tile_kernel"]


def _block_threads(result):
    """Threads a block of each launch: a warp tile's blocks hold 4 rows of 32 threads."""
    return [int(line.split(" block=(")[1].split(",")[0]) for line in result.launches]


# FASTDL_CUDA_TILE_ELEMS: (dtype, cols, values a thread before more threads) -> a block's
# threads (row_tile.cuh with_row_tile): the fewest threads whose tile holds the row with at
# most that many values a thread; rows past those, more values a thread. 900 columns at 32
# a thread are a warp's (blocks of 4 warps); fp64 holds at most 16 values a thread.
SOFTMAX_TILE_KNOB = [(torch.float32, 900, 32, 128), (torch.float32, 3000, 8, 512), (torch.float32, 3000, 16, 256),
                     (torch.float32, 3000, 32, 128), (torch.float32, 12000, 8, 1024), (torch.float32, 12000, 32, 512),
                     (torch.bfloat16, 3000, 16, 256), (torch.float64, 3000, 32, 256), (torch.float64, 8000, 8, 512)]


@pytest.mark.parametrize("dtype, cols, elems, threads", SOFTMAX_TILE_KNOB,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_softmax_tile_elems_knob(runner, tmp_path, dtype, cols, elems, threads):
    """Every tile the tuner's knob can pick (256 threads, 32 values a thread) is right,
    forward and backward, and it is the tile the rule says."""
    rows = 5
    env = {"FASTDL_CUDA_TILE_ELEMS": str(elems)}
    x, _ = _rows(rows, cols, dtype, "contiguous")
    y, result = _softmax_forward(runner, tmp_path / "fwd", x, 0, False, env=env)
    assert_close(y, _softmax_ref(x, False), dtype)
    assert _kernels(result) == ["softmax_forward_tile_kernel"] and _block_threads(result) == [threads], result.launches
    y = _softmax_ref(x, False).to(dtype)
    dy = torch.randn(rows, cols).to(dtype)
    dx, result = _softmax_backward(runner, tmp_path / "bwd", dy, y, False, env=env)
    expected = R.softmax_backward(dy.double(), y.double(), -1, False)
    assert_close(dx, expected, dtype)
    assert _block_threads(result) == [threads], result.launches


def _special_rows(cols, dtype):
    """Rows of special values, each first in its row (and so first in a lane / a chunk):
    all -inf, -inf but one, NaN, NaN among -inf, huge magnitudes, +inf; and rows far from 0
    (all near -1000: exp(x) underflows, so only a max taken from the row itself is right;
    all near +1000)."""
    big = 6e4 if dtype == torch.float16 else 3e38
    x = torch.randn(10, cols, dtype=torch.float64)
    x[8] -= 1000
    x[9] += 1000
    x[0] = -math.inf
    x[1] = -math.inf
    x[1, cols // 2] = 1.0
    x[2, 0] = math.nan
    x[3] = -math.inf
    x[3, 0] = math.nan
    x[4, 0], x[4, -1] = big, -big
    x[5, :] *= big / 4
    x[6, cols // 3] = math.inf
    x[7, 0] = -math.inf
    return x.to(dtype)


@pytest.mark.parametrize("cols", [37, 20000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_special_values_match_torch(runner, tmp_path, dtype, cols):
    x = _special_rows(cols, dtype)
    for log in (False, True):
        # 10 rows < 16 blocks: the long rows are split (special values on chunk boundaries too)
        y, _ = _softmax_forward(runner, tmp_path / str(log), x, 0, log)
        # rounded to the dtype: a log_softmax under the dtype's range is -inf there, as in torch
        expected = (torch.log_softmax if log else torch.softmax)(x.double(), -1).to(dtype).double()
        assert torch.equal(y.isnan(), expected.isnan()), f"NaN where torch has none or none where it has (log={log})"
        fin = ~expected.isnan()
        torch.testing.assert_close(y.double()[fin], expected[fin], rtol=TOLERANCE[dtype] * 10,
                                   atol=TOLERANCE[dtype])


# ---------------------------------------------------------------------------------
# layer norm, rms norm, fused add
# ---------------------------------------------------------------------------------
# name -> (residual, weight, bias, rms)
NORM_VARIANTS = {
    "layer_norm": (False, True, True, False),
    "layer_norm_plain": (False, False, False, False),
    "rms_norm": (False, True, False, True),
    "add_layer_norm": (True, True, True, False),
    "add_rms_norm_plain": (True, False, False, True),
}
# the issue's hidden sizes; rows such that warp tiles share blocks, and a loop-kernel row
NORM_SHAPES = [(3, 1), (5, 7), (9, 768), (3, 1000), (2, 4096), (3, 8193), (2, 20000)]


def _norm_inputs(shape, dtype, variant, layout="contiguous"):
    has_res, has_w, has_b, _ = NORM_VARIANTS[variant]
    rows, cols = shape
    x, x_offset = _rows(rows, cols, dtype, layout, scale=2.0)
    x += 0.5
    inputs, offsets = {"x": x}, {"x": x_offset}
    if has_res:
        inputs["residual"], offsets["residual"] = _rows(rows, cols, dtype, layout, scale=1.0)
    if has_w:
        inputs["weight"] = torch.rand(cols, dtype=_acc(dtype)) + 0.5
    if has_b:
        inputs["bias"] = torch.randn(cols, dtype=_acc(dtype))
    return inputs, offsets


def _norm_reference(inputs, rms, eps):
    h = inputs["x"].double()
    if "residual" in inputs:
        h = (inputs["x"] + inputs["residual"]).double()  # the add rounds to the dtype, as unfused
    mean = torch.zeros(h.shape[0], dtype=torch.float64) if rms else h.mean(-1)
    centred = h - mean[:, None]
    rstd = torch.rsqrt((centred * centred).mean(-1) + eps)
    weight, bias = (inputs[k].double() if k in inputs else None for k in ("weight", "bias"))
    y = R.rms_norm(h, h.shape[-1], weight, eps) if rms else R.layer_norm(h, h.shape[-1], weight, bias, eps)
    return h, y, mean, rstd


def _norm_forward(runner, tmp_path, inputs, offsets, rms, eps=1e-5, param_dtype=None, env=None, out_dtype=None):
    """param_dtype: weight / bias's dtype as the launcher is told (default the accumulation
    type); out_dtype: y's (default x's)."""
    x = inputs["x"]
    rows, cols = x.shape
    dtype, acc = x.dtype, _acc(x.dtype)
    outputs = {"y": (out_dtype or dtype, rows * cols), "rstd": (acc, rows)}
    if not rms:
        outputs["mean"] = (acc, rows)
    residual_dtype = inputs["residual"].dtype if "residual" in inputs else dtype
    if "residual" in inputs:
        outputs["sum"] = (residual_dtype, rows * cols)  # the sum in the residual's dtype (x's, or fp32 beside it)
    settings = {"dtype": emulated_cuda.DTYPE_NAMES[dtype], "rows": rows, "cols": cols, "x_stride": x.stride(0),
                "residual_stride": inputs["residual"].stride(0) if "residual" in inputs else 0, "eps": repr(eps),
                "rms": rms, "param_dtype": emulated_cuda.DTYPE_NAMES[param_dtype or acc],
                "out_dtype": emulated_cuda.DTYPE_NAMES[out_dtype or dtype],
                "residual_dtype": emulated_cuda.DTYPE_NAMES[residual_dtype]}
    return _run(runner, tmp_path, "norm_forward", inputs, outputs, settings, offsets, env=env)


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", NORM_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_forward(runner, tmp_path, dtype, variant, shape):
    rms = NORM_VARIANTS[variant][3]
    inputs, offsets = _norm_inputs(shape, dtype, variant)
    result = _norm_forward(runner, tmp_path, inputs, offsets, rms)
    rows, cols = shape
    h, y, mean, rstd = _norm_reference(inputs, rms, 1e-5)
    assert_close(result.outputs["y"].view(rows, cols), y, dtype, "y")
    assert_close(result.outputs["rstd"], rstd, _acc(dtype), "rstd")
    if not rms:
        assert_close(result.outputs["mean"], mean, _acc(dtype), "mean")
    if "residual" in inputs:
        assert torch.equal(result.outputs["sum"].view(rows, cols), inputs["x"] + inputs["residual"]), "x + residual"
    tile_max = 8192 if dtype == torch.float64 else 16384
    assert _kernels(result) == ["norm_forward_tile_kernel" if cols <= tile_max else "norm_forward_loop_kernel"]


def _norm_backward(runner, tmp_path, inputs, rms, env=None, dy=None, dsum=None, param_dtype=None, dy_dtype=None,
                   dx_narrow_dtype=None):
    """dx (+ dsum), dweight, dbias of the norm of inputs["x"] (+ residual) for dy (random
    unless given, in dy_dtype: default x's), from the kernels and from float64 autograd of
    the reference. param_dtype: weight's, dweight's and dbias's dtype as the launcher is
    told (default the accumulation type). dx_narrow_dtype: dx also asked for rounded to it
    (the output dx_narrow)."""
    x = inputs["x"]
    rows, cols = x.shape
    dtype, acc = x.dtype, _acc(x.dtype)
    param_dtype = param_dtype or acc
    h, _, mean, rstd = _norm_reference(inputs, rms, 1e-5)
    h_in = h.to(dtype)  # the backward reads the normalised input (x + residual when fused)
    dy = torch.randn(rows, cols).to(dy_dtype or dtype) if dy is None else dy
    kernel_inputs = {"dy": dy, "x": h_in, "rstd": rstd.to(acc)}
    if not rms:
        kernel_inputs["mean"] = mean.to(acc)
    if "weight" in inputs:
        kernel_inputs["weight"] = inputs["weight"]
    if "residual" in inputs:
        kernel_inputs["dsum"] = torch.randn(rows, cols).to(dtype) if dsum is None else dsum
    outputs = {"dx": (dtype, rows * cols)}
    if "weight" in inputs:
        outputs["dweight"] = (param_dtype, cols)
    if "bias" in inputs:
        outputs["dbias"] = (param_dtype, cols)
    settings = {"dtype": emulated_cuda.DTYPE_NAMES[dtype], "rows": rows, "cols": cols, "dy_stride": dy.stride(0),
                "dsum_stride": cols, "x_stride": h_in.stride(0), "rms": rms,
                "param_dtype": emulated_cuda.DTYPE_NAMES[param_dtype], "dy_dtype": emulated_cuda.DTYPE_NAMES[dy.dtype]}
    if dx_narrow_dtype is not None:
        outputs["dx_narrow"] = (dx_narrow_dtype, rows * cols)
        settings["dx_narrow_dtype"] = emulated_cuda.DTYPE_NAMES[dx_narrow_dtype]
    result = _run(runner, tmp_path, "norm_backward", kernel_inputs, outputs, settings, env=env)

    h64 = h_in.double().requires_grad_()
    params = {name: inputs[key].double().requires_grad_() for name, key in (("dweight", "weight"), ("dbias", "bias"))
              if key in inputs}
    weight, bias = params.get("dweight"), params.get("dbias")
    y = R.rms_norm(h64, cols, weight, 1e-5) if rms else R.layer_norm(h64, cols, weight, bias, 1e-5)
    grads = dict(zip(["dx", *params], torch.autograd.grad(y, [h64, *params.values()], dy.double())))
    if "dsum" in kernel_inputs:
        grads["dx"] = grads["dx"] + kernel_inputs["dsum"].double()
    return result, grads


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", NORM_VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_backward(runner, tmp_path, dtype, variant, shape):
    rows, cols = shape
    rms = NORM_VARIANTS[variant][3]
    inputs, _ = _norm_inputs(shape, dtype, variant)
    result, grads = _norm_backward(runner, tmp_path, inputs, rms)
    for name, ref in grads.items():
        assert_close(result.outputs[name].view(ref.shape), ref, dtype if name == "dx" else _acc(dtype), name)
    tile_max = 4096 if dtype == torch.float64 else 8192
    main = "norm_backward_tile_kernel" if cols <= tile_max else "norm_backward_loop_kernel"
    sums = ["sum_partial_rows_kernel"] if "weight" in inputs or "bias" in inputs else []  # one launch for both
    assert _kernels(result) == [main, *sums], result.launches


@pytest.mark.parametrize("variant", ["layer_norm", "add_rms_norm_plain"])
@pytest.mark.parametrize("dtype, cols", [(torch.bfloat16, 65536), (torch.float32, 65543)], ids=str)
def test_norm_hidden_65536_and_past(runner, tmp_path, dtype, cols, variant):
    """The issue's largest hidden size, 65536, and an odd one past it (rows after the first
    off 16-byte boundaries): the loop kernels forward and backward against float64."""
    rms = NORM_VARIANTS[variant][3]
    inputs, offsets = _norm_inputs((2, cols), dtype, variant)
    result = _norm_forward(runner, tmp_path / "forward", inputs, offsets, rms)
    _, y, _, rstd = _norm_reference(inputs, rms, 1e-5)
    assert _kernels(result) == ["norm_forward_loop_kernel"], result.launches
    assert_close(result.outputs["y"].view(2, cols), y, dtype, "y")
    assert_close(result.outputs["rstd"], rstd, _acc(dtype), "rstd")
    result, grads = _norm_backward(runner, tmp_path / "backward", inputs, rms)
    assert _kernels(result)[0] == "norm_backward_loop_kernel", result.launches
    for name, ref in grads.items():
        assert_close(result.outputs[name].view(ref.shape), ref, dtype if name == "dx" else _acc(dtype), name)


@pytest.mark.parametrize("variant", ["layer_norm", "add_rms_norm_plain"])
@pytest.mark.parametrize("cols", [7, 1000, 20000, 20001])
def test_norm_nonfinite_rows_are_nan(runner, tmp_path, cols, variant):
    """Rows holding NaN or +-inf give NaN where torch's norm does (layer_norm: the whole row;
    rms_norm: the non-finite column, the others 0), in the warp and block tiles and the loop
    kernel (vectors and single elements); the other values as torch's."""
    inputs, offsets = _norm_inputs((5, cols), torch.float32, variant)
    inputs["x"] = nonfinite_rows(cols)
    rms = NORM_VARIANTS[variant][3]
    result = _norm_forward(runner, tmp_path, inputs, offsets, rms)
    y = result.outputs["y"].view(5, cols)
    h = inputs["x"] + inputs["residual"] if "residual" in inputs else inputs["x"]
    assert_norm_nans_as_torchs(y, h, rms, inputs.get("weight"), inputs.get("bias"))


@pytest.mark.parametrize("variant", ["layer_norm", "add_layer_norm"])
@pytest.mark.parametrize("cols", [20000, 20001])  # 16-byte vectors, and one element at a time
def test_norm_forward_loop_statistics_of_hard_rows(runner, tmp_path, cols, variant):
    """The loop kernel's one-sweep mean and variance (Welford's, a vector at a time, the
    threads' states combined) as exact as fp32 allows on rows that break careless methods
    (conftest.hard_statistics_rows), each row against float64 on its own."""
    inputs, offsets = _norm_inputs((4, cols), torch.float32, variant)
    inputs["x"] = hard_statistics_rows(cols)
    if "residual" in inputs:
        inputs["residual"] = inputs["residual"] * 1e-3
    result = _norm_forward(runner, tmp_path, inputs, offsets, rms=False)
    assert _kernels(result) == ["norm_forward_loop_kernel"], result.launches
    _, y, mean, rstd = _norm_reference(inputs, False, 1e-5)
    for i in range(4):
        assert_close(result.outputs["y"].view(4, cols)[i], y[i], torch.float32, f"y row {i}")
    assert_close(result.outputs["mean"], mean, torch.float32, "mean")
    assert_close(result.outputs["rstd"], rstd, torch.float32, "rstd")


@pytest.mark.parametrize("blocks_per_sm, grid", [("1", 4), ("2", 8), ("3", 11), ("0", 11)])
@pytest.mark.parametrize("variant", ["layer_norm", "add_rms_norm_plain"])
@pytest.mark.parametrize("dtype, cols", [(torch.bfloat16, 16392), (torch.float32, 16389)], ids=str)
def test_norm_forward_loop_kernel_walks_rows(runner, tmp_path, dtype, cols, variant, blocks_per_sm, grid):
    """FASTDL_CUDA_LOOP_BLOCKS_PER_SM: the norm forward's loop kernel in a block a row (0), or at
    most K blocks an SM (the emulated device's 4), each walking rows blockIdx.x, + gridDim.x, ...:
    11 rows of whole vectors and of an odd width (one element at a time), plain and fused, against
    float64; a row walked twice or skipped fails (outputs poisoned)."""
    rms = NORM_VARIANTS[variant][3]
    inputs, offsets = _norm_inputs((11, cols), dtype, variant)
    env = {"FASTDL_CUDA_LOOP_BLOCKS_PER_SM": blocks_per_sm}
    result = _norm_forward(runner, tmp_path, inputs, offsets, rms, env=env)
    assert _kernels(result) == ["norm_forward_loop_kernel"] and f"grid=({grid},1,1)" in result.launches[0]
    _, y, mean, rstd = _norm_reference(inputs, rms, 1e-5)
    assert_close(result.outputs["y"].view(11, cols), y, dtype, "y")
    assert_close(result.outputs["rstd"], rstd, _acc(dtype), "rstd")
    if not rms:
        assert_close(result.outputs["mean"], mean, _acc(dtype), "mean")
    if "residual" in inputs:
        assert torch.equal(result.outputs["sum"].view(11, cols), inputs["x"] + inputs["residual"]), "x + residual"


@pytest.mark.parametrize("blocks_per_sm", ["1", "3", "4096"])
@pytest.mark.parametrize("cols", [7, 768, 20000])
def test_norm_parameter_gradients_deterministic(runner, tmp_path, cols, blocks_per_sm):
    """Right whatever the number of backward blocks (FASTDL_CUDA_NORM_BLOCKS_PER_SM on 4
    SMs; with 3 a SM some blocks get no rows and write zero partial rows), and bitwise the
    same when the threads run in another order."""
    rows = 13 if cols > 8192 else 37  # a loop-kernel block per row: fewer rows, still empty blocks at 3 a SM
    inputs, _ = _norm_inputs((rows, cols), torch.float32, "layer_norm")
    dy = torch.randn(rows, cols)
    env = {"FASTDL_CUDA_NORM_BLOCKS_PER_SM": blocks_per_sm}
    first, grads = _norm_backward(runner, tmp_path / "a", inputs, False, env={**env, "FASTDL_EMU_SEED": "1"}, dy=dy)
    for name, ref in grads.items():
        assert_close(first.outputs[name].view(ref.shape), ref, torch.float32, name)
    again, _ = _norm_backward(runner, tmp_path / "b", inputs, False, env={**env, "FASTDL_EMU_SEED": "2"}, dy=dy)
    for name in grads:
        assert torch.equal(first.outputs[name], again.outputs[name]), f"{name} differs between runs"


# FASTDL_CUDA_NORM_PARAM_KERNEL=1: the tile backward writes dx alone and norm_param_grad_kernel sums
# dweight / dbias over blocks of columns x blocks of rows; rows past the tiles keep the loop kernel.
PARAM_KERNEL = {"FASTDL_CUDA_NORM_PARAM_KERNEL": "1"}


def _param_row_blocks(rows, cols, dtype, per_sm=8, sms=4):
    """kernels/layer_norm.cu's param_row_blocks on the emulated device (4 SMs)."""
    width = 32 * (16 // dtype.itemsize)  # a warp of 16-byte vectors
    col_blocks = -(-cols // width)
    return max(1, min(-(-sms * per_sm // col_blocks), -(-rows // 8)))


def _param_kernel_launches(dtype, cols, params):
    """The kernels a backward launches with FASTDL_CUDA_NORM_PARAM_KERNEL=1, contiguous rows and
    dy in x's dtype (kernels/layer_norm.cu: uses_param_kernel and backward_typed)."""
    tile_max = 4096 if dtype == torch.float64 else 8192
    sixteen_bit = dtype.itemsize == 2
    sums = ["sum_partial_rows_kernel"] * params
    if cols > (16384 if sixteen_bit else tile_max):  # the loop kernel with its sums, as without the knob
        return ["norm_backward_loop_kernel"] + sums
    if sixteen_bit and cols % 8 == 0 and cols >= 2049:  # whole 16-byte vectors: held as they are
        dx = "norm_backward_packed_kernel"
    else:
        dx = "norm_backward_tile_kernel" if cols <= tile_max else "norm_backward_loop_kernel"
    return [dx] + ["norm_param_grad_kernel"] * params + sums


@pytest.mark.parametrize("cols", [7, 1001, 5000, 12001, 12008, 20000])
@pytest.mark.parametrize("variant", ["layer_norm", "rms_norm", "add_layer_norm", "layer_norm_plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_backward_param_kernel(runner, tmp_path, dtype, variant, cols):
    """dx from the tile kernel without its sums (a row a block or warp group), from the packed
    backward (16-bit rows of whole vectors, 2049-16384 columns) or from the loop kernel without
    its sums (16-bit rows past the tiles not of whole vectors), and dweight / dbias from
    norm_param_grad_kernel's row blocks (several, the last short; 7, 1001 and 12001 columns one
    element a lane, the others in 16-byte vectors, ragged in the last column block), against
    float64; rows past all of them take the loop kernel with its sums as before."""
    rows = 37 if cols <= 5000 else 9
    rms = NORM_VARIANTS[variant][3]
    inputs, _ = _norm_inputs((rows, cols), dtype, variant)
    result, grads = _norm_backward(runner, tmp_path, inputs, rms, env=PARAM_KERNEL)
    for name, ref in grads.items():
        assert_close(result.outputs[name].view(ref.shape), ref, dtype if name == "dx" else _acc(dtype), name)
    expected = _param_kernel_launches(dtype, cols, "weight" in inputs or "bias" in inputs)
    assert _kernels(result) == expected, result.launches
    if "norm_param_grad_kernel" in expected:
        sizes = dict(line.split() for line in result.stdout.splitlines() if line.startswith("partial_rows "))
        assert int(sizes["partial_rows"]) == _param_row_blocks(rows, cols, dtype), sizes


@pytest.mark.parametrize("cols", [2056, 8200, 16384])
@pytest.mark.parametrize("variant", ["layer_norm", "add_rms_norm_plain"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_norm_backward_packed_only_where_it_fits(runner, tmp_path, dtype, variant, cols):
    """The packed backward takes 16-bit rows of whole vectors with dy in x's dtype (128, 512 and
    512 threads here); dy in fp32 (the parameters in fp32 too) or rows off 16-byte boundaries
    take the tile kernel or, past it, the loop kernel, both without their sums."""
    rows = 5
    rms = NORM_VARIANTS[variant][3]
    inputs, _ = _norm_inputs((rows, cols), dtype, variant)
    packed, grads = _norm_backward(runner, tmp_path / "packed", inputs, rms, env=PARAM_KERNEL)
    for name, ref in grads.items():
        assert_close(packed.outputs[name].view(ref.shape), ref, dtype if name == "dx" else torch.float32, name)
    assert _kernels(packed)[0] == "norm_backward_packed_kernel", packed.launches
    threads = next(t for t in (128, 256, 512) if t * 32 >= cols)  # the fewest that hold the row, 32 values each
    assert _block_threads(packed)[0] == threads, packed.launches
    other = "norm_backward_tile_kernel" if cols <= 8192 else "norm_backward_loop_kernel"
    wide, grads = _norm_backward(runner, tmp_path / "wide", inputs, rms, env=PARAM_KERNEL, dy_dtype=torch.float32)
    for name, ref in grads.items():
        assert_close(wide.outputs[name].view(ref.shape), ref, dtype if name == "dx" else torch.float32, name)
    assert _kernels(wide)[0] == other, wide.launches


@pytest.mark.parametrize("blocks_per_sm", ["1", "3", "4096"])
@pytest.mark.parametrize("cols", [33, 768])
def test_norm_param_kernel_deterministic(runner, tmp_path, cols, blocks_per_sm):
    """The param kernel's row blocks as FASTDL_CUDA_NORM_BLOCKS_PER_SM sets them (1 a SM, a few,
    as many as there are rows over 8 warps): right, and bitwise the same when the emulated
    threads run in another order."""
    rows = 45
    inputs, _ = _norm_inputs((rows, cols), torch.float32, "layer_norm")
    dy = torch.randn(rows, cols)
    env = {**PARAM_KERNEL, "FASTDL_CUDA_NORM_BLOCKS_PER_SM": blocks_per_sm}
    first, grads = _norm_backward(runner, tmp_path / "a", inputs, False, env={**env, "FASTDL_EMU_SEED": "1"}, dy=dy)
    for name, ref in grads.items():
        assert_close(first.outputs[name].view(ref.shape), ref, torch.float32, name)
    sizes = dict(line.split() for line in first.stdout.splitlines() if line.startswith("partial_rows "))
    assert int(sizes["partial_rows"]) == _param_row_blocks(rows, cols, torch.float32, int(blocks_per_sm)), sizes
    again, _ = _norm_backward(runner, tmp_path / "b", inputs, False, env={**env, "FASTDL_EMU_SEED": "2"}, dy=dy)
    for name in grads:
        assert torch.equal(first.outputs[name], again.outputs[name]), f"{name} differs between runs"


def _shared_bytes(launch: str) -> int:
    return int(launch.split(" shared=")[1].split()[0]) if " shared=" in launch else 0


# norm_backward_loop_kernel keeps the dweight / dbias sums in shared memory when all of
# them fit in what a block may opt in to (less 1 KiB): setting -> the device's opt-in limit
# (None: never). 20000 fp32 columns: both sums on sm_90 (227 KiB), one sum in 96 KiB.
SHARED_SUMS_CASES = {
    "sm90": ({}, 232448),
    "96KiB": ({"FASTDL_EMU_SMEM_OPTIN": "98304"}, 98304),
    "off": ({"FASTDL_CUDA_NORM_SHARED_SUMS": "0"}, None),
}


@pytest.mark.parametrize("variant", ["rms_norm", "add_layer_norm", "layer_norm_plain"])
@pytest.mark.parametrize("case", SHARED_SUMS_CASES)
def test_norm_backward_shared_sums(runner, tmp_path, case, variant):
    """The loop kernel's parameter-gradient sums in shared memory or in the partial rows:
    right against float64 (dweight alone, both, neither), and bitwise the same gradients
    either way (as many blocks each way: the shared memory alone would leave fewer resident)."""
    env, optin = SHARED_SUMS_CASES[case]
    blocks = {"FASTDL_CUDA_NORM_BLOCKS_PER_SM": "1"}
    env = {**env, **blocks}
    rows, cols = 13, 20000
    inputs, _ = _norm_inputs((rows, cols), torch.float32, variant)
    rms = NORM_VARIANTS[variant][3]
    dy, dsum = torch.randn(rows, cols), torch.randn(rows, cols)
    result, grads = _norm_backward(runner, tmp_path / "a", inputs, rms, env=env, dy=dy, dsum=dsum)
    for name, ref in grads.items():
        assert_close(result.outputs[name].view(ref.shape), ref, torch.float32, name)
    sums = ("weight" in inputs) + ("bias" in inputs)
    held = cols if optin is not None and sums > 0 and 4 * sums * cols <= optin - 1024 else 0
    loop = result.launches[0]
    assert loop.startswith("norm_backward_loop_kernel") and "invalid" not in loop, result.launches
    assert _shared_bytes(loop) == held * 4 * sums, loop
    off, _ = _norm_backward(runner, tmp_path / "b", inputs, rms, env={"FASTDL_CUDA_NORM_SHARED_SUMS": "0", **blocks},
                            dy=dy, dsum=dsum)
    for name in grads:
        assert torch.equal(result.outputs[name], off.outputs[name]), f"{name} differs from the partial-row sums"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norm_backward_sizes_partial_rows_alike_every_call(runner, tmp_path, dtype):
    """A process's first norm backward splits the rows into as many partial rows as later
    calls do, so two runs sum dweight / dbias in the same order. At 8200 columns the loop
    kernel keeps both sums in 64 KiB of shared memory: past 48 KiB a kernel has no resident
    blocks until it opts in (the emulator answers the occupancy query as the driver does).
    The sizing asks every kernel variant the launch may pick as it would launch, opted in,
    whether or not it has been launched: the device's true blocks (here 2 an SM, by threads),
    not 1 an SM before some launch and more after. Each query is made once a process."""
    rows, cols = 13, 8200
    inputs, _ = _norm_inputs((rows, cols), dtype, "add_layer_norm")
    result, grads = _norm_backward(runner, tmp_path, inputs, False)
    for name, ref in grads.items():
        assert_close(result.outputs[name].view(ref.shape), ref, dtype if name == "dx" else torch.float32, name)
    shared = _shared_bytes(result.launches[0])
    assert shared > 48 * 1024, result.launches
    sizes = dict(line.split() for line in result.stdout.splitlines() if line.startswith(("partial_rows", "occupancy")))
    resident = min(2048 // 1024, (232448 + 1024) // (shared + 1024))  # 1024-thread blocks an SM of sm_90's
    assert int(sizes["partial_rows"]) == min(rows, 4 * resident), sizes
    assert sizes["partial_rows"] == sizes["partial_rows_after"], sizes
    assert int(sizes["occupancy_queries"]) > 0 and sizes["occupancy_queries_after"] == sizes["occupancy_queries"], sizes


@pytest.mark.parametrize("layout", ["strided", "padded", "offset"])
@pytest.mark.parametrize("cols", [7, 1000, 20000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norm_row_layouts(runner, tmp_path, dtype, cols, layout):
    """Fused add with strided or misaligned x and residual: scalar paths where rows are off
    16-byte boundaries, vector paths for padded rows."""
    rows = 3
    inputs, offsets = _norm_inputs((rows, cols), dtype, "add_layer_norm", layout)
    result = _norm_forward(runner, tmp_path, inputs, offsets, False)
    _, y, _, _ = _norm_reference(inputs, False, 1e-5)
    assert_close(result.outputs["y"].view(rows, cols), y, dtype, "y")
    assert torch.equal(result.outputs["sum"].view(rows, cols), inputs["x"] + inputs["residual"])


@pytest.mark.parametrize("cols", [*TILE_EDGE_COLS, 12000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norm_remaining_tiles(runner, tmp_path, dtype, cols):
    """Tiles NORM_SHAPES leaves out, and the forward's largest (1024 x 16: 12000 columns,
    where the backward loops)."""
    rows = 5
    inputs, offsets = _norm_inputs((rows, cols), dtype, "add_layer_norm")
    result = _norm_forward(runner, tmp_path / "fwd", inputs, offsets, False)
    _, y, _, _ = _norm_reference(inputs, False, 1e-5)
    assert_close(result.outputs["y"].view(rows, cols), y, dtype, "y")
    back, grads = _norm_backward(runner, tmp_path / "bwd", inputs, False)
    for name, ref in grads.items():
        assert_close(back.outputs[name].view(ref.shape), ref, dtype if name == "dx" else torch.float32, name)
    assert _kernels(back)[0] == ("norm_backward_loop_kernel" if cols > 8192 else "norm_backward_tile_kernel")


# FASTDL_CUDA_TILE_ELEMS as SOFTMAX_TILE_KNOB: (dtype, cols, values a thread) -> threads of
# the forward's and the backward's blocks (None: the backward's loop kernel). The backward's
# tiles stop at 512 x 16 (fp64 512 x 8); the forward's at 1024 x 16 or 512 x 32.
NORM_TILE_KNOB = [(torch.float32, 3000, 8, 512, 512), (torch.float32, 3000, 32, 128, 256),
                  (torch.float32, 12000, 32, 512, None), (torch.bfloat16, 3000, 16, 256, 256),
                  (torch.float64, 3000, 32, 128, 512)]


@pytest.mark.parametrize("dtype, cols, elems, forward_threads, backward_threads", NORM_TILE_KNOB,
                         ids=lambda v: str(v).replace("torch.", ""))
def test_norm_tile_elems_knob(runner, tmp_path, dtype, cols, elems, forward_threads, backward_threads):
    rows = 5
    env = {"FASTDL_CUDA_TILE_ELEMS": str(elems)}
    inputs, offsets = _norm_inputs((rows, cols), dtype, "add_layer_norm")
    result = _norm_forward(runner, tmp_path / "fwd", inputs, offsets, False, env=env)
    _, y, _, _ = _norm_reference(inputs, False, 1e-5)
    assert_close(result.outputs["y"].view(rows, cols), y, dtype, "y")
    assert _block_threads(result) == [forward_threads], result.launches
    back, grads = _norm_backward(runner, tmp_path / "bwd", inputs, False, env=env)
    for name, ref in grads.items():
        assert_close(back.outputs[name].view(ref.shape), ref, dtype if name == "dx" else _acc(dtype), name)
    if backward_threads is None:
        assert _kernels(back)[0] == "norm_backward_loop_kernel", back.launches
    else:
        assert _kernels(back)[0] == "norm_backward_tile_kernel", back.launches
        assert _block_threads(back)[0] == backward_threads, back.launches


@pytest.mark.parametrize("cols", [7, 1000, 4096, 20000])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_norm_parameters_in_the_input_dtype(runner, tmp_path, dtype, cols):
    """weight / bias in x's own 16-bit dtype (a bf16 model's parameters, read as they are):
    forward and backward as right as with fp32 parameters, tile and loop kernels, rows
    aligned and not, and dweight / dbias written in that dtype (summed in fp32, rounded
    once). Parameters in a third dtype are refused (cudaErrorInvalidValue)."""
    rows = 5
    inputs, offsets = _norm_inputs((rows, cols), dtype, "add_layer_norm")
    inputs["weight"], inputs["bias"] = inputs["weight"].to(dtype), inputs["bias"].to(dtype)
    result = _norm_forward(runner, tmp_path / "fwd", inputs, offsets, False, param_dtype=dtype)
    _, y, _, _ = _norm_reference(inputs, False, 1e-5)
    assert_close(result.outputs["y"].view(rows, cols), y, dtype, "y")
    back, grads = _norm_backward(runner, tmp_path / "bwd", inputs, False, param_dtype=dtype)
    for name, ref in grads.items():
        out = back.outputs[name]
        assert out.dtype == dtype, name
        assert_close(out.view(ref.shape), ref, dtype, name)
    other = torch.bfloat16 if dtype == torch.float16 else torch.float16
    with pytest.raises(AssertionError, match="cudaErrorInvalidValue"):
        _norm_forward(runner, tmp_path / "other", inputs, offsets, False, param_dtype=other)


PACKED_NORM = {"FASTDL_CUDA_PACKED_NORM": "1"}


@pytest.mark.parametrize("params", ["fp32", "x's dtype"])
@pytest.mark.parametrize("variant", ["layer_norm", "layer_norm_plain", "rms_norm"])
@pytest.mark.parametrize("cols, threads", [(2056, 128), (4096, 128), (4104, 256), (9000, 512), (16384, 512)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_norm_forward_packed(runner, tmp_path, dtype, cols, threads, variant, params):
    """FASTDL_CUDA_PACKED_NORM=1: aligned 16-bit rows of 2049-16384 columns without a residual
    are held as they are, 32 values a thread (norm_forward_packed_kernel): the block the rule
    says (128 threads up to 4096 columns, 256 to 8192, 512 to 16384, the last pack of a thread
    past the row where cols is not a multiple of its span), y, mean and rstd against float64,
    the parameters in fp32 or in x's dtype. Special values in the first rows."""
    rows = 3
    inputs, offsets = _norm_inputs((rows, cols), dtype, variant)
    inputs["x"][0, 5] = float("nan")
    inputs["x"][1, : cols // 2] = 1e4  # large values beside small ones: the variance from deviations
    param_dtype = dtype if params == "x's dtype" else None
    if param_dtype is not None:
        for name in ("weight", "bias"):
            if name in inputs:
                inputs[name] = inputs[name].to(dtype)
    rms = NORM_VARIANTS[variant][3]
    result = _norm_forward(runner, tmp_path, inputs, offsets, rms, param_dtype=param_dtype, env=PACKED_NORM)
    assert _kernels(result) == ["norm_forward_packed_kernel"] and _block_threads(result) == [threads], result.launches
    _, y, mean, rstd = _norm_reference(inputs, rms, 1e-5)
    got = result.outputs["y"].view(rows, cols)
    assert got[0].isnan().all(), "a NaN in the row makes all of it NaN"
    assert_close(got[1:], y[1:], dtype, "y")
    assert_close(result.outputs["rstd"][1:], rstd[1:], torch.float32, "rstd")
    if not rms:
        assert_close(result.outputs["mean"][1:], mean[1:], torch.float32, "mean")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_norm_forward_packed_rows_apart(runner, tmp_path, dtype):
    """The packed forward on aligned rows that are not contiguous (row stride a whole number of
    16-byte vectors past cols): x read at its stride, y written contiguous."""
    rows, cols = 3, 9000
    inputs, offsets = _norm_inputs((rows, cols), dtype, "layer_norm", "padded")
    assert inputs["x"].stride(0) > cols
    result = _norm_forward(runner, tmp_path, inputs, offsets, False, env=PACKED_NORM)
    assert _kernels(result) == ["norm_forward_packed_kernel"], result.launches
    _, y, _, _ = _norm_reference(inputs, False, 1e-5)
    assert_close(result.outputs["y"].view(rows, cols), y, dtype, "y")


@pytest.mark.parametrize("case", ["off", "2048 columns", "16392 columns", "residual", "strided", "offset", "fp32 y"])
def test_norm_forward_packed_only_where_it_holds(runner, tmp_path, case):
    """Rows the packed forward does not take go to the tile (or loop) kernel as before, and are
    right: the knob off, rows too short or too long, a fused residual, rows off 16-byte
    boundaries (strided, base offset), a y in fp32 (CUDA autocast's norm of bf16 x)."""
    dtype, rows = torch.bfloat16, 3
    cols = {"2048 columns": 2048, "16392 columns": 16392}.get(case, 4096)
    variant = "add_layer_norm" if case == "residual" else "layer_norm"
    layout = case if case in ("strided", "offset") else "contiguous"
    inputs, offsets = _norm_inputs((rows, cols), dtype, variant, layout)
    out_dtype = torch.float32 if case == "fp32 y" else None
    env = None if case == "off" else PACKED_NORM
    result = _norm_forward(runner, tmp_path, inputs, offsets, False, env=env, out_dtype=out_dtype)
    expected = "norm_forward_loop_kernel" if cols > 16384 else "norm_forward_tile_kernel"
    assert _kernels(result) == [expected], result.launches
    _, y, _, _ = _norm_reference(inputs, False, 1e-5)
    assert_close(result.outputs["y"].view(rows, cols), y, out_dtype or dtype, "y")


@pytest.mark.parametrize("variant", ["layer_norm", "add_layer_norm"])
@pytest.mark.parametrize("kernel, cols", [("tile", 7), ("tile", 1000), ("tile", 4104), ("packed", 4104),
                                          ("loop", 20000)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_norm_forward_constant_rows(runner, tmp_path, dtype, kernel, cols, variant):
    """A constant row's norm is exactly its bias, and its mean exactly its value: the row
    kernels' corrected mean (corrected_variance) and the loop kernel's combine of equal means.
    With the sum / n alone, rows of 3.7 came out ~1e-4 off in fp32 (the mean's rounding over
    sqrt(eps)). Values that round in a sum: 0.1, 3.7, -1234.5678, 1/3 of 1e-3, a power of 2."""
    if kernel == "packed" and (dtype not in (torch.float16, torch.bfloat16) or variant == "add_layer_norm"):
        pytest.skip("the packed forward takes 16-bit rows without a residual")
    values = torch.tensor([0.1, 3.7, -1234.5678, 1e-3 / 3, 8.0]).to(dtype)
    rows = len(values)
    inputs, offsets = _norm_inputs((rows, cols), dtype, variant)
    inputs["x"] = values[:, None].expand(rows, cols).contiguous()
    if "residual" in inputs:
        inputs["residual"] = torch.full((rows, cols), 0.3).to(dtype)
    result = _norm_forward(runner, tmp_path, inputs, offsets, False,
                           env=PACKED_NORM if kernel == "packed" else None)
    assert _kernels(result) == [f"norm_forward_{kernel}_kernel"], result.launches
    h = inputs["x"] + inputs["residual"] if "residual" in inputs else inputs["x"]
    expected = inputs["bias"].to(dtype).expand(rows, cols)
    assert torch.equal(result.outputs["y"].view(rows, cols), expected), "y is not the bias"
    assert torch.equal(result.outputs["mean"], h[:, 0].to(_acc(dtype))), "mean is not the row's value"
    assert_close(result.outputs["rstd"], torch.full((rows,), 1e-5, dtype=torch.float64).rsqrt(), _acc(dtype),
                 "rstd")


DEFAULTS = dict.fromkeys(TILE_KERNELS)  # the launchers' own defaults: no knob set


@pytest.mark.parametrize("cols", [2048, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_defaults_for_16_bit_rows(runner, tmp_path, dtype, cols):
    """With no knob set, aligned 16-bit rows of 2049-16384 columns take the packed kernels
    (softmax forward and backward, the norm forward) and norm_param_grad_kernel for dweight /
    dbias (dx from the packed backward); 2048 columns and fp32 rows the tiles and the tile's own
    sums, as the tuner on the H200 had it (2b1309b). Each against float64."""
    rows = 5
    packed = dtype == torch.bfloat16 and cols > 2048
    x, _ = _rows(rows, cols, dtype, "contiguous")
    y, result = _softmax_forward(runner, tmp_path / "softmax", x, 0, False, env=DEFAULTS)
    assert _kernels(result) == ["softmax_forward_packed_kernel" if packed else "softmax_forward_tile_kernel"]
    assert_close(y, _softmax_ref(x, False), dtype, "softmax")
    dy = torch.randn(rows, cols).to(dtype)
    y_in = _softmax_ref(x, False).to(dtype)
    dx, result = _softmax_backward(runner, tmp_path / "softmax_bwd", dy, y_in, False, env=DEFAULTS)
    assert _kernels(result) == ["softmax_backward_packed_kernel" if packed else "softmax_backward_tile_kernel"]
    assert_close(dx, R.softmax_backward(dy.double(), y_in.double(), -1, False), dtype, "softmax dx")
    inputs, offsets = _norm_inputs((rows, cols), dtype, "layer_norm")
    result = _norm_forward(runner, tmp_path / "norm", inputs, offsets, False, env=DEFAULTS)
    assert _kernels(result) == ["norm_forward_packed_kernel" if packed else "norm_forward_tile_kernel"]
    assert_close(result.outputs["y"].view(rows, cols), _norm_reference(inputs, False, 1e-5)[1], dtype, "y")
    result, grads = _norm_backward(runner, tmp_path / "norm_bwd", inputs, False, env=DEFAULTS)
    expected = (["norm_backward_packed_kernel", "norm_param_grad_kernel", "sum_partial_rows_kernel"] if packed
                else ["norm_backward_tile_kernel", "sum_partial_rows_kernel"])
    assert _kernels(result) == expected, result.launches
    for name, ref in grads.items():
        assert_close(result.outputs[name].view(ref.shape), ref, dtype if name == "dx" else _acc(dtype), name)


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("cols", [7, 1000, 8193, 20000])
@pytest.mark.parametrize("variant",
                         ["layer_norm", "rms_norm", "layer_norm_plain", "add_layer_norm", "add_rms_norm_plain"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_norm_of_16_bit_x_in_fp32(runner, tmp_path, dtype, variant, cols, layout):
    """y written in fp32 from 16-bit x (out_dtype, the cast CUDA autocast makes fused into
    the norm) and the backward from an fp32 dy, dx in x's dtype: as right as fp32 kernels,
    y unrounded (fp32 tolerance against the float64 reference of x as given), tile and loop
    kernels, rows aligned and not. A fused add writes x + residual in x's dtype, as torch's
    add, and y is the norm of that rounded sum; its backward adds the sum's gradient, in x's
    dtype. With the parameters in x's dtype it is refused."""
    rows = 5
    rms = NORM_VARIANTS[variant][3]
    inputs, offsets = _norm_inputs((rows, cols), dtype, variant, layout)
    result = _norm_forward(runner, tmp_path / "fwd", inputs, offsets, rms, out_dtype=torch.float32)
    _, y, mean, rstd = _norm_reference(inputs, rms, 1e-5)
    assert result.outputs["y"].dtype == torch.float32
    assert_close(result.outputs["y"].view(rows, cols), y, torch.float32, "y")
    assert_close(result.outputs["rstd"], rstd, torch.float32, "rstd")
    if "residual" in inputs:
        assert torch.equal(result.outputs["sum"].view(rows, cols), inputs["x"] + inputs["residual"]), "x + residual"
    back, grads = _norm_backward(runner, tmp_path / "bwd", inputs, rms, dy_dtype=torch.float32)
    for name, ref in grads.items():
        out = back.outputs[name]
        assert out.dtype == (dtype if name == "dx" else torch.float32), name
        assert_close(out.view(ref.shape), ref, dtype if name == "dx" else torch.float32, name)
    with pytest.raises(AssertionError, match="cudaErrorInvalidValue"):
        _norm_forward(runner, tmp_path / "params", inputs, offsets, rms, param_dtype=dtype, out_dtype=torch.float32)
    with pytest.raises(AssertionError, match="cudaErrorInvalidValue"):
        _norm_backward(runner, tmp_path / "params_bwd", inputs, rms, param_dtype=dtype, dy_dtype=torch.float32)


@pytest.mark.parametrize("cols", [1004, 20004], ids=["tile", "loop"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_norm_16_bit_sum_beside_fp32_y(runner, tmp_path, dtype, cols):
    """A fused add's 16-bit sum beside its fp32 y, x and residual in rows on 16-byte
    boundaries, 4 columns past whole 16-bit vectors: y's rows (fp32, cols apart) all start on
    a boundary, the sum's (16-bit, cols apart) every other one does not, so the kernels must
    not move the sum 16 bytes at a time (the emulator fails a misaligned vector access)."""
    rows = 3
    inputs, offsets = _norm_inputs((rows, cols), dtype, "add_layer_norm", "vector rows")
    result = _norm_forward(runner, tmp_path, inputs, offsets, False, out_dtype=torch.float32)
    _, y, _, _ = _norm_reference(inputs, False, 1e-5)
    assert_close(result.outputs["y"].view(rows, cols), y, torch.float32, "y")
    assert torch.equal(result.outputs["sum"].view(rows, cols), inputs["x"] + inputs["residual"]), "x + residual"


@pytest.mark.parametrize("layout", ["contiguous", "strided", "vector rows"])
@pytest.mark.parametrize("cols", [7, 1000, 1004, 20000])
@pytest.mark.parametrize("variant", ["add_layer_norm", "add_rms_norm_plain"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_norm_of_16_bit_x_beside_fp32_residual(runner, tmp_path, dtype, variant, cols, layout):
    """A 16-bit x beside an fp32 residual (a bf16 sublayer output beside an fp32 residual
    stream under autocast), both read as they are: the sum in fp32 bit for bit torch's
    promoting x + residual, y its fp32 norm, tile and loop kernels, rows aligned and not.
    An fp32 residual with y or the parameters in x's dtype is refused."""
    rows = 3
    rms = NORM_VARIANTS[variant][3]
    inputs, offsets = _norm_inputs((rows, cols), dtype, variant, layout)
    inputs["residual"], offsets["residual"] = _rows(rows, cols, torch.float32, layout, scale=1.0)
    result = _norm_forward(runner, tmp_path / "fwd", inputs, offsets, rms, out_dtype=torch.float32)
    _, y, mean, rstd = _norm_reference(inputs, rms, 1e-5)
    assert result.outputs["sum"].dtype == torch.float32
    assert torch.equal(result.outputs["sum"].view(rows, cols), inputs["x"] + inputs["residual"]), "x + residual"
    assert_close(result.outputs["y"].view(rows, cols), y, torch.float32, "y")
    assert_close(result.outputs["rstd"], rstd, torch.float32, "rstd")
    for refused in ({"out_dtype": dtype}, {"param_dtype": dtype}):
        with pytest.raises(AssertionError, match="cudaErrorInvalidValue"):
            _norm_forward(runner, tmp_path / "refused", inputs, offsets, rms, **{"out_dtype": torch.float32, **refused})


@pytest.mark.parametrize("cols", [7, 1000, 1004, 1006, 8192, 20000, 20004])
@pytest.mark.parametrize("variant", ["add_layer_norm", "add_rms_norm_plain", "layer_norm_plain"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_norm_backward_writes_dx_narrow_beside_fp32_rows(runner, tmp_path, dtype, variant, cols):
    """The backward of fp32 rows (the fp32 sum of a 16-bit x and an fp32 residual) writing dx
    also rounded to x's dtype, the 16-bit input's gradient, in the same pass: dx_narrow is
    dx's bits rounded, tile and loop kernels. At 1004 and 20004 columns the fp32 rows are on
    16-byte boundaries and every other 16-bit row is not (it takes 8-byte packs; the emulator
    fails a misaligned one); at 7 and 1006 no row is, and values move one at a time. A narrow dx
    beside rows that are not fp32, or in fp64, is refused."""
    rows = 5
    rms = NORM_VARIANTS[variant][3]
    inputs, _ = _norm_inputs((rows, cols), torch.float32, variant)
    dy, dsum = torch.randn(rows, cols), torch.randn(rows, cols)
    result, grads = _norm_backward(runner, tmp_path / "a", inputs, rms, dy=dy, dsum=dsum, dx_narrow_dtype=dtype)
    for name, ref in grads.items():
        assert_close(result.outputs[name].view(ref.shape), ref, torch.float32, name)
    narrow = result.outputs["dx_narrow"]
    assert narrow.dtype == dtype
    assert torch.equal(narrow, result.outputs["dx"].to(dtype)), "dx_narrow is not dx rounded"
    assert _kernels(result)[0] == ("norm_backward_loop_kernel" if cols > 8192 else "norm_backward_tile_kernel")
    alone, _ = _norm_backward(runner, tmp_path / "b", inputs, rms, dy=dy, dsum=dsum)
    for name in grads:  # the narrow copy changes nothing else, the partial rows' count included
        assert torch.equal(result.outputs[name], alone.outputs[name]), name
    half_inputs, _ = _norm_inputs((rows, cols), dtype, variant)
    other = torch.bfloat16 if dtype == torch.float16 else torch.float16
    for refused_inputs, refused in ((half_inputs, other), (inputs, torch.float64)):
        with pytest.raises(AssertionError, match="cudaErrorInvalidValue"):
            _norm_backward(runner, tmp_path / "refused", refused_inputs, rms, dx_narrow_dtype=refused)


SELF_CHECK_CASES = ["switches", "missing barrier", "deadlock", "stack overflow"]  # self_check.cu's Case, in order


@pytest.mark.parametrize("switch", ["x86-64", "ucontext"])
@pytest.mark.parametrize("case", SELF_CHECK_CASES)
def test_emulator_self_check(runner, tmp_path, case, switch):
    """tests/cpp/cuda_emu/self_check.cu, two blocks of two warps: a fiber's registers and stack
    hold across its switches (barriers, shuffles), and the emulator catches what these tests
    rely on it to: a missing __syncthreads (threads run in a random order between barriers, so
    some read a shared slot before it is written: NaN, the poison), a thread that skips one
    (a deadlock, named) and a write past a local array on a fiber's stack (ASan). With the
    emulator's own x86-64 fiber switch (what the suite runs here) and with the portable one
    (ucontext, which other architectures run)."""
    if switch == "ucontext":
        runner = emulated_cuda.build_ucontext_variant(runner)
    elif platform.machine() != "x86_64":
        pytest.skip("the emulator's own fiber switch is x86-64 assembly")
    result = emulated_cuda.run(runner, "self_check", tmp_path, {}, {"out": (torch.float32, 128)},
                               {"case": SELF_CHECK_CASES.index(case)},
                               env={"FASTDL_EMU_SEED": str(torch.initial_seed() % 2**32)})
    if case == "deadlock":
        assert result.returncode == 3 and "deadlock: 63 threads wait at __syncthreads" in result.stderr, result.stderr
        return
    if case == "stack overflow":
        assert result.returncode != 0 and "stack-buffer-overflow" in result.stderr, result.stderr
        assert "self_check.cu:" in result.stderr, result.stderr  # the frame, file:line
        return
    assert result.returncode == 0, result.stderr
    t = torch.arange(128) % 64
    warp_total = (t // 32 * 32 * 32 + 496).float()  # 32 * (the warp's first index) + 0 + 1 + ... + 31
    expected = (t + 1) % 64 + 1000 * warp_total
    out = result.outputs["out"]
    if case == "switches":
        assert torch.equal(out, expected), out
    else:  # a thread that read its neighbour's slot first read NaN; the others are right
        assert out.isnan().any() and torch.equal(out[~out.isnan()], expected[~out.isnan()]), out


def test_rewrite_keeps_lines_and_finds_every_launch():
    """The rewrite leaves no <<< behind, checks every __launch_bounds__, declares every
    __shared__ variable (a dynamic one as a pointer to the launch's shared memory), and keeps
    every line where it was (so the compiler's messages point at kernels/*.cu lines)."""
    for path in emulated_cuda.KERNEL_SOURCES:
        source = path.read_text()
        rewritten = emulated_cuda.rewrite_source(source)
        assert "<<<" not in rewritten and ">>>" not in rewritten, path.name
        assert rewritten.count("\n") == source.count("\n"), path.name
        assert rewritten.count("::fastdl_emu::launch(") == source.count("<<<"), path.name
        assert rewritten.count("::fastdl_emu::check_launch_bounds(") == source.count("__launch_bounds__("), path.name
        declared = rewritten.count("::fastdl_emu::shared_memory(")
        dynamic = rewritten.count("::fastdl_emu::dynamic_shared_memory(")
        assert dynamic == source.count("extern __shared__"), path.name
        assert declared + dynamic == source.count("__shared__"), path.name
    sample = "  k<T, 4>\n      <<<grid(n), kThreads<8>, 0, s>>>(a,\n b);\n"
    assert emulated_cuda.rewrite_launches(sample) == (
        '  ::fastdl_emu::launch("k<T, 4>", k<T, 4>, ::fastdl_emu::config(grid(n), kThreads<8>, 0, s), a,\n b)\n;\n')
    kernel = ("__global__ void __launch_bounds__(kT<A, B>, 2)\n  k(int a,\n int (*f)(int)) {\n"
              "  __shared__ float s[kT<A, B> / 32][3];\n  __shared__ M<A> m;\n}\n")
    assert emulated_cuda.rewrite_source(kernel) == (
        "__global__ void __launch_bounds__(kT<A, B>, 2)\n  k(int a,\n int (*f)(int)) {"
        ' ::fastdl_emu::check_launch_bounds("k", kT<A, B>);\n'
        "  __shared__ float s[kT<A, B> / 32][3]; ::fastdl_emu::shared_memory(&s, sizeof(s));\n"
        "  __shared__ M<A> m; ::fastdl_emu::shared_memory(&m, sizeof(m));\n}\n")
    dynamic = "  extern __shared__ __align__(16) unsigned char sums[];\n  __shared__ float s[4];\n"
    assert emulated_cuda.rewrite_source(dynamic) == (
        "  unsigned char* sums = static_cast<unsigned char*>(::fastdl_emu::dynamic_shared_memory());\n"
        "  __shared__ float s[4]; ::fastdl_emu::shared_memory(&s, sizeof(s));\n")
