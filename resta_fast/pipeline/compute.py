"""Where the arithmetic runs, and the waits that make a device's copies safe.

The engine's host data are flat numpy arrays (BF16 as its uint16 bits).
``Compute`` hands them to a kernel backend: the C++ kernel takes them as they
are (``cpp.patch_arrays``), so the CPU path needs no torch; the torch reference
and the Triton kernel get zero-copy torch views. On a device (``device.py``)
each staged chunk is copied up on the ``h2d`` stream (once per chunk, whatever
the number of jobs using it), the kernels run on that stream, and each result
is copied back into its pinned output buffer on the ``d2h`` stream, so uploads
and downloads use both copy engines and overlap the kernels. Every wait between
them is asked for here, for every device:

- the download waits for its kernel's event (``d2h`` waits on ``h2d``);
- the kernel's output memory is marked as used by ``d2h`` (``record_stream``),
  so the allocator does not hand it to the next kernel before it is copied down;
- ``patch`` returns the download's event: the writer waits for it before it
  reads the host buffer (engine.py);
- ``inputs_done`` is an event after the chunk's kernels: its staged host
  buffers go back to their pool with it, and are handed out again only once it
  has completed (buffers.py);
- ``synchronize`` before the non-finite counters are read;
- a whole tensor kept for the device cache is copied with a blocking copy and
  its stream synchronized, so every stream may read it.

tests/test_device_standin.py removes them one at a time, on an asynchronous
stand-in for a device, and checks that the run goes wrong (docs/gpu.md says
which test catches which).
"""

from __future__ import annotations

import numpy as np

from resta_fast.pipeline.device import Device, as_torch

DEFAULT_SLOTS = 3
MAX_INPUTS = 4  # F, A, U/V, B


def chunk_elems_for_pool(pool_bytes: int, slots: int) -> int:
    """Largest chunk whose slots (MAX_INPUTS + 1 fp32 buffers each) fit the pool.

    A multiple of 1024 elements, so every chunk but a tensor's last starts on a
    16-byte boundary and the Triton kernel keeps its vectorised loads.

    Example:
        >>> chunk_elems_for_pool(1, 3)
        1024
    """
    per_elem = 4 * (MAX_INPUTS + 1)
    return max(1024, pool_bytes // (slots * per_elem) // 1024 * 1024)


class Compute:
    """A kernel backend on the host (``device`` None) or on a ``Device``.

    Args:
        kernel: a backend module (``resta_fast.kernels``).
        device: where the kernel's operands live (``device.open_device``); None: host arrays.
        threads: kernel threads (host backends; None: their default).

    Example:
        >>> from resta_fast.kernels import reference
        >>> out = np.empty(2, np.float32)
        >>> Compute(reference).patch(out, np.zeros(2, np.float32), np.ones(2, np.float32), None, None,
        ...                          beta=0.5, p=0.0, seed=0, offset=0), out.tolist()
        ((None, 0), [0.5, 0.5])
    """

    def __init__(self, kernel, device: Device | None = None, threads: int | None = None):
        self.kernel = kernel
        self.device = device
        self.threads = threads
        # The C++ kernel reads numpy arrays directly; other backends get torch views.
        self.native = device is None and hasattr(kernel, "patch_arrays")

    def upload(self, host: np.ndarray):
        """The device copy of a staged host chunk (queued); the host uses it in place."""
        if self.device is None:
            return host
        return self.device.upload(host, self.device.h2d)

    def patch(self, out_host: np.ndarray, f, a, u, b, *, beta: float, p: float, seed: int, offset: int, counter=None):
        """Patch one chunk into ``out_host`` (docs/spec.md §2).

        Returns (event the writer waits for or None, non-finite count or None).
        On a device the count is added to ``counter`` (a device integer, read
        once per job after ``synchronize``) instead, so the stream never stalls on it.
        """
        if self.native:
            return None, self.kernel.patch_arrays(
                out_host, f, a, u, b, beta=beta, p=p, seed=seed, offset=offset, threads=self.threads
            )
        dev = self.device
        if dev is None:
            out = as_torch(out_host)
            bad = self.kernel.patch_into(
                out,
                as_torch(f),
                as_torch(a),
                as_torch(u),
                as_torch(b),
                beta=beta,
                p=p,
                seed=seed,
                offset=offset,
                threads=self.threads,
            )
            return None, _count_nonfinite(out) if bad is None else bad
        dst = dev.empty(out_host, dev.h2d)
        dev.run(self.kernel, dev.h2d, dst, f, a, u, b, beta=beta, p=p, seed=seed, offset=offset, counter=counter)
        computed = dev.record(dev.h2d)
        dev.wait(dev.d2h, computed)  # the download copies what the kernel wrote, not what was there
        dev.download(out_host, dst, dev.d2h)
        dev.used_by(dst, dev.d2h)  # dst is freed on return: not reused before the download is done
        return dev.record(dev.d2h), None

    def new_counter(self):
        """A non-finite counter for one tensor of one job (devices only), zeroed on
        the stream that adds to it."""
        if self.device is None:
            return None
        return self.device.counter(self.device.h2d)

    def synchronize(self) -> None:
        """Wait for all queued device work (before counters are read)."""
        if self.device is not None:
            self.device.synchronize(self.device.h2d)
            self.device.synchronize(self.device.d2h)

    def inputs_done(self):
        """An event after which this chunk's staged host buffers may be reused (None: now)."""
        if self.device is None:
            return None
        return self.device.record(self.device.h2d)

    def keep(self, host: np.ndarray):
        """A whole tensor copied for good (the device cache), readable from every stream."""
        if self.device is None:
            return host.copy()
        dev = self.device
        main = dev.main
        kept = dev.upload(host, main, non_blocking=False)
        dev.synchronize(main)  # visible to the other streams
        return kept

    def convert(self, out_host: np.ndarray, x_host: np.ndarray) -> None:
        """dtype conversion of a copied tensor, on the host (docs/spec.md §2 rounding; no device trip)."""
        if self.native:
            self.kernel.convert_arrays(out_host, x_host, threads=self.threads)
        elif self.device is not None:
            from resta_fast.kernels import reference

            reference.convert_into(as_torch(out_host), as_torch(x_host))
        else:
            self.kernel.convert_into(as_torch(out_host), as_torch(x_host))


def _count_nonfinite(x) -> int:
    """Non-finite values in a torch tensor (for backends that do not count in-kernel)."""
    import torch

    if x.numel() == 0:
        return 0
    # One fp32-accumulated sum is finite for almost every chunk, and is 2x
    # cheaper than isfinite(); only a non-finite (or overflowing) sum pays for
    # the exact count.
    if bool(torch.isfinite(x.sum(dtype=torch.float32))):
        return 0
    finite = torch.isfinite(x)
    return 0 if bool(finite.all()) else int((~finite).sum())


class DeviceCache:
    """Shared inputs kept on the device across the passes of a batch.

    A fused pass already uploads each shared chunk once for all its jobs; the
    cache helps when the same shared inputs come back in a later pass (a batch
    split into several groups): the first pass uploads each tensor whole
    (while it fits ``budget_bytes``), later passes read it from device memory
    and skip its staging and upload. Tensors that do not fit are streamed as
    usual, so the budget only trades memory for transfers. On ``cpu`` (tests)
    the cache holds host copies.

    Example:
        >>> cache = DeviceCache("cpu", budget_bytes=0)
        >>> cache.used, cache.hits
        (0, 0)
    """

    def __init__(self, device: str, budget_bytes: int | None = None):
        self.device = device
        self.cuda = device.startswith("cuda")
        if budget_bytes is None:
            # Half of what is free now: the rest stays for the pipeline and the kernel.
            if self.cuda:
                import torch

                budget_bytes = torch.cuda.mem_get_info(torch.device(device))[0] // 2
            else:
                budget_bytes = 0
        self.budget = budget_bytes
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._tensors: dict[tuple[str, str], object] = {}

    def get(self, source, keep):
        """The whole tensor on the device, copied there by ``keep`` (``Compute.keep``)
        on first use; None if it does not fit the budget."""
        key = (str(source.ckpt.path), source.name)
        cached = self._tensors.get(key)
        if cached is not None:
            self.hits += 1
            return cached
        nbytes = source.info.numel * source.itemsize
        if self.used + nbytes > self.budget:
            self.misses += 1
            return None
        source.check()
        cached = keep(source.view)
        self._tensors[key] = cached
        self.used += nbytes
        self.misses += 1
        return cached
