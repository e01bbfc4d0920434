"""Device-independent staging: a bounded buffer pool and a writer thread.

The producer (kernel side) takes a buffer from the pool, fills it, and submits
it with its destination; the writer thread pwrites it, hashes it (output files
are written strictly in order, so a running sha256 per file costs no re-read)
and returns the buffer to the pool. The pool size bounds memory and gives
back-pressure; an error on either side stops both and is re-raised.
"""

from __future__ import annotations

import hashlib
import queue
import threading
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
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="resta-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            try:
                if self._error is None:
                    if job.before is not None:
                        job.before()
                    write_all(job.fd, job.data, job.offset, job.path)
                    if job.hasher is not None:
                        job.hasher.update(job.data)
                    if job.on_done is not None:
                        job.on_done()
            except BaseException as exc:  # noqa: BLE001 - handed to the producer
                self._error = exc
            finally:
                if job.buffer is not None:
                    self._free.put(job.buffer)
                if job.release is not None:
                    job.release()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def acquire(self) -> torch.Tensor:
        """A free buffer; blocks while all are in flight (back-pressure)."""
        while True:
            self._check()
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("resta_fast writer thread died") from self._error

    def submit(self, job: WriteJob) -> None:
        self._check()
        self._jobs.put(job)

    def give_back(self, buffer: torch.Tensor) -> None:
        """Return an unused buffer (e.g. after a kernel error)."""
        self._free.put(buffer)

    def drain(self) -> None:
        """Wait until every submitted write is done; raise the first error."""
        done = threading.Event()
        self._jobs.put(WriteJob(-1, 0, memoryview(b""), None, None, done.set))
        while not done.wait(0.1):
            self._check()
            if not self._thread.is_alive():
                break
        self._check()

    def close(self) -> None:
        """Stop the thread (after pending writes); safe to call twice."""
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join()


def new_hasher():
    return hashlib.sha256()
