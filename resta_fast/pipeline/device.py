"""What the engine asks of an accelerator, and its one real implementation: CUDA.

A ``Device`` owns streams (``h2d`` for uploads and kernels, ``d2h`` for
downloads, ``main`` for whole-tensor copies) and queues work on them: copy a
staged host chunk up, run the kernel, copy a result down into a host buffer,
record an event, make a stream wait for an event, wait for a stream. Every call
returns as soon as the work is queued. Which stream waits for what, and when a
host buffer may be touched again, is decided once, in ``compute.Compute``, for
every device; ``CudaDevice`` only makes the torch.cuda calls. The test suite's
asynchronous stand-in (``tests/device_standin.py``) implements the same
interface with worker threads and random delays, so a wait missing from the
engine shows as wrong bytes or a detected race on a machine without a GPU.

Host arrays are flat numpy (BF16 as its uint16 bits); device arrays are
whatever the device makes (torch tensors on CUDA) and only need slicing.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

# 256 MiB of pinned host memory (and as much on the device) by default: chunks
# of ~85 MiB keep a PCIe 5 link (~50 GB/s) busy for ~2 ms per chunk, which hides
# per-chunk launch and event overhead.
DEFAULT_POOL_BYTES = 256 << 20


class Event(Protocol):
    """A point in a stream's queue; completes when the stream has run up to it."""

    def synchronize(self) -> None: ...


class Device(Protocol):
    """What the engine asks of a device (see the module docstring).

    Attributes:
        pinned: host buffers must be page-locked for asynchronous copies.
        pool_bytes: the default size of the host buffer pool (sets the chunk size).
        h2d, d2h, main: the streams (uploads and kernels, downloads, whole tensors).
    """

    pinned: bool
    pool_bytes: int
    h2d: Any
    d2h: Any

    @property
    def main(self) -> Any: ...

    def upload(self, host: np.ndarray, stream, *, non_blocking: bool = True):
        """Queue a copy of ``host`` to new device memory on ``stream``; return that memory.
        ``non_blocking=False`` returns after the copy (as torch's blocking copy does)."""

    def empty(self, like: np.ndarray, stream):
        """New device memory of ``like``'s dtype and length, allocated in ``stream``'s order."""

    def run(self, kernel, stream, dst, f, a, u, b, *, beta, p, seed, offset, counter) -> None:
        """Queue ``kernel.patch_into(dst, f, a, u, b, ...)`` on ``stream``, then add
        the count of non-finite ``dst`` elements to ``counter``."""

    def download(self, host: np.ndarray, src, stream) -> None:
        """Queue a copy of device ``src`` into ``host`` on ``stream``; ``host`` holds
        it once an event recorded after it completes."""

    def used_by(self, array, stream) -> None:
        """``array`` is used by ``stream`` (not its own): its memory is not reused
        before ``stream`` is done with it (torch's ``record_stream``)."""

    def record(self, stream) -> Event:
        """An event at the current end of ``stream``'s queue."""

    def wait(self, stream, event: Event) -> None:
        """Work queued on ``stream`` from now on starts after ``event``."""

    def synchronize(self, stream) -> None:
        """Block until ``stream`` has run everything queued on it."""

    def counter(self, stream):
        """A zeroed device integer that ``run`` on ``stream`` adds to; ``int()`` reads it."""


class CudaDevice:
    """A CUDA GPU: torch streams, events and copies (the calls the engine always made).

    Example:
        >>> dev = CudaDevice("cuda")  # doctest: +SKIP
        >>> x = dev.upload(np.ones(4, np.float32), dev.h2d); dev.synchronize(dev.h2d)  # doctest: +SKIP
    """

    pinned = True
    pool_bytes = DEFAULT_POOL_BYTES

    def __init__(self, name: str = "cuda"):
        import torch

        self.torch = torch
        self.device = torch.device(name)
        self.h2d = torch.cuda.Stream(self.device)
        self.d2h = torch.cuda.Stream(self.device)

    @property
    def main(self):
        return self.torch.cuda.current_stream(self.device)

    def upload(self, host: np.ndarray, stream, *, non_blocking: bool = True):
        with self.torch.cuda.stream(stream):
            return as_torch(host).to(self.device, non_blocking=non_blocking)

    def empty(self, like: np.ndarray, stream):
        with self.torch.cuda.stream(stream):
            return self.torch.empty(like.size, dtype=as_torch(like).dtype, device=self.device)

    def run(self, kernel, stream, dst, f, a, u, b, *, beta, p, seed, offset, counter) -> None:
        with self.torch.cuda.stream(stream):
            kernel.patch_into(dst, f, a, u, b, beta=beta, p=p, seed=seed, offset=offset)
            counter += (~self.torch.isfinite(dst)).sum()

    def download(self, host: np.ndarray, src, stream) -> None:
        with self.torch.cuda.stream(stream):
            as_torch(host).copy_(src, non_blocking=True)

    def used_by(self, array, stream) -> None:
        array.record_stream(stream)

    def record(self, stream):
        event = self.torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, stream, event) -> None:
        stream.wait_event(event)

    def synchronize(self, stream) -> None:
        stream.synchronize()

    def counter(self, stream):
        with self.torch.cuda.stream(stream):
            return self.torch.zeros((), dtype=self.torch.int64, device=self.device)


def open_device(name: str) -> Device | None:
    """The device for a ``--device`` value: None for ``cpu`` (kernels run on host
    arrays), a ``CudaDevice`` for ``cuda`` or ``cuda:N``.

    Example:
        >>> open_device("cpu") is None
        True
    """
    if name == "cpu":
        return None
    if name.startswith("cuda"):
        return CudaDevice(name)
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {name!r}")


def as_torch(x):
    """A zero-copy torch view of a host array (uint16 is BF16's bits); anything else passes through.

    Example:
        >>> as_torch(np.zeros(2, np.uint16)).dtype
        torch.bfloat16
    """
    if x is None or not isinstance(x, np.ndarray):
        return x
    import torch

    if x.dtype == np.uint16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)
