"""softmax benchmark cases: forward and backward, torch eager, torch.compile and every
fastdl backend that runs on the device."""
import functools

import torch

import fastdl
from fastdl.bench import harness
from fastdl.bench.harness import Case, Impl
from fastdl.bench.targets import Target

GPU_ROWS, GPU_COLS = 4096, (256, 1024, 4096, 16384, 65536)
# the targets' dtypes first: a run cut short by --max-seconds (a lent GPU's few minutes) has timed them
GPU_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# sizes fit for a 2-core machine; 4096 x 4096 fp32 is the CPU target of the foundation issue
CPU_ROWS, CPU_COLS = 4096, (256, 1024, 4096)
CPU_DTYPES = (torch.float32,)
# a few rows over a 256k vocabulary: the long-row split (GPU bf16, CPU fp32)
VOCAB_SHAPE = (8, 262144)
# the logits of a GPT-2 vocabulary (GPU bf16): 50257 columns, so every row but the first
# starts off a 16-byte boundary (the kernels that walk rows in vectors peel its edges)
LM_HEAD_SHAPE = (1024, 50257)
# 16-bit floats on the CPU at one size: the evidence for auto's CPU order by dtype (backends.py)
CPU_HALF_DTYPES, CPU_HALF_SHAPE = (torch.bfloat16, torch.float16), (4096, 1024)
# a small input (attention scores of a small model), timed as calls back to back: what a
# call costs the host (Python, dispatch, launch) when the kernel itself takes microseconds
HOST_SHAPE = (32, 512)
# direction suffix of a bf16 x's softmax computed and returned in fp32, forward (and
# backward to a bf16 dx): torch.softmax(x, -1, dtype=torch.float32) as LLaMA-style attention
# calls it, and what CUDA autocast makes of any softmax. torch casts x first; fastdl reads it
# as it is, so the least traffic is x 2 + y 4 bytes a value forward and dy 4 + y 4 + dx 2
# backward (the GB/s column counts that). GPU: 4096 rows; CPU: CPU_HALF_SHAPE.
TO_FP32, GPU_TO_FP32_COLS = " to fp32", (1024, 4096, 16384)

# the foundation issue's targets (H100, side by side in one run)
_HALF = ("float16", "bfloat16")
TARGETS = [
    Target("softmax fwd fp16/bf16, cols >= 1k: >= 90% of copy bandwidth", "softmax", "fwd", "cuda", _HALF,
           "pct_of_copy", 90.0, min_cols=1024, rows=GPU_ROWS),
    Target("softmax fwd fp16/bf16, every size: >= 1.0x torch eager", "softmax", "fwd", "cuda", _HALF,
           "vs_eager", 1.0, rows=GPU_ROWS),
    Target("softmax fwd fp16/bf16, every size: >= 1.0x torch.compile", "softmax", "fwd", "cuda", _HALF,
           "vs_compile", 1.0, rows=GPU_ROWS),
    Target("softmax bwd fp16/bf16, cols >= 1k: >= 85% of copy bandwidth", "softmax", "bwd", "cuda", _HALF,
           "pct_of_copy", 85.0, min_cols=1024, rows=GPU_ROWS),
    Target("softmax fwd fp32 4096x4096 (CPU): >= 1.0x torch eager", "softmax", "fwd", "cpu", ("float32",),
           "vs_eager", 1.0, shapes=((4096, 4096),)),
]


def _to_fp32_impls(device, dtype, shape, direction):
    backward = direction.startswith("fwd+bwd")
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=backward)
    dy = torch.randn(shape, device=device)
    eager = lambda t: torch.softmax(t, -1, dtype=torch.float32)  # noqa: E731
    fast = lambda t: fastdl.ops.softmax(t, -1, dtype=torch.float32)  # noqa: E731
    compiled = harness.compiled(eager)

    def timed(fn):
        return (lambda: torch.autograd.grad(fn(x), x, dy)) if backward else (lambda: fn(x))

    return ([Impl("torch", timed(eager)), Impl("torch.compile", timed(compiled))] +
            [Impl(f"fastdl-{b}", timed(fast), backend=b) for b in harness.fastdl_backends(device)])


def _to_fp32_cases(device, quick):
    if device.type == "cuda":
        shapes = [(GPU_ROWS, n) for n in (GPU_TO_FP32_COLS[::2] if quick else GPU_TO_FP32_COLS)]
    else:
        shapes = [CPU_HALF_SHAPE]
    return [Case("softmax", direction + TO_FP32, torch.bfloat16, shape, per_value * shape[0] * shape[1],
                 functools.partial(_to_fp32_impls, device, torch.bfloat16, shape, direction + TO_FP32))
            for shape in shapes for direction, per_value in (("fwd", 6), ("fwd+bwd", 16))]


def _impls(device, dtype, shape, direction):
    x = torch.randn(shape, device=device, dtype=dtype)
    if direction == "fwd":
        compiled = harness.compiled(lambda t: torch.softmax(t, -1))
        impls = [Impl("torch", lambda: torch.softmax(x, -1)), Impl("torch.compile", lambda: compiled(x))]
        impls += [Impl(f"fastdl-{b}", lambda: fastdl.ops.softmax(x, -1), backend=b)
                  for b in harness.fastdl_backends(device)]
        return impls
    y = torch.softmax(x, -1)
    g = torch.randn_like(y)
    del x
    aten_backward = torch.ops.aten._softmax_backward_data
    compiled = harness.compiled(lambda g_, y_: aten_backward(g_, y_, -1, g_.dtype))
    impls = [Impl("torch", lambda: aten_backward(g, y, -1, dtype)), Impl("torch.compile", lambda: compiled(g, y))]
    impls += [Impl(f"fastdl-{b}", lambda: fastdl.ops.softmax_backward(g, y, -1), backend=b)
              for b in harness.fastdl_backends(device)]
    return impls


def _host_cases(device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = torch.tensor([], dtype=dtype).element_size()
    return [Case("softmax", direction + harness.HOST, dtype, HOST_SHAPE, tensors * HOST_SHAPE[0] * HOST_SHAPE[1] * size,
                 functools.partial(_impls, device, dtype, HOST_SHAPE, direction), timing="host")
            for direction, tensors in (("fwd", 2), ("bwd", 3))]


def _long_row_cases(device):
    """A few rows over a long vocabulary (sampling from a language model): too few rows to
    fill the GPU one program a row, or the CPU's threads one row a task: both split rows."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = (VOCAB_SHAPE, LM_HEAD_SHAPE) if device.type == "cuda" else (VOCAB_SHAPE,)
    return [Case("softmax", direction, dtype, shape, tensors * shape[0] * shape[1] * dtype.itemsize,
                 functools.partial(_impls, device, dtype, shape, direction))
            for shape in shapes for direction, tensors in (("fwd", 2), ("bwd", 3))]


def cases(device: torch.device, quick: bool = False):
    if device.type == "cuda":
        rows, all_cols, dtypes = GPU_ROWS, GPU_COLS, GPU_DTYPES
    else:
        rows, all_cols, dtypes = CPU_ROWS, CPU_COLS, CPU_DTYPES
    if quick:
        all_cols = all_cols[::2]
    out = _host_cases(device)  # first: cheap, and never cut by --max-seconds
    for dtype in dtypes:
        size = torch.tensor([], dtype=dtype).element_size()
        for cols in all_cols:
            for direction, tensors in (("fwd", 2), ("bwd", 3)):  # x, y  /  dy, y, dx
                shape = (rows, cols)
                out.append(Case("softmax", direction, dtype, shape, tensors * rows * cols * size,
                                functools.partial(_impls, device, dtype, shape, direction)))
        if dtype == dtypes[0] and (device.type == "cuda" or not quick):
            out += _long_row_cases(device)  # after the first dtype's sweep, before the others
        if dtype == torch.bfloat16 and device.type == "cuda":
            out += _to_fp32_cases(device, quick)
    if device.type == "cpu" and not quick:
        for dtype in CPU_HALF_DTYPES:
            for direction, tensors in (("fwd", 2), ("bwd", 3)):
                out.append(Case("softmax", direction, dtype, CPU_HALF_SHAPE, tensors * 4096 * 1024 * 2,
                                functools.partial(_impls, device, dtype, CPU_HALF_SHAPE, direction)))
        out += _to_fp32_cases(device, quick)
    return out
