"""torch.func's transforms (grad, vmap, jacrev, jvp, functional_call) and forward-mode AD
over fastdl's ops and modules: a drop-in module must not break per-sample gradients,
Jacobians or Jacobian-vector products. There fastdl computes with plain tensor ops (see
fastdl/ops/softmax.py and layer_norm.py); results are checked against float64 autodiff of
the reference."""
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, jacrev, jvp, vmap

import fastdl
from fastdl import reference as R

from conftest import assert_close, backend_cases, case_id

CASES = backend_cases()
NATIVE_CASES = [c for c in CASES if c[0] in fastdl.backends.NATIVE]
DTYPES = [torch.float32, torch.bfloat16]

# name -> (fastdl call, reference call), each f(x, residual, w, b) -> one tensor
OPS = {
    "softmax": (lambda x, r, w, b: fastdl.ops.softmax(x, -1), lambda x, r, w, b: R.softmax(x, -1)),
    "log_softmax": (lambda x, r, w, b: fastdl.ops.log_softmax(x, 0), lambda x, r, w, b: R.log_softmax(x, 0)),
    "layer_norm": (lambda x, r, w, b: fastdl.ops.layer_norm(x, x.shape[-1], w, b),
                   lambda x, r, w, b: R.layer_norm(x, (x.shape[-1],), w, b)),
    "rms_norm": (lambda x, r, w, b: fastdl.ops.rms_norm(x, x.shape[-1], w, 1e-6),
                 lambda x, r, w, b: R.rms_norm(x, (x.shape[-1],), w, 1e-6)),
    "add_layer_norm": (lambda x, r, w, b: torch.cat(fastdl.ops.add_layer_norm(x, r, x.shape[-1], w, b)),
                       lambda x, r, w, b: torch.cat(R.add_layer_norm(x, r, (x.shape[-1],), w, b))),
}


def _loss(out):
    return (out * out * out).sum()  # a gradient that differs by element


def _inputs(shape, dtype, device):
    n = shape[-1]
    return (torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype),
            (torch.rand(n, device=device) + 0.5).to(dtype), torch.randn(n, device=device).to(dtype))


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_grad_and_per_sample_grad(case, dtype, op):
    backend, device = case
    fast, ref = OPS[op]
    x, r, w, b = _inputs((5, 12), dtype, device)
    x64, r64, w64, b64 = (t.double() for t in (x, r, w, b))
    with fastdl.use_backend(backend):
        dx = grad(lambda x_: _loss(fast(x_, r, w, b)))(x)
    assert dx.dtype == dtype
    assert_close(dx, grad(lambda x_: _loss(ref(x_, r64, w64, b64)))(x64), dtype, f"{op}: torch.func.grad of x")
    if op.endswith("softmax"):
        return
    # per-sample gradients of the weight: one row of x per sample
    per_sample = vmap(grad(lambda x_, w_: _loss(fast(x_, r[0], w_, b)), argnums=1), in_dims=(0, None))
    with fastdl.use_backend(backend):
        dw = per_sample(x, w)
    ref_dw = vmap(grad(lambda x_, w_: _loss(ref(x_, r64[0], w_, b64)), argnums=1), in_dims=(0, None))(x64, w64)
    assert dw.shape == (5, 12)
    assert_close(dw, ref_dw, dtype, f"{op}: vmap(grad) of the weight")


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_mode_ad(case, op):
    """The tangent of a forward-AD dual input (in x and, for the norms, in the weight) comes
    out of fastdl's op as out of the reference: fastdl's autograd nodes have no forward
    derivative, and the native ones used to drop the tangent without a word."""
    backend, device = case
    fast, ref = OPS[op]
    x, r, w, b = _inputs((5, 12), torch.float32, device)
    dx, dw = torch.randn_like(x), torch.randn_like(w)
    x64, r64, w64, b64, dx64, dw64 = (t.double() for t in (x, r, w, b, dx, dw))
    with fastdl.use_backend(backend), fwAD.dual_level():
        out = fast(fwAD.make_dual(x, dx), r, fwAD.make_dual(w, dw), b)
        primal, tangent = fwAD.unpack_dual(out)
    with fwAD.dual_level():
        want_primal, want_tangent = fwAD.unpack_dual(ref(fwAD.make_dual(x64, dx64), r64, fwAD.make_dual(w64, dw64),
                                                         b64))
    assert tangent is not None, f"{op}: forward AD dropped the tangent"
    assert_close(primal, want_primal, torch.float32, f"{op}: forward AD primal")
    assert_close(tangent, want_tangent, torch.float32, f"{op}: forward AD tangent")
    # torch.func.jvp, the transform's form of the same product
    with fastdl.use_backend(backend):
        _, jvp_out = jvp(lambda x_: fast(x_, r, w, b), (x,), (dx,))
    _, want_jvp = jvp(lambda x_: ref(x_, r64, w64, b64), (x64,), (dx64,))
    assert_close(jvp_out, want_jvp, torch.float32, f"{op}: torch.func.jvp")


@pytest.mark.parametrize("case", NATIVE_CASES, ids=case_id)
def test_native_eager_ops_refuse_a_dual_tensor(case):
    """Called directly, the native eager ops (whose C++ nodes have no forward derivative)
    refuse a forward-AD dual input with an error naming the op, rather than drop its tangent."""
    _, device = case
    x, r, w, b = _inputs((3, 8), torch.float32, device)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.randn_like(x))
        with pytest.raises(RuntimeError, match="fastdl.log_softmax: .*forward-mode AD"):
            torch.ops.fastdl.softmax_eager(dual, 1, True)
        for args in ((dual, r, w, b), (x, dual, w, b), (x, r, fwAD.make_dual(w, w), b),
                     (x, None, w, fwAD.make_dual(b, b))):
            with pytest.raises(RuntimeError, match="fastdl.layer_norm: .*forward-mode AD"):
                torch.ops.fastdl.layer_norm_eager(*args, 1, 1e-5, False)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_jacobian_of_softmax(case):
    backend, device = case
    x = torch.randn(7, device=device)
    with fastdl.use_backend(backend):
        jac = jacrev(lambda t: fastdl.ops.softmax(t, -1))(x)
    assert_close(jac, jacrev(lambda t: R.softmax(t, -1))(x.double()), torch.float32, "jacrev of softmax")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_per_sample_gradients_of_a_patched_model(case):
    """The per-sample gradient recipe (functional_call + vmap(grad)) on a model patched
    with fastdl's modules gives the gradients of the unpatched model, in float64."""
    backend, device = case
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.LayerNorm(16), torch.nn.GELU(),
                                torch.nn.Linear(16, 5), torch.nn.LogSoftmax(-1)).to(device)
    patched = fastdl.patch(copy.deepcopy(model))
    reference = copy.deepcopy(model).double()
    assert isinstance(patched[1], fastdl.nn.LayerNorm) and isinstance(patched[4], fastdl.nn.LogSoftmax)
    x, target = torch.randn(8, 6, device=device), torch.randint(0, 5, (8,), device=device)

    def per_sample_grads(net, params, x_, dtype):
        def loss(p, xi, ti):
            return torch.nn.functional.nll_loss(functional_call(net, p, (xi[None].to(dtype),)), ti[None])
        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x_, target)

    params = {k: v.detach() for k, v in patched.named_parameters()}
    with fastdl.use_backend(backend):
        got = per_sample_grads(patched, params, x, torch.float32)
    want = per_sample_grads(reference, {k: v.detach() for k, v in reference.named_parameters()}, x, torch.float64)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == (8, *params[name].shape), name
        assert_close(got[name], want[name], torch.float32, f"per-sample grad of {name}")
