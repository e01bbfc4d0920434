"""The bounded buffer pool (resta_fast/pipeline/buffers.py): buffers made on first need and never more than the
bound, reused once given back, ``acquire`` blocking (and checking for errors elsewhere) while all are in flight,
and a buffer given back with an event handed out only after that event has completed."""

import threading

import numpy as np
import pytest
import torch

from resta_fast.pipeline.buffers import BufferPool, host_buffer

HANG = 30  # seconds a thread may take to reach its next step before the test calls it a hang


class Event:
    """A stand-in for a CUDA event: records that the pool waited on it."""

    def __init__(self):
        self.synchronized = 0

    def synchronize(self):
        self.synchronized += 1


@pytest.mark.parametrize("nbytes", [0, 1, 4097])
def test_host_buffer_is_nbytes_of_zeroed_uint8(nbytes):
    buf = host_buffer(nbytes)
    assert isinstance(buf, np.ndarray) and buf.dtype == np.uint8 and buf.shape == (nbytes,)
    assert not buf.any()


@pytest.mark.gpu
def test_a_pinned_host_buffer_is_page_locked_memory_torch_keeps_alive():
    buf = host_buffer(1 << 16, pinned=True)
    assert buf.dtype == np.uint8 and buf.shape == (1 << 16,) and not buf.any()
    assert torch.from_numpy(buf).is_pinned()


def test_buffers_are_made_on_first_need_up_to_the_bound_then_reused():
    pool = BufferPool(2, 64)
    a, b = pool.acquire(), pool.acquire()
    assert a is not b and a.nbytes == b.nbytes == 64
    made = {id(a), id(b)}
    for _ in range(5):  # take and give back: no new buffer is ever made
        pool.give(a)
        a = pool.acquire()
        assert id(a) in made
    pool.give(b)
    pool.give(a)
    assert {id(pool.acquire()), id(pool.acquire())} == made
    assert pool.waited == 0.0  # nothing blocked


def test_acquire_blocks_while_all_are_in_flight_and_wakes_on_give():
    waiting = threading.Event()
    pool = BufferPool(1, 8, check=waiting.set)  # check runs only while acquire waits
    held = pool.acquire()
    got = []
    taker = threading.Thread(target=lambda: got.append(pool.acquire()), daemon=True)
    taker.start()
    assert waiting.wait(HANG), "acquire did not wait for a buffer"
    assert got == []  # still blocked: the only buffer is held
    pool.give(held)
    taker.join(HANG)
    assert not taker.is_alive() and got[0] is held
    assert pool.waited > 0  # the time it blocked is recorded


def test_an_error_elsewhere_surfaces_in_a_blocked_acquire_instead_of_a_hang():
    class WriterDied(Exception):
        pass

    def check():
        raise WriterDied("the writer thread failed")

    pool = BufferPool(1, 8, check=check)
    pool.acquire()
    errors = []

    def take():
        try:
            pool.acquire()
        except WriterDied as exc:
            errors.append(exc)

    taker = threading.Thread(target=take, daemon=True)
    taker.start()
    taker.join(HANG)
    assert not taker.is_alive(), "acquire hung instead of raising the check's error"
    assert str(errors[0]) == "the writer thread failed"


def test_a_buffer_given_back_with_an_event_is_reused_only_after_it_completes():
    pool = BufferPool(1, 8)
    buf = pool.acquire()
    copy_done = Event()
    pool.give(buf, after=copy_done)
    assert copy_done.synchronized == 0  # giving back does not wait
    assert pool.acquire() is buf
    assert copy_done.synchronized == 1
    pool.give(buf)  # no event: nothing to wait for
    assert pool.acquire() is buf and copy_done.synchronized == 1


def test_a_blocked_acquire_also_waits_for_the_event_of_the_buffer_it_gets():
    waiting = threading.Event()
    pool = BufferPool(1, 8, check=waiting.set)
    buf = pool.acquire()
    copy_done = Event()
    got = []
    taker = threading.Thread(target=lambda: got.append(pool.acquire()), daemon=True)
    taker.start()
    assert waiting.wait(HANG)
    pool.give(buf, after=copy_done)
    taker.join(HANG)
    assert got == [buf] and copy_done.synchronized == 1
