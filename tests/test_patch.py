"""fastdl.patch: swap torch.nn modules in a live model, weights and optimizer kept."""
import pytest
import torch

import fastdl


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
