"""Run every GPU kernel once on awkward shapes, for compute-sanitizer (gpu_check.sh).

Odd sizes, one column, misaligned row starts (16-byte loads must not be taken),
strided rows, both kernel shapes of each backend; small so that the sanitizer,
which slows kernels down a hundredfold, finishes in seconds.
"""
import torch

import fastdl

assert torch.cuda.is_available(), "needs a GPU"
shapes = [(1, 1), (3, 17), (5, 1000), (2, 1025), (3, 4097), (2, 16385), (1, 70000)]
dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
count = 0
for backend in [b for b in fastdl.available_backends("cuda") if b != "torch"]:
    with fastdl.use_backend(backend):
        for dtype in dtypes:
            for rows, cols in shapes:
                base = torch.randn(rows, cols + 1, device="cuda", dtype=dtype)
                for x in (base[:, :cols], base[:, 1:]):  # row stride cols+1; second view starts misaligned
                    for log in (False, True):
                        fn = fastdl.ops.log_softmax if log else fastdl.ops.softmax
                        y = fn(x, -1)
                        fastdl.ops.softmax_backward(torch.randn_like(y), y, -1, log)
                        count += 2
torch.cuda.synchronize()
print(f"sanitize_kernels: ran {count} kernel calls")
