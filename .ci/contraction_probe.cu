// r + x * s written with plain operators, in the three types the gate's
// contraction check looks at: what nvcc fuses into FFMA, DFMA and HFMA2 when
// --fmad=true lets it. .ci/cuda_compile_check.sh builds this with
// --fmad=true and expects .ci/sass_gate.py to refuse all three, and with
// --fmad=false and expects it to pass: the check sees contraction, and
// nothing else.
#include <cuda_fp16.h>

__global__ void probe_float(const float* x, const float* r, float* y, float s) {
  y[threadIdx.x] = r[threadIdx.x] + x[threadIdx.x] * s;
}

__global__ void probe_double(const double* x, const double* r, double* y, double s) {
  y[threadIdx.x] = r[threadIdx.x] + x[threadIdx.x] * s;
}

__global__ void probe_half2(const __half2* x, const __half2* r, __half2* y, __half2 s) {
  y[threadIdx.x] = r[threadIdx.x] + x[threadIdx.x] * s;
}
