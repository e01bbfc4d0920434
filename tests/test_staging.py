"""How input chunks reach memory (resta_fast/pipeline/staging.py): mmap views with read-ahead and page release,
or reader threads preading into a bounded pool of reusable buffers. Either way a chunk holds exactly the
tensor's elements lo..hi in the reader's storage type (BF16 as uint16 bits), an input changed under the run is
a clean error naming the file, and a chunk's buffer goes back to the pool when released, after a failed read too."""

import os
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from resta_fast.errors import CheckpointError
from resta_fast.io.checkpoint import Checkpoint
from resta_fast.io.reader import TensorInfo
from resta_fast.pipeline.staging import MmapStaging, ReadStaging, Source, Ticket

HANG = 30  # seconds a thread may take to reach its next step before the test calls it a hang
TENSORS = {
    "w": torch.arange(1000, dtype=torch.float32) * 0.5 - 7,
    "h": torch.linspace(-3, 3, 37).to(torch.bfloat16),
    "ids": torch.tensor([5, -1, 2**40, 0, 9], dtype=torch.int64),
}
CHUNKS = [(0, 1), (0, 7), (3, 10), (990, 1000), (36, 37), (0, 37)]  # heads, middles, tails


class Event:
    """A stand-in for a CUDA event: records that the pool waited on it."""

    def __init__(self):
        self.synchronized = 0

    def synchronize(self):
        self.synchronized += 1


def expected(name: str) -> np.ndarray:
    t = TENSORS[name]
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


@pytest.fixture()
def ckpt(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(TENSORS, str(path), metadata={"format": "pt"})
    ck = Checkpoint(path)
    yield ck
    ck.close()


class InMemory:
    """A source whose tensor lives in memory, as a LoRA-merged one does (``file_of`` is None)."""

    def __init__(self, values: np.ndarray):
        self.values = values

    def info(self, name):
        return TensorInfo(name, "F32", (self.values.size,), 0, self.values.nbytes)

    def file_of(self, name):
        return None

    def array(self, name):
        return self.values


def chunks(ckpt):
    for name in TENSORS:
        n = TENSORS[name].numel()
        for lo, hi in CHUNKS:
            if hi <= n:
                yield name, lo, hi


def test_a_source_reads_its_tensor_in_the_reader_storage_type(ckpt):
    for name, dtype, itemsize in (("w", np.float32, 4), ("h", np.uint16, 2), ("ids", np.int64, 8)):
        src = Source(ckpt, name)
        assert (src.dtype, src.itemsize, src.info.dtype) == (dtype, itemsize, ckpt.info(name).dtype)
        assert src.file is ckpt.file_of(name)
        assert src.view is src.view and np.array_equal(src.view, expected(name)), name
        src.check()  # unchanged: no error


def test_mmap_chunks_are_zero_copy_views_read_ahead_and_released_once(ckpt):
    asked = []
    ckpt.prefetch = lambda name, lo, hi: asked.append(("prefetch", name, lo, hi))
    ckpt.release = lambda name, lo, hi: asked.append(("release", name, lo, hi))
    staging = MmapStaging()
    for name, lo, hi in chunks(ckpt):
        src = Source(ckpt, name)
        ticket = staging.request(src, lo, hi)
        size = src.itemsize
        assert asked[-1] == ("prefetch", name, lo * size, hi * size)  # this chunk is used next: read it ahead
        got = ticket.get()
        assert np.array_equal(got, expected(name)[lo:hi]) and np.shares_memory(got, src.view), (name, lo, hi)
        ticket.release()
        ticket.release()  # a second release does nothing
        assert asked[-1] == ("release", name, lo * size, hi * size) and len(asked) % 2 == 0
        assert ticket.get() is None  # a released chunk is gone
    assert staging.busy == {}  # nothing is staged: no stage time
    staging.close()


@pytest.mark.parametrize("readers", [1, 3])
def test_read_chunks_hold_the_same_elements_in_pool_buffers(ckpt, readers):
    staging = ReadStaging(buffers=2, buffer_bytes=10 * 8, readers=readers)
    try:
        for name, lo, hi in chunks(ckpt):
            src = Source(ckpt, name)
            if (hi - lo) * src.itemsize > 80:
                continue
            first, second = staging.request(src, lo, hi), staging.request(src, lo, hi)
            for ticket in (first, second):
                got = ticket.get()
                assert got.dtype == src.dtype and np.array_equal(got, expected(name)[lo:hi]), (name, lo, hi)
                assert not np.shares_memory(got, src.view)  # a copy: a truncated file cannot SIGBUS us
            assert not np.shares_memory(first.get(), second.get())  # two chunks in flight, two buffers
            first.release()
            second.release()
        assert staging.busy["stage"] > 0
    finally:
        staging.close()


def test_read_buffers_are_reused_and_wait_for_the_event_they_were_released_with(ckpt):
    staging = ReadStaging(buffers=1, buffer_bytes=64, readers=1)
    src = Source(ckpt, "w")
    try:
        ticket = staging.request(src, 0, 16)
        buf = ticket.get()
        copy_done = Event()
        ticket.release(after=copy_done)  # an async device copy may still read the buffer
        assert copy_done.synchronized == 0
        again = staging.request(src, 16, 32)
        assert copy_done.synchronized == 1
        got = again.get()
        assert np.shares_memory(got, buf) and np.array_equal(got, expected("w")[16:32])
        again.release()
    finally:
        staging.close()


def test_a_chunk_larger_than_a_staging_buffer_is_an_internal_error(ckpt):
    staging = ReadStaging(buffers=1, buffer_bytes=64, readers=1)
    try:
        with pytest.raises(AssertionError) as info:
            staging.request(Source(ckpt, "w"), 0, 17)
        assert str(info.value) == "internal error: chunk of 68 bytes > staging buffer 64"
    finally:
        staging.close()


def test_an_in_memory_source_is_handed_out_without_a_buffer():
    values = np.arange(100, dtype=np.float32)
    src = Source(InMemory(values), "merged")
    assert src.file is None
    src.check()  # nothing on disk to check
    staging = ReadStaging(buffers=1, buffer_bytes=8, readers=1)  # one tiny buffer: any use of it would show
    try:
        held = [staging.request(src, lo, lo + 10) for lo in range(0, 100, 10)]
        for k, ticket in enumerate(held):
            got = ticket.get()
            assert np.shares_memory(got, values) and np.array_equal(got, values[10 * k : 10 * k + 10])
    finally:
        staging.close()


@pytest.mark.parametrize("staging", [MmapStaging, lambda: ReadStaging(buffers=1, buffer_bytes=4096, readers=1)])
def test_an_input_replaced_before_a_chunk_is_a_clean_error_naming_it(ckpt, staging):
    staging = staging()
    src = Source(ckpt, "w")
    path = src.file.path
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    new = path.with_suffix(".new")
    new.write_bytes(bytes(data))
    os.replace(new, path)
    try:
        with pytest.raises(CheckpointError) as info:
            staging.request(src, 0, 10)
        assert str(info.value) == (
            f"{path}: file was modified or replaced during the run; the output would be inconsistent, "
            "so nothing was written"
        )
    finally:
        staging.close()


def test_a_failed_read_surfaces_on_get_and_its_buffer_still_goes_back(ckpt, monkeypatch):
    staging = ReadStaging(buffers=1, buffer_bytes=64, readers=1)
    src = Source(ckpt, "w")

    def truncated(buf, start, tensor=None):
        raise CheckpointError(f"{src.file.path}, tensor {tensor!r}: the file ends early")

    monkeypatch.setattr(src.file, "read_into", truncated)
    try:
        ticket = staging.request(src, 0, 16)
        with pytest.raises(CheckpointError, match="tensor 'w': the file ends early"):
            ticket.get()
        ticket.release()  # after a failed get: no error, the buffer goes back
        failed = staging.request(src, 0, 16)  # a ticket never read: release waits for the read, and does not raise
        failed.release()
        monkeypatch.undo()
        got = []
        taker = threading.Thread(target=lambda: got.append(staging.request(src, 0, 16).get()), daemon=True)
        taker.start()
        taker.join(HANG)
        assert not taker.is_alive(), "the failed chunk's buffer never went back to the pool"
        assert np.array_equal(got[0], expected("w")[:16])
    finally:
        staging.close()


def test_a_ticket_of_a_view_is_its_view():
    view = np.arange(4)
    released = []
    ticket = Ticket(view=view, on_release=lambda: released.append(1))
    assert ticket.get() is view
    ticket.release()
    ticket.release()
    assert released == [1]


@pytest.mark.gpu
def test_pinned_read_staging_uses_page_locked_buffers(ckpt):
    staging = ReadStaging(buffers=1, buffer_bytes=64, readers=1, pinned=True)
    try:
        ticket = staging.request(Source(ckpt, "w"), 0, 16)
        got = ticket.get()
        assert np.array_equal(got, expected("w")[:16])
        assert torch.from_numpy(got.view(np.uint8)).is_pinned()
        ticket.release()
    finally:
        staging.close()
