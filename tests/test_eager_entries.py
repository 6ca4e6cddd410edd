"""fastdl._C.softmax_eager / layer_norm_eager (csrc/python.cpp): the eager entries of the
native backends as plain Python functions, which fastdl.ops calls on every cpu / cuda call.
They must give what torch.ops.fastdl.<name> gives, and leave to it every call they do not
handle themselves: tensor subclasses, TorchFunctionModes, arguments of other types."""
import importlib

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fastdl
from fastdl import _native

from conftest import DEVICES

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

# public op -> (call given x, residual, weight, bias), rms
NORM_CALLS = {
    "layer_norm": lambda x, r, w, b: fastdl.ops.layer_norm(x, x.shape[-1], w, b),
    "layer_norm (tuple shape, int eps)": lambda x, r, w, b: fastdl.ops.layer_norm(x, (x.shape[-1],), w, b, 1),
    "layer_norm (no parameters)": lambda x, r, w, b: fastdl.ops.layer_norm(x, x.shape[-1]),
    "rms_norm (default eps)": lambda x, r, w, b: fastdl.ops.rms_norm(x, x.shape[-1], w),
    "add_layer_norm": lambda x, r, w, b: fastdl.ops.add_layer_norm(x, r, x.shape[-1], w, b),
    "add_rms_norm (default eps)": lambda x, r, w, b: fastdl.ops.add_rms_norm(x, r, (x.shape[-1],), w),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("call", list(NORM_CALLS))
def test_checked_norm_call_is_the_python_path(monkeypatch, call, dtype, device):
    """The norms' common call runs through layer_norm_checked and gives, bit for bit, the
    outputs and gradients of the Python path it skips (layer_norm_checked made to answer
    NotImplemented): rms_norm's default eps is the dtype's machine epsilon in C++ too, an
    int eps and a 1-tuple normalized_shape are read as Python reads them."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 24, device=device, dtype=dtype, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    weight = torch.nn.Parameter(torch.rand(24, device=device) + 0.5)
    bias = torch.nn.Parameter(torch.randn(24, device=device))
    checked = _norm_ops._layer_norm_checked
    taken = []

    def spy(*args):
        out = checked(*args)
        taken.append(out is not NotImplemented)
        return out

    results = []
    for entry in (spy, lambda *args: NotImplemented):
        monkeypatch.setattr(_norm_ops, "_layer_norm_checked", entry)
        with fastdl.use_backend(device):
            out = _outputs(NORM_CALLS[call](x, residual, weight, bias))
        loss = sum((o.float() ** 3).sum() for o in out)
        inputs = [t for t in (x, residual, weight, bias) if t.requires_grad]
        results.append((out, torch.autograd.grad(loss, inputs, allow_unused=True)))
    assert taken == [True]
    (fast_out, fast_grads), (python_out, python_grads) = results
    for a, b in zip(fast_out + fast_grads, python_out + python_grads):
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
