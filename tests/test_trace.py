"""trace_random_ops: every random op of one forward, where it ran, whether
regdrop_ext drew it, and the dropout layers no forward called; on stand-ins
written as timm, Hugging Face and torchvision write them (tests/models.py),
and on the real models where those packages work."""

import pytest
import torch
from torch import nn

import regdrop_ext
from models import DROPOUT, SDPA, Classifier
from third_party import import_or_skip


def sites(calls):
    return [(call.module, call.function, call.fused, call.count) for call in calls]


@pytest.fixture
def x():
    return torch.randn(4, 5, 16)


def test_native_model_every_random_op_with_its_module_and_function(x):
    trace = regdrop_ext.trace_random_ops(Classifier().train(), x)
    assert sites(trace.calls) == [
        ("blocks.0", SDPA, False, 1),
        ("blocks.0.proj_drop", DROPOUT, False, 1),
        ("blocks.1", SDPA, False, 1),
        ("blocks.1.proj_drop", DROPOUT, False, 1),
        ("", DROPOUT, False, 1),
    ]
    assert trace.fused == [] and trace.native == trace.calls
    assert list(trace.never_called) == ["blocks.0.attn_drop", "blocks.1.attn_drop"]


def test_converted_model_what_convert_could_not_reach(x):
    model, summary = regdrop_ext.convert(Classifier().train())
    assert "blocks.0.attn_drop" in summary.replaced  # replaced, yet never called
    trace = regdrop_ext.trace_random_ops(model, x)
    assert sites(trace.native) == [("blocks.0", SDPA, False, 1), ("blocks.1", SDPA, False, 1), ("", DROPOUT, False, 1)]
    assert [(call.module, call.op) for call in trace.fused] == [
        ("blocks.0.proj_drop", "regdrop.dropout.default"),
        ("blocks.1.proj_drop", "regdrop.dropout.default"),
    ]
    assert list(trace.never_called) == ["blocks.0.attn_drop", "blocks.1.attn_drop"]
    text = str(trace)
    assert text.splitlines()[0] == "one forward: 5 random ops, 2 by regdrop_ext, 3 native"
    assert f"  blocks.0 (FusedAttention): {SDPA} -> aten." in text
    assert "  blocks.0.attn_drop: Dropout(p=0.1, inplace=False)" in text


def test_eval_mode_and_zero_probabilities_draw_nothing(x):
    assert regdrop_ext.trace_random_ops(Classifier().eval(), x).calls == []
    quiet = Classifier(drop_rate=0.0)
    for block in quiet.blocks:
        block.attn_drop.p = block.proj_drop.p = 0.0
    trace = regdrop_ext.trace_random_ops(quiet.train(), x)  # SDPA with dropout_p=0 draws nothing
    assert trace.calls == [] and trace.never_called == {}


def test_shared_layers_count_every_call_under_their_first_name():
    shared = nn.Dropout(0.3)
    model = nn.Sequential(shared, nn.Linear(8, 8), shared)
    trace = regdrop_ext.trace_random_ops(model, torch.randn(2, 8))
    assert sites(trace.calls) == [("0", DROPOUT, False, 2)]
    assert "x2" in str(trace.calls[0])


@pytest.mark.parametrize(
    "make, function",
    [
        (lambda: nn.MultiheadAttention(16, 2, dropout=0.1, batch_first=True), "multi_head_attention_forward"),
        (lambda: nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True), "dropout"),
        (lambda: nn.RReLU(), "rrelu"),
    ],
    ids=["MultiheadAttention", "TransformerEncoderLayer", "RReLU"],
)
def test_torch_layers_that_draw_inside(make, function, x):
    layer = make().train()
    inputs = (x, x, x) if isinstance(layer, nn.MultiheadAttention) else (x,)
    trace = regdrop_ext.trace_random_ops(layer, *inputs)
    assert trace.calls and all(not call.fused for call in trace.calls)
    assert any(function in call.function for call in trace.calls), str(trace)


def test_random_code_outside_any_dropout_is_seen():
    class Noise(nn.Module):
        def forward(self, x):
            return x + 0.1 * torch.randn_like(x) * (torch.rand(x.shape) < 0.5)

    trace = regdrop_ext.trace_random_ops(nn.Sequential(nn.Linear(4, 4), Noise()), torch.randn(3, 4))
    assert [(call.module, call.function) for call in trace.calls] == [("1", "torch.randn_like"), ("1", "torch.rand")]


def test_tracing_leaves_the_model_and_the_generators_as_they_were(x):
    model = Classifier().train()
    model.blocks[0].register_forward_hook(lambda *args: None)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]
    rng = torch.get_rng_state()
    regdrop_ext.trace_random_ops(model, x)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BatchNorm statistics too
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())


def test_hooks_are_removed_when_the_forward_raises():
    model = nn.Sequential(nn.Dropout(0.1), nn.Linear(4, 4))
    with pytest.raises(RuntimeError):
        regdrop_ext.trace_random_ops(model, torch.randn(2, 5))  # wrong width
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_a_compiled_model_is_traced_through_its_eager_module(x):
    model = Classifier().train()
    compiled = torch.compile(model)
    assert sites(regdrop_ext.trace_random_ops(compiled, x).calls) == sites(regdrop_ext.trace_random_ops(model, x).calls)


# --- the real models, where their packages work -------------------------------------------


def convert_and_trace(model, *inputs):
    model, _ = regdrop_ext.convert(model.train())
    return regdrop_ext.trace_random_ops(model, *inputs)


def test_timm_vit_attention_dropout_stays_native_and_attn_drop_is_never_called():
    timm = import_or_skip("timm")
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=16, num_classes=3, depth=2,
        drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.1,
    )  # fmt: skip
    trace = convert_and_trace(model, torch.randn(2, 3, 32, 32))
    assert any("scaled_dot_product_attention" in call.function for call in trace.native), str(trace)
    assert "blocks.0.attn.attn_drop" in trace.never_called
    assert any(call.module == "blocks.1.drop_path1" for call in trace.fused)  # block 0 has rate 0: Identity


def test_timm_resnet_classifier_dropout_stays_native():
    timm = import_or_skip("timm")
    model = timm.create_model("resnet18", num_classes=3, drop_rate=0.25)
    trace = convert_and_trace(model, torch.randn(2, 3, 32, 32))
    assert sites(trace.native) == [("", DROPOUT, False, 1)]


def test_hugging_face_bert_attention_dropout_stays_native():
    transformers = import_or_skip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        attn_implementation="sdpa",
    )  # fmt: skip
    trace = convert_and_trace(transformers.BertModel(config), torch.randint(0, 50, (2, 7)))
    assert any("scaled_dot_product_attention" in call.function for call in trace.native), str(trace)
    assert any(name.endswith("attention.self.dropout") for name in trace.never_called), str(trace)
