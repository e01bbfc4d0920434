"""An independent, element-by-element docs/spec.md §2–3 reference for tests.

Pure Python integers and numpy float32 scalars, one element at a time, sharing
no code with the package: the oracle the torch, C++ and Triton backends must
match bit for bit. Slow by design; use on small tensors.
"""

import numpy as np

M32 = 0xFFFFFFFF


def philox(counter, key):
    """Philox4x32-10 on Python ints (Random123's reference formulation)."""
    c = list(counter)
    k0, k1 = key
    for _ in range(10):
        p0 = 0xD2511F53 * c[0]
        p1 = 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c[3] ^ k1) & M32, p0 & M32]
        k0 = (k0 + 0x9E3779B9) & M32
        k1 = (k1 + 0xBB67AE85) & M32
    return c


def uniform_at(seed, i):
    """The DARE uniform of flat element i (docs/spec.md §3)."""
    q = i // 4
    word = philox((q & M32, q >> 32, 0, 0), (seed & M32, seed >> 32))[i % 4]
    x = word - (1 << 32) if word >= (1 << 31) else word
    if x < 0:
        x = ~x
    return np.float32(x) * np.float32(4.6566127342e-10)


def to_f32(value_bits, dtype):
    """Decode one stored element (given as its raw integer bits) to float32."""
    if dtype == "bf16":
        return np.array([value_bits << 16], dtype=np.uint32).view(np.float32)[0]
    if dtype == "f16":
        return np.float32(np.array([value_bits], dtype=np.uint16).view(np.float16)[0])
    return np.array([value_bits], dtype=np.uint32).view(np.float32)[0]


def from_f32(o, dtype):
    """Round float32 ``o`` to the output dtype's raw integer bits (docs/spec.md §2)."""
    bits = int(np.array([o], dtype=np.float32).view(np.uint32)[0])
    if dtype == "bf16":
        if np.isnan(o):
            return 0x7FC0
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    if dtype == "f16":
        return int(np.array([np.float16(o)]).view(np.uint16)[0])
    return bits


def patch_element(f, a, u, b, beta, p, seed, i, out_dtype):
    """docs/spec.md §2 for one element. f/a/u/b are float32 (u/b may be None)."""
    beta = np.float32(beta)
    t2 = beta * (a - u) if u is not None else beta * a
    if b is None:
        o = f + t2
    else:
        p = np.float32(p)
        r = np.float32(1) / (np.float32(1) - p)
        d = f - b
        keep = uniform_at(seed, i) >= p
        t1 = d * r if keep else np.float32(0.0)
        o = (b + t1) + t2
    return from_f32(o, out_dtype)
