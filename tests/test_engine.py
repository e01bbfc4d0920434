"""The one streaming engine (pipeline/engine.py): every path is a group of N >= 1
jobs; staging, compute, writing and hashing are the same code for all of them.
The GPU configuration runs here with a CPU stand-in (ordinary buffers, host
kernels); test_device_standin.py runs it on an asynchronous stand-in for the
device, where a missing wait shows; the CUDA tests are in test_engine_gpu.py."""

import hashlib
import os
import threading

import pytest
from checkpoints import llama_tensors, three_models, write_model
from engine_fixtures import META, engine_models, file_digests, plan_and_inputs, run

from resta_fast import api
from resta_fast.errors import CheckpointError, RestaError
from resta_fast.io.checkpoint import Checkpoint
from resta_fast.kernels import reference
from resta_fast.pipeline import compute, engine, hashing, writer
from resta_fast.pipeline.job import Inputs, Job
from resta_fast.plan import build_plan


@pytest.fixture()
def models(tmp_path):
    return engine_models(tmp_path)


@pytest.mark.parametrize("chunk", [1, 7, 37, 1000, 1 << 20])
@pytest.mark.parametrize("staging", ["mmap", "read"])
def test_every_chunk_size_and_staging_gives_the_same_bytes(tmp_path, models, chunk, staging):
    plan, inputs = plan_and_inputs(*models)
    (ref,) = run(tmp_path, "ref", plan, inputs, staging="mmap", chunk_elems=1 << 20)
    (job,) = run(tmp_path, "x", plan, inputs, staging=staging, chunk_elems=chunk)
    assert job.stats.sha256 == ref.stats.sha256 == file_digests(job.out_dir)
    assert len(job.stats.sha256) == 2


def test_gpu_configuration_on_a_cpu_stand_in_matches_the_cpu_path(tmp_path, models):
    """device="cpu" with the GPU's staging (read into buffers) and a small pool: the
    chunking derived from the pool, buffers reused across chunks, same bytes."""
    plan, inputs = plan_and_inputs(*models)
    (ref,) = run(tmp_path, "ref", plan, inputs, staging="mmap")
    (job,) = run(tmp_path, "gpu", plan, inputs, staging="read", pool_bytes=1, slots=3, readers=3)
    assert job.stats.sha256 == ref.stats.sha256
    assert compute.chunk_elems_for_pool(1, 3) == 1024


def test_a_group_is_bit_identical_to_single_jobs_even_when_laid_out_unlike_the_shared_model(tmp_path):
    """Three jobs in one pass, one of them with another shard layout and tensor
    order (so its files are written out of order and its hasher must follow
    ranges), one with another β and no DARE: each equals its own single run."""
    ft, al, un = three_models(tmp_path, vocab=16, hidden=8, layers=2, inter=12)
    tensors = llama_tensors(3, vocab=16, hidden=8, layers=2, inter=12)
    # safetensors stores wider dtypes first: fp32 norms then lead each file, where
    # the shared (all-bf16, name-sorted) model has them in between.
    tensors = {k: v.float() if "norm" in k else v for k, v in tensors.items()}
    reordered = write_model(tmp_path / "ft_reordered", tensors, shards=3)
    A, U = Checkpoint(al), Checkpoint(un)
    cases = []
    for path, beta, dare in ((ft, 0.5, 0.3), (reordered, 0.5, 0.3), (ft, 1.5, None)):
        F = Checkpoint(path)
        plan = build_plan(F, aligned=A, unaligned=U, dare_base=A if dare else None, beta=beta)
        cases.append((plan, Inputs(F, A, U, None, A if dare else None), dare))
    singles = [run(tmp_path, f"single{k}_", plan, inputs, dare=dare)[0] for k, (plan, inputs, dare) in enumerate(cases)]
    jobs = []
    for k, (plan, inputs, dare) in enumerate(cases):
        (tmp_path / f"group{k}").mkdir()
        jobs.append(Job(plan, inputs, tmp_path / f"group{k}", dare, 4, META))
    for staging in ("mmap", "read"):
        for job in jobs:
            for p in job.out_dir.iterdir():
                p.unlink()
            job.stats, job.error = type(job.stats)(), None
        engine.run_jobs(jobs, kernel=reference, staging=staging, chunk_elems=5, writers=2)
        for single, job in zip(singles, jobs, strict=True):
            assert job.error is None
            assert job.stats.sha256 == single.stats.sha256 == file_digests(job.out_dir)
    assert len(jobs[1].stats.sha256) == 3


def test_back_pressure_bounds_buffers_in_flight(tmp_path, models, monkeypatch):
    plan, inputs = plan_and_inputs(*models)
    in_flight, peak, lock = [0], [0], threading.Lock()
    real_submit = writer.Writer.submit

    def submit(self, job):
        if job.buffer is not None:  # an output buffer handed to the writer
            with lock:
                in_flight[0] += 1
                peak[0] = max(peak[0], in_flight[0])
            done = job.on_done

            def slow_done():
                threading.Event().wait(0.01)  # the writer lags behind the scheduler
                with lock:
                    in_flight[0] -= 1
                if done is not None:
                    done()

            job.on_done = slow_done
        real_submit(self, job)

    monkeypatch.setattr(writer.Writer, "submit", submit)
    run(tmp_path, "o", plan, inputs, dare=None, staging="read", chunk_elems=8, n_buffers=2)
    assert 1 <= peak[0] <= 2


@pytest.mark.parametrize("stage", ["kernel", "writer"])
def test_error_in_a_stage_stops_and_leaves_no_output(tmp_path, models, monkeypatch, stage):
    ft, al, un = models
    calls, writes = [0], [0]
    real_patch, real_write = reference.patch_into, writer.write_all

    def failing_patch(*args, **kw):
        calls[0] += 1
        if calls[0] == 5:
            raise RuntimeError("injected kernel failure")
        return real_patch(*args, **kw)

    def failing_write(fd, data, offset, path):
        writes[0] += 1
        if writes[0] == 7:
            raise OSError(5, "injected I/O error")
        real_write(fd, data, offset, path)

    if stage == "kernel":
        monkeypatch.setattr(reference, "patch_into", failing_patch)
    else:
        monkeypatch.setattr(writer, "write_all", failing_write)
    with pytest.raises((RuntimeError, OSError, RestaError), match="injected"):
        api.patch(ft, tmp_path / "out", aligned=al, unaligned=un, beta=0.5, backend="torch", fsync=False, chunk_elems=8)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".resta-tmp-" in p.name]


def test_busy_seconds_say_where_the_time_went(tmp_path, models):
    """The report's per-stage busy times: every stage that ran is counted, and no
    stage's total can exceed the run's wall time (a double count would)."""
    ft, al, un = models
    report = api.patch(ft, tmp_path / "out", aligned=al, unaligned=un, beta=0.5, backend="torch", fsync=False)
    busy, wall = report["stats"]["busy_seconds"], report["stats"]["seconds"]
    assert {"kernel", "write", "hash", "wait_for_buffer"} <= set(busy)
    assert busy["kernel"] > 0 and busy["write"] > 0 and busy["hash"] > 0
    assert all(0 <= v <= wall + 0.002 for v in busy.values()), (busy, wall)
    plan, inputs = plan_and_inputs(ft, al, un)
    (job,) = run(tmp_path, "staged", plan, inputs, dare=None, staging="read", chunk_elems=64, readers=1)
    stats = job.stats
    assert {"stage", "kernel", "write", "hash", "wait_for_buffer"} <= set(stats.busy)
    assert stats.busy["stage"] > 0 and stats.busy["hash"] > 0
    assert all(0 <= v <= stats.seconds + 0.002 for v in stats.busy.values()), (stats.busy, stats.seconds)


def test_file_hasher_follows_out_of_order_writes_and_reports_what_is_missing(tmp_path):
    gate = threading.Semaphore(2)
    data = os.urandom(1000)
    path = tmp_path / "f"
    path.write_bytes(data)
    h = hashing.FileHasher(path, data[:10], len(data), gate)
    for lo, hi in ((600, 1000), (10, 300), (300, 300), (300, 600)):  # ahead, then the gap, and an empty write
        h.wrote(lo, hi - lo)
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    short = tmp_path / "s"
    short.write_bytes(b"H" + b"x" * 10)
    cut = hashing.FileHasher(short, b"H", 20, gate)  # claims 20 bytes; only 11 exist
    cut.wrote(1, 19)
    with pytest.raises(OSError, match="short read"):
        cut.hexdigest()
    gap = hashing.FileHasher(path, data[:10], len(data), gate)
    gap.wrote(500, 500)  # bytes 10..500 never written
    with pytest.raises(RuntimeError, match="hashed 10 of 1000"):
        gap.hexdigest()  # returns (no hang) and says it never finished
    waiting = hashing.FileHasher(path, data[:10], len(data), gate)
    waiting.abort()  # the run failed
    with pytest.raises(RuntimeError, match="hashed 10 of 1000"):
        waiting.hexdigest()


def test_a_shared_input_is_staged_once_per_chunk(tmp_path, models):
    """DARE's base defaults to the aligned model, and a group's jobs share the pair:
    each distinct input is read once per chunk whatever the number of its uses."""
    plan, inputs = plan_and_inputs(*models)
    assert inputs.dare_base is inputs.aligned
    for staging in ("mmap", "read"):
        jobs = run(tmp_path, f"{staging}_", plan, inputs, n=2, staging=staging, chunk_elems=7)
        per_input = {
            name: sum(
                t.patched_elems * ck.tensor_view(t.name).element_size() for t in plan.tensors() if t.action == "patch"
            )
            for name, ck in (("f", inputs.finetuned), ("a", inputs.aligned), ("u", inputs.unaligned))
        }
        copied = sum(
            (t.numel - (t.patched_elems if t.action == "patch" else 0))
            * inputs.finetuned.tensor_view(t.name).element_size()
            for t in plan.tensors()
        )
        assert per_input["a"] > 0
        for job in jobs:  # F, A and U once each (not A twice as the DARE base), plus the copies
            assert job.stats.bytes_read == sum(per_input.values()) + copied


def test_an_input_truncated_during_the_run_is_a_clean_error(tmp_path, models, monkeypatch):
    """pread staging turns a shrinking input into a CheckpointError naming the file
    (with a mapping it would be a SIGBUS)."""
    plan, inputs = plan_and_inputs(*models)
    victim = inputs.unaligned.files["model.safetensors"]
    real = engine._Pass._finish_tensor
    done = [0]

    def truncate_after_first_tensor(self, tensor):
        real(self, tensor)
        done[0] += 1
        if done[0] == 1:
            os.truncate(victim.path, victim.size // 2)
            monkeypatch.setattr(victim, "check_unchanged", lambda: None)  # as if the stat raced the truncate

    monkeypatch.setattr(engine._Pass, "_finish_tensor", truncate_after_first_tensor)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated during the run"):
        run(tmp_path, "o", plan, inputs, staging="read", chunk_elems=7)


@pytest.mark.parametrize("budget", [0, 2_000, 1 << 30])
def test_device_cache_across_passes_gives_identical_bytes(tmp_path, models, budget):
    plan, inputs = plan_and_inputs(*models)
    cache = compute.DeviceCache("cpu", budget_bytes=budget)
    (direct,) = run(tmp_path, "direct", plan, inputs)
    for k in range(2):  # the second pass reads the shared inputs from the cache
        (staged,) = run(tmp_path, f"pass{k}_", plan, inputs, staging="read", chunk_elems=64, cache=cache)
        assert staged.stats.sha256 == direct.stats.sha256
    assert cache.used <= budget
    if budget == 0:
        assert cache.hits == 0 and cache.used == 0
    elif budget == 1 << 30:
        # aligned (= the DARE base, one object) and unaligned for every patched tensor
        patched = sum(t.action == "patch" for t in plan.tensors())
        assert cache.hits >= 2 * patched
        assert staged.stats.bytes_read < direct.stats.bytes_read
    else:
        assert 0 < cache.used and cache.misses > 0


def test_a_group_through_the_triton_kernel_matches_the_cpu_path(tmp_path, models):
    """The GPU's compute backend in a fused group: the Triton kernel (its CPU
    interpreter here) on torch views of the staged chunks, the pinned-style
    read staging and small chunks; the same bytes as the torch reference."""
    from resta_fast.kernels import BackendUnavailable, load_backend

    try:
        triton_kernel = load_backend("triton")
    except BackendUnavailable as exc:
        pytest.skip(f"triton unavailable: {exc}")
    plan, inputs = plan_and_inputs(*models)
    (ref,) = run(tmp_path, "ref", plan, inputs)
    jobs = run(tmp_path, "tri", plan, inputs, n=2, kernel=triton_kernel, staging="read", chunk_elems=4096)
    assert all(job.stats.sha256 == ref.stats.sha256 for job in jobs)


def test_fused_workers_split_cores_between_kernel_and_writers():
    assert engine.fused_workers(8, cores=16) == (12, 4)
    assert engine.fused_workers(1, cores=2) == (1, 1)
    assert engine.fused_workers(8, cores=2) == (1, 1) and engine.fused_workers(8, cores=1) == (1, 1)  # docs/batch.md
    assert engine.fused_workers(8, threads=3, writers=20, cores=2) == (3, 8)
