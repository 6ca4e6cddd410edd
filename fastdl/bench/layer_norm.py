"""LayerNorm / RMSNorm / fused add + LayerNorm benchmark cases: forward and
forward+backward, torch eager, torch.compile, apex's FusedLayerNorm when importable,
and every fastdl backend that runs on the device."""
import functools

import torch
import torch.nn.functional as F

import fastdl
from fastdl.bench import harness
from fastdl.bench.harness import Case, Impl
from fastdl.bench.targets import Target

GPU_ROWS, GPU_HIDDEN = (4096, 16384), (512, 1024, 4096, 8192, 16384)
GPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CPU_ROWS, CPU_HIDDEN, CPU_DTYPES = (4096,), (1024, 4096), (torch.float32,)
# 16-bit floats on the CPU at one size: the evidence for auto's CPU order by dtype (backends.py)
CPU_HALF_DTYPES, CPU_HALF_SHAPE = (torch.bfloat16, torch.float16), (4096, 1024)
# a small input (64 tokens of a BERT-base-sized model), timed as calls back to back: what
# a call costs the host (Python, dispatch, launch) when the kernels take microseconds
HOST_SHAPE = (64, 768)
# direction suffix of a mixed-precision training step's call: x in bf16, parameters in
# fp32, under torch.autocast(bf16) (on CUDA the norms then compute in fp32, as torch's do)
AUTOCAST = " autocast"
# the GPU sweep's autocast cases (bf16 x, 4096 rows): torch casts x to fp32, then normalises;
# fastdl reads x as it is and writes y in fp32, so the least traffic is 2 + 4 bytes a value
# forward and dy 4 + x 2 + dx 2 backward (the GB/s column counts that). The fused add: torch
# adds in bf16, casts the sum and normalises it; fastdl reads x and residual in bf16 and
# writes the sum in bf16 and y in fp32 (10 bytes a value), and its backward reads dy (fp32),
# the sum's gradient and the sum (bf16) and writes dx (bf16): 10 more
GPU_AUTOCAST_ROWS, GPU_AUTOCAST_HIDDEN = 4096, (1024, 4096, 8192)
# suffix of the fused add's autocast case with an fp32 residual stream beside the bf16 x (a
# sublayer's output): the sum and y in fp32, as torch's add promotes. torch adds (2 + 4 read,
# 4 written) then normalises (4 + 4); fastdl reads x and residual as they are and writes the
# sum and y: 14 bytes a value. Backward: dy, the sum's gradient and the sum read, the
# residual's gradient (fp32) and x's (bf16) written: 18 more
FP32_RESIDUAL = ", fp32 residual"
# past the sweep, at the longest hidden size (bf16, after every dtype's sweep): rows the
# loop kernels take, two reads of each forward (the targets cover the sweep's sizes only)
GPU_LONG_SHAPE = (1024, 65536)

# the norm issue's targets (H100, side by side in one run)
_ALL = ("bfloat16", "float16", "float32")
_SWEEP = max(GPU_HIDDEN)
TARGETS = [t for op in ("layer_norm", "rms_norm") for t in (
    Target(f"{op} fwd bf16, hidden >= 1024: >= 90% of copy bandwidth", op, "fwd", "cuda", ("bfloat16",),
           "pct_of_copy", 90.0, min_cols=1024, max_cols=_SWEEP),
    Target(f"{op} fwd+bwd bf16, hidden >= 1024: >= 80% of copy bandwidth", op, "fwd+bwd", "cuda", ("bfloat16",),
           "pct_of_copy", 80.0, min_cols=1024, max_cols=_SWEEP),
    Target(f"{op} fwd+bwd: >= 1.3x torch eager", op, "fwd+bwd", "cuda", _ALL, "vs_eager", 1.3, max_cols=_SWEEP),
    Target(f"{op} fwd+bwd: >= 1.0x torch.compile", op, "fwd+bwd", "cuda", _ALL, "vs_compile", 1.0, max_cols=_SWEEP),
)] + [
    Target("add_layer_norm fwd+bwd: >= 1.5x torch eager's add + layer_norm", "add_layer_norm", "fwd+bwd", "cuda",
           _ALL, "vs_eager", 1.5, max_cols=_SWEEP),
] + [
    Target(f"{op} {direction} fp32 4096x4096 (CPU): >= 1.0x torch eager", op, direction, "cpu", ("float32",),
           "vs_eager", 1.0, shapes=((4096, 4096),))
    for op in ("layer_norm", "rms_norm", "add_layer_norm") for direction in ("fwd", "fwd+bwd")
]


def _apex_layer_norm():
    try:
        from apex.normalization import fused_layer_norm_affine  # noqa: F401

        return fused_layer_norm_affine
    except ImportError:
        return None


def _timed(fn, direction, inputs, dy):
    """forward only, or forward + backward to every input (no .grad accumulation)."""
    if direction == "fwd":
        return lambda: fn(*inputs)

    def fwd_bwd():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(outs, inputs, dy[: len(outs)])

    return fwd_bwd


def _under_autocast(fn, device):
    def run(*args):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return fn(*args)

    return run


def _impls(op, device, dtype, shape, direction):
    wide_residual = direction.endswith(FP32_RESIDUAL)
    direction = direction.removesuffix(FP32_RESIDUAL)
    mixed = direction.endswith(AUTOCAST)
    direction = direction.removesuffix(AUTOCAST)
    rows, n = shape
    grad = direction != "fwd"
    param_dtype = torch.float32 if mixed else dtype
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=grad)
    w = torch.rand(n, device=device, dtype=param_dtype, requires_grad=grad)
    b = torch.randn(n, device=device, dtype=param_dtype, requires_grad=grad)
    r = torch.randn(shape, device=device, dtype=torch.float32 if wide_residual else dtype, requires_grad=grad) \
        if op == "add_layer_norm" else None
    sum_dtype = torch.promote_types(dtype, r.dtype) if r is not None else dtype
    out_dtype = sum_dtype
    if mixed:  # the dtype autocast computes in on this device
        with torch.autocast(device.type, dtype=torch.bfloat16), torch.no_grad():
            out_dtype = F.layer_norm(x[:1].to(sum_dtype), (n,)).dtype
    # the gradients of the outputs: y's in out_dtype; the fused add's (h, y), h in the sum's dtype
    dy = (torch.randn(shape, device=device, dtype=out_dtype),) if op != "add_layer_norm" else \
        (torch.randn(shape, device=device, dtype=sum_dtype), torch.randn(shape, device=device, dtype=out_dtype))
    if op == "layer_norm":
        inputs = (x, w, b)
        eager = lambda x_, w_, b_: F.layer_norm(x_, (n,), w_, b_)  # noqa: E731
        fast = lambda x_, w_, b_: fastdl.ops.layer_norm(x_, n, w_, b_)  # noqa: E731
    elif op == "rms_norm":
        inputs = (x, w)
        eager = lambda x_, w_: F.rms_norm(x_, (n,), w_, 1e-6)  # noqa: E731
        fast = lambda x_, w_: fastdl.ops.rms_norm(x_, n, w_, 1e-6)  # noqa: E731
    else:  # add_layer_norm: torch's separate add then layer_norm, against the fused op
        inputs = (x, r, w, b)

        def eager(x_, r_, w_, b_):
            h = x_ + r_
            return h, F.layer_norm(h, (n,), w_, b_)

        fast = lambda x_, r_, w_, b_: fastdl.ops.add_layer_norm(x_, r_, n, w_, b_)  # noqa: E731
    if mixed:
        eager, fast = _under_autocast(eager, device), _under_autocast(fast, device)
    compiled = harness.compiled(eager)
    impls = [Impl("torch", _timed(eager, direction, inputs, dy)),
             Impl("torch.compile", _timed(compiled, direction, inputs, dy))]
    apex = _apex_layer_norm() if device.type == "cuda" and op == "layer_norm" and not mixed else None
    if apex is not None:
        impls.append(Impl("apex", _timed(lambda x_, w_, b_: apex(x_, w_, b_, (n,), 1e-5), direction, inputs, dy)))
    impls += [Impl(f"fastdl-{be}", _timed(fast, direction, inputs, dy), backend=be)
              for be in harness.fastdl_backends(device)]
    return impls


def _bytes(op, direction, rows, n, size):
    # each tensor read or written once: x, y (+ residual, sum); backward dy, x, dx (+ dsum)
    fwd = {"layer_norm": 2, "rms_norm": 2, "add_layer_norm": 4}[op]
    bwd = {"layer_norm": 3, "rms_norm": 3, "add_layer_norm": 4}[op]
    return (fwd if direction == "fwd" else fwd + bwd) * rows * n * size


def _autocast_bytes(op, direction, rows, n):
    """The least traffic of an autocast case; direction "fwd" or "fwd+bwd", then AUTOCAST
    (and FP32_RESIDUAL)."""
    if op != "add_layer_norm":
        fwd, bwd = 6, 8
    else:
        fwd, bwd = (14, 18) if direction.endswith(FP32_RESIDUAL) else (10, 10)
    return (fwd if direction.startswith("fwd" + AUTOCAST) else fwd + bwd) * rows * n


def _gpu_autocast_cases(device, quick):
    hidden = GPU_AUTOCAST_HIDDEN[::2] if quick else GPU_AUTOCAST_HIDDEN
    shapes = [(GPU_AUTOCAST_ROWS, n) for n in hidden]
    variants = [(op, AUTOCAST) for op in ("layer_norm", "rms_norm", "add_layer_norm")] + \
        [("add_layer_norm", AUTOCAST + FP32_RESIDUAL)]
    return [Case(op, direction + suffix, torch.bfloat16, shape, _autocast_bytes(op, direction + suffix, *shape),
                 functools.partial(_impls, op, device, torch.bfloat16, shape, direction + suffix))
            for op, suffix in variants for shape in shapes for direction in ("fwd", "fwd+bwd")]


def _host_cases(device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = torch.tensor([], dtype=dtype).element_size()
    out = [Case(op, direction + harness.HOST, dtype, HOST_SHAPE, _bytes(op, direction, *HOST_SHAPE, size),
                functools.partial(_impls, op, device, dtype, HOST_SHAPE, direction), timing="host")
           for op in ("layer_norm", "rms_norm", "add_layer_norm") for direction in ("fwd", "fwd+bwd")]
    # a mixed-precision step's layer_norm (bf16 x, fp32 parameters, autocast), forward + backward
    mixed = "fwd+bwd" + AUTOCAST
    out.append(Case("layer_norm", mixed + harness.HOST, torch.bfloat16, HOST_SHAPE,
                    _bytes("layer_norm", "fwd+bwd", *HOST_SHAPE, 2),
                    functools.partial(_impls, "layer_norm", device, torch.bfloat16, HOST_SHAPE, mixed), timing="host"))
    # and a pre-norm block's fused add there: the bf16 sublayer output beside the fp32 residual stream
    wide = mixed + FP32_RESIDUAL
    out.append(Case("add_layer_norm", wide + harness.HOST, torch.bfloat16, HOST_SHAPE,
                    _autocast_bytes("add_layer_norm", wide, *HOST_SHAPE),
                    functools.partial(_impls, "add_layer_norm", device, torch.bfloat16, HOST_SHAPE, wide),
                    timing="host"))
    return out


def cases(device: torch.device, quick: bool = False):
    if device.type == "cuda":
        all_rows, all_hidden, dtypes = GPU_ROWS, GPU_HIDDEN, GPU_DTYPES
    else:
        all_rows, all_hidden, dtypes = CPU_ROWS, CPU_HIDDEN, CPU_DTYPES
    if quick:
        all_rows, all_hidden = all_rows[:1], all_hidden[::2]
    out = _host_cases(device)  # first: cheap, and never cut by --max-seconds
    # dtype first, then rows, then op: a run cut short by --max-seconds has timed every op
    # in the dtypes the targets name first (bf16), at 4096 rows first
    for dtype in dtypes:
        size = torch.tensor([], dtype=dtype).element_size()
        for rows in all_rows:
            for op in ("layer_norm", "rms_norm", "add_layer_norm"):
                for n in all_hidden:
                    for direction in ("fwd", "fwd+bwd"):
                        out.append(Case(op, direction, dtype, (rows, n), _bytes(op, direction, rows, n, size),
                                        functools.partial(_impls, op, device, dtype, (rows, n), direction)))
        if device.type == "cuda" and dtype == torch.bfloat16:
            out += _gpu_autocast_cases(device, quick)  # after the bf16 sweep the targets name
    if device.type == "cuda" and not quick:
        rows, n = GPU_LONG_SHAPE
        for op in ("layer_norm", "add_layer_norm"):
            for direction in ("fwd", "fwd+bwd"):
                out.append(Case(op, direction, torch.bfloat16, GPU_LONG_SHAPE, _bytes(op, direction, rows, n, 2),
                                functools.partial(_impls, op, device, torch.bfloat16, GPU_LONG_SHAPE, direction)))
    if device.type == "cpu" and not quick:
        for dtype in CPU_HALF_DTYPES:
            for op in ("layer_norm", "rms_norm", "add_layer_norm"):
                for direction in ("fwd", "fwd+bwd"):
                    out.append(Case(op, direction, dtype, CPU_HALF_SHAPE, _bytes(op, direction, *CPU_HALF_SHAPE, 2),
                                    functools.partial(_impls, op, device, dtype, CPU_HALF_SHAPE, direction)))
        # a pre-norm block's fused add under CPU autocast, at the sweep's size: the bf16 sublayer
        # output beside the fp32 residual stream (CPU autocast leaves the norms alone, but the
        # add promotes)
        for direction in ("fwd", "fwd+bwd"):
            wide = direction + AUTOCAST + FP32_RESIDUAL
            out.append(Case("add_layer_norm", wide, torch.bfloat16, CPU_HALF_SHAPE,
                            _autocast_bytes("add_layer_norm", wide, *CPU_HALF_SHAPE),
                            functools.partial(_impls, "add_layer_norm", device, torch.bfloat16, CPU_HALF_SHAPE,
                                              wide)))
    return out
