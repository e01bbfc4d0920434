"""Torch reference backend: docs/spec.md §2 in separate, individually rounded fp32 ops.

This is the oracle the native and Triton kernels are tested against, and the
fallback backend when neither loads. No ``alpha=``/``addcmul``: each line of
docs/spec.md §2 is one torch op so nothing can be fused.
"""

from __future__ import annotations

import torch

from resta_fast import rng

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def round_to_bf16_bits(o: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 by integer round-to-nearest-even; NaN -> 0x7FC0 (as int16)."""
    bits = o.view(torch.int32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)  # int32 wraps like uint32 here
    high = rounded.view(torch.int16)[1::2]  # little-endian: the upper half-word
    return torch.where(torch.isnan(o), torch.tensor(0x7FC0, dtype=torch.int16), high)


def store(out: torch.Tensor, o: torch.Tensor) -> None:
    """Round fp32 ``o`` to ``out``'s dtype (docs/spec.md §2) and write it."""
    if out.dtype == torch.bfloat16:
        out.view(torch.int16).copy_(round_to_bf16_bits(o))
    else:
        out.copy_(o)  # fp32: identity; fp16: IEEE round-to-nearest-even


def patch_values(f, a, u, b, *, beta, p, uniforms) -> torch.Tensor:
    """docs/spec.md §2 in fp32 for whatever elements the inputs hold.

    ``uniforms`` (the DARE stream at those elements) is only called when ``b``
    is given: a callable returning a float32 tensor, so callers choose where
    the elements are (a contiguous chunk here, scattered samples in verify).
    """
    beta32 = torch.tensor(beta, dtype=torch.float32)
    if u is None:
        t2 = beta32 * a.float()
    else:
        t2 = beta32 * (a.float() - u.float())
    if b is None:
        return f.float() + t2
    one = torch.tensor(1.0, dtype=torch.float32)
    p32 = torch.tensor(p, dtype=torch.float32)
    r = one / (one - p32)
    base = b.float()
    d = f.float() - base
    keep = uniforms() >= p32
    t1 = torch.where(keep, d * r, torch.zeros((), dtype=torch.float32))
    return (base + t1) + t2


def patch_into(out, f, a, u=None, b=None, *, beta, p=0.0, seed=0, offset=0, threads=None):
    """Reference fused patch of one chunk; see ``resta_fast.kernels.patch_into``."""
    del threads  # torch picks its own; results do not depend on it
    store(out, patch_values(f, a, u, b, beta=beta, p=p, uniforms=lambda: rng.uniform(seed, offset, f.numel())))


def convert_into(out: torch.Tensor, x: torch.Tensor) -> None:
    """Copy ``x`` into ``out`` converting dtype with docs/spec.md §2's rounding."""
    if out.dtype == x.dtype:
        out.copy_(x)
    else:
        store(out, x.float())
