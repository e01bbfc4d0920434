"""Native CPU backend: the fused C++ kernel ``resta_fast._C`` (csrc/patch.cpp).

Same contract as every backend (see ``resta_fast.kernels``): flat, contiguous
CPU tensors of bf16/fp16/fp32 in any mix, bit-identical to the torch reference.
The extension is imported lazily, so this module always imports; a missing or
broken build surfaces as ``BackendUnavailable`` carrying the original error.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

import numpy as np

from resta_fast.kernels import BackendUnavailable

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch

_MASK64 = (1 << 64) - 1
_native = None


def _load():
    """The ``resta_fast._C`` module, or BackendUnavailable chained to the ImportError."""
    global _native
    if _native is None:
        try:
            _C = importlib.import_module("resta_fast._C")
        except ImportError as exc:
            # Not built at all (RESTA_FAST_BUILD_EXT=0, a failed build) vs built but broken.
            if isinstance(exc, ModuleNotFoundError) and exc.name == "resta_fast._C":
                hint = (
                    "build it with `python setup.py build_ext --inplace` or reinstall with "
                    "`pip install -e .` (with RESTA_FAST_BUILD_EXT unset or 1)"
                )
            else:
                hint = "it is installed but failed to import; fix the cause above or rebuild it"
            raise BackendUnavailable(
                f"native extension resta_fast._C did not load ({type(exc).__name__}: {exc}); {hint}"
            ) from exc
        _native = _C
    return _native


def check_available() -> None:
    """Raise BackendUnavailable (with the original ImportError chained) if _C is missing."""
    _load()


def _dtype_code(C, name: str, tensor: torch.Tensor) -> int:
    import torch  # the torch-facing entry points only; the engine uses patch_arrays

    codes = {torch.bfloat16: C.DTYPE_BF16, torch.float16: C.DTYPE_F16, torch.float32: C.DTYPE_F32}
    code = codes.get(tensor.dtype)
    if code is None:
        raise TypeError(f"{name} has dtype {tensor.dtype}; expected torch.bfloat16, torch.float16 or torch.float32")
    return code


def _check_tensor(name: str, tensor: torch.Tensor, numel: int) -> None:
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} is on {tensor.device}; the cpp backend needs CPU tensors")
    if not tensor.is_contiguous():
        raise ValueError(
            f"{name} is not contiguous (strides {tuple(tensor.stride())}); pass tensor.contiguous() or a flat view"
        )
    if tensor.numel() != numel:
        raise ValueError(
            f"{name} has {tensor.numel()} elements but out has {numel}; "
            "all tensors of one call must have the same length"
        )


def _threads(threads: int | None) -> int | None:
    if threads is not None and (not isinstance(threads, int) or threads < 0):
        raise ValueError(f"threads must be None or an int >= 0, got {threads!r}")
    return threads


def patch_into(out, f, a, u=None, b=None, *, beta, p=0.0, seed=0, offset=0, threads=None) -> int:
    """Fused patch of one chunk into ``out`` (docs/spec.md §2); see ``resta_fast.kernels``.

    Args:
        out: output tensor, written in full; may be ``f`` itself (same dtype).
        f, a, u, b: fine-tuned, aligned, unaligned (None: ``a`` is the vector V)
            and DARE base (None: no DARE).
        beta: scale of the safety vector. p: DARE drop probability, 0 <= p < 1.
        seed: per-tensor seed (``rng.tensor_seed``). offset: flat index of this
            chunk's element 0 in the whole tensor. threads: None = OpenMP default.

    Returns:
        How many outputs are inf or NaN (counted in the kernel, for the report).

    Example:
        >>> patch_into(out, f, a, u, beta=0.5)  # doctest: +SKIP
    """
    import torch

    C = _load()
    n = out.numel() if isinstance(out, torch.Tensor) else 0
    arrays = {}
    for name, tensor in {"out": out, "f": f, "a": a, "u": u, "b": b}.items():
        if tensor is None and name in ("u", "b"):
            continue
        _check_tensor(name, tensor, n)
        _dtype_code(C, name, tensor)
        arrays[name] = _as_array(tensor)
    return patch_arrays(
        arrays["out"],
        arrays["f"],
        arrays["a"],
        arrays.get("u"),
        arrays.get("b"),
        beta=beta,
        p=p,
        seed=seed,
        offset=offset,
        threads=threads,
    )


def _as_array(tensor) -> np.ndarray:
    """A zero-copy numpy view of a checked CPU tensor (bf16 as its uint16 bits)."""
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


# The engine's host arrays: numpy has no bfloat16, so BF16 travels as its uint16 bits.
_NUMPY_CODES = {np.dtype(np.uint16): "DTYPE_BF16", np.dtype(np.float16): "DTYPE_F16", np.dtype(np.float32): "DTYPE_F32"}


def _array_code(C, name: str, arr, numel: int) -> int:
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(arr).__name__}")
    code = _NUMPY_CODES.get(arr.dtype)
    if code is None:
        raise TypeError(f"{name} has dtype {arr.dtype}; expected uint16 (bf16 bits), float16 or float32")
    if arr.ndim != 1 or not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be a flat contiguous array (shape {arr.shape})")
    if arr.size != numel:
        raise ValueError(
            f"{name} has {arr.size} elements but out has {numel}; all arrays of one call must have the same length"
        )
    return getattr(C, code)


def patch_arrays(out, f, a, u=None, b=None, *, beta, p=0.0, seed=0, offset=0, threads=None) -> int:
    """``patch_into`` over flat numpy arrays (BF16 as uint16 bits): the engine's host path, no torch.

    Example:
        >>> x = np.zeros(4, np.float32)
        >>> patch_arrays(x, x, np.ones(4, np.float32), beta=0.5), x.tolist()  # doctest: +SKIP
        (0, [0.5, 0.5, 0.5, 0.5])
    """
    C = _load()
    n = out.size if isinstance(out, np.ndarray) else 0
    codes = {
        name: _array_code(C, name, arr, n)
        for name, arr in (("out", out), ("f", f), ("a", a), ("u", u), ("b", b))
        if arr is not None
    }
    p32 = np.float32(p)
    if not (np.float32(0) <= p32 < np.float32(1)):
        raise ValueError(f"p must satisfy 0 <= p < 1 (as float32), got {p!r}")
    r = np.float32(1) / (np.float32(1) - p32)  # docs/spec.md §2: computed once, in fp32, on the host
    if not 0 <= seed <= _MASK64:
        raise ValueError(f"seed must be an unsigned 64-bit integer, got {seed}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    return C.patch(
        out.ctypes.data,
        codes["out"],
        f.ctypes.data,
        codes["f"],
        a.ctypes.data,
        codes["a"],
        0 if u is None else u.ctypes.data,
        codes.get("u", 0),
        0 if b is None else b.ctypes.data,
        codes.get("b", 0),
        n,
        float(beta),
        float(p32),
        float(r),
        int(seed),
        int(offset),
        _threads(threads),
    )


def projection_acc(cols: int, r: int) -> np.ndarray:
    """A zeroed fp64 accumulator for ``diff_matmul(..., transpose=True, acc=...)`` (r padded to its lanes)."""
    return np.zeros((cols, _load().projection_rank(r)), np.float64)


def diff_matmul(
    a, u, rows: int, cols: int, m, *, transpose: bool, sumsq: bool = False, reverse=False, acc=None, threads=None
):
    """S·m, or Sᵀ·m with ``transpose``, for S = fp32(a) − fp32(u) formed on the fly (no torch).

    Args:
        a, u: flat arrays of rows × cols elements (BF16 as uint16 bits), S row-major.
        m: fp32, cols × r (rows × r with ``transpose``).
        sumsq: also return Σ S² (fp64), else 0.0.
        reverse: visit the rows last to first, so a second pass over S starts on what the
            first left in cache (its sums over rows then run in that order).
        acc: with ``transpose``, a ``projection_acc`` to add the sums into instead of
            returning them: calls over consecutive row ranges of whole
            ``PROJECTION_FLUSH_ROWS`` blocks give the bits of one call (``projection_out``).
    Returns:
        (out, Σ S²): out is fp32, rows × r (cols × r with ``transpose``); None with ``acc``.

    Example:
        >>> s, zero, m = np.array([3, 0, 0, 4], np.float32), np.zeros(4, np.float32), np.ones((2, 1), np.float32)
        >>> diff_matmul(s, zero, 2, 2, m, transpose=False, sumsq=True)  # doctest: +SKIP
        (array([[3.], [4.]], dtype=float32), 25.0)
    """
    C = _load()
    n = rows * cols
    codes = {name: _array_code(C, name, arr, n) for name, arr in (("a", a), ("u", u))}
    m = np.ascontiguousarray(m, dtype=np.float32)
    want = rows if transpose else cols
    if m.ndim != 2 or m.shape[0] != want or m.shape[1] < 1:
        raise ValueError(f"m must be {want} × r with r >= 1 for a {rows} × {cols} S, got shape {m.shape}")
    if acc is not None:
        if not transpose:
            raise ValueError("acc needs transpose=True: only Sᵀ·m sums over rows")
        if acc.dtype != np.float64 or acc.shape != (cols, C.projection_rank(m.shape[1])) or not acc.flags.c_contiguous:
            raise ValueError(f"acc must be projection_acc({cols}, {m.shape[1]}), got {acc.dtype} {acc.shape}")
    out = np.empty((cols if transpose else rows, m.shape[1]), np.float32) if acc is None else None
    total = C.diff_matmul(
        a.ctypes.data,
        codes["a"],
        u.ctypes.data,
        codes["u"],
        rows,
        cols,
        m.ctypes.data,
        m.shape[1],
        0 if out is None else out.ctypes.data,
        transpose,
        sumsq,
        reverse,
        0 if acc is None else acc.ctypes.data,
        _threads(threads),
    )
    return out, total


def projection_out(acc: np.ndarray, r: int) -> np.ndarray:
    """A ``projection_acc``'s sums as the fp32 cols × r result one ``diff_matmul`` call returns."""
    return acc[:, :r].astype(np.float32)


def projection_flush_rows() -> int:
    """Rows of S per fp32 block of Sᵀ·m: row ranges for ``acc`` calls start at multiples of it."""
    return _load().PROJECTION_FLUSH_ROWS


def convert_arrays(out, x, *, threads: int | None = None) -> None:
    """``convert_into`` over flat numpy arrays (BF16 as uint16 bits)."""
    C = _load()
    n = out.size if isinstance(out, np.ndarray) else 0
    C.convert(
        out.ctypes.data, _array_code(C, "out", out, n), x.ctypes.data, _array_code(C, "x", x, n), n, _threads(threads)
    )


def convert_into(out: torch.Tensor, x: torch.Tensor, *, threads: int | None = None) -> None:
    """Copy ``x`` into ``out`` converting dtype with docs/spec.md §2's rounding.

    Example:
        >>> convert_into(torch.empty(3, dtype=torch.bfloat16), torch.ones(3))  # doctest: +SKIP
    """
    import torch

    C = _load()
    n = out.numel() if isinstance(out, torch.Tensor) else 0
    _check_tensor("out", out, n)
    _check_tensor("x", x, n)
    _dtype_code(C, "out", out)
    _dtype_code(C, "x", x)
    convert_arrays(_as_array(out), _as_array(x), threads=threads)


def uniform(seed: int, offset: int, n: int) -> torch.Tensor:
    """The native DARE uniforms of elements offset .. offset+n-1 (float32, docs/spec.md §3).

    Equal bit for bit to ``resta_fast.rng.uniform``.

    Example:
        >>> uniform(7, 0, 4).shape  # doctest: +SKIP
        torch.Size([4])
    """
    if not 0 <= seed <= _MASK64:
        raise ValueError(f"seed must be an unsigned 64-bit integer, got {seed}")
    import torch

    return torch.from_numpy(_load().uniform(seed, offset, n))


def build_info() -> dict:
    """For ``env``: chosen kernel variant, supported variants, OpenMP threads, compiler."""
    C = _load()
    info = dict(C.cpu_features())
    info["module"] = C.__file__
    return info
