"""kernels/difference.py: V = round(fp32(A) − fp32(U)), the same bits on the C++ kernel and on torch."""

import numpy as np
import pytest
import torch

from resta_fast import api
from resta_fast.kernels.difference import _TorchDifference, difference_kernel

# bf16 bit patterns with the edges: ±0, ±inf, NaN, the smallest subnormal, the largest finite (whose
# difference overflows fp32), and ordinary values around 1.
EDGES = np.array([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x0001, 0x7F7F, 0xFF7F, 0x3F80, 0xBF80], np.uint16)


def _inputs(n: int = 4096):
    rng = np.random.default_rng(7)
    a = rng.integers(0, 0x10000, n, dtype=np.uint32).astype(np.uint16)
    u = rng.integers(0, 0x10000, n, dtype=np.uint32).astype(np.uint16)
    a[: EDGES.size * EDGES.size] = np.repeat(EDGES, EDGES.size)  # every edge against every edge
    u[: EDGES.size * EDGES.size] = np.tile(EDGES, EDGES.size)
    return a, u


@pytest.mark.parametrize("out_dtype", [np.float32, np.uint16], ids=["F32", "BF16"])
def test_cpp_and_torch_give_the_same_bits(out_dtype):
    backend, kernel = difference_kernel()
    if backend != "cpp":
        pytest.skip("the C++ kernel is not built")
    a, u = _inputs()
    fast = np.empty(a.size, out_dtype)
    kernel.patch_arrays(fast, None, a, u)
    ref = torch.empty(a.size, dtype=torch.float32 if out_dtype is np.float32 else torch.bfloat16)
    as_bf16 = [torch.from_numpy(x.view(np.int16)).view(torch.bfloat16) for x in (a, u)]
    _TorchDifference.patch_into(ref, None, *as_bf16)
    ref_bits = ref.view(torch.int32 if out_dtype is np.float32 else torch.int16).numpy()
    assert np.array_equal(fast.view(ref_bits.dtype), ref_bits)
    if out_dtype is np.float32:  # the edges were there: −0.0 − +0.0, inf − inf, max − (−max)
        assert np.signbit(fast[1 * EDGES.size]) and np.isnan(fast).any() and np.isinf(fast).any()


def test_without_the_cpp_kernel_it_is_torch(monkeypatch):
    from resta_fast.kernels import BackendUnavailable
    from resta_fast.kernels import difference as D

    def unavailable(name):
        raise BackendUnavailable("not built here")

    monkeypatch.setattr(D, "load_backend", unavailable)
    assert D.difference_kernel() == ("torch", _TorchDifference)


def test_api_still_exports_it():
    assert api.difference_kernel is difference_kernel
