"""regdrop_ext: fused one-pass dropout kernels for PyTorch, with 1-bit masks.

Importing the package loads the C++/CUDA library, which registers the ops of
the manifest as ``torch.ops.regdrop.*`` with their kernels, meta kernels and
autograd; then the in-place ops' functionalization (``_ops``), the vmap rules
(``batching``; ``norm_batching`` for the norm family) and the DTensor handlers
(``dtensor``). The package exports every function of ``functional`` and
``norm``, and every module of ``modules`` and ``norm_modules``.
"""

from ._library import load_compiled_library

load_compiled_library()  # registers torch.ops.regdrop, or says why it cannot

from ._built_against import VERSION as __version__  # noqa: E402  (0.1.0+torch2.13.0cpu: names its torch)

from . import _ops  # noqa: E402, F401  (the in-place ops' functionalization)
from . import batching, norm_batching  # noqa: E402

batching.register()
norm_batching.register()
from . import dtensor  # noqa: E402

dtensor.register_when_imported()  # DTensor handlers, once torch.distributed.tensor is imported
from . import functional, modules, norm, norm_modules  # noqa: E402
from .attention import scaled_dot_product_attention  # noqa: E402
from .convert import ConversionSummary, convert  # noqa: E402
from .distributed import SharedRandomState, seed_ranks  # noqa: E402
from .dropout_layers import is_dropout_layer  # noqa: E402
from .fuse_norms import FusionSummary, fuse_norms  # noqa: E402
from .functional import *  # noqa: E402, F401, F403  (every function of the functional layer)
from .mc import MCPrediction, mc_dropout, mc_predict, mc_unreachable_random_calls  # noqa: E402
from .modules import *  # noqa: E402, F401, F403  (every module)
from .norm import *  # noqa: E402, F401, F403  (dropout + residual + norm, functions)
from .norm_modules import *  # noqa: E402, F401, F403  (and modules)
from .trace import RandomCall, RandomOpTrace, trace_random_ops  # noqa: E402

__all__ = sorted(
    functional.__all__
    + modules.__all__
    + norm.__all__
    + norm_modules.__all__
    + [
        "ConversionSummary",
        "FusionSummary",
        "MCPrediction",
        "RandomCall",
        "RandomOpTrace",
        "SharedRandomState",
        "convert",
        "fuse_norms",
        "is_dropout_layer",
        "mc_dropout",
        "mc_predict",
        "mc_unreachable_random_calls",
        "scaled_dot_product_attention",
        "seed_ranks",
        "trace_random_ops",
    ]
)
