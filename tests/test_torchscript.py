"""torch.jit.script: every module, the functional layer and a converted model
compile, and the scripted code draws the masks and gradients of eager mode,
also after torch.jit.save and torch.jit.load."""

import io
import warnings

import pytest
import torch
from torch import nn

import regdrop_ext
from models import third_party_layers  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def no_deprecation_warnings():
    # TorchScript is deprecated; models still ship through it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


# name: (module, shapes of its inputs)
MODULES = {
    "Dropout": (lambda: regdrop_ext.Dropout(0.3), [(6, 40)]),
    "Dropout_inplace": (lambda: regdrop_ext.Dropout(0.3, inplace=True), [(6, 40)]),
    "Dropout_low_memory": (lambda: regdrop_ext.Dropout(0.3, low_memory=True), [(6, 40)]),
    "Dropout1d": (lambda: regdrop_ext.Dropout1d(0.3), [(6, 8, 5)]),
    "Dropout1d_unbatched": (lambda: regdrop_ext.Dropout1d(0.3), [(8, 5)]),
    "Dropout2d": (lambda: regdrop_ext.Dropout2d(0.3), [(6, 8, 5, 2)]),
    "Dropout2d_inplace": (lambda: regdrop_ext.Dropout2d(0.3, inplace=True), [(6, 8, 5, 2)]),
    "Dropout3d": (lambda: regdrop_ext.Dropout3d(0.3), [(6, 8, 5, 2, 1)]),
    "DropPath": (lambda: regdrop_ext.DropPath(0.3), [(64, 5)]),
    "DropPath_unscaled": (lambda: regdrop_ext.DropPath(0.3, scale_by_keep=False), [(64, 5)]),
    "DropoutAdd": (lambda: regdrop_ext.DropoutAdd(0.3), [(6, 40), (6, 40)]),
    "DropoutAdd_low_memory": (lambda: regdrop_ext.DropoutAdd(0.3, low_memory=True), [(6, 40), (6, 40)]),
    "BiasDropoutAdd": (lambda: regdrop_ext.BiasDropoutAdd(0.3), [(6, 40), (40,), (6, 40)]),
    "DropPathAdd": (lambda: regdrop_ext.DropPathAdd(0.3), [(64, 5), (64, 5)]),
}


def forward_backward(module, shapes, seed):
    """Output and input gradients of one training forward, drawn from ``seed``."""
    leaves = [torch.randn(shape, generator=torch.Generator().manual_seed(i)).requires_grad_() for i, shape in enumerate(shapes)]
    torch.manual_seed(seed)
    out = module(*(leaf * 1 for leaf in leaves))  # not the leaves: in-place modules overwrite their input
    out.backward(torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape))
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("name", MODULES)
def test_scripted_module_draws_the_eager_masks_and_gradients(name):
    make, shapes = MODULES[name]
    eager = make().train()
    scripted = torch.jit.script(make().train())
    out, grads = forward_backward(eager, shapes, seed=3)
    scripted_out, scripted_grads = forward_backward(scripted, shapes, seed=3)
    assert torch.equal(scripted_out, out)
    assert all(torch.equal(a, b) for a, b in zip(scripted_grads, grads))
    assert not torch.equal(forward_backward(scripted, shapes, seed=4)[0], out), "no new mask from a new seed"
    if len(shapes) == 1:
        x = torch.randn(shapes[0])
        assert torch.equal(scripted.eval()(x), x)


@pytest.mark.parametrize(
    "function, args",
    [
        (regdrop_ext.dropout, (torch.ones(5, 7), 0.5)),
        (regdrop_ext.dropout_add, (torch.ones(5, 7), torch.ones(5, 7), 0.5)),
        (regdrop_ext.bias_dropout_add, (torch.ones(5, 7), torch.ones(7), torch.ones(5, 7), 0.5)),
        (regdrop_ext.drop_path, (torch.ones(5, 7), 0.5, True)),
        (regdrop_ext.drop_path_add, (torch.ones(5, 7), torch.ones(5, 7), 0.5)),
        (regdrop_ext.dropout1d, (torch.ones(5, 7, 3), 0.5)),
        (regdrop_ext.dropout2d, (torch.ones(5, 7, 3, 2), 0.5)),
        (regdrop_ext.dropout3d, (torch.ones(5, 7, 3, 2, 1), 0.5)),
    ],
    ids=lambda value: getattr(value, "__name__", ""),
)
def test_functional_layer_scripts(function, args):
    scripted = torch.jit.script(function)
    torch.manual_seed(1)
    expected = function(*args)
    torch.manual_seed(1)
    assert torch.equal(scripted(*args), expected)


def test_scripted_functional_refuses_a_bad_probability():
    with pytest.raises(torch.jit.Error, match="has to be between 0 and 1"):
        torch.jit.script(regdrop_ext.dropout)(torch.ones(3), 1.5)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: regdrop_ext.dropout(torch.ones(3), "0.1"), "dropout probability"),
        (lambda: regdrop_ext.drop_path(torch.ones(3), "0.1", True), "drop_path probability"),
        (lambda: regdrop_ext.Dropout("0.1"), "dropout probability"),
        (lambda: regdrop_ext.Dropout2d("0.1"), "dropout probability"),
        (lambda: regdrop_ext.DropPath("0.1"), "drop_path probability"),
    ],
    ids=["dropout", "drop_path", "Dropout", "Dropout2d", "DropPath"],
)
def test_a_probability_that_is_no_number_is_named(call, name):
    """In Python; scripted, the annotation types p (the functions above still script)."""
    with pytest.raises(TypeError, match=f"^{name} must be a float, got str$"):
        call()


def test_numpy_probabilities_are_numbers():
    numpy = pytest.importorskip("numpy")
    assert regdrop_ext.dropout(torch.ones(8), numpy.float32(0.0)).equal(torch.ones(8))


class Block(nn.Module):
    """A residual block with torch's dropout, timm's DropPath and a functional dropout, to convert."""

    def __init__(self, drop_path: type):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.drop = nn.Dropout(0.2)
        self.channels = nn.Dropout1d(0.1)
        self.drop_path = drop_path(0.25)

    def forward(self, x):
        h = self.channels(self.drop(self.fc(x)).unsqueeze(-1)).squeeze(-1)
        return x + self.drop_path(h)


class FunctionalHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(torch.nn.functional.dropout(x, 0.3, self.training))


def script_save_load(model):
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def test_a_converted_model_scripts_saves_and_loads(third_party_layers):  # noqa: F811
    model, summary = regdrop_ext.convert(nn.Sequential(Block(third_party_layers.DropPath), Block(third_party_layers.DropPath)))
    assert len(summary.replaced) == 6
    loaded = script_save_load(model)
    x = torch.randn(32, 16)
    for mode in (True, False):
        model.train(mode)
        loaded.train(mode)
        torch.manual_seed(7)
        expected = model(x)
        torch.manual_seed(7)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_a_routed_model_scripts_without_its_routing_which_stays_in_eager(third_party_layers):  # noqa: F811
    """TorchScript runs no Python mode: the scripted model calls torch's F.dropout
    (its masks are torch's), while the eager model keeps drawing regdrop_ext's."""
    model, _ = regdrop_ext.convert(nn.Sequential(Block(third_party_layers.DropPath), FunctionalHead()), functional=True)
    loaded = script_save_load(model)
    x = torch.randn(32, 16)
    calls = regdrop_ext.trace_random_ops(model.train(), x).calls
    assert [(call.function, call.fused) for call in calls][-1] == ("torch.nn.functional.dropout", True)
    assert "torch.nn.functional.dropout(" in getattr(loaded, "1").code and not model[1]._forward_pre_hooks  # the head is not routed itself
    assert len(model._forward_pre_hooks) == 1  # scripting left the eager model's routing on
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)
    out = loaded.train()(torch.ones(32, 16))
    assert out.shape == (32, 4) and not torch.equal(out, loaded.eval()(torch.ones(32, 16)))
