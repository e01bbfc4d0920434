"""Device-independent staging: a bounded buffer pool, a writer and a hasher thread.

The producer (kernel side) takes a buffer from the pool, fills it, and submits
it with its destination; the writer thread pwrites it and hands it to a hasher
thread, which feeds the file's running sha256 (a file's ranges arrive in order)
and returns the buffer to the pool. Hashing on its own thread matters: sha256
runs at ~1.8 GB/s here, and inline it made the writer the critical path
(1.3B-param patch: ~3.1 s with inline hashing vs ~1.4 s without); pipelined,
chunk k is hashed while chunk k+1 is written and chunk k+2 computed, so use
three or more buffers. Re-reading the written bytes from the page cache instead
of hashing the buffer was measured too: the extra copy cost more than it freed.
The pool size bounds memory and gives back-pressure; an error in any thread
stops all and is re-raised.

``busy`` adds up, per stage, the seconds each thread spent working or waiting
(writes, hashing, the producer waiting for a free buffer, and what the
pipelines add: kernel, staging). The stages overlap, so they do not sum to the
run's wall time; the largest one is the bottleneck. The patch report carries
them (``stats.busy_seconds``).
"""

from __future__ import annotations

import hashlib
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
