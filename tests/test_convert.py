"""regdrop_ext.convert: which layers it swaps, what it keeps (hooks too),
what its summary counts, and that a converted model drops and trains like the
original, statistically. timm's and torchvision's layers are the real ones
where those packages import, stand-ins elsewhere (tests/models.py)."""

import math

import pytest
import torch
from torch import nn

import regdrop_ext
from helpers import binomial_bounds
from models import Classifier, TimmDropPath, third_party_layers  # noqa: F401  (fixture)
from reference import keep_scale
from regdrop_ext.convert import CANNOT_SEE

TORCH_TO_FUSED = {
    nn.Dropout: regdrop_ext.Dropout,
    nn.Dropout1d: regdrop_ext.Dropout1d,
    nn.Dropout2d: regdrop_ext.Dropout2d,
    nn.Dropout3d: regdrop_ext.Dropout3d,
}


# --- what is replaced, with what ------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("layer", TORCH_TO_FUSED, ids=lambda c: c.__name__)
def test_torch_dropout_becomes_fused_keeping_p_inplace_and_mode(layer, inplace, training):
    model = nn.Sequential(nn.Linear(4, 4), layer(0.3, inplace)).train(training)
    converted, summary = regdrop_ext.convert(model)
    assert converted is model
    new = model[1]
    assert type(new) is TORCH_TO_FUSED[layer]
    assert (new.p, new.inplace, new.training) == (0.3, inplace, training)
    assert summary.replaced == {"1": (layer, TORCH_TO_FUSED[layer])}
    assert summary.skipped == {}


class MyDropout(nn.Dropout):
    def forward(self, x):
        return x


@pytest.mark.parametrize(
    "layer, reason",
    [
        (nn.AlphaDropout(0.2), "SELU"),
        (nn.FeatureAlphaDropout(0.2), "SELU"),
        (MyDropout(0.2), "subclasses a torch dropout"),
        (regdrop_ext.Dropout(0.2), "already a regdrop_ext layer"),
        (regdrop_ext.DropPathAdd(0.2), "already a regdrop_ext layer"),
    ],
    ids=["AlphaDropout", "FeatureAlphaDropout", "subclass", "regdrop_Dropout", "regdrop_DropPathAdd"],
)
def test_other_dropout_layers_are_left_alone_with_a_reason(layer, reason):
    model = nn.Sequential(nn.Linear(4, 4), layer)
    converted, summary = regdrop_ext.convert(model)
    assert converted[1] is layer
    assert summary.replaced == {} and list(summary.skipped) == ["1"]
    assert reason in summary.skipped["1"]
    assert "left alone" in str(summary)


def test_summary_names_nested_layers():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)), nn.AlphaDropout(0.1))
    _, summary = regdrop_ext.convert(model)
    assert list(summary.replaced) == ["0.1"] and list(summary.skipped) == ["1"]
    assert str(summary).splitlines() == [
        "replaced 1, left alone 1",
        "  0.1: torch.nn.modules.dropout.Dropout -> regdrop_ext.modules.Dropout",
        "  1: left alone, AlphaDropout keeps SELU's mean and variance; no fused equivalent",
        CANNOT_SEE,
    ]


def test_a_shared_layer_stays_shared():
    shared = nn.Dropout(0.2)
    model = nn.Sequential(shared, nn.Linear(3, 3), shared, nn.Sequential(shared))
    regdrop_ext.convert(model)
    assert type(model[0]) is regdrop_ext.Dropout
    assert model[0] is model[2] is model[3][0]


def test_a_model_that_is_a_dropout_layer_is_returned_converted():
    converted, summary = regdrop_ext.convert(nn.Dropout2d(0.4).eval())
    assert type(converted) is regdrop_ext.Dropout2d and converted.p == 0.4 and not converted.training
    assert list(summary.replaced) == [""]


def test_not_inplace_converts_a_copy_and_leaves_the_original_untouched():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2), nn.BatchNorm1d(4))
    before = [type(m) for m in model.modules()]
    converted, _ = regdrop_ext.convert(model, inplace=False)
    assert [type(m) for m in model.modules()] == before
    assert converted is not model and type(converted[1]) is regdrop_ext.Dropout
    assert converted[0].weight is not model[0].weight
    assert torch.equal(converted[0].weight, model[0].weight)


def test_state_dict_keys_and_values_are_unchanged():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout2d(0.1), nn.Flatten(), nn.Dropout(0.2), nn.LazyLinear(2)
    )
    model(torch.randn(2, 3, 6, 6))  # materialize the lazy layer, update the running stats
    before = {k: v.clone() for k, v in model.state_dict().items()}
    regdrop_ext.convert(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_timm_drop_path_is_found_only_where_timm_put_it(third_party_layers):  # noqa: F811
    DropPath = third_party_layers.DropPath
    model = nn.Sequential(DropPath(0.25, scale_by_keep=False), DropPath(0.1))
    regdrop_ext.convert(model)
    assert [type(m) for m in model] == [regdrop_ext.DropPath] * 2
    assert (model[0].drop_prob, model[0].scale_by_keep, model[1].scale_by_keep) == (0.25, False, True)


def test_a_look_alike_class_outside_timm_is_not_converted():
    model = nn.Sequential(TimmDropPath(0.25))  # the stand-in, not registered: timm.layers holds no such class
    _, summary = regdrop_ext.convert(model)
    assert type(model[0]) is TimmDropPath and summary.replaced == summary.skipped == {}


def test_stochastic_depth_row_mode_becomes_drop_path_and_batch_mode_is_left_alone(third_party_layers):  # noqa: F811
    StochasticDepth = third_party_layers.StochasticDepth
    model = nn.Sequential(StochasticDepth(0.3, "row"), StochasticDepth(0.3, "batch"))
    _, summary = regdrop_ext.convert(model)
    assert type(model[0]) is regdrop_ext.DropPath
    assert (model[0].drop_prob, model[0].scale_by_keep) == (0.3, True)
    assert type(model[1]) is StochasticDepth and "mode='batch'" in summary.skipped["1"]


# --- hooks, arguments, and what the summary counts --------------------------------


def test_hooks_move_to_the_replacement_and_their_handles_still_remove_them():
    layer = nn.Dropout(0.5)
    seen = []
    handles = [
        layer.register_forward_pre_hook(lambda module, args: seen.append(("pre", type(module)))),
        layer.register_forward_hook(lambda module, args, out: seen.append(("post", type(module)))),
        layer.register_forward_hook(lambda module, args, kwargs, out: seen.append(("kwargs", type(module))), with_kwargs=True),
        layer.register_full_backward_hook(lambda module, grad_in, grad_out: seen.append(("backward", type(module)))),
    ]
    model = nn.Sequential(nn.Linear(4, 4), layer)
    _, summary = regdrop_ext.convert(model)
    assert summary.hooks_moved == {"1": 4} and "1: 4 hook(s) moved to the replacement" in str(summary)
    model(torch.randn(2, 4)).sum().backward()
    fused = regdrop_ext.Dropout
    assert seen == [("pre", fused), ("post", fused), ("kwargs", fused), ("backward", fused)]
    for handle in handles:
        handle.remove()
    seen.clear()
    model(torch.randn(2, 4)).sum().backward()
    assert seen == []


def test_arguments_are_checked_and_named():
    with pytest.raises(TypeError, match="convert: model must be a torch.nn.Module, got str"):
        regdrop_ext.convert("x")
    with pytest.raises(ValueError, match="attention must be one of"):
        regdrop_ext.convert(nn.Dropout(), attention="flash")
    with pytest.raises(TypeError, match="example_args must be a tuple"):
        regdrop_ext.convert(nn.Dropout(), example_args=torch.ones(2))


def test_with_an_example_the_summary_counts_only_layers_that_run():
    """The attention's attn_drop is replaced but never called: its p goes to SDPA."""
    model = Classifier()
    x = torch.randn(4, 5, 16)
    _, summary = regdrop_ext.convert(model.eval(), example_args=(x,))
    assert summary.never_called == ["blocks.0.attn_drop", "blocks.1.attn_drop"]
    lines = str(summary).splitlines()
    assert lines[0] == "replaced 2 that run (+2 never called), left alone 0"
    assert "  blocks.0.attn_drop: torch.nn.modules.dropout.Dropout -> regdrop_ext.modules.Dropout (never called)" in lines
    # In training mode, whatever the model's mode: 3 native (2 SDPA, the head's F.dropout), 2 fused.
    assert "example input, training mode: one forward: 5 random ops, 2 by regdrop_ext, 3 native" in lines
    assert not model.training


def test_the_example_forward_keeps_batch_norm_in_eval_mode():
    """A batch of one, which BatchNorm refuses in training mode; random ops do not depend on its mode."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.2))
    _, summary = regdrop_ext.convert(model, example_args=(torch.randn(1, 4),))
    assert [call.op for call in summary.trace.calls] == ["regdrop.dropout.default"] and model[1].training


def test_with_functional_and_attention_no_native_random_op_is_left():
    model = Classifier()
    _, summary = regdrop_ext.convert(model, functional=True, attention="math", example_args=(torch.randn(4, 5, 16),))
    assert summary.trace.native == [] and len(summary.trace.fused) == 5
    assert "functional dropout: F.dropout, F.dropout1d/2d/3d and torch.dropout by regdrop_ext" in str(summary)


# --- a converted layer drops like the original ------------------------------------

# name: (layer, input shape, shape of the units that are kept or dropped together)
LAYERS = {
    "Dropout": (lambda layers: nn.Dropout(0.3), (64, 256), (64, 256)),
    "Dropout1d": (lambda layers: nn.Dropout1d(0.3), (64, 128, 4), (64, 128, 1)),
    "Dropout2d": (lambda layers: nn.Dropout2d(0.3), (64, 128, 2, 2), (64, 128, 1, 1)),
    "Dropout3d": (lambda layers: nn.Dropout3d(0.3), (64, 128, 2, 2, 1), (64, 128, 1, 1, 1)),
    "timm_DropPath": (lambda layers: layers.DropPath(0.3), (8192, 3), (8192, 1)),
    "timm_DropPath_unscaled": (lambda layers: layers.DropPath(0.3, scale_by_keep=False), (8192, 3), (8192, 1)),
    "StochasticDepth_row": (lambda layers: layers.StochasticDepth(0.3, "row"), (8192, 3), (8192, 1)),
}


def check_drops(layer, shape, unit_shape, p, scale):
    """Every unit is all zeros or all ``scale``, and the kept count lies within
    5 sigma of its binomial mean (n = number of units, q = 1 - p)."""
    out = layer(torch.ones(shape))
    units = out.reshape(*unit_shape, -1)
    kept = units[..., 0] != 0
    assert torch.equal(units, (kept.to(out.dtype) * scale).unsqueeze(-1).expand_as(units))
    low, high = binomial_bounds(kept.numel(), 1 - p)
    assert low <= int(kept.sum()) <= high


@pytest.mark.parametrize("name", LAYERS)
def test_converted_layer_drops_like_the_original(third_party_layers, name):  # noqa: F811
    make, shape, unit_shape = LAYERS[name]
    original = make(third_party_layers)
    converted, summary = regdrop_ext.convert(original, inplace=False)
    assert summary.replaced, "not converted"
    p = 0.3
    scales = (1 / (1 - p), keep_scale(p)) if getattr(original, "scale_by_keep", True) else (1.0, 1.0)
    for layer, scale in zip((original, converted), scales):  # regdrop scales by its keep probability
        check_drops(layer, shape, unit_shape, p, scale)
        x = torch.randn(shape)
        assert torch.equal(layer.eval()(x), x)


# --- a converted model trains like the original -----------------------------------


@pytest.fixture
def one_thread():
    """The ops are tiny: OpenMP threads cost more than they bring, far more on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def final_losses(convert: bool, runs: int = 32, steps: int = 40):
    """Eval-mode loss after ``steps`` of full-batch SGD, one per run; run ``i``
    starts from the same initialization whether converted or not."""
    data = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=data)
    y = torch.sin(x @ torch.randn(8, 1, generator=data))
    losses = []
    for run in range(runs):
        torch.manual_seed(run)
        model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, 1))
        if convert:
            regdrop_ext.convert(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(steps):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        with torch.no_grad():
            losses.append(nn.functional.mse_loss(model.eval()(x), y).item())
    return torch.tensor(losses, dtype=torch.float64)


def test_converted_model_trains_like_the_original(one_thread):
    """Paired runs share initialization and data and differ only in their
    masks, whose distribution conversion must keep: the mean paired
    difference of the final losses lies within 5 standard errors of 0 (a
    t statistic with 31 degrees of freedom exceeds 5 with probability about
    2e-5). Measured on this setup, a layer without the 1 / (1 - p) scaling
    lands about 14 standard errors away, p = 0.4 instead of 0.5 about 15."""
    differences = final_losses(convert=True) - final_losses(convert=False)
    standard_error = differences.std().item() / math.sqrt(len(differences))
    mean = differences.mean().item()
    assert abs(mean) <= 5 * standard_error, f"mean difference {mean:.4g}, standard error {standard_error:.4g}"
