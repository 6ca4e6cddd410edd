"""layer_norm, rms_norm, add_layer_norm, add_rms_norm: every backend x dtype x shape
against float64, forward and backward, determinism, modules, bad inputs."""
import importlib
import random

import pytest
import torch

import fastdl
from fastdl import reference as R

from conftest import (LARGE_CASES, LARGE_ELEMENTS, TOLERANCE, assert_close, assert_norm_nans_as_torchs, autocast_as,
                      backend_cases, case_id, compile_backends, hard_statistics_rows, large_rows_to_check,
                      large_tensor_turn, nonfinite_rows, random_layout, random_shape, rows_2_31_elements_apart,
                      skip_without_memory)

CASES = backend_cases()
norm_ops = importlib.import_module("fastdl.ops.layer_norm")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (rows, hidden): the hidden sizes 1, 7, 768, 1000, 4096, 8193 and rows 1, 3,
# 1024, plus a row long enough for the loop kernels
SHAPES = [(1, 1), (3, 7), (1024, 768), (3, 1000), (1, 4096), (3, 8193), (2, 20000)]
# name -> (fastdl function, reference, has residual, has weight, has bias, rms)
VARIANTS = {
    "layer_norm": (fastdl.ops.layer_norm, R.layer_norm, False, True, True, False),
    "layer_norm_no_bias": (fastdl.ops.layer_norm, R.layer_norm, False, True, False, False),
    "layer_norm_plain": (fastdl.ops.layer_norm, R.layer_norm, False, False, False, False),
    "rms_norm": (fastdl.ops.rms_norm, R.rms_norm, False, True, False, True),
    "add_layer_norm": (fastdl.ops.add_layer_norm, R.add_layer_norm, True, True, True, False),
    "add_rms_norm": (fastdl.ops.add_rms_norm, R.add_rms_norm, True, True, False, True),
}


def _inputs(shape, dtype, device, variant, weight_dtype=None):
    _, _, has_res, has_w, has_b, _ = VARIANTS[variant]
    rows, n = shape
    weight_dtype = weight_dtype or dtype
    x = (torch.randn(rows, n, device=device) * 2 + 0.5).to(dtype).requires_grad_()
    res = torch.randn(rows, n, device=device).to(dtype).requires_grad_() if has_res else None
    w = (torch.rand(n, device=device) + 0.5).to(weight_dtype).requires_grad_() if has_w else None
    b = torch.randn(n, device=device).to(weight_dtype).requires_grad_() if has_b else None
    return x, res, w, b


def _call(fn, variant, x, res, w, b, n, eps):
    rms = VARIANTS[variant][5]
    args = (x, res) if res is not None else (x,)
    return fn(*args, n, w, eps) if rms else fn(*args, n, w, b, eps)


def _check(backend, variant, x, res, w, b, dtype, eps=None):
    fn, ref_fn, has_res, *_ = VARIANTS[variant]
    n = x.shape[-1]
    eps = torch.finfo(dtype).eps if eps is None and VARIANTS[variant][5] else (1e-5 if eps is None else eps)
    leaves = [t for t in (x, res, w, b) if t is not None]
    with fastdl.use_backend(backend):
        out = _call(fn, variant, x, res, w, b, n, eps)
        outs = out if has_res else (out,)
        grads_out = [torch.randn_like(o) for o in outs]
        grads = torch.autograd.grad(outs, leaves, grads_out)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(leaves64)
    x64 = next(it)
    res64 = next(it) if res is not None else None
    w64 = next(it) if w is not None else None
    b64 = next(it) if b is not None else None
    ref = _call(ref_fn, variant, x64, res64, w64, b64, n, eps)
    refs = ref if has_res else (ref,)
    ref_grads = torch.autograd.grad(refs, leaves64, [g.double() for g in grads_out])
    for o, r in zip(outs, refs):
        assert o.dtype == x.dtype and o.shape == x.shape
        assert_close(o, r, dtype, f"{variant} forward")
    # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) cancels: for hidden 1 (RMS) it is
    # ~1e-7 from terms ~1. Its error is measured against the size of those terms,
    # ||dy * w * rstd||, when that is the larger (a wrong formula still misses by ~1).
    h64 = x64 + res64 if res is not None else x64
    centred = h64 if VARIANTS[variant][5] else h64 - h64.mean(-1, keepdim=True)
    rstd64 = torch.rsqrt((centred * centred).mean(-1, keepdim=True) + eps)
    dy64 = grads_out[-1].double()
    term_scale = (dy64 * (w64.detach() if w is not None else 1.0) * rstd64).norm().item()
    names = ("x", "residual", "weight", "bias") if res is not None else ("x", "weight", "bias")
    names = [nm for nm, t in zip(names, [x, res, w, b] if res is not None else [x, w, b]) if t is not None]
    for name, g, r, leaf in zip(names, grads, ref_grads, leaves):
        assert g.dtype == leaf.dtype, f"grad of {name} is {g.dtype}, expected {leaf.dtype}"
        if name in ("x", "residual") and not torch.isnan(g).any():
            err = (g.double() - r).norm().item() / max(r.norm().item(), term_scale, 1e-300)
            assert err <= TOLERANCE[dtype], f"{variant} grad {name}: error {err:.3g} > {TOLERANCE[dtype]:.0e}"
        else:
            assert_close(g, r, dtype, f"{variant} grad {name}")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_backward(case, dtype, shape, variant):
    backend, device = case
    _check(backend, variant, *_inputs(shape, dtype, device, variant), dtype)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_random_layouts(case):
    """30 calls (8 for Triton on a GPU) drawn at random (seeded per test): every variant, every
    dtype, 1 to 4 dims normalised over the last, x, residual, weight and bias each in a layout from
    conftest.random_layout (permuted, sliced, stepped, expanded, offset), the parameters in x's
    dtype or, beside 16-bit x, fp32: forward and backward against float64 (_check). x and the
    residual are not expanded along the normalised dim: a constant row's norm is exactly 0,
    against which float64's own rounding is all the error there is to measure
    (test_constant_rows_normalise_to_bias checks such rows). Rows of 8 or more: two or three
    close values make an ill-conditioned row, whose fp32 sum x + residual rounds far from
    float64's (test_forward_backward has hidden 1 and 7)."""
    backend, device = case
    rng = random.Random(torch.initial_seed())
    # Triton on a GPU compiles each new variant as it meets it (up to ~5 s a shape, fwd and bwd,
    # in the H200 run's test log): fewer calls there, inside pytest-timeout's 120 s
    for call in range(8 if case == ("triton", "cuda") else 30):
        variant, dtype = rng.choice(list(VARIANTS)), rng.choice(DTYPES)
        shape = random_shape(rng, last_sizes=(8, 17, 100))
        _, _, has_res, has_w, has_b, _ = VARIANTS[variant]
        weight_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) and rng.random() < 0.5 else dtype
        tensors, layouts = {}, []
        operands = [("x", True, shape, dtype), ("residual", has_res, shape, dtype),
                    ("weight", has_w, shape[-1:], weight_dtype), ("bias", has_b, shape[-1:], weight_dtype)]
        for name, present, tensor_shape, tensor_dtype in operands:
            if present:
                tensor, layout = random_layout(tensor_shape, tensor_dtype, device, rng,
                                               varies_along=-1 if name in ("x", "residual") else None)
                tensors[name] = tensor.requires_grad_()
                layouts.append(f"{name} {layout}")
        what = f"call {call}: {variant} of {dtype} {shape}, parameters in {weight_dtype}, {', '.join(layouts)}"
        try:
            _check(backend, variant, *(tensors.get(name) for name in ("x", "residual", "weight", "bias")), dtype)
        except AssertionError as error:
            raise AssertionError(f"{what}: {error}") from None


@pytest.mark.parametrize("variant", ["layer_norm", "rms_norm", "add_layer_norm"])
@pytest.mark.parametrize("dtype, hidden", [(torch.bfloat16, 65536), (torch.float32, 65543)], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_hidden_65536_and_past(case, dtype, hidden, variant):
    """The issue's largest hidden size, 65536, and an odd one past it (rows off 16-byte
    boundaries after the first), forward and backward against float64: the loop kernels, and
    every dweight / dbias column block of the long rows. (Under Triton's interpreter ~4 s a
    case: two, not every dtype x size.)"""
    backend, device = case
    _check(backend, variant, *_inputs((3, hidden), dtype, device, variant), dtype)


@pytest.mark.parametrize("cols", [20000, 20001])  # whole 16-byte vectors, and not
@pytest.mark.parametrize("variant", ["layer_norm", "add_layer_norm"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_long_row_statistics_offset_outlier_spread(case, variant, cols):
    """Mean and variance of long rows (the loop kernels: one sweep for both, Welford's) as exact
    as fp32 allows on rows that break careless methods (conftest.hard_statistics_rows), each row
    against float64 on its own; the backward too."""
    backend, device = case
    x = hard_statistics_rows(cols, device)
    _, _, has_res, *_ = VARIANTS[variant]
    res = torch.randn_like(x) * 1e-3 if has_res else None
    w, b = torch.rand(cols, device=device) + 0.5, torch.randn(cols, device=device)
    fn, ref_fn = VARIANTS[variant][:2]
    with fastdl.use_backend(backend):
        out = _call(fn, variant, x, res, w, b, cols, 1e-5)
    y = out[1] if has_res else out
    h64 = (x + res).double() if has_res else x.double()  # the sum rounded to fp32, as the kernels normalise it
    ref = R.layer_norm(h64, cols, w.double(), b.double(), 1e-5)
    for i in range(x.shape[0]):
        assert_close(y[i], ref[i], torch.float32, f"row {i}")
    _check(backend, variant, x.requires_grad_(), res.requires_grad_() if has_res else None, w.requires_grad_(),
           b.requires_grad_(), torch.float32)


# rows of one value each, values that round when summed (and a power of 2)
CONSTANT_ROW_VALUES = [0.1, 3.7, -1234.5678, 1e-3 / 3, 8.0]


@pytest.mark.parametrize("cols", [7, 1000, 4104, 20000])  # warp tile, block tiles (CUDA: packed for 16-bit), loop
@pytest.mark.parametrize("variant", ["layer_norm", "add_layer_norm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_constant_rows_normalise_to_bias(case, dtype, variant, cols):
    """A row of one value normalises to exactly 0, so its output is exactly the bias, as torch's:
    the row kernels correct their first mean by the deviations' mean (the corrected two-pass
    variance), the loop kernels combine equal means exactly. With the sum / n alone, fp32 rows
    of 3.7, 4096 wide, were 5.8e-4 off float64 (the mean's rounding over sqrt(eps)), 58 times the
    tolerance. The backward of such rows against float64 too."""
    backend, device = case
    x, res, w, b = _inputs((len(CONSTANT_ROW_VALUES), cols), dtype, device, variant)
    values = torch.tensor(CONSTANT_ROW_VALUES, device=device).to(dtype)
    x = values[:, None].expand(-1, cols).contiguous().requires_grad_()
    if res is not None:
        res = torch.full_like(res, 0.3).requires_grad_()
    fn = VARIANTS[variant][0]
    with fastdl.use_backend(backend):
        out = _call(fn, variant, x, res, w, b, cols, 1e-5)
    y = out[1] if res is not None else out
    assert torch.equal(y, b.detach().expand_as(y)), f"not the bias: {(y.double() - b.double()).abs().max():.3g} off"
    if dtype != torch.float64:  # there the float64 reference's own mean rounds: its xhat, so dweight, is noise
        _check(backend, variant, x, res, w, b, dtype)


@pytest.mark.parametrize("cols", [7, 1000, 4096])  # the row kernels: warp and block tiles
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_offset_rows_forward_to_the_spread(case, cols):
    """fp32 rows 1e5 times their spread from 0 (1000 +- 0.01): the row kernels' forward is
    exact relative to the spread (each deviation from the first mean exact, then the mean's
    correction taken from it), 5e-8 off float64 on the dev machine where torch's eager CPU norm is
    2e-3 off (the mean rounded to fp32 first: an ulp of 1000 is 0.006 of the spread). The loop
    kernels' (longer rows) take deviations from the rounded mean, as torch's."""
    backend, device = case
    x = 1000 + 0.01 * torch.randn(5, cols, device=device)
    w, b = torch.rand(cols, device=device) + 0.5, torch.randn(cols, device=device)
    with fastdl.use_backend(backend):
        y = fastdl.ops.layer_norm(x, cols, w, b, 1e-5)
    assert_close(y, R.layer_norm(x.double(), cols, w.double(), b.double(), 1e-5), torch.float32, "y")


@pytest.mark.parametrize("cols", [1000, 8192, 20000])  # block tiles (CUDA: packed for 16-bit at 8192), loop
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_statistics_of_rows_centred_near_0(case, dtype, cols):
    """The mean and rstd the forward saves, of randn rows, against float64: the mean (~1 /
    sqrt(cols) of the spread) relative to itself. The deviations' sum that corrects the first
    mean rounds too: x - mean loses the mean's bits below x's last one, the same way for a
    binade's values (16-bit x, or |x| > |mean|). Taken always, that correction left fp16 rows of
    20000 with means 2e-5 off float64 (cpu), where the sum / n alone was 8e-8 off; the kernels
    take it only where it is more than 8 eps of the deviations' root mean square."""
    backend, device = case
    x = torch.randn(5, cols, device=device).to(dtype)
    _, _, mean, rstd = norm_ops._forward(x, None, None, None, 1, 1e-5, False, backend=backend)
    x64 = x.double()
    mean64 = x64.mean(-1)
    rstd64 = ((x64 - mean64[:, None]) ** 2).mean(-1).add(1e-5).rsqrt()
    tolerance_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # statistics in fp32
    assert_close(mean, mean64, tolerance_dtype, "mean")
    assert_close(rstd, rstd64, tolerance_dtype, "rstd")


@pytest.mark.parametrize("cols", [7, 1000, 20000])  # a warp tile, a block tile, the loop kernels
@pytest.mark.parametrize("variant", ["layer_norm", "rms_norm", "add_layer_norm"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_nonfinite_rows_are_nan_as_torchs(case, variant, cols):
    """Rows holding NaN or +-inf give NaN where torch's norm does (layer_norm: the whole row;
    rms_norm: the non-finite column, the others 0): an overflow upstream stays visible to
    GradScaler and to anomaly checks. The other values, and the plain row, as torch's."""
    backend, device = case
    x = nonfinite_rows(cols, device)
    fn, _, has_res, *_ = VARIANTS[variant]
    res = torch.zeros_like(x) if has_res else None
    w, b = torch.rand(cols, device=device) + 0.5, torch.randn(cols, device=device)
    with fastdl.use_backend(backend):
        out = _call(fn, variant, x, res, w, b, cols, 1e-5)
    assert_norm_nans_as_torchs(out[1] if has_res else out, x, VARIANTS[variant][5], w, b)


@pytest.mark.parametrize("variant", ["layer_norm", "layer_norm_plain", "rms_norm", "add_layer_norm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_cpu_every_row_tail(dtype, variant):
    """The CPU kernels work a row in blocks of 8 and 32 columns (the fp16 kernels' AVX2
    loops, csrc/cpu/avx2.h) or 32 and 64 (the lanes of the generic ones), then its last
    columns: hidden 1 to 65 takes every length of that tail, in one and in several blocks."""
    if "cpu" not in fastdl.available_backends():
        pytest.skip("the cpu backend is not built")
    for n in range(1, 66):
        try:
            _check("cpu", variant, *_inputs((3, n), dtype, "cpu", variant), dtype)
        except AssertionError as error:
            raise AssertionError(f"hidden {n}: {error}") from None


@pytest.mark.parametrize("variant", ["layer_norm", "rms_norm", "add_layer_norm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fp32_weights_with_half_inputs(case, dtype, variant):
    """Mixed-precision training keeps the parameters in fp32."""
    backend, device = case
    _check(backend, variant, *_inputs((33, 300), dtype, device, variant, weight_dtype=torch.float32), dtype)


@pytest.mark.parametrize("cols", [300, 20000], ids=["tile", "loop"])
@pytest.mark.parametrize("variant", ["layer_norm", "layer_norm_plain", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fp32_norm_of_16_bit_x_reads_x_as_it_is(case, dtype, variant, cols):
    """Under an autocast that runs the norms in fp32 (CUDA's; on a CPU x, the probe made to
    answer so), a 16-bit x is not cast first: the norm reads it as it is and writes y in fp32
    (the graph holds no cast of x), y matches the float64 reference at fp32 tolerance, and x's
    gradient comes back in x's dtype, as the cast's backward would give it."""
    backend, device = case
    fn, ref_fn, _, _, _, rms = VARIANTS[variant]
    x, _, w, b = _inputs((5, cols), dtype, device, variant, weight_dtype=torch.float32)
    eps = 1e-5
    with autocast_as("bf16, fp32 rule", device), fastdl.use_backend(backend):
        y = _call(fn, variant, x, None, w, b, cols, eps)
    assert y.dtype == torch.float32
    assert y.grad_fn.next_functions[0][0].variable is x, "x was cast before the norm"
    leaves = [t for t in (x, w, b) if t is not None]
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, w64, b64 = (leaves64 + [None, None])[:3]
    ref = _call(ref_fn, variant, x64, None, w64, b64, cols, eps)
    assert_close(y, ref, torch.float32, "y")
    for leaf, grad, ref_grad in zip(leaves, grads, torch.autograd.grad(ref, leaves64, dy.double())):
        assert grad.dtype == leaf.dtype
        assert_close(grad, ref_grad, dtype if leaf is x else torch.float32, "dx" if leaf is x else "dparam")


def _check_fused_add(ref_norm, h, y, x, res, w, b, eps):
    """A fused add's outputs h = x + residual (as computed: torch's sum, checked by the caller)
    and y = norm(h), y in fp32: y against the float64 norm of h, and each input's gradient (x's
    and residual's: h's gradient plus the norm's) against float64, each in its input's dtype
    and at that dtype's tolerance."""
    leaves = [t for t in (x, res, w, b) if t is not None]
    dh, dy = torch.randn_like(h), torch.randn_like(y)
    grads = torch.autograd.grad((h, y), leaves, (dh, dy))
    h64 = h.detach().double().requires_grad_()
    params64 = [t.detach().double().requires_grad_() for t in (w, b) if t is not None]
    ref = ref_norm(h64, h.shape[-1], *params64, eps=eps)
    assert_close(y, ref, torch.float32, "y")
    ref_grads = torch.autograd.grad(ref, [h64, *params64], dy.double())
    ref_dsum = ref_grads[0] + dh.double()
    for name, leaf, grad, ref_grad in zip(("x", "residual", "weight", "bias"), leaves, grads,
                                          [ref_dsum, ref_dsum, *ref_grads[1:]]):
        assert grad.dtype == leaf.dtype, name
        assert_close(grad, ref_grad, leaf.dtype, name)


@pytest.mark.parametrize("cols", [300, 20000], ids=["tile", "loop"])
@pytest.mark.parametrize("variant", ["add_layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fp32_norm_of_16_bit_sum_reads_x_as_it_is(case, dtype, variant, cols):
    """The fused adds under an autocast that runs the norms in fp32: x + residual in x's dtype,
    bit for bit torch's add (which autocast leaves alone), and y its norm in fp32, in one pass
    (the graph holds no cast of x or residual); y matches the float64 norm of that sum at fp32
    tolerance, and x's and residual's gradients (h's gradient plus the norm's) come back in
    x's dtype."""
    backend, device = case
    fn, ref_fn, _, _, _, rms = VARIANTS[variant]
    ref_norm = R.rms_norm if rms else R.layer_norm
    x, res, w, b = _inputs((5, cols), dtype, device, variant, weight_dtype=torch.float32)
    eps = 1e-5
    with autocast_as("bf16, fp32 rule", device), fastdl.use_backend(backend):
        h, y = _call(fn, variant, x, res, w, b, cols, eps)
    assert h.dtype == dtype and y.dtype == torch.float32
    assert torch.equal(h, x + res)
    assert {e[0].variable for e in y.grad_fn.next_functions[:2]} == {x, res}, "x or residual was cast first"
    _check_fused_add(ref_norm, h, y, x, res, w, b, eps)


@pytest.mark.parametrize("cols", [300, 20000], ids=["tile", "loop"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("cuda", "cpu")], ids=case_id)
def test_native_ops_take_parameters_in_the_input_dtype(case, dtype, cols):
    """The native backward op gives dweight / dbias in weight's dtype when it is x's (the CUDA
    kernels read such parameters as they are and write their gradients so), else in fp32; and
    the values are those of fp32 parameters, rounded once: the same bits."""
    backend, device = case
    x, res, w, b = _inputs((5, cols), dtype, device, "add_layer_norm")
    dy = torch.randn(5, cols, device=device).to(dtype)
    with fastdl.use_backend(backend):
        grads = {}
        for params in (dtype, torch.float32):
            w_, b_ = w.detach().to(params), b.detach().to(params)
            y, h, mean, rstd = torch.ops.fastdl.layer_norm_rows_forward(x.detach(), res.detach(), w_, b_, 1e-5, False)
            grads[params] = torch.ops.fastdl.layer_norm_rows_backward(dy, None, h, w_, mean, rstd, True, False)
            grads[params] = (y, *grads[params][:3])
    for name, ours, fp32 in zip(("y", "dx", "dweight", "dbias"), grads[dtype], grads[torch.float32]):
        assert ours.dtype == dtype, name
        assert fp32.dtype == (torch.float32 if name in ("dweight", "dbias") else dtype), name
        assert torch.equal(ours, fp32.to(dtype)), f"{name} differs from fp32 parameters' result rounded"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bf16_weight_beside_fp32_bias(case):
    """Parameters of two dtypes (bf16 x and weight, fp32 bias): each gradient in its
    parameter's dtype, and dbias as exact as fp32 allows. It is not rounded through bf16 on
    the way: the native backward op writes dweight and dbias in one dtype."""
    backend, device = case
    x = (torch.randn(5, 300, device=device) * 2).to(torch.bfloat16).requires_grad_()
    w = (torch.rand(300, device=device) + 0.5).to(torch.bfloat16).requires_grad_()
    b = torch.randn(300, device=device, requires_grad=True)
    dy = torch.randn(5, 300, device=device).to(torch.bfloat16)
    with fastdl.use_backend(backend):
        y = fastdl.ops.layer_norm(x, 300, w, b)
    dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
    assert (dx.dtype, dw.dtype, db.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32)
    assert_close(db, dy.double().sum(0), torch.float32, "dbias")
    with fastdl.use_backend(backend):  # the fp32 bias alone, no weight
        y = fastdl.ops.layer_norm(x, 300, None, b)
    (db,) = torch.autograd.grad(y, (b,), dy)
    assert db.dtype == torch.float32
    assert_close(db, dy.double().sum(0), torch.float32, "dbias without a weight")


@pytest.mark.parametrize("shape", [(1000, 512), (64, 20000)], ids=["tile", "loop"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_parameter_gradients_are_deterministic(case, shape):
    """Right and bitwise repeatable dweight / dbias where each backward program (block,
    CPU chunk) sums many rows into its partial row: 1000 or 64 rows over the interpreter's
    8 Triton programs (a program adding into its partial row across rows, not only across
    a row's chunks)."""
    backend, device = case
    x, res, w, b = _inputs(shape, torch.float32, device, "add_layer_norm")
    _check(backend, "add_layer_norm", x, res, w, b, torch.float32)
    dy = torch.randn(shape, device=device)
    results = []
    for _ in range(2):
        with fastdl.use_backend(backend):
            h, y = fastdl.ops.add_layer_norm(x, res, shape[-1], w, b)
            results.append(torch.autograd.grad((y,), (w, b), (dy,)))
    for first, second in zip(*results):
        assert torch.equal(first, second), "two runs gave different parameter gradients"


# 1000: a tile, rows off 16-byte boundaries; 8192: the packed forward and backward (16-bit rows
# of whole vectors), dweight / dbias from the param kernel; 65536: the loop kernels
@pytest.mark.parametrize("cols", [1000, 8192, 65536])
@pytest.mark.parametrize("case", LARGE_CASES, ids=case_id)
def test_past_2_31_elements(case, cols):
    """bf16 layer_norm of (rows, cols) with more than 2^31 elements, bf16 weight and bias: y and
    dx of the rows past element 2^31, where an int32 offset wraps (reading and writing rows near
    the start, or out of bounds), and of the first rows, which such a wrap would overwrite,
    against float64 row by row; dweight and dbias, sums over every row, against float64 sums
    taken a chunk of rows at a time. (GPU, or FASTDL_TEST_LARGE=1 on the CPU: conftest.LARGE_CASES.)"""
    backend, device = case
    bf16, eps = torch.bfloat16, 1e-5
    rows = LARGE_ELEMENTS // cols + 2
    skip_without_memory(device, 4 * rows * cols * 2)  # x, y, dy, dx
    with large_tensor_turn():
        x = torch.randn(rows, cols, device=device, dtype=bf16).requires_grad_()
        w = (torch.rand(cols, device=device) + 0.5).to(bf16).requires_grad_()
        b = torch.randn(cols, device=device).to(bf16).requires_grad_()
        dy = torch.randn(rows, cols, device=device, dtype=bf16)
        with fastdl.use_backend(backend):
            y = fastdl.ops.layer_norm(x, cols, w, b, eps)
            dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
        w64, b64 = w.detach().double(), b.detach().double()
        for row in large_rows_to_check(rows, cols):
            x64 = x[row].detach().double().requires_grad_()
            ref = R.layer_norm(x64, cols, w64, b64, eps)
            (ref_dx,) = torch.autograd.grad(ref, x64, dy[row].double())
            assert_close(y[row], ref, bf16, f"row {row} (element {row * cols}) forward")
            assert_close(dx[row], ref_dx, bf16, f"row {row} (element {row * cols}) dx")
        ref_dw = torch.zeros(cols, device=device, dtype=torch.float64)
        ref_db = torch.zeros_like(ref_dw)
        chunk = max(1, 2**24 // cols)
        for start in range(0, rows, chunk):
            x64 = x[start:start + chunk].detach().double()
            xhat = (x64 - x64.mean(-1, keepdim=True)) * (x64.var(-1, unbiased=False, keepdim=True) + eps).rsqrt()
            dy64 = dy[start:start + chunk].double()
            ref_dw += (dy64 * xhat).sum(0)
            ref_db += dy64.sum(0)
        assert_close(dw, ref_dw, bf16, "dweight")
        assert_close(db, ref_db, bf16, "dbias")
        del x, dy, y, dx


@pytest.mark.parametrize("cols", [1000, 8192, 65536])  # as test_past_2_31_elements
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_rows_2_31_elements_apart(case, cols):
    """x's rows 2^31 + 8 elements apart (conftest.rows_2_31_elements_apart: a few pages of a
    buffer of 2^32 elements, so this runs in CI on every backend): row * row stride in 64 bits,
    layer_norm forward and backward (which reads x again) against float64. (test_past_2_31_elements
    covers outputs that long.)"""
    backend, device = case
    with large_tensor_turn():
        x = rows_2_31_elements_apart(cols, torch.bfloat16, device).requires_grad_()
        w = (torch.rand(cols, device=device) + 0.5).to(torch.bfloat16).requires_grad_()
        b = torch.randn(cols, device=device).to(torch.bfloat16).requires_grad_()
        _check(backend, "layer_norm", x, None, w, b, torch.bfloat16)
        del x


@pytest.mark.parametrize("shape", [(5, 1000), (2, 20000)], ids=["tile", "loop"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_sum_is_torchs_add(case, dtype, shape):
    """The fused norms' first output is x + residual as torch's add stores it, bit for bit
    (16-bit sums rounded to nearest even), and that is the sum they normalise, as the
    unfused add and norm would. (Under the Triton interpreter, through tests/conftest.py's
    bf16 rounding: the interpreter's own truncates.)"""
    backend, device = case
    x, res, w, b = (t.detach() for t in _inputs(shape, dtype, device, "add_layer_norm"))
    with fastdl.use_backend(backend):
        h, y = fastdl.ops.add_layer_norm(x, res, shape[-1], w, b)
        h_rms, _ = fastdl.ops.add_rms_norm(x, res, shape[-1], w)
        y_unfused = fastdl.ops.layer_norm(x + res, shape[-1], w, b)
    assert torch.equal(h, x + res) and torch.equal(h_rms, x + res)
    assert_close(y, y_unfused.double(), dtype, "fused against unfused")


@pytest.mark.skipif("cpu" not in fastdl.available_backends("cpu"), reason="the CPU kernels are not built")
@pytest.mark.parametrize("shape", [(300, 768), (5000, 64), (3, 20000)], ids=str)
def test_cpu_gradients_same_bits_any_thread_count(shape):
    """The CPU backward's dweight / dbias chunking depends on the shape alone (csrc/cpu/
    layer_norm.cpp), never on the thread count: 1, 2, 3 or 8 threads give the same bits."""
    x, res, w, b = _inputs(shape, torch.float32, "cpu", "add_layer_norm")
    dy = torch.randn(shape)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3, 8):
            torch.set_num_threads(count)
            with fastdl.use_backend("cpu"):
                _, y = fastdl.ops.add_layer_norm(x, res, shape[-1], w, b)
                results.append(torch.autograd.grad((y,), (x, w, b), (dy,)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for first, second in zip(results[0], other):
            assert torch.equal(first, second), "another thread count gave other gradient bits"
    _check("cpu", "add_layer_norm", x, res, w, b, torch.float32)


CUDA_CASES = [c for c in CASES if c[0] == "cuda"] or [
    pytest.param(("cuda", "cuda"), marks=pytest.mark.skip(reason="the cuda backend needs a GPU and the CUDA build"))]


@pytest.mark.parametrize("blocks_per_sm", ["1", "3", "4096"])
@pytest.mark.parametrize("shape", [(1000, 512), (300, 20000)], ids=["tile", "loop"])
@pytest.mark.parametrize("case", CUDA_CASES, ids=case_id)
def test_cuda_backward_blocks_knob(case, shape, blocks_per_sm, monkeypatch):
    """FASTDL_CUDA_NORM_BLOCKS_PER_SM (the backward's blocks, hence its partial rows of
    dweight / dbias: 1 a SM, a few, or more than there are rows) keeps the gradients right
    and deterministic."""
    monkeypatch.setenv("FASTDL_CUDA_NORM_BLOCKS_PER_SM", blocks_per_sm)
    backend, _ = case
    _check(backend, "add_layer_norm", *_inputs(shape, torch.float32, "cuda", "add_layer_norm"), torch.float32)
    x, res, w, b = _inputs(shape, torch.bfloat16, "cuda", "layer_norm")
    dy = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    with fastdl.use_backend(backend):
        runs = [torch.autograd.grad(fastdl.ops.layer_norm(x, shape[-1], w, b), (w, b), dy) for _ in range(2)]
    assert all(torch.equal(a, c) for a, c in zip(*runs)), "two runs gave different parameter gradients"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(37, 7), (1000, 512), (300, 1001), (64, 8192), (64, 12008), (16, 12001)],
                         ids=str)
@pytest.mark.parametrize("case", CUDA_CASES, ids=case_id)
@pytest.mark.parametrize("knob", ["1", "0"])
def test_cuda_backward_param_kernel_knob(case, shape, dtype, knob, monkeypatch):
    """FASTDL_CUDA_NORM_PARAM_KERNEL=1 (dx alone from the tile, packed or loop kernel,
    norm_param_grad_kernel sums dweight / dbias): warp and block tiles, 16-bit rows held packed
    and past the tiles, rows on 16-byte boundaries and not, parameters in fp32 and in x's dtype;
    right, and the same bits twice. =0 likewise (the tile's own sums, which 16-bit rows past 2048
    columns take only so)."""
    monkeypatch.setenv("FASTDL_CUDA_NORM_PARAM_KERNEL", knob)
    backend, _ = case
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    _check(backend, "add_layer_norm", *_inputs(shape, dtype, "cuda", "add_layer_norm", weight_dtype=wide), dtype)
    _check(backend, "rms_norm", *_inputs(shape, dtype, "cuda", "rms_norm"), dtype)
    x, res, w, b = _inputs(shape, dtype, "cuda", "layer_norm")
    dy = torch.randn(shape, device="cuda", dtype=dtype)
    with fastdl.use_backend(backend):
        runs = [torch.autograd.grad(fastdl.ops.layer_norm(x, shape[-1], w, b), (x, w, b), dy) for _ in range(2)]
    assert all(torch.equal(a, c) for a, c in zip(*runs)), "two runs gave different gradients"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", CUDA_CASES, ids=case_id)
def test_cuda_backward_shared_sums_knob(case, dtype, monkeypatch):
    """The backward loop kernel's dweight / dbias sums in shared memory (default: all 20000
    columns in fp32, the first 14464 in fp64) or through the partial rows only
    (FASTDL_CUDA_NORM_SHARED_SUMS=0): right either way, and the same bits (as many blocks)."""
    backend, _ = case
    shape = (300, 20000)
    monkeypatch.setenv("FASTDL_CUDA_NORM_BLOCKS_PER_SM", "1")
    x, res, w, b = _inputs(shape, dtype, "cuda", "add_layer_norm")
    _check(backend, "add_layer_norm", x, res, w, b, dtype)
    dy = torch.randn(shape, device="cuda", dtype=dtype)
    runs = []
    for shared in ("1", "0"):
        monkeypatch.setenv("FASTDL_CUDA_NORM_SHARED_SUMS", shared)
        with fastdl.use_backend(backend):
            runs.append(torch.autograd.grad(fastdl.ops.layer_norm(x, shape[-1], w, b), (x, w, b), dy))
    assert all(torch.equal(a, c) for a, c in zip(*runs)), "shared-memory sums gave other gradient bits"


@pytest.mark.parametrize("cols", [16392, 16389])
@pytest.mark.parametrize("variant", ["add_layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CUDA_CASES, ids=case_id)
def test_cuda_forward_loop_blocks_knob(case, dtype, variant, cols, monkeypatch):
    """FASTDL_CUDA_LOOP_BLOCKS_PER_SM=1: the forward's loop kernel (past 16384 columns) in one block
    an SM, each walking rows, over more rows than SMs (whole vectors and an odd width), forward and
    backward against float64."""
    backend, device = case
    monkeypatch.setenv("FASTDL_CUDA_LOOP_BLOCKS_PER_SM", "1")
    rows = torch.cuda.get_device_properties(device).multi_processor_count * 2 + 3
    _check(backend, variant, *_inputs((rows, cols), dtype, "cuda", variant), dtype)


@pytest.mark.parametrize("cols", [2056, 4096, 8192, 12000, 16384])
@pytest.mark.parametrize("weight_dtype", [torch.float32, None], ids=["fp32 params", "x's dtype params"])
@pytest.mark.parametrize("variant", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CUDA_CASES, ids=case_id)
@pytest.mark.parametrize("knob", ["1", "0"])
def test_cuda_packed_forward_knob(case, dtype, variant, weight_dtype, cols, knob, monkeypatch):
    """FASTDL_CUDA_PACKED_NORM=1 (the default): the forward of aligned 16-bit rows of 2049-16384
    columns held as they are (kernels/layer_norm.cu's packed kernel), forward and backward
    against float64; =0, the tile kernel likewise."""
    backend, _ = case
    x, res, w, b = _inputs((64, cols), dtype, "cuda", variant, weight_dtype)
    monkeypatch.setenv("FASTDL_CUDA_PACKED_NORM", knob)
    _check(backend, variant, x, res, w, b, dtype)


# Row lengths at each edge of the CUDA kernels' shapes (tiles of a warp x 8 values up to
# 1024 x 16 forward and 512 x 16 backward, half that for fp64, then the loop kernels),
# run on the native backends, which take them fast; rows aligned to 16 bytes and rows
# one element off.
EDGE_COLS = [255, 256, 257, 512, 513, 1024, 1025, 2048, 2049, 4096, 4097, 8192, 8200, 16384, 16392]
NATIVE_CASES = [c for c in CASES if c[0] in ("cuda", "cpu")]


@pytest.mark.parametrize("variant", ["add_layer_norm", "rms_norm"])
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("cols", EDGE_COLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_kernel_shape_edges(case, dtype, cols, misaligned, variant):
    backend, device = case
    rows = 37  # warp tiles take 4 rows a block: a partial last block
    x, res, w, b = _inputs((rows, cols + 8), dtype, device, variant)
    x = (x[:, 1 : cols + 1] if misaligned else x[:, :cols]).detach().requires_grad_()
    res = res[:, :cols].detach().requires_grad_() if res is not None else None
    params = slice(1, cols + 1) if misaligned else slice(0, cols)  # misaligned fp32 weights too
    w = w[params].detach().requires_grad_()
    b = b[params].detach().requires_grad_() if b is not None else None
    _check(backend, variant, x, res, w, b, dtype)


@pytest.mark.parametrize("residual", ["none", "x's dtype", "fp32"])
@pytest.mark.parametrize("cols", [7, 300, 20000])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_native_fp32_norm_of_16_bit_row_views(case, dtype, cols, residual):
    """The native ops' one-pass paths from 16-bit rows to an fp32 y (x alone; beside a residual
    of its dtype, the sum in it; beside an fp32 residual, the sum fp32) and back, on row views
    of wider tensors one element in: x, residual, dy and dsum each read at its own stride. y,
    the sum (torch's x + residual, bit for bit), mean, rstd, dx, dweight and dbias against
    float64; beside an fp32 residual the backward also writes x's gradient (narrow_dtype), dx's
    bits rounded."""
    backend, device = case
    rows, eps = 5, 1e-5

    def row_view(dt, width):  # (rows, cols) of a (rows, cols + width) tensor, one element in
        return torch.randn(rows, cols + width, device=device).to(dt)[:, 1 : cols + 1]

    x = row_view(dtype, 9)
    res = None if residual == "none" else row_view(dtype if residual == "x's dtype" else torch.float32, 5)
    w, b = torch.rand(cols, device=device) + 0.5, torch.randn(cols, device=device)
    inputs = [t.clone() for t in (x, res) if t is not None]
    y, h, mean, rstd = torch.ops.fastdl.layer_norm_rows_forward(x, res, w, b, eps, False, torch.float32)
    rows_normalised = x if res is None else x + res
    if res is not None:
        assert h.dtype == rows_normalised.dtype and torch.equal(h, rows_normalised)
    assert y.dtype == mean.dtype == rstd.dtype == torch.float32
    h64, w64, b64 = (t.double().requires_grad_() for t in (rows_normalised, w, b))
    mean64 = h64.mean(-1)
    rstd64 = ((h64 - mean64[:, None]) ** 2).mean(-1).add(eps).rsqrt()
    ref = R.layer_norm(h64, cols, w64, b64, eps)
    for out, expected, name in ((y, ref, "y"), (mean, mean64, "mean"), (rstd, rstd64, "rstd")):
        assert_close(out, expected, torch.float32, name)
    # the backward takes the rows normalised (16-bit, or the fp32 sum) beside an fp32 dy
    dy, dsum = row_view(torch.float32, 3), row_view(rows_normalised.dtype, 7) if res is not None else None
    narrow = dtype if residual == "fp32" else None
    dx, dweight, dbias, dx_narrow = torch.ops.fastdl.layer_norm_rows_backward(dy, dsum, rows_normalised, w, mean,
                                                                              rstd, True, False, narrow)
    ref_dh, ref_dw, ref_db = torch.autograd.grad(ref, (h64, w64, b64), dy.double())
    if dsum is not None:
        ref_dh = ref_dh + dsum.double()
    assert dx.dtype == rows_normalised.dtype and dweight.dtype == dbias.dtype == torch.float32
    assert_close(dx, ref_dh, rows_normalised.dtype, "dx")
    assert_close(dweight, ref_dw, torch.float32, "dweight")
    assert_close(dbias, ref_db, torch.float32, "dbias")
    if narrow is not None:
        assert dx_narrow.dtype == dtype and torch.equal(dx_narrow, dx.to(dtype)), "dx_narrow is not dx rounded"
    else:
        assert dx_narrow.numel() == 0
    assert all(torch.equal(a, c) for a, c in zip(inputs, [t for t in (x, res) if t is not None]))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gradcheck_float64(case):
    backend, device = case
    for variant in ("layer_norm", "rms_norm", "add_layer_norm"):
        x, res, w, b = _inputs((3, 9), torch.float64, device, variant)
        leaves = [t for t in (x, res, w, b) if t is not None]
        fn = VARIANTS[variant][0]

        def f(*args):
            it = iter(args)
            xx = next(it)
            rr = next(it) if res is not None else None
            ww = next(it)
            bb = next(it) if b is not None else None
            return _call(fn, variant, xx, rr, ww, bb, 9, 1e-5)

        with fastdl.use_backend(backend):
            assert torch.autograd.gradcheck(f, leaves), variant


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_leading_dims_multi_dim_shape_and_views(case):
    backend, device = case
    base = torch.randn(4, 6, 5, 8, device=device)
    x = base.transpose(0, 1)[:, :, 1:, :].requires_grad_()  # non-contiguous, (6, 4, 4, 8)
    w = (torch.rand(4, 8, device=device) + 0.5).requires_grad_()
    b = torch.randn(4, 8, device=device, requires_grad=True)
    dy = torch.randn(x.shape, device=device).transpose(0, 1).contiguous().transpose(0, 1)  # strided too
    with fastdl.use_backend(backend):
        y = fastdl.ops.layer_norm(x, (4, 8), w, b)
        grads = torch.autograd.grad(y, (x, w, b), dy)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = R.layer_norm(leaves64[0], (4, 8), leaves64[1], leaves64[2])
    assert_close(y, ref, torch.float32)
    for name, g, r in zip("xwb", grads, torch.autograd.grad(ref, leaves64, dy.double())):
        assert g.shape == r.shape, name
        assert_close(g, r, torch.float32, f"grad of {name}")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_native_backends_record_a_cpp_autograd_node(case, variant):
    """cpu / cuda record the backward as a C++ node (csrc/autograd/layer_norm.cpp), no Python
    autograd.Function: a training step runs no Python in the backward."""
    backend, device = case
    x, res, w, b = _inputs((3, 8), torch.float32, device, variant)
    with fastdl.use_backend(backend):
        out = _call(VARIANTS[variant][0], variant, x, res, w, b, 8, 1e-5)
    for o in out if res is not None else (out,):
        assert "NormRows" in o.grad_fn.name(), o.grad_fn.name()


@pytest.mark.parametrize("leaf", ["x", "residual", "weight", "bias"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_one_input_requiring_grad_gets_its_gradient(case, leaf):
    """Only one of x, residual, weight, bias requires grad (a frozen layer, fine-tuning the
    norms alone): the call still records its backward and that input's gradient matches,
    in a 3-D call (the native ops' reshapes) and in no_grad (no graph at all)."""
    backend, device = case
    x, res, w, b = (t.detach() for t in _inputs((6, 40), torch.float32, device, "add_layer_norm"))
    x, res = x.view(2, 3, 40), res.view(2, 3, 40)
    inputs = {"x": x, "residual": res, "weight": w, "bias": b}
    inputs[leaf].requires_grad_()
    dy = torch.randn_like(x)
    with fastdl.use_backend(backend):
        with torch.no_grad():
            assert not fastdl.ops.add_layer_norm(x, res, 40, w, b)[1].requires_grad
        _, y = fastdl.ops.add_layer_norm(x, res, 40, w, b)
        (grad,) = torch.autograd.grad(y, inputs[leaf], dy)
    inputs64 = {k: t.detach().double().requires_grad_(k == leaf) for k, t in inputs.items()}
    _, y64 = R.add_layer_norm(inputs64["x"], inputs64["residual"], 40, inputs64["weight"], inputs64["bias"])
    (ref,) = torch.autograd.grad(y64, inputs64[leaf], dy.double())
    assert_close(grad, ref, torch.float32, f"grad of {leaf}")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_no_grad_and_inference_mode(case):
    """No graph is recorded under no_grad, though every input requires grad, and an
    inference_mode call gives inference tensors: the eager paths that skip the autograd
    node (the native ops' forward alone) are right."""
    backend, device = case
    x, res, w, b = _inputs((6, 40), torch.float32, device, "add_layer_norm")
    x, res = x.view(2, 3, 40), res.view(2, 3, 40)
    with torch.no_grad():
        ref_h, ref_y = R.add_layer_norm(x.double(), res.double(), 40, w.double(), b.double())
    with fastdl.use_backend(backend):
        for mode in (torch.no_grad, torch.inference_mode):
            with mode():
                h, y = fastdl.ops.add_layer_norm(x, res, 40, w, b)
            for out, ref in ((h, ref_h), (y, ref_y)):
                assert out.grad_fn is None and not out.requires_grad
                assert out.is_inference() == (mode is torch.inference_mode)
                assert out.shape == x.shape
                assert_close(out, ref, torch.float32, mode.__name__)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_zero_rows(case):
    backend, device = case
    x = torch.randn(0, 16, device=device, requires_grad=True)
    w = torch.ones(16, device=device, requires_grad=True)
    with fastdl.use_backend(backend):
        y = fastdl.ops.layer_norm(x, 16, w)
        y.sum().backward()
    assert y.shape == (0, 16) and torch.equal(w.grad, torch.zeros(16, device=device))
    # rows but an empty normalized shape: empty output of x's shape, as torch
    x = torch.randn(3, 0, device=device, requires_grad=True)
    with fastdl.use_backend(backend):
        y = fastdl.ops.layer_norm(x, (0,))
        y.sum().backward()
    assert y.shape == (3, 0) and x.grad.shape == (3, 0)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_sum_alone_or_norm_alone_backpropagates(case):
    """Only one output of add_layer_norm feeds the loss: the other's gradient is absent."""
    backend, device = case
    x, res, w, b = _inputs((4, 24), torch.float32, device, "add_layer_norm")
    with fastdl.use_backend(backend):
        h, y = fastdl.ops.add_layer_norm(x, res, 24, w, b)
        gx_sum, gr_sum = torch.autograd.grad(h.sum(), (x, res))
        h, y = fastdl.ops.add_layer_norm(x, res, 24, w, b)
        gx_norm, = torch.autograd.grad((y * y).sum(), (x,))
    torch.testing.assert_close(gx_sum, torch.ones_like(x))
    torch.testing.assert_close(gr_sum, torch.ones_like(res))
    x64, r64 = x.detach().double().requires_grad_(), res.detach().double()
    _, y64 = R.add_layer_norm(x64, r64, 24, w.detach().double(), b.detach().double())
    (ref,) = torch.autograd.grad((y64 * y64).sum(), (x64,))
    assert_close(gx_norm, ref, torch.float32)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_inputs_not_modified(case):
    backend, device = case
    x, res, w, b = _inputs((5, 33), torch.float32, device, "add_layer_norm")
    before = [t.detach().clone() for t in (x, res, w, b)]
    with fastdl.use_backend(backend):
        h, y = fastdl.ops.add_layer_norm(x, res, 33, w, b)
        torch.autograd.grad((h, y), (x, res, w, b), (torch.ones_like(h), torch.ones_like(y)))
    for t, saved in zip((x, res, w, b), before):
        assert torch.equal(t.detach(), saved)


class TestBadInputs:
    def test_normalized_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"fastdl\.layer_norm: normalized_shape \(5,\) does not match the last "
                                             r"dims of x of shape \(3, 4\)"):
            fastdl.ops.layer_norm(torch.randn(3, 4), 5)

    def test_weight_wrong_shape(self):
        with pytest.raises(ValueError, match=r"fastdl\.rms_norm: weight has shape \(5,\), expected normalized_shape \(4,\)"):
            fastdl.ops.rms_norm(torch.randn(3, 4), 4, torch.ones(5))

    def test_mixed_devices(self):
        with pytest.raises(ValueError, match=r"fastdl\.layer_norm: weight is on meta but x is on cpu"):
            fastdl.ops.layer_norm(torch.randn(3, 4), 4, torch.ones(4, device="meta"))
        with pytest.raises(ValueError, match=r"fastdl\.add_layer_norm: residual is on meta but x is on cpu"):
            fastdl.ops.add_layer_norm(torch.randn(3, 4), torch.randn(3, 4, device="meta"), 4)

    def test_residual_mismatch(self):
        with pytest.raises(ValueError, match=r"residual has shape \(3, 5\) but x has \(3, 4\)"):
            fastdl.ops.add_rms_norm(torch.randn(3, 4), torch.randn(3, 5), 4)
        with pytest.raises(TypeError, match=r"fastdl\.add_layer_norm: argument residual must be a floating-point"):
            fastdl.ops.add_layer_norm(torch.randn(3, 4), torch.ones(3, 4, dtype=torch.int64), 4)

    def test_integer_input(self):
        with pytest.raises(TypeError, match=r"fastdl\.layer_norm: argument x must be a floating-point tensor"):
            fastdl.ops.layer_norm(torch.ones(3, 4, dtype=torch.int64), 4)

    def test_bad_normalized_shape_type(self):
        with pytest.raises(TypeError, match=r"normalized_shape must be an int or a tuple of ints"):
            fastdl.ops.layer_norm(torch.randn(3, 4), (4.0,))

    def test_native_op_checks(self):
        if "cpu" not in fastdl.available_backends("cpu"):
            pytest.skip("fastdl._C not built")
        with pytest.raises(RuntimeError, match=r"weight must have shape \(4\)"):
            torch.ops.fastdl.layer_norm_rows_forward(torch.randn(3, 4), None, torch.ones(5), None, 1e-5, False)
        with pytest.raises(RuntimeError, match=r"x must be 2-D"):
            torch.ops.fastdl.layer_norm_rows_forward(torch.randn(3), None, None, None, 1e-5, False)
        x = torch.randn(3, 4, dtype=torch.bfloat16)
        with pytest.raises(RuntimeError, match=r"out_dtype must be the dtype of the rows normalised \(BFloat16: "
                                               r"x's, or x \+ residual's\) or Float, got Half"):
            torch.ops.fastdl.layer_norm_rows_forward(x, None, None, None, 1e-5, False, torch.float16)
        with pytest.raises(RuntimeError, match=r"out_dtype must be the dtype of the rows normalised \(Float: "):
            torch.ops.fastdl.layer_norm_rows_forward(x, x.float(), None, None, 1e-5, False, torch.bfloat16)
        with pytest.raises(RuntimeError, match=r"residual is Half but x is BFloat16; expected x's dtype, or Float "
                                               r"beside a Half / BFloat16 one"):
            torch.ops.fastdl.layer_norm_rows_forward(x, x.half(), None, None, 1e-5, False)
        _, _, mean, rstd = torch.ops.fastdl.layer_norm_rows_forward(x, None, None, None, 1e-5, False)
        with pytest.raises(RuntimeError, match=r"dy is Double but x is BFloat16; expected x's dtype or Float"):
            torch.ops.fastdl.layer_norm_rows_backward(x.double(), None, x, None, mean, rstd, False, False)
        with pytest.raises(RuntimeError, match=r"layer_norm_backward \(cpu\): narrow_dtype must be Half or BFloat16 "
                                               r"beside Float rows, got Half beside BFloat16"):
            torch.ops.fastdl.layer_norm_rows_backward(x, None, x, None, mean, rstd, False, False, torch.float16)
        _, _, mean, rstd = torch.ops.fastdl.layer_norm_rows_forward(x.float(), None, None, None, 1e-5, False)
        with pytest.raises(RuntimeError, match=r"narrow_dtype must be Half or BFloat16 beside Float rows, got Double"):
            torch.ops.fastdl.layer_norm_rows_backward(x.float(), None, x.float(), None, mean, rstd, False, False,
                                                      torch.float64)

    def test_triton_narrow_dtype_check(self):
        pytest.importorskip("triton")
        from fastdl.triton.layer_norm import norm_backward

        x = torch.randn(3, 4, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match=r"narrow_dtype must be float16 or bfloat16 beside float32 rows, got "
                                             r"torch.float16 beside torch.bfloat16"):
            norm_backward(x, None, x, None, None, torch.ones(3), False, True, torch.float16)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_modules_match_torch(case):
    backend, device = case
    x = torch.randn(4, 6, 10, device=device)
    for ours, theirs in [(fastdl.nn.LayerNorm((6, 10), device=device), torch.nn.LayerNorm((6, 10), device=device)),
                         (fastdl.nn.LayerNorm(10, bias=False, device=device),
                          torch.nn.LayerNorm(10, bias=False, device=device)),
                         (fastdl.nn.LayerNorm(10, elementwise_affine=False), torch.nn.LayerNorm(10, elementwise_affine=False)),
                         (fastdl.nn.RMSNorm(10, device=device), torch.nn.RMSNorm(10, device=device)),
                         (fastdl.nn.RMSNorm(10, eps=1e-6, device=device), torch.nn.RMSNorm(10, eps=1e-6, device=device))]:
        with torch.no_grad():
            for p in ours.parameters():
                p.uniform_(0.5, 1.5)
        theirs.load_state_dict(ours.state_dict())  # the round trip, torch <- fastdl
        assert ours.state_dict().keys() == theirs.state_dict().keys() and repr(ours) == repr(theirs)
        with fastdl.use_backend(backend):
            out = ours(x)
        torch.testing.assert_close(out, theirs(x), rtol=1e-5, atol=1e-5)
        ours.load_state_dict(theirs.state_dict())  # and back


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_add_modules(case):
    backend, device = case
    x, res = torch.randn(5, 12, device=device), torch.randn(5, 12, device=device)
    for fused, plain in [(fastdl.nn.AddLayerNorm(12, device=device), torch.nn.LayerNorm(12, device=device)),
                         (fastdl.nn.AddRMSNorm(12, device=device), torch.nn.RMSNorm(12, device=device))]:
        plain.load_state_dict(fused.state_dict())
        with fastdl.use_backend(backend):
            h, y = fused(x, res)
        torch.testing.assert_close(h, x + res)
        torch.testing.assert_close(y, plain(x + res), rtol=1e-5, atol=1e-5)


def test_patch_swaps_norms_and_keeps_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.RMSNorm(8))
    params = list(model.parameters())
    x = torch.randn(3, 8)
    before = model(x)
    fastdl.patch(model)
    assert type(model[1]) is fastdl.nn.LayerNorm and type(model[2]) is fastdl.nn.RMSNorm
    assert all(a is b for a, b in zip(model.parameters(), params))
    torch.testing.assert_close(model(x), before)


def test_module_fallback_and_strict():
    x = torch.randn(3, 8)
    with fastdl.use_backend("cuda"):
        with pytest.warns(UserWarning, match="LayerNorm: falling back to torch"):
            out = fastdl.nn.LayerNorm(8)(x)
        torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (8,)))
        with pytest.raises(fastdl.BackendUnavailableError):
            fastdl.nn.AddRMSNorm(8, strict=True)(x, x)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16 x, fp32 residual"])
@pytest.mark.parametrize("backend", compile_backends())
def test_torch_compile_fullgraph(backend, x_dtype):
    """torch.compile(fullgraph=True) traces through the custom ops and matches eager,
    forward and backward (Triton under the interpreter cannot be compiled: on the GPU); with a
    bf16 x beside the fp32 residual, x's gradient comes from the backward op in bf16."""
    device = "cuda" if backend in ("triton", "cuda") else "cpu"
    if backend not in fastdl.available_backends(device):
        pytest.skip(f"backend {backend} not available")
    w = torch.rand(16, device=device) + 0.5
    b = torch.randn(16, device=device)

    def f(x, r):
        h, y = fastdl.ops.add_layer_norm(x, r, 16, w, b)
        h2, _ = fastdl.ops.add_rms_norm(y, h, 16, w)  # only the sum of this one is used
        return fastdl.ops.rms_norm(y * 2, 16, w).sum() + h.mean() + h2.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    x = torch.randn(4, 16, device=device).to(x_dtype).requires_grad_()
    r = torch.randn(4, 16, device=device, requires_grad=True)
    with fastdl.use_backend(backend):
        eager = f(x, r)
        g_eager = torch.autograd.grad(eager, (x, r))
        out = compiled(x, r)
        g_out = torch.autograd.grad(out, (x, r))
    torch.testing.assert_close(out, eager)
    for a, c in zip(g_out, g_eager):
        assert a.dtype == c.dtype
        torch.testing.assert_close(a, c)


class _MLP(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up, self.down = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


@pytest.mark.parametrize("cols", [40, 20000], ids=["tile", "loop"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                    (torch.float32, torch.float16), (torch.float16, torch.bfloat16)], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_add_of_two_dtypes_promotes_as_torch(case, dtypes, cols):
    """x and residual of two float dtypes: the sum in the promoted dtype, as torch's x + residual
    (an fp32 residual stream beside a bf16 sublayer output under autocast), and its norm;
    each input's gradient (the sum's, plus the norm's) in its own dtype. A 16-bit one beside
    an fp32 one is read as it is."""
    backend, device = case
    x = torch.randn(3, cols, device=device).to(dtypes[0]).requires_grad_()
    residual = torch.randn(3, cols, device=device).to(dtypes[1]).requires_grad_()
    w = (torch.rand(cols, device=device) + 0.5).requires_grad_()
    b = torch.randn(cols, device=device).requires_grad_()
    with fastdl.use_backend(backend):
        h, y = fastdl.ops.add_layer_norm(x, residual, cols, w, b)
    common = torch.promote_types(*dtypes)
    assert h.dtype == y.dtype == common
    assert torch.equal(h, x + residual)
    if torch.float32 in dtypes:  # a 16-bit one beside fp32: both read as they are, no cast first
        assert {e[0].variable for e in y.grad_fn.next_functions[:2]} == {x, residual}, "cast before the norm"
    _check_fused_add(R.layer_norm, h, y, x, residual, w, b, 1e-5)


@pytest.mark.parametrize("variant", ["add_layer_norm", "add_rms_norm"])
@pytest.mark.parametrize("cols", [37, 40, 20000], ids=["odd", "tile", "loop"])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fused_add_pair_backward_gives_each_input_its_dtype(case, dtypes, cols, variant):
    """A 16-bit x beside an fp32 residual (or the other way round): the backward node itself
    returns the 16-bit one's gradient in its dtype, written beside the fp32 one's by the
    backward kernel, so autograd has no cast to make after it (it would read the fp32
    gradient again); its bits are the fp32 gradient's rounded. (Triton casts after the kernel
    for rows off 16-byte boundaries, such as 37 columns. Values: against float64 in
    test_fused_add_of_two_dtypes_promotes_as_torch.)"""
    backend, device = case
    fn, _, _, _, has_b, _ = VARIANTS[variant]
    x = torch.randn(3, cols, device=device).to(dtypes[0]).requires_grad_()
    residual = torch.randn(3, cols, device=device).to(dtypes[1]).requires_grad_()
    w = (torch.rand(cols, device=device) + 0.5).requires_grad_()
    b = torch.randn(cols, device=device).requires_grad_() if has_b else None
    with fastdl.use_backend(backend):
        h, y = _call(fn, variant, x, residual, w, b, cols, 1e-5)
    node = y.grad_fn
    assert h.grad_fn is node
    with torch.no_grad():  # the node's own outputs, before the engine sees them
        grads = (node if callable(node) else node.apply)(torch.randn_like(y), torch.randn_like(h))
    dx, dresidual = grads[:2]
    assert dx.dtype == x.dtype and dresidual.dtype == residual.dtype
    narrow, wide = (dx, dresidual) if x.dtype != torch.float32 else (dresidual, dx)
    assert torch.equal(narrow, wide.to(narrow.dtype)), "the 16-bit gradient is not the fp32 one rounded"


@pytest.mark.parametrize("kind", ["bf16", "bf16, fp32 rule"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_pre_norm_sequence_under_autocast(case, kind):
    """A pre-norm stack of Linear sublayers under autocast: the residual stream stays fp32
    while the sublayers give bf16, and each fused add promotes as torch's x + residual does;
    the output's dtype and values are those of the same stack written with torch.nn."""
    backend, device = case
    d = 16
    # the sublayers are the caller's: built on the device (PreNormSequence's device= is its norms')
    block = fastdl.nn.PreNormSequence(d, [torch.nn.Linear(d, d, device=device), torch.nn.Linear(d, d, device=device)],
                                      device=device)
    x = torch.randn(4, d, device=device, requires_grad=True)
    with autocast_as(kind, device), fastdl.use_backend(backend):
        out = block(x)
        (dx,) = torch.autograd.grad(out.float().sum(), x)
        h = x
        for i, f in enumerate(block.sublayers):
            h = h + f(torch.nn.functional.layer_norm(h, (d,), block.norms[i].weight, block.norms[i].bias))
        ref = torch.nn.functional.layer_norm(h, (d,), block.norms[-1].weight, block.norms[-1].bias)
        (ref_dx,) = torch.autograd.grad(ref.float().sum(), x)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx, ref_dx, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("final_norm", [True, False])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_pre_norm_sequence_matches_unfused(case, norm, final_norm):
    """PreNormSequence == x <- x + f(norm(x)) per sublayer (+ final norm), written with torch.nn."""
    backend, device = case
    torch.manual_seed(0)
    d = 24
    block = fastdl.nn.PreNormSequence(d, [_MLP(d), _MLP(d), _MLP(d)], norm=norm, final_norm=final_norm,
                                      device=device).to(device)
    with torch.no_grad():
        for nm in block.norms:
            nm.weight.uniform_(0.5, 1.5)
    x = torch.randn(5, 7, d, device=device, requires_grad=True)
    with fastdl.use_backend(backend):
        out = block(x)
        grads = torch.autograd.grad(out.square().sum(), [x] + list(block.parameters()))

    def unfused(x_):
        norm_fn = (lambda m, t: torch.nn.functional.layer_norm(t, (d,), m.weight, m.bias, m.eps)) if norm == "layer" \
            else (lambda m, t: torch.nn.functional.rms_norm(t, (d,), m.weight, m.eps))
        h = x_
        for i, f in enumerate(block.sublayers):
            h = h + f(norm_fn(block.norms[i], h))
        return norm_fn(block.norms[-1], h) if final_norm else h

    ref = unfused(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x] + list(block.parameters()))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    assert len(block.norms) == 3 + final_norm


def test_pre_norm_sequence_bad_arguments():
    with pytest.raises(ValueError, match=r"fastdl\.nn\.PreNormSequence: argument norm must be 'layer' or 'rms'"):
        fastdl.nn.PreNormSequence(8, [torch.nn.Identity()], norm="batch")
    with pytest.raises(ValueError, match="argument sublayers is empty"):
        fastdl.nn.PreNormSequence(8, [])
