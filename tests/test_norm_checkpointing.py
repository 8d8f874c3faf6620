"""Activation checkpointing (torch.utils.checkpoint, reentrant and not) and
selective checkpointing (eager, and under torch.compile(fullgraph=True,
backend="aot_eager")) over the norm ops: dropout + residual + LayerNorm /
RMSNorm, through their modules and functions.

The norm ops are random ops tagged ``nondeterministic_seeded``, as the
element ops are (tests/test_checkpointing.py and
tests/test_selective_checkpointing.py say what torch does with that): a
recomputation restores the generator state and draws the forward's masks,
and a saved op is read back. Every test compares, bit for bit, the
checkpointed forward+backward with the unchecked one from the same seed
(output, the input's and every parameter's gradient, the generator's state
afterwards); the sanity tests show the comparisons can fail (recomputed
without the generator state restored, the masks differ).
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.backends.debugging import aot_eager
from torch._functorch.aot_autograd import make_boxed_func
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import regdrop_ext

P = 0.5  # every unit's keep flag a fair coin: two draws of a mask differ for certain
BATCH, TOKENS, WIDTH = 16, 8, 32  # 16 samples (drop-path units), 4096 elements
SEED = 1234
NORM_OPS = {"regdrop::dropout_add_norm", "regdrop::dropout_add_norm_low_memory"}


class NormBlock(nn.Module):
    """Every form of the fused norm: post-LN (BERT's LayerNorm(dropout(x) +
    input)), pre-LN RMSNorm with the low-memory mask, pre-LN drop-path, and
    the function with a deferred linear bias and no affine parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, WIDTH)
        self.post = regdrop_ext.DropoutAddLayerNorm(WIDTH, P)
        self.fc2 = nn.Linear(WIDTH, WIDTH)
        self.pre = regdrop_ext.DropoutAddRMSNorm(WIDTH, P, prenorm=True, low_memory=True)
        self.fc3 = nn.Linear(WIDTH, WIDTH)
        self.path = regdrop_ext.DropPathAddLayerNorm(WIDTH, P, prenorm=True)
        self.fc4 = nn.Linear(WIDTH, WIDTH, bias=False)
        self.fc4_bias = nn.Parameter(torch.randn(WIDTH))
        for norm in (self.post, self.pre, self.path):
            nn.init.normal_(norm.weight, 1.0, 0.2)
        for norm in (self.post, self.path):
            nn.init.normal_(norm.bias, 0.0, 0.2)

    def forward(self, x):
        h = self.post(self.fc1(x), x)
        y, stream = self.pre(self.fc2(h), h)
        z, stream = self.path(self.fc3(F.gelu(y)), stream)
        return regdrop_ext.dropout_add_layer_norm(self.fc4(z), stream, None, None, P, input_bias=self.fc4_bias)


def build(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return NormBlock().to(dtype).train()


def forward_backward(module, run, dtype=torch.float32):
    """Output, gradients (input and every parameter) and the default
    generator's state after one forward+backward seeded with SEED."""
    data = torch.Generator().manual_seed(7)
    x = torch.randn(BATCH, TOKENS, WIDTH, generator=data).to(dtype).requires_grad_()
    grad_out = torch.randn(BATCH, TOKENS, WIDTH, generator=data).to(dtype)
    module.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    out = run(module, x)
    out.backward(grad_out)
    grads = {"input": x.grad, **{name: p.grad for name, p in module.named_parameters()}}
    return out.detach(), grads, torch.get_rng_state()


def assert_same_run(expected, actual):
    (out_e, grads_e, rng_e), (out_a, grads_a, rng_a) = expected, actual
    assert torch.equal(out_a, out_e), "outputs differ"
    assert grads_a.keys() == grads_e.keys()
    for name, grad in grads_e.items():
        assert grad is not None and grads_a[name] is not None, f"{name}: no gradient"
        assert grads_a[name].dtype == grad.dtype and torch.equal(grads_a[name], grad), f"gradient of {name} differs"
    assert torch.equal(rng_a, rng_e), "the default generator ends elsewhere than after the unchecked run"


def unchecked(module, x):
    return module(x)


def checkpointed(use_reentrant, preserve_rng_state=True):
    def run(module, x):
        return checkpoint(module, x, use_reentrant=use_reentrant, preserve_rng_state=preserve_rng_state)

    return run


REENTRANT = pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non_reentrant"])


# --- activation checkpointing ----------------------------------------------------------------


@REENTRANT
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_checkpoint_reproduces_unchecked_run_bit_for_bit(dtype, use_reentrant):
    """checkpoint(block): the recomputation in backward redraws exactly the
    forward's masks (element, low-memory and drop-path), so the output and
    every gradient are the unchecked run's, bit for bit."""
    module = build(dtype)
    assert_same_run(forward_backward(module, unchecked, dtype),
                    forward_backward(module, checkpointed(use_reentrant), dtype))


@REENTRANT
def test_recomputation_from_another_generator_state_changes_gradients(use_reentrant):
    """Sanity check: with preserve_rng_state=False the recomputation draws
    new masks (p = 0.5 over thousands of units): the same output, another
    input gradient."""
    module = build()
    out_e, grads_e, _ = forward_backward(module, unchecked)
    out, grads, _ = forward_backward(module, checkpointed(use_reentrant, preserve_rng_state=False))
    assert torch.equal(out, out_e)
    assert not torch.equal(grads["input"], grads_e["input"])


# --- selective checkpointing -----------------------------------------------------------------


class Policy:
    """``regdrop`` for the regdrop ops (the norm ops are the block's only
    ones), PREFER_RECOMPUTE for every other op; records the ops it was asked about."""

    def __init__(self, regdrop) -> None:
        self.regdrop = regdrop
        self.seen = set()

    def __call__(self, ctx, op, *args, **kwargs):
        if isinstance(op, torch._ops.OpOverload) and op._schema.name.startswith("regdrop::"):
            self.seen.add(op._schema.name)
            return self.regdrop
        return CheckpointPolicy.PREFER_RECOMPUTE


def sac_contexts(make_policy):
    return create_selective_checkpoint_contexts(make_policy())


def selective(make_policy, preserve_rng_state=True):
    context_fn = functools.partial(sac_contexts, make_policy)  # dynamo takes a partial, not a closure

    def run(module, x):
        return checkpoint(module, x, use_reentrant=False, preserve_rng_state=preserve_rng_state,
                          context_fn=context_fn)

    return run


POLICIES = [CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_SAVE, CheckpointPolicy.MUST_RECOMPUTE,
            CheckpointPolicy.PREFER_RECOMPUTE]
SAVING = {CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_SAVE}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_eager_sac_reproduces_unchecked_run_bit_for_bit(policy):
    """Eager SAC with the norm ops saved or recomputed: the unchecked run,
    bit for bit, and the policy was asked about both norm forward ops."""
    module = build()
    made = []

    def make_policy():
        made.append(Policy(policy))
        return made[-1]

    assert_same_run(forward_backward(module, unchecked), forward_backward(module, selective(make_policy)))
    assert made and made[0].seen == NORM_OPS


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.name)
def test_eager_sac_policy_decides_whether_masks_are_drawn_again(policy):
    """Sanity check: without the generator state restored, a recomputed norm
    op draws new masks (the input gradient differs) and a saved one is read
    back (every gradient the unchecked run's)."""
    module = build()
    out_e, grads_e, _ = forward_backward(module, unchecked)
    out, grads, _ = forward_backward(module, selective(functools.partial(Policy, policy), preserve_rng_state=False))
    assert torch.equal(out, out_e)
    if policy in SAVING:
        for name, grad in grads_e.items():
            assert torch.equal(grads[name], grad), f"gradient of {name} differs"
    else:
        assert not torch.equal(grads["input"], grads_e["input"])


def graph_calls(graph):
    """(norm ops run directly, norm ops run through run_and_save_rng_state / run_with_rng_state) in a graph."""
    direct, replayed = [], []
    rng_prims = (torch._prims.rng_prims.run_with_rng_state, torch._prims.rng_prims.run_and_save_rng_state)
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.name in NORM_OPS:
            direct.append(node.target._schema.name)
        elif node.target in rng_prims:
            replayed.append(next(a for a in node.args if isinstance(a, torch._ops.OpOverload))._schema.name)
    return sorted(direct), sorted(replayed)


@pytest.mark.parametrize("policy", [CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_RECOMPUTE],
                         ids=lambda p: p.name)
def test_compiled_sac_reproduces_unchecked_run_and_saves_or_replays(policy):
    """torch.compile(fullgraph=True, aot_eager) of the SAC-checkpointed
    block: the unchecked eager run, bit for bit; and the graphs follow the
    policy: a saved norm op runs in the forward graph only, a recomputed one
    in forward through run_and_save_rng_state and again in backward through
    run_with_rng_state (so the equality covers a replayed generator state)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.graph)
        return make_boxed_func(gm.forward)

    backend = functools.partial(aot_eager, fw_compiler=capture, bw_compiler=capture)
    run = torch.compile(selective(functools.partial(Policy, policy)), fullgraph=True, backend=backend)
    module = build()
    assert_same_run(forward_backward(module, unchecked), forward_backward(module, run))
    forward, backward = graphs
    ops = ["regdrop::dropout_add_norm"] * 3 + ["regdrop::dropout_add_norm_low_memory"]
    if policy in SAVING:
        assert graph_calls(forward) == (sorted(ops), []) and graph_calls(backward) == ([], [])
    else:
        assert graph_calls(forward) == ([], sorted(ops)) and graph_calls(backward) == ([], sorted(ops))


def test_compiled_plain_checkpoint_bfloat16():
    """torch.compile of a plain non-reentrant checkpoint in bfloat16: the
    unchecked eager run, bit for bit."""
    module = build(torch.bfloat16)
    run = torch.compile(checkpointed(use_reentrant=False), fullgraph=True, backend="aot_eager")
    assert_same_run(forward_backward(module, unchecked, torch.bfloat16),
                    forward_backward(module, run, torch.bfloat16))
