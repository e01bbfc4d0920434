"""csrc/projection.cpp (kernels.cpp.diff_matmul): Sᵀ·m and S·m for S = fp32(A) − fp32(U), S formed
on the fly from the stored inputs, against fp64 products of the exactly formed S."""

import numpy as np
import pytest

from resta_fast.kernels import BackendUnavailable, cpp

try:
    cpp.check_available()
except BackendUnavailable:
    pytest.skip("the C++ kernel is not built", allow_module_level=True)

C = cpp._load()


def _bf16(x):
    return (np.asarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _widen(x):
    """fp32 of stored values (bf16 as uint16 bits), as the kernel reads them."""
    return (x.astype(np.uint32) << 16).view(np.float32) if x.dtype == np.uint16 else x.astype(np.float32)


def _stored(rng, n, dtype):
    x = rng.standard_normal(n) * 0.05
    return _bf16(x) if dtype == "bf16" else x.astype(np.float16 if dtype == "f16" else np.float32)


def _pair(rng, rows, cols, dtypes=("bf16", "bf16")):
    a = _stored(rng, rows * cols, dtypes[0])
    u = _stored(rng, rows * cols, dtypes[1])
    s = (_widen(a) - _widen(u)).reshape(rows, cols)  # fp32, one rounding each: the kernel's S
    return a, u, s.astype(np.float64)


def _rel(x, y):
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


# Tails everywhere: rows not a multiple of the 8-row group or of the 128-row fp32 block, columns not a
# multiple of the 256-column tile, ranks below, at and above one 16-lane group, a single row and column.
SHAPES = [(1, 1, 1), (7, 5, 3), (8, 256, 16), (129, 257, 4), (300, 700, 17), (1, 600, 33), (520, 3, 16)]


@pytest.mark.parametrize("rows, cols, r", SHAPES)
@pytest.mark.parametrize("dtypes", [("bf16", "bf16"), ("f16", "f32"), ("f32", "bf16")])
def test_both_products_and_the_sum_of_squares_match_fp64(rows, cols, r, dtypes):
    rng = np.random.default_rng(rows * 1000 + cols + r)
    a, u, s = _pair(rng, rows, cols, dtypes)
    m_t = rng.standard_normal((rows, r)).astype(np.float32)
    m_n = rng.standard_normal((cols, r)).astype(np.float32)
    got_t, sq_t = cpp.diff_matmul(a, u, rows, cols, m_t, transpose=True, sumsq=True)
    got_n, sq_n = cpp.diff_matmul(a, u, rows, cols, m_n, transpose=False, sumsq=True)
    assert got_t.shape == (cols, r) and got_n.shape == (rows, r) and got_t.dtype == np.float32
    assert _rel(got_t, s.T @ m_t) <= 1e-6 and _rel(got_n, s @ m_n) <= 1e-6
    assert abs(sq_t - (s * s).sum()) <= 1e-7 * (s * s).sum() and sq_n == sq_t
    assert cpp.diff_matmul(a, u, rows, cols, m_n, transpose=False)[1] == 0.0  # not asked for


def test_s_is_the_difference_kernels_values():
    """S·I is S itself (each sum is one product by 1 and zeros): the kernel's S equals the difference
    kernel's V = fp32(A) − fp32(U), not a wider or fused difference."""
    from resta_fast.kernels.difference import difference_kernel

    rng = np.random.default_rng(1)
    rows, cols = 37, 21
    a = _bf16(rng.standard_normal(rows * cols))
    u = _bf16(rng.standard_normal(rows * cols) * (1 + 2**-9))  # near-cancelling pairs: rounding shows
    got, _ = cpp.diff_matmul(a, u, rows, cols, np.eye(cols, dtype=np.float32), transpose=False)
    v = np.empty(rows * cols, np.float32)
    difference_kernel()[1].patch_arrays(v, None, a, u)
    assert np.array_equal(got.reshape(-1), v)


def test_every_thread_count_and_variant_gives_the_same_bits():
    rng = np.random.default_rng(2)
    rows, cols, r = 1100, 530, 16  # several 128-row blocks and 256-column tiles: work for 3 threads
    a, u, _ = _pair(rng, rows, cols)
    m_t, m_n = rng.standard_normal((rows, r)).astype(np.float32), rng.standard_normal((cols, r)).astype(np.float32)
    chosen = C.cpu_features()["isa"]
    results = []
    try:
        for isa in C.cpu_features()["isa_supported"]:
            C.set_isa(isa)
            for threads in (1, 2, 3):
                t, sq_t = cpp.diff_matmul(a, u, rows, cols, m_t, transpose=True, sumsq=True, threads=threads)
                n, sq_n = cpp.diff_matmul(a, u, rows, cols, m_n, transpose=False, sumsq=True, threads=threads)
                results.append((isa, threads, t.view(np.int32), n.view(np.int32), sq_t, sq_n))
    finally:
        C.set_isa(chosen)
    assert len(results) >= 3
    first = results[0]
    for res in results[1:]:
        assert np.array_equal(res[2], first[2]) and np.array_equal(res[3], first[3]), res[:2]
        assert res[4:] == first[4:], res[:2]


def test_inputs_at_any_two_byte_alignment():
    """safetensors mappings align tensors to 2 bytes only."""
    rng = np.random.default_rng(3)
    rows, cols, r = 40, 300, 5
    a, u, _ = _pair(rng, rows, cols)
    m = rng.standard_normal((rows, r)).astype(np.float32)
    want, sq = cpp.diff_matmul(a, u, rows, cols, m, transpose=True, sumsq=True)
    buf_a, buf_u = np.empty(a.size + 1, np.uint16), np.empty(u.size + 3, np.uint16)
    odd_a, odd_u = buf_a[1:], buf_u[3:]
    odd_a[:], odd_u[:] = a, u
    assert odd_a.ctypes.data % 4 == 2
    got, sq_odd = cpp.diff_matmul(odd_a, odd_u, rows, cols, m, transpose=True, sumsq=True)
    assert np.array_equal(got.view(np.int32), want.view(np.int32)) and sq_odd == sq


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda a, u, m: cpp.diff_matmul(a, u, 4, 8, m, transpose=False), "m must be 8 × r"),
        (lambda a, u, m: cpp.diff_matmul(a, u, 4, 8, m[:, :0], transpose=True), "m must be 4 × r with r >= 1"),
        (lambda a, u, m: cpp.diff_matmul(a, u[:-1], 4, 8, m, transpose=True), "u has 31 elements"),
        (lambda a, u, m: cpp.diff_matmul(a, u.astype(np.int32), 4, 8, m, transpose=True), "u has dtype int32"),
        (lambda a, u, m: cpp.diff_matmul(a, u, 4, 8, m, transpose=True, threads=-1), "threads must be None"),
    ],
)
def test_bad_arguments_are_named(call, message):
    a, u = np.zeros(32, np.uint16), np.zeros(32, np.uint16)
    with pytest.raises((ValueError, TypeError), match=message):
        call(a, u, np.ones((4, 2), np.float32))


def test_the_binding_checks_what_python_does_not():
    a = np.zeros(8, np.uint16)
    m, out = np.ones((4, 2), np.float32), np.empty((2, 2), np.float32)
    with pytest.raises(ValueError, match="'r' must be >= 1"):
        C.diff_matmul(a.ctypes.data, 0, a.ctypes.data, 0, 4, 2, m.ctypes.data, 0, out.ctypes.data, True, False)
    with pytest.raises(ValueError, match="'out_ptr' overlaps 'm_ptr'"):
        C.diff_matmul(a.ctypes.data, 0, a.ctypes.data, 0, 4, 2, m.ctypes.data, 2, m.ctypes.data, True, False)
    with pytest.raises(ValueError, match="'u_dtype' must be a dtype code"):
        C.diff_matmul(a.ctypes.data, 0, a.ctypes.data, 7, 4, 2, m.ctypes.data, 2, out.ctypes.data, True, False)


@pytest.mark.parametrize("backwards", [False, True])
def test_row_ranges_into_one_accumulator_give_the_bits_of_one_call(backwards):
    """Sᵀ·m over whole fp32 blocks of rows, one call per range, equals one call over all of S bit for bit."""
    rng = np.random.default_rng(4)
    rows, cols, r = 3 * cpp.projection_flush_rows() + 45, 270, 6
    a, u, s = _pair(rng, rows, cols)
    m = rng.standard_normal((rows, r)).astype(np.float32)
    whole, sq_whole = cpp.diff_matmul(a, u, rows, cols, m, transpose=True, sumsq=True, reverse=backwards)
    acc, sq = cpp.projection_acc(cols, r), 0.0
    edges = [0, cpp.projection_flush_rows(), 3 * cpp.projection_flush_rows(), rows]
    ranges = list(zip(edges[:-1], edges[1:], strict=True))
    for lo, hi in reversed(ranges) if backwards else ranges:
        got, part = cpp.diff_matmul(
            a[lo * cols : hi * cols], u[lo * cols : hi * cols], hi - lo, cols, m[lo:hi], transpose=True, sumsq=True,
            reverse=backwards, acc=acc,
        )  # fmt: skip
        assert got is None
        sq += part
    assert np.array_equal(cpp.projection_out(acc, r).view(np.int32), whole.view(np.int32))
    assert abs(sq - sq_whole) <= 1e-12 * sq_whole and _rel(whole, s.T @ m) <= 1e-6
    with pytest.raises(ValueError, match="acc must be projection_acc"):
        cpp.diff_matmul(a, u, rows, cols, m, transpose=True, acc=np.zeros((cols, r)))
    with pytest.raises(ValueError, match="acc needs transpose=True"):
        cpp.diff_matmul(a, u, rows, cols, m[:cols], transpose=False, acc=acc)


@pytest.mark.parametrize("transpose", [False, True])
def test_native_projection_in_chunks_is_one_pass_each_way_and_drops_every_row(monkeypatch, transpose):
    """B' read in chunks of rows equals B' read in one piece bit for bit, is within 1e-5 of fp64, and
    every row of the weights is handed to ``release``, the second pass last to first."""
    from resta_fast import safelora as SL
    from resta_fast.kernels.difference import difference_kernel

    kernel = difference_kernel()[1]
    rng = np.random.default_rng(6)
    rows, cols, r = 2 * cpp.projection_flush_rows() + 70, 90, 4  # stored shape; d_out = cols with transpose
    a, u, s = _pair(rng, rows, cols)
    b = rng.standard_normal((cols if transpose else rows, r)).astype(np.float32)
    whole = SL.native_projection(kernel, a, u, (rows, cols), transpose, b)
    monkeypatch.setattr(SL, "CHUNK_BYTES", 1)  # one fp32 block of rows per chunk
    calls = []
    got = SL.native_projection(kernel, a, u, (rows, cols), transpose, b, lambda lo, hi: calls.append((lo, hi)))
    assert np.array_equal(got.view(np.int32), whole.view(np.int32))
    v = s.T if transpose else s
    want = v @ (v.T @ b) / np.linalg.norm(v)
    assert _rel(got, want) <= 1e-5
    block = cpp.projection_flush_rows()
    forward = [(0, block), (block, 2 * block), (2 * block, rows)]
    assert calls == forward[:-1] + forward[::-1]  # the second pass starts on the chunk the first kept
    zero = SL.native_projection(kernel, a, a, (rows, cols), transpose, b)
    assert zero is None
