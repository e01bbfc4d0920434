"""CPU kernel backends (torch reference, native cpp) against each other and the
element-by-element oracle (tests/elementwise.py): bit for bit, NaN as NaN-ness.

The oracle is slow pure Python, so it checks sizes up to 1023; larger sizes
compare cpp with the torch reference. The cpp tests skip, with the load error,
when the extension is not built.
"""

import functools
import itertools

import elementwise
import numpy as np
import pytest
import torch

from resta_fast import rng
from resta_fast.kernels import BackendUnavailable, load_backend
from resta_fast.kernels import reference as ref

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
DTYPES = (BF16, F16, F32)
NAME = {BF16: "bf16", F16: "f16", F32: "f32"}
BITS = {BF16: torch.int16, F16: torch.int16, F32: torch.int32}
# Poison fills: two NaNs in every dtype and a finite value, so an element the
# kernel never writes fails whatever the expected value is.
POISONS = (0x7FBF, 0xFFFF, 0x5A5A)

# Raw bit patterns that stress decode, arithmetic and rounding: ±0, ±inf,
# quiet and signalling NaNs, smallest/largest subnormals, extremes, and fp32
# values on fp16/bf16 rounding ties and overflow edges.
SPECIALS = {
    BF16: [
        0x0000,
        0x8000,
        0x7F80,
        0xFF80,
        0x7FC0,
        0x7F81,
        0xFFC1,
        0x0001,
        0x807F,
        0x7F7F,
        0xFF7F,
        0x0080,
        0x3F80,
        0x3F81,
    ],
    F16: [
        0x0000,
        0x8000,
        0x7C00,
        0xFC00,
        0x7E00,
        0x7C01,
        0xFE01,
        0x0001,
        0x83FF,
        0x7BFF,
        0xFBFF,
        0x0400,
        0x03FF,
        0x3C00,
    ],
    F32: [
        0x00000000,
        0x80000000,
        0x7F800000,
        0xFF800000,
        0x7FC00000,
        0x7F800001,
        0xFFC00001,
        0x00000001,
        0x807FFFFF,
        0x7F7FFFFF,
        0x00800000,
        0x477FF000,
        0x477FEFFF,
        0xC77FF000,
        0x33000000,
        0x33000001,
        0x337FFFFF,
        0x387FE000,
        0x387FF000,
        0x3F808000,
        0x3F818000,
        0x7F7F8000,
        0x7F7F7FFF,
        0x38800000,
        0x3F800FFF,
        0x3F801000,
    ],
}


def backend_or_skip(name):
    try:
        return load_backend(name)
    except BackendUnavailable as exc:
        pytest.skip(f"{name} backend unavailable: {exc}")


@pytest.fixture(params=["torch", "cpp"])
def backend(request):
    return backend_or_skip(request.param)


@pytest.fixture
def cpp():
    return backend_or_skip("cpp")


@pytest.fixture
def native(cpp):
    """The raw resta_fast._C module, with its kernel variant restored afterwards."""
    from resta_fast import _C

    isa = _C.cpu_features()["isa"]
    yield _C
    _C.set_isa(isa)


def from_bits(bits, dtype):
    """A tensor of ``dtype`` holding the given raw bit patterns."""
    wide = np.asarray(bits, dtype=np.int64)
    if dtype == F32:
        return torch.from_numpy(wide.astype(np.uint32).view(np.int32).copy()).view(F32)
    return torch.from_numpy(wide.astype(np.uint16).view(np.int16).copy()).view(dtype)


def make_input(n, dtype, seed, scale=1.0, like=None, specials=True):
    """Random values (near ``like`` when given, as fine-tunes are) with specials mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * scale
    if like is not None:
        x = like.float() + x * 1e-2
    x = x.to(dtype)
    if specials and n:
        pool = from_bits(SPECIALS[dtype], dtype)
        picks = torch.randint(0, len(pool), (n,), generator=g)
        where = torch.rand(n, generator=g) < 0.15
        x = torch.where(where, pool[picks], x)
    return x


def make_case(n, dtypes, seed=0, specials=True):
    """(f, a, u, b) in the given dtypes: f and a near b, u near a, like real checkpoints."""
    fd, ad, ud, bd = dtypes
    b = make_input(n, bd, seed, scale=0.05, specials=specials)
    f = make_input(n, fd, seed + 1, scale=0.05, like=b, specials=specials)
    a = make_input(n, ad, seed + 2, scale=0.05, like=b, specials=specials)
    u = make_input(n, ud, seed + 3, scale=0.05, like=a, specials=specials)
    return f, a, u, b


def poisoned(n, dtype, pattern):
    """An output buffer whose every 16-bit half-word is ``pattern``."""
    out = torch.empty(n, dtype=dtype)
    out.view(torch.int16).fill_(pattern - 0x10000 if pattern >= 0x8000 else pattern)
    return out


def assert_same_bits(actual, expected, what, inputs=None):
    """Bit-identical except that NaN matches NaN; names the first mismatches."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    nan_a, nan_e = torch.isnan(actual.float()), torch.isnan(expected.float())
    bits_a, bits_e = actual.view(BITS[actual.dtype]), expected.view(BITS[expected.dtype])
    bad = (nan_a != nan_e) | (~nan_e & (bits_a != bits_e))
    if not bad.any():
        return
    mask = 0xFFFF if actual.dtype != F32 else 0xFFFFFFFF
    lines = []
    for i in bad.nonzero().flatten()[:8].tolist():
        line = (
            f"  [{i}] got {actual[i].item()!r} (0x{bits_a[i].item() & mask:x}), "
            f"want {expected[i].item()!r} (0x{bits_e[i].item() & mask:x})"
        )
        if inputs:
            line += "; inputs " + ", ".join(f"{k}={v[i].item()!r}" for k, v in inputs.items() if v is not None)
        lines.append(line)
    raise AssertionError(f"{what}: {int(bad.sum())} of {actual.numel()} elements differ\n" + "\n".join(lines))


def run(backend, out_dtype, f, a, u, b, poison=0x7FBF, **kw):
    out = poisoned(f.numel(), out_dtype, poison)
    backend.patch_into(out, f, a, u, b, **kw)
    return out


def oracle_values(t):
    """Decode a tensor with elementwise.to_f32 (independent of torch's casts)."""
    if t is None:
        return None
    bits = t.view(BITS[t.dtype]).numpy().astype(np.int64) & (0xFFFF if t.dtype != F32 else 0xFFFFFFFF)
    return [elementwise.to_f32(int(x), NAME[t.dtype]) for x in bits]


@functools.cache
def _oracle_cached(key):
    out_dtype, n, dtypes, case_seed, use_u, use_b, specials, beta, p, seed, offset = key
    f, a, u, b = make_case(n, dtypes, case_seed, specials)
    return _patch_oracle(
        out_dtype, f, a, u if use_u else None, b if use_b else None, beta=beta, p=p, seed=seed, offset=offset
    )


def _patch_oracle(out_dtype, f, a, u, b, *, beta, p, seed, offset):
    """tests/elementwise.py over given tensors."""
    cols = [oracle_values(t) for t in (f, a, u, b)]
    with np.errstate(all="ignore"):
        bits = [
            elementwise.patch_element(
                cols[0][i],
                cols[1][i],
                None if u is None else cols[2][i],
                None if b is None else cols[3][i],
                beta,
                p,
                seed,
                offset + i,
                NAME[out_dtype],
            )
            for i in range(f.numel())
        ]
    return from_bits(bits, out_dtype)


def check_case(
    backend,
    out_dtype,
    n,
    dtypes,
    *,
    use_u=True,
    use_b=False,
    specials=True,
    beta=0.5,
    p=0.0,
    seed=0,
    offset=0,
    case_seed=0,
):
    """Backend runs vs the oracle (n <= 1023), one per poison fill."""
    f, a, u, b = make_case(n, dtypes, case_seed, specials)
    u = u if use_u else None
    b = b if use_b else None
    want = _oracle_cached((out_dtype, n, dtypes, case_seed, use_u, use_b, specials, beta, p, seed, offset))
    what = (
        f"{backend.__name__} out={NAME[out_dtype]} in={[NAME[d] for d in dtypes]} n={n} "
        f"u={use_u} dare={use_b} beta={beta} p={p} seed={seed} offset={offset}"
    )
    for poison in POISONS:
        got = run(backend, out_dtype, f, a, u, b, poison=poison, beta=beta, p=p, seed=seed, offset=offset)
        assert_same_bits(got, want, what, {"f": f, "a": a, "u": u, "b": b})


# ---------------------------------------------------------------- dtype combos

SAME = [(d, d, d, d) for d in DTYPES]
MIXED = [
    (BF16, F32, F32, BF16),  # bf16 weights, fp32 safety vector
    (F16, BF16, BF16, BF16),  # fp16 fine-tune of a bf16 aligned model
    (F32, F16, BF16, F16),
    (BF16, F16, F32, F32),
]


@pytest.mark.parametrize("out_dtype", DTYPES, ids=NAME.get)
@pytest.mark.parametrize("dtypes", SAME + MIXED, ids=lambda d: "-".join(NAME[x] for x in d))
@pytest.mark.parametrize("form", ["vector", "a-u", "dare"])
def test_dtype_combinations_match_oracle(backend, out_dtype, dtypes, form):
    check_case(
        backend,
        out_dtype,
        1023,
        dtypes,
        use_u=form != "vector",
        use_b=form == "dare",
        p=0.3 if form == "dare" else 0.0,
        seed=0x1234_5678_9ABC_DEF0,
        offset=6,
    )


# ---------------------------------------------------- sizes, p, beta, offsets


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 1023])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("beta", [0.0, 0.5, -1.0, 2.0])
def test_sizes_p_beta_match_oracle(backend, n, p, beta):
    dtypes = (BF16, BF16, BF16, BF16) if n % 2 else (F16, BF16, F32, F16)
    check_case(backend, BF16 if n % 2 else F16, n, dtypes, use_b=True, beta=beta, p=p, seed=n * 7919 + 1, offset=n)


@pytest.mark.parametrize("offset", [2**31 - 513, 2**32 - 511, 2**34 + 2**32 - 3, 2**62 + 1])
@pytest.mark.parametrize("dtypes", [(BF16,) * 4, (F32, F16, BF16, F32)], ids=lambda d: "-".join(NAME[x] for x in d))
def test_offsets_across_counter_word_boundaries_match_oracle(backend, offset, dtypes):
    # 1023 elements from each offset cross q = 2^29, 2^30, ... where the
    # counter's low word wraps or its high word first becomes non-zero.
    check_case(backend, dtypes[0], 1023, dtypes, use_b=True, p=0.5, seed=2**64 - 1, offset=offset)


BIG = 2**20 + 37


@pytest.mark.parametrize(
    "dtypes", [(BF16,) * 4, (F16,) * 4, (F32, BF16, F16, F32)], ids=lambda d: "-".join(NAME[x] for x in d)
)
@pytest.mark.parametrize("form", ["vector", "a-u", "dare"])
def test_large_cpp_matches_reference(cpp, dtypes, form):
    f, a, u, b = make_case(BIG, dtypes, seed=5)
    u = u if form != "vector" else None
    b = b if form == "dare" else None
    kw = dict(beta=-1.0, p=0.9 if form == "dare" else 0.0, seed=99, offset=2**32 - 1001)
    out_dtype = dtypes[0]
    want = run(ref, out_dtype, f, a, u, b, poison=0x5A5A, **kw)
    got = run(cpp, out_dtype, f, a, u, b, poison=0xFFFF, **kw)
    assert_same_bits(got, want, f"cpp vs torch n={BIG} {form}", {"f": f, "a": a, "u": u, "b": b})


# ------------------------------------------------------- chunking and threads


def test_chunks_with_offsets_equal_whole_tensor(backend):
    n = 300_007
    f, a, u, b = make_case(n, (BF16, F32, BF16, BF16), seed=11)
    kw = dict(beta=0.5, p=0.3, seed=rng.tensor_seed(7, "layers.0.mlp.weight"))
    whole = run(backend, BF16, f, a, u, b, **kw)
    pieces = poisoned(n, BF16, 0xFFFF)
    # Cuts that start chunks mid-counter (1, 5, 70_001) and at block edges.
    cuts = [0, 1, 5, 1024, 4099, 70_001, 70_002, 200_000, n]
    for lo, hi in itertools.pairwise(cuts):
        backend.patch_into(pieces[lo:hi], f[lo:hi], a[lo:hi], u[lo:hi], b[lo:hi], offset=lo, **kw)
    assert_same_bits(pieces, whole, f"{backend.__name__}: chunks vs whole")


@pytest.mark.parametrize("threads", [1, 2, 3, None])
def test_thread_count_does_not_change_result(cpp, threads):
    n = 2**18 + 13  # above the single-thread threshold
    f, a, u, b = make_case(n, (F16, BF16, BF16, F16), seed=3)
    kw = dict(beta=2.0, p=0.3, seed=5, offset=17)
    want = run(ref, F16, f, a, u, b, **kw)
    got = run(cpp, F16, f, a, u, b, poison=0x5A5A, threads=threads, **kw)
    assert_same_bits(got, want, f"cpp threads={threads}")


def test_in_place_output_over_finetuned(backend):
    f, a, u, b = make_case(5000, (BF16,) * 4, seed=8)
    want = run(ref, BF16, f, a, u, b, beta=0.5, p=0.3, seed=1)
    backend.patch_into(f, f, a, u, b, beta=0.5, p=0.3, seed=1)
    assert_same_bits(f, want, f"{backend.__name__}: in place")


def test_caller_flush_to_zero_does_not_change_results(cpp):
    # Inputs whose differences and outputs are fp32 subnormals.
    dtypes = (F32, F32, F32, F32)
    f, a, u, b = (x * 1e-38 for x in make_case(1023, dtypes, seed=31, specials=False))
    want = _patch_oracle(F32, f, a, u, b, beta=0.5, p=0.3, seed=6, offset=0)
    assert (want.abs() < 1.2e-38).any() and (want != 0).any()
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        got = run(cpp, F32, f, a, u, b, poison=0x5A5A, beta=0.5, p=0.3, seed=6, threads=1)
    finally:
        torch.set_flush_denormal(False)
    assert_same_bits(got, want, "cpp under the caller's flush-to-zero")


def test_cpp_counts_nonfinite_outputs(cpp):
    for out_dtype in DTYPES:
        f, a, u, b = make_case(10_000, (F32, BF16, F16, F32), seed=21)
        out = poisoned(10_000, out_dtype, 0x5A5A)
        count = cpp.patch_into(out, f, a, u, b, beta=2.0, p=0.3, seed=3)
        assert count == int((~torch.isfinite(out)).sum()), NAME[out_dtype]


# ---------------------------------------------------------- alignment (cpp)


@pytest.mark.parametrize("shift", [1, 2, 3])
def test_misaligned_pointers(native, shift):
    n = 4099
    f, a, u, b = make_case(n, (BF16, F32, F16, F32), seed=4)
    want = run(ref, F16, f, a, u, b, beta=0.5, p=0.3, seed=9, offset=3)
    # Each buffer starts `shift` (or shift+1) bytes past a 64-byte boundary.
    tensors = {"f": f, "a": a, "u": u, "b": b}
    arena = torch.zeros(
        sum(t.numel() * t.element_size() + 128 for t in tensors.values()) + 2 * n + 128, dtype=torch.uint8
    )
    base = arena.data_ptr()
    cursor = (-base) % 64
    addr = {}
    for k, (name, t) in enumerate(tensors.items()):
        start = cursor + shift + (k % 2)
        raw = t.view(torch.uint8)
        arena[start : start + raw.numel()] = raw
        addr[name] = base + start
        cursor = (start + raw.numel() + 63) // 64 * 64
    out_start = cursor + shift
    arena[out_start : out_start + 2 * n] = 0xFF
    r = float(np.float32(1) / (np.float32(1) - np.float32(0.3)))
    native.patch(
        base + out_start,
        native.DTYPE_F16,
        addr["f"],
        native.DTYPE_BF16,
        addr["a"],
        native.DTYPE_F32,
        addr["u"],
        native.DTYPE_F16,
        addr["b"],
        native.DTYPE_F32,
        n,
        0.5,
        0.3,
        r,
        9,
        3,
        2,
    )
    got = arena[out_start : out_start + 2 * n].clone().view(F16)
    assert_same_bits(got, want, f"misaligned by {shift}")


# ------------------------------------------------------------ ISA variants


def test_every_isa_variant_matches_reference(native, cpp):
    n = 70_001  # several blocks and threads, tails of every vector width
    cases = [((BF16,) * 4, BF16), ((F16,) * 4, F16), ((F32, F16, BF16, F16), F32), ((BF16, F32, F32, F16), F16)]
    for isa in native.cpu_features()["isa_supported"]:
        native.set_isa(isa)
        for dtypes, out_dtype in cases:
            f, a, u, b = make_case(n, dtypes, seed=13)
            kw = dict(beta=0.5, p=0.3, seed=2**63 + 5, offset=2**32 - 4095)
            want = run(ref, out_dtype, f, a, u, b, **kw)
            got = run(cpp, out_dtype, f, a, u, b, poison=0x5A5A, threads=2, **kw)
            assert_same_bits(got, want, f"isa={isa} {dtypes}->{out_dtype}")
        for src in DTYPES:
            x = every_bit_pattern(src)
            for dst in DTYPES:
                want = poisoned(x.numel(), dst, 0x5A5A)
                ref.convert_into(want, x)
                got = poisoned(x.numel(), dst, 0xFFFF)
                cpp.convert_into(got, x)
                assert_same_bits(got, want, f"isa={isa} convert {NAME[src]}->{NAME[dst]}", {"x": x})
        words = native.uniform(77, 2**32 - 4097, 9000)
        want = rng.uniform(77, 2**32 - 4097, 9000).numpy()
        assert np.array_equal(words.view(np.uint32), want.view(np.uint32)), f"isa={isa} uniform"


def test_isa_variants_agree_on_nan_payloads(native):
    # Not a docs/spec.md §2 requirement (NaN is compared as NaN-ness), but the portable
    # and F16C fp16 paths are meant to be bit-identical, NaN payloads included.
    halves = np.arange(65536, dtype=np.uint16)
    floats = np.random.default_rng(0).integers(0, 2**32, 2**18, dtype=np.uint64).astype(np.uint32)
    results = {}
    for isa in native.cpu_features()["isa_supported"]:
        native.set_isa(isa)
        wide = np.empty(65536, np.float32)
        native.convert(wide.ctypes.data, native.DTYPE_F32, halves.ctypes.data, native.DTYPE_F16, 65536)
        narrow = np.empty(floats.size, np.uint16)
        native.convert(narrow.ctypes.data, native.DTYPE_F16, floats.ctypes.data, native.DTYPE_F32, floats.size)
        results[isa] = (wide.view(np.uint32).copy(), narrow)
    first = next(iter(results.values()))
    for isa, (wide, narrow) in results.items():
        assert np.array_equal(wide, first[0]), f"{isa}: fp16 decode differs"
        assert np.array_equal(narrow, first[1]), f"{isa}: fp16 encode differs"


def test_set_isa_rejects_unknown_variant(native):
    with pytest.raises(ValueError, match="name.*'avx9000'"):
        native.set_isa("avx9000")


# ------------------------------------------------------------- conversion


def every_bit_pattern(dtype):
    if dtype == F32:
        rng_np = np.random.default_rng(1)
        random = rng_np.integers(0, 2**32, 2**18, dtype=np.uint64).astype(np.uint32)
        # Every fp32 near fp16/bf16 rounding ties and range edges, both signs.
        edges = np.concatenate(
            [
                np.arange(c - 40, c + 40, dtype=np.int64)
                for c in (
                    0x477FF000,
                    0x33000000,
                    0x387FE000,
                    0x38800000,
                    0x3F808000,
                    0x3F818000,
                    0x7F7F8000,
                    0x7F800000,
                    0x00000028,
                )
            ]
        )
        pool = np.concatenate([random, edges.astype(np.uint32), np.array(SPECIALS[F32], np.uint32)])
        pool = np.concatenate([pool, pool | np.uint32(0x80000000)])
        return torch.from_numpy(pool.view(np.int32).copy()).view(F32)
    return torch.from_numpy(np.arange(65536, dtype=np.uint16).view(np.int16).copy()).view(dtype)


@pytest.mark.parametrize("src", DTYPES, ids=NAME.get)
@pytest.mark.parametrize("dst", DTYPES, ids=NAME.get)
def test_convert_matches_reference(backend, src, dst):
    x = every_bit_pattern(src)
    want = poisoned(x.numel(), dst, 0x5A5A)
    ref.convert_into(want, x)
    got = poisoned(x.numel(), dst, 0xFFFF)
    backend.convert_into(got, x)
    assert_same_bits(got, want, f"{backend.__name__} convert {NAME[src]}->{NAME[dst]}", {"x": x})


@pytest.mark.parametrize("src", DTYPES, ids=NAME.get)
@pytest.mark.parametrize("dst", DTYPES, ids=NAME.get)
def test_convert_matches_oracle(backend, src, dst):
    x = make_input(1023, src, seed=17, scale=100.0)
    bits = x.view(BITS[src]).numpy().astype(np.int64) & (0xFFFF if src != F32 else 0xFFFFFFFF)
    with np.errstate(all="ignore"):
        expect = [elementwise.from_f32(elementwise.to_f32(int(v), NAME[src]), NAME[dst]) for v in bits]
    if src == dst:  # equal dtypes copy bits, as torch's copy_ does
        expect = bits.tolist()
    want = from_bits(expect, dst)
    got = poisoned(1023, dst, 0x7FBF)
    backend.convert_into(got, x)
    assert_same_bits(got, want, f"{backend.__name__} convert {NAME[src]}->{NAME[dst]} vs oracle")


# ----------------------------------------------------------- random stream


RANDOM123_KAT = [
    # (counter, key, expected) from Random123's kat_vectors for philox4x32-10.
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", RANDOM123_KAT)
def test_philox_known_answers(native, counter, key, expected):
    assert tuple(native.philox4x32(*counter, *key)) == expected
    assert tuple(elementwise.philox(counter, key)) == expected


@pytest.mark.parametrize(
    "seed", [0, 1, 2**32 - 1, 2**32, 2**63, 2**64 - 1, rng.tensor_seed(0, "model.embed_tokens.weight")]
)
def test_uniform_matches_rng(native, seed):
    for offset in (0, 1, 2, 3, 4, 2**31 - 3, 2**32 - 7, 2**33 + 1, 2**62 - 5):
        for n in (1, 5, 67, 1025):
            got = native.uniform(seed, offset, n)
            want = rng.uniform(seed, offset, n).numpy()
            if not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
                i = int(np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))[0])
                raise AssertionError(f"seed={seed} offset={offset} n={n}: element {i} got {got[i]!r} want {want[i]!r}")


def test_uniform_matches_oracle(cpp):
    for seed, offset in ((3, 0), (2**64 - 1, 2**32 - 2), (12345, 2**31 + 1)):
        got = cpp.uniform(seed, offset, 9)
        want = [elementwise.uniform_at(seed, offset + i) for i in range(9)]
        assert got.tolist() == [float(w) for w in want], (seed, offset)


def test_uniform_threads_and_large_n(native):
    n = 2**18 + 3
    whole = native.uniform(42, 2**32 - 10, n, 1)
    assert np.array_equal(native.uniform(42, 2**32 - 10, n, 2), whole)
    assert np.array_equal(whole.view(np.uint32), rng.uniform(42, 2**32 - 10, n).numpy().view(np.uint32))


# ------------------------------------------------------- argument checking


def _call(native, **overrides):
    buf = np.zeros(64, np.float32)
    ptr = buf.ctypes.data
    args = dict(
        out_ptr=ptr,
        out_dtype=2,
        f_ptr=ptr + 64,
        f_dtype=2,
        a_ptr=ptr + 128,
        a_dtype=2,
        u_ptr=0,
        u_dtype=0,
        b_ptr=0,
        b_dtype=0,
        n=4,
        beta=0.5,
        p=0.0,
        r=1.0,
        seed=0,
        offset=0,
        threads=None,
    )
    args.update(overrides)
    return native.patch(**args)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(f_dtype=7), r"'f_dtype' must be a dtype code 0 \(bf16\), 1 \(fp16\) or 2 \(fp32\); got 7"),
        (dict(out_dtype=-1), r"'out_dtype' .* got -1"),
        (dict(n=-1), r"'n' must be >= 0; got -1"),
        (dict(a_ptr=0), r"'a_ptr' must be a buffer address, got 0 \(null\) with n=4"),
        (dict(p=1.0), r"'p' must be in \[0, 1\)"),
        (dict(p=-0.25, r=0.8), r"'p' must be in \[0, 1\)"),
        (dict(p=float("nan")), r"'p' must be in \[0, 1\)"),
        (dict(p=0.5, r=1.0), r"'r' must be fp32\(1\)/\(fp32\(1\)-fp32\(p\)\) = 2 for p=0.5; got 1"),
        (dict(offset=-3), r"'offset' must be >= 0; got -3"),
        (dict(offset=2**63 - 2), r"offset \+ n must fit in int64"),
        (dict(threads=-2), r"'threads' must be >= 0 or None; got -2"),
    ],
)
def test_native_argument_errors(native, overrides, message):
    with pytest.raises(ValueError, match=message):
        _call(native, **overrides)


def test_native_rejects_partial_overlap(native):
    buf = np.zeros(64, np.float32)
    with pytest.raises(ValueError, match="'out_ptr' .* partially overlaps 'f_ptr'"):
        _call(native, out_ptr=buf.ctypes.data, f_ptr=buf.ctypes.data + 4)
    assert _call(native, out_ptr=buf.ctypes.data, f_ptr=buf.ctypes.data) == 0  # exact alias is fine


def test_native_allows_null_pointers_when_empty(native):
    assert _call(native, out_ptr=0, f_ptr=0, a_ptr=0, n=0) == 0


def test_wrapper_argument_errors(cpp):
    x = torch.zeros(8)
    with pytest.raises(ValueError, match="a has 7 elements but out has 8"):
        cpp.patch_into(torch.empty(8), x, torch.zeros(7), beta=1.0)
    with pytest.raises(TypeError, match="u has dtype torch.int8"):
        cpp.patch_into(torch.empty(8), x, x, torch.zeros(8, dtype=torch.int8), beta=1.0)
    with pytest.raises(ValueError, match="f is not contiguous"):
        cpp.patch_into(torch.empty(8), torch.zeros(16)[::2], x, beta=1.0)
    with pytest.raises(ValueError, match="p must satisfy 0 <= p < 1"):
        cpp.patch_into(torch.empty(8), x, x, None, x, beta=1.0, p=1.0)
    with pytest.raises(ValueError, match="seed must be an unsigned 64-bit integer"):
        cpp.patch_into(torch.empty(8), x, x, None, x, beta=1.0, p=0.5, seed=-1)
    with pytest.raises(ValueError, match="threads must be None or an int >= 0"):
        cpp.patch_into(torch.empty(8), x, x, beta=1.0, threads=-1)
    with pytest.raises(ValueError, match="x has 4 elements but out has 8"):
        cpp.convert_into(torch.empty(8), torch.zeros(4))


# ------------------------------------------------------- loading and info


def test_missing_extension_raises_original_error(monkeypatch):
    import sys

    import resta_fast
    from resta_fast.kernels import cpp

    monkeypatch.setattr(cpp, "_native", None)
    monkeypatch.delattr(resta_fast, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "resta_fast._C", None)  # makes the import fail
    with pytest.raises(BackendUnavailable, match="resta_fast._C did not load") as info:
        cpp.check_available()
    assert isinstance(info.value.__cause__, ImportError)
    assert str(info.value.__cause__) in str(info.value)


def test_build_info(cpp):
    info = cpp.build_info()
    assert info["isa"] in info["isa_supported"]
    assert set(info["isa_supported"]) <= set(info["isa_compiled"])
    assert info["fp_contract_off"] is True, "the build contracts a*b+c into FMA; docs/spec.md §2 forbids it"
    assert info["openmp_max_threads"] >= 1
    assert info["module"].endswith((".so", ".pyd"))


def _host(t):
    """The engine's host form of a tensor: numpy, BF16 as its uint16 bits."""
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == BF16 else t.numpy()


@pytest.mark.parametrize(
    "dtypes", [(BF16,) * 4, (F16,) * 4, (F32, BF16, F16, F32)], ids=lambda d: "-".join(NAME[x] for x in d)
)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=NAME.get)
@pytest.mark.parametrize("form", ["vector", "a-u", "dare"])
def test_numpy_entry_points_match_the_torch_ones(cpp, dtypes, out_dtype, form):
    """patch_arrays / convert_arrays (the engine's torch-free host path) give the
    same bits and the same non-finite count as patch_into / convert_into."""
    n = 4099
    f, a, u, b = make_case(n, dtypes, seed=11)
    u = None if form == "vector" else u
    b = b if form == "dare" else None
    kw = dict(beta=0.5, p=0.3 if b is not None else 0.0, seed=77, offset=5)
    want = poisoned(n, out_dtype, 0x7FBF)
    want_bad = cpp.patch_into(want, f, a, u, b, **kw)
    got = poisoned(n, out_dtype, 0x7FBF)
    got_bad = cpp.patch_arrays(
        _host(got), _host(f), _host(a), None if u is None else _host(u), None if b is None else _host(b), **kw
    )
    assert_same_bits(got, want, f"patch_arrays {form}")
    assert got_bad == want_bad and want_bad > 0  # the specials make some outputs non-finite
    conv_want, conv_got = poisoned(n, out_dtype, 0x7FBF), poisoned(n, out_dtype, 0x7FBF)
    cpp.convert_into(conv_want, f)
    cpp.convert_arrays(_host(conv_got), _host(f))
    assert_same_bits(conv_got, conv_want, "convert_arrays")


def test_numpy_entry_point_checks_its_arguments(cpp):
    x = np.zeros(8, np.float32)
    with pytest.raises(TypeError, match="dtype float64"):
        cpp.patch_arrays(x, np.zeros(8), x, beta=1.0)
    with pytest.raises(ValueError, match="has 4 elements but out has 8"):
        cpp.patch_arrays(x, x[:4], x, beta=1.0)
    with pytest.raises(ValueError, match="flat contiguous"):
        cpp.patch_arrays(x[::2], x[::2], x[::2], beta=1.0)
    with pytest.raises(TypeError, match="numpy array"):
        cpp.patch_arrays(x, torch.zeros(8), x, beta=1.0)
