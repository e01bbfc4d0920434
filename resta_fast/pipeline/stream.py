"""Device-independent staging: a bounded buffer pool, a writer and a hasher thread.

The producer (kernel side) takes a buffer from the pool, fills it, and submits
it with its destination; the writer thread pwrites it and hands it to a hasher
thread, which calls the job's ``hasher`` (jobs of one file arrive in order)
and returns the buffer to the pool. Two kinds of hasher:

- a plain sha256 (inline): the buffer is hashed before it is reused, so every
  buffer waits on one sha256 stream (~1.8 GB/s per core here, 1.3 GB/s on the
  H200 host), the slowest stage of a patch;
- a ``FileHasher`` (follow, what ``write_files`` uses): ``update`` only moves
  the file's written frontier, the buffer is free at once, and a thread per
  file re-reads the written bytes from the page cache and hashes them. File k
  is hashed while file k+1 is written, and several files hash in parallel.

On 2 cores following ran at 0.95x the inline time (median of 6 alternated
rounds, 0.56-1.07x; 1.3B params, 3 shards; ``benchmarks/bench_hash_modes.py``):
the cores are busy either way. Where cores are free (the 16-core GPU host) it
lets one sha256 stream run per file; that gain is not measured yet. The pool size bounds memory and gives
back-pressure; an error in any thread stops all and is re-raised.

``busy`` adds up, per stage, the seconds each thread spent working or waiting
(writes, hashing, the producer waiting for a free buffer, and what the
pipelines add: kernel, staging). The stages overlap, so they do not sum to the
run's wall time; the largest one is the bottleneck (following, ``hash`` is
summed over the file hashers, which can run at once). The patch report carries
them (``stats.busy_seconds``).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from resta_fast.io.writer import write_all

_STOP = object()


@dataclass
class WriteJob:
    fd: int
    offset: int
    data: memoryview
    path: object
    buffer: torch.Tensor | None  # returned to the pool after the write
    on_done: Callable[[], None] | None = None  # e.g. release input pages
    hasher: object | None = None
    before: Callable[[], None] | None = None  # e.g. wait for a device-to-host copy
    release: Callable[[], None] | None = None  # always run, even after an error (slot return)


class StagedWriter:
    """Bounded pool of reusable byte buffers feeding one writer thread.

    Args:
        n_buffers: buffers in flight (2 = double buffering).
        buffer_bytes: size of each buffer.
        make_buffer: allocator (pinned host memory on the GPU path).
    """

    def __init__(self, n_buffers: int, buffer_bytes: int,
                 make_buffer: Callable[[int], torch.Tensor] | None = None):
        make_buffer = make_buffer or (lambda n: torch.empty(n, dtype=torch.uint8))
        self.buffer_bytes = buffer_bytes
        self._free: queue.Queue = queue.Queue()
        for _ in range(n_buffers):
            buf = make_buffer(buffer_bytes)
            buf.fill_(0)  # touch once now: first-touch page faults are slow here
            self._free.put(buf)
        self._jobs: queue.Queue = queue.Queue(maxsize=n_buffers + 2)
        # Bounded so the hasher cannot fall arbitrarily far behind the writer.
        self._hash_jobs: queue.Queue = queue.Queue(maxsize=n_buffers + 2)
        self._error: BaseException | None = None
        # Each key is written by one thread only (writer, hasher or producer).
        self.busy: dict[str, float] = {"write": 0.0, "hash": 0.0, "wait_for_buffer": 0.0}
        self._thread = threading.Thread(target=self._run, name="resta-writer", daemon=True)
        self._hash_thread = threading.Thread(target=self._run_hasher, name="resta-hasher", daemon=True)
        self._thread.start()
        self._hash_thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                self._hash_jobs.put(_STOP)
                return
            if isinstance(job, threading.Event):  # drain marker: pass it down the line
                self._hash_jobs.put(job)
                continue
            handed_on = False
            try:
                if self._error is None:
                    t0 = time.perf_counter()
                    if job.before is not None:
                        job.before()
                        t1 = time.perf_counter()
                        self.busy["wait_for_device"] = self.busy.get("wait_for_device", 0.0) + t1 - t0
                        t0 = t1
                    write_all(job.fd, job.data, job.offset, job.path)
                    self.busy["write"] += time.perf_counter() - t0
                    # Every job goes on to the hasher thread, in order, so a job's
                    # on_done still runs after all earlier jobs are written and hashed.
                    self._hash_jobs.put(job)
                    handed_on = True
            except BaseException as exc:  # noqa: BLE001 - handed to the producer
                self._error = exc
            finally:
                if not handed_on:
                    self._finish(job)

    def _finish(self, job: WriteJob) -> None:
        if job.buffer is not None:
            self._free.put(job.buffer)
        if job.release is not None:
            job.release()

    def _run_hasher(self) -> None:
        while True:
            job = self._hash_jobs.get()
            if job is _STOP:
                return
            if isinstance(job, threading.Event):
                job.set()
                continue
            try:
                if self._error is None:
                    if job.hasher is not None:
                        t0 = time.perf_counter()
                        job.hasher.update(job.data)
                        self.busy["hash"] += time.perf_counter() - t0
                    if job.on_done is not None:
                        job.on_done()
            except BaseException as exc:  # noqa: BLE001 - handed to the producer
                self._error = exc
            finally:
                self._finish(job)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def acquire(self) -> torch.Tensor:
        """A free buffer; blocks while all are in flight (back-pressure)."""
        t0 = time.perf_counter()
        try:
            while True:
                self._check()
                try:
                    return self._free.get(timeout=0.1)
                except queue.Empty:
                    if not self._thread.is_alive():
                        raise RuntimeError("resta_fast writer thread died") from self._error
        finally:
            self.busy["wait_for_buffer"] += time.perf_counter() - t0

    def add_busy(self, stage: str, seconds: float) -> None:
        """Count producer-side time (kernel, staging) under ``stage``."""
        self.busy[stage] = self.busy.get(stage, 0.0) + seconds

    def submit(self, job: WriteJob) -> None:
        self._check()
        self._jobs.put(job)

    def give_back(self, buffer: torch.Tensor) -> None:
        """Return an unused buffer (e.g. after a kernel error)."""
        self._free.put(buffer)

    def drain(self) -> None:
        """Wait until every submitted write is done and hashed; raise the first error."""
        done = threading.Event()
        self._jobs.put(done)
        while not done.wait(0.1):
            self._check()
            if not (self._thread.is_alive() and self._hash_thread.is_alive()):
                break
        self._check()

    def close(self) -> None:
        """Stop the thread (after pending writes); safe to call twice."""
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join()
        self._hash_thread.join()


def new_hasher():
    return hashlib.sha256()


def sha256_file(path) -> str:
    """sha256 of a whole file, read in 8 MB blocks (side files, reports, verification)."""
    h = new_hasher()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


class FileHasher:
    """sha256 of one output file, on its own thread, following its writes.

    Used as a WriteJob's ``hasher``: ``update(data)`` (from the StagedWriter's
    hasher thread, after ``data`` was written at the file's next offset) only
    moves the written frontier forward, so the buffer goes back to the pool at
    once. The thread re-reads [pos, frontier) from the page cache and hashes it.
    Hashing file k thus overlaps writing file k+1, and several files hash in
    parallel (at most ``gate``'s count at a time, each with one read buffer),
    where the inline hasher kept every buffer waiting on one sha256 stream.

    Args:
        path: the output file (opened read-only here).
        header: its header bytes (already written at offset 0).
        size: its final size.
        gate: a semaphore bounding concurrently active hashers.
    """

    READ_BYTES = 8 << 20

    def __init__(self, path, header: bytes, size: int, gate: threading.Semaphore):
        self.path = path
        self.size = size
        self.seconds = 0.0  # busy time, for stats.busy["hash"]
        self._hash = new_hasher()
        self._hash.update(header)
        self._pos = len(header)
        self._frontier = len(header)
        self._cond = threading.Condition()
        self._aborted = False
        self._error: BaseException | None = None
        self._gate = gate
        self._thread = threading.Thread(target=self._run, name="resta-file-hasher", daemon=True)
        self._thread.start()

    def update(self, data: memoryview) -> None:
        with self._cond:
            self._frontier += data.nbytes
            self._cond.notify()

    def abort(self) -> None:
        """Stop the thread without a result (the run failed)."""
        with self._cond:
            self._aborted = True
            self._cond.notify()

    def hexdigest(self) -> str:
        """Wait for the whole file to be hashed; raise what the thread hit."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._pos != self.size:
            raise RuntimeError(f"{self.path}: internal error: hashed {self._pos} of {self.size} bytes")
        return self._hash.hexdigest()

    def _run(self) -> None:
        try:
            with self._gate:
                fd = os.open(self.path, os.O_RDONLY)
                try:
                    self._follow(fd)
                finally:
                    os.close(fd)
        except BaseException as exc:  # noqa: BLE001 - re-raised by hexdigest()
            self._error = exc

    def _follow(self, fd: int) -> None:
        buf = bytearray(min(self.READ_BYTES, max(1, self.size - self._pos)))
        view = memoryview(buf)
        while self._pos < self.size:
            with self._cond:
                while self._frontier <= self._pos and not self._aborted:
                    self._cond.wait()
                if self._aborted:
                    return
                end = self._frontier
            t0 = time.perf_counter()
            while self._pos < end:
                n = os.preadv(fd, [view[: min(len(view), end - self._pos)]], self._pos)
                if n <= 0:
                    raise OSError(f"{self.path}: short read while hashing at byte {self._pos}")
                self._hash.update(view[:n])
                self._pos += n
            self.seconds += time.perf_counter() - t0
