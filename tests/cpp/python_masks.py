"""Prints the masks of the Python build of regdrop, for the C++ parity test
(test_python_parity.cpp): one line of hex bytes per SEED OFFSET NUMEL P
quadruple on the command line, from torch.ops.regdrop.dropout."""

import sys

import torch

import regdrop_ext  # noqa: F401  (registers torch.ops.regdrop)

args = sys.argv[1:]
for i in range(0, len(args), 4):
    seed, offset, numel = (int(a) for a in args[i : i + 3])
    p = float(args[i + 3])
    _, mask = torch.ops.regdrop.dropout(torch.ones(numel), p, seed=seed, offset=offset)
    print(bytes(mask.tolist()).hex())
