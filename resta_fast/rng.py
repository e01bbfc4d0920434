"""Per-tensor seeds and the DARE random stream (docs/spec.md §3).

The stream is Philox4x32-10 exactly as Triton's ``tl.randint4x``: key = the
per-tensor seed split into two 32-bit words, counter = (q_lo, q_hi, 0, 0) with
q = i // 4, and element ``i`` takes word ``i % 4``. Every backend reproduces it,
so a mask depends only on (seed, tensor name, element index).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

MASK64 = (1 << 64) - 1
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
# Triton's uint_to_uniform_float scale: the largest float32 below 2**-31.
UNIFORM_SCALE = 4.6566127342e-10


def fnv1a64(data: bytes) -> int:
    """64-bit FNV-1a hash of ``data``."""
    h = FNV_OFFSET
    for byte in data:
        h ^= byte
        h = (h * FNV_PRIME) & MASK64
    return h


def splitmix64(x: int) -> int:
    """One step of splitmix64 (the finaliser used to mix seed and name)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    z = x
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def tensor_seed(seed: int, tensor_name: str) -> int:
    """Per-tensor DARE seed s_t = splitmix64(seed ^ fnv1a64(utf8(name))).

    Example:
        >>> hex(tensor_seed(0, "model.embed_tokens.weight"))  # doctest: +SKIP
    """
    if not 0 <= seed <= MASK64:
        raise ValueError(f"seed must be an unsigned 64-bit integer, got {seed}")
    return splitmix64((seed ^ fnv1a64(tensor_name.encode("utf-8"))) & MASK64)


def _mulhilo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * b for int64 tensors holding uint32 values.

    int64 cannot hold the full 64-bit product, so b is split into 16-bit halves:
    a*b = (a*b_hi) * 2**16 + a*b_lo, each partial product below 2**48.
    """
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_lo = a * b_lo
    t = a * b_hi + (p_lo >> 16)
    lo = ((t & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return t >> 16, lo


def philox4x32(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on int64 tensors holding uint32 counter words."""
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & 0xFFFFFFFF
        k1 = (k1 + PHILOX_W1) & 0xFFFFFFFF
    return c0, c1, c2, c3


def random_words(seed: int, offset: int, n: int) -> torch.Tensor:
    """The raw uint32 words (as int64) for elements offset .. offset+n-1."""
    import torch  # the reference stream is torch ops; the seeds above need none

    if n == 0:
        return torch.empty(0, dtype=torch.int64)
    first_q, last_q = offset // 4, (offset + n - 1) // 4
    q = torch.arange(first_q, last_q + 1, dtype=torch.int64)
    zero = torch.zeros_like(q)
    words = philox4x32(q & 0xFFFFFFFF, q >> 32, zero, zero, seed & 0xFFFFFFFF, seed >> 32)
    flat = torch.stack(words, dim=1).reshape(-1)
    start = offset - first_q * 4
    return flat[start : start + n]


def uniform(seed: int, offset: int, n: int) -> torch.Tensor:
    """DARE uniforms in [0, 1) for elements offset .. offset+n-1 (float32).

    Example:
        >>> uniform(tensor_seed(0, "w"), 0, 4).shape
        torch.Size([4])
    """
    import torch

    words = random_words(seed, offset, n)
    x = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as int32
    x = torch.where(x < 0, -x - 1, x)  # x = ~x for negative x
    return x.to(torch.float32) * torch.tensor(UNIFORM_SCALE, dtype=torch.float32)
