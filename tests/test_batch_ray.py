"""The Ray executor (resta_fast/batch/ray.py): same bits as local, CPU tasks, retries
of transient I/O failures, addresses, a missing or dead Ray."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from batch_fixtures import JOBS, REPO, files_of, make_world, reference, write_manifest
from checkpoints import three_models

from resta_fast.batch import local
from resta_fast.batch.manifest import load_manifest


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Workers must import resta_fast from this checkout.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # A short root of its own: Ray's socket paths under it must fit AF_UNIX's 107 bytes, and pytest's
    # tmp root grows with its run counter and, under pytest-xdist, a per-worker folder.
    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
    yield ray
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_ray_executor_gives_the_same_bits_as_local(tmp_path, ray_cluster):
    from resta_fast.batch.ray import run_ray

    root = make_world(tmp_path)
    path = write_manifest(root, JOBS, group_size=2)
    manifest = load_manifest(path)
    results = run_ray(manifest, num_cpus=1)
    assert [r.status for r in results] == ["done"] * 5, local.format_table(results)
    assert {r.group for r in results} == {0, 1, 2}
    for job in manifest.jobs:
        assert files_of(job.out) == reference(job, root)
    again = run_ray(load_manifest(path), num_cpus=1)
    assert [r.status for r in again] == ["skipped"] * 5


@pytest.mark.slow
def test_ray_cpu_tasks_hide_gpus(ray_cluster):
    from resta_fast.batch.manifest import Group
    from resta_fast.batch.ray import task_options

    opts = task_options(Group(0, [type("J", (), {"device": "cpu"})()]), 1, None)
    assert opts["num_gpus"] == 0 and opts["retry_exceptions"] == [OSError]

    @ray_cluster.remote
    def env():
        return os.environ.get("CUDA_VISIBLE_DEVICES")

    assert ray_cluster.get(env.options(**opts).remote()) == ""


def test_ray_address_that_does_not_answer_fails_fast():
    from resta_fast.batch.ray import check_reachable
    from resta_fast.errors import RestaError

    start = time.time()
    with pytest.raises(RestaError, match="does not answer"):
        check_reachable("127.0.0.1:1", timeout=2)
    assert time.time() - start < 3
    with pytest.raises(RestaError, match="HOST:PORT"):
        check_reachable("ray://:10001")


def test_transient_io_failures_make_the_ray_task_retry_and_keep_results(monkeypatch):
    import pickle

    from resta_fast.batch import ray as batch_ray
    from resta_fast.batch.manifest import Group, JobSpec

    job = JobSpec(0, "a", Path("/x/ft"), Path("/x/out"))
    results = [local.JobResult(0, "a", 0, "/x/out", "failed", error="OSError: [Errno 5] EIO", transient=True)]
    monkeypatch.setattr(batch_ray, "run_group", lambda *a, **k: results)
    with pytest.raises(batch_ray.TransientJobError) as info:
        batch_ray._group_task(None, 0, 0, None, None, {})
    assert isinstance(info.value, OSError)  # what retry_exceptions=[OSError] matches
    err = pickle.loads(pickle.dumps(info.value))  # travels back from the worker
    assert err.results == [r.to_json() for r in results]

    class FakeRay:
        @staticmethod
        def get(ref):
            exc = RuntimeError("task failed after retries")
            exc.cause = err
            raise exc

    collected = batch_ray._collect(FakeRay, None, Group(0, [job]))
    assert [(r.status, r.transient) for r in collected] == [("failed", True)]


def test_missing_ray_says_how_to_install(monkeypatch, tmp_path):
    from resta_fast.batch import ray as batch_ray
    from resta_fast.errors import RestaError

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RestaError, match=r"pip install 'resta-fast\[ray\]'"):
        batch_ray.import_ray()


def test_no_ray_address_starts_a_fresh_local_cluster_not_a_recorded_one(monkeypatch, tmp_path):
    """Without --ray-address or RAY_ADDRESS, ray.init gets address="local": Ray's own
    default would join the cluster recorded by an earlier `ray start`, and hang when it
    has died. An explicit address is still checked and passed through."""
    from resta_fast.batch import ray as batch_ray
    from resta_fast.batch.manifest import Manifest

    calls = []

    class Stop(Exception):
        pass

    class FakeRay:
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**kw):
            calls.append(kw)
            raise Stop

    monkeypatch.setattr(batch_ray, "import_ray", lambda: FakeRay)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    manifest = Manifest.__new__(Manifest)
    manifest.num_cpus = manifest.num_gpus = manifest.threads = None
    monkeypatch.setattr(Manifest, "select", lambda self, groups: [], raising=False)
    with pytest.raises(Stop):
        batch_ray.run_ray(manifest)
    monkeypatch.setattr(batch_ray, "check_reachable", lambda address: None)
    with pytest.raises(Stop):
        batch_ray.run_ray(manifest, address="10.0.0.1:6379")
    assert [c["address"] for c in calls] == ["local", "10.0.0.1:6379"]


@pytest.mark.slow
def test_a_dead_recorded_ray_cluster_does_not_hang_a_batch(tmp_path):
    """An earlier `ray start --head` recorded a cluster that has died (a closed local
    port): `batch --executor ray` with no address starts its own local cluster and
    finishes, where Ray's default joined the dead one and hung, ignoring SIGTERM."""
    pytest.importorskip("ray")
    import tempfile

    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths are length-limited
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1\n")
        ft, al, un = three_models(tmp_path, vocab=16, hidden=8, layers=1, inter=12)
        manifest = tmp_path / "m.json"
        manifest.write_text(
            json.dumps(
                {
                    "aligned": str(al),
                    "unaligned": str(un),
                    "fsync": False,
                    "jobs": [{"finetuned": str(ft), "out": str(tmp_path / "o1")}],
                }
            )
        )
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(REPO))
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "resta_fast",
                "batch",
                str(manifest),
                "--executor",
                "ray",
                "--num-cpus",
                "1",
                "--no-progress",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (tmp_path / "o1" / "resta_fast.json").is_file()
    finally:
        subprocess.run([sys.executable, "-c", "import ray; ray.shutdown()"], capture_output=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
