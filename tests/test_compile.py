"""torch.library.opcheck for every op, and torch.compile(fullgraph=True)."""

import pytest
import torch

import regdrop_ext

ops = torch.ops.regdrop


def _opcheck_cases(device):
    x = torch.randn(3, 17, device=device, requires_grad=True)
    cl = torch.randn(2, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last)
    mask = ops.dropout(x, 0.5, seed=1)[1]
    seeded = {"seed": 5, "offset": 8}
    return [
        (ops.dropout.default, (x, 0.5), seeded),
        (ops.dropout.default, (cl, 0.3), seeded),
        (ops.dropout.default, (x[:, ::2], 0.3), seeded),
        (ops.dropout_.default, (x.detach().clone(), 0.5), seeded),
        (ops.dropout_backward.default, (torch.randn(3, 17, device=device, requires_grad=True), mask, 0.5), {}),
    ]


def test_opcheck_every_op(device):
    covered = set()
    for op, args, kwargs in _opcheck_cases(device):
        torch.library.opcheck(op, args, kwargs)
        covered.add(op._schema.name)
    registered = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("regdrop::")}
    assert covered == registered, f"ops without an opcheck case: {registered - covered}"


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(32, 32)
        self.drop = regdrop_ext.Dropout(0.3)
        self.drop_inplace = regdrop_ext.Dropout(0.2, inplace=True)

    def forward(self, x):
        return self.drop_inplace(self.linear(self.drop(x))).relu()


def test_compile_fullgraph_matches_eager_draw_for_draw(device):
    """The op is opaque to the compiler and reads the same generator as in
    eager mode, so a compiled model draws exactly the eager masks."""
    torch._dynamo.reset()
    model = Block().to(device)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    x = torch.randn(8, 32, device=device, requires_grad=True)

    torch.manual_seed(0)
    eager_out = model(x)
    eager_out.sum().backward()
    eager_grad = x.grad.clone()
    x.grad = None

    torch.manual_seed(0)
    compiled_out = compiled(x)
    compiled_out.sum().backward()
    torch.testing.assert_close(compiled_out, eager_out)
    torch.testing.assert_close(x.grad, eager_grad)


def test_compile_dynamic_shapes(device):
    torch._dynamo.reset()
    f = torch.compile(lambda t: regdrop_ext.dropout(t, 0.5) * 2, fullgraph=True, dynamic=True)
    for n in (10, 33, 1000):
        out = f(torch.ones(n, device=device))
        assert out.shape == (n,) and set(out.unique().tolist()) <= {0.0, 4.0}
