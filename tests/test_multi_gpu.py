"""A tensor on a CUDA device other than the current one: every GPU backend runs its kernels
on the tensor's device (Triton launches on the current device unless told otherwise; the
CUDA C++ ops take a device guard). Needs two GPUs."""
import pytest
import torch
import torch.nn.functional as F

import fastdl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs two CUDA devices")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernels_run_on_the_tensors_device(backend):
    if backend not in fastdl.available_backends("cuda"):
        pytest.skip(f"backend {backend} not available")
    torch.manual_seed(0)
    x = torch.randn(64, 1000, device="cuda:1", requires_grad=True)
    w = torch.randn(1000, device="cuda:1", requires_grad=True)
    with torch.cuda.device(0), fastdl.use_backend(backend):
        y = fastdl.ops.layer_norm(fastdl.ops.softmax(x, -1) * 100, 1000, w)
        y.square().sum().backward()
    assert y.device == x.device and x.grad.device == x.device
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.layer_norm(torch.softmax(xd, -1) * 100, (1000,), wd)
    ref.square().sum().backward()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=1e-4, atol=1e-4)
