"""fastdl.enable(): torch's own softmax / log_softmax / layer_norm calls run fastdl's
kernels (every backend), match the float64 reference forward and backward, and torch's
kernels come back on disable()."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import fastdl

from conftest import assert_close, backend_cases, case_id, needs_cpu_tests

CASES = backend_cases()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
softmax_ops = importlib.import_module("fastdl.ops.softmax")
norm_ops = importlib.import_module("fastdl.ops.layer_norm")


@pytest.fixture(autouse=True)
def always_disabled_after():
    yield
    fastdl.disable()


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that reach fastdl's row functions, per op and direction."""
    counts = {"softmax": 0, "softmax_backward": 0, "layer_norm": 0, "layer_norm_backward": 0}

    def spy(module, name, key):
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            counts[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    spy(softmax_ops, "_rows_forward", "softmax")
    spy(softmax_ops, "_rows_backward", "softmax_backward")
    spy(norm_ops, "_rows_forward", "layer_norm")
    spy(norm_ops, "_rows_backward", "layer_norm_backward")
    return counts


def _grads(fn, *leaves):
    out = fn(*leaves)
    grad_out = torch.randn_like(out)
    return out, torch.autograd.grad(out, leaves, grad_out), grad_out


# a square matrix's dim 0: its rows have its own shape (the override once returned them transposed)
@pytest.mark.parametrize("shape, dim", [((4, 37, 50), 1), ((37, 37), 0)], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_calls_run_fastdl(case, dtype, log, shape, dim, calls):
    backend, device = case
    x = (torch.randn(shape, device=device) * 3).to(dtype).requires_grad_()
    fn = (lambda t: F.log_softmax(t, dim=dim)) if log else (lambda t: t.softmax(dim))
    with fastdl.use_backend(backend), fastdl.enabled():
        out, (dx,), grad_out = _grads(fn, x)
    x64 = x.detach().double().requires_grad_()
    ref, (dx_ref,) = (lambda o: (o, torch.autograd.grad(o, x64, grad_out.double())))(fn(x64))
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, ref, dtype, "forward")
    assert_close(dx, dx_ref, dtype, "dx")
    if backend != "torch":
        assert calls["softmax"] >= 1 and calls["softmax_backward"] >= 1, calls


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_calls_run_fastdl(case, dtype, calls):
    backend, device = case
    x = (torch.randn(3, 5, 6, 7, device=device) * 2 + 1).to(dtype).requires_grad_()
    w = (torch.rand(6, 7, device=device) + 0.5).to(dtype).requires_grad_()
    b = torch.randn(6, 7, device=device).to(dtype).requires_grad_()
    module = torch.nn.LayerNorm((6, 7), device=device, dtype=dtype)
    with fastdl.use_backend(backend), fastdl.enabled():
        out, grads, grad_out = _grads(lambda x_, w_, b_: F.layer_norm(x_, (6, 7), w_, b_), x, w, b)
        module_out = module(x.detach())
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref = F.layer_norm(leaves64[0], (6, 7), leaves64[1], leaves64[2])
    refs = torch.autograd.grad(ref, leaves64, grad_out.double())
    assert_close(out, ref, dtype, "forward")
    for name, g, r in zip(("dx", "dweight", "dbias"), grads, refs):
        assert g.dtype == dtype and g.shape == r.shape, name
        assert_close(g, r, dtype, name)
    assert_close(module_out, F.layer_norm(x.detach().double(), (6, 7), module.weight.double(),
                                          module.bias.double()), dtype, "module")
    if backend != "torch":
        assert calls["layer_norm"] >= 2 and calls["layer_norm_backward"] >= 1, calls


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_layer_norm_without_affine_or_parameter_grads(case):
    """Autograd asks native_layer_norm_backward for some gradients only (output_mask)."""
    backend, device = case
    x = torch.randn(8, 33, device=device, requires_grad=True)
    w = torch.rand(33, device=device) + 0.5  # no grad wanted: output_mask (True, False, True)
    b = torch.randn(33, device=device, requires_grad=True)
    grad_plain = torch.randn(8, 33, device=device)  # not .sum(): its exact gradient is 0
    with fastdl.use_backend(backend), fastdl.enabled():
        plain = F.layer_norm(x, (33,))
        (dx_plain,) = torch.autograd.grad(plain, x, grad_plain)
        affine = F.layer_norm(x, (33,), w, b)
        dx, db = torch.autograd.grad((affine * affine).sum(), (x, b))
    x64 = x.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    ref_plain = F.layer_norm(x64, (33,))
    assert_close(plain, ref_plain, torch.float32, "plain")
    assert_close(dx_plain, torch.autograd.grad(ref_plain, x64, grad_plain.double())[0], torch.float32, "plain dx")
    ref = F.layer_norm(x64, (33,), w.double(), b64)
    dx_ref, db_ref = torch.autograd.grad((ref * ref).sum(), (x64, b64))
    assert_close(dx, dx_ref, torch.float32, "dx")
    assert_close(db, db_ref, torch.float32, "dbias")


def test_disable_gives_torch_kernels_back(calls):
    x = torch.randn(4, 8)
    assert not fastdl.is_enabled()
    with fastdl.enabled():
        assert fastdl.is_enabled()
        with fastdl.enabled():  # nested: the inner block leaves it on
            torch.softmax(x, -1)
        assert fastdl.is_enabled()
        F.layer_norm(x, (8,))
    assert not fastdl.is_enabled()
    seen = dict(calls)
    if "cpu" in fastdl.available_backends("cpu"):
        assert seen["softmax"] == 1 and seen["layer_norm"] == 1, seen
    torch.softmax(x, -1)
    F.layer_norm(x, (8,))
    assert calls == seen, "torch's own kernels should run after disable()"
    fastdl.enable()
    fastdl.enable()  # idempotent
    torch.testing.assert_close(torch.softmax(x, -1), torch.exp(x) / torch.exp(x).sum(-1, keepdim=True))
    fastdl.disable()
    fastdl.disable()
    assert not fastdl.is_enabled()


def test_edge_inputs_match_torch():
    """Zero-size, 0-d, -inf rows and a non-contiguous view give what torch gives."""
    inputs = [torch.randn(0, 5), torch.randn(3, 0), torch.tensor(2.0),
              torch.tensor([[-float("inf")] * 4, [1.0, -float("inf"), 2.0, 3.0]]), torch.randn(6, 9).t()[::2]]
    expected = [(torch.softmax(t, -1), torch.log_softmax(t, 0)) for t in inputs]
    with fastdl.enabled():
        got = [(torch.softmax(t, -1), torch.log_softmax(t, 0)) for t in inputs]
    for (a, b), (c, d) in zip(got, expected):
        torch.testing.assert_close(a, c, equal_nan=True)
        torch.testing.assert_close(b, d, equal_nan=True)


def test_unavailable_backend_warns_once_and_computes(monkeypatch):
    monkeypatch.setattr(fastdl.aten, "_warned", set())  # once per process: start afresh
    x = torch.randn(5, 7, requires_grad=True)
    with fastdl.use_backend("cuda"), fastdl.enabled():
        with pytest.warns(UserWarning, match="fastdl.enable: computing softmax with plain torch ops"):
            y = torch.softmax(x, -1)
        (dx,) = torch.autograd.grad((y * y).sum(), x)
        out = F.layer_norm(x, (7,))
    x64 = x.detach().double().requires_grad_()
    ref = torch.softmax(x64, -1)
    assert_close(y, ref, torch.float32, "forward")
    assert_close(dx, torch.autograd.grad((ref * ref).sum(), x64)[0], torch.float32, "dx")
    assert_close(out, F.layer_norm(x64, (7,)), torch.float32, "layer_norm")


class _Block(torch.nn.Module):
    """A pre-norm attention block written as people write it: a LayerNorm module and
    `scores.softmax(-1)` inside the attention (out of fastdl.patch's reach)."""

    def __init__(self, d):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        attn = (q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5).softmax(-1)
        return x + attn @ v


def test_model_runs_under_enable_and_trains(calls):
    """Same loss and gradients under fastdl.enable() as without it, through fastdl's kernels."""
    block = _Block(32)
    x = torch.randn(2, 10, 32)
    loss = block(x).pow(2).mean()
    grads = torch.autograd.grad(loss, list(block.parameters()))
    with fastdl.enabled():
        loss_fast = block(x).pow(2).mean()
        grads_fast = torch.autograd.grad(loss_fast, list(block.parameters()))
    if "cpu" in fastdl.available_backends("cpu"):
        assert all(calls[k] >= 1 for k in calls), calls
    torch.testing.assert_close(loss_fast, loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads_fast, grads):
        assert (g - r).norm() <= 1e-5 * max(r.norm(), 1e-6)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_half_to_float_ops_on_every_backend(case, log):
    """aten::_softmax(x, dim, half_to_float=True) and the backward given the half input_dtype,
    as CUDA's softmax(half, dtype=float) calls them, called directly (torch's CPU kernel refuses
    half_to_float; fastdl's take it on any device): fp32 out from the half x, dx in half."""
    backend, device = case
    forward = torch.ops.aten._log_softmax if log else torch.ops.aten._softmax
    backward = torch.ops.aten._log_softmax_backward_data if log else torch.ops.aten._softmax_backward_data
    x = torch.randn(16, 300, device=device, dtype=torch.float16)
    grad_out = torch.randn(16, 300, device=device)
    with fastdl.use_backend(backend), fastdl.enabled():
        y = forward(x, -1, True)
        dx = backward(grad_out, y, -1, torch.float16)
    x64 = x.double().requires_grad_()
    ref = torch.log_softmax(x64, -1) if log else torch.softmax(x64, -1)
    assert y.dtype == torch.float32 and dx.dtype == torch.float16
    assert_close(y, ref, torch.float32, "forward")
    assert_close(dx, torch.autograd.grad(ref, x64, grad_out.double())[0], torch.float16, "dx")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="half_to_float is CUDA's softmax path")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_half_to_float_on_cuda(backend):
    """torch.softmax(half, dtype=float32) on CUDA reaches aten::_softmax(half_to_float=True)."""
    if backend not in fastdl.available_backends("cuda"):
        pytest.skip(f"backend {backend} not available")
    x = torch.randn(16, 300, device="cuda", dtype=torch.float16, requires_grad=True)
    with fastdl.use_backend(backend), fastdl.enabled():
        y = torch.softmax(x, -1, dtype=torch.float32)
        grad_out = torch.randn_like(y)
        (dx,) = torch.autograd.grad(y, x, grad_out)
    x64 = x.detach().double().requires_grad_()
    ref = torch.softmax(x64, -1)
    assert y.dtype == torch.float32 and dx.dtype == torch.float16
    assert_close(y, ref, torch.float16, "forward")  # the input was rounded to fp16
    assert_close(dx, torch.autograd.grad(ref, x64, grad_out.double())[0], torch.float16, "dx")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_second_derivatives_under_enable(case):
    """torch's own formulas differentiate the overridden backward ops (create_graph=True)."""
    backend, device = case
    x = torch.randn(3, 7, device=device, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(7, device=device, dtype=torch.float64) + 0.5).requires_grad_()
    with fastdl.use_backend(backend), fastdl.enabled():
        assert torch.autograd.gradgradcheck(lambda t: torch.softmax(t, -1), (x,))
        assert torch.autograd.gradgradcheck(lambda t: F.log_softmax(t, 0), (x,))
        assert torch.autograd.gradgradcheck(lambda t, w_: F.layer_norm(t, (7,), w_), (x, w))


@needs_cpu_tests
def test_torch_compile_under_enable():
    """Compiling while enabled traces torch's ops as usual (inductor's kernels run) and matches."""
    def f(x, w):
        return torch.softmax(x, -1).sum() + F.layer_norm(x, (16,), w).pow(2).sum()

    x = torch.randn(4, 16, requires_grad=True)
    w = (torch.rand(16) + 0.5).requires_grad_()
    ref = f(x, w)
    grads_ref = torch.autograd.grad(ref, (x, w))
    torch._dynamo.reset()
    with fastdl.enabled():
        out = torch.compile(f, fullgraph=True)(x, w)
        grads = torch.autograd.grad(out, (x, w))
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cross_entropy_under_enable(case, calls):
    """torch's cross_entropy is log_softmax + nll_loss inside: it runs fastdl's log_softmax."""
    backend, device = case
    logits = torch.randn(6, 11, device=device, requires_grad=True)
    target = torch.tensor([0, 3, 10, -100, 5, 7], device=device)

    def loss_and_grad():
        loss = F.cross_entropy(logits, target, ignore_index=-100, label_smoothing=0.1)
        return loss, torch.autograd.grad(loss, logits)[0]

    loss_ref, grad_ref = loss_and_grad()
    with fastdl.use_backend(backend), fastdl.enabled():
        loss, grad = loss_and_grad()
    if backend != "torch":
        assert calls["softmax"] >= 1 and calls["softmax_backward"] >= 1, calls
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)


def test_auto_takes_a_fastdl_kernel_where_it_would_take_torchs(monkeypatch, calls):
    """Where auto's order puts torch first (fp16 on the CPU), the override cannot reach
    torch's kernel, so it takes fastdl's rather than plain tensor ops."""
    if "cpu" not in fastdl.available_backends("cpu"):
        pytest.skip("no native CPU backend")
    x = torch.randn(4, 33).half()
    with fastdl.enabled():
        y = torch.softmax(x, -1)
        z = F.layer_norm(x, (33,))
    assert calls["softmax"] == 1 and calls["layer_norm"] == 1, calls
    assert_close(y, torch.softmax(x.double(), -1), torch.float16, "softmax")
    assert_close(z, F.layer_norm(x.double(), (33,)), torch.float16, "layer_norm")
