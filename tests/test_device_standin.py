"""The engine's device path on an asynchronous stand-in for a GPU (tests/device_standin.py).

First, the stand-in itself: each misuse it is meant to expose does show (a late download, a
host buffer changed under a pending upload, a counter read early, memory reused while another
stream reads it). Then the engine through it: the golden outputs (patch, DARE, a batch group of
3, LoRA, vector, split chunks, staged) and a seeded sweep of delays and chunk sizes give the
synchronous path's bytes. Last, each wait the engine relies on is removed in turn, with delays
that force the race, and the run must go wrong: that is what makes the first two parts mean
something.
"""

import json
import sys

import numpy as np
import pytest
import test_golden as golden
import torch
from checkpoints import llama_tensors, three_models, write_model
from device_standin import HOST_POISON, RaceError, StandinDevice
from engine_fixtures import engine_models, plan_and_inputs, run

from resta_fast.kernels import reference
from resta_fast.pipeline import buffers, compute, engine
from resta_fast.pipeline.compute import Compute

SLOW = (0.002, 0.002)  # a forced delay per operation: the other streams and threads run far ahead of it


@pytest.fixture(autouse=True)
def quick_handoffs():
    """The stand-in hands work between threads thousands of times a run; at Python's default
    5 ms GIL switch interval each hand-off can wait that long (the golden world took 4x longer)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    yield
    sys.setswitchinterval(before)


@pytest.fixture()
def models(tmp_path):
    return engine_models(tmp_path)


@pytest.fixture()
def standin():
    """A function making stand-ins; each is closed, and must have seen no race, at the end of the test."""
    made = []

    def make(**kw):
        made.append(StandinDevice(**kw))
        return made[-1]

    yield make
    for dev in made:
        dev.close()
    for dev in made:
        assert not dev.races and not dev.failures, (dev.races, dev.failures)


def _arrays(n=5):
    f = np.linspace(-1, 1, n, dtype=np.float32)
    return f, np.full(n, 0.25, np.float32), np.full(n, -0.25, np.float32)


def _patch(c: Compute, out, counter=None):
    f, a, u = _arrays(out.size)
    return c.patch(out, c.upload(f), c.upload(a), c.upload(u), None, beta=1.0, p=0.0, seed=0, offset=0, counter=counter)


# --- the stand-in exposes what it is meant to (streams held, so the order is certain) ----------


def test_a_download_lands_only_when_its_stream_runs_it(standin):
    dev = standin()
    dev.d2h.hold()
    out = np.zeros(5, np.float32)
    landed, _ = _patch(Compute(reference, dev), out)
    dev.synchronize(dev.h2d)  # the kernel has run; the download has not
    assert (out.view(np.uint8) == HOST_POISON).all(), "the host buffer must be garbage until the copy lands"
    dev.d2h.release()
    landed.synchronize()
    want = np.zeros(5, np.float32)
    Compute(reference).patch(want, *_arrays(), None, beta=1.0, p=0.0, seed=0, offset=0)
    assert out.tobytes() == want.tobytes()


def test_a_stream_waits_for_another_only_when_asked(standin):
    """Without the engine's wait the download copies the kernel's memory before the kernel ran."""
    dev = standin()
    dev.wait = lambda stream, event: None
    dev.h2d.hold()
    out = np.zeros(5, np.float32)
    _patch(Compute(reference, dev), out)
    dev.synchronize(dev.d2h)  # nothing holds the download back
    dev.h2d.release()
    assert np.isnan(out).all(), "the download ran first and copied never-written (poisoned) memory"


def test_a_host_buffer_changed_under_a_pending_upload_is_a_race():
    dev = StandinDevice()
    try:
        dev.h2d.hold()
        host = np.ones(4, np.float32)
        dev.upload(host, dev.h2d)
        host[0] = 2  # what a reader refilling a staging buffer too early does
        dev.h2d.release()
        with pytest.raises(RaceError, match="host buffer changed"):
            dev.synchronize(dev.h2d)
    finally:
        dev.close()


def test_a_counter_read_before_its_stream_ran_is_a_race():
    dev = StandinDevice()
    try:
        dev.h2d.hold()
        c = Compute(reference, dev)
        counter = c.new_counter()
        _patch(c, np.zeros(5, np.float32), counter)
        with pytest.raises(RaceError, match="counter was read"):
            int(counter)
    finally:
        dev.close()


def test_counters_count_nonfinite_results_after_synchronize(standin):
    c = Compute(reference, standin(delays={"h2d": SLOW}))  # Compute.synchronize must wait for it
    counter = c.new_counter()
    f, a, u = _arrays()
    f[1], a[3] = np.inf, np.nan
    c.patch(
        np.zeros(5, np.float32),
        c.upload(f),
        c.upload(a),
        c.upload(u),
        None,
        beta=1.0,
        p=0,
        seed=0,
        offset=0,
        counter=counter,
    )
    c.synchronize()
    assert int(counter) == 2


@pytest.mark.parametrize("record", [True, False])
def test_memory_another_stream_still_reads_is_reused_unless_marked(standin, record):
    """The allocator's rule (torch's): freed memory goes to the next allocation of its stream at
    once, so a pending download on another stream copies what the next chunk put there,
    unless ``used_by`` held it back."""
    dev = standin()
    if not record:
        dev.used_by = lambda array, stream: None
    dev.d2h.hold()
    c = Compute(reference, dev)
    first, second = np.zeros(5, np.float32), np.zeros(5, np.float32)
    landed, _ = _patch(c, first)
    f, a, u = _arrays()
    landed2, _ = c.patch(second, c.upload(-f), c.upload(a), c.upload(u), None, beta=1.0, p=0, seed=0, offset=0)
    dev.synchronize(dev.h2d)  # the second chunk is computed before the first one's download runs
    dev.d2h.release()
    landed.synchronize()
    landed2.synchronize()
    want = np.zeros(5, np.float32)
    Compute(reference).patch(want, *_arrays(), None, beta=1.0, p=0.0, seed=0, offset=0)
    assert dev.reused > 0
    assert (first.tobytes() == want.tobytes()) == record


# --- the engine through the stand-in: the synchronous path's bytes ---------------------------


def test_golden_outputs_through_the_standin_match_the_golden_digests(tmp_path, monkeypatch, standin):
    """Every output kind of tests/test_golden.py (patch, DARE, a batch group of 3, LoRA, the
    vector, patch --vector, chunks of 37 and 29 elements, fp16, tied, extra vocabulary), run
    by the CLI with the engine on the stand-in, against the same golden digests."""
    dev = standin(seed=11, delay=0.0002)  # ~4000 operations: short delays keep it quick; the sweep below waits longer
    real_open = engine.open_device
    monkeypatch.setattr(engine, "open_device", lambda name: dev if name == "cpu" else real_open(name))
    # One kernel backend is enough here (test_golden compares the backends with each other).
    monkeypatch.setattr(golden, "BACKENDS", [b for b in golden.BACKENDS if b in ("cpp", "torch")][:1])
    torch.set_num_threads(1)
    got = golden.golden_world(tmp_path)
    want = json.loads(golden.GOLDEN.read_text())["cases"]
    (backend,) = golden.BACKENDS
    assert {"vector", "staged_cpu", f"batch_dare@{backend}", f"lora@{backend}", f"dare_chunk37@{backend}"} <= set(got)
    assert not golden._diff(want, got, sorted(got)), "\n".join(golden._diff(want, got, sorted(got)))
    assert dev.calls["download"] > 100 and dev.reused > 0, "the engine did not run on the stand-in"


CHUNKS = (29, 64, None)  # None: the stand-in pool's chunk (1024 elements, whole tensors here)


@pytest.mark.parametrize("seed", range(6))
def test_a_group_of_three_through_the_standin_is_bit_identical_for_every_seed(tmp_path, models, standin, seed):
    plan, inputs = plan_and_inputs(*models)
    (ref,) = run(tmp_path, "ref", plan, inputs)
    dev = standin(seed=seed, delay=0.001)
    jobs = run(tmp_path, "dev", plan, inputs, n=3, device=dev, chunk_elems=CHUNKS[seed % len(CHUNKS)])
    assert all(job.stats.sha256 == ref.stats.sha256 for job in jobs)


def test_nonfinite_counts_through_the_standin_match_the_host(tmp_path, standin):
    """The per-job counters on the device, read after the synchronize, give the host's counts."""
    ft, al, un = three_models(tmp_path, vocab=16, hidden=8, layers=1, inter=12)
    tensors = llama_tensors(3, vocab=16, hidden=8, layers=1, inter=12)
    tensors["model.embed_tokens.weight"][3, :5] = float("inf")
    tensors["model.layers.0.mlp.up_proj.weight"].view(-1)[[0, 40, 95]] = float("nan")
    bad = write_model(tmp_path / "ft_bad", tensors)
    plan, inputs = plan_and_inputs(bad, al, un)
    (ref,) = run(tmp_path, "ref", plan, inputs)
    dev = standin(seed=5, delay=0.001)
    (job,) = run(tmp_path, "dev", plan, inputs, device=dev, chunk_elems=37)
    # DARE keeps the base's finite value where it drops a delta, so the counts are at most 5 and 3.
    assert set(ref.stats.nonfinite) == {"model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"}
    assert job.stats.nonfinite == ref.stats.nonfinite and job.stats.sha256 == ref.stats.sha256


def test_the_device_cache_through_the_standin(tmp_path, models, standin):
    plan, inputs = plan_and_inputs(*models)
    (ref,) = run(tmp_path, "ref", plan, inputs)
    dev = standin(seed=2, delays={"main": 0.002})
    cache = compute.DeviceCache("cpu", budget_bytes=1 << 30)
    for k in range(2):
        (job,) = run(tmp_path, f"pass{k}_", plan, inputs, device=dev, chunk_elems=29, cache=cache)
        assert job.stats.sha256 == ref.stats.sha256
    assert cache.hits > 0 and dev.calls["upload"] > 0


# --- each wait removed in turn: the run must go wrong ----------------------------------------


def _no_event_for_the_writer(monkeypatch, dev):
    real = engine.WriteJob
    monkeypatch.setattr(engine, "WriteJob", lambda *a, before=None, **kw: real(*a, **kw))


def _release_staging_at_once(monkeypatch, dev):
    monkeypatch.setattr(Compute, "inputs_done", lambda self: None)


def _pool_ignores_events(monkeypatch, dev):
    real = buffers.BufferPool.give
    monkeypatch.setattr(buffers.BufferPool, "give", lambda self, buf, after=None: real(self, buf))


def _keep_without_waiting(monkeypatch, dev):
    """The cache's copy non-blocking and its synchronize gone (either alone is covered by the other)."""
    real_upload, real_sync = dev.upload, dev.synchronize
    monkeypatch.setattr(dev, "upload", lambda host, stream, non_blocking=True: real_upload(host, stream))
    monkeypatch.setattr(dev, "synchronize", lambda stream: None if stream is dev.main else real_sync(stream))


# name -> (how the wait is removed, which stream is slow so that the race happens). Not here, because
# nothing can go wrong without them alone: run_jobs's compute.synchronize() before the counters are read
# (the writers have already waited for every download, and each download for its kernel; Compute.synchronize
# itself must wait, which test_counters_count_nonfinite_results_after_synchronize checks), and either one
# of Compute.keep's two waits (its blocking copy and its synchronize each cover the other).
MUTATIONS = {
    "none (control)": (lambda mp, dev: None, {"h2d": SLOW, "d2h": SLOW}),
    "download waits for the kernel (Compute.patch: wait d2h on h2d)": (
        lambda mp, dev: mp.setattr(dev, "wait", lambda stream, event: None),
        {"h2d": SLOW},
    ),
    "kernel output kept for the download (Compute.patch: used_by = record_stream)": (
        lambda mp, dev: mp.setattr(dev, "used_by", lambda array, stream: None),
        {"d2h": SLOW},
    ),
    "writer waits for the download (engine: WriteJob.before)": (_no_event_for_the_writer, {"d2h": SLOW}),
    "staging released after the uploads (Compute.inputs_done)": (_release_staging_at_once, {"h2d": SLOW}),
    "pool waits for a buffer's event (BufferPool.acquire)": (_pool_ignores_events, {"h2d": SLOW}),
    "cache copy visible before use (Compute.keep)": (_keep_without_waiting, {"main": (0.01, 0.01)}),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_removing_a_wait_the_engine_relies_on_is_caught(tmp_path, models, monkeypatch, name):
    remove, delays = MUTATIONS[name]
    plan, inputs = plan_and_inputs(*models)
    (ref,) = run(tmp_path, "ref", plan, inputs)
    dev = StandinDevice(seed=1, delays=delays)
    remove(monkeypatch, dev)
    cache = compute.DeviceCache("cpu", budget_bytes=1 << 30) if "cache" in name else None
    try:
        (job,) = run(tmp_path, "dev", plan, inputs, device=dev, n_buffers=6, cache=cache)
        outcome = "same bytes" if job.stats.sha256 == ref.stats.sha256 else "wrong bytes"
    except RaceError:
        outcome = "race detected"
    finally:
        dev.close()
    if name == "none (control)":
        assert outcome == "same bytes" and not dev.races
    else:
        assert outcome != "same bytes", f"removing the wait '{name}' went unnoticed"
