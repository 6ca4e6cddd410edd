"""How the Triton launchers pick num_warps (fastdl/triton/_launch.py: tuned_num_warps).

The SASS behind these numbers is checked by tests/triton_compile_check.py (no spills at
any warp count offered); here, that the right counts are offered, in both modes.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from conftest import assert_close  # noqa: E402
from fastdl import reference  # noqa: E402
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
    # dy, y and dx, and the ragged edges: at 4 warps fp32 spilled
    (softmax_kernels._softmax_backward_chunk_write_kernel, dict(BLOCK_COLS=4096, BLOCK_CHUNKS=2), [8, 16]),
    (norm_kernels._norm_forward_tile_kernel, dict(BLOCK_COLS=16384, ROWS=1), [16]),
    (norm_kernels._norm_forward_tile_kernel, dict(BLOCK_COLS=1024, ROWS=4), [4, 8, 16]),
    # norm backward holds x, dy and g: 8192 columns spill ~700 times at 4 warps
    (norm_kernels._norm_backward_tile_kernel, dict(BLOCK_COLS=8192, ROWS=1), [16]),
    (norm_kernels._norm_backward_tile_kernel, dict(BLOCK_COLS=1024, ROWS=4), [8, 16]),
    (norm_kernels._norm_forward_loop_kernel, dict(BLOCK_COLS=2048), [8, 4, 16]),
    (norm_kernels._norm_forward_loop_kernel, dict(BLOCK_COLS=4096), [8, 16]),
    # two sums beside x, dy and the weight: at 4096 columns 8 warps spilled (bf16)
    (norm_kernels._norm_backward_loop_kernel, dict(BLOCK_COLS=2048), [8, 16]),
    (norm_kernels._norm_backward_loop_kernel, dict(BLOCK_COLS=4096), [16]),
    # dy, x and the two per-lane sums: 4 warps would hold 128 values a thread
    (norm_kernels._norm_param_grad_kernel, dict(BLOCK_COLS=256, ROWS=16), [8, 16]),
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


# --- ALIGN: what the row kernels are told n_cols and the row strides divide by ------------
@pytest.mark.parametrize("dtype, n_cols, strides, expected", [
    (torch.float16, 1000, [1000], 8),  # 1000 = 8 * 125: Triton's own specialisation (by 16) misses it
    (torch.bfloat16, 1024, [1024], 8),  # 16 bytes at most
    (torch.float32, 1000, [1000], 4),
    (torch.float64, 1000, [1000], 2),
    (torch.float16, 1000, [1004], 4),  # a strided view: every row must start aligned
    (torch.float16, 1000, [1000, 0], 8),  # stride 0: an absent operand
    (torch.float16, 999, [999], 1),
    (torch.float32, 2, [6], 2),
    (torch.bfloat16, 1000, [2**31 + 8], 1),  # 2^28 + 1 vectors: int32, whose product by 8 would wrap
    (torch.bfloat16, 1000, [2**31 - 8], 8),
    (torch.float32, 1024, [], 4),  # no row stride: the partial rows (n_cols apart)
])
def test_row_alignment(dtype, n_cols, strides, expected):
    assert _launch.row_alignment(dtype, n_cols, *strides) == expected


class _LaunchSpy:
    """Stands in for a kernel: records each launch's constexpr `name` and grid, then launches the kernel."""

    def __init__(self, kernel, name="ALIGN"):
        self.kernel, self.name, self.values, self.grids = kernel, name, [], []

    def __getitem__(self, grid):
        self.grids.append(grid)

        def launch(*args, **kwargs):
            self.values.append(kwargs[self.name])
            return self.kernel[grid](*args, **kwargs)

        return launch


def _spy_on(monkeypatch, module, names, constexpr="ALIGN"):
    """Puts a _LaunchSpy in place of each kernel `names` of `module`: {name: its recorded values}."""
    values = {}
    for name in names:
        spy = _LaunchSpy(getattr(module, name), constexpr)
        monkeypatch.setattr(module, name, spy)
        values[name] = spy.values
    return values


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype, row_stride, expected", [
    (torch.float16, 1000, 8), (torch.float32, 1000, 4), (torch.float16, 1004, 4), (torch.float16, 1001, 1)])
def test_launchers_pass_the_row_alignment(dtype, row_stride, expected, monkeypatch):
    """Softmax and norm launches, forward and backward, on rows of 1000 with the given row
    stride: each kernel is told ALIGN and the results still match float64 (a launcher that
    divided a length ALIGN does not divide would be caught here: the kernel multiplies back)."""
    aligns = _spy_on(monkeypatch, softmax_kernels, ["_softmax_forward_tile_kernel", "_softmax_backward_tile_kernel"])
    aligns |= _spy_on(monkeypatch, norm_kernels, ["_norm_forward_tile_kernel", "_norm_backward_tile_kernel"])
    rows, n_cols = 3, 1000
    x = torch.randn(rows, row_stride, device=DEVICE).to(dtype)[:, :n_cols]
    dy = torch.randn(rows, row_stride, device=DEVICE).to(dtype)[:, :n_cols]
    weight, bias = torch.randn(n_cols, device=DEVICE), torch.randn(n_cols, device=DEVICE)

    y = softmax_kernels.softmax_forward(x, log=False)
    assert_close(y, reference.softmax(x.double()), dtype, "softmax")
    dx = softmax_kernels.softmax_backward(dy, y, log=False)
    assert_close(dx, reference.softmax_backward(dy.double(), y.double()), dtype, "softmax backward")

    y, _, mean, rstd = norm_kernels.norm_forward(x, None, weight, bias, 1e-5, rms=False)
    assert_close(y, reference.layer_norm(x.double(), (n_cols,), weight.double(), bias.double()), dtype, "layer_norm")
    x64 = x.double().requires_grad_()
    reference.layer_norm(x64, (n_cols,), weight.double(), bias.double()).backward(dy.double())
    dx, _, _, _ = norm_kernels.norm_backward(dy, None, x, weight, mean, rstd, True, rms=False)
    assert_close(dx, x64.grad, dtype, "layer_norm backward")

    assert aligns == {
        "_softmax_forward_tile_kernel": [expected], "_softmax_backward_tile_kernel": [expected],
        "_norm_forward_tile_kernel": [expected], "_norm_backward_tile_kernel": [expected]}


# --- VEC: rows off 16-byte boundaries alike, peeled by the loop and split kernels -----------
def _rows_of(n_cols, row_stride, dtype, offset=0, scale=1.0):
    """(3, n_cols) rows, row_stride apart, starting `offset` elements into 16-byte aligned storage."""
    storage = (torch.randn(3 * row_stride + offset + 8, device=DEVICE) * scale).to(dtype)
    assert storage.data_ptr() % 16 == 0
    return storage[offset: offset + 3 * row_stride].view(3, row_stride)[:, :n_cols]


@pytest.mark.parametrize("row_stride, offset, expected", [
    (20001, 0, 8),  # contiguous, odd: rows off alike
    (20009, 0, 8),  # padded by a whole vector: still alike
    (20004, 0, 1),  # padded by half a vector: x's rows drift from y's
    (20001, 1, 1),  # the base one element off: y's is not
])
def test_row_vector(row_stride, offset, expected):
    x = _rows_of(20001, row_stride, torch.float16, offset)
    y = torch.empty(3, 20001, dtype=torch.float16, device=DEVICE)
    assert _launch.row_vector(torch.float16, (x, x.stride(0)), (y, 20001)) == expected


def _check_softmax_both_ways(x, dy, dtype):
    """softmax and log_softmax of x, forward and backward (for dy), through the Triton launchers,
    against float64."""
    for log in (False, True):
        y = softmax_kernels.softmax_forward(x, log)
        ref = (reference.log_softmax if log else reference.softmax)(x.double())
        assert_close(y, ref, dtype, f"forward log={log}")
        dx = softmax_kernels.softmax_backward(dy, y, log)
        assert_close(dx, reference.softmax_backward(dy.double(), y.double(), -1, log), dtype, f"backward log={log}")


@pytest.mark.parametrize("split", [False, True], ids=["loop", "split"])
@pytest.mark.parametrize("row_stride, offset", [(20001, 0), (20009, 0), (20004, 0), (20001, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_loop_kernels_peel_rows(dtype, row_stride, offset, split, monkeypatch):
    """Softmax and log_softmax, forward and backward, through the loop or the split kernels on
    rows of 20001: peeled (VEC > 1) where the rows are off alike, element by element where not,
    against float64 either way (a head or tail element missed or taken twice fails)."""
    monkeypatch.setattr(softmax_kernels, "SPLIT_PROGRAMS_PER_SM", 4 if split else 0)
    kernels = (["_softmax_chunk_stats_kernel", "_softmax_chunk_write_kernel", "_softmax_backward_chunk_dot_kernel",
                "_softmax_backward_chunk_write_kernel"] if split else
               ["_softmax_forward_loop_kernel", "_softmax_backward_loop_kernel"])
    vecs = _spy_on(monkeypatch, softmax_kernels, kernels, "VEC")
    x = _rows_of(20001, row_stride, dtype, offset, scale=3.0)
    dy = _rows_of(20001, row_stride, dtype, offset)
    expected_vec = 16 // dtype.itemsize if (row_stride - 20001) % (16 // dtype.itemsize) == 0 and offset == 0 else 1
    _check_softmax_both_ways(x, dy, dtype)
    # the backward's y is contiguous, dy as x: alike exactly when x's rows are alike with y's
    assert vecs == {name: [expected_vec] * 2 for name in kernels}


@pytest.mark.parametrize("programs_per_sm, programs", [(0, 7), (1, 2), (3, 6), (4, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loop_kernels_walk_rows(dtype, programs_per_sm, programs, monkeypatch):
    """LOOP_PROGRAMS_PER_SM: the loop kernels in a program a row (0, or as many programs as
    rows) or at most K programs an SM (2 SMs, the interpreter's, patched on a GPU), each
    walking rows pid, pid + grid, ... (ROW_LOOP): every one of 7 rows of an odd width (rows
    off 16-byte boundaries alike, peeled) right, forward and backward, softmax and
    log_softmax, against float64; a row walked twice or skipped fails (outputs poisoned)."""
    monkeypatch.setattr(softmax_kernels, "SPLIT_PROGRAMS_PER_SM", 0)
    monkeypatch.setattr(softmax_kernels, "LOOP_PROGRAMS_PER_SM", programs_per_sm)
    monkeypatch.setattr(_launch, "sm_count", lambda device: 2)  # a GPU's too (an H200's 132: 7 programs)
    kernels = ["_softmax_forward_loop_kernel", "_softmax_backward_loop_kernel"]
    row_loops = _spy_on(monkeypatch, softmax_kernels, kernels, "ROW_LOOP")
    x = (torch.randn(7, 16389, device=DEVICE) * 3).to(dtype)
    dy = torch.randn(7, 16389, device=DEVICE).to(dtype)
    _check_softmax_both_ways(x, dy, dtype)
    grids = {name: getattr(softmax_kernels, name).grids for name in kernels}
    assert grids == {name: [(programs,)] * 2 for name in kernels}, grids
    assert row_loops == {name: [programs < 7] * 2 for name in kernels}, row_loops


@pytest.mark.parametrize("programs_per_sm, programs", [(0, 7), (1, 2), (3, 6)])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
def test_norm_loop_kernels_walk_rows(rms, programs_per_sm, programs, monkeypatch):
    """layer_norm.LOOP_PROGRAMS_PER_SM: the norm loop kernels (forward past 16384 columns, the
    backward's dx past 8192) in a program a row or fewer programs walking rows (ROW_LOOP): the
    fused norm of 7 rows of 16389, forward and backward, against float64, and the grids."""
    monkeypatch.setattr(norm_kernels, "LOOP_PROGRAMS_PER_SM", programs_per_sm)
    monkeypatch.setattr(_launch, "sm_count", lambda device: 2)  # a GPU's too (an H200's 132: 7 programs)
    kernels = ["_norm_forward_loop_kernel", "_norm_backward_loop_kernel"]
    row_loops = _spy_on(monkeypatch, norm_kernels, kernels, "ROW_LOOP")
    n_cols = 16389
    x, residual, dy, dsum = (torch.randn(7, n_cols, device=DEVICE) for _ in range(4))
    weight, bias = torch.rand(n_cols, device=DEVICE) + 0.5, None if rms else torch.randn(n_cols, device=DEVICE)
    y, h, mean, rstd = norm_kernels.norm_forward(x, residual, weight, bias, 1e-5, rms)
    dx, dweight, _, _ = norm_kernels.norm_backward(dy, dsum, h, weight, mean, rstd, bias is not None, rms)
    leaves = [t.double().requires_grad_() for t in (x, residual, weight)]
    h64 = leaves[0] + leaves[1]
    bias64 = None if rms else bias.double()
    y64 = (reference.rms_norm(h64, (n_cols,), leaves[2], 1e-5) if rms else
           reference.layer_norm(h64, (n_cols,), leaves[2], bias64))
    grads = torch.autograd.grad([y64, h64], leaves, [dy.double(), dsum.double()])
    assert_close(y, y64, torch.float32, "y")
    assert_close(dx, grads[0], torch.float32, "dx")
    assert_close(dweight, grads[2], torch.float32, "dweight")
    grids = {name: getattr(norm_kernels, name).grids for name in kernels}
    assert grids == {name: [(programs,)] for name in kernels}, grids
    assert row_loops == {name: [programs < 7] for name in kernels}, row_loops


def test_host_cdiv_and_next_power_of_2_match_tritons():
    """_launch's host-side cdiv / next_power_of_2 (cheaper than Triton's ConstexprFunction
    wrappers) give Triton's answers, powers of two and their neighbours included."""
    sizes = sorted({1, 2, 3, *(2**k + d for k in range(1, 20) for d in (-1, 0, 1))})
    for n in sizes:
        assert _launch.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 7, 64, 2048):
            assert _launch.cdiv(n, d) == triton.cdiv(n, d), (n, d)


# --- every launch may run more than once: Triton's autotuner times its choices on the caller's tensors ------
class _Twice:
    """Stands in for a kernel: runs each launch twice on the same arguments."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kernel[grid](*args, **kwargs)
            return self.kernel[grid](*args, **kwargs)

        return launch


def _run_every_launch_twice(monkeypatch, *modules):
    for module in modules:
        for name in [n for n in vars(module) if n.startswith("_") and n.endswith("_kernel")]:
            monkeypatch.setattr(module, name, _Twice(getattr(module, name)))


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("n_cols", [1000, 8200], ids=["tile", "loop"])
def test_norm_kernels_can_run_again(n_cols, rms, monkeypatch):
    """On a GPU (FASTDL_TRITON_AUTOTUNE on, the default) Triton's autotuner runs a kernel once
    for each num_warps it times, on the caller's own tensors, before the launch that counts.
    A kernel that adds into an output rather than writing it then returns a multiple of its
    result on the first call of each key (the loop backward's partial dweight / dbias rows
    did). The suite runs without autotuning, so here every launch runs twice instead: the
    fused norm's forward and backward (20 rows over 8 programs: one has none) still match
    float64."""
    _run_every_launch_twice(monkeypatch, norm_kernels)
    rows = 20
    x, residual, dy, dsum = (torch.randn(rows, n_cols, device=DEVICE) for _ in range(4))
    weight, bias = torch.rand(n_cols, device=DEVICE) + 0.5, None if rms else torch.randn(n_cols, device=DEVICE)
    y, h, mean, rstd = norm_kernels.norm_forward(x, residual, weight, bias, 1e-5, rms)
    dx, dweight, dbias, _ = norm_kernels.norm_backward(dy, dsum, h, weight, mean, rstd, bias is not None, rms)

    leaves = [t.double().requires_grad_() for t in (x, residual, weight) + (() if rms else (bias,))]
    h64 = leaves[0] + leaves[1]
    y64 = (reference.rms_norm(h64, (n_cols,), leaves[2], 1e-5) if rms else
           reference.layer_norm(h64, (n_cols,), leaves[2], leaves[3]))
    grads = torch.autograd.grad([y64, h64], leaves, [dy.double(), dsum.double()])
    assert_close(y, y64, torch.float32, "y")
    assert_close(dx, grads[0], torch.float32, "dx")
    assert_close(dweight, grads[2], torch.float32, "dweight")
    if not rms:
        assert_close(dbias, grads[3], torch.float32, "dbias")


@pytest.mark.parametrize("split", [False, True], ids=["loop", "split"])
def test_softmax_kernels_can_run_again(split, monkeypatch):
    """As test_norm_kernels_can_run_again, for softmax and log_softmax, forward and backward, on
    rows short enough for the tile kernels and long enough for the loop or split kernels."""
    _run_every_launch_twice(monkeypatch, softmax_kernels)
    monkeypatch.setattr(softmax_kernels, "SPLIT_PROGRAMS_PER_SM", 4 if split else 0)
    for n_cols in (1000, 20001):
        x, dy = torch.randn(3, n_cols, device=DEVICE) * 3, torch.randn(3, n_cols, device=DEVICE)
        for log in (False, True):
            y = softmax_kernels.softmax_forward(x, log)
            assert_close(y, (reference.log_softmax if log else reference.softmax)(x.double()), torch.float32, "y")
            dx = softmax_kernels.softmax_backward(dy, y, log)
            assert_close(dx, reference.softmax_backward(dy.double(), y.double(), -1, log), torch.float32, "dx")


def _norm_inputs(rows, n_cols, has_weight, has_bias):
    """x, dy, weight and bias (None where not asked for) of a norm backward test."""
    x, dy = torch.randn(rows, n_cols, device=DEVICE) * 2 + 1, torch.randn(rows, n_cols, device=DEVICE)
    weight = torch.rand(n_cols, device=DEVICE) + 0.5 if has_weight else None
    bias = torch.randn(n_cols, device=DEVICE) if has_bias else None
    return x, dy, weight, bias


def _assert_norm_grads(x, dy, weight, bias, rms, dx, dweight, dbias, dsum=None):
    """dx (plus dsum, the sum's gradient, when fused), dweight and dbias against float64 autograd
    of the reference norm."""
    n_cols = x.shape[-1]
    leaves = [x.double().requires_grad_()] + [t.double().requires_grad_() for t in (weight, bias) if t is not None]
    w64 = leaves[1] if weight is not None else None
    b64 = leaves[-1] if bias is not None else None
    y64 = (reference.rms_norm(leaves[0], (n_cols,), w64, 1e-5) if rms else
           reference.layer_norm(leaves[0], (n_cols,), w64, b64))
    grads = torch.autograd.grad(y64, leaves, dy.double())
    assert_close(dx, grads[0] + (dsum.double() if dsum is not None else 0), torch.float32, "dx")
    if weight is not None:
        assert_close(dweight, grads[1], torch.float32, "dweight")
    if bias is not None:
        assert_close(dbias, grads[-1], torch.float32, "dbias")


# --- the longer rows' dweight / dbias: _norm_param_grad_kernel's blocks of columns x rows ----------------
@pytest.mark.parametrize("programs_per_sm, expected", [(1, (1, 40)), (5, (4, 12)), (4096, (10, 4))])
def test_param_grad_row_blocks(programs_per_sm, expected, monkeypatch):
    """37 rows of 600 columns (3 column blocks of 256), 4 rows at a time, on the interpreter's
    2 SMs: one block of every row, a few blocks of whole tiles but the last, a tile a block."""
    monkeypatch.setattr(norm_kernels, "PARAM_BLOCK_COLS", 256)
    monkeypatch.setattr(norm_kernels, "PARAM_ROWS", 4)
    monkeypatch.setattr(norm_kernels, "PARAM_PROGRAMS_PER_SM", programs_per_sm)
    assert norm_kernels._param_grad_row_blocks(37, 600, torch.device("cpu")) == expected
    assert norm_kernels._param_grad_row_blocks(0, 600, torch.device("cpu")) == (1, 4)  # no rows: one empty block
    blocks, rows_per_block = norm_kernels._param_grad_row_blocks(37, 0, torch.device("cpu"))  # no columns
    assert blocks >= 1 and rows_per_block % 4 == 0 and blocks * rows_per_block >= 37


@pytest.mark.parametrize("programs_per_sm", [1, 5, 4096])
@pytest.mark.parametrize("rms, has_weight, has_bias", [(False, True, True), (True, True, False), (False, False, True)],
                         ids=["layer_norm", "rms_norm", "bias_only"])
@pytest.mark.parametrize("dx_kernel", ["loop", "tile"])
def test_norm_backward_param_grad_kernel_over_row_blocks(dx_kernel, rms, has_weight, has_bias, programs_per_sm,
                                                         monkeypatch):
    """dweight / dbias from _norm_param_grad_kernel in the row blocks of
    test_param_grad_row_blocks (600 columns: three column blocks, the last ragged), beside dx
    from the loop kernel (rows past a tile limit of 256 here) or from the tile kernel, a tile
    a program (TILE_PARAM_SUMS off), against float64."""
    if dx_kernel == "loop":
        monkeypatch.setattr(norm_kernels, "BACKWARD_TILE_MAX_COLS", 256)
    else:
        monkeypatch.setattr(norm_kernels, "TILE_PARAM_SUMS", False)
    monkeypatch.setattr(norm_kernels, "PARAM_BLOCK_COLS", 256)
    monkeypatch.setattr(norm_kernels, "PARAM_ROWS", 4)
    monkeypatch.setattr(norm_kernels, "PARAM_PROGRAMS_PER_SM", programs_per_sm)
    spy = _LaunchSpy(norm_kernels._norm_param_grad_kernel, "ALIGN")
    monkeypatch.setattr(norm_kernels, "_norm_param_grad_kernel", spy)
    rows, n_cols = 37, 600
    x, dy, weight, bias = _norm_inputs(rows, n_cols, has_weight, has_bias)
    _, _, mean, rstd = norm_kernels.norm_forward(x, None, weight, bias, 1e-5, rms)
    dx, dweight, dbias, _ = norm_kernels.norm_backward(dy, None, x, weight, mean, rstd, has_bias, rms)
    row_blocks = norm_kernels._param_grad_row_blocks(rows, n_cols, x.device)[0]
    assert spy.grids == [(3, row_blocks)] and spy.values == [4], "not one launch over every block, in vectors"
    _assert_norm_grads(x, dy, weight, bias, rms, dx, dweight, dbias)


# --- the partial-row sum at the GPU's width (the interpreter's programs are wider) ----------------------
@pytest.mark.parametrize("n_cols", [37, 1000])
def test_partial_row_sum_at_the_gpus_width(n_cols, monkeypatch):
    """The interpreter sums dweight's and dbias's partial rows INTERPRET_SUM_BLOCK_COLS columns
    a program, a GPU SUM_BLOCK_COLS: both widths on this device (37 rows of 37 or 1000 columns:
    4 partial rows on the interpreter's 2 SMs, the last block ragged at either width but 1000 /
    8), dweight and dbias bit for bit the same, and against float64."""
    assert norm_kernels.INTERPRET_SUM_BLOCK_COLS > norm_kernels.SUM_BLOCK_COLS, "nothing to compare"
    x, dy, weight, bias = _norm_inputs(37, n_cols, True, True)
    _, _, mean, rstd = norm_kernels.norm_forward(x, None, weight, bias, 1e-5, False)
    spy = _LaunchSpy(norm_kernels._sum_partial_rows_kernel, "BLOCK_COLS")
    monkeypatch.setattr(norm_kernels, "_sum_partial_rows_kernel", spy)
    grads = {}
    for interpreted in (True, False):
        monkeypatch.setattr(norm_kernels, "INTERPRET", interpreted)
        grads[interpreted] = norm_kernels.norm_backward(dy, None, x, weight, mean, rstd, True, False)
    assert spy.values == [norm_kernels.INTERPRET_SUM_BLOCK_COLS, norm_kernels.SUM_BLOCK_COLS]
    assert spy.grids == [(-(-n_cols // width),) for width in spy.values]
    dx, dweight, dbias, _ = grads[False]
    assert torch.equal(dweight, grads[True][1]) and torch.equal(dbias, grads[True][2])
    _assert_norm_grads(x, dy, weight, bias, False, dx, dweight, dbias)


# --- the walking backward tile with its next tile's loads first (TILE_PREFETCH) ---------------------------
@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("rms, has_weight, has_bias, fused", [
    (False, True, True, False), (True, True, False, False), (False, False, True, False), (False, True, True, True)],
    ids=["layer_norm", "rms_norm", "bias_only", "fused_add"])
def test_norm_backward_tile_walks_rows_with_prefetch(rms, has_weight, has_bias, fused, prefetch, monkeypatch):
    """37 rows of 100 columns, tiles of 2 rows (TILE_ELEMENTS 256): the interpreter's 2 SMs give
    4 programs of 10 rows, 5 tiles each, the last program's rows ending inside a tile. With
    TILE_PREFETCH the launch asks for the prefetching kernel (and not for tiles past
    TILE_ELEMENTS); dx (plus the sum's gradient when fused), dweight and dbias against float64."""
    monkeypatch.setattr(norm_kernels, "TILE_ELEMENTS", 256)
    monkeypatch.setattr(norm_kernels, "TILE_PREFETCH", prefetch)
    spy = _LaunchSpy(norm_kernels._norm_backward_tile_kernel, "PREFETCH")
    monkeypatch.setattr(norm_kernels, "_norm_backward_tile_kernel", spy)
    rows, n_cols = 37, 100
    x, dy, weight, bias = _norm_inputs(rows, n_cols, has_weight, has_bias)
    dsum = torch.randn(rows, n_cols, device=DEVICE) if fused else None
    _, _, mean, rstd = norm_kernels.norm_forward(x, None, weight, bias, 1e-5, rms)
    dx, dweight, dbias, _ = norm_kernels.norm_backward(dy, dsum, x, weight, mean, rstd, has_bias, rms)
    assert spy.values == [prefetch]
    assert norm_kernels._backward_programs(rows, x.device) == (4, 10)
    _assert_norm_grads(x, dy, weight, bias, rms, dx, dweight, dbias, dsum)
    if prefetch:  # a tile of more than TILE_ELEMENTS (one 512-column row): no prefetch
        x_long, dy_long = torch.randn(3, 500, device=DEVICE), torch.randn(3, 500, device=DEVICE)
        _, _, m_long, r_long = norm_kernels.norm_forward(x_long, None, None, None, 1e-5, rms)
        norm_kernels.norm_backward(dy_long, None, x_long, None, m_long, r_long, False, rms)
        assert spy.values == [True, False]
