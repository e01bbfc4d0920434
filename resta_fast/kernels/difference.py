"""The difference kernel: V = round(fp32(A) − fp32(U)), the safety vector's arithmetic.

``make_vector`` writes V through the engine with it, and Safe LoRA computes each
module's V with it; both want the C++ kernel when it is built (no torch, about
4x faster than torch here) and fall back to torch otherwise, with the same
bits (docs/spec.md §2 with β = 1). It lives with the kernels, below both users,
so a method's math never has to import the patching API to get its arithmetic.

Example:
    >>> difference_kernel()[0] in ("cpp", "torch")
    True
"""

from __future__ import annotations

import numpy as np

from resta_fast.kernels import BackendUnavailable, load_backend


class _TorchDifference:
    """Kernel adapter for make_vector: out = round(fp32(A) − fp32(U)), F unused."""

    @staticmethod
    def patch_into(out, f, a, u=None, b=None, **_):
        from resta_fast.kernels.reference import store

        store(out, a.float() - u.float())

    @staticmethod
    def convert_into(out, x):
        raise AssertionError("make_vector copies no tensors")


class _CppDifference:
    """make_vector on the C++ kernel (no torch): docs/spec.md §2 with β = 1 and F = −0.0,
    i.e. round(−0.0 + 1·(A − U)); 1·x and −0.0 + x are x for every x (−0.0 and NaN
    included), so the bits equal ``_TorchDifference``'s."""

    def __init__(self, cpp):
        self.cpp = cpp
        self._neg_zero = np.zeros(0, np.float32)

    def patch_arrays(self, out, f, a, u=None, b=None, *, threads=None, **_):
        if self._neg_zero.size < out.size:
            self._neg_zero = np.full(out.size, -0.0, np.float32)
        return self.cpp.patch_arrays(out, self._neg_zero[: out.size], a, u, beta=1.0, threads=threads)

    def convert_arrays(self, out, x, **_):
        raise AssertionError("make_vector copies no tensors")

    def diff_matmul(self, a, u, rows, cols, m, **kw):
        """Safe LoRA's products over S = A − U, S formed on the fly with these bits (kernels.cpp)."""
        return self.cpp.diff_matmul(a, u, rows, cols, m, **kw)

    def __getattr__(self, name):  # projection_acc, projection_out, projection_flush_rows
        if name.startswith("projection_"):
            return getattr(self.cpp, name)
        raise AttributeError(name)


def difference_kernel() -> tuple[str, object]:
    """(name, kernel) computing round(fp32(A) − fp32(U)): the C++ kernel when built, else torch."""
    try:
        return "cpp", _CppDifference(load_backend("cpp"))
    except BackendUnavailable:
        return "torch", _TorchDifference
