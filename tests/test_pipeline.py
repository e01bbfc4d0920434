"""The staged (GPU) pipeline's scheduling, run on CPU buffers; GPU runs when CUDA exists."""

import hashlib
import threading

import pytest
import torch
from checkpoints import three_models

from resta_fast import api
from resta_fast.errors import RestaError
from resta_fast.io.checkpoint import Checkpoint
from resta_fast.kernels import reference
from resta_fast.pipeline import cpu, gpu, stream
from resta_fast.pipeline.cpu import Inputs, run_plan
from resta_fast.plan import build_plan


@pytest.fixture()
def models(tmp_path):
    return three_models(tmp_path, shards=2, ft_extra_rows=3, vocab=16, hidden=8, layers=1, inter=12)


def plan_and_inputs(ft, al, un):
    F, A, U = Checkpoint(ft), Checkpoint(al), Checkpoint(un)
    return build_plan(F, aligned=A, unaligned=U, dare_base=A, beta=0.5), Inputs(F, A, U, None, A)


@pytest.mark.parametrize("chunk,slots", [(1, 1), (7, 2), (37, 2), (1000, 3), (1 << 20, 2)])
def test_staged_pipeline_matches_direct_pipeline(tmp_path, models, chunk, slots):
    plan, inputs = plan_and_inputs(*models)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    kw = dict(kernel=reference, beta=0.5, dare=0.3, seed=4, metadata={"format": "pt"})
    direct = run_plan(plan, inputs, tmp_path / "a", **kw)
    staged = gpu.run_plan_gpu(plan, inputs, tmp_path / "b", device="cpu", chunk_elems=chunk, slots=slots, **kw)
    assert staged.sha256 == direct.sha256
    for name in direct.sha256:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_back_pressure_bounds_chunks_in_flight(tmp_path, models, monkeypatch):
    plan, inputs = plan_and_inputs(*models)
    in_flight, peak, lock = [0], [0], threading.Lock()
    real_submit = stream.StagedWriter.submit
    gate = threading.Semaphore(0)

    def submit(self, job):
        if job.release is not None:  # a slot handed to the writer
            with lock:
                in_flight[0] += 1
                peak[0] = max(peak[0], in_flight[0])
            release = job.release

            def slow_release():
                gate.acquire(timeout=0.01)  # the writer lags behind the producer
                with lock:
                    in_flight[0] -= 1
                release()
            job.release = slow_release
        real_submit(self, job)

    monkeypatch.setattr(stream.StagedWriter, "submit", submit)
    (tmp_path / "o").mkdir()
    gpu.run_plan_gpu(plan, inputs, tmp_path / "o", kernel=reference, beta=0.5, dare=None, seed=0,
                     metadata={"format": "pt"}, device="cpu", chunk_elems=8, slots=2)
    assert 1 <= peak[0] <= 2


@pytest.mark.parametrize("stage", ["kernel", "writer"])
def test_error_in_a_stage_stops_and_leaves_no_output(tmp_path, models, monkeypatch, stage):
    ft, al, un = models
    calls, writes = [0], [0]

    class FailingKernel:
        @staticmethod
        def patch_into(*args, **kw):
            calls[0] += 1
            if stage == "kernel" and calls[0] == 5:
                raise RuntimeError("injected kernel failure")
            return reference.patch_into(*args, **kw)
        convert_into = staticmethod(reference.convert_into)

    if stage == "writer":
        real = stream.write_all

        def failing_write(fd, data, offset, path):
            writes[0] += 1
            if writes[0] == 7:
                raise OSError(5, "injected I/O error")
            real(fd, data, offset, path)
        monkeypatch.setattr(stream, "write_all", failing_write)

    def staged(plan, inputs, out_dir, **kw):
        kw.pop("threads", None)
        kw["kernel"] = FailingKernel
        return gpu.run_plan_gpu(plan, inputs, out_dir, device="cpu", chunk_elems=8, slots=2,
                                **{k: v for k, v in kw.items() if k != "chunk_elems"})

    monkeypatch.setattr(api, "run_plan", staged)
    with pytest.raises((RuntimeError, OSError, RestaError), match="injected"):
        api.patch(ft, tmp_path / "out", aligned=al, unaligned=un, beta=0.5, backend="torch", fsync=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".resta-tmp-" in p.name]


def test_busy_seconds_say_where_the_time_went(tmp_path, models):
    """The report's per-stage busy times: every stage that ran is counted, and no
    thread's total can exceed the run's wall time (a double count would)."""
    ft, al, un = models
    report = api.patch(ft, tmp_path / "out", aligned=al, unaligned=un, beta=0.5, backend="torch", fsync=False)
    busy, wall = report["stats"]["busy_seconds"], report["stats"]["seconds"]
    assert set(busy) == {"kernel", "write", "hash", "wait_for_buffer"}
    assert busy["kernel"] > 0 and busy["write"] > 0 and busy["hash"] > 0
    assert all(0 <= v <= wall + 0.002 for v in busy.values()), (busy, wall)
    plan, inputs = plan_and_inputs(ft, al, un)
    (tmp_path / "staged").mkdir()
    stats = gpu.run_plan_gpu(plan, inputs, tmp_path / "staged", kernel=reference, beta=0.5, dare=None, seed=0,
                             metadata={"format": "pt"}, device="cpu", chunk_elems=64, slots=2)
    assert {"stage", "kernel", "write", "hash", "wait_for_buffer"} <= set(stats.busy)
    assert stats.busy["stage"] > 0 and stats.busy["hash"] > 0
    assert all(0 <= v <= stats.seconds + 0.002 for v in stats.busy.values()), (stats.busy, stats.seconds)


@pytest.mark.parametrize("staged", [False, True])
def test_both_hash_modes_give_each_files_sha256(tmp_path, models, monkeypatch, staged):
    """Following (a thread per file re-reading it) and inline hashing record the same
    sha256, which is the file's, for every output file, on both pipelines."""
    plan, inputs = plan_and_inputs(*models)
    assert len(plan.files) == 2
    kw = dict(kernel=reference, beta=0.5, dare=0.3, seed=4, metadata={"format": "pt"})
    digests = {}
    for mode in ("inline", "follow"):
        monkeypatch.setattr(cpu, "HASH_MODE", mode)
        (tmp_path / mode).mkdir()
        run = (lambda *a, **k: gpu.run_plan_gpu(*a, device="cpu", chunk_elems=7, slots=2, **k)) if staged else \
            (lambda *a, **k: run_plan(*a, chunk_elems=7, **k))
        stats = run(plan, inputs, tmp_path / mode, **kw)
        assert stats.sha256 == {name: hashlib.sha256((tmp_path / mode / name).read_bytes()).hexdigest()
                                for name in stats.sha256}
        assert stats.busy["hash"] > 0
        digests[mode] = stats.sha256
    assert digests["inline"] == digests["follow"] and len(digests["follow"]) == 2


def test_file_hasher_reports_a_short_file_and_stops_when_aborted(tmp_path):
    gate = threading.Semaphore(2)
    path = tmp_path / "f"
    path.write_bytes(b"H" + b"x" * 10)
    short = stream.FileHasher(path, b"H", 20, gate)  # claims 20 bytes; only 11 exist
    short.update(memoryview(b"y" * 19))
    with pytest.raises(OSError, match="short read"):
        short.hexdigest()
    waiting = stream.FileHasher(path, b"H", 11, gate)  # nothing written yet: it waits
    waiting.abort()
    with pytest.raises(RuntimeError, match="hashed 1 of 11"):
        waiting.hexdigest()  # returns (no hang) and says it never finished


def test_dare_base_that_is_the_aligned_model_is_staged_once(tmp_path, models):
    """DARE's base defaults to the aligned model: the staged pipeline reads and uploads
    it once per chunk (same bytes out as the direct pipeline, which reads it twice)."""
    plan, inputs = plan_and_inputs(*models)
    assert inputs.dare_base is inputs.aligned
    kw = dict(kernel=reference, beta=0.5, dare=0.3, seed=4, metadata={"format": "pt"})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    direct = run_plan(plan, inputs, tmp_path / "a", **kw)
    staged = gpu.run_plan_gpu(plan, inputs, tmp_path / "b", device="cpu", chunk_elems=7, slots=2, **kw)
    assert staged.sha256 == direct.sha256
    base_bytes = sum(t.patched_elems * inputs.aligned.tensor_view(t.name).element_size()
                     for t in plan.tensors() if t.action == "patch")
    assert base_bytes > 0 and staged.bytes_read == direct.bytes_read - base_bytes


def test_chunk_size_from_pool():
    assert gpu.chunk_elems_for_pool(256 << 20, 3) * 20 * 3 <= 256 << 20
    assert gpu.chunk_elems_for_pool(1, 3) == 1024


@pytest.mark.gpu
@pytest.mark.parametrize("dare", [None, 0.3])
def test_gpu_pipeline_matches_cpu(tmp_path, models, dare):
    ft, al, un = models
    cpu_out, gpu_out = tmp_path / "cpu", tmp_path / "gpu"
    api.patch(ft, cpu_out, aligned=al, unaligned=un, beta=0.5, dare=dare, seed=2, backend="torch",
              fsync=False)
    api.patch(ft, gpu_out, aligned=al, unaligned=un, beta=0.5, dare=dare, seed=2, backend="triton",
              device="cuda", fsync=False)
    for f in cpu_out.glob("*.safetensors"):
        assert f.read_bytes() == (gpu_out / f.name).read_bytes()
    assert torch.cuda.is_available()


@pytest.mark.parametrize("budget", [0, 2_000, 1 << 30])
def test_device_cache_across_jobs_gives_identical_bytes(tmp_path, models, budget):
    ft, al, un = models
    plan, inputs = plan_and_inputs(ft, al, un)
    cache = gpu.DeviceCache("cpu", budget_bytes=budget)
    kw = dict(kernel=reference, beta=0.5, dare=0.3, seed=4, metadata={"format": "pt"})
    (tmp_path / "direct").mkdir()
    direct = run_plan(plan, inputs, tmp_path / "direct", **kw)
    for job in range(2):  # the second job reads the shared inputs from the cache
        (tmp_path / f"job{job}").mkdir()
        staged = gpu.run_plan_gpu(plan, inputs, tmp_path / f"job{job}", device="cpu", chunk_elems=64, slots=2,
                                  cache=cache, **kw)
        assert staged.sha256 == direct.sha256
    assert cache.used <= budget
    if budget == 0:
        assert cache.hits == 0 and cache.used == 0
    elif budget == 1 << 30:
        # aligned, unaligned and the DARE base (= aligned, shared) for every patched tensor
        patched = sum(t.action == "patch" for t in plan.tensors())
        assert cache.hits >= 2 * patched
        assert staged.bytes_read < direct.bytes_read
    else:
        assert 0 < cache.used and cache.misses > 0


@pytest.mark.gpu
def test_gpu_device_cache_matches_cpu(tmp_path, models):
    ft, al, un = models
    cache = gpu.DeviceCache("cuda")
    api.patch(ft, tmp_path / "cpu", aligned=al, unaligned=un, beta=0.5, dare=0.3, seed=2, backend="torch",
              fsync=False)
    for job in range(2):
        api.patch(ft, tmp_path / f"gpu{job}", aligned=al, unaligned=un, beta=0.5, dare=0.3, seed=2,
                  backend="triton", device="cuda", fsync=False, device_cache=cache)
        for f in (tmp_path / "cpu").glob("*.safetensors"):
            assert f.read_bytes() == (tmp_path / f"gpu{job}" / f.name).read_bytes()
    assert cache.hits > 0
