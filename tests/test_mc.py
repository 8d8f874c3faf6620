"""Monte Carlo dropout: which modules mc_dropout turns on, which random ops
it cannot reach, and what mc_predict returns, statistically."""

import dataclasses
import math
import warnings

import pytest
import torch
from torch import nn

import regdrop_ext
from models import DROPOUT, SDPA, Classifier, third_party_layers  # noqa: F401  (fixture)
from third_party import import_or_skip


def regressor(p: float) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.Tanh(), regdrop_ext.Dropout(p), nn.Linear(32, 3))


def modes(model):
    return [m.training for m in model.modules()]


# --- mc_dropout --------------------------------------------------------------------


def test_only_dropout_layers_are_on_inside_and_modes_come_back(third_party_layers):  # noqa: F811
    dropouts = [
        nn.Dropout(),
        nn.Dropout1d(),
        nn.Dropout2d(),
        nn.Dropout3d(),
        nn.AlphaDropout(),
        nn.FeatureAlphaDropout(),
        regdrop_ext.Dropout(),
        regdrop_ext.Dropout2d(),
        regdrop_ext.DropPath(),
        regdrop_ext.DropPathAdd(),
        regdrop_ext.DropoutAdd(),
        regdrop_ext.BiasDropoutAdd(),
        third_party_layers.DropPath(),
        third_party_layers.StochasticDepth(0.1, "row"),
    ]
    others = [nn.Linear(2, 2), nn.BatchNorm1d(2), nn.LayerNorm(2)]
    model = nn.Sequential(*dropouts, nn.Sequential(*others)).eval()
    model[1].train()
    model[-1][1].train()
    before = modes(model)
    with regdrop_ext.mc_dropout(model):
        assert all(m.training for m in dropouts)
        assert not any(m.training for m in others) and not model.training and not model[-1].training
    assert modes(model) == before


def test_modes_come_back_after_an_exception():
    model = regressor(0.2).train()
    model[1].eval()
    before = modes(model)
    with pytest.raises(RuntimeError, match="inside"):
        with regdrop_ext.mc_dropout(model):
            raise RuntimeError("inside")
    assert modes(model) == before


# --- mc_predict ----------------------------------------------------------------------


def test_batch_norm_running_stats_and_modes_are_unchanged():
    model = regressor(0.3).train()
    model(torch.randn(64, 6))  # running stats away from their initial values
    before = {k: v.clone() for k, v in model.state_dict().items()}
    regdrop_ext.mc_predict(model, torch.randn(16, 6), samples=20)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training and model[1].training


def test_zero_p_gives_zero_std_and_the_eval_output():
    model = regressor(0.0).eval()
    x = torch.randn(16, 6)
    prediction = regdrop_ext.mc_predict(model, x, samples=8)
    assert prediction.mean.shape == prediction.std.shape == (16, 3) and prediction.entropy is None
    # Each copy of a row passes through the same float32 operations; a GEMM
    # may still round a row differently with its position in the batch.
    torch.testing.assert_close(prediction.std, torch.zeros(16, 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(prediction.mean, model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("activation", ["tanh", "identity"])
@pytest.mark.parametrize("p", [0.1, 0.01, 0.001])
def test_mean_converges_to_the_eval_output_as_p_goes_to_zero(p, activation):
    """Model y = W2 f(D h) + b2, with h = W1 x + b1, D the dropout mask scaled
    by 1 / (1 - p) and f 1-Lipschitz, so |E[y] - y_eval| <= e sum_i |W2_ji h_i|:
    for f = tanh, e = E|D_i - 1| = p + (1 - p) p / (1 - p) = 2p; for the
    identity, e = |E[D_i] - 1| <= 2^-17 / (1 - p), the gap between the keep
    probability and 1 - p (README), which a missing 1 / (1 - p) scaling would
    exceed. The MC mean lies within 5 standard errors (std / sqrt(samples))
    of E[y]. The bound vanishes as p -> 0: the bias like p, the standard error
    like sqrt(p)."""
    torch.manual_seed(0)
    first, second = nn.Linear(6, 64), nn.Linear(64, 2)
    f = nn.Tanh() if activation == "tanh" else nn.Identity()
    model = nn.Sequential(first, regdrop_ext.Dropout(p), f, second)
    x = torch.randn(4, 6)
    samples = 4000
    prediction = regdrop_ext.mc_predict(model, x, samples=samples, generator=torch.Generator().manual_seed(1))
    e = 2 * p if activation == "tanh" else 2**-17 / (1 - p)
    with torch.no_grad():
        expected = model.eval()(x)
        bias_bound = e * (first(x).abs() @ second.weight.abs().T)
    bound = bias_bound + 5 * prediction.std / math.sqrt(samples)
    assert prediction.std.min() > 0, "dropout was off"
    assert ((prediction.mean - expected).abs() <= bound).all()


def test_same_generator_seed_gives_the_same_prediction_and_leaves_the_global_state():
    model = regressor(0.5).eval()
    x = torch.randn(8, 6)
    state = torch.get_rng_state()
    first = regdrop_ext.mc_predict(model, x, samples=10, generator=torch.Generator().manual_seed(5))
    again = regdrop_ext.mc_predict(model, x, samples=10, generator=torch.Generator().manual_seed(5))
    other = regdrop_ext.mc_predict(model, x, samples=10, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first.mean, again.mean) and torch.equal(first.std, again.std)
    assert not torch.equal(first.mean, other.mean)
    assert torch.equal(torch.get_rng_state(), state)


def test_samples_run_as_batches_of_at_most_batch_size_rows_and_hooks_see_only_those():
    """The check for unreachable random ops (two forwards of two copies of x)
    is hidden from the model's hooks: they see the sample forwards, in MC mode."""
    model = regressor(0.5)
    rows, training = [], []
    model.register_forward_hook(lambda module, args, out: rows.append(args[0].size(0)))
    model[1].register_forward_pre_hook(lambda module, args: training.append(module.training))
    x = torch.randn(8, 6)
    prediction = regdrop_ext.mc_predict(model, x, samples=10, batch_size=35)  # 4 copies of x per forward
    assert rows == [32, 32, 16] and prediction.mean.shape == (8, 3)
    assert training == [False] * 3  # BatchNorm in eval mode in every forward
    rows.clear()
    regdrop_ext.mc_predict(model, x, samples=3, batch_size=5)  # fewer rows than x: one copy per forward
    assert rows == [8, 8, 8]
    assert len(model._forward_hooks) == 1 and len(model[1]._forward_pre_hooks) == 1


def test_softmax_gives_probabilities_and_their_entropy():
    model = regressor(0.3)
    x = torch.randn(8, 6)
    prediction = regdrop_ext.mc_predict(model, x, samples=50, reduce="softmax")
    torch.testing.assert_close(prediction.mean.sum(-1), torch.ones(8))
    assert prediction.std.max() > 0
    expected = -(prediction.mean * prediction.mean.log()).sum(-1)
    torch.testing.assert_close(prediction.entropy, expected)
    assert (prediction.entropy <= math.log(3) + 1e-6).all()


def test_entropy_of_a_certain_prediction_is_zero():
    model = nn.Sequential(nn.Linear(2, 3), regdrop_ext.Dropout(0.0))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([0.0, 200.0, 0.0]))  # softmax underflows to (0, 1, 0)
    prediction = regdrop_ext.mc_predict(model, torch.randn(4, 2), samples=4, reduce="softmax")
    assert torch.equal(prediction.entropy, torch.zeros(4))


def test_arguments_are_checked():
    model = regressor(0.1)
    with pytest.raises(ValueError, match="samples"):
        regdrop_ext.mc_predict(model, torch.randn(2, 6), samples=1)
    with pytest.raises(ValueError, match="reduce"):
        regdrop_ext.mc_predict(model, torch.randn(2, 6), reduce="mean")


# --- random ops that Monte Carlo dropout cannot reach ----------------------------------


@pytest.mark.parametrize("converted", [False, True], ids=["native", "converted"])
def test_functional_dropout_is_unreachable_converted_or_not(converted):
    """The attention's dropout_p and the head's F.dropout follow the training flag of
    modules that are not dropout layers; the proj_drop layers are reached."""
    model = Classifier()
    if converted:
        regdrop_ext.convert(model)
    missed = regdrop_ext.mc_unreachable_random_calls(model, torch.randn(4, 5, 16))
    assert [(call.module, call.function) for call in missed] == [("blocks.0", SDPA), ("blocks.1", SDPA), ("", DROPOUT)]


def test_mc_predict_warns_about_unreachable_random_ops_and_names_them():
    with pytest.warns(UserWarning, match="3 random ops of a training-mode forward do not run under mc_dropout") as record:
        prediction = regdrop_ext.mc_predict(Classifier().eval(), torch.randn(4, 5, 16), samples=4)
    assert f"  <model> (Classifier): {DROPOUT} -> aten." in str(record[0].message)
    assert prediction.mean.shape == (4, 3)


def test_no_warning_when_every_random_op_is_a_dropout_layer():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        regdrop_ext.mc_predict(regressor(0.3), torch.randn(1, 6), samples=4)  # one row: BatchNorm still checks
    assert regdrop_ext.mc_unreachable_random_calls(regressor(0.3), torch.randn(2, 6)) == []


def test_a_model_that_cannot_run_in_training_mode_is_predicted_with_a_warning():
    class EvalOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = regressor(0.3)

        def forward(self, x):
            if self.training:
                raise RuntimeError("targets are required in training mode")
            return self.body(x)

    model = EvalOnly().eval()
    with pytest.warns(UserWarning, match="could not check .* RuntimeError: targets are required"):
        prediction = regdrop_ext.mc_predict(model, torch.randn(3, 6), samples=4)
    assert prediction.std.max() > 0


# --- the caller's input is never written -----------------------------------------

IN_PLACE_FIRST = {
    "regdrop Dropout": lambda: regdrop_ext.Dropout(0.5, inplace=True),
    "torch Dropout": lambda: nn.Dropout(0.5, inplace=True),
    "regdrop Dropout1d": lambda: regdrop_ext.Dropout1d(0.5, inplace=True),
    "torch Dropout1d": lambda: nn.Dropout1d(0.5, inplace=True),
}
MODEL_RUNNERS = {
    "mc_predict, one copy per forward": lambda m, x: regdrop_ext.mc_predict(m, x, samples=4, batch_size=x.size(0)),
    "mc_predict, two copies per forward": lambda m, x: regdrop_ext.mc_predict(m, x, samples=4, batch_size=2 * x.size(0)),
    "mc_predict, one forward": lambda m, x: regdrop_ext.mc_predict(m, x, samples=4),
    "mc_unreachable_random_calls": lambda m, x: regdrop_ext.mc_unreachable_random_calls(m, x),
    "trace_random_ops": lambda m, x: regdrop_ext.trace_random_ops(m.train(), x),
}


@pytest.mark.parametrize("layer", IN_PLACE_FIRST)
@pytest.mark.parametrize("runner", MODEL_RUNNERS)
def test_tools_that_run_the_model_never_write_the_callers_input(layer, runner):
    """Every tool that runs a user's model on a user's tensor hands it a copy:
    a model whose first layer drops out in place must leave ``x`` as it was,
    whatever the batching (one copy of x per forward was a view of it)."""
    model = nn.Sequential(IN_PLACE_FIRST[layer](), nn.Linear(4, 2))
    x = torch.rand(3, 5, 4) + 1  # no zeros: a dropped element shows
    before = x.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MODEL_RUNNERS[runner](model, x)
    assert torch.equal(x, before)


# --- the check never runs BatchNorm in training mode --------------------------------


def test_the_check_keeps_batch_norm_in_eval_mode_and_check_false_skips_it():
    class RecordingBatchNorm(nn.BatchNorm1d):
        def forward(self, x):
            seen.append(self.training)
            return super().forward(x)

    seen = []
    model = nn.Sequential(nn.Linear(6, 8), RecordingBatchNorm(8), regdrop_ext.Dropout(0.3), nn.Linear(8, 2))
    regdrop_ext.mc_predict(model, torch.randn(4, 6), samples=4)
    assert seen == [False] * 3  # the check's two forwards, then the samples in one
    seen.clear()
    regdrop_ext.mc_predict(model, torch.randn(4, 6), samples=4, check=False)
    assert seen == [False]


# --- keyword inputs, selected outputs, structured outputs ---------------------------------


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    features: torch.Tensor
    note: str = "kept"


class TwoInputs(nn.Module):
    """Keyword inputs (a mask and a non-tensor flag) and a structured output."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.body = nn.Sequential(nn.Linear(6, 16), regdrop_ext.Dropout(0.5))
        self.head = nn.Linear(16, 3)

    def forward(self, x, mask=None, scale=1.0):
        features = self.body(x) * (mask.unsqueeze(-1) if mask is not None else 1) * scale
        logits = self.head(features)
        if self.kind == "tuple":
            return logits, features
        if self.kind == "dict":
            return {"logits": logits, "features": features}
        return Output(logits, features)


@pytest.mark.parametrize("kind", ["tuple", "dict", "dataclass"])
def test_keyword_inputs_and_structured_outputs_are_stacked_sample_by_sample(kind):
    torch.manual_seed(0)
    model = TwoInputs(kind)
    x, mask = torch.randn(5, 6), torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0])
    generator = torch.Generator().manual_seed(3)
    prediction = regdrop_ext.mc_predict(model, x, 16, model_kwargs={"mask": mask, "scale": 2.0}, generator=generator, batch_size=10)
    mean, std = prediction.mean, prediction.std
    logits_mean = mean[0] if kind == "tuple" else mean["logits"] if kind == "dict" else mean.logits
    features_std = std[1] if kind == "tuple" else std["features"] if kind == "dict" else std.features
    assert type(mean) is type(std) is (tuple if kind == "tuple" else dict if kind == "dict" else Output)
    assert logits_mean.shape == (5, 3) and features_std.shape == (5, 16)
    assert (features_std[mask == 0] == 0).all() and (features_std[mask == 1] > 0).any()  # the mask reached each row
    if kind == "dataclass":
        assert mean.note == "kept"
    # The same draws, one output selected by name and by a callable.
    select = "logits" if kind != "tuple" else (lambda output: output[0])
    again = regdrop_ext.mc_predict(
        model, x, 16, model_kwargs={"mask": mask, "scale": 2.0}, output=select, generator=torch.Generator().manual_seed(3), batch_size=10
    )
    assert torch.equal(again.mean, logits_mean)


def test_inputs_and_outputs_that_do_not_fit_are_named():
    model = TwoInputs("tuple")
    x = torch.randn(5, 6)
    with pytest.raises(ValueError, match=r"model_kwargs\['mask'\] has shape \(4,\), not 5 rows"):
        regdrop_ext.mc_predict(model, x, 4, model_kwargs={"mask": torch.ones(4)})
    with pytest.raises(ValueError, match=r"output\[0\] has shape \(3,\), not 4 x 5 rows.*output="):
        regdrop_ext.mc_predict(model, x, 4, output=lambda out: (out[0].sum(0),), check=False)
    with pytest.raises(AttributeError, match="output='loss', but the model's output \\(tuple\\) has no such attribute"):
        regdrop_ext.mc_predict(model, x, 4, output="loss", check=False)
    with pytest.raises(ValueError, match="reduce='softmax' needs one tensor"):
        regdrop_ext.mc_predict(model, x, 4, reduce="softmax", check=False)
    with pytest.raises(TypeError, match="mc_predict: model must be a torch.nn.Module, got str"):
        regdrop_ext.mc_predict("model", x)
    with pytest.raises(TypeError, match="mc_predict: samples must be an int, got float"):
        regdrop_ext.mc_predict(model, x, 4.0)
    with pytest.raises(TypeError, match="mc_predict: x must be a Tensor or None, got list"):
        regdrop_ext.mc_predict(model, [1.0])


def test_a_converted_hugging_face_bert_classifier():
    """HF's ModelOutput, keyword inputs (attention_mask), logits selected by name.
    Its attention's SDPA dropout and the classifier's layers: the check names
    SDPA as unreachable (dropout_p is 0 outside training), converted or not."""
    transformers = import_or_skip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        num_labels=3, attn_implementation="sdpa",
    )  # fmt: skip
    model, _ = regdrop_ext.convert(transformers.BertForSequenceClassification(config).eval(), functional=True)
    ids = torch.randint(0, 50, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[2, 4:] = 0
    with pytest.warns(UserWarning, match="scaled_dot_product_attention"):
        whole = regdrop_ext.mc_predict(model, ids, 8, model_kwargs={"attention_mask": mask}, generator=torch.Generator().manual_seed(1))
    assert type(whole.mean).__name__ == "SequenceClassifierOutput" and whole.mean.logits.shape == (4, 3)
    logits = regdrop_ext.mc_predict(
        model, ids, 8, model_kwargs={"attention_mask": mask}, output="logits", reduce="softmax", check=False,
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    torch.testing.assert_close(logits.mean.sum(-1), torch.ones(4))
    assert logits.std.max() > 0 and logits.entropy.shape == (4,)


def test_a_converted_timm_vit():
    """Drop paths and the head's dropout are layers, which MC dropout reaches;
    fused attention's dropout_p is 0 outside training: the check names it."""
    timm = import_or_skip("timm")
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=16, num_classes=3, depth=2,
        drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.1,
    )  # fmt: skip
    model, _ = regdrop_ext.convert(model.eval(), functional=True, attention="math")
    x = torch.randn(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="(?s)2 random ops .*blocks.0.attn .*scaled_dot_product_attention"):
        prediction = regdrop_ext.mc_predict(model, x, 8, reduce="softmax", generator=torch.Generator().manual_seed(0))
    assert prediction.mean.shape == (2, 3) and prediction.std.max() > 0
    assert not model.training
