"""Recompute a seeded random sample of output elements from the inputs and compare them bit for bit.

With the C++ kernel on numpy gathers (no torch) where it is built, else with the
torch reference arithmetic (``patch_at``: ``kernels.reference`` at scattered
elements). Which elements: ``sample_indices``; what they must hold: the plan's
rows (``plan.TensorPlan``) and docs/spec.md §2.

Example:
    >>> from resta_fast.plan import TensorPlan
    >>> rows = [TensorPlan("a", "patch", "", (2, 3), "BF16", "BF16"), TensorPlan("b", "copy", "", (4,), "F32", "F32")]
    >>> {name: len(idx) for name, idx in sample_indices(rows, 8, seed=0).items()}  # one each, the rest by size
    {'a': 4, 'b': 3}
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from resta_fast import rng
from resta_fast.io.checkpoint import Checkpoint
from resta_fast.io.reader import DTYPES, KERNEL_DTYPES, NUMPY_STORAGE
from resta_fast.verify.checks import Check

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

    from resta_fast.plan import TensorPlan


def uniform_at(seed: int, idx: torch.Tensor) -> torch.Tensor:
    """DARE uniforms of the flat elements ``idx`` (int64), equal to ``rng.uniform`` there."""
    import torch

    q = idx // 4
    zero = torch.zeros_like(q)
    words = torch.stack(rng.philox4x32(q & 0xFFFFFFFF, q >> 32, zero, zero, seed & 0xFFFFFFFF, seed >> 32), dim=1)
    w = words.gather(1, (idx % 4).unsqueeze(1)).squeeze(1)
    x = torch.where(w >= 2**31, w - 2**32, w)  # reinterpret as int32
    x = torch.where(x < 0, -x - 1, x)  # x = ~x for negative x
    return x.to(torch.float32) * torch.tensor(rng.UNIFORM_SCALE, dtype=torch.float32)


def patch_at(out, f, a, u, b, *, beta, p, seed, idx):
    """``kernels.reference.patch_into`` for the scattered elements ``idx``.

    The same separate, individually rounded fp32 ops in docs/spec.md §2 order; only the
    DARE stream is drawn at ``idx`` instead of a contiguous offset.
    """
    from resta_fast.kernels.reference import patch_values, store

    store(out, patch_values(f, a, u, b, beta=beta, p=p, uniforms=lambda: uniform_at(seed, idx)))


def sample_indices(plan_tensors, samples: int, seed: int) -> dict[str, np.ndarray]:
    """Seeded sample: at least one element per non-empty tensor, the rest by size (sorted int64)."""
    sizes = [(t.name, t.numel) for t in plan_tensors if t.numel > 0]
    if not sizes or samples <= 0:
        return {}
    gen = np.random.default_rng(seed)
    if samples < len(sizes):  # fewer samples than tensors: one element in each of a random few
        chosen = gen.choice(len(sizes), size=samples, replace=False)
        sizes = [sizes[i] for i in sorted(chosen)]
    total = sum(n for _, n in sizes)
    spare = samples - len(sizes)
    picked = {}
    for name, n in sizes:
        k = min(n, 1 + (spare * n) // total)
        idx = np.arange(n, dtype=np.int64) if k == n else np.sort(gen.choice(n, size=k, replace=False))
        picked[name] = idx.astype(np.int64)
    return picked


def _native_kernel():
    """The C++ kernel, to recompute samples without torch; None where it is not built."""
    from resta_fast.kernels import BackendUnavailable, load_backend

    try:
        return load_backend("cpp")
    except BackendUnavailable:
        return None


class _NativeRecompute:
    """Scattered elements with the C++ kernel on numpy gathers (no torch). It is
    bit-identical to the torch reference (tests/test_patch_kernels.py); with DARE
    each element is recomputed at its own offset, so it draws the stream there."""

    def __init__(self, cpp):
        self.cpp = cpp

    def patch(self, out, f, a, u, b, *, beta, p, seed, idx: np.ndarray) -> None:
        if b is None:  # no random stream: one call for every element
            self.cpp.patch_arrays(out, f, a, u, beta=beta)
            return
        for k, j in enumerate(idx.tolist()):
            self.cpp.patch_arrays(
                out[k : k + 1],
                f[k : k + 1],
                a[k : k + 1],
                None if u is None else u[k : k + 1],
                b[k : k + 1],
                beta=beta,
                p=p,
                seed=seed,
                offset=j,
            )

    def convert(self, out, x) -> None:
        self.cpp.convert_arrays(out, x)


class _TorchRecompute:
    """The same with the torch reference (``patch_at``), where the kernel is not built."""

    def patch(self, out, f, a, u, b, *, beta, p, seed, idx: np.ndarray) -> None:
        import torch

        from resta_fast.pipeline.compute import as_torch

        patch_at(
            as_torch(out),
            as_torch(f),
            as_torch(a),
            as_torch(u),
            as_torch(b),
            beta=beta,
            p=p,
            seed=seed,
            idx=torch.from_numpy(idx),
        )

    def convert(self, out, x) -> None:
        from resta_fast.kernels.reference import convert_into
        from resta_fast.pipeline.compute import as_torch

        convert_into(as_torch(out), as_torch(x))


def _expected(
    recompute, t: TensorPlan, idx: np.ndarray, ft, a_src, u_src, b_src, params: dict, command: str
) -> np.ndarray:
    """What the output tensor ``t`` must hold at ``idx``, as a host array of t.out_dtype."""
    want = np.empty(len(idx), dtype=NUMPY_STORAGE[t.out_dtype])
    patched = t.patched_elems if t.action == "patch" else 0
    head = idx < patched
    if head.any():
        i = idx[head]
        part = np.empty(len(i), dtype=want.dtype)
        if command == "vector":  # round(-0.0 + 1*(A - U)): exactly round(A - U)
            recompute.patch(
                part,
                np.full(len(i), -0.0, np.float32),
                a_src.array(t.name)[i],
                u_src.array(t.name)[i],
                None,
                beta=1.0,
                p=0.0,
                seed=0,
                idx=i,
            )
        else:
            dare = params.get("dare")
            seed = rng.tensor_seed(int(params.get("seed") or 0), t.seed_name or t.name) if dare is not None else 0
            recompute.patch(
                part,
                ft.array(t.name)[i],
                a_src.array(t.name)[i],
                None if u_src is None else u_src.array(t.name)[i],
                None if dare is None else b_src.array(t.name)[i],
                beta=t.beta,
                p=dare or 0.0,
                seed=seed,
                idx=i,
            )
        want[head] = part
    if not head.all():
        i = idx[~head]
        src = ft.array(t.name)[i]
        if t.in_dtype == t.out_dtype:
            want[~head] = src
        else:
            part = np.empty(len(i), dtype=want.dtype)
            recompute.convert(part, src)
            want[~head] = part
    return want


def _same(got: np.ndarray, want: np.ndarray, dtype: str) -> np.ndarray:
    """Elementwise bit equality of host arrays; NaN equals NaN for float dtypes."""
    width = DTYPES[dtype][1]
    bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[width]
    same = got.view(bits) == want.view(bits)
    if dtype in KERNEL_DTYPES:
        same |= _isnan(got, dtype) & _isnan(want, dtype)
    return same


def _isnan(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (x.view(np.uint16) & 0x7FFF) > 0x7F80
    return np.isnan(x)


def _shown(x: np.ndarray, dtype: str) -> float:
    """One host element as a number (BF16 bits widened to fp32)."""
    if dtype == "BF16":
        return float((x.astype(np.uint32) << 16).view(np.float32))
    return x.item()


def check_sample(
    out_ckpt: Checkpoint,
    plan_tensors: list[TensorPlan],
    ft,
    a_src,
    u_src,
    b_src,
    params: dict,
    command: str,
    samples: int,
    seed: int,
) -> Check:
    """The ``sample`` check: ``samples`` elements of ``out_ckpt`` (chosen by ``seed``) recomputed from
    the sources (fine-tune, aligned or vector, unaligned, DARE base; None where the output has none)."""
    c = Check("sample")
    picked = sample_indices(plan_tensors, samples, seed)
    by_name = {t.name: t for t in plan_tensors}
    cpp = _native_kernel()  # torch only where the C++ kernel is not built
    recompute = _NativeRecompute(cpp) if cpp is not None else _TorchRecompute()
    checked = bad = 0
    for name, idx in picked.items():
        t = by_name[name]
        if name not in out_ckpt:
            c.fail(f"{name}: missing from the output")
            continue
        info = out_ckpt.info(name)
        if info.dtype != t.out_dtype or info.shape != tuple(t.shape):
            c.fail(f"{name}: output is {info.dtype} {list(info.shape)}, expected {t.out_dtype} {list(t.shape)}")
            continue
        want = _expected(recompute, t, idx, ft, a_src, u_src, b_src, params, command)
        got = out_ckpt.array(name)[idx]
        wrong = np.flatnonzero(~_same(got, want, t.out_dtype))
        checked += len(idx)
        if len(wrong):
            bad += len(wrong)
            i = int(wrong[0])
            c.fail(
                f"{name}: {len(wrong)} of {len(idx)} sampled elements differ, e.g. element "
                f"{int(idx[i])}: output {_shown(got[i], t.out_dtype)!r}, "
                f"expected {_shown(want[i], t.out_dtype)!r}"
            )
    c.detail = (
        f"{checked} elements in {len(picked)} tensors match bit for bit (seed {seed})"
        if c.ok
        else f"{bad} of {checked} sampled elements differ"
    )
    return c
