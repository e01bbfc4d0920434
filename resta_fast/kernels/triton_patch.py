"""Triton backend: the docs/spec.md §2 fused patch as one elementwise GPU kernel.

Runs on a CUDA device, or on CPU tensors through Triton's interpreter when
``TRITON_INTERPRET=1`` is set before this module is imported (slow; for tests).
Results are bit-identical to ``resta_fast.kernels.reference``: every docs/spec.md §2 line is
one rounded fp32 op, fp fusion is disabled at launch, bf16 is rounded with
integer ops, and the DARE stream is ``tl.randint4x`` with int64 counters.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from resta_fast.kernels import BackendUnavailable

try:
    import triton
    import triton.language as tl
except ImportError as _exc:  # the package must import without triton
    triton = None
    tl = None
    _IMPORT_ERROR: Exception | None = _exc
else:
    _IMPORT_ERROR = None

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# GPU launch shape, measured on an H200 (benchmarks/gpu_check.py, 2026-11-28;
# benchmarks/results/gpu_check_h200.log): over BLOCK 1024-8192 x num_warps 4/8/16,
# on 2^28 bf16 elements, every shape but three ran at 1.00-1.07x a torch device-to-device
# copy of the same bytes (~4.1 TB/s), plain and DARE alike; the best (2048/4
# plain 1.07x, 1024/4 DARE 1.06x) beat 4096/8 (1.05x / 1.02x) by 2-4% in one
# sweep (one run each, not repeated), and the three to avoid were 1024/16 (0.63-0.85x) and 8192/4
# DARE (0.88x). 4096/8 is kept: 16 elements per thread, two 16-byte vectors per
# bf16 input, and fp32/fp16/vector mode measured 1.03-1.04x copy with it too.
BLOCK_SIZE = 4096
NUM_WARPS = 8
# The interpreter pays per program and per op in Python, not per element: a big
# block keeps a 1M-element test to a handful of programs. Results do not depend
# on the block size (tests check both).
INTERPRET_BLOCK_SIZE = 1 << 16


def interpreting() -> bool:
    """Whether Triton runs through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_available() -> None:
    """Raise BackendUnavailable unless triton imports and can run here."""
    if _IMPORT_ERROR is not None:
        raise BackendUnavailable(
            f"the triton backend needs the triton package ({_IMPORT_ERROR}); "
            "install it with `pip install resta-fast[triton]`"
        )
    if not interpreting() and not torch.cuda.is_available():
        raise BackendUnavailable(
            "the triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 in the "
            "environment to run through the (slow) interpreter"
        )


if triton is not None:

    @triton.jit
    def _load_f32(ptr, idx, mask):
        """Load and widen to fp32 (exact for every input dtype)."""
        x = tl.load(ptr + idx, mask=mask, other=0.0)
        if ptr.dtype.element_ty == tl.bfloat16:
            # Widen with integer ops: the interpreter's bf16 -> fp32 cast
            # mis-converts bf16 subnormals; a 16-bit shift is exact everywhere.
            return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        return x.to(tl.float32)

    @triton.jit
    def _store_rounded(out_ptr, idx, o, mask):
        """Round fp32 ``o`` to out_ptr's dtype (docs/spec.md §2) and store it."""
        if out_ptr.dtype.element_ty == tl.bfloat16:
            # Integer RNE: the interpreter truncates a float cast to bf16, and the
            # GPU cast would not canonicalise NaN payloads to 0x7FC0.
            bits = o.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            rounded = tl.where(o != o, 0x7FC0, rounded)
            tl.store(out_ptr + idx, rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        elif out_ptr.dtype.element_ty == tl.float16:
            # cvt.rn on the GPU, numpy's astype (also RNE) in the interpreter.
            tl.store(out_ptr + idx, o.to(tl.float16), mask=mask)
        else:
            tl.store(out_ptr + idx, o, mask=mask)

    @triton.jit(do_not_specialize=["q0", "seed"])
    def _resta_patch_kernel(
        out_ptr,
        f_ptr,
        a_ptr,
        u_ptr,
        b_ptr,
        n,
        q0,
        beta,
        p,
        r,
        seed,
        HAS_U: tl.constexpr,
        HAS_B: tl.constexpr,
        SHIFT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One BLOCK of docs/spec.md §2. Lane j of program k is chunk element k*BLOCK + j - SHIFT.

        With DARE, SHIFT = offset % 4 lines every group of four lanes up with one
        Philox counter q = q0 + k*BLOCK/4 + j/4, so each counter is computed once
        and its four words go to its four elements. Without DARE, SHIFT is 0.
        SHIFT is a constexpr so the usual SHIFT=0 launch has no lower-bound mask
        and provably aligned, vectorisable loads.
        """
        pid = tl.program_id(0).to(tl.int64)
        idx = pid * BLOCK + tl.arange(0, BLOCK) - SHIFT
        mask = idx < n
        if SHIFT > 0:
            mask = mask & (idx >= 0)
        f = _load_f32(f_ptr, idx, mask)
        a = _load_f32(a_ptr, idx, mask)
        if HAS_U:
            u = _load_f32(u_ptr, idx, mask)
            t2 = beta * (a - u)
        else:
            t2 = beta * a
        if HAS_B:
            base = _load_f32(b_ptr, idx, mask)
            d = f - base
            q = q0 + pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
            w0, w1, w2, w3 = tl.randint4x(seed, q)
            # interleave(interleave(w0, w2), interleave(w1, w3)) = w0,w1,w2,w3 per counter
            words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
            keep = tl.uint_to_uniform_float(words) >= p
            t1 = tl.where(keep, d * r, 0.0)
            o = (base + t1) + t2
        else:
            o = f + t2
        _store_rounded(out_ptr, idx, o, mask)

    @triton.jit(do_not_specialize=["q0", "seed"])
    def _uniform_kernel(out_ptr, n, q0, seed, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
        """The DARE uniforms alone, laid out exactly as in _resta_patch_kernel."""
        pid = tl.program_id(0).to(tl.int64)
        idx = pid * BLOCK + tl.arange(0, BLOCK) - SHIFT
        mask = (idx >= 0) & (idx < n)
        q = q0 + pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
        w0, w1, w2, w3 = tl.randint4x(seed, q)
        words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
        tl.store(out_ptr + idx, tl.uint_to_uniform_float(words), mask=mask)

    @triton.jit
    def _convert_kernel(out_ptr, x_ptr, n, BLOCK: tl.constexpr):
        """out = round(float32(x)) with docs/spec.md §2's rounding."""
        pid = tl.program_id(0).to(tl.int64)
        idx = pid * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        x = _load_f32(x_ptr, idx, mask)
        _store_rounded(out_ptr, idx, x, mask)


def _launch_shape(block: int | None, num_warps: int | None) -> tuple[int, int]:
    """The (BLOCK, num_warps) to launch with: the caller's, else the defaults."""
    if block is None:
        block = INTERPRET_BLOCK_SIZE if interpreting() else BLOCK_SIZE
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    return block, NUM_WARPS if num_warps is None else num_warps


def _check_tensors(out: torch.Tensor, **inputs: torch.Tensor | None) -> None:
    """Validate dtype, layout, length and device of ``out`` and each given input."""
    check_available()
    tensors = {"out": out, **{k: v for k, v in inputs.items() if v is not None}}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; the triton backend supports bf16, fp16 and fp32")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (pass a flat chunk, e.g. t.reshape(-1))")
        if t.numel() != out.numel():
            raise ValueError(f"{name} has {t.numel()} elements but out has {out.numel()}; all must match")
        if t.device != out.device:
            raise ValueError(f"{name} is on {t.device} but out is on {out.device}; all must be on one device")
    if out.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"the triton backend needs CUDA tensors, got {out.device} (CPU tensors work only with TRITON_INTERPRET=1)"
        )


def _on_device(t: torch.Tensor):
    """Make ``t``'s GPU current: Triton launches on the current device, not the tensor's."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _check_stream_args(seed: int, offset: int) -> None:
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be an unsigned 64-bit integer, got {seed}")
    if not 0 <= int(offset) < 2**62:
        raise ValueError(f"offset must be a non-negative element index below 2**62, got {offset}")


def patch_into(out, f, a, u=None, b=None, *, beta, p=0.0, seed=0, offset=0, threads=None, block=None, num_warps=None):
    """Fused RESTA patch of one flat chunk on the GPU (docs/spec.md §2), written into ``out``.

    Args:
        out: output chunk (bf16/fp16/fp32), written completely.
        f, a: fine-tuned and aligned chunks; with ``u=None``, ``a`` is the safety vector V.
        u: unaligned chunk, or None (vector mode).
        b: DARE base chunk, or None (no DARE).
        beta: scale β (rounded to fp32).
        p: DARE drop probability, 0 <= p < 1 (as fp32).
        seed: the mixed per-tensor seed ``rng.tensor_seed(...)``, an unsigned 64-bit int.
        offset: flat index of element 0 of this chunk within its tensor.
        threads: ignored (the GPU picks its own parallelism).
        block, num_warps: launch shape override for benchmarks; results do not depend on it.

    Example:
        >>> patch_into(out, f, a, u, beta=0.5)  # doctest: +SKIP
    """
    del threads
    _check_tensors(out, f=f, a=a, u=u, b=b)
    _check_stream_args(seed, offset)
    n = out.numel()
    if n == 0:
        return
    block, num_warps = _launch_shape(block, num_warps)
    beta32 = float(np.float32(beta))
    if b is None:
        shift, q0, p32, r32, seed = 0, 0, 0.0, 1.0, 0
    else:
        p_f32 = np.float32(p)
        if not 0.0 <= p_f32 < 1.0:
            raise ValueError(f"DARE drop probability p must satisfy 0 <= p < 1 in fp32, got {p}")
        # r is fixed on the host so every backend scales survivors by the same fp32 value.
        r32 = float(np.float32(1) / (np.float32(1) - p_f32))
        p32 = float(p_f32)
        shift, q0 = int(offset) % 4, int(offset) // 4
    grid = (triton.cdiv(n + shift, block),)
    with _on_device(out):
        _resta_patch_kernel[grid](
            out,
            f,
            a,
            f if u is None else u,
            f if b is None else b,
            n,
            q0,
            beta32,
            p32,
            r32,
            int(seed),
            HAS_U=u is not None,
            HAS_B=b is not None,
            SHIFT=shift,
            BLOCK=block,
            num_warps=num_warps,
            enable_fp_fusion=False,
        )


def convert_into(out: torch.Tensor, x: torch.Tensor) -> None:
    """Copy ``x`` into ``out`` converting dtype with docs/spec.md §2's rounding.

    Example:
        >>> convert_into(torch.empty(4, dtype=torch.bfloat16, device="cuda"), x)  # doctest: +SKIP
    """
    _check_tensors(out, x=x)
    if out.dtype == x.dtype:
        out.copy_(x)
        return
    n = out.numel()
    if n == 0:
        return
    block, num_warps = _launch_shape(None, None)
    with _on_device(out):
        _convert_kernel[(triton.cdiv(n, block),)](out, x, n, BLOCK=block, num_warps=num_warps, enable_fp_fusion=False)


def uniform(seed: int, offset: int, n: int, *, device: str | torch.device | None = None) -> torch.Tensor:
    """DARE uniforms for elements offset .. offset+n-1, as the kernel draws them (float32).

    ``device`` defaults to CUDA, or CPU under the interpreter.

    Example:
        >>> uniform(rng.tensor_seed(0, "w"), 0, 4)  # doctest: +SKIP
    """
    check_available()
    _check_stream_args(seed, offset)
    if device is None:
        device = "cpu" if interpreting() else "cuda"
    out = torch.empty(n, dtype=torch.float32, device=device)
    if n == 0:
        return out
    block, num_warps = _launch_shape(None, None)
    shift = int(offset) % 4
    with _on_device(out):
        _uniform_kernel[(triton.cdiv(n + shift, block),)](
            out, n, int(offset) // 4, int(seed), SHIFT=shift, BLOCK=block, num_warps=num_warps
        )
    return out
