// What the kernels (patch.cpp, projection.cpp) share: bit casts, a branch-free select, the
// exact binary16 -> binary32 widening, and the IEEE floating-point environment they run in.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#ifndef RESTA_INLINE
#define RESTA_INLINE inline __attribute__((always_inline))
#endif

namespace resta {

RESTA_INLINE uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

RESTA_INLINE float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// c ? a : b as bit operations: GCC then vectorizes the loops on every target
// instead of keeping a branch (under the default -ftrapping-math it will not
// if-convert conditional float work).
RESTA_INLINE uint32_t select_u32(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(c);
  return (a & m) | (b & ~m);
}

// IEEE binary16 -> binary32, exact for every input (subnormals, inf, NaN).
RESTA_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;
  // Normal: move exponent and mantissa into place and rebias 15 -> 127.
  const uint32_t normal = (em << 13) + ((127u - 15u) << 23);
  // Inf/NaN: exponent 31 -> 255, payload kept and a NaN made quiet, exactly
  // as F16C's vcvtph2ps does, so every variant returns the same bits.
  const uint32_t infnan = (em << 13) | 0x7F800000u | select_u32(em > 0x7C00u, 0x00400000u, 0u);
  // Subnormal (and zero): m * 2^-24; both the conversion and the scaling are
  // exact (m < 2^10) and the result is a normal fp32, so FTZ/DAZ cannot bite.
  const uint32_t sub = f32_bits(static_cast<float>(static_cast<int32_t>(em)) * 0x1p-24f);
  const uint32_t mag = select_u32(em >= 0x7C00u, infnan, select_u32(em >= 0x0400u, normal, sub));
  return bits_f32(mag | sign);
}

// The IEEE default floating-point environment for the duration of a range:
// round to nearest even, no flush-to-zero or denormals-are-zero, exceptions
// masked. A caller that set FTZ/DAZ (torch.set_flush_denormal(True) does)
// would otherwise change subnormal results, and OpenMP workers, which keep
// the environment they started with, would disagree with the calling thread.
class IeeeEnvironment {
 public:
#if defined(__x86_64__) && defined(__GNUC__)
  IeeeEnvironment() : saved_(_mm_getcsr()) { _mm_setcsr(kDefaultMxcsr); }
  ~IeeeEnvironment() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kDefaultMxcsr = 0x1F80;  // all exceptions masked, RNE
  unsigned saved_;
#endif
};

}  // namespace resta
