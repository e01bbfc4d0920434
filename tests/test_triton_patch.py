"""The Triton backend against the torch reference, the element-by-element oracle and,
when it is built, the C++ backend: bit for bit (NaN compared as NaN-ness).

Without CUDA the kernels run through Triton's CPU interpreter; that must be chosen
before the kernels are defined, hence the environment set-up before the imports.
"""

import json
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():  # tests/conftest.py does this too; kept for running this file alone
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

triton = pytest.importorskip("triton")
import elementwise  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from resta_fast import rng  # noqa: E402
from resta_fast.kernels import BackendUnavailable, load_backend  # noqa: E402
from resta_fast.kernels import reference as ref  # noqa: E402
from resta_fast.kernels import triton_patch as tp  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

if not CUDA and not isinstance(tp._resta_patch_kernel, InterpretedFunction):
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set, so its kernels cannot run "
        "without a GPU; set TRITON_INTERPRET=1 in the environment",
        allow_module_level=True,
    )

try:
    CPP = load_backend("cpp")
except Exception:  # noqa: BLE001 - the native backend is optional here
    CPP = None

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
DTYPES = (BF16, F16, F32)
ORACLE_NAME = {BF16: "bf16", F16: "f16", F32: "f32"}
INT_VIEW = {BF16: torch.int16, F16: torch.int16, F32: torch.int32}
# Two different non-NaN fill patterns: an element neither backend writes differs.
POISON = {"triton": 0x5A, "ref": 0xA5}


def poisoned(n, dtype, pattern, device="cpu"):
    """An output buffer whose every byte is ``pattern``."""
    out = torch.empty(n, dtype=dtype, device=device)
    out.view(torch.uint8).fill_(pattern)
    return out


def assert_same(actual, expected, what=""):
    """Bit-identical, except that any NaN matches any NaN; reports the first mismatches."""
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan_a, nan_e = torch.isnan(actual.float()), torch.isnan(expected.float())
    bits_a, bits_e = actual.view(INT_VIEW[actual.dtype]), expected.view(INT_VIEW[expected.dtype])
    bad = (nan_a != nan_e) | (~nan_a & (bits_a != bits_e))
    if bad.any():
        idx = bad.nonzero().flatten()[:8].tolist()
        rows = [
            f"[{i}] got {actual[i].item()!r} (0x{bits_a[i].item() & 0xFFFFFFFF:x}) "
            f"want {expected[i].item()!r} (0x{bits_e[i].item() & 0xFFFFFFFF:x})"
            for i in idx
        ]
        raise AssertionError(f"{what}: {int(bad.sum())} of {actual.numel()} differ\n" + "\n".join(rows))


def make_inputs(n, dtypes, gen_seed=0):
    """f, a, u, b in the given dtypes, shaped like a fine-tune: f and a near b."""
    g = torch.Generator().manual_seed(gen_seed)
    base = torch.randn(n, generator=g) * 0.05
    f = base + torch.randn(n, generator=g) * 1e-3
    a = base + torch.randn(n, generator=g) * 1e-3
    u = a + torch.randn(n, generator=g) * 1e-4
    return [t.to(dt) for t, dt in zip((f, a, u, base), dtypes, strict=True)]


def run_triton(out_dtype, f, a, u=None, b=None, **kw):
    """The triton backend's output (on CPU) into a poisoned buffer."""
    dev = [t.to(DEV) if t is not None else None for t in (f, a, u, b)]
    out = poisoned(f.numel(), out_dtype, POISON["triton"], DEV)
    tp.patch_into(out, *dev, **kw)
    return out.cpu()


def run_backend(backend, out_dtype, f, a, u=None, b=None, **kw):
    """A CPU backend's output into a poisoned buffer."""
    out = poisoned(f.numel(), out_dtype, POISON["ref"])
    backend.patch_into(out, f, a, u, b, **kw)
    return out


def check_against_backends(out_dtype, f, a, u=None, b=None, what="", **kw):
    """Triton vs the torch reference and, when built, the C++ backend."""
    got = run_triton(out_dtype, f, a, u, b, **kw)
    assert_same(got, run_backend(ref, out_dtype, f, a, u, b, **kw), f"triton vs torch {what}")
    if CPP is not None:
        assert_same(got, run_backend(CPP, out_dtype, f, a, u, b, **kw), f"triton vs cpp {what}")
    return got


def oracle(out_dtype, f, a, u, b, *, beta, p=0.0, seed=0, offset=0):
    """tests/elementwise.py over a whole (small) chunk, as a tensor of out_dtype."""
    cols = [t.float().numpy() if t is not None else None for t in (f, a, u, b)]
    bits = [
        elementwise.patch_element(
            cols[0][i],
            cols[1][i],
            None if cols[2] is None else cols[2][i],
            None if cols[3] is None else cols[3][i],
            beta,
            p,
            seed,
            offset + i,
            ORACLE_NAME[out_dtype],
        )
        for i in range(f.numel())
    ]
    if out_dtype == F32:
        return torch.from_numpy(np.array(bits, dtype=np.uint32).view(np.int32)).view(F32)
    return torch.from_numpy(np.array(bits, dtype=np.uint16).view(np.int16)).view(out_dtype)


MODES = {
    "plain": dict(with_u=True, with_b=False),
    "vector": dict(with_u=False, with_b=False),
    "dare": dict(with_u=True, with_b=True),
    "dare_vector": dict(with_u=False, with_b=True),
}


def mode_args(mode, f, a, u, b):
    m = MODES[mode]
    return f, a, (u if m["with_u"] else None), (b if m["with_b"] else None)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_dtype", DTYPES, ids=str)
def test_same_dtype_inputs(in_dtype, out_dtype, mode):
    tensors = mode_args(mode, *make_inputs(20_011, [in_dtype] * 4))
    check_against_backends(
        out_dtype,
        *tensors,
        beta=0.7,
        p=0.3,
        seed=rng.tensor_seed(1, "w"),
        offset=6,
        what=f"{in_dtype}->{out_dtype} {mode}",
    )


MIXES = [
    (BF16, F16, F32, BF16),
    (F16, F32, BF16, F16),
    (F32, BF16, F16, F32),
    (BF16, F32, F32, F16),
    (F16, BF16, BF16, F32),
    (F32, F16, BF16, BF16),
]


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dtypes", MIXES, ids=lambda d: "-".join(str(x)[6:] for x in d))
def test_mixed_dtype_inputs(dtypes, out_dtype):
    f, a, u, b = make_inputs(5_003, dtypes, gen_seed=1)
    for mode in ("plain", "vector", "dare"):
        check_against_backends(
            out_dtype,
            *mode_args(mode, f, a, u, b),
            beta=-1.25,
            p=0.5,
            seed=99,
            offset=1,
            what=f"{dtypes}->{out_dtype} {mode}",
        )


@pytest.mark.parametrize("n", [0, 1, 3, 5, 1023, 4097, 2**20 + 37])
def test_sizes_and_tails(n):
    f, a, u, b = make_inputs(n, [BF16] * 4, gen_seed=n)
    for offset in (0, 3):
        check_against_backends(BF16, f, a, u, b, beta=0.5, p=0.3, seed=7, offset=offset, what=f"n={n}")
    check_against_backends(F16, f, a, u, beta=0.5, what=f"n={n} plain")


@pytest.mark.parametrize("offset", [2**31 - 3, 2**31, 2**32 - 1, 2**32 + 2, 2**40 + 1, 2**62 - 4099])
def test_offsets_past_32_bits(offset):
    f, a, u, b = make_inputs(2_000, [F32] * 4, gen_seed=3)
    check_against_backends(BF16, f, a, u, b, beta=1.0, p=0.5, seed=2**63 + 11, offset=offset, what=f"offset={offset}")


def test_chunking_and_block_size_do_not_change_results():
    n, seed = 1_000, rng.tensor_seed(5, "model.layers.0.mlp.up_proj.weight")
    f, a, u, b = make_inputs(n, [BF16] * 4, gen_seed=4)
    kw = dict(beta=0.5, p=0.3, seed=seed)
    whole = run_triton(BF16, f, a, u, b, offset=2**32 - 2, **kw)
    pieces = []
    for lo, hi in ((0, 1), (1, 6), (6, 333), (333, n)):
        pieces.append(run_triton(BF16, f[lo:hi], a[lo:hi], u[lo:hi], b[lo:hi], offset=2**32 - 2 + lo, **kw))
    assert_same(torch.cat(pieces), whole, "chunked vs whole")
    for block in (16, 64):
        dev = [t.to(DEV) for t in (f, a, u, b)]
        out = poisoned(n, BF16, POISON["triton"], DEV)
        tp.patch_into(out, *dev, offset=2**32 - 2 + 0, block=block, num_warps=1, **kw)
        assert_same(out, whole, f"block={block}")


@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
def test_p_beta_grid(p):
    f, a, u, b = make_inputs(4_099, [BF16, BF16, F16, F32], gen_seed=5)
    for beta in (0.0, 0.5, -1.0, 2.0):
        kw = dict(beta=beta, p=p, seed=rng.tensor_seed(3, "x"), offset=10)
        got = check_against_backends(BF16, f, a, u, b, what=f"p={p} beta={beta}", **kw)
        assert_same(got[:64], oracle(BF16, f[:64], a[:64], u[:64], b[:64], **kw), "vs elementwise")


def test_dropout_rate_is_p():
    n, p = 200_000, 0.3
    f = torch.ones(n)
    zero = torch.zeros(n)
    out = run_triton(F32, f, zero, None, zero, beta=0.0, p=p, seed=12345)
    kept = (out != 0).float().mean().item()
    assert abs(kept - (1 - p)) < 0.01


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["plain", "vector", "dare"])
def test_against_elementwise_oracle(out_dtype, mode):
    f, a, u, b = mode_args(mode, *make_inputs(301, [F16, BF16, F32, BF16], gen_seed=6))
    kw = dict(beta=0.37, p=0.45, seed=2**64 - 1, offset=2**32 - 5)
    got = run_triton(out_dtype, f, a, u, b, **kw)
    assert_same(got, oracle(out_dtype, f, a, u, b, **kw), f"vs elementwise {mode}")


def special_values():
    """fp32 values that stress rounding: NaN (with payloads), ±Inf, ±0, subnormals,
    bf16/fp16 ties and overflow boundaries."""
    vals = [
        0.0,
        -0.0,
        float("inf"),
        float("-inf"),
        float("nan"),
        1.0,
        -1.0,
        1e-45,
        -1e-45,
        1.17e-38,
        3.0e38,
        -3.0e38,
        3.389e38,
        65504.0,
        65520.0,
        65519.99,
        6.0e-8,
        2.98e-8,
        6.1e-5,
        1e-40,
    ]
    bits = [
        0x7F800001,
        0xFFC00001,
        0x7FBFFFFF,  # NaN payloads
        0x3F808000,
        0x3F818000,
        0x3F80FFFF,
        0x7F7F8000,
        0x7F7FFFFF,  # bf16 ties, overflow to inf
        0x3F801000,
        0x3F803000,
        0x477FF000,
        0x33800000,
        0x33800001,
        0x387FE000,
    ]  # fp16 ties
    from_bits = np.array(bits, dtype=np.uint32).view(np.float32)
    return torch.cat([torch.tensor(vals, dtype=F32), torch.from_numpy(from_bits)])


def test_special_values():
    s = special_values()
    k = s.numel()
    # every (f, a, u, b) combination of specials would be k**4; pairs cover each op's operands
    f = s.repeat_interleave(k)
    a = s.repeat(k)
    u = s.roll(1).repeat(k)
    b = s.roll(3).repeat_interleave(k)
    for out_dtype in DTYPES:
        for in_dtype in DTYPES:
            ins = [t.to(in_dtype) for t in (f, a, u, b)]
            for mode in MODES:
                for beta in (1.0, 0.5, -2.0):
                    args = mode_args(mode, *ins)
                    kw = dict(beta=beta, p=0.25, seed=77, offset=0)
                    check_against_backends(out_dtype, *args, what=f"specials {in_dtype}->{out_dtype}", **kw)


def test_special_values_against_oracle():
    s = special_values()
    zero = torch.zeros_like(s)
    for out_dtype in DTYPES:
        # o = s + 1*0 exercises the output rounding alone; the rest mixes specials
        assert_same(
            run_triton(out_dtype, s, zero, None, beta=1.0),
            oracle(out_dtype, s, zero, None, None, beta=1.0),
            f"round {out_dtype}",
        )
        f, a, u, b = s, s.flip(0), s.roll(5), s.roll(11)
        kw = dict(beta=0.5, p=0.5, seed=3, offset=1)
        assert_same(
            run_triton(out_dtype, f, a, u, b, **kw), oracle(out_dtype, f, a, u, b, **kw), f"specials {out_dtype}"
        )


def test_bf16_nan_is_canonical():
    nan_bits = np.array([0x7F800001, 0xFFC00001, 0x7FFFFFFF, 0xFF800100], dtype=np.uint32)
    f = torch.from_numpy(nan_bits.view(np.float32))
    out = run_triton(BF16, f, torch.zeros(4), None, beta=1.0)
    assert out.view(torch.int16).tolist() == [0x7FC0] * 4


def test_writes_exactly_the_chunk():
    n, pad = 1_001, 9
    f, a, u, b = make_inputs(n, [BF16] * 4, gen_seed=8)
    want = run_backend(ref, BF16, f, a, u, b, beta=0.5, p=0.3, seed=4, offset=5)
    # an odd storage offset: safetensors mmaps only promise 2-byte alignment
    buf = poisoned(n + 2 * pad, BF16, POISON["triton"], DEV)
    ins = []
    for t in (f, a, u, b):
        holder = torch.zeros(n + 1, dtype=BF16, device=DEV)
        holder[1:] = t.to(DEV)
        ins.append(holder[1:])
    tp.patch_into(buf[pad : pad + n], *ins, beta=0.5, p=0.3, seed=4, offset=5)
    assert_same(buf[pad : pad + n], want, "chunk")
    untouched = poisoned(pad, BF16, POISON["triton"])
    assert_same(buf[:pad], untouched, "before the chunk")
    assert_same(buf[pad + n :], untouched, "after the chunk")


def test_in_place_output():
    f, a, u, b = make_inputs(3_000, [BF16] * 4, gen_seed=9)
    kw = dict(beta=0.5, p=0.3, seed=4, offset=0)
    want = run_backend(ref, BF16, f, a, u, b, **kw)
    f_dev = f.to(DEV)
    tp.patch_into(f_dev, f_dev, a.to(DEV), u.to(DEV), b.to(DEV), **kw)
    assert_same(f_dev, want, "out aliasing f")


@pytest.mark.parametrize("seed", [0, 1, 2**31 + 5, 2**63 - 1, 2**63, 2**64 - 1])
def test_uniform_matches_rng(seed):
    for offset, n in ((0, 9), (2, 1), (2**31 - 1, 40), (2**32 - 3, 33), (2**44 + 1, 5)):
        assert_same(tp.uniform(seed, offset, n), rng.uniform(seed, offset, n), f"seed={seed} offset={offset}")
    assert tp.uniform(seed, 0, 0).numel() == 0


def test_uniform_against_oracle():
    seed = rng.tensor_seed(2024, "lm_head.weight")
    got = tp.uniform(seed, 2**32 - 7, 64).cpu()
    want = [elementwise.uniform_at(seed, 2**32 - 7 + i) for i in range(64)]
    assert_same(got, torch.tensor(np.array(want, dtype=np.float32)), "uniform vs elementwise")


@pytest.mark.parametrize("src", DTYPES, ids=str)
@pytest.mark.parametrize("dst", DTYPES, ids=str)
def test_convert_into(src, dst):
    x = torch.cat([special_values(), torch.randn(4_000) * 100]).to(src)
    want = poisoned(x.numel(), dst, POISON["ref"])
    ref.convert_into(want, x)
    got = poisoned(x.numel(), dst, POISON["triton"], DEV)
    tp.convert_into(got, x.to(DEV))
    assert_same(got, want, f"convert {src}->{dst}")
    if CPP is not None:
        other = poisoned(x.numel(), dst, POISON["ref"])
        CPP.convert_into(other, x)
        assert_same(got, other, f"triton vs cpp convert {src}->{dst}")


def test_rejects_bad_arguments():
    x = torch.zeros(8, device=DEV)
    with pytest.raises(ValueError, match="elements"):
        tp.patch_into(torch.zeros(7, device=DEV), x, x, beta=1.0)
    with pytest.raises(ValueError, match="contiguous"):
        tp.patch_into(x, torch.zeros(16, device=DEV)[::2], x, beta=1.0)
    with pytest.raises(TypeError, match="dtype"):
        tp.patch_into(x, x.double(), x, beta=1.0)
    with pytest.raises(ValueError, match="0 <= p < 1"):
        tp.patch_into(x, x, x, None, x, beta=1.0, p=1.0)
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        tp.patch_into(x, x, x, None, x, beta=1.0, p=0.5, seed=2**64)
    with pytest.raises(ValueError, match="offset"):
        tp.patch_into(x, x, x, None, x, beta=1.0, p=0.5, offset=-1)


def test_unavailable_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU, or TRITON_INTERPRET=1"):
        tp.check_available()
    with pytest.raises(BackendUnavailable):
        load_backend("triton")


def test_available_here():
    assert load_backend("triton") is not None


COMPILE_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(3)
from resta_fast.kernels import triton_patch as tp

bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
cuobjdump = os.path.join(bin_dir, "cuobjdump")
if not os.path.exists(os.path.join(bin_dir, "ptxas")):
    sys.exit(3)  # no CUDA toolchain bundled with this triton: nothing to check here

def count_ffma(kernel):
    if not os.path.exists(cuobjdump):
        return len(re.findall(r"\bfma\.rn", kernel.asm["ptx"]))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(kernel.asm["cubin"])
        fh.flush()
        sass = subprocess.run([cuobjdump, "-sass", fh.name], capture_output=True, text=True).stdout
    return len(re.findall(r"\bFFMA\b", sass))

def build(dtypes, has_u, has_b, shift, fusion):
    names = ["out_ptr", "f_ptr", "a_ptr", "u_ptr", "b_ptr"]
    sig = {k: "*" + d for k, d in zip(names, dtypes)}
    sig.update(n="i32", q0="i64", beta="fp32", p="fp32", r="fp32", seed="u64",
               HAS_U="constexpr", HAS_B="constexpr", SHIFT="constexpr", BLOCK="constexpr")
    consts = dict(HAS_U=has_u, HAS_B=has_b, SHIFT=shift, BLOCK=tp.BLOCK_SIZE)
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(6)}
    src = ASTSource(fn=tp._resta_patch_kernel, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=tp.NUM_WARPS, enable_fp_fusion=fusion))

result = {"variants": []}
for dtypes, (has_u, has_b), shift in [(("bf16",) * 5, (True, True), 0), (("fp16",) * 5, (False, True), 3),
                                      (("fp32", "bf16", "fp16", "fp32", "bf16"), (True, False), 0)]:
    k = build(dtypes, has_u, has_b, shift, False)
    result["variants"].append(dict(dtypes=dtypes, ffma=count_ffma(k),
                                   v4_loads=k.asm["ptx"].count("ld.global.v4")))
result["ffma_with_fusion"] = count_ffma(build(("bf16",) * 5, True, True, 0, True))
print(json.dumps(result))
"""


def test_compiles_for_hopper_without_fma():
    """Compile (no GPU needed) for sm_90: no fused multiply-adds, 16-byte loads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode == 3:
        pytest.skip("this triton install has no CUDA toolchain to compile with")
    assert proc.returncode == 0, f"compiling for sm_90 failed:\n{proc.stderr[-3000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ffma_with_fusion"] > 0, "the FMA check cannot see FMAs"
    for variant in result["variants"]:
        assert variant["ffma"] == 0, f"fp fusion not disabled: {variant}"
    bf16 = result["variants"][0]
    assert bf16["v4_loads"] >= 4, f"aligned bf16 loads are not 16-byte vectors: {bf16}"


@pytest.mark.gpu
def test_gpu_runs_compiled_kernel():
    assert not isinstance(tp._resta_patch_kernel, InterpretedFunction)


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("in_dtype", DTYPES, ids=str)
def test_gpu_large_random(in_dtype, out_dtype):
    n = 3 * 2**20 + 5
    f, a, u, b = make_inputs(n, [in_dtype] * 4, gen_seed=10)
    for mode in MODES:
        args = mode_args(mode, f, a, u, b)
        for offset in (0, 2**32 - 1):
            kw = dict(beta=0.5, p=0.3, seed=rng.tensor_seed(0, "w"), offset=offset)
            got = run_triton(out_dtype, *args, **kw)
            assert_same(got, run_backend(ref, out_dtype, *args, **kw), f"gpu {mode} offset={offset}")


@pytest.mark.gpu
def test_gpu_uniform_large():
    seed = 2**63 + 12345
    assert_same(tp.uniform(seed, 2**31 - 2, 2**22 + 3), rng.uniform(seed, 2**31 - 2, 2**22 + 3), "uniform")
