// The CPU kernel family for any CPU: the compiler's default instruction set.
#include "kernel_isa.h"

#define REGDROP_CPU_ISA baseline
#include "kernels.h"
