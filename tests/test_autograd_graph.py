"""The autograd graph fastdl's ops record behaves as torch's own: saved-tensor hooks see
what is saved, a second backward through a freed graph and an in-place change of a saved
tensor are refused, a graph is freed with its outputs, and torch.autograd.grad of some of
the inputs gives their gradients. The cpu / cuda backends record hand-written C++ nodes
(csrc/autograd); triton / torch a Python autograd.Function."""
import concurrent.futures
import gc
import weakref

import pytest
import torch

import fastdl

from conftest import assert_close, backend_cases, case_id

CASES = backend_cases()

# name -> (f(x, residual, w, b) -> the outputs (a tuple), the inputs it differentiates)
OPS = {
    "softmax": (lambda x, r, w, b: (fastdl.ops.softmax(x, -1),), "x"),
    "log_softmax": (lambda x, r, w, b: (fastdl.ops.log_softmax(x, 0),), "x"),
    "layer_norm": (lambda x, r, w, b: (fastdl.ops.layer_norm(x, x.shape[-1], w, b),), "x w b"),
    "rms_norm": (lambda x, r, w, b: (fastdl.ops.rms_norm(x, x.shape[-1], w),), "x w"),
    "add_layer_norm": (lambda x, r, w, b: fastdl.ops.add_layer_norm(x, r, x.shape[-1], w, b), "x r w b"),
}


def _leaves(device, op):
    """x, residual, weight, bias as leaves; those the op differentiates require grad."""
    n = 12
    x, r = torch.randn(5, n, device=device), torch.randn(5, n, device=device)
    w, b = torch.rand(n, device=device) + 0.5, torch.randn(n, device=device)
    used = OPS[op][1].split()
    return tuple(t.requires_grad_(name in used) for t, name in zip((x, r, w, b), "xrwb"))


def _loss(outputs):
    return sum((o * o * o).sum() for o in outputs)  # a gradient that differs by element


def _wanted(leaves):
    return [t for t in leaves if t.requires_grad]


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_saved_tensor_hooks(case, op):
    """torch.autograd.graph.saved_tensors_hooks (activation offloading, compression) packs
    what the backward saves and unpacks it for the backward; the gradients do not change."""
    backend, device = case
    leaves = _leaves(device, op)
    with fastdl.use_backend(backend):
        want = torch.autograd.grad(_loss(OPS[op][0](*leaves)), _wanted(leaves))
        packed, unpacked = [], []

        def pack(t):
            packed.append(t)
            return t.clone()  # the backward must use what unpack gives, not the tensor itself

        def unpack(t):
            unpacked.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            outputs = OPS[op][0](*leaves)
        got = torch.autograd.grad(_loss(outputs), _wanted(leaves))
    assert packed and unpacked, f"{op}: no saved tensor went through the hooks"
    for g, w in zip(got, want):
        assert_close(g, w.double(), torch.float32, f"{op}: gradient with saved-tensor hooks")


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_second_backward(case, op):
    """A second backward through a freed graph raises; with retain_graph=True it gives the
    same gradients again."""
    backend, device = case
    leaves = _leaves(device, op)
    with fastdl.use_backend(backend):
        loss = _loss(OPS[op][0](*leaves))
        first = torch.autograd.grad(loss, _wanted(leaves), retain_graph=True)
        second = torch.autograd.grad(loss, _wanted(leaves))
        with pytest.raises(RuntimeError, match="second time"):
            torch.autograd.grad(loss, _wanted(leaves))
    for a, b in zip(first, second):
        assert torch.equal(a, b), f"{op}: the retained graph gave other gradients"


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_inplace_change_of_a_saved_tensor_is_refused(case, op):
    """Changing in place a tensor the backward saved (softmax's output; the norms' input, or
    x + residual when fused) makes the backward raise, not return wrong gradients."""
    backend, device = case
    x, r, w, b = _leaves(device, op)
    with fastdl.use_backend(backend):
        if op.endswith("softmax"):
            out = OPS[op][0](x, r, w, b)
            changed = out[0]
        elif op.startswith("add_"):
            out = OPS[op][0](x, r, w, b)
            changed = out[0]  # x + residual
        else:
            changed = x * 1  # a non-leaf: a leaf that requires grad cannot change in place
            out = OPS[op][0](changed, r, w, b)
        loss = _loss(out)
        with torch.no_grad():
            changed.add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_graph_is_freed_with_its_outputs(case, op):
    """An output the backward saves (softmax's y, the fused op's x + residual) does not keep
    itself alive through its own node: once the caller drops the outputs, they are freed
    (a reference cycle through C++ would never be)."""
    backend, device = case
    leaves = _leaves(device, op)
    with fastdl.use_backend(backend):
        outputs = OPS[op][0](*leaves)
    refs = [weakref.ref(o) for o in outputs]
    del outputs
    gc.collect()
    assert all(ref() is None for ref in refs), f"{op}: an output outlived its last reference"


@pytest.mark.parametrize("op", [op for op in OPS if "w" in OPS[op][1]])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_grad_of_some_inputs(case, op):
    """torch.autograd.grad of one input at a time gives that input's part of the full
    gradient (the backward is asked for fewer outputs than the node has)."""
    backend, device = case
    leaves = _leaves(device, op)
    with fastdl.use_backend(backend):
        full = torch.autograd.grad(_loss(OPS[op][0](*leaves)), _wanted(leaves))
        for leaf, want in zip(_wanted(leaves), full):
            (got,) = torch.autograd.grad(_loss(OPS[op][0](*leaves)), leaf)
            assert torch.equal(got, want), f"{op}: grad of one input differs from the full backward's"


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_anomaly_mode(case, op):
    """Under torch.autograd.detect_anomaly (which records each node's forward traceback, from
    C++ with the GIL released on the native backends) the gradients are the same."""
    backend, device = case
    leaves = _leaves(device, op)
    with fastdl.use_backend(backend):
        want = torch.autograd.grad(_loss(OPS[op][0](*leaves)), _wanted(leaves))
        with torch.autograd.detect_anomaly(check_nan=True):
            got = torch.autograd.grad(_loss(OPS[op][0](*leaves)), _wanted(leaves))
    for g, w in zip(got, want):
        assert torch.equal(g, w), f"{op}: gradient under anomaly mode"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_threads(case):
    """Forward and backward from four Python threads at once (the native eager entries
    release the GIL, as torch's ops do) give each thread the gradients it gets alone."""
    backend, device = case
    if backend == "triton" and device == "cpu":
        pytest.skip("Triton's interpreter (CPU tensors) is not thread-safe; a GPU runs this case")
    inputs = [[_leaves(device, op) for op in OPS] for _ in range(4)]

    def step(leaves_of_each_op):
        with fastdl.use_backend(backend):
            return [torch.autograd.grad(_loss(OPS[op][0](*leaves)), _wanted(leaves))
                    for op, leaves in zip(OPS, leaves_of_each_op)]

    alone = [step(leaves) for leaves in inputs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(step, inputs * 3))
    for i, grads in enumerate(together):
        for op_grads, op_alone in zip(grads, alone[i % 4]):
            for g, w in zip(op_grads, op_alone):
                assert torch.equal(g, w), "a thread's gradients changed when threads ran together"
