"""What the ops need from Python: the functionalization of the in-place ops.

Everything else about an op is C++, from its row of the manifest
(csrc/include/regdrop/manifest.h): the schema, the kernels, the meta kernels
that torch.compile and meta tensors run (the same op bodies, with a backend
that launches nothing), and autograd.

Under torch.compile an in-place op would become an auto_functionalized node,
which carries no nondeterministic_seeded tag: the partitioner, which replays
the generator only for tagged ops, would recompute it (checkpointing) from
another stream. As the functional op and a copy_ into the input, traced
graphs hold the tagged op itself, and recomputation draws the same mask.
"""

import torch

from . import manifest


def _functionalize_in_place(functional):
    def kernel(input, mask, *args, **kwargs):
        out, drawn = functional(input, *args, **kwargs)
        input.copy_(out)
        mask.copy_(drawn)
        return input, mask

    return kernel


_functionalization = torch.library.Library("regdrop", "IMPL")
for _op in manifest.ops("in_place"):
    _functionalization.impl(_op.name, _functionalize_in_place(manifest.OPS[_op.forward].op), "Functionalize")
