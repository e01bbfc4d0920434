"""A bounded pool of reusable byte buffers: the engine's memory bound and back-pressure.

Buffers are allocated once and touched at creation (first touch of fresh memory
is slow, and a run should not pay it inside its timed loop); on the GPU path
they are pinned so device copies from and to them are asynchronous. A buffer
given back with ``after`` (a CUDA event: an async copy still reads it) is
handed out again only once that event has completed.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

import numpy as np


def host_buffer(nbytes: int, pinned: bool = False) -> np.ndarray:
    """``nbytes`` of host memory as a uint8 numpy array (page-locked when ``pinned``,
    which needs torch with CUDA), touched once."""
    if pinned:
        import torch  # only the GPU path pins memory

        pinned_buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        pinned_buf.fill_(0)
        return pinned_buf.numpy()  # shares the memory and keeps the tensor alive
    buf = np.empty(nbytes, dtype=np.uint8)
    buf.fill(0)
    return buf


class BufferPool:
    """``count`` buffers of ``nbytes`` each; ``acquire`` blocks while all are in use.

    Args:
        count: buffers in the pool (allocated on first need, never more).
        nbytes: size of each.
        pinned: page-locked host memory (GPU staging).
        check: called while waiting, so an error elsewhere (the writer thread)
            surfaces instead of a hang.
    """

    def __init__(self, count: int, nbytes: int, *, pinned: bool = False, check: Callable[[], None] | None = None):
        self.count = count
        self.nbytes = nbytes
        self.pinned = pinned
        self._made = 0
        self._free: queue.Queue = queue.Queue()
        self._check = check
        self.waited = 0.0  # seconds acquire() blocked: the consumer is the bottleneck

    def acquire(self) -> np.ndarray:
        """A free buffer; blocks while all are in flight."""
        try:
            buf, after = self._free.get_nowait()
        except queue.Empty:
            if self._made < self.count:
                self._made += 1
                return host_buffer(self.nbytes, self.pinned)
            t0 = time.perf_counter()
            while True:
                if self._check is not None:
                    self._check()
                try:
                    buf, after = self._free.get(timeout=0.1)
                    break
                except queue.Empty:
                    continue
            self.waited += time.perf_counter() - t0
        if after is not None:
            after.synchronize()  # an async device copy may still read it
        return buf

    def give(self, buf: np.ndarray, after=None) -> None:
        """Return ``buf``; with ``after`` (an event), reusable once it completes."""
        self._free.put((buf, after))
