"""fastdl._C.softmax_eager / layer_norm_eager (csrc/python.cpp): the eager entries of the
native backends as plain Python functions, which fastdl.ops calls on every cpu / cuda call.
They must give what torch.ops.fastdl.<name> gives, and leave to it every call they do not
handle themselves: tensor subclasses, TorchFunctionModes, arguments of other types.

fastdl._C.softmax_checked / softmax_backward_checked / layer_norm_checked: fastdl.ops'
public calls of the common case, their arguments (and what torch records or transforms)
checked in C++; they must give what the Python path gives, and answer NotImplemented for
every other call."""
import importlib

import torch.autograd.forward_ad as forward_ad

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fastdl
from fastdl import _native

from conftest import DEVICES, autocast_as

pytestmark = pytest.mark.skipif(not _native.LOADED, reason="fastdl._C is not built")

# name -> (arguments after x, given x and a parameter of its last dim)
CALLS = {
    "softmax_eager": lambda x, p: (x, 1, False),
    "layer_norm_eager": lambda x, p: (x, x.detach() * 0.5, p, p * 0.1, 1, 1e-5, False),
}


def _entries(name):
    return getattr(fastdl._C, name), getattr(torch.ops.fastdl, name).default


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CALLS))
def test_same_results_and_gradients_as_the_torch_op(name, device):
    fast, op = _entries(name)
    x = torch.randn(6, 10, device=device, requires_grad=True)
    p = torch.nn.Parameter(torch.rand(10, device=device) + 0.5)
    results = []
    for entry in (fast, op):
        outputs = _outputs(entry(*CALLS[name](x, p)))
        loss = sum((o * o * o).sum() for o in outputs if o.numel())
        results.append((outputs, torch.autograd.grad(loss, (x, p) if name == "layer_norm_eager" else (x,))))
    (fast_out, fast_grads), (op_out, op_grads) = results
    for a, b in zip(fast_out + fast_grads, op_out + op_grads):
        assert torch.equal(a, b)
    assert fast_out[0].grad_fn.name() == op_out[0].grad_fn.name()


class _Tagged(torch.Tensor):
    """A tensor subclass whose __torch_function__ records what it was called with."""
    seen = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(func)
        return super().__torch_function__(func, types, args, kwargs or {})


class _Recording(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", list(CALLS))
def test_subclasses_and_modes_go_to_the_torch_op(name):
    """A tensor subclass's __torch_function__ and a TorchFunctionMode see the call as
    torch.ops.fastdl.<name>, as they did when fastdl.ops called the op itself."""
    fast, op = _entries(name)
    x, p = torch.randn(4, 10), torch.nn.Parameter(torch.rand(10) + 0.5)
    _Tagged.seen.clear()
    out = _outputs(fast(*CALLS[name](x.as_subclass(_Tagged), p)))
    assert op in _Tagged.seen and type(out[0]) is _Tagged
    with _Recording() as mode:
        fast(*CALLS[name](x, p))
    assert op in mode.seen


@pytest.mark.parametrize("name", list(CALLS))
def test_other_argument_types_go_to_the_torch_op(name):
    """Arguments the fast path does not parse (an int for a bool, a wrong count) get what
    torch.ops gives them: the same result, or its error."""
    fast, op = _entries(name)
    x, p = torch.randn(4, 10), torch.rand(10) + 0.5
    args = list(CALLS[name](x, p))
    args[-1] = 0  # log / rms as an int
    for a, b in zip(_outputs(fast(*args)), _outputs(op(*args))):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError) as fast_error:
        fast(*args[:-1])
    with pytest.raises(RuntimeError) as op_error:
        op(*args[:-1])
    assert str(fast_error.value) == str(op_error.value)


def test_errors_reach_python_as_the_torch_op_raises_them():
    """A check failing in C++ (dim out of range) is a RuntimeError with the op's message."""
    with pytest.raises(RuntimeError, match="fastdl.softmax: dim 5 out of range"):
        fastdl._C.softmax_eager(torch.randn(3, 4), 5, False)


# --- fastdl._C.layer_norm_checked: a public norm call, its arguments checked in C++ ---------
_norm_ops = importlib.import_module("fastdl.ops.layer_norm")  # (fastdl.ops.layer_norm is the function)


def _checked_and_python_paths(monkeypatch, module, name, device, run):
    """What run() (a call of a public op, on backend `device`) returns through the checked
    entry module.<name>, which must take the call, and through the Python path it skips
    (the entry made to answer NotImplemented)."""
    checked = getattr(module, name)
    taken = []

    def spy(*args):
        out = checked(*args)
        taken.append(out is not NotImplemented)
        return out

    results = []
    for entry in (spy, lambda *args: NotImplemented):
        monkeypatch.setattr(module, name, entry)
        with fastdl.use_backend(device):
            results.append(run())
    assert taken == [True]
    return results


# Under autocast the checked entries cast as fastdl.ops does, to the dtype torch's own op
# computes in (fastdl.ops._common's probe, its answers memoised in C++): conftest.autocast_as.
AUTOCAST = [None, "bf16", "bf16, fp32 rule"]


def _computes_in(kind, dtype):
    """The dtype a softmax / norm call on a `dtype` x computes in under autocast `kind`, on
    a CPU x (on CUDA autocast takes 16-bit x to fp32 whatever the kind)."""
    if kind is not None and kind.endswith("fp32 rule") and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def _fp32(t):
    """A 16-bit tensor in fp32 (an fp32 residual stream beside it); others as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


# public op -> (call given x, residual, weight, bias), rms
NORM_CALLS = {
    "layer_norm": lambda x, r, w, b: fastdl.ops.layer_norm(x, x.shape[-1], w, b),
    "layer_norm (tuple shape, int eps)": lambda x, r, w, b: fastdl.ops.layer_norm(x, (x.shape[-1],), w, b, 1),
    "layer_norm (no parameters)": lambda x, r, w, b: fastdl.ops.layer_norm(x, x.shape[-1]),
    "rms_norm (default eps)": lambda x, r, w, b: fastdl.ops.rms_norm(x, x.shape[-1], w),
    "add_layer_norm": lambda x, r, w, b: fastdl.ops.add_layer_norm(x, r, x.shape[-1], w, b),
    "add_rms_norm (default eps)": lambda x, r, w, b: fastdl.ops.add_rms_norm(x, r, (x.shape[-1],), w),
    # a 16-bit x beside an fp32 residual stream (and the other way round): the sum and y in
    # fp32, both read as they are (for an fp32 / fp64 x, the call above)
    "add_layer_norm (fp32 residual)": lambda x, r, w, b: fastdl.ops.add_layer_norm(x, _fp32(r), x.shape[-1], w, b),
    "add_rms_norm (fp32 x)": lambda x, r, w, b: fastdl.ops.add_rms_norm(_fp32(x), r, x.shape[-1], w),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", AUTOCAST, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("call", list(NORM_CALLS))
def test_checked_norm_call_is_the_python_path(monkeypatch, call, dtype, autocast, device):
    """The norms' common call runs through layer_norm_checked and gives, bit for bit, the
    outputs and gradients of the Python path it skips (layer_norm_checked made to answer
    NotImplemented): rms_norm's default eps is the machine epsilon of the dtype it computes
    in in C++ too, an int eps and a 1-tuple normalized_shape are read as Python reads them,
    and under autocast every tensor is cast as Python casts it."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 24, device=device, dtype=dtype, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    weight = torch.nn.Parameter(torch.rand(24, device=device) + 0.5)
    bias = torch.nn.Parameter(torch.randn(24, device=device))

    def run():
        with autocast_as(autocast, device):
            out = _outputs(NORM_CALLS[call](x, residual, weight, bias))
        if device == "cpu":  # y in the dtype computed in; x + residual in x's (or the promoted), as torch's add
            rows = _fp32(torch.empty(0, dtype=dtype)).dtype if "fp32" in call else dtype
            assert out[-1].dtype == _computes_in(autocast, rows) and all(o.dtype == rows for o in out[:-1])
        loss = sum((o.float() ** 3).sum() for o in out)
        inputs = [t for t in (x, residual, weight, bias) if t.requires_grad]
        return out + torch.autograd.grad(loss, inputs, allow_unused=True)

    checked, python = _checked_and_python_paths(monkeypatch, _norm_ops, "_layer_norm_checked", device, run)
    for a, b in zip(checked, python):
        assert (a is None and b is None) or torch.equal(a, b)

def test_checked_norm_call_leaves_the_rest_to_python():
    """Whatever layer_norm_checked does not take, it answers NotImplemented for, so that
    fastdl.ops checks and reports it in Python: each case here either has its own error
    there or a Python path of its own."""
    x, w = torch.randn(4, 8), torch.rand(8) + 0.5
    residual = torch.randn(4, 8)
    ok = (x, None, 8, w, None, 1e-5, False)
    assert torch.equal(fastdl._C.layer_norm_checked(*ok), fastdl.ops.layer_norm(x, 8, w))

    def case(**changes):
        args = dict(zip(("x", "residual", "shape", "weight", "bias", "eps", "rms"), ok)) | changes
        return tuple(args.values())

    refused = {
        "x an int tensor": case(x=torch.arange(32).view(4, 8)),
        "x a subclass": case(x=x.as_subclass(_Tagged)),
        "x 0-d": case(x=torch.tensor(1.0), shape=1),
        "x nested": case(x=torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)])),
        "x sparse": case(x=x.to_sparse()),
        "shape a list": case(shape=[8]),
        "shape of two dims": case(shape=(4, 8)),
        "shape not x's": case(shape=7),
        "shape a bool": case(shape=True),
        "residual of another shape": case(residual=torch.randn(2, 8)),
        "residual of another dtype": case(residual=residual.double()),
        "residual an int tensor": case(residual=torch.ones(4, 8, dtype=torch.int32)),
        "weight of another length": case(weight=torch.rand(7)),
        "weight 2-D": case(weight=w.view(1, 8)),
        "weight an int tensor": case(weight=torch.ones(8, dtype=torch.int64)),
        "weight a list": case(weight=[1.0] * 8),
        "bias of another length": case(bias=torch.rand(9)),
        "eps None for layer_norm": case(eps=None),
        "eps a bool": case(eps=True),
        "eps a string": case(eps="1e-5"),
        "rms an int": case(rms=0),
        "too few arguments": ok[:6],
    }
    if not torch.cuda.is_available():
        refused["weight on the meta device"] = case(weight=w.to("meta"))
    for what, args in refused.items():
        assert fastdl._C.layer_norm_checked(*args) is NotImplemented, what
    with _Recording():
        assert fastdl._C.layer_norm_checked(*ok) is NotImplemented, "a TorchFunctionMode"


# --- fastdl._C.softmax_checked: a public softmax call, its arguments checked in C++ ----------
_softmax_ops = importlib.import_module("fastdl.ops.softmax")

# call given x -> the public call
SOFTMAX_CALLS = {
    "softmax": lambda x: fastdl.ops.softmax(x),
    "softmax dim 0": lambda x: fastdl.ops.softmax(x, 0),
    "log_softmax dim -2": lambda x: fastdl.ops.log_softmax(x, -2),
    "softmax of a transposed x": lambda x: fastdl.ops.softmax(x.transpose(0, 2), 1),
    "log_softmax of a 0-d x": lambda x: fastdl.ops.log_softmax(x[0, 0, 0], -1),
    "softmax in dtype fp32": lambda x: fastdl.ops.softmax(x, -1, dtype=torch.float32),
    "log_softmax in dtype bf16": lambda x: fastdl.ops.log_softmax(x, 1, torch.bfloat16),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", AUTOCAST, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("call", list(SOFTMAX_CALLS))
def test_checked_softmax_call_is_the_python_path(monkeypatch, call, dtype, autocast, device):
    """softmax's common call runs through softmax_checked and gives, bit for bit, the output
    and gradient of the Python path it skips (softmax_checked made to answer NotImplemented):
    a negative dim and a 0-d x's dim are read as Python reads them, x is cast to the dtype
    given, or else under autocast as Python casts it."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 24, device=device, dtype=dtype, requires_grad=True)
    given = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(call.split("in dtype ")[-1])

    def run():
        with autocast_as(autocast, device):
            out = SOFTMAX_CALLS[call](x)
        assert out.dtype == given if given else device != "cpu" or out.dtype == _computes_in(autocast, dtype)
        return out, torch.autograd.grad((out.float() ** 3).sum(), x)[0]

    checked, python = _checked_and_python_paths(monkeypatch, _softmax_ops, "_softmax_checked", device, run)
    for a, b in zip(checked, python):
        assert torch.equal(a, b)

def test_checked_softmax_call_leaves_the_rest_to_python():
    """Whatever softmax_checked does not take, it answers NotImplemented for, so that
    fastdl.ops checks and reports it in Python (or runs its own path for it)."""
    x = torch.randn(4, 8)
    ok = (x, -1, None, False)
    assert torch.equal(fastdl._C.softmax_checked(*ok), fastdl.ops.softmax(x))
    refused = {
        "x an int tensor": (torch.arange(32).view(4, 8), -1, None, False),
        "x a subclass": (x.as_subclass(_Tagged), -1, None, False),
        "x nested": (torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)]), -1, None, False),
        "x sparse": (x.to_sparse(), 0, None, False),
        "x on the meta device": (x.to("meta"), -1, None, False),
        "x a list": ([1.0, 2.0], -1, None, False),
        "dim out of range": (x, 2, None, False),
        "dim out of range below": (x, -3, None, False),
        "dim 1 of a 0-d x": (torch.tensor(1.0), 1, None, False),
        "dim a bool": (x, True, None, False),
        "dim a float": (x, 1.0, None, False),
        "dtype an int dtype": (x, -1, torch.int64, False),
        "dtype a string": (x, -1, "float32", False),
        "log an int": (x, -1, None, 0),
        "too few arguments": ok[:3],
    }
    for what, args in refused.items():
        assert fastdl._C.softmax_checked(*args) is NotImplemented, what
    with _Recording():
        assert fastdl._C.softmax_checked(*ok) is NotImplemented, "a TorchFunctionMode"


# public call given (grad_out, out) -> the softmax_backward call
SOFTMAX_BACKWARD_CALLS = {
    "softmax": lambda g, y: fastdl.ops.softmax_backward(g, y),
    "log_softmax dim 0": lambda g, y: fastdl.ops.softmax_backward(g, y, 0, True),
    "softmax dim -2, grad_out expanded": lambda g, y: fastdl.ops.softmax_backward(g[:1].expand_as(y), y, -2),
    "log_softmax of transposed tensors": lambda g, y: fastdl.ops.softmax_backward(g.transpose(0, 2),
                                                                                  y.transpose(0, 2), 1, True),
    "softmax of 0-d tensors": lambda g, y: fastdl.ops.softmax_backward(g[0, 0, 0], y[0, 0, 0], -1),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", AUTOCAST, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("call", list(SOFTMAX_BACKWARD_CALLS))
def test_checked_softmax_backward_call_is_the_python_path(monkeypatch, call, dtype, autocast, device):
    """fastdl.ops.softmax_backward's common call runs through softmax_backward_checked and
    gives, bit for bit, what the Python path it skips gives (under autocast too, where
    neither casts)."""
    torch.manual_seed(0)
    out = torch.softmax(torch.randn(3, 5, 24, device=device, dtype=dtype), -1)
    grad_out = torch.randn_like(out)

    def run():
        with autocast_as(autocast, device):
            return SOFTMAX_BACKWARD_CALLS[call](grad_out, out)

    checked, python = _checked_and_python_paths(monkeypatch, _softmax_ops, "_softmax_backward_checked", device, run)
    assert checked.dtype == dtype and torch.equal(checked, python)


def test_checked_softmax_backward_call_leaves_the_rest_to_python():
    """Whatever softmax_backward_checked does not take, it answers NotImplemented for."""
    g, y = torch.randn(4, 8), torch.softmax(torch.randn(4, 8), -1)
    ok = (g, y, -1, False)
    assert torch.equal(fastdl._C.softmax_backward_checked(*ok), fastdl.ops.softmax_backward(g, y))
    refused = {
        "out an int tensor": (g, torch.ones(4, 8, dtype=torch.int64), -1, False),
        "out a subclass": (g, y.as_subclass(_Tagged), -1, False),
        "grad_out a subclass": (g.as_subclass(_Tagged), y, -1, False),
        "grad_out a list": (g.tolist(), y, -1, False),
        "grad_out of another shape": (g[:2], y, -1, False),
        "grad_out of another dtype": (g.double(), y, -1, False),
        "grad_out on the meta device": (g.to("meta"), y, -1, False),
        "grad_out sparse": (g.to_sparse(), y, -1, False),
        "dim out of range": (g, y, 2, False),
        "dim a bool": (g, y, True, False),
        "log an int": (g, y, -1, 1),
        "too many arguments": ok + (None,),
    }
    for what, args in refused.items():
        assert fastdl._C.softmax_backward_checked(*args) is NotImplemented, what
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(g, torch.ones_like(g))
        assert fastdl._C.softmax_backward_checked(dual, y, -1, False) is NotImplemented, "grad_out dual"


# each checked entry -> its call of the common case given x and a weight (of x.shape[-1]: under
# torch.jit.trace, sizes read from x are traced tensors)
CHECKED = {
    "softmax_checked": lambda x, w: (x, -1, None, False),
    "softmax_backward_checked": lambda x, w: (x * 0.5, x, -1, False),
    "layer_norm_checked": lambda x, w: (x, None, len(w), w, None, 1e-5, False),
    "layer_norm_checked (fused, rms)": lambda x, w: (x, x.detach() * 0.5, len(w), w, None, None, True),
}


def _checked(name):
    return getattr(fastdl._C, name.split(" ")[0])


@pytest.mark.parametrize("name", list(CHECKED))
def test_checked_calls_leave_recorded_and_transformed_calls_to_python(name):
    """A call that torch records or transforms takes fastdl.ops' Python path, which runs
    torch's op or a custom op for it: under torch.jit.trace, a torch.func transform, or with
    a forward-mode AD tangent on any tensor argument (a tangent-free call inside a dual level
    is taken: it has no tangent to carry). Autocast is taken (the entries cast as Python
    does: the *_is_the_python_path tests)."""
    entry = _checked(name)
    x, w = torch.randn(4, 8), torch.rand(8) + 0.5
    assert entry(*CHECKED[name](x, w)) is not NotImplemented
    answers = {}

    def traced(t):
        answers["torch.jit.trace"] = entry(*CHECKED[name](t, w))
        return t * 2

    torch.jit.trace(traced, x, check_trace=False)  # (a check would call traced again, untraced)

    def transformed(t):
        answers["torch.func.vmap"] = entry(*CHECKED[name](t, w))
        return t

    torch.func.vmap(transformed)(x.unsqueeze(0))
    torch.func.grad(lambda t: (answers.setdefault("torch.func.grad", entry(*CHECKED[name](t, w))), t.sum())[1])(x)
    with forward_ad.dual_level():
        answers["x dual"] = entry(*CHECKED[name](forward_ad.make_dual(x, torch.ones_like(x)), w))
        if name.startswith("layer_norm"):
            answers["weight dual"] = entry(*CHECKED[name](x, forward_ad.make_dual(w, torch.ones_like(w))))
        assert entry(*CHECKED[name](x, w)) is not NotImplemented, "a call without a tangent in a dual level"
    for what, answer in answers.items():
        assert answer is NotImplemented, what
    for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
        with torch.autocast(device, dtype=torch.bfloat16):
            assert entry(*CHECKED[name](x, w)) is not NotImplemented, f"autocast on {device}"


@pytest.mark.parametrize("name", list(CHECKED))
def test_checked_calls_follow_the_backend_choice(monkeypatch, name):
    """The checked entries take a call only where fastdl.backends resolves it to a native
    backend now: they read use_backend's, set_backend's and FASTDL_BACKEND's choice on every
    call, and what they remember of backends' answers goes with backends.forget_resolutions()."""
    from fastdl import backends

    entry = _checked(name)
    x, w = torch.randn(4, 8), torch.rand(8) + 0.5
    taken = lambda: entry(*CHECKED[name](x, w)) is not NotImplemented  # noqa: E731
    assert taken()
    with fastdl.use_backend("torch"):
        assert not taken()
        with fastdl.use_backend("cpu"):
            assert taken()
    assert taken()
    monkeypatch.setattr(backends, "_global_choice", "torch")
    assert not taken()
    monkeypatch.setattr(backends, "_global_choice", None)
    monkeypatch.setattr(backends, "_env_choice", "torch")  # FASTDL_BACKEND=torch at import
    assert not taken()
    monkeypatch.setattr(backends, "_env_choice", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        entry(*CHECKED[name](x, w))
    monkeypatch.setattr(backends, "_env_choice", None)
    # auto's order changed (as a test of the preference does): remembered answers are dropped
    op = "softmax" if name.startswith("softmax") else "rms_norm" if "rms" in name else "layer_norm"
    assert taken()
    monkeypatch.setitem(backends.PREFERENCE, op, {"cpu": ("torch",)})
    backends.forget_resolutions()
    try:
        assert not taken()
    finally:
        monkeypatch.undo()
        backends.forget_resolutions()
    assert taken()
