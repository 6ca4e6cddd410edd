"""fastdl.backends: what exists here, the choice and its overrides, clear errors."""
import subprocess
import sys

import pytest
import torch

import fastdl
from fastdl import backends


def test_torch_always_available():
    assert "torch" in fastdl.available_backends()
    assert "torch" in fastdl.available_backends("cpu")


def test_cpu_backend_when_native_built():
    from fastdl import _native

    assert ("cpu" in fastdl.available_backends("cpu")) == _native.LOADED


@pytest.mark.skipif("cpu" not in fastdl.available_backends("cpu"), reason="fastdl._C is not built")
def test_stale_native_build_is_a_clear_error_not_a_failed_import():
    """A fastdl._C built from older sources (no softmax_eager, say) leaves fastdl importable:
    the native backends are unavailable and say to rebuild, and auto runs another backend."""
    code = (
        "import torch, torch._ops\n"
        "getattr_ = torch._ops._OpNamespace.__getattr__\n"
        "def without_eager(self, name):\n"
        "    if name == 'softmax_eager': raise AttributeError(name)\n"
        "    return getattr_(self, name)\n"
        "torch._ops._OpNamespace.__getattr__ = without_eager\n"
        "import fastdl\n"
        "print(fastdl.available_backends('cpu'))\n"
        "x = torch.randn(3, 5)\n"
        "print(torch.allclose(fastdl.ops.softmax(x), torch.softmax(x, -1)))\n"
        "try:\n"
        "    with fastdl.use_backend('cpu'): fastdl.ops.softmax(x)\n"
        "except fastdl.BackendUnavailableError as exc: print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "'cpu'" not in lines[0] and "'torch'" in lines[0], lines
    assert lines[1] == "True"
    assert "older than" in lines[2] and "softmax_eager" in lines[2] and "rebuild" in lines[2], lines[2]


@pytest.mark.skipif("cpu" not in fastdl.available_backends("cpu"), reason="fastdl._C is not built")
def test_exception_diagnosis_script_runs():
    """scripts/diagnose_exceptions.py (gpu_check.sh runs it on a lent GPU) works on every machine:
    here each case without a GPU ends in RuntimeError, as it should, and it says so."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "diagnose_exceptions.py"
    out = subprocess.run([sys.executable, str(script), "--no-gdb"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    verdicts = [line for line in out.stdout.splitlines() if "raises" in line]
    ran = [line for line in verdicts if "skipped" not in line]
    assert len(verdicts) >= 15 and ran and all(" ok: RAISED" in line for line in ran), out.stdout


def test_choice_precedence(monkeypatch):
    monkeypatch.setattr(backends, "_env_choice", "torch")  # FASTDL_BACKEND=torch at import
    assert fastdl.get_backend() == "torch"
    fastdl.set_backend("cpu")
    assert fastdl.get_backend() == "cpu"
    with fastdl.use_backend("triton"):
        assert fastdl.get_backend() == "triton"
        with fastdl.use_backend("auto"):
            assert fastdl.get_backend() == "auto"
    assert fastdl.get_backend() == "cpu"


def test_env_var_picks_the_backend(monkeypatch):
    """FASTDL_BACKEND, read when fastdl is imported, picks the backend of every call."""
    import os

    code = ("import torch, fastdl; from fastdl import backends; "
            "print(fastdl.get_backend(), backends.resolve('softmax', torch.ones(1)), backends.resolve('layer_norm', torch.ones(1)))")
    env = dict(os.environ, FASTDL_BACKEND="torch")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["torch", "torch", "torch"]
    calls = []
    monkeypatch.setattr(backends, "_env_choice", "torch")
    monkeypatch.setattr(torch, "softmax", lambda *a, **k: calls.append(1) or torch.log_softmax(*a, **k).exp())
    fastdl.ops.softmax(torch.randn(2, 3))
    assert calls, "FASTDL_BACKEND=torch did not reach the torch backend"


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"fastdl: unknown backend 'cudnn'; expected one of"):
        fastdl.set_backend("cudnn")
    with pytest.raises(ValueError, match="unknown backend"):
        with fastdl.use_backend("fast"):
            pass


def test_auto_prefers_native_cpu_kernel():
    expected = "cpu" if "cpu" in fastdl.available_backends("cpu") else "torch"
    assert backends.resolve("softmax", torch.ones(1)) == expected


def test_unavailable_reasons_are_specific():
    reason = backends.why_unavailable("cuda", "cpu")
    assert reason is not None and "runs cuda tensors, not cpu tensors" in reason
    if not torch.cuda.is_available():
        assert "no CUDA device" in backends.why_unavailable("triton", "cuda")


def test_import_without_native_or_triton(tmp_path):
    """`import fastdl` works with fastdl._C and triton both unimportable; ops run on torch."""
    code = f"""
import sys, builtins
real_import = builtins.__import__
def fake_import(name, globals=None, locals=None, fromlist=(), level=0):
    if name == "triton" or name.startswith("triton.") or (name == "fastdl" and fromlist and "_C" in fromlist):
        raise ImportError("hidden for the test: " + name)
    return real_import(name, globals, locals, fromlist, level)
builtins.__import__ = fake_import
import torch, fastdl
print(fastdl.available_backends())
assert fastdl.available_backends() == ["torch"], fastdl.available_backends()
y = fastdl.ops.softmax(torch.randn(3, 4))
assert torch.allclose(y.sum(-1), torch.ones(3))
try:
    with fastdl.use_backend("cpu"):
        fastdl.ops.softmax(torch.randn(3, 4))
except fastdl.BackendUnavailableError as e:
    assert "fastdl._C is not built" in str(e), e
else:
    raise AssertionError("expected BackendUnavailableError")
try:
    with fastdl.use_backend("triton"):
        fastdl.ops.softmax(torch.randn(3, 4))
except fastdl.BackendUnavailableError as e:
    assert "triton is not importable" in str(e), e
else:
    raise AssertionError("expected BackendUnavailableError")
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr


def test_preference_by_dtype(monkeypatch):
    """A (device, dtype) entry of PREFERENCE overrides the device's order for that dtype."""
    table = {"cpu": ("cpu", "torch"), ("cpu", torch.float16): ("torch",)}
    monkeypatch.setitem(backends.PREFERENCE, "softmax", table)
    backends.forget_resolutions()
    try:
        assert backends.resolve("softmax", torch.ones(1, dtype=torch.float16)) == "torch"
        expected = "cpu" if "cpu" in fastdl.available_backends("cpu") else "torch"
        assert backends.resolve("softmax", torch.ones(1)) == expected
    finally:
        monkeypatch.undo()
        backends.forget_resolutions()


def test_auto_passes_over_a_backend_for_sizes_beyond_its_limit(monkeypatch):
    """backends.SIZE_LIMITS (the CUDA softmax kernels' 32-bit rows and columns; here 100 put
    on the cpu backend): under "auto" a call with more rows or columns along its dim than a
    backend takes goes to the next backend in PREFERENCE; a call within the limit, one without
    a dim, and a backend chosen by name are left as they are."""
    if "cpu" not in fastdl.available_backends("cpu"):
        pytest.skip("the cpu backend is not built")
    import importlib

    from fastdl import aten

    softmax_module = importlib.import_module("fastdl.ops.softmax")
    monkeypatch.setitem(backends.SIZE_LIMITS, ("softmax", "cpu"), 100)
    monkeypatch.setitem(backends.PREFERENCE, "softmax", {"cpu": ("cpu", "torch")})
    backends.forget_resolutions()
    try:
        wide = torch.randn(3, 101)
        assert backends.resolve("softmax", wide, -1) == "torch"  # 101 columns
        assert backends.resolve("softmax", wide, 0) == "torch"  # 101 rows of 3
        assert backends.resolve("softmax", wide.T, 0) == "torch"  # 101 columns along dim 0
        assert backends.resolve("softmax", torch.ones(50, 2), 0) == "cpu"  # 100 elements
        assert backends.resolve("softmax", torch.ones(60, 3), -1) == "cpu"  # 60 rows of 3
        assert backends.resolve("softmax", wide) == "cpu"
        assert backends.resolve("layer_norm", wide, -1) == "cpu"  # no limit for the op
        with fastdl.use_backend("cpu"):
            assert backends.resolve("softmax", wide, -1) == "cpu"
        # the Python path, and fastdl.enable()'s override, whose own fallback takes a fastdl kernel
        ran = []
        rows_forward = softmax_module._rows_forward
        monkeypatch.setattr(softmax_module, "_rows_forward", lambda backend, *a: ran.append(backend) or rows_forward(
            backend, *a))
        torch.testing.assert_close(softmax_module._forward(wide, -1, False), torch.softmax(wide, -1))
        assert ran == ["torch"]
        assert aten._backend("softmax", wide, -1) != "cpu"
        assert aten._backend("softmax", wide) == "cpu"
    finally:
        monkeypatch.undo()
        backends.forget_resolutions()


@pytest.mark.parametrize("op", ["softmax", "layer_norm"])
def test_backward_runs_on_the_forwards_backend(op, monkeypatch):
    """The backend is looked up when the forward runs; the backward pairs with it, whatever
    the choice in force when backward() is called."""
    import importlib

    module = importlib.import_module(f"fastdl.ops.{op}")
    ran = []
    rows_backward = module._rows_backward
    if op == "softmax":
        monkeypatch.setattr(module, "_rows_backward",
                            lambda backend, *a: ran.append(backend) or rows_backward(backend, *a))
        call = lambda t: fastdl.ops.softmax(t, -1)  # noqa: E731
    else:
        monkeypatch.setattr(module, "_rows_backward", lambda *a, backend=None, **k: ran.append(backend) or rows_backward(
            *a, backend=backend, **k))
        call = lambda t: fastdl.ops.layer_norm(t, 5)  # noqa: E731
    x = torch.randn(3, 5, requires_grad=True)
    runnable = fastdl.available_backends("cpu")
    for forward_backend in runnable:
        other = next(b for b in reversed(runnable) if b != forward_backend) if len(runnable) > 1 else "auto"
        ran.clear()
        with fastdl.use_backend(forward_backend):
            y = call(x)
        with fastdl.use_backend(other):
            y.sum().backward()
        if forward_backend in backends.NATIVE:  # the C++ node (csrc/autograd) calls the kernel itself
            assert ran == [] and "Rows" in y.grad_fn.name(), (forward_backend, ran, y.grad_fn.name())
        else:
            assert ran == [forward_backend], (forward_backend, other, ran)
