"""The writer thread: pwrites finished chunks at their final offsets, in order.

The scheduler takes an output buffer from the writer's pool, fills it (or has
the device copy into it) and submits a ``WriteJob``; the thread waits for the
device copy if there is one, pwrites, tells the file's hasher which bytes are
now written, runs the job's ``on_done`` and returns the buffer to the pool.
Jobs run in submission order, so a job whose ``on_done`` closes a file runs
after every write to that file. The first error stops the thread's writing and
is re-raised to the scheduler at its next submit, acquire or drain.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from resta_fast.io.writer import write_all
from resta_fast.pipeline.buffers import BufferPool

_STOP = object()


@dataclass
class WriteJob:
    fd: int  # -1: nothing to write (a marker that only runs on_done)
    offset: int
    data: memoryview
    buffer: object | None = None  # returned to the pool after the write
    hasher: object | None = None  # FileHasher of the file
    before: Callable[[], None] | None = None  # e.g. wait for the device-to-host copy
    on_done: Callable[[], None] | None = None  # e.g. release input pages, close the file
    path: object = None


class Writer:
    """One writer thread and the pool of output buffers it returns to.

    Args:
        n_buffers: output buffers in flight (back-pressure on the scheduler).
        buffer_bytes: size of each.
        pinned: page-locked buffers (the device copies results into them).
    """

    def __init__(self, n_buffers: int, buffer_bytes: int, *, pinned: bool = False):
        self.pool = BufferPool(n_buffers, buffer_bytes, pinned=pinned, check=self.check)
        self.buffer_bytes = buffer_bytes
        self._jobs: queue.Queue = queue.Queue(maxsize=n_buffers + 2)
        self._error: BaseException | None = None
        # Each key is written by this thread only.
        self.busy: dict[str, float] = {"write": 0.0}
        self._thread = threading.Thread(target=self._run, name="resta-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            if isinstance(job, threading.Event):  # drain marker
                job.set()
                continue
            try:
                if self._error is None:
                    t0 = time.perf_counter()
                    if job.before is not None:
                        job.before()
                        t1 = time.perf_counter()
                        self.busy["wait_for_device"] = self.busy.get("wait_for_device", 0.0) + t1 - t0
                        t0 = t1
                    if job.fd >= 0:
                        write_all(job.fd, job.data, job.offset, job.path)
                        if job.hasher is not None:
                            job.hasher.wrote(job.offset, job.data.nbytes)
                    self.busy["write"] += time.perf_counter() - t0
                    if job.on_done is not None:
                        job.on_done()
            except BaseException as exc:  # noqa: BLE001 - handed to the scheduler
                self._error = exc
            finally:
                if job.buffer is not None:
                    self.pool.give(job.buffer)

    def check(self) -> None:
        """Raise the thread's first error, if any."""
        if self._error is not None:
            raise self._error
        if not self._thread.is_alive():
            raise RuntimeError("resta_fast writer thread died")

    def acquire(self):
        """A free output buffer (blocks while all are being written)."""
        self.check()
        return self.pool.acquire()

    def submit(self, job: WriteJob) -> None:
        self.check()
        self._jobs.put(job)

    def drain(self) -> None:
        """Wait until every submitted job is done; raise the first error."""
        done = threading.Event()
        self._jobs.put(done)
        while not done.wait(0.1):
            if not self._thread.is_alive():
                break
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the thread after pending jobs; safe to call twice."""
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join()
