"""regdrop_ext: fused one-pass dropout kernels for PyTorch, with 1-bit masks.

Importing the package loads the C++/CUDA library, which registers the ops as
``torch.ops.regdrop.*``, then their fake kernels and autograd (``_ops``).
"""

from . import _C  # noqa: F401  (registers torch.ops.regdrop)
from . import _ops  # noqa: F401  (fake kernels and autograd)
from .functional import dropout
from .modules import Dropout

__all__ = ["Dropout", "dropout"]
