// The CPU norm kernels (norm_kernels.h) for any CPU: the compiler's default instruction set.
#include "norm_isa.h"

#define REGDROP_CPU_ISA baseline
#include "norm_kernels.h"
