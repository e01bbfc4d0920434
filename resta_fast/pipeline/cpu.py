"""The CPU streaming pipeline: mmap'd inputs -> fused kernel -> pwrite.

Tensors are processed in output-file order in chunks of ``chunk_elems``
elements; the kernel writes a chunk into a pooled buffer while the writer
thread pwrites the previous one (compute and disk overlap), and input pages
are released after use so peak RSS is the pool plus a fixed overhead,
whatever the model size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from resta_fast import rng
from resta_fast.io.checkpoint import Checkpoint
from resta_fast.io.reader import DTYPES
from resta_fast.io.writer import TensorFileWriter
from resta_fast.pipeline.stream import StagedWriter, WriteJob, new_hasher
from resta_fast.plan import Plan, TensorPlan

# 4M elements = 16 MB per fp32 buffer: large enough that per-chunk Python and
# thread-handoff overhead is < 1% of the kernel time, small enough that two
# buffers stay far below the RSS budget.
DEFAULT_CHUNK_ELEMS = 4 * 1024 * 1024


@dataclass
class Inputs:
    finetuned: Checkpoint
    aligned: Checkpoint | None = None
    unaligned: Checkpoint | None = None
    vector: Checkpoint | None = None
    dare_base: Checkpoint | None = None

    def all(self) -> list[Checkpoint]:
        return [c for c in (self.finetuned, self.aligned, self.unaligned, self.vector, self.dare_base)
                if c is not None]


@dataclass
class RunStats:
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    nonfinite: dict[str, int] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)


class _Source:
    """One input tensor as a flat view, with read-ahead and page release.

    Works with anything shaped like a Checkpoint: ``info(name)``,
    ``tensor_view(name)``, ``prefetch(name, byte_lo, byte_hi)``,
    ``release(name, byte_lo, byte_hi)`` (LoRA fine-tunes merge in memory and
    implement the last two as no-ops).
    """

    def __init__(self, ckpt, name: str):
        self.ckpt = ckpt
        self.name = name
        self.info = ckpt.info(name)
        self.view = ckpt.tensor_view(name)
        self.itemsize = self.view.element_size()

    def prefetch(self, lo, hi):
        self.ckpt.prefetch(self.name, lo * self.itemsize, hi * self.itemsize)

    def release(self, lo, hi):
        self.ckpt.release(self.name, lo * self.itemsize, hi * self.itemsize)


def _chunks(n: int, size: int):
    for lo in range(0, n, size):
        yield lo, min(n, lo + size)


def run_plan(plan: Plan, inputs: Inputs, out_dir, *, kernel, beta: float, dare: float | None,
             seed: int, metadata: dict[str, str], threads: int | None = None,
             chunk_elems: int = DEFAULT_CHUNK_ELEMS, progress=None) -> RunStats:
    """Write every output file of ``plan`` into ``out_dir``.

    Args:
        kernel: a backend module (``patch_into``/``convert_into``).
        dare: DARE drop probability, or None for plain RESTA.
        progress: optional callable(bytes_done, tensor_name) for progress bars.
    Returns:
        RunStats with bytes moved, per-file sha256 and non-finite counts.
    """
    stats = RunStats()
    start = time.perf_counter()
    writer = StagedWriter(n_buffers=2, buffer_bytes=chunk_elems * 4)
    open_files: list[TensorFileWriter] = []
    try:
        for ofile in plan.files:
            tensors = [(t.name, t.out_dtype, t.shape) for t in ofile.tensors]
            out = TensorFileWriter(out_dir / ofile.name, tensors, metadata)
            open_files.append(out)
            hasher = new_hasher()
            hasher.update(out.header)
            for t in ofile.tensors:
                _write_tensor(t, inputs, out, writer, hasher, kernel, dare, seed, threads,
                              chunk_elems, stats)
                if progress is not None:
                    progress(t.numel * DTYPES[t.out_dtype][1], t.name)
            writer.drain()
            for ck in inputs.all():
                ck.check_unchanged()
            open_files.remove(out)
            out.close(fsync=False)
            stats.sha256[ofile.name] = hasher.hexdigest()
            stats.bytes_written += out.size
    finally:
        writer.close()  # first: no write may still target a file we close below
        for out in open_files:
            out.close(fsync=False)
    stats.seconds = time.perf_counter() - start
    return stats


def _write_tensor(t: TensorPlan, inputs: Inputs, out: TensorFileWriter, writer: StagedWriter,
                  hasher, kernel, dare, seed, threads, chunk_elems, stats: RunStats) -> None:
    f = _Source(inputs.finetuned, t.name)
    dst_start, _ = out.offsets[t.name]
    out_itemsize = DTYPES[t.out_dtype][1]
    out_torch = DTYPES[t.out_dtype][0]
    n = t.numel
    patched = t.patched_elems if t.action == "patch" else 0
    if patched:
        a = _Source(inputs.vector or inputs.aligned, t.name)
        u = _Source(inputs.unaligned, t.name) if inputs.vector is None else None
        b = _Source(inputs.dare_base, t.name) if dare is not None else None
        srcs = [s for s in (f, a, u, b) if s is not None]
        tensor_seed = rng.tensor_seed(seed, t.seed_name or t.name) if dare is not None else 0
        for lo, hi in _chunks(patched, chunk_elems):
            for s in srcs:
                s.prefetch(hi, min(patched, hi + chunk_elems))
            buf = writer.acquire()
            try:
                dst = buf[: (hi - lo) * out_itemsize].view(out_torch)
                bad = kernel.patch_into(dst, f.view[lo:hi], a.view[lo:hi],
                                  None if u is None else u.view[lo:hi],
                                  None if b is None else b.view[lo:hi],
                                  beta=t.beta, p=dare or 0.0, seed=tensor_seed, offset=lo,
                                  threads=threads)
                if bad is None:  # backends that do not count in-kernel
                    bad = _count_nonfinite(dst)
            except BaseException:
                writer.give_back(buf)
                raise
            if bad:
                stats.nonfinite[t.name] = stats.nonfinite.get(t.name, 0) + bad
            for s in srcs:
                s.release(lo, hi)
            stats.bytes_read += sum((hi - lo) * s.itemsize for s in srcs)
            writer.submit(WriteJob(out.fd, dst_start + lo * out_itemsize, _bytes(dst), out.path, buf,
                                   hasher=hasher))
    # Unpatched elements (whole copied tensors, or extra vocabulary rows).
    if patched < n:
        if t.in_dtype == t.out_dtype:
            raw = f.view.view(torch.uint8)
            step = writer.buffer_bytes
            for lo in range(patched * f.itemsize, n * f.itemsize, step):
                hi = min(n * f.itemsize, lo + step)
                f.ckpt.prefetch(t.name, hi, hi + step)
                writer.submit(WriteJob(out.fd, dst_start + lo, _bytes(raw[lo:hi]), out.path, None,
                                       on_done=_releaser(f.ckpt, t.name, lo, hi), hasher=hasher))
                stats.bytes_read += hi - lo
        else:
            for lo, hi in _chunks(n - patched, chunk_elems):
                lo, hi = lo + patched, hi + patched
                buf = writer.acquire()
                dst = buf[: (hi - lo) * out_itemsize].view(out_torch)
                kernel.convert_into(dst, f.view[lo:hi])
                f.release(lo, hi)
                stats.bytes_read += (hi - lo) * f.itemsize
                writer.submit(WriteJob(out.fd, dst_start + lo * out_itemsize, _bytes(dst), out.path,
                                       buf, hasher=hasher))


def _releaser(ckpt, name, lo, hi):
    return lambda: ckpt.release(name, lo, hi)


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).numpy())


def _count_nonfinite(x: torch.Tensor) -> int:
    if x.numel() == 0:
        return 0
    # One fp32-accumulated sum is finite for almost every chunk, and is 2x
    # cheaper than isfinite(); only a non-finite (or overflowing) sum pays for
    # the exact count.
    if bool(torch.isfinite(x.sum(dtype=torch.float32))):
        return 0
    finite = torch.isfinite(x)
    return 0 if bool(finite.all()) else int((~finite).sum())
