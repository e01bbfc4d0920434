// Philox4x32-10 and the DARE uniform of docs/spec.md §3, exactly as Triton's
// tl.randint4x / uint_to_uniform_float, so every backend draws the same mask.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace resta {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
// Triton's scale: the largest float32 below 2**-31.
constexpr float kUniformScale = 4.6566127342e-10f;

// always_inline so the body is compiled with the ISA of the kernel variant
// that calls it (see patch.cpp).
#define RESTA_INLINE inline __attribute__((always_inline))

// Philox4x32-10 in place on counter (c0..c3) with key (k0, k1).
RESTA_INLINE void philox4x32_10(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                uint32_t k0, uint32_t k1) {
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// Vector variants below write whole groups of this many counters, so a words
// buffer for nq counters needs room for 4 * round_up(nq, kPhiloxGroup) words.
constexpr int64_t kPhiloxGroup = 16;

// The raw words of counters q0 .. q0+nq-1 (counter = (q_lo, q_hi, 0, 0)),
// interleaved: words[4k + j] is word j of counter q0 + k, which is the word of
// flat element 4 (q0 + k) + j. Portable version, for the baseline variant.
RESTA_INLINE void philox_words(uint32_t* __restrict words, uint64_t q0, int64_t nq, uint64_t seed) {
  const uint32_t k0 = static_cast<uint32_t>(seed);
  const uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int64_t k = 0; k < nq; ++k) {
    const uint64_t q = q0 + static_cast<uint64_t>(k);
    uint32_t c0 = static_cast<uint32_t>(q);
    uint32_t c1 = static_cast<uint32_t>(q >> 32);
    uint32_t c2 = 0;
    uint32_t c3 = 0;
    philox4x32_10(c0, c1, c2, c3, k0, k1);
    words[4 * k + 0] = c0;
    words[4 * k + 1] = c1;
    words[4 * k + 2] = c2;
    words[4 * k + 3] = c3;
  }
}

// Counter words (lo, hi) of lanes base .. base+L-1, for the rare vector whose
// low word wraps (a carry into hi inside the vector).
template <int L>
RESTA_INLINE void lane_counters(uint32_t* lo, uint32_t* hi, uint64_t base) {
  for (int l = 0; l < L; ++l) {
    const uint64_t q = base + static_cast<uint64_t>(l);
    lo[l] = static_cast<uint32_t>(q);
    hi[l] = static_cast<uint32_t>(q >> 32);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// GCC 12 warns falsely about _mm512_undefined_* inside the intrinsics (GCC PR 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

// Hand-vectorized Philox for the x86-64-v4/v3 variants. GCC 12 vectorizes the
// portable loop with vpmovzxdq + vpmullq (full 64x64 products) plus a strided
// store; these use vpmuludq on even/odd lanes and a register transpose.
// Measured on Zen 4, words per second for 256-counter blocks: portable loop
// built for v4 0.51 G, AVX2 1.39 G, AVX-512 2.0 G.

// 16 counters k..k+15 per iteration, one per 32-bit lane.
__attribute__((target("avx512f"))) inline void philox_words_avx512(uint32_t* __restrict words,
                                                                    uint64_t q0, int64_t nq,
                                                                    uint64_t seed) {
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  __m512i key0[kPhiloxRounds];
  __m512i key1[kPhiloxRounds];
  for (int r = 0; r < kPhiloxRounds; ++r) {
    key0[r] = _mm512_set1_epi32(static_cast<int>(k0));
    key1[r] = _mm512_set1_epi32(static_cast<int>(k1));
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __mmask16 odd = 0xAAAA;
  for (int64_t k = 0; k < nq; k += 16) {
    const uint64_t base = q0 + static_cast<uint64_t>(k);
    __m512i c0;
    __m512i c1;
    if (static_cast<uint32_t>(base) <= 0xFFFFFFFFu - 15u) {
      c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base))), lanes);
      c1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32)));
    } else {
      alignas(64) uint32_t lo[16];
      alignas(64) uint32_t hi[16];
      lane_counters<16>(lo, hi, base);
      c0 = _mm512_load_si512(lo);
      c1 = _mm512_load_si512(hi);
    }
    __m512i c2 = _mm512_setzero_si512();
    __m512i c3 = _mm512_setzero_si512();
    for (int r = 0; r < kPhiloxRounds; ++r) {
      // High halves: even lanes from the even products, odd lanes from the odd.
      const __m512i pe0 = _mm512_mul_epu32(c0, m0);
      const __m512i po0 = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), m0);
      const __m512i pe1 = _mm512_mul_epu32(c2, m1);
      const __m512i po1 = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), m1);
      const __m512i hi0 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(pe0, 32), po0);
      const __m512i hi1 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(pe1, 32), po1);
      const __m512i lo0 = _mm512_mullo_epi32(c0, m0);
      const __m512i lo1 = _mm512_mullo_epi32(c2, m1);
      c0 = _mm512_ternarylogic_epi32(hi1, c1, key0[r], 0x96);  // 0x96: a ^ b ^ c
      c2 = _mm512_ternarylogic_epi32(hi0, c3, key1[r], 0x96);
      c1 = lo1;
      c3 = lo0;
    }
    // Transpose (c0, c1, c2, c3) x 16 lanes into counter-major order.
    const __m512i a = _mm512_unpacklo_epi32(c0, c1);
    const __m512i b = _mm512_unpackhi_epi32(c0, c1);
    const __m512i c = _mm512_unpacklo_epi32(c2, c3);
    const __m512i d = _mm512_unpackhi_epi32(c2, c3);
    const __m512i e0 = _mm512_unpacklo_epi64(a, c);  // 128-bit lane L: counter 4L
    const __m512i e1 = _mm512_unpackhi_epi64(a, c);  // counter 4L + 1
    const __m512i e2 = _mm512_unpacklo_epi64(b, d);  // counter 4L + 2
    const __m512i e3 = _mm512_unpackhi_epi64(b, d);  // counter 4L + 3
    const __m512i f0 = _mm512_shuffle_i32x4(e0, e1, _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i f1 = _mm512_shuffle_i32x4(e2, e3, _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i f2 = _mm512_shuffle_i32x4(e0, e1, _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i f3 = _mm512_shuffle_i32x4(e2, e3, _MM_SHUFFLE(3, 2, 3, 2));
    uint32_t* out = words + 4 * k;
    _mm512_storeu_si512(out, _mm512_shuffle_i32x4(f0, f1, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_si512(out + 16, _mm512_shuffle_i32x4(f0, f1, _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_si512(out + 32, _mm512_shuffle_i32x4(f2, f3, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_si512(out + 48, _mm512_shuffle_i32x4(f2, f3, _MM_SHUFFLE(3, 1, 3, 1)));
  }
}

// 8 counters k..k+7 per iteration, one per 32-bit lane.
__attribute__((target("avx2"))) inline void philox_words_avx2(uint32_t* __restrict words, uint64_t q0,
                                                               int64_t nq, uint64_t seed) {
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  __m256i key0[kPhiloxRounds];
  __m256i key1[kPhiloxRounds];
  for (int r = 0; r < kPhiloxRounds; ++r) {
    key0[r] = _mm256_set1_epi32(static_cast<int>(k0));
    key1[r] = _mm256_set1_epi32(static_cast<int>(k1));
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t k = 0; k < nq; k += 8) {
    const uint64_t base = q0 + static_cast<uint64_t>(k);
    __m256i c0;
    __m256i c1;
    if (static_cast<uint32_t>(base) <= 0xFFFFFFFFu - 7u) {
      c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base))), lanes);
      c1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(base >> 32)));
    } else {
      alignas(32) uint32_t lo[8];
      alignas(32) uint32_t hi[8];
      lane_counters<8>(lo, hi, base);
      c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
      c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
    }
    __m256i c2 = _mm256_setzero_si256();
    __m256i c3 = _mm256_setzero_si256();
    for (int r = 0; r < kPhiloxRounds; ++r) {
      const __m256i pe0 = _mm256_mul_epu32(c0, m0);
      const __m256i po0 = _mm256_mul_epu32(_mm256_srli_epi64(c0, 32), m0);
      const __m256i pe1 = _mm256_mul_epu32(c2, m1);
      const __m256i po1 = _mm256_mul_epu32(_mm256_srli_epi64(c2, 32), m1);
      const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(pe0, 32), po0, 0xAA);
      const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(pe1, 32), po1, 0xAA);
      const __m256i lo0 = _mm256_mullo_epi32(c0, m0);
      const __m256i lo1 = _mm256_mullo_epi32(c2, m1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), key0[r]);
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), key1[r]);
      c1 = lo1;
      c3 = lo0;
    }
    const __m256i a = _mm256_unpacklo_epi32(c0, c1);
    const __m256i b = _mm256_unpackhi_epi32(c0, c1);
    const __m256i c = _mm256_unpacklo_epi32(c2, c3);
    const __m256i d = _mm256_unpackhi_epi32(c2, c3);
    const __m256i e0 = _mm256_unpacklo_epi64(a, c);  // 128-bit lane L: counter 4L
    const __m256i e1 = _mm256_unpackhi_epi64(a, c);
    const __m256i e2 = _mm256_unpacklo_epi64(b, d);
    const __m256i e3 = _mm256_unpackhi_epi64(b, d);
    __m256i* out = reinterpret_cast<__m256i*>(words + 4 * k);
    _mm256_storeu_si256(out, _mm256_permute2x128_si256(e0, e1, 0x20));
    _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(e2, e3, 0x20));
    _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(e0, e1, 0x31));
    _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(e2, e3, 0x31));
  }
}

#pragma GCC diagnostic pop
#endif

// uniform = float32(x) * scale with x = int32(word), and x = ~x if x < 0.
RESTA_INLINE float uniform_from_word(uint32_t word) {
  const int32_t x = static_cast<int32_t>(word);
  const int32_t nonneg = x < 0 ? ~x : x;
  return static_cast<float>(nonneg) * kUniformScale;
}

}  // namespace resta
