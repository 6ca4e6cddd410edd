"""CUDA graphs: every GPU backend of every op runs under torch.cuda.graph capture (no host
synchronisation, allocations from the graph's pool), and a replay on new inputs gives
exactly what eager gives on them, forward and backward. GPU only."""
import pytest
import torch

import fastdl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")

GPU_BACKENDS = ["triton", "cuda"]
DTYPES = [torch.float32, torch.bfloat16]


def _softmax_loss(shape, dtype):
    c1 = torch.randn(shape, device="cuda", dtype=dtype)
    c2 = torch.randn(shape, device="cuda", dtype=dtype)

    def loss(x):
        return (fastdl.ops.softmax(x, -1) * c1).float().sum() + (fastdl.ops.log_softmax(x, 0) * c2).float().sum()

    return loss, 1


def _norm_loss(shape, dtype):
    n = shape[-1]
    w = (torch.rand(n, device="cuda") + 0.5).requires_grad_()
    b = torch.randn(n, device="cuda").requires_grad_()
    c = torch.randn(shape, device="cuda", dtype=dtype)

    def loss(x, r):
        h, y = fastdl.ops.add_layer_norm(x, r, n, w, b)
        z = fastdl.ops.rms_norm(y, n, w) + fastdl.ops.layer_norm(h, n)
        return (z * c).float().sum()

    return loss, 2


# (rows, cols): a row tile and a row past the tiles (block / loop kernels)
SHAPES = [(64, 1000), (4, 20000)]
OPS = {"softmax": _softmax_loss, "norms": _norm_loss}


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_graph_replay_matches_eager(backend, dtype, shape, op):
    if backend not in fastdl.available_backends("cuda"):
        pytest.skip(f"backend {backend} not available")
    loss_fn, n_inputs = OPS[op](shape, dtype)

    def fresh_inputs():
        return [torch.randn(shape, device="cuda", dtype=dtype).requires_grad_() for _ in range(n_inputs)]

    static = fresh_inputs()

    def step(inputs):
        loss = loss_fn(*inputs)
        return (loss.detach(), *torch.autograd.grad(loss, inputs))

    with fastdl.use_backend(backend):
        side = torch.cuda.Stream()  # warm up (Triton compiles, allocator pools) off the capture stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step(static)

        new = fresh_inputs()
        with torch.no_grad():
            for dst, src in zip(static, new):
                dst.copy_(src)
        graph.replay()
        eager = step(new)
    torch.cuda.synchronize()
    for name, got, want in zip(["loss"] + [f"grad {i}" for i in range(n_inputs)], captured, eager):
        assert not got.isnan().any(), f"{backend} {op}: {name} has NaN after replay"
        # same kernels, same launch shapes, deterministic reductions: bitwise equal
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m: f"{backend} {op} {name}: {m}")
