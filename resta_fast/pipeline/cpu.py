"""The CPU streaming pipeline: mmap'd inputs -> fused kernel -> pwrite.

Tensors are processed in output-file order in chunks of ``chunk_elems``
elements; the kernel writes a chunk into a pooled buffer while the writer
thread pwrites the previous one (compute and disk overlap), and input pages
are released after use so peak RSS is the pool plus a fixed overhead,
whatever the model size.

``run_fused`` is the batch form: several jobs that share the aligned/unaligned
pair (or vector) are written in one pass, reading each shared chunk once and
running every job's kernel on it while it is still in cache.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from resta_fast import rng
from resta_fast.io.checkpoint import Checkpoint
from resta_fast.io.reader import DTYPES
from resta_fast.io.writer import TensorFileWriter
from resta_fast.pipeline.interrupt import raise_if_interrupted
from resta_fast.pipeline.job import Inputs, RunStats
from resta_fast.pipeline.stream import FileHasher, StagedWriter, WriteJob, new_hasher
from resta_fast.plan import Plan, TensorPlan

# 4M elements = 16 MB per fp32 buffer: large enough that per-chunk Python and
# thread-handoff overhead is < 1% of the kernel time, small enough that two
# buffers stay far below the RSS budget.
DEFAULT_CHUNK_ELEMS = 4 * 1024 * 1024
# How write_files hashes its outputs: "follow" (a FileHasher thread per file,
# re-reading from the page cache) or "inline" (the StagedWriter's hasher thread
# hashes each buffer before it is reused). benchmarks/bench_hash_modes.py compares them.
HASH_MODE = "follow"


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
        file_of = getattr(ckpt, "file_of", None)  # virtual (LoRA-merged) inputs have no file
        self.file = file_of(name) if file_of is not None else None

    def check(self):
        """Raise CheckpointError if the input file was truncated or replaced.

        Called before each chunk is read: touching a page of a truncated mmap
        kills the process with SIGBUS, so this narrows that window to one chunk.
        A truncation inside that window still ends the run with SIGBUS; like a
        SIGKILL it leaves only a temp dir, which the next run removes.
        """
        if self.file is not None:
            self.file.check_unchanged()

    def prefetch(self, lo, hi):
        self.ckpt.prefetch(self.name, lo * self.itemsize, hi * self.itemsize)

    def release(self, lo, hi):
        self.ckpt.release(self.name, lo * self.itemsize, hi * self.itemsize)


def patch_sources(f: _Source, inputs: Inputs, t: TensorPlan, dare, seed):
    """The other operands of a patched tensor: (a, u, b, all sources, DARE seed).

    ``a`` is the vector in vector mode (then ``u`` is None); ``b`` is the DARE
    base or None; the seed is the tensor's mixed DARE seed (0 without DARE).
    """
    a = _Source(inputs.vector or inputs.aligned, t.name)
    u = _Source(inputs.unaligned, t.name) if inputs.vector is None else None
    b = _Source(inputs.dare_base, t.name) if dare is not None else None
    srcs = [s for s in (f, a, u, b) if s is not None]
    tensor_seed = rng.tensor_seed(seed, t.seed_name or t.name) if dare is not None else 0
    return a, u, b, srcs, tensor_seed


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
    writer = StagedWriter(n_buffers=3, buffer_bytes=chunk_elems * 4)

    def write_tensor(t, out, hasher, stats):
        _write_tensor(t, inputs, out, writer, hasher, kernel, dare, seed, threads, chunk_elems, stats)
    return write_files(plan, inputs, out_dir, metadata, writer, write_tensor, progress)


def write_files(plan: Plan, inputs: Inputs, out_dir, metadata: dict[str, str], writer: StagedWriter,
                write_tensor, progress=None, after_file=None) -> RunStats:
    """The per-file driver both pipelines share: preallocate each output file,
    write its tensors in order (``write_tensor(t, out, hasher, stats)``), stop
    at tensor boundaries on Ctrl-C, wait for the writer, re-check the inputs,
    close the file and record its sha256. ``after_file(stats)`` runs once a
    file's writes are done. Closes ``writer``.
    """
    stats = RunStats()
    start = time.perf_counter()
    open_files: list[TensorFileWriter] = []
    follow = HASH_MODE == "follow"
    hashers: list[tuple[str, FileHasher]] = []
    gate = threading.Semaphore(max(2, usable_cores() // 2))  # file hashers at once, 8 MB each
    try:
        for ofile in plan.files:
            tensors = [(t.name, t.out_dtype, t.shape) for t in ofile.tensors]
            out = TensorFileWriter(out_dir / ofile.name, tensors, metadata)
            open_files.append(out)
            if follow:
                hasher = FileHasher(out.path, out.header, out.size, gate)
                hashers.append((ofile.name, hasher))
            else:
                hasher = new_hasher()
                hasher.update(out.header)
            for t in ofile.tensors:
                write_tensor(t, out, hasher, stats)
                if progress is not None:
                    progress(t.numel * DTYPES[t.out_dtype][1], t.name)
                raise_if_interrupted()
            writer.drain()
            if after_file is not None:
                after_file(stats)
            for ck in inputs.all():
                ck.check_unchanged()
            open_files.remove(out)
            out.close(fsync=False)
            if not follow:  # a follower may still be hashing: collected below
                stats.sha256[ofile.name] = hasher.hexdigest()
            stats.bytes_written += out.size
        for name, follower in hashers:
            stats.sha256[name] = follower.hexdigest()
    finally:
        writer.close()  # first: no write may still target a file we close below
        for out in open_files:
            out.close(fsync=False)
        for _, follower in hashers:
            follower.abort()  # after an error; a finished one has already returned
    stats.seconds = time.perf_counter() - start
    stats.busy = dict(writer.busy)  # its threads are joined: the totals are final
    if follow:
        stats.busy["hash"] = sum(f.seconds for _, f in hashers)
    return stats


def patch_chunk(writer: StagedWriter, kernel, t: TensorPlan, f, a, u, b, lo: int, hi: int, *, dare, seed,
                threads, stats: RunStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel for elements [lo, hi) of ``t`` into a pooled buffer.

    ``f/a/u/b`` are the operands' flat views (u, b may be None). Non-finite
    outputs are counted into ``stats``; on an error the buffer goes back to the
    pool. Returns (buffer, output view) for the caller to submit.
    """
    out_torch, out_itemsize = DTYPES[t.out_dtype]
    buf = writer.acquire()
    t0 = time.perf_counter()
    try:
        dst = buf[: (hi - lo) * out_itemsize].view(out_torch)
        bad = kernel.patch_into(dst, f[lo:hi], a[lo:hi], None if u is None else u[lo:hi],
                                None if b is None else b[lo:hi], beta=t.beta, p=dare or 0.0, seed=seed,
                                offset=lo, threads=threads)
        if bad is None:  # backends that do not count in-kernel
            bad = _count_nonfinite(dst)
    except BaseException:
        writer.give_back(buf)
        raise
    writer.add_busy("kernel", time.perf_counter() - t0)
    if bad:
        stats.nonfinite[t.name] = stats.nonfinite.get(t.name, 0) + bad
    return buf, dst


def _write_tensor(t: TensorPlan, inputs: Inputs, out: TensorFileWriter, writer: StagedWriter,
                  hasher, kernel, dare, seed, threads, chunk_elems, stats: RunStats) -> None:
    f = _Source(inputs.finetuned, t.name)
    dst_start, _ = out.offsets[t.name]
    out_itemsize = DTYPES[t.out_dtype][1]
    patched = t.patched_elems if t.action == "patch" else 0
    if patched:
        a, u, b, srcs, tensor_seed = patch_sources(f, inputs, t, dare, seed)
        for lo, hi in _chunks(patched, chunk_elems):
            for s in srcs:
                s.check()
                s.prefetch(hi, min(patched, hi + chunk_elems))
            buf, dst = patch_chunk(writer, kernel, t, f.view, a.view, u and u.view, b and b.view, lo, hi,
                                   dare=dare, seed=tensor_seed, threads=threads, stats=stats)
            for s in srcs:
                s.release(lo, hi)
            stats.bytes_read += sum((hi - lo) * s.itemsize for s in srcs)
            writer.submit(WriteJob(out.fd, dst_start + lo * out_itemsize, _bytes(dst), out.path, buf,
                                   hasher=hasher))
    _write_unpatched(t, f, out, writer, hasher, kernel, patched, chunk_elems, stats)


def _write_unpatched(t: TensorPlan, f: _Source, out: TensorFileWriter, writer: StagedWriter, hasher,
                     kernel, patched: int, chunk_elems: int, stats: RunStats) -> None:
    """Copy elements ``patched..numel`` of ``t`` from the fine-tune (whole copied
    tensors, or extra vocabulary rows), converting dtype if asked."""
    dst_start, _ = out.offsets[t.name]
    out_itemsize = DTYPES[t.out_dtype][1]
    out_torch = DTYPES[t.out_dtype][0]
    n = t.numel
    if patched < n:
        if t.in_dtype == t.out_dtype:
            raw = f.view.view(torch.uint8)
            step = writer.buffer_bytes
            for lo in range(patched * f.itemsize, n * f.itemsize, step):
                hi = min(n * f.itemsize, lo + step)
                f.check()
                f.ckpt.prefetch(t.name, hi, hi + step)
                writer.submit(WriteJob(out.fd, dst_start + lo, _bytes(raw[lo:hi]), out.path, None,
                                       on_done=_releaser(f.ckpt, t.name, lo, hi), hasher=hasher))
                stats.bytes_read += hi - lo
        else:
            for lo, hi in _chunks(n - patched, chunk_elems):
                lo, hi = lo + patched, hi + patched
                f.check()
                buf = writer.acquire()
                dst = buf[: (hi - lo) * out_itemsize].view(out_torch)
                try:
                    kernel.convert_into(dst, f.view[lo:hi])
                except BaseException:
                    writer.give_back(buf)
                    raise
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



# 1M elements: the shared chunk (2 MB per bf16 input, 4 MB for the pair) stays
# in L2/L3 while every job's kernel reads it. Per job and chunk the Python and
# thread hand-off cost was 0.2-0.5 ms with a no-op kernel on a loaded 2-core
# box (an upper bound), against ~1-2 ms for a 1M-element kernel call; sweep
# with `batch --chunk-elems` / bench_batch.py on the target machine.
FUSED_CHUNK_ELEMS = 1024 * 1024


@dataclass
class FusedJob:
    """One output of a fused pass: what ``run_plan`` takes for one job.

    Jobs whose ``inputs`` hold the same Checkpoint object (the shared aligned/
    unaligned pair or vector, and also a fine-tune or DARE base used by several
    jobs, e.g. a β sweep) read that input once per chunk. ``stats`` and
    ``error`` are filled in by ``run_fused``.
    """

    plan: Plan
    inputs: Inputs
    out_dir: Path
    dare: float | None
    seed: int
    metadata: dict[str, str]
    progress: Callable[[int, str], None] | None = None
    stats: RunStats = field(default_factory=RunStats)
    error: BaseException | None = None


class _OrderedHash:
    """Running sha256 of an output file whose pieces may arrive out of order.

    A piece that lands at the end of the hashed prefix is hashed from memory
    (the common case: a fine-tune laid out like the shared model is written in
    file order); a piece that lands ahead is remembered by range and read back
    with pread (page cache) once the prefix reaches it. Called only from the
    file's writer thread.
    """

    def __init__(self, out: TensorFileWriter):
        self.out = out
        self.hash = new_hasher()
        self.hash.update(out.header)
        self.pos = len(out.header)
        self.ahead: dict[int, int] = {}

    def wrote(self, offset: int, data: memoryview) -> None:
        if offset != self.pos:
            self.ahead[offset] = offset + data.nbytes
            return
        self.hash.update(data)
        self.pos += data.nbytes
        while self.pos in self.ahead:
            end = self.ahead.pop(self.pos)
            while self.pos < end:
                block = os.pread(self.out.fd, min(end - self.pos, 16 << 20), self.pos)
                if not block:
                    raise OSError(f"{self.out.path}: short read while hashing at byte {self.pos}")
                self.hash.update(block)
                self.pos += len(block)

    def hexdigest(self) -> str:
        if self.pos != self.out.size or self.ahead:
            raise RuntimeError(f"{self.out.path}: internal error: bytes {self.pos}..{self.out.size} "
                               "of the output were never written")
        return self.hash.hexdigest()


class _HashCursor:
    """The ``hasher`` of one tensor's WriteJobs: they are submitted in order, so
    each piece's file offset is the previous piece's end."""

    def __init__(self, ordered: _OrderedHash, offset: int):
        self.ordered = ordered
        self.pos = offset

    def update(self, data: memoryview) -> None:
        self.ordered.wrote(self.pos, data)
        self.pos += data.nbytes


class _JobRun:
    """Per-job state of a fused pass: schedule, lazily opened files, hashes."""

    def __init__(self, job: FusedJob, writer: StagedWriter, order: dict[str, int]):
        self.job = job
        self.writer = writer
        self.file_plans = {f.name: f for f in job.plan.files}
        self.file_of = {t.name: f.name for f in job.plan.files for t in f.tensors}
        self.left = {f.name: len(f.tensors) for f in job.plan.files}
        self.outs: dict[str, TensorFileWriter] = {}
        self.hashes: dict[str, _OrderedHash] = {}
        # Each tensor the shared model also has goes in that tensor's slot; the
        # job's other tensors go just before the next such tensor of the job's
        # own order, so a job laid out like the shared model is written in order.
        self.slots: dict[int, list[TensorPlan]] = {}
        pending: list[TensorPlan] = []
        for t in job.plan.tensors():
            pos = order.get(t.name)
            if pos is None:
                pending.append(t)
                continue
            self.slots[pos] = [*pending, t]
            pending = []
        self.tail = pending

    @property
    def failed(self) -> bool:
        return self.job.error is not None

    def guard(self, fn, *args) -> None:
        """Run one step of this job; an error fails this job only."""
        if self.failed:
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - recorded on the job, reported by the caller
            self.job.error = exc

    def out_for(self, name: str) -> TensorFileWriter:
        fname = self.file_of[name]
        return self.outs[fname] if fname in self.outs else self._open(fname)

    def _open(self, fname: str) -> TensorFileWriter:
        tensors = [(t.name, t.out_dtype, t.shape) for t in self.file_plans[fname].tensors]
        out = TensorFileWriter(self.job.out_dir / fname, tensors, self.job.metadata)
        self.outs[fname] = out
        self.hashes[fname] = _OrderedHash(out)
        return out

    def cursor(self, name: str) -> _HashCursor:
        out = self.out_for(name)
        return _HashCursor(self.hashes[self.file_of[name]], out.offsets[name][0])

    def open_empty_files(self) -> None:
        for fname, n in self.left.items():
            if n == 0:
                self._open(fname)
                self._finish_file(fname)

    def write_single(self, t: TensorPlan, kernel, threads, chunk_elems) -> None:
        """A tensor not fused with other jobs (copies, tensors only this job has)."""
        _write_tensor(t, self.job.inputs, self.out_for(t.name), self.writer, self.cursor(t.name), kernel,
                      self.job.dare, self.job.seed, threads, chunk_elems, self.job.stats)
        self.tensor_done(t)

    def tensor_done(self, t: TensorPlan) -> None:
        if self.job.progress is not None:
            self.job.progress(t.numel * DTYPES[t.out_dtype][1], t.name)
        fname = self.file_of[t.name]
        self.left[fname] -= 1
        if self.left[fname] == 0:
            self._finish_file(fname)

    def _finish_file(self, fname: str) -> None:
        out, ordered, stats = self.outs[fname], self.hashes[fname], self.job.stats

        def done():  # in the writer thread, after every write to this file
            stats.sha256[fname] = ordered.hexdigest()
            stats.bytes_written += out.size
            out.close(fsync=False)
        self.writer.submit(WriteJob(-1, 0, memoryview(b""), out.path, None, on_done=done))

    def finish(self) -> None:
        missing = [f for f in self.file_plans if f not in self.job.stats.sha256]
        if missing:
            raise RuntimeError(f"internal error: output file(s) {missing} were not completed")
        for ck in self.job.inputs.all():
            ck.check_unchanged()

    def close_files(self) -> None:
        for out in self.outs.values():
            out.close(fsync=False)


@dataclass
class _FusedItem:
    run: _JobRun
    t: TensorPlan
    f: _Source
    a: _Source
    u: _Source | None
    b: _Source | None
    out: TensorFileWriter
    hasher: _HashCursor
    seed: int

    def sources(self):
        return [s for s in (self.f, self.a, self.u, self.b) if s is not None]


def usable_cores() -> int:
    """CPUs this process may run on (honours Slurm/cgroup CPU sets, unlike cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def fused_workers(n_jobs: int, threads: int | None = None, writers: int | None = None,
                  cores: int | None = None) -> tuple[int, int]:
    """(kernel threads, writer threads) for a fused pass of ``n_jobs`` jobs.

    Each writer thread pwrites and sha256-hashes its jobs' files (~1-2 GB/s per
    core), so several jobs' writes proceed in parallel; the kernel gets the
    remaining cores, because an OpenMP team sharing a core with a busy writer
    waits at every barrier for the preempted thread (measured on a loaded
    2-core box: 2 threads 66-90 M elem/s, 1 thread 506 M elem/s).
    """
    if cores is None:
        cores = usable_cores()
    writers = max(1, min(n_jobs, writers if writers is not None else min(cores // 4, 8)))
    if threads is None:
        threads = max(1, cores - writers)
    return threads, writers


def run_fused(jobs: list[FusedJob], *, kernel, threads: int | None = None,
              chunk_elems: int = FUSED_CHUNK_ELEMS, writers: int | None = None, n_buffers: int = 3,
              cores: int | None = None) -> None:
    """Write every job's output in one pass over the shared inputs.

    Tensors are visited in the shared model's order (the vector's, else the
    aligned model's). For each tensor, chunk by chunk, the shared inputs are
    read once and every job that patches the tensor runs its kernel (its own β,
    DARE p and seed) while the chunk is hot; each job pwrites into its own
    preallocated files at precomputed offsets, so fine-tunes with other shard
    layouts or extra tensors work too. Jobs are spread over ``writers`` writer
    threads (each hashes its files as it writes); memory is
    ``writers * n_buffers * chunk_elems * 4`` bytes plus a fixed overhead,
    whatever the number of jobs or the model size. ``threads``/``writers``
    default to ``fused_workers`` over ``cores`` (default: this process's CPUs).

    A job that fails (its input changed, a kernel error) gets ``job.error`` and
    drops out; the others go on. Output is bit-identical to ``run_plan`` per job.

    Args:
        jobs: FusedJob list; all share ``inputs.vector`` or ``inputs.aligned``.
        kernel: a backend module (``patch_into``/``convert_into``).
    Returns:
        None; fills each job's ``stats`` (sha256 per file) or ``error``.
    """
    if not jobs:
        return
    start = time.perf_counter()
    threads, writers = fused_workers(len(jobs), threads, writers, cores)
    first = jobs[0].inputs
    shared = first.vector if first.vector is not None else first.aligned
    order = {name: i for i, name in enumerate(shared.names())}
    pools = [StagedWriter(n_buffers=n_buffers, buffer_bytes=chunk_elems * 4) for _ in range(writers)]
    runs = [_JobRun(job, pools[i % len(pools)], order) for i, job in enumerate(jobs)]
    try:
        for run in runs:
            run.guard(run.open_empty_files)
        for pos, name in enumerate(order):
            fused = []
            for run in runs:
                for t in run.slots.get(pos, ()):
                    if t.name == name and t.action == "patch":
                        fused.append((run, t))
                    else:
                        run.guard(run.write_single, t, kernel, threads, chunk_elems)
            if fused:
                _write_fused(name, fused, kernel, threads, chunk_elems)
        for run in runs:
            for t in run.tail:
                run.guard(run.write_single, t, kernel, threads, chunk_elems)
        for pool in pools:
            try:
                pool.drain()
            except Exception as exc:  # noqa: BLE001 - a write error fails this writer's jobs
                for run in runs:
                    if run.writer is pool and not run.failed:
                        run.job.error = exc
        for run in runs:
            run.guard(run.finish)
    finally:
        for pool in pools:
            pool.close()  # first: no write may still target a file we close below
        for run in runs:
            run.close_files()
    elapsed = time.perf_counter() - start
    for job in jobs:
        job.stats.seconds = elapsed


def _write_fused(name: str, items: list[tuple[_JobRun, TensorPlan]], kernel, threads, chunk_elems) -> None:
    """Patch tensor ``name`` for several jobs, chunk by chunk, shared reads once."""
    sources: dict[int, _Source] = {}

    def source(ckpt) -> _Source:
        if id(ckpt) not in sources:
            sources[id(ckpt)] = _Source(ckpt, name)
        return sources[id(ckpt)]

    work: list[_FusedItem] = []
    for run, t in items:
        def setup(run=run, t=t):
            inp, dare = run.job.inputs, run.job.dare
            seed = rng.tensor_seed(run.job.seed, t.seed_name or t.name) if dare is not None else 0
            work.append(_FusedItem(
                run, t, source(inp.finetuned), source(inp.vector or inp.aligned),
                source(inp.unaligned) if inp.vector is None else None,
                source(inp.dare_base) if dare is not None else None,
                run.out_for(name), run.cursor(name), seed))
        run.guard(setup)
    if not work:
        return
    for lo, hi in _chunks(max(w.t.patched_elems for w in work), chunk_elems):
        live = [w for w in work if not w.run.failed and lo < w.t.patched_elems]
        chunk_sources = {id(s): s for w in live for s in w.sources()}.values()
        for s in chunk_sources:
            s.prefetch(hi, hi + chunk_elems)
        for w in live:
            w.run.guard(_fused_chunk, w, lo, min(hi, w.t.patched_elems), kernel, threads)
        for s in chunk_sources:
            s.release(lo, hi)
    for w in work:
        w.run.guard(_write_unpatched, w.t, w.f, w.out, w.run.writer, w.hasher, kernel,
                    w.t.patched_elems, chunk_elems, w.run.job.stats)
        w.run.guard(w.run.tensor_done, w.t)


def _fused_chunk(w: _FusedItem, lo: int, hi: int, kernel, threads) -> None:
    t, writer, stats, dare = w.t, w.run.writer, w.run.job.stats, w.run.job.dare
    out_itemsize = DTYPES[t.out_dtype][1]
    for s in w.sources():
        s.check()  # a truncated input fails this job here, not the process with SIGBUS
    buf, dst = patch_chunk(writer, kernel, t, w.f.view, w.a.view, w.u and w.u.view, w.b and w.b.view, lo, hi,
                           dare=dare, seed=w.seed, threads=threads, stats=stats)
    stats.bytes_read += sum((hi - lo) * s.itemsize for s in w.sources())
    writer.submit(WriteJob(w.out.fd, w.out.offsets[t.name][0] + lo * out_itemsize, _bytes(dst),
                           w.out.path, buf, hasher=w.hasher))
