"""fastdl.ops.softmax / log_softmax: every backend x dtype x shape against float64."""
import random

import pytest
import torch

import fastdl
from fastdl import _native
from fastdl.reference import log_softmax as ref_log_softmax
from fastdl.reference import softmax as ref_softmax
from fastdl.reference import softmax_backward as ref_softmax_backward

from conftest import (LARGE_CASES, LARGE_ELEMENTS, TOLERANCE, assert_close, autocast_as, backend_cases, case_id,
                      compile_backends, large_rows_to_check, large_tensor_turn, random_layout, random_shape, rel_err,
                      rows_2_31_elements_apart, skip_without_memory)

CASES = backend_cases()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# rows x cols: batch 1, odd sizes, powers of two, one column, the one-pass / online
# boundary (16384), long rows for the online kernels (Triton: split across programs when
# the rows are few, test_long_rows_both_ways forces each way) and a 256k vocabulary
SHAPES = [(1, 1), (3, 17), (1, 1000), (7, 256), (5, 4097), (2, 16384), (2, 16385), (3, 40000), (9, 20000),
          (1, 262145), (130, 3)]


def _run(backend, fn, *args, **kwargs):
    with fastdl.use_backend(backend):
        return fn(*args, **kwargs)


def _reference(x, dim, log):
    return (ref_log_softmax if log else ref_softmax)(x.double(), dim)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_backward(case, dtype, shape, log):
    backend, device = case
    if backend == "torch" and dtype == torch.float32 and shape[1] > 2**17:
        pytest.skip("torch's own fp32 softmax sums a long row in one vector reduction: 1.1e-5 relative error "
                    "at 262145 columns, over fp32's 1e-5 (fastdl's kernels: 5e-8)")
    fn = fastdl.ops.log_softmax if log else fastdl.ops.softmax
    x = (torch.randn(shape, device=device) * 3).to(dtype).requires_grad_()
    x_before = x.detach().clone()
    grad = torch.randn(shape, device=device).to(dtype)
    with fastdl.use_backend(backend):
        y = fn(x, -1)
        (dx,) = torch.autograd.grad(y, x, grad)
    assert y.dtype == dtype and y.shape == x.shape and y.is_contiguous()
    assert_close(y, _reference(x, -1, log), dtype, "forward")

    x64 = x.detach().double().requires_grad_()
    (ref_dx,) = torch.autograd.grad(_reference(x64, -1, log), x64, grad.double())
    assert_close(dx, ref_dx, dtype, "backward")
    assert torch.equal(x.detach(), x_before), "the input was modified"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_random_layouts(case):
    """40 calls (10 for Triton on a GPU) drawn at random (seeded per test): 1 to 4 dims, any
    dim, every dtype, softmax or log_softmax, x and dy each in a layout from
    conftest.random_layout (permuted, sliced, stepped, expanded, offset), forward and backward
    against float64, x unchanged. dx's error is measured against the size of its terms where
    that is larger: a dy constant along the dim (expanded there) makes softmax's dx 0, and its
    rounding relative to nothing; log_softmax's is dy - exp(y) sum(dy), whose second term
    carries y's rounding times |y| (bf16: 1.1e-2 of ||dy|| at 100 columns, in torch's own
    backward too)."""
    backend, device = case
    rng = random.Random(torch.initial_seed())
    # Triton on a GPU compiles each new variant as it meets it (up to ~5 s a shape, fwd and bwd,
    # in the H200 run's test log): fewer calls there, inside pytest-timeout's 120 s
    for call in range(10 if case == ("triton", "cuda") else 40):
        dtype, shape, log = rng.choice(DTYPES), random_shape(rng), rng.random() < 0.5
        dim = rng.randrange(-len(shape), len(shape))
        x, x_layout = random_layout(shape, dtype, device, rng)
        grad, grad_layout = random_layout(shape, dtype, device, rng)
        what = (f"call {call}: {'log_softmax' if log else 'softmax'} over dim {dim} of {dtype} {shape}, x {x_layout}, "
                f"dy {grad_layout}")
        x = x.requires_grad_()
        x_before = x.detach().clone()
        with fastdl.use_backend(backend):
            y = (fastdl.ops.log_softmax if log else fastdl.ops.softmax)(x, dim)
            (dx,) = torch.autograd.grad(y, x, grad)
        x64 = x.detach().double().requires_grad_()
        ref = _reference(x64, dim, log)
        (ref_dx,) = torch.autograd.grad(ref, x64, grad.double())
        assert_close(y, ref, dtype, what + ", forward")
        if log:  # dx = dy - exp(y) sum(dy): exp of a stored y off by |y| ulps
            scale = max(grad.double().norm().item(), (ref.detach().exp() * grad.double().sum(dim, keepdim=True)).norm()
                        .item() * max(1.0, ref.detach().abs().max().item()))
        else:
            scale = (ref.detach() * grad.double()).norm().item()
        err = (dx.double() - ref_dx).norm().item() / max(ref_dx.norm().item(), scale, 1e-300)
        assert err <= TOLERANCE[dtype], f"{what}, backward: error {err:.3g}"
        assert torch.equal(x.detach(), x_before), what + ": x was modified"


# Row lengths at each edge of the CUDA kernels' shapes (tiles of a warp x 8 values up to
# 1024 threads x 16, then the online kernels; fp64 tiles stop at 512 x 16), run on the
# native backends, which take them fast; rows aligned to 16 bytes and rows one element off.
EDGE_COLS = [255, 256, 257, 512, 513, 1024, 1025, 2048, 2049, 4096, 4097, 8192, 8200, 16384, 16392]
NATIVE_CASES = [c for c in CASES if c[0] in ("cuda", "cpu")]


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("cols", EDGE_COLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_kernel_shape_edges(case, dtype, cols, misaligned):
    backend, device = case
    rows = 37  # warp tiles take 4 rows a block: a partial last block
    base = (torch.randn(rows, cols + 8, device=device) * 3).to(dtype)
    x = base[:, 1 : cols + 1] if misaligned else base[:, :cols]
    grad = base.flip(0)[:, :cols]  # strided too
    for log in (False, True):
        fn = fastdl.ops.log_softmax if log else fastdl.ops.softmax
        y = _run(backend, fn, x, -1)
        assert_close(y, _reference(x, -1, log), dtype, f"forward, {cols} columns")
        dx = _run(backend, fastdl.ops.softmax_backward, grad, y, -1, log)
        y64 = _reference(x, -1, log)
        ref_dx = (grad.double() - y64.exp() * grad.double().sum(-1, keepdim=True) if log
                  else y64 * (grad.double() - (grad.double() * y64).sum(-1, keepdim=True)))
        assert_close(dx, ref_dx, dtype, f"backward, {cols} columns")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cpu_every_row_tail(dtype):
    """The CPU kernels work a row in blocks of 8 and 32 columns (the fp16 backward's AVX2
    loops, csrc/cpu/avx2.h) or 64 (the lanes of the generic ones), then its last columns: 1
    to 130 columns take every length of that tail, in one and in several blocks."""
    if "cpu" not in fastdl.available_backends():
        pytest.skip("the cpu backend is not built")
    for cols in range(1, 131):
        x = (torch.randn(3, cols) * 3).to(dtype)
        grad = torch.randn(3, cols).to(dtype)
        for log in (False, True):
            fn = fastdl.ops.log_softmax if log else fastdl.ops.softmax
            y = _run("cpu", fn, x, -1)
            assert_close(y, _reference(x, -1, log), dtype, f"forward, {cols} columns")
            dx = _run("cpu", fastdl.ops.softmax_backward, grad, y, -1, log)
            y64, grad64 = y.double(), grad.double()
            ref_dx = (grad64 - y64.exp() * grad64.sum(-1, keepdim=True) if log
                      else y64 * (grad64 - (grad64 * y64).sum(-1, keepdim=True)))
            assert_close(dx, ref_dx, dtype, f"{'log_softmax' if log else 'softmax'} backward, {cols} columns")


@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_native_backends_record_a_cpp_autograd_node(case):
    """cpu / cuda record the backward as a C++ node (csrc/autograd/softmax.cpp), no Python
    autograd.Function: a training step runs no Python in the backward."""
    backend, device = case
    x = torch.randn(3, 5, device=device, requires_grad=True)
    with fastdl.use_backend(backend):
        for fn in (fastdl.ops.softmax, fastdl.ops.log_softmax):
            name = fn(x, -1).grad_fn.name()
            assert "SoftmaxRows" in name, name


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_no_grad_and_inference_mode(case):
    """No graph is recorded under no_grad, even for an x that requires grad, and an
    inference_mode call gives an inference tensor: the eager paths that skip the autograd
    node (the native ops' forward alone) are right, and in every layout."""
    backend, device = case
    x = torch.randn(4, 9, 33, device=device, requires_grad=True)
    with fastdl.use_backend(backend):
        for mode in (torch.no_grad, torch.inference_mode):
            for dim in (-1, 1):
                with mode():
                    y = fastdl.ops.softmax(x, dim)
                assert y.grad_fn is None and not y.requires_grad
                assert y.is_inference() == (mode is torch.inference_mode)
                assert y.is_contiguous()
                assert_close(y, _reference(x.detach(), dim, False), torch.float32, f"{mode.__name__} dim={dim}")


# (4, 9, 33) and a square matrix: its rows along dim 0 have its own shape, and the Python path
# once returned them as they were, transposed (triton and torch backends, and torch.compile's)
@pytest.mark.parametrize("shape, dim", [((4, 9, 33), 0), ((4, 9, 33), 1), ((4, 9, 33), -1), ((4, 9, 33), -3),
                                        ((17, 17), 0), ((17, 17), -1)], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_any_dim_and_leading_dims(case, shape, dim):
    backend, device = case
    x = torch.randn(shape, device=device, requires_grad=True)
    for log in (False, True):
        fn = fastdl.ops.log_softmax if log else fastdl.ops.softmax
        grad = torch.randn(x.shape, device=device)
        with fastdl.use_backend(backend):
            y = fn(x, dim)
            (dx,) = torch.autograd.grad(y, x, grad)
        assert y.is_contiguous()
        assert_close(y, _reference(x, dim, log), torch.float32, f"dim={dim}")
        x64 = x.detach().double().requires_grad_()
        (ref_dx,) = torch.autograd.grad(_reference(x64, dim, log), x64, grad.double())
        assert_close(dx, ref_dx, torch.float32, f"backward dim={dim}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_non_contiguous_inputs(case):
    backend, device = case
    base = torch.randn(48, 70, device=device)
    views = {
        "transposed": base.t(),  # last dim strided
        "row_slice": base[:, 5:60],  # rows of stride 70, 55 columns
        "step": base[::3, ::2],  # every other column
        "expanded": torch.randn(1, 70, device=device).expand(6, 70),  # row stride 0
    }
    for name, x in views.items():
        y = _run(backend, fastdl.ops.softmax, x, -1)
        assert_close(y, ref_softmax(x.double(), -1), torch.float32, name)
        # an expanded gradient (stride 0 along the softmax dim) reaches the backward
        xg = x.detach().clone().requires_grad_()
        with fastdl.use_backend(backend):
            (dx,) = torch.autograd.grad(fastdl.ops.softmax(xg, -1).sum(), xg)
        x64 = x.detach().double().requires_grad_()
        (ref_dx,) = torch.autograd.grad(ref_softmax(x64, -1).sum(), x64)
        assert dx.abs().max().item() < 1e-5 and ref_dx.abs().max().item() < 1e-12, name


@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0,), (2, 0, 3), ()], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_zero_size_and_scalar(case, shape):
    backend, device = case
    x = torch.randn(shape, device=device, requires_grad=True)
    for fn, ref in ((fastdl.ops.softmax, torch.softmax), (fastdl.ops.log_softmax, torch.log_softmax)):
        with fastdl.use_backend(backend):
            y = fn(x, -1)
            y.sum().backward()
        expected = ref(x.detach(), -1)
        assert y.shape == expected.shape
        torch.testing.assert_close(y, expected)
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("cols", [5, 40000], ids=["one_pass", "online"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_special_values_match_torch(case, cols):
    """-inf entries, whole rows of -inf, huge magnitudes, NaN, and rows far from 0 (where
    exp(x) under- or overflows: only the row's own max is a safe shift) behave as in torch."""
    backend, device = case
    x = torch.randn(8, cols, device=device)
    x[6, :] -= 1000
    x[7, :] += 1000
    x[0, : cols // 2] = float("-inf")  # some -inf: those give 0
    x[1, :] = float("-inf")  # all -inf: NaN (as torch)
    x[2, :] = x[2, :] * 1e30  # huge values: no overflow
    x[3, 1] = float("nan")  # NaN poisons its row
    x[4, 0] = 3e38
    x[5, :] = -3e38
    for fn, ref in ((fastdl.ops.softmax, torch.softmax), (fastdl.ops.log_softmax, torch.log_softmax)):
        y = _run(backend, fn, x, -1)
        expected = ref(x, -1)
        torch.testing.assert_close(y, expected, equal_nan=True, rtol=1e-5, atol=1e-6)


def _check_long_rows(backend, device, dtype, shape, way):
    """softmax and log_softmax of `shape`, forward and backward, against float64."""
    for fn, log in ((fastdl.ops.softmax, False), (fastdl.ops.log_softmax, True)):
        x = (torch.randn(shape, device=device) * 3).to(dtype).requires_grad_()
        grad = torch.randn(shape, device=device).to(dtype)
        with fastdl.use_backend(backend):
            y = fn(x, -1)
            (dx,) = torch.autograd.grad(y, x, grad)
        assert_close(y, _reference(x, -1, log), dtype, f"{way} forward")
        x64 = x.detach().double().requires_grad_()
        (ref_dx,) = torch.autograd.grad(_reference(x64, -1, log), x64, grad.double())
        assert_close(dx, ref_dx, dtype, f"{way} backward")


def _check_long_row_special_values(backend, device, shape):
    """-inf in some chunks, a row of -inf, a NaN in the last chunk, huge values: as torch."""
    rows, cols = shape
    x = torch.randn(max(rows, 6), cols, device=device)
    x[0, : cols // 2] = float("-inf")  # -inf in some chunks only
    x[1, :] = float("-inf")  # all -inf: NaN (as torch)
    x[2, -1] = float("nan")  # NaN in the last chunk poisons its row
    x[3, :] = x[3, :] * 1e30
    # NaN as the first value a lane (or a chunk) sees, where a GPU max that drops NaN would lose it
    x[4, 0] = float("nan")
    x[5, cols // 2 // 4096 * 4096] = float("nan")
    for fn, ref in ((fastdl.ops.softmax, torch.softmax), (fastdl.ops.log_softmax, torch.log_softmax)):
        y = _run(backend, fn, x, -1)
        torch.testing.assert_close(y, ref(x, -1), equal_nan=True, rtol=1e-5, atol=1e-6)


TRITON_CASES = [c for c in CASES if c[0] == "triton"]
# SPLIT_PROGRAMS_PER_SM: 0 keeps one program a row (the loop kernels), a huge value splits
# every long row into as many chunks as it has blocks
LONG_ROW_WAYS = {"loop": 0, "split": 10**6}


@pytest.mark.parametrize("way", list(LONG_ROW_WAYS))
@pytest.mark.parametrize("shape", [(3, 40000), (2, 16385), (1, 262145)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=case_id)
def test_long_rows_both_ways(case, dtype, shape, way, monkeypatch):
    """Triton's long rows, one program a row or split across programs (whichever the row
    count picks on this device), forward and backward, softmax and log_softmax, and the
    special values, against float64 / torch."""
    from fastdl.triton import softmax as kernels

    monkeypatch.setattr(kernels, "SPLIT_PROGRAMS_PER_SM", LONG_ROW_WAYS[way])
    chunks, _ = kernels.split_chunks(shape[0], shape[1], torch.device(case[1]))
    assert (chunks > 1) == (way == "split")
    _check_long_rows(*case, dtype, shape, way)
    if dtype == torch.float32:
        _check_long_row_special_values(*case, shape)


CUDA_CASES = [c for c in CASES if c[0] == "cuda"] or [
    pytest.param(("cuda", "cuda"), marks=pytest.mark.skip(reason="the cuda backend needs a GPU and the CUDA build"))]
# FASTDL_CUDA_SPLIT_PER_SM: 0 keeps one block a row, a huge value splits every long row
# into as many chunks as allowed; FASTDL_CUDA_PACKED_ROWS=0 keeps aligned rows that fit in
# registers (the packed kernel) out of the block kernel. The kernels launched say which way ran
CUDA_LONG_ROW_WAYS = {"block": ({"FASTDL_CUDA_SPLIT_PER_SM": "0", "FASTDL_CUDA_PACKED_ROWS": "0"}, "_block_kernel"),
                      "split": ({"FASTDL_CUDA_SPLIT_PER_SM": "1000000"}, "_chunk_"),
                      "packed": ({"FASTDL_CUDA_SPLIT_PER_SM": "0"}, "_packed_kernel")}
# rows the packed kernels take (kernels/softmax.cu: softmax rows 16-byte aligned, up to 32
# values a thread of 1024, 64 for 16-bit types; none for fp64), forward and backward alike
CUDA_PACKED_SHAPES = [(3, 40000), (2, 16392)]
CUDA_WAY_CASES = [(way, dtype, shape) for way in CUDA_LONG_ROW_WAYS
                  for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
                  for shape in ((3, 40000), (2, 16392), (1, 262145), (5, 70001))
                  if way != "packed" or (shape in CUDA_PACKED_SHAPES and dtype != torch.float64 and
                                         (dtype.itemsize == 2 or shape[1] <= 32768))]


def _cuda_kernel_names(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("way, dtype, shape", CUDA_WAY_CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("case", CUDA_CASES, ids=case_id)
def test_cuda_long_rows_every_way(case, dtype, shape, way, monkeypatch):
    """CUDA C++ long rows, one block a row, split across blocks (chunk kernels) or held in
    registers (the packed kernel, aligned rows), aligned rows (16392, 40000) and not (odd
    widths: scalar loads), forward and backward, softmax and log_softmax, against float64;
    the special values against torch."""
    env, kernel = CUDA_LONG_ROW_WAYS[way]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    backend, device = case
    x = torch.randn(shape, device=device).to(dtype)
    with fastdl.use_backend(backend):
        names = _cuda_kernel_names(lambda: fastdl.ops.softmax(x, -1))
        y = fastdl.ops.softmax(x, -1)
        backward_names = _cuda_kernel_names(lambda: fastdl.ops.softmax_backward(torch.randn_like(y), y, -1, False))
    assert any(kernel in n for n in names), f"{way}: no {kernel} kernel among {sorted(names)}"
    assert any(kernel in n and "backward" in n for n in backward_names), f"{way}: {sorted(backward_names)}"
    _check_long_rows(backend, device, dtype, shape, way)
    if dtype == torch.float32:
        _check_long_row_special_values(backend, device, shape)


@pytest.mark.parametrize("cols", [16392, 20001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CUDA_CASES, ids=case_id)
def test_cuda_block_kernels_walk_rows(case, dtype, cols, monkeypatch):
    """FASTDL_CUDA_LOOP_BLOCKS_PER_SM=1: the block kernels in one block an SM, each walking rows,
    over more rows than SMs (aligned and odd widths), forward and backward against float64."""
    for name, value in (("FASTDL_CUDA_SPLIT_PER_SM", "0"), ("FASTDL_CUDA_PACKED_ROWS", "0"),
                        ("FASTDL_CUDA_LOOP_BLOCKS_PER_SM", "1")):
        monkeypatch.setenv(name, value)
    backend, device = case
    shape = (torch.cuda.get_device_properties(device).multi_processor_count * 2 + 3, cols)
    x = torch.randn(shape, device=device).to(dtype)
    with fastdl.use_backend(backend):
        names = _cuda_kernel_names(lambda: fastdl.ops.softmax(x, -1))
    assert any("softmax_forward_block_kernel" in n for n in names), sorted(names)
    _check_long_rows(backend, device, dtype, shape, "block, walking rows")


@pytest.mark.parametrize("shape", [(3, 20001), (4, 50257)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CUDA_CASES, ids=case_id)
def test_cuda_packed_kernels_of_rows_off_16_byte_boundaries(case, dtype, shape, monkeypatch):
    """Contiguous rows of an odd width (a GPT-2 vocabulary: each row but the first off a 16-byte
    boundary by its own amount): the packed forward and backward hold the whole vectors and
    give the ragged columns a thread each, where they fit (fp32 up to 32768 columns). Against
    float64, softmax and log_softmax."""
    monkeypatch.setenv("FASTDL_CUDA_SPLIT_PER_SM", "0")
    backend, device = case
    x = torch.randn(shape, device=device).to(dtype)
    with fastdl.use_backend(backend):
        names = _cuda_kernel_names(lambda: fastdl.ops.softmax(x, -1))
        y = fastdl.ops.softmax(x, -1)
        backward_names = _cuda_kernel_names(lambda: fastdl.ops.softmax_backward(torch.randn_like(y), y, -1, False))
    packed = dtype != torch.float32 or shape[1] <= 32768
    kernel = "_packed_kernel" if packed else "_block_kernel"
    assert any(kernel in n for n in names), sorted(names)
    assert any(kernel in n and "backward" in n for n in backward_names), sorted(backward_names)
    _check_long_rows(backend, device, dtype, shape, "packed" if packed else "block")


@pytest.mark.parametrize("cols", [2056, 4097, 8200, 16383])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CUDA_CASES, ids=case_id)
@pytest.mark.parametrize("knob", ["1", "0"])
def test_cuda_packed_tiles_knob(case, dtype, cols, knob, monkeypatch):
    """FASTDL_CUDA_PACKED_TILES=1 (16-bit rows' default): rows of the tiles' lengths from 2049
    columns by the packed kernels (blocks of 128-512 threads), aligned and of odd widths,
    softmax and log_softmax, forward and backward against float64; =0, by the tile kernels."""
    monkeypatch.setenv("FASTDL_CUDA_PACKED_TILES", knob)
    kind = "packed" if knob == "1" else "tile"
    backend, device = case
    x = torch.randn(37, cols, device=device).to(dtype) * 3
    dy = torch.randn_like(x)
    with fastdl.use_backend(backend):
        names = _cuda_kernel_names(lambda: fastdl.ops.softmax(x, -1))
        y, log_y = fastdl.ops.softmax(x, -1), fastdl.ops.log_softmax(x, -1)
        backward_names = _cuda_kernel_names(lambda: fastdl.ops.softmax_backward(dy, y, -1, False))
        dx, log_dx = fastdl.ops.softmax_backward(dy, y, -1, False), fastdl.ops.softmax_backward(dy, log_y, -1, True)
    assert any(f"softmax_forward_{kind}_kernel" in n for n in names), sorted(names)
    assert_close(y, ref_softmax(x.double()), dtype, "softmax")
    assert_close(log_y, ref_log_softmax(x.double()), dtype, "log_softmax")
    assert any(f"softmax_backward_{kind}_kernel" in n for n in backward_names), sorted(backward_names)
    assert_close(dx, ref_softmax_backward(dy.double(), y.double(), -1, False), dtype, "softmax backward")
    assert_close(log_dx, ref_softmax_backward(dy.double(), log_y.double(), -1, True), dtype, "log_softmax backward")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_nan_among_minus_inf_poisons_a_long_row(case):
    """A long row whose NaN sits in a stretch of -inf (a chunk of a split row with no finite
    value): the whole row is NaN, as torch gives."""
    backend, device = case
    x = torch.randn(3, 70000, device=device)
    x[0, 20000:40000] = float("-inf")
    x[0, 30000] = float("nan")
    x[1, 20000:40000] = float("-inf")  # no NaN: zeros there, the rest as usual
    x[2, 0] = float("nan")  # the first value of the row (and of its first lane or chunk)
    for fn, ref in ((fastdl.ops.softmax, torch.softmax), (fastdl.ops.log_softmax, torch.log_softmax)):
        y = _run(backend, fn, x, -1)
        assert y[0].isnan().all(), f"{fn.__name__}: the NaN did not reach every output of its row"
        assert y[2].isnan().all(), f"{fn.__name__}: a leading NaN did not reach every output of its row"
        torch.testing.assert_close(y[1], ref(x, -1)[1], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif("cpu" not in fastdl.available_backends("cpu"), reason="fastdl._C (cpu) not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_long_rows_same_bits_either_way(dtype):
    """The CPU kernel cuts rows of 32k+ columns into chunks: with fewer rows than threads each
    chunk is a task, otherwise a thread walks whole rows chunk by chunk. A row gives the same
    bits either way, alone or among other rows, forward and backward, special values too."""
    torch.manual_seed(0)
    x = torch.randn(4, 70001, dtype=dtype) * 4
    x[1, :40000] = float("-inf")  # -inf in some chunks only
    x[2, 20000:40000] = float("-inf")
    x[2, 30000] = float("nan")  # NaN among -inf: the whole row NaN
    x[3] *= 1e30
    grad = torch.randn_like(x)
    threads = torch.get_num_threads()
    try:
        for log in (False, True):
            fwd = lambda t: torch.ops.fastdl.softmax_rows_forward(t, log)
            bwd = lambda g, y: torch.ops.fastdl.softmax_rows_backward(g, y, log)
            torch.set_num_threads(8)  # more threads than rows: every row split into tasks
            y_split, dx_split = fwd(x), bwd(grad, fwd(x))
            y_rows = torch.cat([fwd(x[r : r + 1]) for r in range(4)])  # one row at a time
            torch.set_num_threads(1)  # one thread walks the rows
            y_walk, dx_walk = fwd(x), bwd(grad, fwd(x))
            for got in (y_rows, y_walk):
                torch.testing.assert_close(got, y_split, rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(dx_walk, dx_split, rtol=0, atol=0, equal_nan=True)
            ref = torch.log_softmax if log else torch.softmax
            torch.testing.assert_close(y_split, ref(x, -1), rtol=1e-5, atol=1e-6, equal_nan=True)
            assert y_split[2].isnan().all()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_half_precision_large_values(case, dtype):
    """fp16 near its max (65504): the max subtraction keeps exp finite."""
    backend, device = case
    x = (torch.rand(4, 300, device=device) * 60000).to(dtype)
    y = _run(backend, fastdl.ops.softmax, x, -1)
    assert_close(y, ref_softmax(x.double(), -1), dtype)


@pytest.mark.parametrize("case", [c for c in CASES], ids=case_id)
def test_gradcheck_float64(case):
    backend, device = case
    for log in (False, True):
        fn = fastdl.ops.log_softmax if log else fastdl.ops.softmax
        x = torch.randn(3, 2, 11, device=device, dtype=torch.float64, requires_grad=True)
        with fastdl.use_backend(backend):
            assert torch.autograd.gradcheck(lambda t: fn(t, 1), (x,))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_dtype_argument(case):
    backend, device = case
    x = torch.randn(4, 50, device=device, dtype=torch.float16)
    for fn, ref in ((fastdl.ops.softmax, torch.softmax), (fastdl.ops.log_softmax, torch.log_softmax)):
        y = _run(backend, fn, x, -1, dtype=torch.float32)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, ref(x, -1, dtype=torch.float32))
    ints = torch.arange(12, device=device).reshape(3, 4)
    torch.testing.assert_close(_run(backend, fastdl.ops.softmax, ints, 1, dtype=torch.float64),
                               torch.softmax(ints, 1, dtype=torch.float64))


@pytest.mark.parametrize("how", ["dtype=float32", "autocast"])
@pytest.mark.parametrize("cols", [37, 1000, 20000], ids=["warp", "tile", "long"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fp32_softmax_of_16_bit_x_reads_x_as_it_is(case, dtype, log, cols, how):
    """A 16-bit x's softmax computed in fp32, asked with dtype=torch.float32 or by an autocast
    that runs softmax in fp32 (CUDA's; on a CPU x the probe made to answer so): x is not cast
    first (the graph holds no cast of x), the kernels read it as it is and write fp32, at fp32
    tolerance against float64; x's gradient comes back in x's dtype."""
    backend, device = case
    fn, ref_fn = (fastdl.ops.log_softmax, torch.log_softmax) if log else (fastdl.ops.softmax, torch.softmax)
    x = (torch.randn(3, cols, device=device) * 3).to(dtype).requires_grad_()
    if how == "autocast":
        with autocast_as("bf16, fp32 rule", device):
            y = _run(backend, fn, x, -1)
    else:
        y = _run(backend, fn, x, -1, dtype=torch.float32)
    assert y.dtype == torch.float32
    assert y.grad_fn.next_functions[0][0].variable is x, "x was cast before the softmax"
    x64 = x.detach().double().requires_grad_()
    ref = ref_fn(x64, -1)
    assert_close(y, ref, torch.float32, "forward")
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    assert dx.dtype == dtype
    assert_close(dx, torch.autograd.grad(ref, x64, dy.double())[0], dtype, "dx")


@pytest.mark.parametrize("rows", [5, 1])
@pytest.mark.parametrize("cols", [37, 1000, 40000])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_native_fp32_softmax_of_16_bit_row_views(case, dtype, cols, rows):
    """The native ops' one-pass paths from a 16-bit x to an fp32 y and from the fp32 y and dy
    back to a 16-bit dx, on row views of wider tensors one element in (x, y and dy each read
    at its own stride; 40000 columns: the float kernels' long rows, which one row among more
    threads takes cast first on the CPU), against float64."""
    _, device = case

    def row_view(dt, width):  # (rows, cols) of a (rows, cols + width) tensor, one element in
        return (torch.randn(rows, cols + width, device=device) * 3).to(dt)[:, 1 : cols + 1]

    x = row_view(dtype, 9)
    x_before = x.clone()
    for log in (False, True):
        y = torch.ops.fastdl.softmax_rows_forward(x, log, torch.float32)
        assert y.dtype == torch.float32
        ref = _reference(x, -1, log)
        assert_close(y, ref, torch.float32, "forward")
        y_view, dy = row_view(torch.float32, 5), row_view(torch.float32, 3)
        y_view.copy_(y)
        dx = torch.ops.fastdl.softmax_rows_backward(dy, y_view, log, dtype)
        assert dx.dtype == dtype
        dy64 = dy.double()
        ref_dx = dy64 - ref.exp() * dy64.sum(-1, keepdim=True) if log else ref * (dy64 - (dy64 * ref).sum(-1, True))
        assert_close(dx, ref_dx, dtype, "dx")
    assert torch.equal(x, x_before)


def test_softmax_backward_public_function():
    y = torch.softmax(torch.randn(3, 8, dtype=torch.float64), -1)
    g = torch.randn_like(y)
    ref = torch.ops.aten._softmax_backward_data(g, y, -1, y.dtype)
    assert rel_err(fastdl.ops.softmax_backward(g, y, -1), ref) < 1e-12


class TestBadInputs:
    def test_integer_dtype(self):
        with pytest.raises(TypeError, match=r"fastdl\.softmax: argument x must be a floating-point tensor.*int64"):
            fastdl.ops.softmax(torch.arange(6).reshape(2, 3))
        with pytest.raises(TypeError, match=r"fastdl\.log_softmax: argument x"):
            fastdl.ops.log_softmax(torch.ones(2, 3, dtype=torch.int32))

    def test_not_a_tensor(self):
        with pytest.raises(TypeError, match=r"fastdl\.softmax: argument x must be a torch\.Tensor, got list"):
            fastdl.ops.softmax([1.0, 2.0])

    @pytest.mark.parametrize("dim", [2, -3, 7])
    def test_dim_out_of_range(self, dim):
        with pytest.raises(IndexError, match=rf"fastdl\.softmax: dim {dim} is out of range for a 2-D tensor"):
            fastdl.ops.softmax(torch.randn(2, 3), dim)

    def test_dim_not_int(self):
        with pytest.raises(TypeError, match=r"fastdl\.softmax: argument dim must be an int"):
            fastdl.ops.softmax(torch.randn(2, 3), 1.0)

    def test_mixed_devices(self):
        y = torch.randn(2, 3)
        with pytest.raises(ValueError, match=r"fastdl\.softmax_backward: grad_out is on meta but out is on cpu"):
            fastdl.ops.softmax_backward(torch.empty(2, 3, device="meta"), y)

    def test_mismatched_shapes_and_dtypes(self):
        y = torch.randn(2, 3)
        with pytest.raises(ValueError, match=r"grad_out has shape \(3, 2\) but out has \(2, 3\)"):
            fastdl.ops.softmax_backward(torch.randn(3, 2), y)
        with pytest.raises(TypeError, match=r"grad_out is torch.float64 but out is torch.float32"):
            fastdl.ops.softmax_backward(torch.randn(2, 3, dtype=torch.float64), y)

    def test_backend_that_cannot_run(self):
        x = torch.randn(2, 3)
        with pytest.raises(fastdl.BackendUnavailableError, match=r"fastdl\.softmax: backend 'cuda' cannot run here"):
            with fastdl.use_backend("cuda"):
                fastdl.ops.softmax(x)

    def test_backend_without_the_dtype(self, monkeypatch):
        from fastdl import backends

        only_fp32 = dict(backends._OP_DTYPES["softmax"], cpu=(torch.float32,))
        monkeypatch.setitem(backends._OP_DTYPES, "softmax", only_fp32)
        backends.forget_resolutions()
        try:
            with pytest.raises(fastdl.BackendUnavailableError, match=r"backend 'cpu' cannot run here: .*float16"):
                with fastdl.use_backend("cpu"):
                    fastdl.ops.softmax(torch.randn(2, 3, dtype=torch.float16))
            # under auto the call goes on to the next backend instead
            torch.testing.assert_close(fastdl.ops.softmax(torch.ones(2, 3, dtype=torch.float16)),
                                       torch.full((2, 3), 1 / 3, dtype=torch.float16))
        finally:
            monkeypatch.undo()
            backends.forget_resolutions()

    def test_native_op_checks(self):
        """The C++ ops check what they are given, too (called directly, bypassing Python)."""
        if "cpu" not in fastdl.available_backends("cpu"):
            pytest.skip("fastdl._C not built")
        with pytest.raises(RuntimeError, match=r"fastdl\.softmax \(cpu\): x must be 2-D"):
            torch.ops.fastdl.softmax_rows_forward(torch.randn(2, 3, 4), False)
        with pytest.raises(RuntimeError, match=r"must be float32, float64, float16 or bfloat16"):
            torch.ops.fastdl.softmax_rows_forward(torch.ones(2, 3, dtype=torch.int64), False)
        with pytest.raises(RuntimeError, match=r"contiguous last dim"):
            torch.ops.fastdl.softmax_rows_forward(torch.randn(4, 6).t(), False)
        with pytest.raises(RuntimeError, match=r"does not match out"):
            torch.ops.fastdl.softmax_rows_backward(torch.randn(2, 3), torch.randn(3, 2), False)
        half = torch.randn(2, 3, dtype=torch.float16)
        with pytest.raises(RuntimeError, match=r"out_dtype must be x's dtype \(Half\) or, for a Half / BFloat16 x, "
                                               r"Float; got BFloat16"):
            torch.ops.fastdl.softmax_rows_forward(half, False, torch.bfloat16)
        with pytest.raises(RuntimeError, match=r"grad_in_dtype must be out's dtype \(Half\) or, for a Float out, "
                                               r"Half / BFloat16; got Float"):
            torch.ops.fastdl.softmax_rows_backward(half, half, False, torch.float32)


@pytest.mark.parametrize("backend", compile_backends())
def test_torch_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) of a function calling the op traces through the
    custom op and matches eager, forward and backward. (Triton under the interpreter
    cannot be compiled: fake tensors reach it; it is tested on the GPU.)"""
    device = "cuda" if backend in ("triton", "cuda") else "cpu"
    if backend not in fastdl.available_backends(device):
        pytest.skip(f"backend {backend} not available")

    def f(x):
        return fastdl.ops.softmax(x * 2.0, -1).sum(0) + fastdl.ops.log_softmax(x, 0)[0]

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    x = torch.randn(24, 24, device=device, requires_grad=True)  # square: log_softmax over dim 0 is not its rows
    with fastdl.use_backend(backend):
        eager = f(x)
        (g_eager,) = torch.autograd.grad(eager.sum(), x)
        out = compiled(x)
        (g_out,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g_out, g_eager)


# 1000: a tile, rows off 16-byte boundaries; 4096: a tile; 65536: the packed / block kernels
# (log_softmax at one width: its kernels' offsets are softmax's)
@pytest.mark.parametrize("cols, log", [(1000, False), (4096, True), (65536, False)], ids=str)
@pytest.mark.parametrize("case", LARGE_CASES, ids=case_id)
def test_past_2_31_elements(case, log, cols):
    """bf16 (rows, cols) of more than 2^31 elements: the rows past element 2^31, where an int32
    offset wraps (reading and writing rows near the start, or out of bounds), forward and
    backward, each checked row against float64, with the first rows, which such a wrap would
    overwrite. (GPU, or FASTDL_TEST_LARGE=1 on the CPU: conftest.LARGE_CASES.)"""
    backend, device = case
    rows = LARGE_ELEMENTS // cols + 2
    skip_without_memory(device, 4 * rows * cols * 2)  # x, y, dy, dx
    with large_tensor_turn():
        fn = fastdl.ops.log_softmax if log else fastdl.ops.softmax
        x = torch.randn(rows, cols, device=device, dtype=torch.bfloat16).mul_(3).requires_grad_()
        grad = torch.randn(rows, cols, device=device, dtype=torch.bfloat16)
        with fastdl.use_backend(backend):
            y = fn(x, -1)
            (dx,) = torch.autograd.grad(y, x, grad)
        for row in large_rows_to_check(rows, cols):
            x64 = x[row].detach().double().requires_grad_()
            ref = _reference(x64, -1, log)
            (ref_dx,) = torch.autograd.grad(ref, x64, grad[row].double())
            assert_close(y[row], ref, torch.bfloat16, f"row {row} (element {row * cols}) forward")
            assert_close(dx[row], ref_dx, torch.bfloat16, f"row {row} (element {row * cols}) backward")
        del x, grad, y, dx


# 2^31 + 2^29: Triton's split (chunks a row ~4 an SM) starts its last chunks past element 2^31
@pytest.mark.parametrize("cols", [LARGE_ELEMENTS + 8, LARGE_ELEMENTS + 2**29])
@pytest.mark.parametrize("case", LARGE_CASES, ids=case_id)
def test_one_row_past_2_31_elements(case, cols):
    """A single bf16 row of more than 2^31 elements, forward and backward: its first elements,
    those around element 2^31 and its last against float64 (the row's max and sum taken a piece
    at a time). Triton splits such a row into chunks; the CUDA kernels take rows and columns
    below 2^31 and say so. (GPU, or FASTDL_TEST_LARGE=1 on the CPU.)"""
    backend, device = case
    if backend == "cuda":  # the size is checked before any kernel runs: x's values need not be drawn
        skip_without_memory(device, 2 * cols * 2)  # x, y
        with large_tensor_turn():
            x = torch.zeros(1, cols, device=device, dtype=torch.bfloat16)
            with fastdl.use_backend(backend), pytest.raises(RuntimeError, match=r"fastdl.softmax \(cuda\): x of "
                                                                                r"shape .* is too large \(rows and "
                                                                                r"cols must each be below 2\^31\)"):
                fastdl.ops.softmax(x, -1)
            # "auto" passes such a call to the next backend (backends.SIZE_LIMITS), the checked C++
            # entry to Python
            assert _native._C.softmax_checked(x, -1, None, False) is NotImplemented
            expected = "triton" if "triton" in fastdl.available_backends("cuda") else "torch"
            assert fastdl.backends.resolve("softmax", x, -1) == expected
            with fastdl.use_backend("auto"):
                y = fastdl.ops.softmax(x, -1)
            assert_close(y[0, -2**20:], torch.full((2**20,), 1 / cols, dtype=torch.float64, device=device),
                         torch.bfloat16, "auto's y of a row of zeros")
            del x, y
        return
    skip_without_memory(device, 4 * cols * 2)  # x, y, dy, dx
    with large_tensor_turn():
        x = torch.randn(1, cols, device=device, dtype=torch.bfloat16).mul_(3).requires_grad_()
        grad = torch.randn(1, cols, device=device, dtype=torch.bfloat16)
        with fastdl.use_backend(backend):
            y = fastdl.ops.softmax(x, -1)
            (dx,) = torch.autograd.grad(y, x, grad)
        x, y, dx, grad = x.detach()[0], y[0], dx[0], grad[0]
        row_max, row_sum, dot = x.max().double(), 0.0, 0.0  # dot: sum(dy * exp(x - max)), then sum(dy * y)
        for first in range(0, cols, 2**26):
            e = (x[first:first + 2**26].double() - row_max).exp()
            row_sum += e.sum()
            dot += (grad[first:first + 2**26].double() * e).sum()
        dot = dot / row_sum
        for first, last in [(0, 2**20), (LARGE_ELEMENTS - 2**20, LARGE_ELEMENTS + 8), (cols - 2**20, cols)]:
            ref = (x[first:last].double() - row_max).exp() / row_sum
            assert_close(y[first:last], ref, torch.bfloat16, f"y[{first}:{last}]")
            assert_close(dx[first:last], ref * (grad[first:last].double() - dot), torch.bfloat16,
                         f"dx[{first}:{last}]")
        del x, y, dx, grad


@pytest.mark.parametrize("cols", [1000, 65536])  # a tile; the packed / block kernels
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_rows_2_31_elements_apart(case, cols):
    """x's rows 2^31 + 8 elements apart (conftest.rows_2_31_elements_apart: a few pages of a
    buffer of 2^32 elements, so this runs in CI on every backend): row * row stride in 64 bits,
    forward and backward, against float64. (test_past_2_31_elements covers outputs that long.)"""
    backend, device = case
    with large_tensor_turn():
        x = rows_2_31_elements_apart(cols, torch.bfloat16, device).requires_grad_()
        grad = torch.randn(x.shape, device=device).to(torch.bfloat16)
        with fastdl.use_backend(backend):
            y = fastdl.ops.softmax(x, -1)
            (dx,) = torch.autograd.grad(y, x, grad)
        x64 = x.detach().double().requires_grad_()
        ref = _reference(x64, -1, False)
        (ref_dx,) = torch.autograd.grad(ref, x64, grad.double())
        assert_close(y, ref, torch.bfloat16, "forward")
        assert_close(dx, ref_dx, torch.bfloat16, "backward")
        del x, y, dx
