"""fastdl.nn modules: drop-in for torch.nn, fallback rule, strict mode."""
import warnings

import pytest
import torch

import fastdl
from fastdl.nn import _fallback

from conftest import autocast_as, backend_cases, case_id, needs_cpu_tests

PAIRS = [(torch.nn.Softmax, fastdl.nn.Softmax), (torch.nn.LogSoftmax, fastdl.nn.LogSoftmax)]


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[1].__name__)
@pytest.mark.parametrize("case", backend_cases(), ids=case_id)
def test_matches_torch_module(case, pair):
    backend, device = case
    torch_cls, fast_cls = pair
    x = torch.randn(3, 5, 7, device=device, requires_grad=True)
    for dim in (0, 1, 2, -1):
        ours, theirs = fast_cls(dim), torch_cls(dim)
        assert isinstance(ours, torch_cls)
        with fastdl.use_backend(backend):
            out = ours(x)
            (g,) = torch.autograd.grad(out.sum() * 0 + (out * out).sum(), x)
        ref = theirs(x)
        (g_ref,) = torch.autograd.grad((ref * ref).sum(), x)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(g, g_ref)
        assert repr(ours) == repr(theirs)
        assert ours.state_dict().keys() == theirs.state_dict().keys()


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[1].__name__)
def test_implicit_dim_as_torch(pair):
    torch_cls, fast_cls = pair
    x = torch.randn(2, 3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the implicit dim; so may we
        torch.testing.assert_close(fast_cls()(x), torch_cls()(x))


def test_fallback_warns_once_then_matches_torch(monkeypatch):
    monkeypatch.setattr(_fallback, "_warned", set())
    monkeypatch.delenv("FASTDL_STRICT", raising=False)
    module = fastdl.nn.Softmax(-1)
    x = torch.randn(4, 6)
    with fastdl.use_backend("cuda"):  # cannot run CPU tensors
        with pytest.warns(UserWarning, match=r"Softmax: falling back to torch: fastdl\.softmax: backend 'cuda'"):
            out = module(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the second call is silent
            module(x)
    torch.testing.assert_close(out, torch.softmax(x, -1))


def test_strict_raises(monkeypatch):
    x = torch.randn(4, 6)
    with fastdl.use_backend("cuda"):
        with pytest.raises(fastdl.BackendUnavailableError, match="cannot run here"):
            fastdl.nn.LogSoftmax(-1, strict=True)(x)
        monkeypatch.setenv("FASTDL_STRICT", "1")
        with pytest.raises(fastdl.BackendUnavailableError):
            fastdl.nn.LogSoftmax(-1)(x)


@pytest.mark.parametrize("layout", ["strided", "jagged"])
def test_nested_tensors_fall_back_to_torch(monkeypatch, layout):
    """A nested tensor (torch.nested), which no fastdl backend runs: fastdl.ops refuse it by
    name (BackendUnavailableError), so the modules fall back to torch's forward, with its
    result. (Before, the native ops failed inside torch: "Given dimension 1 is irregular",
    "NestedTensor does not support directly calling torch.ops.aten.size".) Each module is
    one torch takes in that layout."""
    monkeypatch.setattr(_fallback, "_warned", set())
    monkeypatch.delenv("FASTDL_STRICT", raising=False)
    torch.manual_seed(0)
    layout_arg = {"layout": torch.jagged} if layout == "jagged" else {}
    x = torch.nested.nested_tensor([torch.randn(3, 8), torch.randn(5, 8)], **layout_arg)
    ops = [lambda t: fastdl.ops.softmax(t, -1), lambda t: fastdl.ops.log_softmax(t, -1),
           lambda t: fastdl.ops.layer_norm(t, 8), lambda t: fastdl.ops.rms_norm(t, 8),
           lambda t: fastdl.ops.add_layer_norm(t, t, 8)]
    for op in ops:
        with pytest.raises(fastdl.BackendUnavailableError, match=r"fastdl\.\w+: x is a nested tensor"):
            op(x)
    pairs = [(torch.nn.LayerNorm(8), fastdl.nn.LayerNorm(8)), (torch.nn.Softmax(-1), fastdl.nn.Softmax(-1))]
    if layout == "jagged":  # torch takes these only in the jagged layout
        pairs += [(torch.nn.RMSNorm(8), fastdl.nn.RMSNorm(8)), (torch.nn.LogSoftmax(-1), fastdl.nn.LogSoftmax(-1))]
    for theirs, ours in pairs:
        ours.load_state_dict(theirs.state_dict())
        with pytest.warns(UserWarning, match="falling back to torch"):
            out = ours(x)
        for got, want in zip(out.unbind(), theirs(x).unbind()):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_bad_input_error_names_op():
    with pytest.raises(TypeError, match=r"fastdl\.softmax: argument x must be a floating-point tensor"):
        fastdl.nn.Softmax(-1)(torch.arange(4))


@pytest.mark.parametrize("case", backend_cases(), ids=case_id)
def test_autocast_follows_torch(case):
    """Under autocast each drop-in computes in the dtype torch's own module does (CUDA autocast
    runs softmax and layer_norm in fp32; CPU autocast leaves them in bf16)."""
    backend, device = case
    x = torch.randn(4, 16, device=device)
    pairs = [(fastdl.nn.Softmax(-1), torch.nn.Softmax(-1)), (fastdl.nn.LogSoftmax(-1), torch.nn.LogSoftmax(-1)),
             (fastdl.nn.LayerNorm(16, device=device), torch.nn.LayerNorm(16, device=device)),
             (fastdl.nn.RMSNorm(16, eps=1e-6, device=device), torch.nn.RMSNorm(16, eps=1e-6, device=device))]
    for low in (torch.bfloat16, torch.float16):
        xl = x.to(low)
        for ours, theirs in pairs:
            with torch.autocast(device, dtype=low), fastdl.use_backend(backend):
                out, ref = ours(xl), theirs(xl)
            assert out.dtype == ref.dtype, f"{type(ours).__name__} under {low} autocast: {out.dtype} != {ref.dtype}"
            torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@needs_cpu_tests
@pytest.mark.parametrize("kind", ["bf16", "bf16, fp32 rule"])
def test_autocast_under_torch_compile_matches_eager(kind):
    """The compiled path casts as the eager one does (the autocast probe is traced); under
    the fp32 rule (CUDA autocast's: a bf16 x's norm in fp32, the cast fused) too, where a fused
    add's sum stays in x's dtype; and a fused add promotes a bf16 x beside an fp32 residual."""
    if "cpu" not in fastdl.available_backends("cpu"):
        pytest.skip("fastdl._C not built")
    w = torch.rand(16) + 0.5

    def f(x):
        h, y = fastdl.ops.add_layer_norm(x, x.flip(0), 16, w)
        wide_h, wide_y = fastdl.ops.add_rms_norm(x, x.float().flip(0) * 1.001, 16, w)  # fp32 beside a bf16 x
        return (fastdl.ops.layer_norm(fastdl.ops.softmax(x, -1), 16, w), fastdl.ops.rms_norm(x, 16, w, 1e-6), y, h,
                wide_y, wide_h)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    for x in (torch.randn(4, 16), torch.randn(4, 16).bfloat16()):
        with autocast_as(kind, "cpu"), fastdl.use_backend("cpu"):
            eager, traced = f(x), compiled(x)
        computes_in = torch.float32 if kind.endswith("fp32 rule") else x.dtype
        for a, b, dtype in zip(eager, traced, [computes_in] * 3 + [x.dtype] + [torch.float32] * 2, strict=True):
            assert a.dtype == b.dtype == dtype
            torch.testing.assert_close(a, b)
