"""regdrop_ext: fused one-pass dropout kernels for PyTorch, with 1-bit masks.

Importing the package loads the C++/CUDA library, which registers the ops as
``torch.ops.regdrop.*`` and their autograd, then their fake kernels
(``_ops``) and vmap rules (``batching``).
"""

from ._library import load_compiled_library

load_compiled_library()  # registers torch.ops.regdrop, or says why it cannot

from . import _ops  # noqa: E402, F401  (fake kernels)
from . import norm_fakes  # noqa: E402, F401  (the norm ops' fake kernels)
from . import batching  # noqa: E402

batching.register()
from . import dtensor  # noqa: E402

dtensor.register_when_imported()  # DTensor handlers, once torch.distributed.tensor is imported
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
from .dropout_layers import is_dropout_layer
from .fuse_norms import FusionSummary, fuse_norms
from .mc import MCPrediction, mc_dropout, mc_predict, mc_unreachable_random_calls
from .norm import drop_path_add_layer_norm, drop_path_add_rms_norm, dropout_add_layer_norm, dropout_add_rms_norm
from .norm_modules import DropoutAddLayerNorm, DropoutAddRMSNorm, DropPathAddLayerNorm, DropPathAddRMSNorm
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
from .trace import RandomCall, RandomOpTrace, trace_random_ops

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
    "DropoutAddLayerNorm",
    "DropoutAddRMSNorm",
    "DropPathAddLayerNorm",
    "DropPathAddRMSNorm",
    "FusionSummary",
    "MCPrediction",
    "RandomCall",
    "RandomOpTrace",
    "SharedRandomState",
    "bias_dropout_add",
    "convert",
    "drop_path",
    "drop_path_add",
    "drop_path_add_layer_norm",
    "drop_path_add_rms_norm",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "dropout_add",
    "dropout_add_layer_norm",
    "dropout_add_rms_norm",
    "fuse_norms",
    "is_dropout_layer",
    "mc_dropout",
    "mc_predict",
    "mc_unreachable_random_calls",
    "seed_ranks",
    "trace_random_ops",
]
