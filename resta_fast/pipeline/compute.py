"""Where the arithmetic runs: the one place the engine knows about devices.

``Compute`` wraps a kernel backend (``patch_into``/``convert_into``) for a
device. On the CPU the kernel reads the staged host chunks and writes the
output buffer directly. On a GPU each staged chunk is copied to the device on
the ``h2d`` stream (once per chunk, whatever the number of jobs using it), the
kernels run on that stream, and each result is copied back into its pinned
output buffer on the ``d2h`` stream, so uploads and downloads use both copy
engines and overlap the kernels; the writer waits for the download's event.
Device tensors come from torch's caching allocator (``record_stream`` marks the
cross-stream use), so their reuse is ordered by the streams, not by us.
"""

from __future__ import annotations

import torch

from resta_fast.kernels import reference

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


class Compute:
    """A kernel backend on ``device`` (``cpu``, or ``cuda[:N]``).

    Args:
        kernel: a backend module (``resta_fast.kernels``).
        device: where the kernel's operands live.
        threads: kernel threads (CPU backends; None: their default).
    """

    def __init__(self, kernel, device: str = "cpu", threads: int | None = None):
        self.kernel = kernel
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.threads = threads
        if self.cuda:
            self.h2d = torch.cuda.Stream(self.device)
            self.d2h = torch.cuda.Stream(self.device)

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """The device copy of a staged host chunk (queued; the CPU uses it in place)."""
        if not self.cuda:
            return host
        with torch.cuda.stream(self.h2d):
            return host.to(self.device, non_blocking=True)

    def patch(self, out_host: torch.Tensor, f, a, u, b, *, beta: float, p: float, seed: int, offset: int,
              counter: torch.Tensor | None = None):
        """Patch one chunk into ``out_host`` (SPEC §2).

        Returns (event the writer waits for or None, non-finite count or None).
        On a GPU the count is added to ``counter`` (a device scalar, read once
        per job) instead, so the stream never stalls on it.
        """
        if not self.cuda:
            bad = self.kernel.patch_into(out_host, f, a, u, b, beta=beta, p=p, seed=seed, offset=offset,
                                         threads=self.threads)
            return None, _count_nonfinite(out_host) if bad is None else bad
        with torch.cuda.stream(self.h2d):
            dst = torch.empty(out_host.numel(), dtype=out_host.dtype, device=self.device)
            self.kernel.patch_into(dst, f, a, u, b, beta=beta, p=p, seed=seed, offset=offset)
            counter += (~torch.isfinite(dst)).sum()
            computed = torch.cuda.Event()
            computed.record(self.h2d)
        self.d2h.wait_event(computed)
        with torch.cuda.stream(self.d2h):
            out_host.copy_(dst, non_blocking=True)
            dst.record_stream(self.d2h)  # not reused before the download is done
            landed = torch.cuda.Event()
            landed.record(self.d2h)
        return landed, None

    def new_counter(self) -> torch.Tensor | None:
        """A non-finite counter for one tensor of one job (GPU only), zeroed on the
        stream that adds to it."""
        if not self.cuda:
            return None
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
        done = torch.cuda.Event()
        done.record(self.h2d)
        return done

    def convert(self, out_host: torch.Tensor, x_host: torch.Tensor) -> None:
        """dtype conversion of a copied tensor, on the host (SPEC rounding)."""
        if self.cuda:
            reference.convert_into(out_host, x_host)  # a host-side copy: no device trip
        else:
            self.kernel.convert_into(out_host, x_host)


def _count_nonfinite(x: torch.Tensor) -> int:
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
    usual, so the budget only trades memory for transfers.

    Example:
        >>> cache = DeviceCache("cpu", budget_bytes=0)
        >>> cache.used, cache.hits
        (0, 0)
    """

    def __init__(self, device: str, budget_bytes: int | None = None):
        self.device = torch.device(device)
        if budget_bytes is None:
            # Half of what is free now: the rest stays for the pipeline and the kernel.
            budget_bytes = torch.cuda.mem_get_info(self.device)[0] // 2 if self.device.type == "cuda" else 0
        self.budget = budget_bytes
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._tensors: dict[tuple[str, str], torch.Tensor] = {}

    def get(self, source) -> torch.Tensor | None:
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
        cached = torch.empty(source.info.numel, dtype=source.dtype, device=self.device)
        cached.copy_(source.view)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # visible to the other streams
        self._tensors[key] = cached
        self.used += nbytes
        self.misses += 1
        return cached
