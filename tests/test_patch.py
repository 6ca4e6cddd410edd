"""fastdl.patch: swap torch.nn modules in a live model, weights and optimizer kept."""
import copy
import io
import warnings

import pytest
import torch

import fastdl
from conftest import assert_close, backend_cases, case_id


class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
        self.head = torch.nn.ModuleDict({"probs": torch.nn.Softmax(dim=-1), "logp": torch.nn.LogSoftmax(dim=1)})

    def forward(self, x):
        h = self.body(x)
        return self.head["probs"](h), self.head["logp"](h)


class MySoftmax(torch.nn.Softmax):
    """A user subclass with its own forward: patch must leave it alone."""

    def forward(self, x):
        return super().forward(x) * 2


def test_patch_swaps_and_keeps_everything():
    torch.manual_seed(0)
    model = Classifier()
    x = torch.randn(4, 8)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    assert fastdl.patch(model) is model
    assert type(model.head["probs"]) is fastdl.nn.Softmax
    assert type(model.head["logp"]) is fastdl.nn.LogSoftmax
    assert model.head["probs"].dim == -1 and model.head["logp"].dim == 1
    assert sorted(fastdl.patched_modules(model)) == ["head.logp", "head.probs"]
    assert all(a is b for a, b in zip(model.parameters(), params)), "parameters must be the same objects"
    assert model.state_dict().keys() == state.keys()

    after = model(x)
    for a, b in zip(after, before):
        torch.testing.assert_close(a, b)
    # training still works with the optimizer built before patching
    loss = -after[1][:, 0].mean()
    loss.backward()
    optimizer.step()
    assert not torch.equal(model.body[0].weight, state["body.0.weight"])


def test_patch_leaves_subclasses_and_reports(capsys):
    model = torch.nn.Sequential(MySoftmax(dim=-1), torch.nn.Softmax(dim=-1))
    fastdl.patch(model, verbose=True)
    assert type(model[0]) is MySoftmax
    assert type(model[1]) is fastdl.nn.Softmax
    assert "replaced 1 module(s)" in capsys.readouterr().out


def test_patch_root_module_and_strict():
    module = fastdl.patch(torch.nn.LogSoftmax(dim=0), strict=True)
    assert type(module) is fastdl.nn.LogSoftmax and module.strict
    with fastdl.use_backend("cuda"):
        with pytest.raises(fastdl.BackendUnavailableError):
            module(torch.randn(3))


def test_patch_keeps_hooks_and_mode():
    model = torch.nn.Sequential(torch.nn.Softmax(dim=-1))
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    model.eval()
    fastdl.patch(model)
    model(torch.randn(2, 3))
    assert seen == ["Softmax"] and not model[0].training


def test_patch_rejects_non_module():
    with pytest.raises(TypeError, match=r"fastdl\.patch: argument model must be a torch\.nn\.Module"):
        fastdl.patch(lambda x: x)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_patch_torch_transformer_encoder(norm_first):
    """A real torch model: every LayerNorm swapped; same outputs and gradients, in training and eval."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0,
                                             batch_first=True, norm_first=norm_first)
    model = torch.nn.TransformerEncoder(layer, num_layers=2, norm=torch.nn.LayerNorm(32),
                                        enable_nested_tensor=False)
    reference = __import__("copy").deepcopy(model)
    x = torch.randn(3, 10, 32, requires_grad=True)
    fastdl.patch(model)
    names = fastdl.patched_modules(model)
    assert len(names) == 5 and all("norm" in n for n in names), names
    out, ref = model(x), reference(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.square().sum(), [x] + list(model.parameters()))
    ref_grads = torch.autograd.grad(ref.square().sum(), [x] + list(reference.parameters()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    model.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_unpatch_restores_torch_modules():
    """unpatch undoes patch: torch's own classes again, the same Parameter objects, no
    `strict` left behind, the same outputs, and TorchScript (which needs them) works."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 4), torch.nn.RMSNorm(4), torch.nn.LogSoftmax(-1))
    params = list(model.parameters())
    x = torch.randn(3, 8)
    before = model(x)
    fastdl.patch(model, strict=True)
    assert len(fastdl.patched_modules(model)) == 3
    assert fastdl.unpatch(model) is model
    assert fastdl.patched_modules(model) == []
    assert [type(m) for m in model] == [torch.nn.Linear, torch.nn.LayerNorm, torch.nn.ReLU, torch.nn.Linear,
                                        torch.nn.RMSNorm, torch.nn.LogSoftmax]
    assert all(not hasattr(m, "strict") for m in model)
    assert all(a is b for a, b in zip(model.parameters(), params))
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), before, rtol=0, atol=0)
    # a model that is itself a patched module comes back as the torch module
    norm = fastdl.unpatch(fastdl.patch(torch.nn.LayerNorm(5)))
    assert type(norm) is torch.nn.LayerNorm
    with pytest.raises(TypeError, match="fastdl.unpatch: argument model"):
        fastdl.unpatch("not a model")


def test_torch_export_records_fastdl_ops():
    """torch.export of a patched model keeps fastdl's kernels: they are torch.library custom
    ops, recorded as torch.ops.fastdl.* in the exported graph (with a dynamic batch size), and
    it runs as the model does."""
    torch.manual_seed(0)
    model = fastdl.patch(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(),
                                             torch.nn.Linear(16, 4), torch.nn.Softmax(-1)))
    x = torch.randn(3, 8)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert {"fastdl.norm.default", "fastdl.softmax.default"} <= targets, targets
    y = torch.randn(5, 8)
    torch.testing.assert_close(exported.module()(y), model(y), rtol=0, atol=0)


@pytest.mark.parametrize("case", backend_cases(), ids=case_id)
def test_torch_jit_trace_records_fastdl_ops(case):
    """torch.jit.trace of a patched model records fastdl's custom ops (fastdl::norm,
    fastdl::softmax), as torch.export does, not the row kernels beneath them: the traced
    module computes and differentiates as the model does (input and parameter gradients
    against float64 torch), on another batch size, and comes back from torch.jit.save / load.
    The argument checks read no traced sizes (no TracerWarning). Before, the trace held the
    native row ops, which have no autograd: the traced module's gradients were silently None."""
    backend, device = case
    torch.manual_seed(0)
    model = fastdl.patch(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(),
                                             torch.nn.Linear(16, 4), torch.nn.RMSNorm(4, eps=1e-6),
                                             torch.nn.LogSoftmax(-1))).to(device)
    reference = fastdl.unpatch(copy.deepcopy(model)).double()
    with fastdl.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, (torch.randn(3, 8, device=device),))
        kinds = [node.kind() for node in traced.inlined_graph.nodes()]
        assert kinds.count("fastdl::norm") == 2 and kinds.count("fastdl::softmax") == 1, kinds
        x = torch.randn(5, 8, device=device, requires_grad=True)
        out = traced(x)
        dy = torch.randn_like(out)
        out.backward(dy)
        x64 = x.detach().double().requires_grad_()
        reference(x64).backward(dy.double())
        assert_close(out, reference(x64), torch.float32, "output")
        assert_close(x.grad, x64.grad, torch.float32, "dx")
        for (name, param), param64 in zip(model.named_parameters(), reference.parameters()):
            assert_close(param.grad, param64.grad, torch.float32, f"{name}'s gradient")
        saved = io.BytesIO()
        torch.jit.save(traced, saved)
        saved.seek(0)
        torch.testing.assert_close(torch.jit.load(saved)(x), out, rtol=0, atol=0)


class _FusedBlock(torch.nn.Module):
    """A pre-norm block on fastdl's fused modules and ops, for the FX test."""

    def __init__(self, d):
        super().__init__()
        self.linear = torch.nn.Linear(d, d)
        self.add_norm, self.add_rms = fastdl.nn.AddLayerNorm(d), fastdl.nn.AddRMSNorm(d, eps=1e-6)

    def forward(self, x):
        h, y = self.add_norm(self.linear(x), x)
        h2, y2 = self.add_rms(y, h)
        return fastdl.ops.log_softmax(y2 + h2, -1, dtype=torch.float64).float() + fastdl.ops.rms_norm(x, x.shape[-1:])


@pytest.mark.parametrize("case", backend_cases(), ids=case_id)
def test_torch_fx_symbolic_trace_records_fastdl_ops(case):
    """torch.fx.symbolic_trace of a patched model (what torchvision's feature extraction and
    FX passes run) records each fastdl op as one call_function node, as FX records torch's
    own functions, with the arguments it was given: the graph module computes and
    differentiates bit for bit as the model does, and pickles. Before, the first fastdl op
    refused FX's Proxy ("must be a torch.Tensor")."""
    import pickle

    backend, device = case
    torch.manual_seed(0)
    model = fastdl.patch(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(),
                                             _FusedBlock(16), torch.nn.Linear(16, 4), torch.nn.Softmax(-1))).to(device)
    with fastdl.use_backend(backend):
        graph_module = torch.fx.symbolic_trace(model)
        targets = [node.target for node in graph_module.graph.nodes if node.op == "call_function"]
        ops = fastdl.ops
        for fn in (ops.layer_norm, ops.add_layer_norm, ops.add_rms_norm, ops.log_softmax, ops.rms_norm, ops.softmax):
            assert targets.count(fn) == 1, (fn.__name__, targets)
        x = torch.randn(5, 8, device=device, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        out, expected = graph_module(x), model(x2)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        dy = torch.randn_like(out)
        grads = torch.autograd.grad(out, [x, *model.parameters()], dy)
        expected_grads = torch.autograd.grad(expected, [x2, *model.parameters()], dy)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(pickle.loads(pickle.dumps(graph_module))(x), out, rtol=0, atol=0)


def test_patched_model_copies_and_pickles():
    """deepcopy (a DQN's target network), pickle and torch.save of a patched model give a
    patched model that computes the same."""
    import copy
    import io
    import pickle

    torch.manual_seed(0)
    model = fastdl.patch(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                                             torch.nn.Linear(16, 4), torch.nn.Softmax(-1)), strict=True)
    x = torch.randn(3, 8)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), torch.load(buffer, weights_only=False)):
        assert fastdl.patched_modules(other) == ["1", "3"] and other[1].strict
        assert all(a is not b for a, b in zip(other.parameters(), model.parameters()))
        torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)
