"""convert(functional=True, attention=...): the dropout a forward calls as a
function, drawn by regdrop_ext; SDPA's dropout through its math path with
regdrop_ext's mask, against torch's math path given that mask; and the
routing under torch.compile, pickling and exceptions."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regdrop_ext
from models import SDPA, Classifier
from regdrop_ext import attention, routing
from reference import keep_scale


class Calls(nn.Module):
    """Calls one functional dropout in its forward, as timm's heads and Swin's attention do."""

    def __init__(self, function, p: float = 0.25):
        super().__init__()
        self.function, self.p = function, p

    def forward(self, x):
        if self.function is torch.dropout:
            return torch.dropout(x, self.p, self.training)
        return self.function(x, p=self.p, training=self.training)


# function: (input shape, the regdrop_ext function that must draw the same mask)
FUNCTIONS = {
    F.dropout: ((6, 40), regdrop_ext.dropout),
    F.dropout1d: ((6, 8, 5), regdrop_ext.dropout1d),
    F.dropout2d: ((6, 8, 5, 2), regdrop_ext.dropout2d),
    F.dropout3d: ((6, 8, 5, 2, 1), regdrop_ext.dropout3d),
    torch.dropout: ((6, 40), regdrop_ext.dropout),
}


@pytest.mark.parametrize("function", FUNCTIONS, ids=lambda f: f.__name__)
def test_functional_dropout_draws_regdrops_mask(function):
    shape, regdrop_function = FUNCTIONS[function]
    model, summary = regdrop_ext.convert(Calls(function), functional=True)
    x = torch.randn(shape)
    torch.manual_seed(5)
    out = model(x)
    torch.manual_seed(5)
    assert torch.equal(out, regdrop_function(x, 0.25, True))
    (call,) = regdrop_ext.trace_random_ops(model, x).calls
    assert call.fused and call.function.endswith(function.__name__) and call.op.startswith("regdrop.")
    assert torch.equal(model.eval()(x), x)


def test_without_functional_the_calls_stay_torchs():
    model, _ = regdrop_ext.convert(Calls(F.dropout))
    (call,) = regdrop_ext.trace_random_ops(model, torch.randn(4, 8)).calls
    assert not call.fused


def test_tensors_regdrop_does_not_take_go_to_torch():
    model, _ = regdrop_ext.convert(Calls(F.dropout, p=0.5), functional=True)
    nested = torch.nested.nested_tensor([torch.ones(3), torch.ones(5)])
    out = model(nested)
    assert {value for row in out.unbind() for value in row.tolist()} <= {0.0, 2.0}


def test_the_mode_is_left_when_the_forward_raises_and_converting_twice_routes_once():
    model, _ = regdrop_ext.convert(nn.Sequential(nn.Linear(4, 4), Calls(F.dropout)), functional=True)
    regdrop_ext.convert(model, functional=True, attention="math")
    assert len(model._forward_pre_hooks) == len(model._forward_hooks) == 1
    assert routing.routing_of(model).attention == "math"
    depth = torch._C._len_torch_function_stack()
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5))  # wrong width
    assert torch._C._len_torch_function_stack() == depth
    model(torch.randn(2, 4))
    assert torch._C._len_torch_function_stack() == depth


def test_routing_survives_pickling_and_deepcopy():
    model, _ = regdrop_ext.convert(Calls(F.dropout), functional=True)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (torch.load(buffer, weights_only=False), copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert routing.routing_of(clone) is not None
        assert regdrop_ext.trace_random_ops(clone, torch.randn(4, 8)).calls[0].fused


# --- attention ---------------------------------------------------------------------------

P = 0.25  # 16384 / 65536: regdrop's keep scale is exactly 1 / (1 - p), as torch's math path scales


def kept(shape, seed):
    """The keep mask that regdrop_ext.dropout draws for a contiguous tensor of ``shape`` after manual_seed(seed)."""
    torch.manual_seed(seed)
    return torch.ops.regdrop.dropout(torch.ones(shape), P)[0] != 0


CASES = {
    "plain": dict(),
    "bool_mask": dict(attn_mask="bool"),
    "float_mask": dict(attn_mask="float"),
    "causal": dict(is_causal=True),
    "scale": dict(scale=0.3),
    "gqa": dict(enable_gqa=True),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdpa_math_path_with_regdrops_mask_matches_torchs_math_path(case, dtype):
    """Forward and gradients against aten._scaled_dot_product_attention_math
    given the mask regdrop_ext drew, within the math path's rounding (bf16:
    both compute in float32 and round the output once)."""
    options = dict(CASES[case])
    generator = torch.Generator().manual_seed(0)
    heads_kv = 2 if options.get("enable_gqa") else 4
    q = torch.randn(2, 4, 5, 8, generator=generator).to(dtype).requires_grad_()
    k = torch.randn(2, heads_kv, 6, 8, generator=generator).to(dtype).requires_grad_()
    v = torch.randn(2, heads_kv, 6, 8, generator=generator).to(dtype).requires_grad_()
    if options.get("attn_mask") == "bool":
        options["attn_mask"] = torch.rand(5, 6, generator=generator) > 0.3
        options["attn_mask"][2] = False  # a fully masked row: zeros, not NaN
    elif options.get("attn_mask") == "float":
        options["attn_mask"] = torch.randn(5, 6, generator=generator).to(dtype)
    if options.get("is_causal"):
        k, v = (t.detach()[..., :5, :].requires_grad_() for t in (k, v))
    torch.manual_seed(11)
    ours = attention.scaled_dot_product_attention(q, k, v, dropout_p=P, **options)
    mask = kept((2, 4, 5, k.size(-2)), seed=11)
    if "attn_mask" in options and options["attn_mask"].dtype == torch.bool:
        # As F.scaled_dot_product_attention hands a bool mask to its math path.
        options["attn_mask"] = torch.zeros(5, 6).masked_fill(options["attn_mask"].logical_not(), float("-inf"))
    theirs = torch.ops.aten._scaled_dot_product_attention_math(q, k, v, dropout_p=P, dropout_mask=mask, **options)[0]
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(ours, theirs, **tolerance)
    assert ours.dtype == dtype and not ours.isnan().any()
    grad = torch.randn(ours.shape, generator=generator).to(dtype)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    theirs_grads = torch.autograd.grad(theirs, (q, k, v), grad)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, **tolerance)


def test_keep_scale_is_torchs_at_this_p():
    assert keep_scale(P) == 1 / (1 - P)


def test_the_math_path_runs_on_the_cpu_with_dropout():
    q = torch.randn(2, 3, 5, 8)
    assert attention.math_path_runs(q, q, q, dropout_p=0.1)


def sdpa_calls(model, x):
    return [(call.function, call.fused) for call in regdrop_ext.trace_random_ops(model, x).calls if call.function == SDPA]


@pytest.mark.parametrize("choice, fused", [("sdpa", False), ("math", True), ("always", True)])
def test_attention_choice(choice, fused):
    model, _ = regdrop_ext.convert(Classifier(), attention=choice)
    assert sdpa_calls(model, torch.randn(4, 5, 16)) == [(SDPA, fused)] * 2


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_dropout_is_reached(need_weights):
    """need_weights=True: F.dropout on the weights (functional=True);
    need_weights=False: SDPA's dropout_p (attention="math")."""

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(16, 2, dropout=0.2, batch_first=True)

        def forward(self, x):
            return self.attention(x, x, x, need_weights=need_weights)[0]

    x = torch.randn(3, 5, 16)
    model = SelfAttention()
    assert [call.fused for call in regdrop_ext.trace_random_ops(model, x).calls] == [False]
    regdrop_ext.convert(model, functional=True, attention="math")
    (call,) = regdrop_ext.trace_random_ops(model, x).calls
    assert call.fused and call.module == "attention"
    assert call.function == ("torch.nn.functional.dropout" if need_weights else SDPA)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), SelfAttention.forward(model, x))


def test_a_routed_model_compiles_fullgraph_and_draws_eagers_masks():
    """Every random op of the graph is regdrop_ext's, so the compiled model
    draws eager's masks (its matmuls may round differently)."""
    torch.manual_seed(0)
    model, _ = regdrop_ext.convert(Classifier(), functional=True, attention="math")
    x = torch.randn(4, 5, 16)
    torch.manual_seed(3)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    torch.manual_seed(3)
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)
    torch.manual_seed(4)
    assert not torch.allclose(compiled(x), eager, rtol=1e-3, atol=1e-3), "a new seed drew the same masks"
