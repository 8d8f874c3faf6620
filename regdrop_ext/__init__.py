"""regdrop_ext: fused one-pass dropout kernels for PyTorch, with 1-bit masks.

Importing the package loads the C++/CUDA library, which registers the ops as
``torch.ops.regdrop.*``, then their fake kernels and autograd (``_ops``).
"""

from ._library import load_compiled_library

load_compiled_library()  # registers torch.ops.regdrop, or says why it cannot

from . import _ops  # noqa: E402, F401  (fake kernels and autograd)
from .convert import ConversionSummary, convert
from .distributed import SharedRandomState, seed_ranks
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
from .mc import MCPrediction, is_dropout_layer, mc_dropout, mc_predict
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
    "ConversionSummary",
    "DropPath",
    "DropPathAdd",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "DropoutAdd",
    "MCPrediction",
    "SharedRandomState",
    "bias_dropout_add",
    "convert",
    "drop_path",
    "drop_path_add",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "dropout_add",
    "is_dropout_layer",
    "mc_dropout",
    "mc_predict",
    "seed_ranks",
]
