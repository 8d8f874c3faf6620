// Provisional registration of the norm family, until the op manifest takes
// it in: the schemas (norm_schemas.h) as a fragment of the regdrop library.
// The CPU and CUDA kernels are registered at the end of cpu/norm_cpu.cpp and
// cuda/norm_backend.cpp, autograd in norm_autograd.cpp, and the fake kernels
// (symbolic shapes included) in regdrop_ext/norm_fakes.py.
#include "norm_schemas.h"

TORCH_LIBRARY_FRAGMENT(regdrop, m) { regdrop::norm::define_norm_ops(m); }
