// Fused RESTA kernel (docs/spec.md §2-3) for the CPU.
//
// Work is split into blocks of kBlock elements. Per block every input is
// decoded to fp32 staging arrays, the docs/spec.md §2 arithmetic runs over the arrays,
// and the result is rounded into the output. Each step is a branch-free loop
// over the block (selects, not branches) that GCC auto-vectorizes; dtype and
// formula choices are made once per block, never per element. Staging keeps
// the number of compiled loops linear in the number of dtypes (3 decoders,
// 6 formulas, 3 encoders) instead of one fused loop per dtype combination.
//
// Instruction sets: the loops are written once as always_inline functions and
// instantiated into x86-64-v4, x86-64-v3 and baseline wrappers via GCC target
// attributes; the best variant the CPU supports is chosen at first use and can
// be forced (set_isa / RESTA_FAST_ISA) so tests check every variant bit for
// bit. Two steps GCC vectorizes poorly are hand-written for v3/v4: Philox
// (philox.h) and fp16 conversion (F16C). All loads and stores of caller memory
// go through memcpy: safetensors pointers may be only 2-byte aligned. Built
// with -ffp-contract=off and without -ffast-math, so each fp32 operation below
// is one rounded IEEE operation in docs/spec.md §2 order.

#include "patch.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "dtype.h"
#include "philox.h"

#ifdef __FAST_MATH__
#error "resta_fast must not be built with -ffast-math: docs/spec.md §2 needs IEEE fp32 in order"
#endif

namespace resta {
namespace {

// Elements per block. A block's five fp32 staging arrays and Philox words
// (12 KiB at 512) must share L1d with the input lines being streamed; at 1024
// they reach ~32 KiB, Zen 4's whole L1d. Measured on a shared 2-core Zen 4
// (x86-64-v4 variant, 1 thread, 32M bf16 elements from DRAM, medians of 4
// interleaved rounds, GB/s by CPU time): block 256/512/1024/2048 -> plain
// 18.5/19.4/11.4/7.4, DARE 9.2/9.1/5.7/5.8. In cache 256..1024 are equal.
constexpr int64_t kBlock = 512;

// Below this many elements one thread does the whole job: waking an OpenMP
// team costs more than it saves. Measured on the same machine, bf16, 10th
// percentile of 400 calls, 1 vs 2 threads: plain 8K 3.3/4.0 us, 16K 5.9/5.5,
// 64K 21.6/13.2; DARE 8K 8.2/6.7, 16K 15.5/10.4, 64K 60.7/33.0. Two threads
// win from about 16K elements; 32K leaves a margin for a busy second core.
constexpr int64_t kParallelMin = 1 << 15;

// binary32 -> binary16, IEEE round-to-nearest-even (as torch's .to(float16)).
// A NaN keeps its sign and top payload bits and is made quiet, as F16C's
// vcvtps2ph does (torch may write another NaN; docs/spec.md §2 compares NaN-ness).
RESTA_INLINE uint16_t float_to_half(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7FFFFFFFu;
  // [2^-14, 2^16): rebias 127 -> 15 and round the 13 dropped bits to nearest
  // even with integer adds; a carry rolls into the exponent, up to inf.
  const uint32_t normal = (ax - ((127u - 15u) << 23) + 0x0FFFu + ((ax >> 13) & 1u)) >> 13;
  // Below 2^-14: in |f| + 0.5f the last mantissa bit weighs 2^-24, the fp16
  // subnormal step, so the FPU's own round-to-nearest-even does the rounding.
  const uint32_t sub = f32_bits(bits_f32(ax) + 0.5f) - 0x3F000000u;
  const uint32_t finite = select_u32(ax >= 0x38800000u, normal, sub);
  const uint32_t nan = 0x7E00u | ((ax >> 13) & 0x03FFu);
  const uint32_t mag = select_u32(ax > 0x7F800000u, nan, select_u32(ax >= 0x47800000u, 0x7C00u, finite));
  return static_cast<uint16_t>(mag | sign);
}

// binary32 -> bfloat16 by docs/spec.md §2's integer round-to-nearest-even; NaN -> 0x7FC0.
RESTA_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t x = f32_bits(f);
  const uint32_t rounded = (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16;
  const bool nan = (x & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(select_u32(nan, 0x7FC0u, rounded));
}

// Portable block conversions for fp16, vectorized by GCC for each variant.
RESTA_INLINE void f16_decode_portable(float* __restrict dst, const unsigned char* src, int64_t len) {
  for (int64_t j = 0; j < len; ++j) {
    uint16_t h;
    std::memcpy(&h, src + 2 * j, 2);
    dst[j] = half_to_float(h);
  }
}

RESTA_INLINE void f16_encode_portable(unsigned char* dst, const float* __restrict src, int64_t len) {
  for (int64_t j = 0; j < len; ++j) {
    const uint16_t h = float_to_half(src[j]);
    std::memcpy(dst + 2 * j, &h, 2);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// F16C conversions for the v3/v4 variants (x86-64-v3 implies F16C). They are
// bit-identical to the portable ones above, NaN payloads included (tests
// check all 65536 halves and the rounding boundaries), and about 3x faster:
// in-cache plain fp16 patch went from 1.24 to 4.37 G elements/s (1 thread, Zen 4).
// Immediate rounding (not MXCSR) picks round-to-nearest-even.
__attribute__((target("avx2,f16c"))) void f16_decode_f16c(float* __restrict dst, const unsigned char* src,
                                                          int64_t len) {
  int64_t j = 0;
  for (; j + 8 <= len; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * j))));
  f16_decode_portable(dst + j, src + 2 * j, len - j);
}

__attribute__((target("avx2,f16c"))) void f16_encode_f16c(unsigned char* dst, const float* __restrict src,
                                                          int64_t len) {
  int64_t j = 0;
  for (; j + 8 <= len; j += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 2 * j),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  f16_encode_portable(dst + 2 * j, src + j, len - j);
}
#endif

// What differs between variants besides the compiler's target: the Philox
// block generator and the fp16 block converters.
struct PortableIsa {
  static RESTA_INLINE void words(uint32_t* __restrict w, uint64_t q0, int64_t nq, uint64_t seed) {
    philox_words(w, q0, nq, seed);
  }
  static RESTA_INLINE void f16_decode(float* __restrict dst, const unsigned char* src, int64_t len) {
    f16_decode_portable(dst, src, len);
  }
  static RESTA_INLINE void f16_encode(unsigned char* dst, const float* __restrict src, int64_t len) {
    f16_encode_portable(dst, src, len);
  }
};

#if defined(__x86_64__) && defined(__GNUC__)
struct Avx2Isa {
  static void words(uint32_t* __restrict w, uint64_t q0, int64_t nq, uint64_t seed) {
    philox_words_avx2(w, q0, nq, seed);
  }
  static void f16_decode(float* __restrict dst, const unsigned char* src, int64_t len) {
    f16_decode_f16c(dst, src, len);
  }
  static void f16_encode(unsigned char* dst, const float* __restrict src, int64_t len) {
    f16_encode_f16c(dst, src, len);
  }
};

struct Avx512Isa : Avx2Isa {
  static void words(uint32_t* __restrict w, uint64_t q0, int64_t nq, uint64_t seed) {
    philox_words_avx512(w, q0, nq, seed);
  }
};
#endif

// Decode len elements at src (any alignment) to fp32.
template <class Isa>
RESTA_INLINE void decode(float* __restrict dst, const unsigned char* src, int dtype, int64_t len) {
  switch (dtype) {
    case kBF16:
      for (int64_t j = 0; j < len; ++j) {
        uint16_t h;
        std::memcpy(&h, src + 2 * j, 2);
        dst[j] = bits_f32(static_cast<uint32_t>(h) << 16);
      }
      break;
    case kF16:
      Isa::f16_decode(dst, src, len);
      break;
    default:
      std::memcpy(dst, src, 4 * len);
      break;
  }
}

// Round len fp32 values into dst (any alignment) with docs/spec.md §2's rounding and
// return how many stored values are inf or NaN. Counting here, on data still
// in L1, spares the pipeline a second pass over its output.
template <class Isa>
RESTA_INLINE uint32_t encode(unsigned char* dst, int dtype, const float* __restrict src, int64_t len) {
  uint32_t nonfinite = 0;  // 32 bits (len <= kBlock) keeps the sum in vector lanes
  switch (dtype) {
    case kBF16:
      for (int64_t j = 0; j < len; ++j) {
        const uint16_t h = float_to_bf16(src[j]);
        std::memcpy(dst + 2 * j, &h, 2);
        nonfinite += static_cast<uint32_t>((h & 0x7F80u) == 0x7F80u);
      }
      break;
    case kF16:
      Isa::f16_encode(dst, src, len);
      for (int64_t j = 0; j < len; ++j) {
        uint16_t h;
        std::memcpy(&h, dst + 2 * j, 2);
        nonfinite += static_cast<uint32_t>((h & 0x7C00u) == 0x7C00u);
      }
      break;
    default:
      std::memcpy(dst, src, 4 * len);
      for (int64_t j = 0; j < len; ++j)
        nonfinite += static_cast<uint32_t>((f32_bits(src[j]) & 0x7F800000u) == 0x7F800000u);
      break;
  }
  return nonfinite;
}

// Room for the words of one block: at most kBlock / 4 + 1 counters (a block
// may start mid-counter), rounded up to whole vector groups.
constexpr int64_t kWordsCap = 4 * ((kBlock / 4 + 1 + kPhiloxGroup - 1) / kPhiloxGroup * kPhiloxGroup);

// Raw Philox words of flat elements g0 .. g0+len-1 (len <= kBlock); returns
// where element g0's word is (a chunk may start in the middle of a counter).
template <class Isa>
RESTA_INLINE const uint32_t* block_words(uint32_t* __restrict words, uint64_t seed, int64_t g0,
                                         int64_t len) {
  const int64_t skip = g0 & 3;
  Isa::words(words, static_cast<uint64_t>(g0) >> 2, (skip + len + 3) >> 2, seed);
  return words + skip;
}

// docs/spec.md §2 over one block of decoded inputs; w are the block's Philox words.
// kDare is false when p == 0: every uniform is >= +0 then, so keep is always
// true and the stream need not be drawn.
template <bool kHasU, bool kHasB, bool kDare>
RESTA_INLINE void combine(float* __restrict o, const float* __restrict f, const float* __restrict a,
                          const float* __restrict u, const float* __restrict b,
                          const uint32_t* __restrict w, int64_t len, float beta, float p, float r) {
  const int32_t p_bits = static_cast<int32_t>(f32_bits(p));
  for (int64_t j = 0; j < len; ++j) {
    const float t2 = kHasU ? beta * (a[j] - u[j]) : beta * a[j];
    if constexpr (!kHasB) {
      o[j] = f[j] + t2;
    } else {
      const float d = f[j] - b[j];
      const float dr = d * r;
      // uniform >= p compared as int32 bit patterns: the same answer for
      // non-negative floats (and for p = -0.0), without a float compare that
      // GCC will not if-convert.
      const bool keep = kDare ? static_cast<int32_t>(f32_bits(uniform_from_word(w[j]))) >= p_bits : true;
      // A select, not a multiply by the mask: a dropped NaN/inf delta becomes +0.0.
      const float t1 = bits_f32(select_u32(keep, f32_bits(dr), 0u));
      o[j] = (b[j] + t1) + t2;
    }
  }
}

RESTA_INLINE const unsigned char* at(const void* base, int dtype, int64_t i) {
  return static_cast<const unsigned char*>(base) + dtype_size(dtype) * i;
}

// Patch elements [begin, end); returns how many outputs are not finite.
template <class Isa>
RESTA_INLINE int64_t patch_range(const PatchArgs& g, int64_t begin, int64_t end) {
  alignas(64) float fv[kBlock];
  alignas(64) float av[kBlock];
  alignas(64) float uv[kBlock];
  alignas(64) float bv[kBlock];
  alignas(64) float ov[kBlock];
  alignas(64) uint32_t words[kWordsCap];
  const bool has_u = g.u != nullptr;
  const bool has_b = g.b != nullptr;
  const bool dare = has_b && g.p > 0.0f;
  const int form = (has_u ? 4 : 0) | (has_b ? 2 : 0) | (dare ? 1 : 0);
  unsigned char* out = static_cast<unsigned char*>(g.out);
  int64_t nonfinite = 0;
  for (int64_t s = begin; s < end; s += kBlock) {
    const int64_t len = std::min(kBlock, end - s);
    decode<Isa>(fv, at(g.f, g.f_dtype, s), g.f_dtype, len);
    decode<Isa>(av, at(g.a, g.a_dtype, s), g.a_dtype, len);
    if (has_u) decode<Isa>(uv, at(g.u, g.u_dtype, s), g.u_dtype, len);
    if (has_b) decode<Isa>(bv, at(g.b, g.b_dtype, s), g.b_dtype, len);
    const uint32_t* w = dare ? block_words<Isa>(words, g.seed, g.offset + s, len) : words;
    switch (form) {
      case 0: combine<false, false, false>(ov, fv, av, uv, bv, w, len, g.beta, g.p, g.r); break;
      case 2: combine<false, true, false>(ov, fv, av, uv, bv, w, len, g.beta, g.p, g.r); break;
      case 3: combine<false, true, true>(ov, fv, av, uv, bv, w, len, g.beta, g.p, g.r); break;
      case 4: combine<true, false, false>(ov, fv, av, uv, bv, w, len, g.beta, g.p, g.r); break;
      case 6: combine<true, true, false>(ov, fv, av, uv, bv, w, len, g.beta, g.p, g.r); break;
      default: combine<true, true, true>(ov, fv, av, uv, bv, w, len, g.beta, g.p, g.r); break;
    }
    nonfinite += encode<Isa>(out + dtype_size(g.out_dtype) * s, g.out_dtype, ov, len);
  }
  return nonfinite;
}

// Convert elements [begin, end) of g.f into g.out; returns 0.
template <class Isa>
RESTA_INLINE int64_t convert_range(const PatchArgs& g, int64_t begin, int64_t end) {
  unsigned char* out = static_cast<unsigned char*>(g.out);
  if (g.out_dtype == g.f_dtype) {  // a bit copy, as torch's copy_ between equal dtypes
    const int size = dtype_size(g.f_dtype);
    std::memcpy(out + size * begin, at(g.f, g.f_dtype, begin), size * (end - begin));
    return 0;
  }
  alignas(64) float fv[kBlock];
  for (int64_t s = begin; s < end; s += kBlock) {
    const int64_t len = std::min(kBlock, end - s);
    decode<Isa>(fv, at(g.f, g.f_dtype, s), g.f_dtype, len);
    encode<Isa>(out + dtype_size(g.out_dtype) * s, g.out_dtype, fv, len);
  }
  return 0;
}

// DARE uniforms of elements [begin, end) into the float32 array g.out; returns 0.
template <class Isa>
RESTA_INLINE int64_t uniform_range(const PatchArgs& g, int64_t begin, int64_t end) {
  float* out = static_cast<float*>(g.out);
  alignas(64) uint32_t words[kWordsCap];
  for (int64_t s = begin; s < end; s += kBlock) {
    const int64_t len = std::min(kBlock, end - s);
    const uint32_t* w = block_words<Isa>(words, g.seed, g.offset + s, len);
    for (int64_t j = 0; j < len; ++j) out[s + j] = uniform_from_word(w[j]);
  }
  return 0;
}

using RangeFn = int64_t (*)(const PatchArgs&, int64_t, int64_t);

struct Variant {
  const char* name;
  bool (*supported)();
  RangeFn patch;
  RangeFn convert;
  RangeFn uniform;
  float (*mul_add)(float, float, float);
};

// One variant per instruction set: the always_inline bodies above are
// compiled again inside each wrapper with that wrapper's target.
// mul_add_* exists to prove -ffp-contract=off took effect in each variant.
#define RESTA_VARIANT(suffix, target_attr, isa)                                              \
  target_attr float mul_add_##suffix(float a, float b, float c) { return a * b + c; }       \
  target_attr int64_t patch_##suffix(const PatchArgs& g, int64_t begin, int64_t end) {      \
    IeeeEnvironment ieee;                                                                    \
    return patch_range<isa>(g, begin, end);                                                  \
  }                                                                                          \
  target_attr int64_t convert_##suffix(const PatchArgs& g, int64_t begin, int64_t end) {    \
    IeeeEnvironment ieee;                                                                    \
    return convert_range<isa>(g, begin, end);                                                \
  }                                                                                          \
  target_attr int64_t uniform_##suffix(const PatchArgs& g, int64_t begin, int64_t end) {    \
    IeeeEnvironment ieee;                                                                    \
    return uniform_range<isa>(g, begin, end);                                                \
  }

#if defined(__x86_64__) && defined(__GNUC__)
RESTA_VARIANT(v4, __attribute__((target("arch=x86-64-v4"))), Avx512Isa)
RESTA_VARIANT(v3, __attribute__((target("arch=x86-64-v3"))), Avx2Isa)
#endif
RESTA_VARIANT(base, , PortableIsa)
#undef RESTA_VARIANT

bool always() { return true; }

// Best first.
const Variant kVariants[] = {
#if defined(__x86_64__) && defined(__GNUC__)
    {"x86-64-v4", [] { return static_cast<bool>(__builtin_cpu_supports("x86-64-v4")); }, patch_v4,
     convert_v4, uniform_v4, mul_add_v4},
    {"x86-64-v3", [] { return static_cast<bool>(__builtin_cpu_supports("x86-64-v3")); }, patch_v3,
     convert_v3, uniform_v3, mul_add_v3},
#endif
    {"default", always, patch_base, convert_base, uniform_base, mul_add_base},
};

std::atomic<const Variant*> g_variant{nullptr};

// __builtin_cpu_supports needs this first when called from a constructor or
// before libgcc's own initializer; harmless otherwise.
void cpu_init() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
#endif
}

const Variant& current() {
  const Variant* v = g_variant.load(std::memory_order_acquire);
  if (v == nullptr) {
    cpu_init();
    for (const Variant& candidate : kVariants) {
      if (candidate.supported()) {
        v = &candidate;
        break;
      }
    }
    g_variant.store(v, std::memory_order_release);
  }
  return *v;
}

// Split [0, n) into whole blocks over the threads (static partition: each
// thread streams one contiguous range), run fn on each range, sum the results.
int64_t run(RangeFn fn, const PatchArgs& g, int64_t n, int threads) {
  if (n <= 0) return 0;
  const int64_t nblocks = (n + kBlock - 1) / kBlock;
  int64_t team = threads > 0 ? threads : omp_get_max_threads();
  if (n < kParallelMin) team = 1;
  team = std::min(team, nblocks);
  if (team <= 1) return fn(g, 0, n);
  int64_t total = 0;
#pragma omp parallel num_threads(static_cast<int>(team)) reduction(+ : total)
  {
    const int64_t t = omp_get_thread_num();
    const int64_t nt = omp_get_num_threads();
    const int64_t per = nblocks / nt;
    const int64_t extra = nblocks % nt;
    const int64_t first = t * per + std::min(t, extra);
    const int64_t last = first + per + (t < extra ? 1 : 0);
    const int64_t begin = std::min(first * kBlock, n);
    const int64_t end = std::min(last * kBlock, n);
    if (begin < end) total += fn(g, begin, end);
  }
  return total;
}

}  // namespace

int64_t patch(const PatchArgs& args, int threads) { return run(current().patch, args, args.n, threads); }

void convert(void* out, int out_dtype, const void* x, int x_dtype, int64_t n, int threads) {
  PatchArgs args;
  args.out = out;
  args.out_dtype = out_dtype;
  args.f = x;
  args.f_dtype = x_dtype;
  args.n = n;
  run(current().convert, args, n, threads);
}

void uniform(float* out, uint64_t seed, int64_t offset, int64_t n, int threads) {
  PatchArgs args;
  args.out = out;
  args.out_dtype = kF32;
  args.seed = seed;
  args.offset = offset;
  args.n = n;
  run(current().uniform, args, n, threads);
}

std::string isa() { return current().name; }

std::vector<std::string> isa_supported() {
  cpu_init();
  std::vector<std::string> names;
  for (const Variant& v : kVariants)
    if (v.supported()) names.emplace_back(v.name);
  return names;
}

std::vector<std::string> isa_compiled() {
  std::vector<std::string> names;
  for (const Variant& v : kVariants) names.emplace_back(v.name);
  return names;
}

bool set_isa(const std::string& name) {
  cpu_init();
  for (const Variant& v : kVariants) {
    if (name == v.name) {
      if (!v.supported()) return false;
      g_variant.store(&v, std::memory_order_release);
      return true;
    }
  }
  return false;
}

bool fp_contract_off() {
  // (1 + 2^-12)^2 = 1 + 2^-11 + 2^-24 rounds to 1 + 2^-11, so the unfused
  // result is 0 and a fused multiply-add gives 2^-24.
  volatile float x = 1.0f + 0x1p-12f;
  volatile float c = -(1.0f + 0x1p-11f);
  for (const Variant& v : kVariants)
    if (v.supported() && v.mul_add(x, x, c) != 0.0f) return false;
  return true;
}

int64_t block_elems() { return kBlock; }
int64_t parallel_min_elems() { return kParallelMin; }
int openmp_max_threads() { return omp_get_max_threads(); }

}  // namespace resta
