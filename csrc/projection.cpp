// Safe LoRA's products Sᵀ·m and S·m over S = fp32(A) − fp32(U), straight from the stored inputs.
//
// B' = V·(Vᵀ·B)/‖V‖_F needs two passes over V. Forming V in fp32 and handing it to BLAS
// reads and writes 4 bytes per element more than reading the 2-byte inputs again, so each
// pass here recomputes S from A and U a few rows at a time, in L1, and multiplies it there;
// the first pass also sums S² (docs/benchmarks.md, Safe LoRA).
//
// The rank dimension is the vector one: r is padded to lane groups of 16 fp32 (a zmm on
// x86-64-v4, two ymm on v3, four xmm on the baseline), so every element of S is one
// broadcast multiply and one add per lane group. Multiply and add stay separate (built
// with -ffp-contract=off; AMD cores run them on different pipes, so FMA would not be
// faster there), which makes every variant give the same bits; and each output's sum
// runs in one fixed order (rows, or columns, in fixed blocks), which makes every thread
// count give the same bits too. Accuracy against fp64: fp32 sums over at most
// kFlushRows rows or kTile columns, then fp64 across them; Σ S² in fp32 lanes over one
// row's tile (16 squares a lane), then fp64.

#include "projection.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "dtype.h"
#include "patch.h"

namespace resta {
namespace {

constexpr int kLanes = 16;  // fp32 per lane group
constexpr int kGroup = 8;  // rows of S decoded and multiplied together (8 accumulators; the tree below has 8 leaves)
// Columns per tile: 8 rows' differences (8 KiB) plus the Sᵀ·m tile's fp32 sums (16 KiB at r = 16)
// stay in a 32 KiB L1d.
constexpr int64_t kTile = 256;
constexpr int64_t kFlushRows = 128;  // Sᵀ·m: fp32 sums over this many rows, then fp64 (a multiple of kGroup)
constexpr int64_t kParallelMinElems = 1 << 16;  // below this one thread: waking a team costs more

typedef float f32x16 __attribute__((vector_size(64)));
typedef double f64x16 __attribute__((vector_size(128)));

RESTA_INLINE f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

RESTA_INLINE void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

RESTA_INLINE void widen(float* __restrict dst, const unsigned char* src, int dtype, int64_t len) {
  switch (dtype) {
    case kBF16:
      for (int64_t j = 0; j < len; ++j) {
        uint16_t h;
        std::memcpy(&h, src + 2 * j, 2);
        dst[j] = bits_f32(static_cast<uint32_t>(h) << 16);
      }
      break;
    case kF16:
      for (int64_t j = 0; j < len; ++j) {
        uint16_t h;
        std::memcpy(&h, src + 2 * j, 2);
        dst[j] = half_to_float(h);
      }
      break;
    default:
      std::memcpy(dst, src, 4 * len);
      break;
  }
}

// Rows [i0, i0 + n) (n <= kGroup), columns [c0, c0 + len) of S into d; the rest of d is +0,
// which adds nothing to a sum that starts at +0. Returns the group's Σ S² when asked.
struct Staging {
  alignas(64) float d[kGroup][kTile];
  alignas(64) float va[kTile];
  alignas(64) float vu[kTile];

  RESTA_INLINE double load(const DiffMatrix& s, int64_t i0, int64_t n, int64_t c0, int64_t len, bool sumsq) {
    const int sa = dtype_size(s.a_dtype), su = dtype_size(s.u_dtype);
    f64x16 sq = {};
    for (int k = 0; k < kGroup; ++k) {
      float* row = d[k];
      if (k < n) {
        const int64_t at = (i0 + k) * s.cols + c0;
        const unsigned char* pa = static_cast<const unsigned char*>(s.a) + sa * at;
        const unsigned char* pu = static_cast<const unsigned char*>(s.u) + su * at;
        if (s.a_dtype == kBF16 && s.u_dtype == kBF16) {  // the usual pair, in one loop
          for (int64_t j = 0; j < len; ++j) {
            uint16_t ha, hu;
            std::memcpy(&ha, pa + 2 * j, 2);
            std::memcpy(&hu, pu + 2 * j, 2);
            row[j] = bits_f32(static_cast<uint32_t>(ha) << 16) - bits_f32(static_cast<uint32_t>(hu) << 16);
          }
        } else {
          widen(va, pa, s.a_dtype, len);
          widen(vu, pu, s.u_dtype, len);
          for (int64_t j = 0; j < len; ++j) row[j] = va[j] - vu[j];
        }
        for (int64_t j = len; j < kTile; ++j) row[j] = 0.0f;
      } else {
        std::memset(row, 0, sizeof d[k]);
      }
      if (sumsq) {  // fp32 lanes over one row's tile (16 squares each), fp64 across rows
        f32x16 row_sq = {};
        for (int64_t j = 0; j < kTile; j += kLanes) {
          const f32x16 x = load16(row + j);
          row_sq += x * x;
        }
        sq += __builtin_convertvector(row_sq, f64x16);
      }
    }
    double total = 0.0;
    if (sumsq)
      for (int l = 0; l < kLanes; ++l) total += static_cast<double>(sq[l]);
    return total;
  }
};

// Sᵀ·m, rows [b0, b1) (one fp32 block) of column tiles [t_lo, t_hi): acc64 (cols × rp) gets the
// block's sums, part[t] each tile's Σ S².
RESTA_INLINE void t_matmul_block(const DiffMatrix& s, const float* m, int64_t rp, double* acc64, double* part,
                                 int64_t b0, int64_t t_lo, int64_t t_hi, bool sumsq) {
  Staging st;
  std::vector<float> acc(static_cast<size_t>(kTile * rp));
  const int64_t groups = rp / kLanes, b1 = std::min(s.rows, b0 + kFlushRows);
  for (int64_t t = t_lo; t < t_hi; ++t) {
    const int64_t c0 = t * kTile, len = std::min(kTile, s.cols - c0);
    double sq = 0.0;
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t i0 = b0; i0 < b1; i0 += kGroup) {
      const int64_t n = std::min<int64_t>(kGroup, b1 - i0);
      sq += st.load(s, i0, n, c0, len, sumsq);
      for (int64_t g = 0; g < groups; ++g) {
        f32x16 mk[kGroup];
        for (int k = 0; k < kGroup; ++k) mk[k] = k < n ? load16(m + (i0 + k) * rp + g * kLanes) : f32x16{};
        float* y = acc.data() + g * kLanes;
        for (int64_t j = 0; j < len; ++j) {
          // A tree over the group's rows, then one add into the running sum: a chain of
          // 8 dependent adds per column held this loop at its latency (3 cycles each).
          const f32x16 p01 = st.d[0][j] * mk[0] + st.d[1][j] * mk[1];
          const f32x16 p23 = st.d[2][j] * mk[2] + st.d[3][j] * mk[3];
          const f32x16 p45 = st.d[4][j] * mk[4] + st.d[5][j] * mk[5];
          const f32x16 p67 = st.d[6][j] * mk[6] + st.d[7][j] * mk[7];
          store16(y + j * rp, load16(y + j * rp) + ((p01 + p23) + (p45 + p67)));
        }
      }
    }
    for (int64_t j = 0; j < len; ++j)
      for (int64_t l = 0; l < rp; ++l) acc64[(c0 + j) * rp + l] += static_cast<double>(acc[j * rp + l]);
    part[t] = sq;
  }
}

// S·m over row groups [g_lo, g_hi), descending with reverse: out64 (rows × rp) gets the sums,
// part[g] group g's Σ S².
RESTA_INLINE void matmul_groups(const DiffMatrix& s, const float* m, int64_t rp, double* out64, double* part,
                                int64_t g_lo, int64_t g_hi, bool sumsq, bool reverse) {
  Staging st;
  const int64_t groups = rp / kLanes;
  for (int64_t k = g_lo; k < g_hi; ++k) {
    const int64_t rg = reverse ? g_hi - 1 - (k - g_lo) : k;
    const int64_t i0 = rg * kGroup, n = std::min<int64_t>(kGroup, s.rows - i0);
    double sq = 0.0;
    for (int64_t c0 = 0; c0 < s.cols; c0 += kTile) {
      const int64_t len = std::min(kTile, s.cols - c0);
      sq += st.load(s, i0, n, c0, len, sumsq);
      for (int64_t g = 0; g < groups; ++g) {
        f32x16 acc[kGroup];
        for (int k = 0; k < kGroup; ++k) acc[k] = f32x16{};
        const float* col = m + c0 * rp + g * kLanes;
        for (int64_t j = 0; j < len; ++j) {
          const f32x16 x = load16(col + j * rp);
          for (int k = 0; k < kGroup; ++k) acc[k] += st.d[k][j] * x;
        }
        for (int k = 0; k < n; ++k)
          for (int l = 0; l < kLanes; ++l) out64[(i0 + k) * rp + g * kLanes + l] += static_cast<double>(acc[k][l]);
      }
    }
    part[rg] = sq;
  }
}

// One variant's pair of range functions, chosen at each call.
using TMatmulFn = void (*)(const DiffMatrix&, const float*, int64_t, double*, double*, int64_t, int64_t, int64_t,
                           bool);
using MatmulFn = void (*)(const DiffMatrix&, const float*, int64_t, double*, double*, int64_t, int64_t, bool, bool);

#define RESTA_PROJECTION_VARIANT(suffix, target_attr)                                                         \
  target_attr void t_matmul_##suffix(const DiffMatrix& s, const float* m, int64_t rp, double* acc, double* part, \
                                     int64_t b0, int64_t lo, int64_t hi, bool sumsq) {                        \
    IeeeEnvironment ieee;                                                                                     \
    t_matmul_block(s, m, rp, acc, part, b0, lo, hi, sumsq);                                                   \
  }                                                                                                           \
  target_attr void matmul_##suffix(const DiffMatrix& s, const float* m, int64_t rp, double* acc, double* part,   \
                                   int64_t lo, int64_t hi, bool sumsq, bool reverse) {                        \
    IeeeEnvironment ieee;                                                                                     \
    matmul_groups(s, m, rp, acc, part, lo, hi, sumsq, reverse);                                               \
  }

#if defined(__x86_64__) && defined(__GNUC__)
RESTA_PROJECTION_VARIANT(v4, __attribute__((target("arch=x86-64-v4"))))
RESTA_PROJECTION_VARIANT(v3, __attribute__((target("arch=x86-64-v3"))))
#endif
RESTA_PROJECTION_VARIANT(base, )
#undef RESTA_PROJECTION_VARIANT

// The variant patch.cpp chose (or set_isa / RESTA_FAST_ISA forced), so one switch covers both kernels.
void pick(TMatmulFn& t_matmul, MatmulFn& matmul) {
  const std::string name = isa();
#if defined(__x86_64__) && defined(__GNUC__)
  if (name == "x86-64-v4") {
    t_matmul = t_matmul_v4, matmul = matmul_v4;
    return;
  }
  if (name == "x86-64-v3") {
    t_matmul = t_matmul_v3, matmul = matmul_v3;
    return;
  }
#endif
  t_matmul = t_matmul_base, matmul = matmul_base;
}

int64_t team_size(const DiffMatrix& s, int64_t items, int threads) {
  int64_t team = threads > 0 ? threads : omp_get_max_threads();
  if (s.rows * s.cols < kParallelMinElems) team = 1;
  return std::max<int64_t>(1, std::min(team, items));
}

double ordered_sum(const std::vector<double>& part) {
  double total = 0.0;
  for (double x : part) total += x;  // fixed order: the same total at any thread count
  return total;
}

int64_t padded(int64_t r) { return (r + kLanes - 1) / kLanes * kLanes; }

// m (n × r) in rows of rp lanes, the padding +0.
std::vector<float> pad_rows(const float* m, int64_t n, int64_t r, int64_t rp) {
  std::vector<float> out(static_cast<size_t>(n * rp), 0.0f);
  for (int64_t i = 0; i < n; ++i) std::memcpy(out.data() + i * rp, m + i * r, sizeof(float) * r);
  return out;
}

void unpad_rows(float* out, const double* acc, int64_t n, int64_t r, int64_t rp) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t l = 0; l < r; ++l) out[i * r + l] = static_cast<float>(acc[i * rp + l]);
}

}  // namespace

int64_t padded_rank(int64_t r) { return padded(r); }
int64_t flush_rows() { return kFlushRows; }

double diff_t_matmul(const DiffMatrix& s, const float* m, int64_t r, float* out, bool want_sumsq, bool reverse,
                     int threads, double* into) {
  TMatmulFn t_matmul;
  MatmulFn matmul;
  pick(t_matmul, matmul);
  const int64_t rp = padded(r);
  const std::vector<float> mp = pad_rows(m, s.rows, r, rp);
  std::vector<double> own(into == nullptr ? static_cast<size_t>(s.cols * rp) : 0, 0.0);
  double* acc = into == nullptr ? own.data() : into;
  const int64_t tiles = (s.cols + kTile - 1) / kTile, blocks = (s.rows + kFlushRows - 1) / kFlushRows;
  std::vector<double> part(static_cast<size_t>(tiles * blocks), 0.0);
  const int64_t team = team_size(s, tiles, threads);
  // Each thread owns a range of tiles and walks the row blocks in order over it (each column's
  // fp32 block sums enter its fp64 sum in block order): no barrier between blocks, which on a
  // shared machine waited for a descheduled thread at every block.
#pragma omp parallel num_threads(static_cast<int>(team)) if (team > 1)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t lo = tiles * t / nt, hi = tiles * (t + 1) / nt;
    for (int64_t k = 0; k < blocks && lo < hi; ++k) {
      const int64_t b = reverse ? blocks - 1 - k : k;
      t_matmul(s, mp.data(), rp, acc, part.data() + b * tiles, b * kFlushRows, lo, hi, want_sumsq);
    }
  }
  if (into == nullptr) unpad_rows(out, acc, s.cols, r, rp);
  return ordered_sum(part);
}

double diff_matmul(const DiffMatrix& s, const float* m, int64_t r, float* out, bool want_sumsq, bool reverse,
                   int threads) {
  TMatmulFn t_matmul;
  MatmulFn matmul;
  pick(t_matmul, matmul);
  const int64_t rp = padded(r);
  const std::vector<float> mp = pad_rows(m, s.cols, r, rp);
  std::vector<double> acc(static_cast<size_t>(s.rows * rp), 0.0);
  const int64_t items = (s.rows + kGroup - 1) / kGroup;
  std::vector<double> part(static_cast<size_t>(items), 0.0);
  const int64_t team = team_size(s, items, threads);
  if (team == 1) {
    matmul(s, mp.data(), rp, acc.data(), part.data(), 0, items, want_sumsq, reverse);
  } else {
    // Dynamic: on a shared machine a static half waits for a descheduled thread.
    const int64_t step = std::max<int64_t>(1, items / (8 * team)), chunks = (items + step - 1) / step;
#pragma omp parallel for num_threads(static_cast<int>(team)) schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k = reverse ? chunks - 1 - c : c;
      matmul(s, mp.data(), rp, acc.data(), part.data(), k * step, std::min(items, (k + 1) * step), want_sumsq,
             reverse);
    }
  }
  unpad_rows(out, acc.data(), s.rows, r, rp);
  return ordered_sum(part);
}

}  // namespace resta
