// Safe LoRA's two rank-r products over S = fp32(A) − fp32(U), formed on the fly from the
// stored inputs (projection.cpp), used by bindings.cpp. Arguments are assumed valid here;
// bindings.cpp checks them.
#pragma once

#include <cstdint>

namespace resta {

// S: a rows × cols row-major matrix whose elements are fp32(a) − fp32(u), one rounded fp32
// subtraction each (the difference kernel's bits: docs/spec.md §2 with β = 1). a and u are
// bf16/fp16/fp32 in any mix, at any alignment (safetensors mappings).
struct DiffMatrix {
  const void* a = nullptr;
  int a_dtype = 2;
  const void* u = nullptr;
  int u_dtype = 2;
  int64_t rows = 0;
  int64_t cols = 0;
};

// out (cols × r) = Sᵀ·m for m (rows × r); returns Σ S² (fp64) when want_sumsq, else 0.
// fp32 products, summed in fp32 over blocks of rows and in fp64 across them.
// reverse walks the rows last to first: a second pass then starts on what the first pass left
// in cache. threads <= 0 means the OpenMP default. Results never depend on threads or on the
// variant (reverse changes the order of the sums over rows, so it may change bits).
// With acc (cols × padded_rank(r) fp64, row-major) the sums are added into acc and out is not
// written: S split into row ranges of whole kFlushRows blocks, one call each, gives the bits of
// one call over the whole of S.
double diff_t_matmul(const DiffMatrix& s, const float* m, int64_t r, float* out, bool want_sumsq, bool reverse,
                     int threads, double* acc = nullptr);

// r rounded up to whole 16-lane groups; rows of S per fp32 block of diff_t_matmul.
int64_t padded_rank(int64_t r);
int64_t flush_rows();

// out (rows × r) = S·m for m (cols × r); the same sums, over tiles of columns (reverse only
// changes the order rows are visited in).
double diff_matmul(const DiffMatrix& s, const float* m, int64_t r, float* out, bool want_sumsq, bool reverse,
                   int threads);

}  // namespace resta
