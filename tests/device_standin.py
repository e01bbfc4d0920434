"""An asynchronous stand-in for a GPU: pipeline/device.py's ``Device`` on a machine without one.

On CPU buffers every copy is synchronous, so a wait missing from the engine can never show.
Here it does. Each stream is a worker thread that runs its queue in order, each operation after
a random, seeded delay; a copy lands when it runs, not when it is queued; an event completes
when its stream reaches it; a stream waits for another only where the engine asked (``wait``).
Device memory is numpy storage owned by the stand-in, handed out by a stream-ordered allocator
that reuses memory as torch's caching allocator does: a block freed on the host is reused by the
next allocation on its stream at once, unless ``used_by`` named another stream that may still
read it (``record_stream``). What a missing wait does then shows as wrong bytes or a race:

- a download's host buffer is poisoned from the moment the copy is queued until it lands, so a
  writer that does not wait for the download's event writes garbage;
- an upload checks, when it runs, that its host buffer still holds what it held when the copy
  was queued: a staging buffer refilled while its upload was pending is a race;
- reading a non-finite counter while work that adds to it is still queued is a race;
- device memory is poisoned when it is allocated, so a kernel or a download that runs before
  the work it depends on reads garbage.

Races are collected in ``races`` and raised as ``RaceError`` by the next ``Event.synchronize``
or ``synchronize``, so they fail the run. The kernel is the host backend the engine was given
(the C++ kernel on numpy storage, or any ``patch_into`` on torch views of it).

    dev = StandinDevice(seed=3)
    engine.run_jobs(jobs, kernel=reference, device=dev)
    dev.close()
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import Counter

import numpy as np

from resta_fast.pipeline.device import as_torch

STREAMS = ("h2d", "d2h", "main")
DEVICE_POISON = 0xFF  # never-written device memory: NaN in bf16, fp16 and fp32
HOST_POISON = 0xA5  # a host buffer whose download has not landed yet


class RaceError(AssertionError):
    """The engine touched memory before the device work it depends on had run."""


class StandinEvent:
    """Completes when its stream reaches it; ``synchronize`` also raises the device's races."""

    def __init__(self, device: StandinDevice):
        self._device = device
        self._done = threading.Event()

    def synchronize(self) -> None:
        self._done.wait()
        self._device.check()

    def query(self) -> bool:
        return self._done.is_set()


class Stream:
    """A worker thread running its queue in order, each operation after a seeded random delay."""

    def __init__(self, device: StandinDevice, name: str, delay: tuple[float, float], seed: int):
        self.name = name
        self._device = device
        self._delay = delay
        self._rng = random.Random(f"{seed}:{name}")  # used by the worker only
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # put() is safe from __del__
        self._running = threading.Event()  # cleared by hold(): the worker starts nothing until release()
        self._running.set()
        self._thread = threading.Thread(target=self._run, name=f"standin-{name}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"<stream {self.name}>"

    def put(self, op) -> None:
        self._queue.put(op)

    def hold(self) -> None:
        """Start no further operation until ``release`` (tests that need an order, not a likely one)."""
        self._running.clear()

    def release(self) -> None:
        self._running.set()

    def _run(self) -> None:
        while True:
            op = self._queue.get()
            if op is None:
                return
            self._running.wait()
            lo, hi = self._delay
            pause = self._rng.uniform(lo, hi)
            if pause > 0:
                time.sleep(pause)
            try:
                op()
            except BaseException as exc:  # noqa: BLE001 - an asynchronous failure surfaces at the next sync
                self._device.failures.append(exc)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


class _Block:
    """Device memory: bytes, the stream it was allocated on, the other streams that use it."""

    def __init__(self, nbytes: int, stream: Stream):
        self.data = np.empty(max(nbytes, 1), np.uint8)
        self.data.fill(DEVICE_POISON)
        self.stream = stream
        self.users: set[Stream] = set()
        self.pending: list[StandinEvent] = []  # events recorded on the users when it was freed


class _Owner:
    """The engine's hold on a block: when its last Array goes, the block is freed (as a torch tensor)."""

    def __init__(self, device: StandinDevice, block: _Block):
        self.device = device
        self.block = block

    def __del__(self):
        self.device._free(self.block)


class Array:
    """Device memory as the engine sees it: a length and slicing, nothing to read on the host."""

    def __init__(self, owner: _Owner, dtype: np.dtype, lo: int, n: int):
        self.owner, self.dtype, self.lo, self.n = owner, np.dtype(dtype), lo, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: slice) -> Array:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"device arrays take contiguous slices only, got {key!r}")
        r = range(self.n)[key]
        return Array(self.owner, self.dtype, self.lo + r.start, len(r))

    def storage(self) -> np.ndarray:
        """The numpy view of the memory (for the stand-in's own operations)."""
        size = self.dtype.itemsize
        return self.owner.block.data[self.lo * size : (self.lo + self.n) * size].view(self.dtype)


class StandinCounter:
    """A device integer: garbage until its zeroing runs; reading it with work still queued is a race."""

    def __init__(self, device: StandinDevice):
        self._device = device
        self._lock = threading.Lock()
        self.value = -0x5A5A5A5A  # what uninitialised device memory might hold
        self.queued = 0  # operations writing it that have not run

    def _queue(self) -> None:
        with self._lock:
            self.queued += 1

    def _set(self, value: int, add: bool) -> None:
        with self._lock:
            self.value = self.value + value if add else value
            self.queued -= 1

    def __int__(self) -> int:
        with self._lock:
            queued, value = self.queued, self.value
        if queued:
            self._device.race(f"a non-finite counter was read with {queued} operation(s) on it still queued")
            self._device.check()
        return int(value)


class StandinDevice:
    """The ``Device`` interface with asynchronous streams (see the module docstring).

    Args:
        seed: seeds every stream's delays.
        delay: the longest random delay before each operation, in seconds.
        delays: per stream (``h2d``, ``d2h``, ``main``), a longest delay or a ``(lo, hi)``
            range, to force an ordering (a slow download stream, say).
        pool_bytes: the host pool the engine sizes its chunks from (1: the smallest chunks).
    """

    pinned = False

    def __init__(self, seed: int = 0, delay: float = 0.0005, delays: dict | None = None, pool_bytes: int = 1):
        self.pool_bytes = pool_bytes
        self.races: list[str] = []
        self.failures: list[BaseException] = []
        self.calls: Counter = Counter()  # primitive -> times the engine called it
        self.reused = 0  # allocations served from freed memory
        self._lock = threading.RLock()
        self._free_blocks: list[_Block] = []
        self._closed = False
        self.streams: dict[str, Stream] = {}
        for name in STREAMS:
            d = (delays or {}).get(name, delay)
            self.streams[name] = Stream(self, name, d if isinstance(d, tuple) else (0.0, d), seed)
        self.h2d, self.d2h = self.streams["h2d"], self.streams["d2h"]

    @property
    def main(self) -> Stream:
        return self.streams["main"]

    # --- memory -----------------------------------------------------------------------------

    def _alloc(self, nbytes: int, stream: Stream) -> tuple[_Block, bool]:
        """A block for ``stream``: the smallest freed one of that stream whose other users are
        done with it (as torch's allocator), else fresh memory. Returns (block, fresh)."""
        with self._lock:
            best = None
            for blk in self._free_blocks:
                if blk.stream is stream and blk.data.nbytes >= nbytes and all(e.query() for e in blk.pending):
                    if best is None or blk.data.nbytes < best.data.nbytes:
                        best = blk
            if best is None:
                return _Block(nbytes, stream), True
            self._free_blocks.remove(best)
            best.users, best.pending = set(), []
            self.reused += 1
            return best, False

    def _free(self, block: _Block) -> None:
        with self._lock:
            if self._closed:
                return
            block.pending = [self._record(s) for s in block.users]
            self._free_blocks.append(block)

    def _array(self, block: _Block, dtype, n: int) -> Array:
        return Array(_Owner(self, block), dtype, 0, n)

    # --- the Device interface ------------------------------------------------------------------

    def upload(self, host: np.ndarray, stream: Stream, *, non_blocking: bool = True) -> Array:
        self.calls["upload"] += 1
        block, _ = self._alloc(host.nbytes, stream)
        arr = self._array(block, host.dtype, host.size)
        dst, queued = arr.storage(), host.copy()

        def copy():
            if not np.array_equal(host.view(np.uint8), queued.view(np.uint8)):
                self.race(
                    f"upload on {stream.name}: its host buffer changed between queueing and copying "
                    "(a staging buffer was reused before the upload's event)"
                )
            dst[...] = host

        stream.put(copy)
        if not non_blocking:  # torch's blocking copy returns after the copy
            self._record(stream).synchronize()
        return arr

    def empty(self, like: np.ndarray, stream: Stream) -> Array:
        self.calls["empty"] += 1
        block, fresh = self._alloc(like.nbytes, stream)
        arr = self._array(block, like.dtype, like.size)
        if not fresh:  # poisoned in the stream's order: earlier work of this stream may still read it
            mem = arr.storage().view(np.uint8)
            stream.put(lambda: mem.fill(DEVICE_POISON))
        return arr

    def run(self, kernel, stream: Stream, dst: Array, f, a, u, b, *, beta, p, seed, offset, counter) -> None:
        self.calls["run"] += 1
        out = dst.storage()
        ins = [None if x is None else x.storage() for x in (f, a, u, b)]
        if counter is not None:
            counter._queue()

        def launch():
            if hasattr(kernel, "patch_arrays"):
                kernel.patch_arrays(out, *ins, beta=beta, p=p, seed=seed, offset=offset, threads=1)
            else:
                kernel.patch_into(as_torch(out), *map(as_torch, ins), beta=beta, p=p, seed=seed, offset=offset)
            if counter is not None:
                counter._set(nonfinite(out), add=True)

        stream.put(launch)

    def download(self, host: np.ndarray, src: Array, stream: Stream) -> None:
        self.calls["download"] += 1
        host.view(np.uint8).fill(HOST_POISON)  # undefined until the copy lands
        data = src.storage()
        stream.put(lambda: np.copyto(host, data))

    def used_by(self, array: Array, stream: Stream) -> None:
        self.calls["used_by"] += 1
        block = array.owner.block
        if stream is not block.stream:
            block.users.add(stream)

    def record(self, stream: Stream) -> StandinEvent:
        self.calls["record"] += 1
        return self._record(stream)

    def _record(self, stream: Stream) -> StandinEvent:
        event = StandinEvent(self)
        stream.put(event._done.set)
        return event

    def wait(self, stream: Stream, event: StandinEvent) -> None:
        self.calls["wait"] += 1
        stream.put(event._done.wait)

    def synchronize(self, stream: Stream) -> None:
        self.calls["synchronize"] += 1
        self._record(stream).synchronize()

    def counter(self, stream: Stream) -> StandinCounter:
        self.calls["counter"] += 1
        c = StandinCounter(self)
        c._queue()
        stream.put(lambda: c._set(0, add=False))
        return c

    # --- results -------------------------------------------------------------------------------

    def race(self, what: str) -> None:
        self.races.append(what)

    def check(self) -> None:
        """Raise the first race (RaceError) or failed operation seen so far."""
        if self.races:
            raise RaceError(f"{len(self.races)} race(s) on the stand-in device; first: {self.races[0]}")
        if self.failures:
            raise RuntimeError(f"an operation on the stand-in device failed: {self.failures[0]!r}")

    def close(self) -> None:
        """Let every stream run out its queue, then stop it."""
        with self._lock:
            self._closed = True  # memory freed from now on is not recorded on a stopping stream
        for stream in self.streams.values():
            stream.release()
            stream.close()


def nonfinite(x: np.ndarray) -> int:
    """Non-finite elements of a host array (uint16 is BF16's bits: exponent all ones)."""
    if x.dtype == np.uint16:
        return int(np.count_nonzero((x & 0x7F80) == 0x7F80))
    return int(np.count_nonzero(~np.isfinite(x)))
