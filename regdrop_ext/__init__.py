"""regdrop_ext: fused one-pass dropout kernels for PyTorch, with 1-bit masks.

Importing the package loads the C++/CUDA library, which registers the ops as
``torch.ops.regdrop.*``, then their fake kernels and autograd (``_ops``).
"""

from . import _C  # noqa: F401  (registers torch.ops.regdrop)
from . import _ops  # noqa: F401  (fake kernels and autograd)
from .functional import (
    bias_dropout_add,
    drop_path,
    drop_path_add,
    dropout,
    dropout1d,
    dropout2d,
    dropout3d,
    dropout_add,
)
from .modules import (
    BiasDropoutAdd,
    DropPath,
    DropPathAdd,
    Dropout,
    Dropout1d,
    Dropout2d,
    Dropout3d,
    DropoutAdd,
)

__all__ = [
    "BiasDropoutAdd",
    "DropPath",
    "DropPathAdd",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "DropoutAdd",
    "bias_dropout_add",
    "drop_path",
    "drop_path_add",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "dropout_add",
]
