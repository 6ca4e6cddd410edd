"""Second derivatives (create_graph=True): gradgradcheck in float64 for every backend that
takes float64, and a WGAN-GP gradient penalty through a patched critic matching torch's."""
import pytest
import torch

import fastdl

from conftest import backend_cases, case_id

CASES = backend_cases()


def _f64(*shape, device, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device=device, dtype=torch.float64) * scale + shift).requires_grad_()


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_gradgradcheck(case, log):
    backend, device = case
    x = _f64(3, 7, device=device)
    fn = fastdl.ops.log_softmax if log else fastdl.ops.softmax
    with fastdl.use_backend(backend):
        assert torch.autograd.gradgradcheck(lambda t: fn(t, -1), (x,))
        assert torch.autograd.gradgradcheck(lambda t: fn(t, 0), (x,))


def _norm_calls(device, n=6):
    """variant -> (float64 inputs, the fastdl call on them)."""
    x, r = _f64(3, n, device=device, scale=2, shift=0.5), _f64(3, n, device=device)
    w, b = _f64(n, device=device, scale=0.3, shift=1.0), _f64(n, device=device)
    return {
        "layer_norm": ((x, w, b), lambda x_, w_, b_: fastdl.ops.layer_norm(x_, n, w_, b_)),
        "layer_norm_plain": ((x,), lambda x_: fastdl.ops.layer_norm(x_, n)),
        "rms_norm": ((x, w), lambda x_, w_: fastdl.ops.rms_norm(x_, n, w_, 1e-6)),
        "add_layer_norm": ((x, r, w, b), lambda x_, r_, w_, b_: fastdl.ops.add_layer_norm(x_, r_, n, w_, b_)),
        "add_rms_norm": ((x, r, w), lambda x_, r_, w_: fastdl.ops.add_rms_norm(x_, r_, n, w_, 1e-6)),
    }


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("variant", ["layer_norm", "layer_norm_plain", "rms_norm", "add_layer_norm", "add_rms_norm"])
def test_norm_gradgradcheck(case, variant):
    backend, device = case
    inputs, fn = _norm_calls(device)[variant]
    with fastdl.use_backend(backend):
        assert torch.autograd.gradgradcheck(fn, inputs)


def _critic(norm_cls, d=16):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(d, 32), norm_cls(32), torch.nn.LeakyReLU(0.2),
                               torch.nn.Linear(32, 32), torch.nn.LayerNorm(32), torch.nn.LeakyReLU(0.2),
                               torch.nn.Linear(32, 1))


def _gradient_penalty(critic, real, fake):
    """WGAN-GP (Gulrajani et al. 2017): (||grad_x critic(x_hat)|| - 1)^2 at points between
    real and fake; its gradient needs the critic's second derivatives."""
    alpha = torch.rand(real.shape[0], 1)
    x_hat = (alpha * real + (1 - alpha) * fake).requires_grad_()
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.norm(dim=1) - 1) ** 2).mean()


@pytest.mark.parametrize("backend", [b for b in ("cpu", "torch") if b in fastdl.available_backends("cpu")])
def test_wgan_gp_penalty_through_patched_critic(backend):
    """The layer-normalised critic WGAN-GP recommends: patched, the penalty and its
    parameter gradients match torch's."""
    real, fake = torch.randn(8, 16), torch.randn(8, 16)
    torch_critic = _critic(torch.nn.LayerNorm)
    fast_critic = fastdl.patch(_critic(torch.nn.LayerNorm), strict=True)
    assert len(fastdl.patched_modules(fast_critic)) == 2
    seed = torch.seed()
    torch.manual_seed(seed)
    penalty = _gradient_penalty(torch_critic, real, fake)
    grads = torch.autograd.grad(penalty, list(torch_critic.parameters()), allow_unused=True)
    torch.manual_seed(seed)
    with fastdl.use_backend(backend):
        fast_penalty = _gradient_penalty(fast_critic, real, fake)
        fast_grads = torch.autograd.grad(fast_penalty, list(fast_critic.parameters()), allow_unused=True)
    torch.testing.assert_close(fast_penalty, penalty, rtol=1e-5, atol=1e-6)
    for g, ref in zip(fast_grads, grads):
        assert (g is None) == (ref is None)  # the last bias does not reach the penalty
        if ref is not None:
            assert (g - ref).norm() <= 1e-5 * max(ref.norm(), 1e-6), (g - ref).norm() / ref.norm()


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("op", ["softmax", "log_softmax", "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm"])
def test_create_graph_gradients_equal_the_kernels(case, op):
    """With create_graph=True the backward takes another path (the formula in torch ops, so
    that it can be differentiated again). gradgradcheck checks only that path's own
    derivative; this checks the first derivative it gives against the kernels' backward."""
    backend, device = case
    if op in ("softmax", "log_softmax"):
        x = _f64(3, 7, device=device, scale=2)
        fn = getattr(fastdl.ops, op)
        calls = [((x,), lambda t: fn(t, -1)), ((x,), lambda t: fn(t, 0))]
    else:
        calls = [_norm_calls(device)[op]]
    for inputs, f in calls:
        with fastdl.use_backend(backend):
            outs = f(*inputs)
            outs = outs if isinstance(outs, tuple) else (outs,)
            grads_out = [torch.randn_like(o) for o in outs]
            plain = torch.autograd.grad(outs, inputs, grads_out, retain_graph=True)
            graphed = torch.autograd.grad(outs, inputs, grads_out, create_graph=True)
        # (dbias = the sum of dy depends on no input: only dx must carry a graph)
        assert graphed[0].requires_grad, f"{op}: grad of x is not differentiable under create_graph=True"
        for name, p, g in zip(("x", "residual or weight", "weight or bias", "bias"), plain, graphed):
            torch.testing.assert_close(g, p, rtol=1e-10, atol=1e-12, msg=f"{op}: grad of {name} with create_graph")
