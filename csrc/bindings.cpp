// pybind11 module resta_fast._C: the fused kernel over raw addresses.
//
// Buffers are passed as integer addresses (tensor.data_ptr()) with a dtype
// code, so the module needs no libtorch and one build serves any torch.
// Every argument is checked here, with the GIL held; the kernels then run
// with the GIL released.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <sstream>
#include <string>

#include "patch.h"
#include "philox.h"
#include "projection.h"

namespace py = pybind11;

namespace {

[[noreturn]] void fail(const char* fn, const std::string& message) {
  throw py::value_error(std::string("resta_fast._C.") + fn + ": " + message);
}

std::string join_isas(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& name : names) out += (out.empty() ? "" : ", ") + name;
  return out;
}

void check_dtype(const char* fn, const char* arg, int code) {
  if (code != resta::kBF16 && code != resta::kF16 && code != resta::kF32) {
    std::ostringstream msg;
    msg << "argument '" << arg << "' must be a dtype code " << resta::kBF16 << " (bf16), "
        << resta::kF16 << " (fp16) or " << resta::kF32 << " (fp32); got " << code;
    fail(fn, msg.str());
  }
}

void check_n(const char* fn, int64_t n) {
  if (n < 0) fail(fn, "argument 'n' must be >= 0; got " + std::to_string(n));
}

void check_required(const char* fn, const char* arg, uint64_t ptr, int64_t n) {
  if (ptr == 0 && n > 0)
    fail(fn, std::string("argument '") + arg + "' must be a buffer address, got 0 (null) with n=" +
                 std::to_string(n));
}

int threads_arg(const char* fn, std::optional<int> threads) {
  if (!threads.has_value()) return 0;
  if (*threads < 0) fail(fn, "argument 'threads' must be >= 0 or None; got " + std::to_string(*threads));
  return *threads;
}

struct Buffer {
  const char* name;
  uint64_t ptr;
  int dtype;
};

// The output may be an input exactly (same address and element size: each
// block reads its inputs before writing), but must not partially overlap one.
void check_overlap(const char* fn, const Buffer& out, const Buffer& in, int64_t n) {
  if (in.ptr == 0 || n == 0) return;
  const uint64_t out_end = out.ptr + static_cast<uint64_t>(n) * resta::dtype_size(out.dtype);
  const uint64_t in_end = in.ptr + static_cast<uint64_t>(n) * resta::dtype_size(in.dtype);
  const bool overlap = out.ptr < in_end && in.ptr < out_end;
  const bool same = out.ptr == in.ptr && resta::dtype_size(out.dtype) == resta::dtype_size(in.dtype);
  if (overlap && !same) {
    std::ostringstream msg;
    msg << "argument '" << out.name << "' [0x" << std::hex << out.ptr << ", 0x" << out_end
        << ") partially overlaps '" << in.name << "' [0x" << in.ptr << ", 0x" << in_end
        << "); expected disjoint buffers or the very same buffer with the same element size";
    fail(fn, msg.str());
  }
}

void check_offset(const char* fn, int64_t offset, int64_t n) {
  if (offset < 0) fail(fn, "argument 'offset' must be >= 0; got " + std::to_string(offset));
  if (offset > INT64_MAX - n)
    fail(fn, "offset + n must fit in int64; got offset=" + std::to_string(offset) +
                 ", n=" + std::to_string(n));
}

std::string fp32_repr(float x) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.9g", static_cast<double>(x));
  return buf;
}

int64_t patch(uint64_t out_ptr, int out_dtype, uint64_t f_ptr, int f_dtype, uint64_t a_ptr, int a_dtype,
           uint64_t u_ptr, int u_dtype, uint64_t b_ptr, int b_dtype, int64_t n, double beta, double p,
           double r, uint64_t seed, int64_t offset, std::optional<int> threads) {
  const char* fn = "patch";
  check_n(fn, n);
  check_required(fn, "out_ptr", out_ptr, n);
  check_required(fn, "f_ptr", f_ptr, n);
  check_required(fn, "a_ptr", a_ptr, n);
  check_dtype(fn, "out_dtype", out_dtype);
  check_dtype(fn, "f_dtype", f_dtype);
  check_dtype(fn, "a_dtype", a_dtype);
  if (u_ptr != 0) check_dtype(fn, "u_dtype", u_dtype);
  if (b_ptr != 0) check_dtype(fn, "b_dtype", b_dtype);
  const float p32 = static_cast<float>(p);
  if (!(p32 >= 0.0f && p32 < 1.0f))
    fail(fn, "argument 'p' must be in [0, 1) as fp32; got " + fp32_repr(p32) + " (from " +
                 std::to_string(p) + ")");
  const float r32 = static_cast<float>(r);
  const float want_r = 1.0f / (1.0f - p32);
  if (std::memcmp(&r32, &want_r, sizeof r32) != 0)
    fail(fn, "argument 'r' must be fp32(1)/(fp32(1)-fp32(p)) = " + fp32_repr(want_r) + " for p=" +
                 fp32_repr(p32) + "; got " + fp32_repr(r32));
  check_offset(fn, offset, n);
  const int nthreads = threads_arg(fn, threads);
  const Buffer out{"out_ptr", out_ptr, out_dtype};
  check_overlap(fn, out, {"f_ptr", f_ptr, f_dtype}, n);
  check_overlap(fn, out, {"a_ptr", a_ptr, a_dtype}, n);
  if (u_ptr != 0) check_overlap(fn, out, {"u_ptr", u_ptr, u_dtype}, n);
  if (b_ptr != 0) check_overlap(fn, out, {"b_ptr", b_ptr, b_dtype}, n);

  resta::PatchArgs args;
  args.out = reinterpret_cast<void*>(out_ptr);
  args.out_dtype = out_dtype;
  args.f = reinterpret_cast<const void*>(f_ptr);
  args.f_dtype = f_dtype;
  args.a = reinterpret_cast<const void*>(a_ptr);
  args.a_dtype = a_dtype;
  args.u = reinterpret_cast<const void*>(u_ptr);
  args.u_dtype = u_dtype;
  args.b = reinterpret_cast<const void*>(b_ptr);
  args.b_dtype = b_dtype;
  args.n = n;
  args.beta = static_cast<float>(beta);
  args.p = p32;
  args.r = r32;
  args.seed = seed;
  args.offset = offset;
  py::gil_scoped_release release;
  return resta::patch(args, nthreads);
}

void convert(uint64_t out_ptr, int out_dtype, uint64_t x_ptr, int x_dtype, int64_t n,
             std::optional<int> threads) {
  const char* fn = "convert";
  check_n(fn, n);
  check_required(fn, "out_ptr", out_ptr, n);
  check_required(fn, "x_ptr", x_ptr, n);
  check_dtype(fn, "out_dtype", out_dtype);
  check_dtype(fn, "x_dtype", x_dtype);
  const int nthreads = threads_arg(fn, threads);
  check_overlap(fn, {"out_ptr", out_ptr, out_dtype}, {"x_ptr", x_ptr, x_dtype}, n);
  py::gil_scoped_release release;
  resta::convert(reinterpret_cast<void*>(out_ptr), out_dtype, reinterpret_cast<const void*>(x_ptr),
                 x_dtype, n, nthreads);
}

py::array_t<float> uniform(uint64_t seed, int64_t offset, int64_t n, std::optional<int> threads) {
  const char* fn = "uniform";
  check_n(fn, n);
  check_offset(fn, offset, n);
  const int nthreads = threads_arg(fn, threads);
  py::array_t<float> out(static_cast<py::ssize_t>(n));
  float* data = out.mutable_data();
  {
    py::gil_scoped_release release;
    resta::uniform(data, seed, offset, n, nthreads);
  }
  return out;
}

double diff_matmul(uint64_t a_ptr, int a_dtype, uint64_t u_ptr, int u_dtype, int64_t rows, int64_t cols,
                   uint64_t m_ptr, int64_t r, uint64_t out_ptr, bool transpose, bool want_sumsq, bool reverse,
                   uint64_t acc_ptr, std::optional<int> threads) {
  const char* fn = "diff_matmul";
  if (rows < 0 || cols < 0)
    fail(fn, "arguments 'rows' and 'cols' must be >= 0; got " + std::to_string(rows) + " and " +
                 std::to_string(cols));
  if (r < 1) fail(fn, "argument 'r' must be >= 1; got " + std::to_string(r));
  if (cols > 0 && rows > INT64_MAX / 4 / cols)
    fail(fn, "rows * cols must fit in int64 bytes; got " + std::to_string(rows) + " x " + std::to_string(cols));
  const int64_t n = rows * cols;
  check_required(fn, "a_ptr", a_ptr, n);
  check_required(fn, "u_ptr", u_ptr, n);
  check_dtype(fn, "a_dtype", a_dtype);
  check_dtype(fn, "u_dtype", u_dtype);
  const int64_t m_rows = transpose ? rows : cols, out_rows = transpose ? cols : rows;
  check_required(fn, "m_ptr", m_ptr, m_rows * r);
  if (acc_ptr != 0 && !transpose) fail(fn, "argument 'acc_ptr' needs transpose=True (S^T.m sums over rows)");
  if (acc_ptr == 0) check_required(fn, "out_ptr", out_ptr, out_rows * r);
  const Buffer out{"out_ptr", out_ptr, resta::kF32};
  // out and m are fp32 arrays of different lengths: out must not overlap m at all.
  const uint64_t out_end = out_ptr + 4 * static_cast<uint64_t>(out_rows * r);
  const uint64_t m_end = m_ptr + 4 * static_cast<uint64_t>(m_rows * r);
  if (out_rows * r > 0 && m_rows * r > 0 && out_ptr < m_end && m_ptr < out_end)
    fail(fn, "argument 'out_ptr' overlaps 'm_ptr'; expected disjoint buffers");
  check_overlap(fn, out, {"a_ptr", a_ptr, a_dtype}, std::min<int64_t>(n, out_rows * r));
  const int nthreads = threads_arg(fn, threads);
  resta::DiffMatrix s;
  s.a = reinterpret_cast<const void*>(a_ptr);
  s.a_dtype = a_dtype;
  s.u = reinterpret_cast<const void*>(u_ptr);
  s.u_dtype = u_dtype;
  s.rows = rows;
  s.cols = cols;
  const float* m = reinterpret_cast<const float*>(m_ptr);
  float* o = reinterpret_cast<float*>(out_ptr);
  py::gil_scoped_release release;
  return transpose ? resta::diff_t_matmul(s, m, r, o, want_sumsq, reverse, nthreads, reinterpret_cast<double*>(acc_ptr))
                   : resta::diff_matmul(s, m, r, o, want_sumsq, reverse, nthreads);
}

py::tuple philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  resta::philox4x32_10(c0, c1, c2, c3, k0, k1);
  return py::make_tuple(c0, c1, c2, c3);
}

void set_isa(const std::string& name) {
  if (!resta::set_isa(name))
    fail("set_isa", "argument 'name' must be one of the variants this CPU supports (" +
                        join_isas(resta::isa_supported()) + "); got '" + name + "' (compiled: " +
                        join_isas(resta::isa_compiled()) + ")");
}

py::dict cpu_features() {
  py::dict info;
  info["isa"] = resta::isa();
  info["isa_supported"] = resta::isa_supported();
  info["isa_compiled"] = resta::isa_compiled();
  info["openmp_max_threads"] = resta::openmp_max_threads();
#ifdef _OPENMP
  info["openmp"] = _OPENMP;
#endif
  info["block_elems"] = resta::block_elems();
  info["parallel_min_elems"] = resta::parallel_min_elems();
  info["fp_contract_off"] = resta::fp_contract_off();
#ifdef __OPTIMIZE__
  info["optimized"] = true;
#else
  info["optimized"] = false;
#endif
#ifdef __VERSION__
  info["compiler"] = "gcc " __VERSION__;
#endif
  py::dict flags;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  flags["avx2"] = static_cast<bool>(__builtin_cpu_supports("avx2"));
  flags["fma"] = static_cast<bool>(__builtin_cpu_supports("fma"));
  flags["f16c"] = static_cast<bool>(__builtin_cpu_supports("f16c"));
  flags["avx512f"] = static_cast<bool>(__builtin_cpu_supports("avx512f"));
  flags["avx512bw"] = static_cast<bool>(__builtin_cpu_supports("avx512bw"));
#endif
  info["cpu_flags"] = flags;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "resta_fast native kernel: fused RESTA patch (docs/spec.md §2-3) over raw buffers";
  m.attr("DTYPE_BF16") = static_cast<int>(resta::kBF16);
  m.attr("DTYPE_F16") = static_cast<int>(resta::kF16);
  m.attr("DTYPE_F32") = static_cast<int>(resta::kF32);

  // RESTA_FAST_ISA forces a kernel variant (e.g. "default" to rule out a
  // miscompiled vector path); an unusable value fails the import loudly.
  if (const char* forced = std::getenv("RESTA_FAST_ISA"); forced != nullptr && *forced != '\0') {
    if (!resta::set_isa(forced))
      throw py::import_error("RESTA_FAST_ISA='" + std::string(forced) +
                             "' is not a kernel variant this CPU supports; expected one of: " +
                             join_isas(resta::isa_supported()));
  }

  m.def("patch", &patch, py::arg("out_ptr"), py::arg("out_dtype"), py::arg("f_ptr"), py::arg("f_dtype"),
        py::arg("a_ptr"), py::arg("a_dtype"), py::arg("u_ptr"), py::arg("u_dtype"), py::arg("b_ptr"),
        py::arg("b_dtype"), py::arg("n"), py::arg("beta"), py::arg("p"), py::arg("r"), py::arg("seed"),
        py::arg("offset"), py::arg("threads") = py::none(),
        "out[i] = round(F + beta*(A - U)) (u_ptr=0: A is V), or the DARE form when b_ptr != 0 "
        "(docs/spec.md §2); returns the number of non-finite outputs. Pointers are integer addresses of n elements, any alignment; dtype codes "
        "DTYPE_BF16/DTYPE_F16/DTYPE_F32; r = fp32(1)/(fp32(1)-fp32(p)); seed is the per-tensor "
        "seed; offset is the flat index of element 0 in the whole tensor; threads None/0 = "
        "OpenMP default.");
  m.def("convert", &convert, py::arg("out_ptr"), py::arg("out_dtype"), py::arg("x_ptr"),
        py::arg("x_dtype"), py::arg("n"), py::arg("threads") = py::none(),
        "Convert n elements between dtypes with the docs/spec.md §2 rounding (equal dtypes: bit copy).");
  m.def("uniform", &uniform, py::arg("seed"), py::arg("offset"), py::arg("n"),
        py::arg("threads") = py::none(),
        "The DARE uniforms (float32 numpy array) of elements offset .. offset+n-1 (docs/spec.md §3).");
  m.def("diff_matmul", &diff_matmul, py::arg("a_ptr"), py::arg("a_dtype"), py::arg("u_ptr"), py::arg("u_dtype"),
        py::arg("rows"), py::arg("cols"), py::arg("m_ptr"), py::arg("r"), py::arg("out_ptr"),
        py::arg("transpose"), py::arg("want_sumsq"), py::arg("reverse") = false, py::arg("acc_ptr") = 0,
        py::arg("threads") = py::none(),
        "S = fp32(A) - fp32(U) (rows x cols, formed on the fly): out = S^T.m (transpose; m rows x r, out "
        "cols x r) or S.m (m cols x r, out rows x r), fp32 row-major; returns sum(S^2) in fp64 when "
        "want_sumsq, else 0. reverse visits the rows last to first (a second pass, on what the first left in cache). "
        "acc_ptr (transpose only): add the sums into this fp64 cols x projection_rank(r) array instead of writing out.");
  m.def("projection_rank", &resta::padded_rank, py::arg("r"), "r rounded up to diff_matmul's 16-lane groups.");
  m.attr("PROJECTION_FLUSH_ROWS") = resta::flush_rows();
  m.def("philox4x32", &philox4x32, py::arg("c0"), py::arg("c1"), py::arg("c2"), py::arg("c3"),
        py::arg("k0"), py::arg("k1"), "Raw Philox4x32-10 of one counter and key (for known-answer tests).");
  m.def("set_isa", &set_isa, py::arg("name"),
        "Force a kernel variant ('x86-64-v4', 'x86-64-v3', 'default'); for tests and diagnosis.");
  m.def("cpu_features", &cpu_features,
        "Build and CPU facts for `resta_fast env`: chosen variant, supported variants, OpenMP.");
}
