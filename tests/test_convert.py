"""regdrop_ext.convert: which layers it swaps, what it keeps, and that a
converted model drops and trains like the original, statistically.

timm and torchvision are not needed: their layers are found through
``sys.modules["timm.layers"].DropPath`` and
``sys.modules["torchvision.ops"].StochasticDepth``, so the stand-in tests
register, at exactly those places, classes with the constructor, attributes
and forward of the real ones. Where the real packages are installed, the
same checks also run on their classes.
"""

import math
import sys
import types

import pytest
import torch
from torch import nn

import regdrop_ext
from reference import keep_scale
from helpers import binomial_bounds
from third_party import import_or_skip

TORCH_TO_FUSED = {
    nn.Dropout: regdrop_ext.Dropout,
    nn.Dropout1d: regdrop_ext.Dropout1d,
    nn.Dropout2d: regdrop_ext.Dropout2d,
    nn.Dropout3d: regdrop_ext.Dropout3d,
}


class TimmDropPath(nn.Module):
    """timm.layers.DropPath: constructor, attributes and forward."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        noise = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0 and self.scale_by_keep:
            noise.div_(keep)
        return x * noise


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth: constructor, attributes and forward."""

    def __init__(self, p: float, mode: str):
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        size = [x.shape[0]] + [1] * (x.ndim - 1) if self.mode == "row" else [1] * x.ndim
        noise = torch.empty(size, dtype=x.dtype).bernoulli_(1 - self.p)
        return x * (noise / (1 - self.p) if self.p < 1 else noise)


@pytest.fixture
def stand_ins(monkeypatch):
    """Register the stand-ins where timm and torchvision would have put their classes."""
    timm_layers = types.ModuleType("timm.layers")
    timm_layers.DropPath = TimmDropPath
    tv_ops = types.ModuleType("torchvision.ops")
    tv_ops.StochasticDepth = StochasticDepth
    monkeypatch.setitem(sys.modules, "timm.layers", timm_layers)
    monkeypatch.setitem(sys.modules, "timm.models.layers", timm_layers)
    monkeypatch.setitem(sys.modules, "torchvision.ops", tv_ops)


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
        "(layers only: dropout the model calls as a function stays native, and a replaced layer may never be "
        "called; regdrop_ext.trace_random_ops(model, example_input) shows both)",
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


def test_timm_drop_path_is_found_only_where_timm_put_it(stand_ins):
    model = nn.Sequential(TimmDropPath(0.25, scale_by_keep=False), TimmDropPath(0.1))
    regdrop_ext.convert(model)
    assert [type(m) for m in model] == [regdrop_ext.DropPath] * 2
    assert (model[0].drop_prob, model[0].scale_by_keep, model[1].scale_by_keep) == (0.25, False, True)


def test_a_look_alike_class_outside_timm_is_not_converted():
    model = nn.Sequential(TimmDropPath(0.25))  # no stand_ins: timm.layers holds no such class
    _, summary = regdrop_ext.convert(model)
    assert type(model[0]) is TimmDropPath and summary.replaced == summary.skipped == {}


def test_stochastic_depth_row_mode_becomes_drop_path_and_batch_mode_is_left_alone(stand_ins):
    model = nn.Sequential(StochasticDepth(0.3, "row"), StochasticDepth(0.3, "batch"))
    _, summary = regdrop_ext.convert(model)
    assert type(model[0]) is regdrop_ext.DropPath
    assert (model[0].drop_prob, model[0].scale_by_keep) == (0.3, True)
    assert type(model[1]) is StochasticDepth and "mode='batch'" in summary.skipped["1"]


def test_real_timm_drop_path():
    timm_layers = import_or_skip("timm.layers")
    model = nn.Sequential(timm_layers.DropPath(0.2, scale_by_keep=False))
    regdrop_ext.convert(model)
    assert type(model[0]) is regdrop_ext.DropPath and not model[0].scale_by_keep


def test_real_torchvision_stochastic_depth():
    tv_ops = import_or_skip("torchvision.ops")
    model = nn.Sequential(tv_ops.StochasticDepth(0.2, "row"), tv_ops.StochasticDepth(0.2, "batch"))
    _, summary = regdrop_ext.convert(model)
    assert type(model[0]) is regdrop_ext.DropPath and list(summary.skipped) == ["1"]


# --- a converted layer drops like the original ------------------------------------

# name: (layer, input shape, shape of the units that are kept or dropped together)
LAYERS = {
    "Dropout": (lambda: nn.Dropout(0.3), (64, 256), (64, 256)),
    "Dropout1d": (lambda: nn.Dropout1d(0.3), (64, 128, 4), (64, 128, 1)),
    "Dropout2d": (lambda: nn.Dropout2d(0.3), (64, 128, 2, 2), (64, 128, 1, 1)),
    "Dropout3d": (lambda: nn.Dropout3d(0.3), (64, 128, 2, 2, 1), (64, 128, 1, 1, 1)),
    "timm_DropPath": (lambda: TimmDropPath(0.3), (8192, 3), (8192, 1)),
    "timm_DropPath_unscaled": (lambda: TimmDropPath(0.3, scale_by_keep=False), (8192, 3), (8192, 1)),
    "StochasticDepth_row": (lambda: StochasticDepth(0.3, "row"), (8192, 3), (8192, 1)),
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
def test_converted_layer_drops_like_the_original(stand_ins, name):
    make, shape, unit_shape = LAYERS[name]
    original = make()
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
