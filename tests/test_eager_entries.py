"""fastdl._C.softmax_eager / layer_norm_eager (csrc/python.cpp): the eager entries of the
native backends as plain Python functions, which fastdl.ops calls on every cpu / cuda call.
They must give what torch.ops.fastdl.<name> gives, and leave to it every call they do not
handle themselves: tensor subclasses, TorchFunctionModes, arguments of other types."""
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
