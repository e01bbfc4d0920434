// C++ interface of the fused RESTA kernel (patch.cpp) used by bindings.cpp.
// Arguments are assumed valid here; bindings.cpp checks them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace resta {

// Element type codes shared with resta_fast/kernels/cpp.py.
enum DType : int { kBF16 = 0, kF16 = 1, kF32 = 2 };

// Bytes per element of a valid dtype code.
inline int dtype_size(int dtype) { return dtype == kF32 ? 4 : 2; }

// One chunk of docs/spec.md §2. Pointers may have any alignment. u == nullptr means
// a holds the precomputed vector V; b == nullptr means no DARE.
struct PatchArgs {
  void* out = nullptr;
  int out_dtype = kF32;
  const void* f = nullptr;
  int f_dtype = kF32;
  const void* a = nullptr;
  int a_dtype = kF32;
  const void* u = nullptr;
  int u_dtype = kF32;
  const void* b = nullptr;
  int b_dtype = kF32;
  int64_t n = 0;
  float beta = 0.0f;
  float p = 0.0f;
  float r = 1.0f;  // fp32(1) / (fp32(1) - fp32(p)), computed by the caller
  uint64_t seed = 0;
  int64_t offset = 0;  // flat index of element 0 within the whole tensor
};

// threads <= 0 means the OpenMP default. Results never depend on threads.
// patch returns how many outputs are inf or NaN (for the run report).
int64_t patch(const PatchArgs& args, int threads);
void convert(void* out, int out_dtype, const void* x, int x_dtype, int64_t n, int threads);
void uniform(float* out, uint64_t seed, int64_t offset, int64_t n, int threads);

// Which instruction-set variant of the kernel runs, and which this CPU could run.
std::string isa();
std::vector<std::string> isa_supported();
std::vector<std::string> isa_compiled();
// Select a variant by name; returns false if it is not compiled in or not supported.
bool set_isa(const std::string& name);

// True when no variant contracts a * b + c into an FMA (docs/spec.md §2 forbids it).
bool fp_contract_off();

int64_t block_elems();
int64_t parallel_min_elems();
int openmp_max_threads();

}  // namespace resta
