"""The one streaming engine: a group of N >= 1 jobs sharing inputs, chunk by chunk.

A patch is a group of one; a batch group is several fine-tunes realigned with
the same safety vector (or aligned/unaligned pair). Tensors are visited in one
order (the job's own for a single job, the shared model's for a group); for
each tensor, chunk by chunk, every distinct input is staged once (``staging``),
moved to the device once (``compute``), and every job that patches the tensor
runs its kernel on it (its own β, DARE p and seed) into an output buffer that
its writer thread pwrites at the precomputed offset and its file's hasher
follows (``writer``, ``hashing``). Staging of chunk k+1 overlaps the kernels of
chunk k and the writes of chunk k-1; the buffer pools bound memory,
independent of model size, and give back-pressure.

Per tensor boundary: progress, Ctrl-C/SIGTERM (``interrupt``). A job that
fails (its input changed, a write error) records ``job.error`` and drops out;
the others go on. Output is bit-identical whatever the device, backend, chunk
size, group or staging.

``busy`` (every job's ``stats.busy``) adds up, per stage, the seconds threads
spent working or waiting: kernel (the scheduler's compute calls; on a GPU,
launches), stage (reader threads' preads, summed over readers), write, hash
(summed over the file hashers, which run at once), wait_for_buffer (the
scheduler waiting for a free output buffer: the writer or disk is the
bottleneck), wait_for_device (writers waiting for device copies). The stages
overlap, so they do not add up to the wall time; the largest is the bottleneck.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from resta_fast import rng
from resta_fast.io.reader import ITEMSIZE, NUMPY_STORAGE
from resta_fast.io.writer import TensorFileWriter
from resta_fast.pipeline.compute import DEFAULT_SLOTS, Compute, chunk_elems_for_pool
from resta_fast.pipeline.device import Device, open_device
from resta_fast.pipeline.hashing import FileHasher
from resta_fast.pipeline.interrupt import raise_if_interrupted
from resta_fast.pipeline.job import Job
from resta_fast.pipeline.staging import MmapStaging, ReadStaging, Source
from resta_fast.pipeline.writer import WriteJob, Writer
from resta_fast.plan import TensorPlan

# 4M elements = 16 MB per fp32 buffer: large enough that per-chunk Python and
# thread-handoff overhead is < 1% of the kernel time, small enough that the
# buffers stay far below the RSS budget.
DEFAULT_CHUNK_ELEMS = 4 * 1024 * 1024
# 1M elements for a group: the shared chunk (2 MB per bf16 input, 4 MB for the
# pair) stays in L2/L3 while every job's kernel reads it. Per job and chunk the
# Python and thread hand-off cost was 0.2-0.5 ms with a no-op kernel on a loaded
# 2-core box (an upper bound), against ~1-2 ms for a 1M-element kernel call;
# sweep with `batch --chunk-elems` / bench_batch.py on the target machine.
FUSED_CHUNK_ELEMS = 1024 * 1024
# How CPU runs stage their inputs ("mmap": zero-copy views; "read": pread into
# buffers); GPU runs always read into pinned buffers. Chosen by
# benchmarks/bench_staging.py.
CPU_STAGING = "mmap"


def usable_cores() -> int:
    """CPUs this process may run on (honours Slurm/cgroup CPU sets, unlike cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def fused_workers(
    n_jobs: int, threads: int | None = None, writers: int | None = None, cores: int | None = None
) -> tuple[int, int]:
    """(kernel threads, writer threads) for a pass of ``n_jobs`` jobs.

    Several writer threads let several jobs' writes proceed in parallel; the
    kernel gets the remaining cores, because an OpenMP team sharing a core with
    a busy writer waits at every barrier for the preempted thread (measured on
    a loaded 2-core box: 2 threads 66-90 M elem/s, 1 thread 506 M elem/s).

    Example:
        >>> fused_workers(8, cores=16)
        (12, 4)
    """
    if cores is None:
        cores = usable_cores()
    writers = max(1, min(n_jobs, writers if writers is not None else min(cores // 4, 8)))
    if threads is None:
        threads = max(1, cores - writers)
    return threads, writers


def run_jobs(
    jobs: list[Job],
    *,
    kernel,
    device: str | Device = "cpu",
    threads: int | None = None,
    chunk_elems: int | None = None,
    writers: int | None = None,
    n_buffers: int = 3,
    cores: int | None = None,
    cache=None,
    staging: str | None = None,
    readers: int | None = None,
    pool_bytes: int | None = None,
    slots: int | None = None,
) -> None:
    """Write every job's output in one pass over their shared inputs.

    Args:
        jobs: the group; jobs whose ``inputs`` hold the same Checkpoint object
            (the shared pair or vector, a fine-tune or DARE base used by several
            jobs) read it once per chunk.
        kernel: a backend module (``patch_into``/``convert_into``) for ``device``.
        device: ``cpu`` or ``cuda[:N]`` (``device.open_device``), or a ``Device``
            itself (the tests' asynchronous stand-in).
        threads: kernel threads (default: the cores the writers leave, see
            ``fused_workers``). writers: writer threads.
        chunk_elems: elements per chunk (default by device and group size).
        n_buffers: output buffers per writer.
        cache: a ``compute.DeviceCache`` shared by passes over the same inputs.
        staging: ``mmap`` or ``read`` (default: CPU_STAGING, ``read`` on a GPU).
        readers: reader threads for ``read`` staging.
        pool_bytes, slots: on a device, the chunk size is derived from them
            (default: the device's ``pool_bytes``).
    Returns:
        None; fills each job's ``stats`` (sha256 per file) or ``error``.
        KeyboardInterrupt (a stop request) and errors that stop every job
        (no memory for the buffers) propagate.

    Example:
        >>> run_jobs([], kernel=None)  # a real call passes Jobs (api.execute does)
    """
    if not jobs:
        return
    start = time.perf_counter()
    accel = open_device(device) if isinstance(device, str) else device  # None: the host
    pinned = accel is not None and accel.pinned
    if chunk_elems is None:
        chunk_elems = (
            chunk_elems_for_pool(pool_bytes or accel.pool_bytes, slots or DEFAULT_SLOTS)
            if accel is not None
            else DEFAULT_CHUNK_ELEMS
            if len(jobs) == 1
            else FUSED_CHUNK_ELEMS
        )
    # One job too: the kernel leaves the writer and hasher threads a core. On 2 cores one
    # kernel thread patched 1.2B params in 4.26 s against 5.50 s for OpenMP's default two
    # (median of 4 alternated rounds, bench_staging.py --modes cpu-mmap,cpu-mmap-1t).
    threads, n_writers = fused_workers(len(jobs), threads, writers, cores)
    staging = staging or ("read" if accel is not None else CPU_STAGING)
    buffer_bytes = chunk_elems * 4  # room for fp32, the widest kernel dtype
    compute = Compute(kernel, accel, threads)
    pool: list[Writer] = []
    stager = None
    runs: list[_JobRun] = []
    gate = threading.Semaphore(max(2, usable_cores() // 2))  # file hashers at once, 8 MB each
    try:
        for _ in range(n_writers):
            pool.append(Writer(n_buffers, buffer_bytes, pinned=pinned))
        if staging == "read":
            # Two chunks (this one and the next) of every distinct input at most.
            distinct = {id(c) for job in jobs for c in job.inputs.all()}
            stager = ReadStaging(
                2 * len(distinct), buffer_bytes, readers or max(2, min(8, usable_cores() // 2)), pinned=pinned
            )
        elif staging == "mmap":
            stager = MmapStaging()
        else:
            raise ValueError(f"staging must be 'mmap' or 'read', got {staging!r}")
        first = jobs[0].inputs
        shared = first.vector if first.vector is not None else first.aligned
        order_names = [t.name for t in jobs[0].plan.tensors()] if len(jobs) == 1 else shared.names()
        order = {name: i for i, name in enumerate(order_names)}
        runs = [_JobRun(job, pool[i % len(pool)], order, gate) for i, job in enumerate(jobs)]
        _Pass(runs, compute, stager, chunk_elems, cache).run(order_names)
        for writer in pool:
            try:
                writer.drain()
            except Exception as exc:  # noqa: BLE001 - a write error fails this writer's jobs
                for run in runs:
                    if run.writer is writer and not run.failed:
                        run.job.error = exc
        compute.synchronize()  # device counters are read next
        for run in runs:
            run.guard(run.finish)
    finally:
        for writer in pool:
            writer.close()  # first: no write may still target a file we close below
        if stager is not None:
            stager.close()
        for run in runs:
            run.close()
    busy = _busy(pool, stager, runs)
    elapsed = time.perf_counter() - start
    for job in jobs:
        job.stats.seconds = elapsed
        job.stats.busy = dict(busy)


def _busy(pool: list[Writer], stager, runs: list[_JobRun]) -> dict[str, float]:
    busy: dict[str, float] = {"kernel": 0.0, "hash": 0.0, "wait_for_buffer": 0.0}
    for writer in pool:
        for key, value in writer.busy.items():
            busy[key] = busy.get(key, 0.0) + value
        busy["wait_for_buffer"] += writer.pool.waited
    for key, value in (stager.busy if stager is not None else {}).items():
        busy[key] = busy.get(key, 0.0) + value
    for run in runs:
        busy["kernel"] += run.kernel_seconds
        busy["hash"] += sum(h.seconds for h in run.hashers.values())
    return busy


class _JobRun:
    """Per-job state of a pass: schedule, lazily opened files, hashers."""

    def __init__(self, job: Job, writer: Writer, order: dict[str, int], gate: threading.Semaphore):
        self.job = job
        self.writer = writer
        self.gate = gate
        self.file_plans = {f.name: f for f in job.plan.files}
        self.file_of = {t.name: f.name for f in job.plan.files for t in f.tensors}
        self.left = {f.name: len(f.tensors) for f in job.plan.files}
        self.outs: dict[str, TensorFileWriter] = {}
        self.hashers: dict[str, FileHasher] = {}
        self.counters: dict[str, object] = {}  # non-finite counts on the device (GPU): torch scalars
        self.kernel_seconds = 0.0
        # Each tensor the visiting order has goes in that tensor's slot; the
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
        self.hashers[fname] = FileHasher(out.path, out.header, out.size, self.gate)
        return out

    def open_empty_files(self) -> None:
        for fname, n in self.left.items():
            if n == 0:
                self._open(fname)
                self._finish_file(fname)

    def tensor_done(self, t: TensorPlan) -> None:
        if self.job.progress is not None:
            self.job.progress(t.numel * ITEMSIZE[t.out_dtype], t.name)
        fname = self.file_of[t.name]
        self.left[fname] -= 1
        if self.left[fname] == 0:
            self._finish_file(fname)

    def _finish_file(self, fname: str) -> None:
        out, stats = self.outs[fname], self.job.stats

        def close():  # in the writer thread, after every write to this file
            out.close(fsync=False)
            stats.bytes_written += out.size

        self.writer.submit(WriteJob(-1, 0, memoryview(b""), on_done=close, path=out.path))

    def finish(self) -> None:
        """After the writers drained: record digests and counts, re-check the inputs."""
        stats = self.job.stats
        for fname in self.file_plans:
            if fname not in self.hashers:
                raise RuntimeError(f"internal error: output file {fname} was never written")
            stats.sha256[fname] = self.hashers[fname].hexdigest()
        for name, count in self.counters.items():  # one device sync per job, never per chunk
            if int(count):
                stats.nonfinite[name] = int(count)
        for ck in self.job.inputs.all():
            ck.check_unchanged()

    def close(self) -> None:
        for out in self.outs.values():
            out.close(fsync=False)
        for hasher in self.hashers.values():
            hasher.abort()  # after an error; a finished one has already returned


@dataclass
class _Item:
    """One job's share of one tensor of the pass."""

    run: _JobRun
    t: TensorPlan
    f: Source | None = None
    operands: tuple = ()  # keys of (f, a, u, b) in the tensor's sources; u/b may be None
    seed: int = 0
    counter: object = None  # a device scalar (GPU)


class _Tensor:
    """One tensor of the pass: the jobs' items and their distinct input sources."""

    def __init__(self, name: str, items: list[_Item]):
        self.name = name
        self.items = items
        self.sources: dict[int, Source] = {}
        self.cached: dict[int, object] = {}  # whole tensors from the DeviceCache

    def source(self, ckpt, cache=None, compute: Compute | None = None) -> int:
        """The key of ``ckpt``'s tensor; a shared input (``cache`` given) comes from the cache when it is there."""
        key = id(ckpt)
        if key not in self.sources:
            self.sources[key] = Source(ckpt, self.name)
            if cache is not None:
                hit = cache.get(self.sources[key], compute.keep)
                if hit is not None:
                    self.cached[key] = hit
        return key

    @property
    def patched(self) -> int:
        return max((i.t.patched_elems for i in self.items if i.operands), default=0)


@dataclass
class _Chunk:
    tensor: _Tensor
    lo: int
    hi: int
    tickets: dict | None = None


class _Pass:
    """The scheduler: tensors in order, chunks staged one ahead, every job per chunk."""

    def __init__(self, runs: list[_JobRun], compute: Compute, stager, chunk_elems: int, cache):
        self.runs = runs
        self.compute = compute
        self.stager = stager
        self.chunk = chunk_elems
        self.cache = cache

    def run(self, order_names: list[str]) -> None:
        for run in self.runs:
            run.guard(run.open_empty_files)
        queue: deque = deque()
        steps = self._steps(order_names)

        def stage_next() -> None:  # pull steps up to and including the next chunk, and stage it
            for step in steps:
                queue.append(step)
                if isinstance(step, _Chunk):
                    step.tickets = self._stage(step)
                    return

        stage_next()
        try:
            while queue:
                step = queue.popleft()
                if isinstance(step, _Chunk):
                    stage_next()  # chunk k+1 is read while chunk k is computed
                    self._compute(step)
                else:
                    self._finish_tensor(step)
        finally:
            for step in queue:  # an error or a stop: give staged buffers back
                if isinstance(step, _Chunk) and step.tickets:
                    for ticket in step.tickets.values():
                        ticket.release()

    def _steps(self, order_names: list[str]):
        """Chunks of each tensor, then the tensor itself (its copied part, done)."""
        for pos, name in enumerate(order_names):
            fused = []
            for run in self.runs:
                for t in run.slots.get(pos, ()):
                    if t.name == name and t.action == "patch":
                        fused.append((run, t))
                    else:
                        yield from self._tensor_steps(t.name, [(run, t)])
            if fused:
                yield from self._tensor_steps(name, fused)
        for run in self.runs:
            for t in run.tail:
                yield from self._tensor_steps(t.name, [(run, t)])

    def _tensor_steps(self, name: str, pairs):
        tensor = _Tensor(name, [])
        for run, t in pairs:
            item = _Item(run, t)
            run.guard(self._setup, tensor, item)
            if not run.failed:
                tensor.items.append(item)
        for lo in range(0, tensor.patched, self.chunk):
            yield _Chunk(tensor, lo, min(tensor.patched, lo + self.chunk))
        yield tensor

    def _setup(self, tensor: _Tensor, item: _Item) -> None:
        run, t = item.run, item.t
        inp, dare = run.job.inputs, run.job.dare
        item.f = tensor.sources[tensor.source(inp.finetuned)]
        if t.action != "patch" or t.patched_elems == 0:
            return
        a = tensor.source(inp.vector if inp.vector is not None else inp.aligned, self.cache, self.compute)
        u = tensor.source(inp.unaligned, self.cache, self.compute) if inp.vector is None else None
        b = tensor.source(inp.dare_base, self.cache, self.compute) if dare is not None else None
        item.operands = (id(inp.finetuned), a, u, b)
        item.seed = rng.tensor_seed(run.job.seed, t.seed_name or t.name) if dare is not None else 0
        item.counter = self.compute.new_counter()
        if item.counter is not None:
            run.counters[t.name] = item.counter

    def _live(self, chunk: _Chunk) -> list[_Item]:
        return [i for i in chunk.tensor.items if i.operands and not i.run.failed and chunk.lo < i.t.patched_elems]

    def _stage(self, chunk: _Chunk) -> dict:
        tickets = {}
        for key in {k for i in self._live(chunk) for k in i.operands if k is not None}:
            if key in chunk.tensor.cached:
                continue
            src = chunk.tensor.sources[key]
            try:
                tickets[key] = self.stager.request(src, chunk.lo, min(chunk.hi, src.info.numel))
            except Exception as exc:  # noqa: BLE001 - an input failed: its jobs fail, others go on
                for i in chunk.tensor.items:
                    if key in i.operands:
                        i.run.guard(_raise, exc)
        return tickets

    def _compute(self, chunk: _Chunk) -> None:
        tickets, tensor = chunk.tickets or {}, chunk.tensor
        views: dict[int, object] = {}  # host arrays, or device tensors on a GPU
        try:
            for key, ticket in tickets.items():
                try:
                    views[key] = self.compute.upload(ticket.get())
                except Exception as exc:  # noqa: BLE001 - a failed read fails the jobs using it
                    for i in tensor.items:
                        if key in i.operands:
                            i.run.guard(_raise, exc)
            for key, whole in tensor.cached.items():
                views[key] = whole[chunk.lo : chunk.hi]
            for item in self._live(chunk):
                item.run.guard(self._patch_chunk, item, chunk, views)
        finally:
            done = self.compute.inputs_done()
            for ticket in tickets.values():
                ticket.release(after=done)

    def _patch_chunk(self, item: _Item, chunk: _Chunk, views: dict) -> None:
        run, t = item.run, item.t
        lo, hi = chunk.lo, min(chunk.hi, t.patched_elems)
        n = hi - lo
        out_storage, out_itemsize = NUMPY_STORAGE[t.out_dtype], ITEMSIZE[t.out_dtype]
        f, a, u, b = (None if k is None else views[k][:n] for k in item.operands)
        out = run.out_for(t.name)
        buf = run.writer.acquire()
        t0 = time.perf_counter()
        try:
            dst = buf[: n * out_itemsize].view(out_storage)
            landed, bad = self.compute.patch(
                dst, f, a, u, b, beta=t.beta, p=run.job.dare or 0.0, seed=item.seed, offset=lo, counter=item.counter
            )
        except BaseException:
            run.writer.pool.give(buf)
            raise
        run.kernel_seconds += time.perf_counter() - t0
        stats = run.job.stats
        if bad:
            stats.nonfinite[t.name] = stats.nonfinite.get(t.name, 0) + bad
        stats.bytes_read += sum(
            n * chunk.tensor.sources[k].itemsize
            for k in set(item.operands)
            if k is not None and k not in chunk.tensor.cached
        )
        run.writer.submit(
            WriteJob(
                out.fd,
                out.offsets[t.name][0] + lo * out_itemsize,
                _bytes(dst),
                buf,
                hasher=run.hashers[run.file_of[t.name]],
                before=None if landed is None else landed.synchronize,
                path=out.path,
            )
        )

    def _finish_tensor(self, tensor: _Tensor) -> None:
        for item in tensor.items:
            item.run.guard(self._copy_rest, item)
            item.run.guard(item.run.tensor_done, item.t)
        raise_if_interrupted()  # Ctrl-C/SIGTERM: stop at a tensor boundary

    def _copy_rest(self, item: _Item) -> None:
        """Copy elements ``patched..numel`` of the tensor from the fine-tune (whole
        copied tensors, or extra vocabulary rows), converting dtype if asked."""
        run, t, f = item.run, item.t, item.f
        patched = t.patched_elems if item.operands else 0
        if patched >= t.numel:
            return
        out = run.out_for(t.name)
        hasher = run.hashers[run.file_of[t.name]]
        writer, stats = run.writer, run.job.stats
        dst_start = out.offsets[t.name][0]
        out_storage, out_itemsize = NUMPY_STORAGE[t.out_dtype], ITEMSIZE[t.out_dtype]
        same = t.in_dtype == t.out_dtype
        # Elements per piece: a whole output buffer of raw bytes, or a chunk to convert.
        step = writer.buffer_bytes // f.itemsize if same else self.chunk
        for lo in range(patched, t.numel, step):
            hi = min(t.numel, lo + step)
            if same and (f.file is None or isinstance(self.stager, MmapStaging)):
                # Straight from the mapping (or memory) to the file, no copy of ours.
                ticket = self.stager.request(f, lo, hi) if f.file is not None else None
                raw = (f.view[lo:hi] if ticket is None else ticket.get()).view(np.uint8)
                writer.submit(
                    WriteJob(
                        out.fd,
                        dst_start + lo * out_itemsize,
                        _bytes(raw),
                        None,
                        hasher=hasher,
                        on_done=None if ticket is None else ticket.release,
                        path=out.path,
                    )
                )
                stats.bytes_read += (hi - lo) * f.itemsize
                continue
            buf = writer.acquire()
            try:
                if same:  # read staging: pread straight into the output buffer
                    f.check()
                    f.file.read_into(buf[: (hi - lo) * f.itemsize].data, f.info.start + lo * f.itemsize, tensor=t.name)
                    data = buf[: (hi - lo) * f.itemsize]
                else:
                    ticket = self.stager.request(f, lo, hi)
                    try:
                        dst = buf[: (hi - lo) * out_itemsize].view(out_storage)
                        self.compute.convert(dst, ticket.get())
                    finally:
                        ticket.release()
                    data = dst
            except BaseException:
                writer.pool.give(buf)
                raise
            stats.bytes_read += (hi - lo) * f.itemsize
            writer.submit(
                WriteJob(out.fd, dst_start + lo * out_itemsize, _bytes(data), buf, hasher=hasher, path=out.path)
            )


def _raise(exc):
    raise exc


def _bytes(x: np.ndarray) -> memoryview:
    return x.view(np.uint8).data
