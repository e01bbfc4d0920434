"""The GPU streaming pipeline: mmap -> pinned -> device -> kernel -> pinned -> file.

A bounded pool of *slots* (each: pinned host buffers for every input and the
output, plus the matching device buffers) carries chunks through four stages
that overlap across slots:

    host     copy the mmap'd input bytes into the slot's pinned buffers
    h2d      async copies on the copy stream            (event: inputs ready)
    kernel   the Triton kernel on the compute stream    (event: output ready)
    d2h      async copy back on the copy stream         (event: host output ready)
    write    the writer thread waits for that event, pwrites, returns the slot

With >= 2 slots, chunk k+1's host copy and H2D run while chunk k computes and
chunk k-1 is written; the pool size bounds pinned and device memory and gives
back-pressure. The scheduling is device-agnostic: with ``device="cpu"`` streams
and events are no-ops and buffers are ordinary memory, which is how the
ordering, chunking, back-pressure and error paths are tested without a GPU.
"""

from __future__ import annotations

import contextlib
import queue
import time

import torch

from resta_fast.io.reader import DTYPES
from resta_fast.io.writer import TensorFileWriter
from resta_fast.kernels import reference
from resta_fast.pipeline.cpu import (
    Inputs,
    RunStats,
    _bytes,
    _chunks,
    _Source,
    _write_unpatched,
    patch_sources,
    write_files,
)
from resta_fast.pipeline.stream import StagedWriter, WriteJob
from resta_fast.plan import Plan

# 256 MiB of pinned host memory (and as much on the device) by default: three
# slots of ~85 MiB keep a PCIe 5 link (~50 GB/s) busy for ~2 ms per chunk, which
# hides per-chunk launch and event overhead, and pinned memory that large is
# still cheap to register on any node.
DEFAULT_POOL_BYTES = 256 << 20
DEFAULT_SLOTS = 3
MAX_INPUTS = 4  # F, A, U/V, B


class _Device:
    """Streams, events and buffers for one device; no-ops on the CPU."""

    def __init__(self, device: str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.compute_stream = torch.cuda.Stream(self.device)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        if not self.cuda:
            return torch.empty(nbytes, dtype=torch.uint8)
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def on(self, which: str):
        if not self.cuda:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.copy_stream if which == "copy" else self.compute_stream)

    def record(self, which: str):
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(self.copy_stream if which == "copy" else self.compute_stream)
        return ev

    def wait(self, which: str, event) -> None:
        if event is not None:
            (self.copy_stream if which == "copy" else self.compute_stream).wait_event(event)


class _Slot:
    """Pinned host + device buffers for one chunk in flight."""

    def __init__(self, dev: _Device, chunk_elems: int):
        nbytes = chunk_elems * 4  # room for fp32, the widest kernel dtype
        self.host_in = [dev.host_buffer(nbytes) for _ in range(MAX_INPUTS)]
        self.dev_in = [dev.device_buffer(nbytes) for _ in range(MAX_INPUTS)]
        self.dev_out = dev.device_buffer(nbytes)
        self.host_out = dev.host_buffer(nbytes)
        for buf in self.host_in + [self.host_out]:
            buf.fill_(0)  # first touch now, not inside the timed stream


class DeviceCache:
    """Shared inputs kept on the device across the jobs of a batch group.

    The vector, or the aligned/unaligned pair (and a DARE base that is one of
    them), is the same for every job of a group: the first job uploads each
    tensor once (while it fits ``budget_bytes``), later jobs read it from device
    memory and skip its host staging and H2D copy. Tensors that do not fit are
    streamed as usual, so the budget only trades memory for transfers.

    Example:
        >>> cache = DeviceCache("cuda", budget_bytes=40 << 30)  # doctest: +SKIP
        >>> for job in jobs: api.patch(..., device="cuda", device_cache=cache)
    """

    def __init__(self, device: str, budget_bytes: int | None = None):
        self.device = torch.device(device)
        if budget_bytes is None:
            # Half of what is free now: the rest stays for the slot pool and the kernel.
            budget_bytes = torch.cuda.mem_get_info(self.device)[0] // 2 if self.device.type == "cuda" else 0
        self.budget = budget_bytes
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._tensors: dict[tuple[str, str], torch.Tensor] = {}

    def get(self, source: _Source) -> torch.Tensor | None:
        """The whole tensor on the device, uploading it on first use; None if it
        does not fit the budget."""
        key = (str(source.ckpt.path), source.name)
        cached = self._tensors.get(key)
        if cached is not None:
            self.hits += 1
            return cached
        nbytes = source.view.numel() * source.itemsize
        if self.used + nbytes > self.budget:
            self.misses += 1
            return None
        cached = torch.empty(source.view.numel(), dtype=source.view.dtype, device=self.device)
        cached.copy_(source.view)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # visible to the compute stream
        self._tensors[key] = cached
        self.used += nbytes
        self.misses += 1
        return cached


def chunk_elems_for_pool(pool_bytes: int, slots: int) -> int:
    """Largest chunk whose slots (MAX_INPUTS + 1 fp32 buffers each) fit the pool.

    A multiple of 1024 elements, so every chunk but a tensor's last starts on a
    16-byte boundary and the Triton kernel keeps its vectorised loads.
    """
    per_elem = 4 * (MAX_INPUTS + 1)
    return max(1024, pool_bytes // (slots * per_elem) // 1024 * 1024)


def run_plan_gpu(plan: Plan, inputs: Inputs, out_dir, *, kernel, beta: float, dare: float | None,
                 seed: int, metadata: dict[str, str], device: str = "cuda",
                 pool_bytes: int = DEFAULT_POOL_BYTES, slots: int = DEFAULT_SLOTS,
                 chunk_elems: int | None = None, progress=None,
                 cache: DeviceCache | None = None) -> RunStats:
    """Execute ``plan`` through staged device buffers; same result as run_plan.

    Args:
        kernel: backend module whose patch_into runs on ``device`` tensors.
        pool_bytes/slots: bound pinned host and device memory (each ~pool_bytes).
        chunk_elems: override the chunk size derived from the pool (tests).
        cache: a DeviceCache shared by the jobs of a batch group (shared inputs
            are then read from device memory after the first job).
    Returns:
        RunStats (non-finite counts are accumulated on the device and read once
        per file, so they never stall the stream).
    """
    dev = _Device(device)
    chunk = chunk_elems or chunk_elems_for_pool(pool_bytes, slots)
    free: queue.Queue = queue.Queue()
    for _ in range(slots):
        free.put(_Slot(dev, chunk))
    # The writer's own pool only stages dtype conversions of copied tensors.
    writer = StagedWriter(n_buffers=1, buffer_bytes=chunk * 4)
    counters: dict[str, torch.Tensor] = {}

    def write_tensor(t, out, hasher, stats):
        _tensor(t, inputs, out, writer, free, dev, hasher, kernel, dare, seed, beta, chunk, stats, counters,
                cache)

    def collect_counts(stats):  # one device sync per file, never per chunk
        for name, count in counters.items():
            if int(count):
                stats.nonfinite[name] = int(count)
        counters.clear()
    return write_files(plan, inputs, out_dir, metadata, writer, write_tensor, progress, collect_counts)


def _acquire(free: queue.Queue, writer: StagedWriter) -> _Slot:
    """A free slot; blocks while all are in flight, surfacing writer errors."""
    t0 = time.perf_counter()
    try:
        while True:
            writer._check()
            try:
                return free.get(timeout=0.1)
            except queue.Empty:
                continue
    finally:
        writer.add_busy("wait_for_buffer", time.perf_counter() - t0)


def _tensor(t, inputs: Inputs, out: TensorFileWriter, writer: StagedWriter, free: queue.Queue,
            dev: _Device, hasher, kernel, dare, seed, beta, chunk, stats: RunStats, counters,
            cache: DeviceCache | None = None) -> None:
    f = _Source(inputs.finetuned, t.name)
    dst_start, _ = out.offsets[t.name]
    out_dtype = DTYPES[t.out_dtype][0]
    out_item = DTYPES[t.out_dtype][1]
    patched = t.patched_elems if t.action == "patch" else 0
    if patched:
        a, u, b, srcs, tensor_seed = patch_sources(f, inputs, t, dare, seed)
        # The fine-tune is per job; every other operand is shared by a batch group.
        on_device = [None] + [cache.get(s) if cache is not None else None for s in srcs[1:]]
        # The DARE base is usually the aligned model itself: stage and upload it once.
        same_as = {k: j for k, s in enumerate(srcs) for j in range(k) if srcs[j].ckpt is s.ckpt}
        count = torch.zeros((), dtype=torch.int64, device=dev.device)
        counters[t.name] = count
        for lo, hi in _chunks(patched, chunk):
            slot = _acquire(free, writer)
            t0 = time.perf_counter()
            try:
                dev_views = []
                with dev.on("copy"):
                    for k, s in enumerate(srcs):
                        if on_device[k] is not None:
                            dev_views.append(on_device[k][lo:hi])
                            continue
                        if k in same_as:
                            dev_views.append(dev_views[same_as[k]])
                            continue
                        s.check()  # a truncated input: a clean error, not SIGBUS on the copy below
                        # Read-ahead of the next chunk, as the CPU pipeline does: on a cold
                        # cache the disk then works while this chunk is staged (H200 run
                        # before this: cold 0.62x its floor, without it).
                        s.prefetch(hi, min(patched, hi + chunk))
                        nbytes = (hi - lo) * s.itemsize
                        host = slot.host_in[k][:nbytes]
                        host.copy_(s.view[lo:hi].view(torch.uint8))
                        s.release(lo, hi)
                        dev_in = slot.dev_in[k][:nbytes]
                        dev_in.copy_(host, non_blocking=True)
                        dev_views.append(dev_in.view(s.view.dtype))
                    inputs_ready = dev.record("copy")
                t1 = time.perf_counter()
                writer.add_busy("stage", t1 - t0)  # host copies into pinned memory, H2D queued
                dev.wait("compute", inputs_ready)
                dst = slot.dev_out[: (hi - lo) * out_item].view(out_dtype)
                fv, av, *rest = dev_views
                uv = rest.pop(0) if u is not None else None
                bv = rest.pop(0) if b is not None else None
                with dev.on("compute"):
                    kernel.patch_into(dst, fv, av, uv, bv, beta=t.beta, p=dare or 0.0, seed=tensor_seed,
                                      offset=lo)
                    count += (~torch.isfinite(dst)).sum()
                    computed = dev.record("compute")
                dev.wait("copy", computed)
                host_out = slot.host_out[: (hi - lo) * out_item]
                with dev.on("copy"):
                    host_out.copy_(slot.dev_out[: (hi - lo) * out_item], non_blocking=True)
                    landed = dev.record("copy")
                writer.add_busy("kernel", time.perf_counter() - t1)  # on a GPU: launches only
            except BaseException:
                free.put(slot)
                raise
            stats.bytes_read += sum((hi - lo) * s.itemsize for k, (s, d) in enumerate(zip(srcs, on_device, strict=True))
                                    if d is None and k not in same_as)
            writer.submit(WriteJob(out.fd, dst_start + lo * out_item, _bytes(host_out), out.path, None,
                                   hasher=hasher, before=None if landed is None else landed.synchronize,
                                   release=lambda slot=slot: free.put(slot)))
    # Unpatched elements go straight from the mmap to the file (no device trip);
    # a dtype conversion, if asked, runs on the CPU with the reference kernel.
    _write_unpatched(t, f, out, writer, hasher, reference, patched, chunk, stats)
