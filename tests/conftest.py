"""Shared test set-up.

On a machine without a GPU the Triton kernels run under the interpreter on CPU
tensors: TRITON_INTERPRET=1 must be set before any kernel is decorated, so it is
set here, before fastdl.triton is imported. On a GPU machine it is left unset.
"""
import contextlib
import importlib
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# one Triton config per kernel: tests check results, autotuning only costs time
os.environ.setdefault("FASTDL_TRITON_AUTOTUNE", "0")


def _interpreter_max_drops_nan_as_a_gpu_does():
    """A GPU's default tl.maximum / tl.minimum (propagate_nan=NONE) is LLVM's maxnum: NaN
    loses to the other operand. The interpreter uses numpy's maximum, where NaN wins, and so
    hid kernels that lose a NaN. Give it the GPU's semantics (np.fmax / np.fmin)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy as np
        from triton.runtime.interpreter import InterpreterBuilder
    except ImportError:  # no triton: its tests are skipped anyway
        return
    InterpreterBuilder.create_maxnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmax)
    InterpreterBuilder.create_minnumf = lambda self, lhs, rhs: self.binary_op(lhs, rhs, np.fmin)


_interpreter_max_drops_nan_as_a_gpu_does()


def _interpreter_rounds_bf16_as_a_gpu_does():
    """A GPU converts fp32 to bf16 rounding to nearest even (cvt.rn.bf16.f32), as torch does.
    The interpreter truncates (triton.runtime.interpreter._convert_float, Triton 3.6), so a
    kernel's bf16 values sat up to an ulp below torch's: the Triton fused add's x + residual
    differed from torch's, and the norm's dweight from what the float64 reference of the
    values it had written gives (~2.5e-3 relative). Give it the GPU's rounding, through torch."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    except ImportError:
        return
    truncating = InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            values = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            return TensorHandle(values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return truncating(self, src, dst_type)

    InterpreterBuilder.cast_impl = cast_impl


_interpreter_rounds_bf16_as_a_gpu_does()


def _interpreter_patches_the_language_once_a_launch():
    """The interpreter runs a kernel with triton.language's functions swapped for its own
    (triton.runtime.interpreter._patch_lang, undone when the launch ends), and swaps them again
    at every call of a @triton.jit helper inside it (tl.sum included), never undone: four
    inspect.getmembers and 17 setattrs of the same values each time, ~5,400 times in the
    add_layer_norm bf16 test of 1024 x 768 (3.4 of its 18 s under cProfile). Skip that where
    the running launch has patched every language module the helper sees (tl, tl.core); patch
    as Triton does otherwise. The tests with "triton" in their names: 362 -> 313 s of CPU
    (2 workers, 183 -> 158 s)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import inspect

        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_lang, run_launch = interpreter._patch_lang, interpreter.GridExecutor.__call__
    # the language modules (tl, tl.core) patched since the running launch began: launches
    # never nest (a kernel launches none); None outside one
    patched_in_launch = [None]

    def language_modules(fn):
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)}

    def patch_lang_once(fn):
        modules, patched = language_modules(fn), patched_in_launch[0]
        if patched is not None and modules <= patched:
            return interpreter._LangPatchScope()  # nothing to undo
        scope = patch_lang(fn)
        if patched is not None:
            patched |= modules
        return scope

    def run_launch_patching_once(self, *args, **kwargs):
        patched_in_launch[0] = set()
        try:
            return run_launch(self, *args, **kwargs)
        finally:
            patched_in_launch[0] = None

    interpreter._patch_lang = patch_lang_once
    interpreter.GridExecutor.__call__ = run_launch_patching_once


_interpreter_patches_the_language_once_a_launch()

import pytest  # noqa: E402

from fastdl import _native, _outputs, backends  # noqa: E402

# ||out - ref|| / ||ref|| against the float64 reference (../shared/DESIGN.md)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# FASTDL_TEST_DEVICES=cuda: only the CUDA cases of the (backend, device) tests. A lent GPU's
# few minutes go to what only it can run; the CPU cases run in CI on every commit.
if os.environ.get("FASTDL_TEST_DEVICES"):
    DEVICES = [d for d in DEVICES if d in os.environ["FASTDL_TEST_DEVICES"].split(",")]
ON_CI = os.environ.get("CI") == "true"


def compile_backends():
    """The backends test_torch_compile_fullgraph compiles, on the devices in DEVICES (cpu and
    torch compile on the CPU; triton and cuda on the GPU)."""
    return (["cpu", "torch"] if "cpu" in DEVICES else []) + (["triton", "cuda"] if "cuda" in DEVICES else [])


# torch.compile of CPU code (inductor's C++ kernels), for tests that have no device to choose:
# skipped when FASTDL_TEST_DEVICES leaves the CPU out. On the H200 machine, with the test
# workers compiling Triton kernels beside it, one such test ran past pytest-timeout's 120 s.
needs_cpu_tests = pytest.mark.skipif("cpu" not in DEVICES, reason="FASTDL_TEST_DEVICES leaves out the CPU")


def backend_cases():
    """(backend, device) pairs that can run on this machine."""
    return [(b, d) for d in DEVICES for b in backends.available_backends(d)]


# Tensors of more than 2^31 elements (test_past_2_31_elements in test_softmax.py and
# test_layer_norm.py), where an int32 element offset wraps. fastdl's own backends only, on a GPU
# when its memory is free; on the CPU only when asked (FASTDL_TEST_LARGE=1: ~18 GB of memory
# and ~1 min a case; CI's machine has 24 GiB for two test workers), and never Triton's
# interpreter (a Python call a program).
LARGE_ELEMENTS = 2**31
LARGE_CASES = [(b, d) for b, d in backend_cases() if b in ("triton", "cuda", "cpu") and (d == "cuda" or b == "cpu")]


@contextlib.contextmanager
def large_tensor_turn():
    """One large-tensor test at a time across the pytest-xdist workers of this machine (a
    file lock: 14 workers at ~18 GB each would not fit an H200's 141 GB), and its memory
    handed back to the device afterwards, not kept in this worker's cache."""
    import fcntl
    import gc
    import tempfile

    with open(os.path.join(tempfile.gettempdir(), "fastdl-large-tensors.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            fcntl.flock(lock, fcntl.LOCK_UN)


def skip_without_memory(device, nbytes):
    """Skip a large-tensor test whose tensors (nbytes in all) the device cannot hold (a GPU:
    twice over), or on the CPU unless FASTDL_TEST_LARGE=1."""
    if device == "cpu" and os.environ.get("FASTDL_TEST_LARGE") != "1":
        pytest.skip("tensors of 2^31 elements on the CPU: only with FASTDL_TEST_LARGE=1")
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        if free < 2 * nbytes:
            pytest.skip(f"needs {2 * nbytes / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} free")
    else:
        with open("/proc/meminfo") as meminfo:
            available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
        if available < 1.1 * nbytes:
            pytest.skip(f"needs {1.1 * nbytes / 2**30:.0f} GiB of free memory, {available / 2**30:.0f} available")


def rows_2_31_elements_apart(cols, dtype, device):
    """Three rows of `cols` random values, 2^31 + 8 elements apart: a view into a buffer of more
    than 2^32 elements, of which only the rows' own pages are ever touched (the CPU maps the rest
    as it is touched; a GPU's memory is taken whole, so skipped without it)."""
    stride = LARGE_ELEMENTS + 8  # rows stay 16-byte aligned
    if device == "cuda":
        skip_without_memory(device, (2 * stride + cols) * dtype.itemsize)
    base = torch.empty(2 * stride + cols, dtype=dtype, device=device)
    rows = base.as_strided((3, cols), (stride, 1))
    rows.copy_(torch.randn(3, cols, device=device) * 3)
    return rows


def large_rows_to_check(rows, cols):
    """The rows a large-tensor test compares with float64: the first, those either side of
    element 2^31 (the first row to start past it), the last."""
    past = -(-LARGE_ELEMENTS // cols)
    return sorted({0, past - 2, past - 1, past, rows - 1})


def random_shape(rng, max_dims=4, max_numel=4096, last_sizes=(1, 2, 3, 5, 8, 17, 33, 64, 100)):
    """1 to max_dims sizes, odd and even (the last one of last_sizes), of at most max_numel
    elements in all."""
    shape = [rng.choice(last_sizes)]
    for _ in range(rng.randint(0, max_dims - 1)):
        size = rng.choice([1, 2, 3, 5, 8, 17, 33, 64, 100])
        if math.prod(shape) * size > max_numel:
            break
        shape.insert(0, size)
    return shape


def random_layout(shape, dtype, device, rng, varies_along=None):
    """(N(0, 1) values of `shape` in dtype, in a layout drawn from rng: contiguous, its dims
    permuted, sliced out of a larger tensor, every other element, expanded along a dim (stride
    0; never dim `varies_along`), or one element past its storage's start; and the layout's
    name)."""
    n = len(shape)
    kept = None if varies_along is None else varies_along % n
    expandable = [d for d in range(n) if d != kept]
    kind = rng.choice(["contiguous", "permuted", "sliced", "stepped", "offset"] + (["expanded"] if expandable else []))
    if kind == "permuted":
        order = list(range(n))
        rng.shuffle(order)
        return torch.randn([shape[d] for d in order], device=device).to(dtype).permute(
            [order.index(d) for d in range(n)]), kind
    if kind == "sliced":
        base = torch.randn([size + 2 for size in shape], device=device).to(dtype)
        return base[tuple(slice(start := rng.randint(0, 2), start + size) for size in shape)], kind
    if kind == "stepped":
        return torch.randn([2 * size for size in shape], device=device).to(dtype)[(slice(None, None, 2),) * n], kind
    if kind == "expanded":
        one = list(shape)
        one[rng.choice(expandable)] = 1
        return torch.randn(one, device=device).to(dtype).expand(shape), kind
    if kind == "offset":
        return torch.randn(math.prod(shape) + 1, device=device).to(dtype)[1:].view(shape), kind
    return torch.randn(shape, device=device).to(dtype), kind


def hard_statistics_rows(cols, device="cpu"):
    """fp32 rows whose mean and variance a careless one-sweep method gets wrong: an offset 50x
    the spread (100 +- 2: an fp32 mean is within 4e-6 of it, 2e-6 of the spread), an outlier
    first value (1e5 among N(0, 1)), a spread 0.03 of the offset (1 +- 0.03: the sum of squares
    less the squared sum loses 3 of fp32's 7 digits), plain N(0, 1). (fp32 itself puts a mean
    half an ulp off: relative to the spread, 2e-6 at either offset, within the 1e-5 tolerance.)"""
    x = torch.randn(4, cols, device=device)
    x[0] = x[0] * 2 + 100
    x[1, 0] = 1e5
    x[2] = x[2] * 0.03 + 1
    return x


def nonfinite_rows(cols, device="cpu"):
    """fp32 rows holding NaN (first, and mid-row), +inf mid-row, -inf first, and a plain row
    last: a norm of each of the first four is NaN throughout (torch's), the last finite."""
    x = torch.randn(5, cols, device=device)
    x[0, 0] = math.nan
    x[1, cols // 2] = math.nan
    x[2, cols // 3] = math.inf
    x[3, 0] = -math.inf
    return x


def assert_norm_nans_as_torchs(y, h, rms, weight, bias):
    """y, a norm (eps 1e-5) of h = nonfinite_rows (plus any residual), has NaN where torch's
    CPU norm has (layer_norm: each of the first four rows throughout; rms_norm: their
    non-finite columns, x * rsqrt(inf) = inf * 0) and its values elsewhere. The CPU's, also
    for CUDA tensors: torch's CUDA rms_norm of 7 columns gives +-inf rows NaN throughout where
    at 1000 and 20000 columns it gives the CPU's (H200 run of 2b1309b; fastdl's backends give
    the CPU's at every width)."""
    cols = h.shape[-1]
    h, weight, bias = (None if t is None else t.cpu() for t in (h, weight, bias))
    y = y.cpu()
    ref = (torch.nn.functional.rms_norm(h, (cols,), weight, 1e-5) if rms
           else torch.nn.functional.layer_norm(h, (cols,), weight, bias, 1e-5))
    assert ref[:4].isnan().any(-1).all()
    assert torch.equal(y.isnan(), ref.isnan()), \
        f"NaN a row {y.isnan().sum(-1).tolist()}, torch's {ref.isnan().sum(-1).tolist()}"
    finite = ~ref.isnan()
    torch.testing.assert_close(y[finite], ref[finite], rtol=1e-4, atol=1e-4)


def case_id(case):
    return f"{case[0]}-{case[1]}"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere in out gives inf (never passes)."""
    out = out.detach().to(torch.float64)
    ref = ref.detach().to(device=out.device, dtype=torch.float64)
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if out.isnan().any() and not ref.isnan().any():
        return float("inf")
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(out, ref, dtype, what=""):
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], f"{what} relative error {err:.3g} > {TOLERANCE[dtype]:.0e} for {dtype}"


@contextlib.contextmanager
def autocast_as(kind, device):
    """torch.autocast(device, bf16) for kind "bf16"; for "bf16, fp32 rule" with fastdl.ops'
    autocast probe made to answer as CUDA autocast does (fp16 / bf16 softmax and norms in
    fp32), so that a CPU-only machine takes that path too (CPU autocast leaves them alone);
    None: no autocast. The probe's answers memoised in Python and in C++ are dropped on the
    way in and out."""
    if kind is None:
        yield
        return
    common = importlib.import_module("fastdl.ops._common")
    probes = dict(common._AUTOCAST_PROBES)

    def forget():
        common._autocast_probe.cache_clear()
        if _native.LOADED:
            _native._C.forget_resolutions()

    if kind.endswith("fp32 rule"):
        for name, probe in probes.items():
            common._AUTOCAST_PROBES[name] = \
                lambda t, probe=probe: probe(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t)
    forget()
    try:
        with torch.autocast(device, dtype=torch.bfloat16):
            yield
    finally:
        common._AUTOCAST_PROBES.update(probes)
        forget()


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every kernel output starts as NaN, so an element a kernel does not write fails."""
    _outputs.set_poison_outputs(True)
    yield
    _outputs.set_poison_outputs(False)


@pytest.fixture(autouse=True)
def seeded(request):
    """Fresh inputs per test, reproducible: seeded from the test's id."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def default_backend(monkeypatch):
    """No backend chosen: neither set_backend() nor FASTDL_BACKEND."""
    monkeypatch.setattr(backends, "_global_choice", None)
    monkeypatch.setattr(backends, "_env_choice", None)
