"""How input chunks reach memory: zero-copy mmap views, or reader threads that
pread into reusable (pinned, on the GPU path) buffers.

The scheduler asks for chunk k+1 of every input while chunk k is computed, so
with ``ReadStaging`` the disk (or page cache copy) of the next chunk overlaps
the kernel and the writes of this one. Reading with pread also turns an input
truncated mid-run into a clean error naming the file, where touching a mapping
would kill the process with SIGBUS. ``MmapStaging`` hands out views of the
mapping and only asks the kernel to read ahead (and drops pages once used).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from resta_fast.io.reader import ITEMSIZE, NUMPY_STORAGE
from resta_fast.io.source import TensorSource
from resta_fast.pipeline.buffers import BufferPool


class Source:
    """One input tensor of one pass: a checkpoint and a tensor name.

    Host data is numpy (BF16 as its uint16 bits: ``reader.NUMPY_STORAGE``).
    File-backed sources (a ``Checkpoint``) are staged from their file; virtual
    ones (a LoRA-merged fine-tune, whose merged tensors live in memory) are
    read through their flat ``array``, made once per pass.
    """

    def __init__(self, ckpt: TensorSource, name: str):
        self.ckpt = ckpt
        self.name = name
        self.info = ckpt.info(name)
        self.dtype = NUMPY_STORAGE[self.info.dtype]
        self.itemsize = ITEMSIZE[self.info.dtype]
        self.file = ckpt.file_of(name)  # None for virtual (LoRA-merged) inputs
        self._view: np.ndarray | None = None

    @property
    def view(self) -> np.ndarray:
        if self._view is None:
            self._view = self.ckpt.array(self.name)
        return self._view

    def check(self) -> None:
        """Raise CheckpointError if the input file was modified or replaced."""
        if self.file is not None:
            self.file.check_unchanged()


class Ticket:
    """One staged chunk: ``get()`` waits for its bytes, ``release()`` frees them."""

    def __init__(self, view=None, future=None, buffer=None, pool=None, on_release=None):
        self._view, self._future, self._buffer, self._pool = view, future, buffer, pool
        self._on_release = on_release

    def get(self) -> np.ndarray:
        if self._future is not None:
            self._view = self._future.result()
            self._future = None
        return self._view

    def release(self, after=None) -> None:
        """Done with the chunk; with ``after`` (an event) once that completes."""
        if self._future is not None:  # an error elsewhere: let the read finish first
            try:
                self._future.result()
            except Exception:  # noqa: BLE001 - the read's own error is not this caller's
                pass
            self._future = None
        if self._buffer is not None:
            self._pool.give(self._buffer, after)
            self._buffer = None
        if self._on_release is not None:
            self._on_release()
            self._on_release = None
        self._view = None


class MmapStaging:
    """Zero-copy views of the mapped inputs; read-ahead and page release by madvise."""

    def __init__(self):
        self.busy: dict[str, float] = {}  # nothing is staged: no stage time

    def request(self, src: Source, lo: int, hi: int) -> Ticket:
        # Touching a page of a truncated mapping is a SIGBUS: checking before each
        # chunk narrows that window to one chunk (ReadStaging closes it).
        src.check()
        b_lo, b_hi = lo * src.itemsize, hi * src.itemsize
        src.ckpt.prefetch(src.name, b_lo, b_hi)  # this chunk is used next: start reading it
        return Ticket(view=src.view[lo:hi], on_release=lambda: src.ckpt.release(src.name, b_lo, b_hi))

    def close(self) -> None:
        pass


class ReadStaging:
    """A pool of reader threads preading input chunks into reusable buffers.

    Args:
        buffers: staging buffers (at most this many chunks of inputs in flight).
        buffer_bytes: size of each (a chunk of the widest input dtype).
        readers: reader threads.
        pinned: page-locked buffers (the GPU path copies from them asynchronously).
    """

    def __init__(self, buffers: int, buffer_bytes: int, readers: int, *, pinned: bool = False):
        self.pool = BufferPool(buffers, buffer_bytes, pinned=pinned)
        self._readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="resta-reader")
        self._lock = threading.Lock()
        self.busy: dict[str, float] = {"stage": 0.0}  # summed over the reader threads

    def request(self, src: Source, lo: int, hi: int) -> Ticket:
        src.check()
        if src.file is None:  # in memory already (a merged LoRA tensor)
            return Ticket(view=src.view[lo:hi])
        nbytes = (hi - lo) * src.itemsize
        if nbytes > self.pool.nbytes:
            raise AssertionError(f"internal error: chunk of {nbytes} bytes > staging buffer {self.pool.nbytes}")
        buf = self.pool.acquire()
        start = src.info.start + lo * src.itemsize
        future = self._readers.submit(self._read, src, buf, start, nbytes)
        return Ticket(future=future, buffer=buf, pool=self.pool)

    def _read(self, src: Source, buf: np.ndarray, start: int, nbytes: int) -> np.ndarray:
        t0 = time.perf_counter()
        dst = buf[:nbytes]
        src.file.read_into(dst.data, start, tensor=src.name)
        with self._lock:
            self.busy["stage"] += time.perf_counter() - t0
        return dst.view(src.dtype)

    def close(self) -> None:
        self._readers.shutdown(wait=True)
