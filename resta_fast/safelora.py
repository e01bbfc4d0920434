"""Safe LoRA (Hsu et al., NeurIPS 2024): project a LoRA update onto the alignment direction.

For every LoRA module on a weight W, V = W_aligned − W_unaligned is what
alignment changed in that weight, and Safe LoRA's projection is
C = V·Vᵀ / ‖V‖_F. A module whose projected update B' = C·B points away from
its own update, cos(vec(B'·A), vec(B·A)) ≤ T (rounded to 5 decimals as in the
authors' code, IBM/SafeLoRA), gets lora_B := B'. ``--num-layers K`` sets T to
the K-th smallest cosine (then ≤ T, so ties may project more, as published).

C is d_out × d_out (485 MB in fp32 for one 7B up_proj) and is never formed:
C·B = V·(Vᵀ·B) / ‖V‖_F costs O(d_out·d_in·r), and the cosine follows from r × r
Gram matrices, ⟨X·A, Y·A⟩_F = Σ (Xᵀ·Y) ⊙ (A·Aᵀ), with no d_out × d_in product.
Modules are scored one at a time, and the next module's weights are prefetched
while the current one is scored. With the C++ kernel V is never stored: each of
the two products re-forms it from the 2-byte inputs in cache-sized pieces
(``native_projection``); without it, V is formed by torch and multiplied by
numpy's BLAS. The C++ path never imports torch for an adapter output: its import
alone took longer than reading a 1.2B model here (docs/benchmarks.md, Safe LoRA).

Example:
    >>> import torch
    >>> v, b, a = torch.eye(3)[:, :2], torch.ones(3, 1), torch.ones(1, 2)
    >>> round(lora_cosine(a, b, projected_b(v, b)), 5)
    0.8165
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from resta_fast import spec as S
from resta_fast.errors import OptionError, RestaError
from resta_fast.io.names import prefix_mapping
from resta_fast.kernels.difference import difference_kernel
from resta_fast.spec import Option, Spec

if TYPE_CHECKING:
    import torch

    from resta_fast.io.checkpoint import Checkpoint
    from resta_fast.lora import LoraFinetuned, LoraModule

DEFAULT_THRESHOLD = 0.5  # the paper's default
COS_DECIMALS = 5  # the authors round each cosine to 5 decimals before comparing
# V is formed and multiplied by B this many elements at a time (whole rows), so the
# chunk is still in cache for the product and the norm: 256 rows of a 4800 × 1792
# weight took 8.6 ms for V and Vᵀ·B against 11 ms in two whole-weight passes (2 cores).
CHUNK_ELEMS = 1 << 19
# The C++ products read the weights this many bytes (of each input) at a time and drop the pages
# after: RSS then holds a chunk, not a weight, at the cost of faulting the pages in again in the
# second pass.
CHUNK_BYTES = 8 << 20
FAULT_AROUND = 1 << 21  # bytes a page fault may map around itself: a large folio of the page cache (Linux 6.x)
NORM_RUN = 1 << 15  # ‖V‖_F: fp32 dot products of runs this long, summed in fp64 (see frobenius)


def _is_numpy(x) -> bool:
    return isinstance(x, np.ndarray)


def _numpy(x) -> np.ndarray:
    """An fp32 numpy view of a CPU torch tensor or array (torch stays unimported for arrays)."""
    return x if _is_numpy(x) else x.detach().numpy()


def _like(x, out: np.ndarray):
    """``out`` as the kind of ``x`` (torch tensors in, torch tensors out)."""
    if _is_numpy(x):
        return out
    import torch

    return torch.from_numpy(out)


def projected_b(v, b):
    """C·B = V·(Vᵀ·B) / ‖V‖_F in fp32, without forming C; None when V = 0.

    Args:
        v: V in the LoRA update's layout (d_out × d_in), fp32 (torch tensor or numpy array).
        b: lora_B (d_out × r), fp32.
    Returns:
        B' of the inputs' kind, or None.
    """
    vn, bn = _numpy(v), _numpy(b)
    norm = frobenius(vn)
    if norm == 0:
        return None  # alignment did not touch this weight: there is no direction to project onto
    out = vn @ (vn.T @ bn)
    out /= np.float32(norm)
    return _like(v, out)


def _sumsq(flat: np.ndarray, run: int = NORM_RUN) -> float:
    """Σ x² of a contiguous fp32 array: BLAS dot products of ``run``-element runs, summed in fp64."""
    return math.fsum(float(np.dot(flat[lo : lo + run], flat[lo : lo + run])) for lo in range(0, flat.size, run))


def frobenius(v, block: int = NORM_RUN) -> float:
    """‖V‖_F: fp32 sums of squares of ``block``-element runs, summed in fp64.

    An fp32 norm of a whole 11008 × 4096 weight is 0.32% low (fp32 accumulation
    over 45M squares), which alone would put B' 3e-3 from the fp64 value
    (benchmarks/bench_safelora.py module); over 32k elements the error is ~1e-8
    (numpy's dot; measured against fp64 on 512k Gaussian values).
    """
    vn = _numpy(v)
    flat = (vn if vn.flags.c_contiguous else vn.T).reshape(-1)  # a transposed view (Conv1D) without a copy
    return math.sqrt(_sumsq(np.ascontiguousarray(flat, dtype=np.float32), block))


def lora_cosine(a, b, b_proj) -> float:
    """cos(vec(B'·A), vec(B·A)) from r × r Gram matrices (computed in fp64; not rounded).

    A zero update (an untrained lora_B) has cosine 0, as torch's
    ``cosine_similarity`` gives it.
    """
    a64 = _numpy(a).astype(np.float64)
    gram = a64 @ a64.T
    p64, b64 = _numpy(b_proj).astype(np.float64), _numpy(b).astype(np.float64)

    def inner(x, y) -> float:
        return float(((x.T @ y) * gram).sum())

    denom = math.sqrt(max(inner(p64, p64), 0.0) * max(inner(b64, b64), 0.0))
    return 0.0 if denom == 0 else max(-1.0, min(1.0, inner(p64, b64) / denom))


def round_cos(cos: float) -> float:
    """The authors' ``numpy.round(cos, 5)`` (round half to even on the scaled value)."""
    return float(np.round(cos, COS_DECIMALS))


@dataclass
class ModuleScore:
    """One LoRA module's Safe LoRA cosine and whether it is projected."""

    module: str  # module name in the adapter
    target: str  # the weight it updates, in the aligned model
    lora_a: str  # adapter keys
    lora_b: str
    shape: list[int]  # the update's d_out × d_in
    rank: int
    cos: float | None  # rounded; None when V = 0 (never projected)
    projected: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def linear_modules(view: LoraFinetuned) -> list[LoraModule]:
    """The adapter's LoRA modules in the model's tensor order (each once: a tied
    mirror is the same module); embedding and bias LoRA are refused."""
    seen, mods = set(), []
    for name in view.location:
        mod = view.modules.get(name)
        if mod is None or mod.b in seen:
            continue
        if mod.kind != "linear":
            what = "lora_bias" if mod.kind == "bias" else "an embedding LoRA (lora_embedding_A/B)"
            raise RestaError(
                f"{view.adapter.path}: module {mod.module!r} is {what}; Safe LoRA projects "
                "linear LoRA layers only. Retrain without it, or use `resta-fast patch` on the "
                "adapter (RESTA)"
            )
        seen.add(mod.b)
        mods.append(mod)
    if not mods:
        raise RestaError(
            f"{view.adapter.path}: the adapter has no LoRA layers (only full tensors); Safe LoRA has nothing to project"
        )
    return mods


def _counterparts(targets: list[str], unaligned: Checkpoint, view: LoraFinetuned) -> dict[str, str]:
    """Aligned tensor name -> the unaligned model's name for it (same name, or another prefix)."""
    missing = [t for t in targets if t not in unaligned]
    mapping = prefix_mapping(missing, unaligned.location) if missing else {}
    names = {t: t if t in unaligned else mapping.get(t) for t in targets}
    absent = [t for t, u in names.items() if u is None]
    if absent:
        raise RestaError(
            f"unaligned {unaligned.path}: has no {absent[0]} (nor {len(absent) - 1} other LoRA "
            f"target(s) of {view.adapter.path}); pass the model --aligned was aligned from"
        )
    return names


def alignment_delta(
    aligned: Checkpoint, unaligned: Checkpoint, name: str, name_u: str, shape, kernel=None
) -> torch.Tensor:
    """V = fp32(W_aligned) − fp32(W_unaligned) for one weight, in a fresh buffer (the
    inputs' mappings are never written), with their pages released after.

    ``kernel``: ``kernels.difference.difference_kernel()``'s C++ kernel (4x faster than torch
    here, the same bits: docs/spec.md §2 with β = 1); None computes it with torch.
    """
    import numpy as np
    import torch

    _check_pair(aligned, unaligned, name, name_u)
    if kernel is not None:
        out = np.empty(math.prod(shape), np.float32)
        kernel.patch_arrays(out, None, aligned.array(name), unaligned.array(name_u))
        v = torch.from_numpy(out).view(shape)
    else:
        v = torch.empty(shape, dtype=torch.float32)
        v.copy_(aligned.tensor_view(name).view(shape))
        v.sub_(unaligned.tensor_view(name_u).view(shape))
    aligned.release(name, 0, aligned.info(name).nbytes)
    unaligned.release(name_u, 0, unaligned.info(name_u).nbytes)
    return v


class Workspace:
    """The fp32 V buffer, reused by every module (grown to the largest).

    A fresh buffer per module cost more than the arithmetic on it here: first
    touch of new memory is slow in this VM (``np.empty`` per module: 10-100 ms
    for a 4800 × 1792 V against 5 ms into a reused one). Memory stays bounded by
    the largest targeted weight, whatever the model's size.
    """

    def __init__(self):
        self._v = np.empty(0, np.float32)

    def vector(self, n: int) -> np.ndarray:
        if self._v.size < n:
            self._v = np.empty(0, np.float32)  # drop the old one first: peak is one buffer
            self._v = np.empty(n, np.float32)
        return self._v[:n]


def lora_array(view: LoraFinetuned, key: str) -> np.ndarray:
    """An adapter tensor (or its replacement) in fp32, in its stored shape, without torch.

    The same values as ``LoraFinetuned.lora_tensor`` (bf16 and fp16 widen exactly)."""
    if key in view.replacements:
        return _numpy(view.lora_tensor(key))
    f = view.adapter.file
    info = f.tensors[key]
    raw = f.array(key)
    if info.dtype == "BF16":  # stored as uint16 bits: bf16 is the high half of an fp32
        out = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        out = raw.astype(np.float32)
    # out is a copy: drop the mapped pages, or RSS grows with the adapter (77 MB of it at 1.2B, r = 16).
    # With a margin: a fault maps the whole page-cache folio it lands in, which re-maps the end of the
    # tensor read before this one (a 64 KiB margin still left 23 MB mapped at 1.2B, 2 MiB none).
    lo = max(0, info.start - FAULT_AROUND)
    f.release(lo, info.start + info.nbytes + FAULT_AROUND - lo)
    return out.reshape(info.shape)


class Spill:
    """Arrays kept in an unlinked temporary file, read back on demand: the B' of every module
    stays available to every selection without RSS growing with the adapter (38 MB at 1.2B).

    Example:
        >>> with Spill() as kept:
        ...     kept["b"] = np.arange(3, dtype=np.float32)
        ...     kept["b"].tolist(), "b" in kept, len(kept)
        ([0.0, 1.0, 2.0], True, 1)
    """

    def __init__(self):
        import tempfile

        self._file = tempfile.TemporaryFile(prefix="resta-fast-")
        self._where: dict[str, tuple[int, np.dtype, tuple]] = {}
        self._end = 0

    def __setitem__(self, key: str, arr: np.ndarray) -> None:
        data = np.ascontiguousarray(arr)
        raw, done = memoryview(data.reshape(-1).view(np.uint8)), 0
        while done < data.nbytes:
            done += os.pwrite(self._file.fileno(), raw[done:], self._end + done)
        self._where[key] = (self._end, data.dtype, data.shape)
        self._end += data.nbytes

    def __getitem__(self, key: str) -> np.ndarray:
        offset, dtype, shape = self._where[key]
        out = np.empty(shape, dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        got = 0
        while got < out.nbytes:
            n = os.preadv(self._file.fileno(), [view[got:]], offset + got)
            if n <= 0:
                raise RestaError(f"the temporary file of Safe LoRA's projections ended early ({key})")
            got += n
        return out

    def __contains__(self, key) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def module_projection(fill, shape, transpose: bool, b: np.ndarray, work: Workspace) -> np.ndarray | None:
    """B' = V·(Vᵀ·B)/‖V‖_F for one module, V formed ``CHUNK_ELEMS`` at a time by ``fill``.

    Args:
        fill: ``fill(lo, hi, out)`` writes elements [lo, hi) of V, flat in the stored
            weight's layout, into the fp32 array ``out``.
        shape: the stored weight's shape; ``transpose``: it is (B·A)ᵀ (GPT-2 Conv1D).
        b: lora_B (d_out × r), fp32.
    Returns:
        B' (d_out × r, fp32), or None when V = 0.

    Each chunk of V is scored while it is in cache: its squares (for ‖V‖_F) and its
    share of X = Vᵀ·B; one more pass over the whole V gives V·X.
    """
    rows, cols = shape
    v = work.vector(rows * cols).reshape(rows, cols)
    step = max(1, CHUNK_ELEMS // max(cols, 1))
    # Stored S = V: X = Σ S_cᵀ·B_c over row chunks. Stored S = Vᵀ (Conv1D): X = S·B, row chunk by row chunk.
    x = np.empty((rows, b.shape[1]), np.float32) if transpose else np.zeros((cols, b.shape[1]), np.float64)
    sumsq = 0.0
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        chunk = v[lo:hi]
        fill(lo * cols, hi * cols, chunk.reshape(-1))
        sumsq += _sumsq(chunk.reshape(-1))
        if transpose:
            np.matmul(chunk, b, out=x[lo:hi])
        else:
            x += (b[lo:hi].T @ chunk).T  # BᵀV's layout is the faster product here (4.5 vs 5.4 ms)
    norm = math.sqrt(sumsq)
    if norm == 0:
        return None  # alignment did not touch this weight: there is no direction to project onto
    x = x.astype(np.float32, copy=False)
    out = v.T @ x if transpose else v @ x
    out /= np.float32(norm)
    return out


def native_projection(kernel, a_arr, u_arr, shape, transpose: bool, b: np.ndarray, release=None) -> np.ndarray | None:
    """B' = V·(Vᵀ·B)/‖V‖_F for one module by the C++ kernel, V never stored.

    Args:
        kernel: ``difference_kernel()``'s C++ kernel.
        a_arr, u_arr: the stored weights' flat arrays; ``shape`` their shape, (B·A)ᵀ's
            with ``transpose`` (GPT-2 Conv1D).
        b: lora_B (d_out × r), fp32.
        release: ``release(lo, hi)`` is called once rows [lo, hi) of the stored weights
            have been read by a pass (to drop their pages).
    Returns:
        B' (d_out × r, fp32), or None when V = 0.

    Each pass re-forms V = fp32(A) − fp32(U) from the 2-byte inputs a few rows at a time
    (cheaper than writing and reading back a 4-byte V); the first also sums V². The rows
    go in chunks of about ``CHUNK_BYTES`` so RSS holds a chunk, not a weight; the second
    pass takes them last to first and starts on what the first left in the L3 cache.
    """
    rows, cols = shape
    r = b.shape[1]
    block = kernel.projection_flush_rows()  # chunks of whole blocks: the bits of one call over all rows
    step = max(block, CHUNK_BYTES // max(1, cols * max(a_arr.itemsize, u_arr.itemsize)) // block * block)
    chunks = [(lo, min(rows, lo + step)) for lo in range(0, rows, step)]

    def rows_of(lo, hi):
        return a_arr[lo * cols : hi * cols], u_arr[lo * cols : hi * cols], hi - lo, cols

    def done(lo, hi, backwards):
        # The first pass keeps its last chunk mapped: the second starts there. Dropping it made the
        # second pass fault it straight back in (all of a one-chunk weight).
        if release is not None and (backwards or hi < rows):
            release(lo, hi)

    def over_rows(m, backwards: bool, sumsq: bool = False):
        """Sᵀ·m (m: rows × r), summed chunk by chunk into one fp64 accumulator."""
        acc, total = kernel.projection_acc(cols, r), 0.0
        for lo, hi in reversed(chunks) if backwards else chunks:
            _, sq = kernel.diff_matmul(
                *rows_of(lo, hi), m[lo:hi], transpose=True, sumsq=sumsq, reverse=backwards, acc=acc
            )
            total += sq
            done(lo, hi, backwards)
        return kernel.projection_out(acc, r), total

    def by_rows(m, backwards: bool, sumsq: bool = False):
        """S·m (m: cols × r), each chunk's rows on their own."""
        out, total = np.empty((rows, r), np.float32), 0.0
        for lo, hi in reversed(chunks) if backwards else chunks:
            out[lo:hi], sq = kernel.diff_matmul(*rows_of(lo, hi), m, transpose=False, sumsq=sumsq, reverse=backwards)
            total += sq
            done(lo, hi, backwards)
        return out, total

    # Stored S = V: X = Sᵀ·B, B' = S·X. Stored S = Vᵀ (Conv1D): X = S·B, B' = Sᵀ·X.
    first, second = (by_rows, over_rows) if transpose else (over_rows, by_rows)
    x, sumsq = first(b, backwards=False, sumsq=True)
    if sumsq == 0:
        return None  # alignment did not touch this weight: there is no direction to project onto
    out, _ = second(x, backwards=True)
    out /= np.float32(math.sqrt(sumsq))
    return out


def _check_pair(aligned: Checkpoint, unaligned: Checkpoint, name: str, name_u: str) -> None:
    a_info, u_info = aligned.info(name), unaligned.info(name_u)
    if tuple(u_info.shape) != tuple(a_info.shape):
        raise RestaError(
            f"{name}: aligned {aligned.path} has shape {list(a_info.shape)} but unaligned "
            f"{unaligned.path} has {list(u_info.shape)} ({name_u}); they must be the same "
            "architecture"
        )


def score_modules(view: LoraFinetuned, unaligned: Checkpoint, *, on_module=None):
    """Score every LoRA module of ``view`` (an adapter read on the aligned model).

    Yields (ModuleScore, B' as a d_out × r fp32 numpy array, or None), one module at
    a time; ``on_module`` is called after each (progress). With the C++ kernel no
    torch is imported.
    """
    aligned = view.base
    mods = linear_modules(view)
    counterpart = _counterparts([m.target for m in mods], unaligned, view)
    backend, kernel = difference_kernel()
    kernel = kernel if backend == "cpp" else None
    work = Workspace()

    def prefetch(mod: LoraModule) -> None:
        # The kernel reads the next module's pages from disk while this one is multiplied.
        aligned.prefetch(mod.target, 0, aligned.info(mod.target).nbytes)
        name_u = counterpart[mod.target]
        unaligned.prefetch(name_u, 0, unaligned.info(name_u).nbytes)

    for i, mod in enumerate(mods):
        name, name_u = mod.target, counterpart[mod.target]
        _check_pair(aligned, unaligned, name, name_u)
        if i + 1 < len(mods):
            prefetch(mods[i + 1])
        a, b = lora_array(view, mod.a), lora_array(view, mod.b)
        w_shape = tuple(aligned.info(name).shape)
        if kernel is not None:
            a_arr, u_arr = aligned.array(name), unaligned.array(name_u)

            def release(lo, hi, name=name, name_u=name_u, a_arr=a_arr, u_arr=u_arr, cols=w_shape[1]):
                # No margin: what a neighbour chunk's faults re-map (a folio at most) goes with the
                # whole-weight release below; a margin here cost as much again in page-table walks.
                for ck, key, size in ((aligned, name, a_arr.itemsize), (unaligned, name_u, u_arr.itemsize)):
                    ck.release(key, lo * cols * size, hi * cols * size)

            b_proj = native_projection(kernel, a_arr, u_arr, w_shape, mod.transpose, b, release)
        else:
            whole = alignment_delta(aligned, unaligned, name, name_u, w_shape).numpy().reshape(-1)

            def fill(lo, hi, out, whole=whole):
                out[:] = whole[lo:hi]

            b_proj = module_projection(fill, w_shape, mod.transpose, b, work)
        aligned.release(name, 0, aligned.info(name).nbytes)
        unaligned.release(name_u, 0, unaligned.info(name_u).nbytes)
        cos = None if b_proj is None else round_cos(lora_cosine(a, b, b_proj))
        score = ModuleScore(mod.module, mod.target, mod.a, mod.b, [b.shape[0], a.shape[1]], a.shape[0], cos)
        yield score, b_proj
        if on_module is not None:
            on_module()


def check_selection(threshold: float | None, num_layers: int | None) -> None:
    """Exactly one of threshold (in [-1, 1]) and num_layers (>= 1); each value by its option's check."""
    if (threshold is None) == (num_layers is None):
        raise OptionError("threshold", "give exactly one of {threshold} T and {num_layers} K")
    SAFELORA.get("threshold").run_check(threshold)
    SAFELORA.get("num_layers").run_check(num_layers)


def select(scores: list[ModuleScore], *, threshold: float | None = None, num_layers: int | None = None) -> float:
    """Mark the modules to project (cos ≤ T) and return T.

    ``num_layers`` K: T is the K-th smallest cosine, as in the authors' code.
    Modules without a cosine (V = 0) are never projected.

    Example:
        >>> s = [ModuleScore("m", "w", "a", "b", [2, 2], 1, c) for c in (0.9, 0.2, 0.4)]
        >>> select(s, num_layers=2), [x.projected for x in s]
        (0.4, [False, True, True])
    """
    check_selection(threshold, num_layers)
    if num_layers is not None:
        defined = sorted(s.cos for s in scores if s.cos is not None)
        if num_layers > len(defined):
            unset = len(scores) - len(defined)
            why = f" ({unset} of them unchanged by alignment, V = 0)" if unset else ""
            raise OptionError(
                "num_layers",
                "{num_layers} {k} is more than the {n} LoRA module(s) that can be projected" + why,
                k=num_layers,
                n=len(defined),
            )
        threshold = defined[num_layers - 1]
    for s in scores:
        s.projected = s.cos is not None and s.cos <= threshold
    return threshold


# Both adapter methods write an adapter, or with this the full model.
MERGE = Option(
    "merge",
    False,
    "write the full merged model instead of an adapter (base + the realigned update)",
    kind=bool,
    record=bool,
)

# The options of `safelora` (flags, API keywords, params, the card's command): written once, here.
SAFELORA = Spec(
    "safelora",
    (
        Option(
            "threshold",
            None,
            "project modules with cos <= T (paper: 0.5)",
            check=S.cosine("threshold", optional=True),
            kind=float,
            metavar="T",
            record=S.as_given,
        ),
        Option(
            "num_layers",
            None,
            "project the K modules with the lowest cos",
            check=S.count("num_layers"),
            kind=int,
            metavar="K",
            record=S.as_given,
        ),
        MERGE,
    ),
)
