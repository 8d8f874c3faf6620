// Subnormal floats kept, whatever the thread's floating-point mode says.
//
// CUDA kernels never flush subnormals (.ci/sass_gate.py refuses .FTZ), but
// x86 CPUs do where a thread sets MXCSR's flush-to-zero (FTZ) and
// denormals-are-zero (DAZ) bits, as torch.set_flush_denormal(True) does. The
// CPU kernels, and the host emulation of the CUDA kernels, run under a
// KeepSubnormals on every thread they use: it clears both bits for its
// lifetime and restores them after, so both devices give the same bits and
// PyTorch's own ops keep the mode they were given. Elsewhere a no-op:
// torch.set_flush_denormal only acts on x86.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace regdrop {

class KeepSubnormals {
 public:
#if defined(__x86_64__) || defined(__i386__)
  KeepSubnormals() : saved_(_mm_getcsr()) {
    if (saved_ & kFlushBits) _mm_setcsr(saved_ & ~kFlushBits);
  }
  ~KeepSubnormals() {
    if (saved_ & kFlushBits) _mm_setcsr(saved_);
  }
#endif
  KeepSubnormals(const KeepSubnormals&) = delete;
  KeepSubnormals& operator=(const KeepSubnormals&) = delete;

 private:
#if defined(__x86_64__) || defined(__i386__)
  static constexpr unsigned kFlushBits = 0x8040;  // FTZ (bit 15) | DAZ (bit 6)
  unsigned saved_;
#endif
};

}  // namespace regdrop
