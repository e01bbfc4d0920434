"""Where the arithmetic runs: the one place the engine knows about devices.

The engine's host data are flat numpy arrays (BF16 as its uint16 bits).
``Compute`` hands them to a kernel backend: the C++ kernel takes them as they
are (``cpp.patch_arrays``), so the CPU path needs no torch; the torch reference
and the Triton kernel get zero-copy torch views. On a GPU each staged chunk is
copied to the device on the ``h2d`` stream (once per chunk, whatever the number
of jobs using it), the kernels run on that stream, and each result is copied
back into its pinned output buffer on the ``d2h`` stream, so uploads and
downloads use both copy engines and overlap the kernels; the writer waits for
the download's event. Device tensors come from torch's caching allocator
(``record_stream`` marks the cross-stream use), so their reuse is ordered by the
streams, not by us.
"""

from __future__ import annotations

import numpy as np

# 256 MiB of pinned host memory (and as much on the device) by default: chunks
# of ~85 MiB keep a PCIe 5 link (~50 GB/s) busy for ~2 ms per chunk, which hides
# per-chunk launch and event overhead.
DEFAULT_POOL_BYTES = 256 << 20
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


def as_torch(x):
    """A zero-copy torch view of a host array (uint16 is BF16's bits); torch tensors pass through."""
    if x is None or not isinstance(x, np.ndarray):
        return x
    import torch

    if x.dtype == np.uint16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


class Compute:
    """A kernel backend on ``device`` (``cpu``, or ``cuda[:N]``).

    Args:
        kernel: a backend module (``resta_fast.kernels``).
        device: where the kernel's operands live.
        threads: kernel threads (CPU backends; None: their default).
    """

    def __init__(self, kernel, device: str = "cpu", threads: int | None = None):
        self.kernel = kernel
        self.cuda = device.startswith("cuda")
        self.threads = threads
        # The C++ kernel reads numpy arrays directly; other backends get torch views.
        self.native = not self.cuda and hasattr(kernel, "patch_arrays")
        if self.cuda:
            import torch

            self.device = torch.device(device)
            self.h2d = torch.cuda.Stream(self.device)
            self.d2h = torch.cuda.Stream(self.device)

    def upload(self, host: np.ndarray):
        """The device copy of a staged host chunk (queued); the CPU uses it in place."""
        if not self.cuda:
            return host
        import torch

        with torch.cuda.stream(self.h2d):
            return as_torch(host).to(self.device, non_blocking=True)

    def patch(self, out_host: np.ndarray, f, a, u, b, *, beta: float, p: float, seed: int, offset: int, counter=None):
        """Patch one chunk into ``out_host`` (docs/spec.md §2).

        Returns (event the writer waits for or None, non-finite count or None).
        On a GPU the count is added to ``counter`` (a device scalar, read once
        per job) instead, so the stream never stalls on it.
        """
        if self.native:
            return None, self.kernel.patch_arrays(
                out_host, f, a, u, b, beta=beta, p=p, seed=seed, offset=offset, threads=self.threads
            )
        if not self.cuda:
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
        import torch

        host_out = as_torch(out_host)
        with torch.cuda.stream(self.h2d):
            dst = torch.empty(host_out.numel(), dtype=host_out.dtype, device=self.device)
            self.kernel.patch_into(dst, f, a, u, b, beta=beta, p=p, seed=seed, offset=offset)
            counter += (~torch.isfinite(dst)).sum()
            computed = torch.cuda.Event()
            computed.record(self.h2d)
        self.d2h.wait_event(computed)
        with torch.cuda.stream(self.d2h):
            host_out.copy_(dst, non_blocking=True)
            dst.record_stream(self.d2h)  # not reused before the download is done
            landed = torch.cuda.Event()
            landed.record(self.d2h)
        return landed, None

    def new_counter(self):
        """A non-finite counter for one tensor of one job (GPU only), zeroed on the
        stream that adds to it."""
        if not self.cuda:
            return None
        import torch

        with torch.cuda.stream(self.h2d):
            return torch.zeros((), dtype=torch.int64, device=self.device)

    def synchronize(self) -> None:
        """Wait for all queued device work (before counters are read)."""
        if self.cuda:
            self.h2d.synchronize()
            self.d2h.synchronize()

    def inputs_done(self):
        """An event after which this chunk's staged host buffers may be reused (None: now)."""
        if not self.cuda:
            return None
        import torch

        done = torch.cuda.Event()
        done.record(self.h2d)
        return done

    def convert(self, out_host: np.ndarray, x_host: np.ndarray) -> None:
        """dtype conversion of a copied tensor, on the host (docs/spec.md §2 rounding; no device trip)."""
        if self.native:
            self.kernel.convert_arrays(out_host, x_host, threads=self.threads)
        elif self.cuda:
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

    def get(self, source):
        """The whole tensor on the device, uploading it on first use; None if it
        does not fit the budget."""
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
        if self.cuda:
            import torch

            cached = as_torch(source.view).to(torch.device(self.device))
            torch.cuda.current_stream(cached.device).synchronize()  # visible to the other streams
        else:
            cached = source.view.copy()
        self._tensors[key] = cached
        self.used += nbytes
        self.misses += 1
        return cached
