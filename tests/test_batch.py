"""`resta-fast batch`: fused outputs identical to per-job `patch`, resume, verification,
failure isolation, manifest validation, Ray executor, Slurm script."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from checkpoints import llama_tensors, three_models, write_model

from resta_fast import api
from resta_fast.batch import local
from resta_fast.batch.cli import cmd_batch  # noqa: F401 - the subcommand must import
from resta_fast.batch.manifest import ManifestError, load_manifest
from resta_fast.card import CARD_NAME
from resta_fast.cli import main as cli_main
from resta_fast.io.lock import OutputLock
from resta_fast.kernels import backend_status

REPO = Path(__file__).resolve().parent.parent
BACKENDS = ["torch"] + (["cpp"] if backend_status()["cpp"] == "ok" else [])


def files_of(out: Path) -> dict[str, bytes]:
    """Every file of an output except the report (which has a timestamp) and the model card
    (which says how it was written: by a batch job or a patch)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name not in (local.REPORT_NAME, CARD_NAME)}


def reference(job, root: Path) -> dict[str, bytes]:
    """The job run alone through api.patch."""
    out = root / "ref" / job.name
    out.parent.mkdir(exist_ok=True)
    api.patch(job.finetuned, out, **job.patch_kwargs(), fsync=False)
    return files_of(out)


def make_world(root: Path) -> Path:
    """Shared pair + three fine-tunes with different layouts: sharded, single
    file, and one with an extra tensor and extra vocabulary rows."""
    ft, al, un = three_models(root, shards=2)
    write_model(root / "ft_single", {k: (v.float() * 1.01).to(v.dtype) for k, v in llama_tensors(7).items()})
    extra = llama_tensors(8, extra_rows=3)
    extra["model.extra_scale"] = torch.ones(4, dtype=torch.bfloat16)
    write_model(root / "ft_extra", extra)
    api.make_vector(al, un, root / "vec", fsync=False)
    (root / "outs").mkdir()
    return root


def write_manifest(root: Path, jobs: list[dict], name="batch.yaml", **top) -> Path:
    import yaml
    doc = {"aligned": "aligned", "unaligned": "unaligned", "beta": 0.5, "fsync": False, **top, "jobs": jobs}
    path = root / name
    path.write_text(json.dumps(doc) if name.endswith(".json") else yaml.safe_dump(doc))
    return path


JOBS = [
    {"finetuned": "ft", "out": "outs/plain"},
    {"finetuned": "ft_single", "out": "outs/dare", "beta": 0.7, "dare": 0.3, "seed": 4},
    {"finetuned": "ft", "out": "outs/sweep", "beta": 1.25, "dare": 0.1, "beta_rules": {"mlp": 0.2},
     "exclude": ["norm"]},
    {"finetuned": "ft_extra", "out": "outs/extra", "beta": 0.25, "dtype": "float32"},
    {"finetuned": "ft", "out": "outs/vec", "vector": "vec", "unaligned": None, "dare_base": "aligned",
     "dare": 0.2, "seed": 9},
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_is_bit_identical_to_patch_per_job(tmp_path, backend):
    root = make_world(tmp_path)
    manifest = load_manifest(write_manifest(root, JOBS, backend=backend))
    assert [len(g.jobs) for g in manifest.groups] == [4, 1]  # the vector job has other shared inputs
    results = local.run_batch(manifest, chunk_elems=37)  # chunk edges mid-row and mid-counter
    assert [r.status for r in results] == ["done"] * 5, local.format_table(results)
    for job in manifest.jobs:
        got = files_of(job.out)
        assert got == reference(job, root), f"{job.name}: batch output differs from `patch`"
        report = json.loads((job.out / local.REPORT_NAME).read_text())
        assert report["batch"]["jobs_in_pass"] == (4 if job.vector is None else 1)
        assert local.verify_files(job.out, report["files"]) == ""


def test_groups_follow_shared_inputs_and_group_size(tmp_path):
    root = make_world(tmp_path)
    manifest = load_manifest(write_manifest(root, JOBS), group_size=2)
    names = [[j.name for j in g.jobs] for g in manifest.groups]
    assert names == [["plain", "dare"], ["sweep", "extra"], ["vec"]]
    ran = local.run_batch(manifest, groups=[1])
    assert [(r.name, r.status) for r in ran] == [("sweep", "done"), ("extra", "done")]
    assert not (root / "outs/plain").exists()
    with pytest.raises(Exception, match="has 3 group"):
        manifest.select([3])


def test_rerun_skips_verified_and_redoes_a_corrupted_output(tmp_path):
    root = make_world(tmp_path)
    manifest = load_manifest(write_manifest(root, JOBS[:3]))
    local.run_batch(manifest)
    shard = root / "outs/plain/model-00001-of-00002.safetensors"
    good = files_of(root / "outs/plain")
    untouched = {p: p.stat().st_mtime_ns for p in (root / "outs/dare").iterdir()}
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x40
    shard.write_bytes(bytes(data))
    results = load_and_run(root / "batch.yaml")
    assert [r.status for r in results] == ["redone", "skipped", "skipped"]
    assert "sha256" in results[0].note
    assert files_of(root / "outs/plain") == good
    assert {p: p.stat().st_mtime_ns for p in (root / "outs/dare").iterdir()} == untouched


def load_and_run(path, **kw):
    return local.run_batch(load_manifest(path), **kw)


def slow_batch(path, **popen_kw) -> subprocess.Popen:
    """`resta-fast batch path` in a child process, 0.1 s slower per tensor of the engine's pass,
    so a test can signal it mid-job."""
    script = (
        f"import sys, time; sys.path.insert(0, {str(REPO)!r})\n"
        "import resta_fast.pipeline.engine as engine\n"
        "orig = engine._Pass._finish_tensor\n"
        "def slow(*a, **k):\n"
        "    orig(*a, **k); time.sleep(0.1)\n"
        "engine._Pass._finish_tensor = slow\n"
        "from resta_fast.cli import main\n"
        f"sys.exit(main(['batch', {str(path)!r}, '--no-progress']))\n"
    )
    return subprocess.Popen([sys.executable, "-c", script], **popen_kw)


def test_resume_after_a_job_is_killed_midway(tmp_path):
    root = make_world(tmp_path)
    path = write_manifest(root, JOBS[:3], group_size=1)
    proc = slow_batch(path, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not (root / "outs/plain/resta_fast.json").exists():
        time.sleep(0.01)
    time.sleep(0.3)  # well into the second job (~20 tensors x 0.1 s each)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (root / "outs/plain").exists() and not (root / "outs/sweep").exists()
    temps = [p for p in (root / "outs").iterdir() if ".resta-tmp-" in p.name]
    assert temps, "the kill should have interrupted the second job mid-write"
    first = {p.name: p.stat().st_ino for p in (root / "outs/plain").iterdir()}
    results = load_and_run(path)
    assert [r.status for r in results] == ["skipped", "done", "done"]
    assert {p.name: p.stat().st_ino for p in (root / "outs/plain").iterdir()} == first  # never rewritten
    assert not [p for p in (root / "outs").iterdir() if ".resta-tmp-" in p.name], "dead run's temp dir kept"
    manifest = load_manifest(path)
    for job in manifest.jobs:
        assert files_of(job.out) == reference(job, root)


def test_sigterm_stops_cleanly_keeps_finished_jobs_and_rerun_resumes(tmp_path):
    """SIGTERM (Slurm time limit, a cancelled CI job) mid-batch: exit 143, the finished
    job stays committed, the running one leaves no temp dir or lock, and a rerun resumes."""
    root = make_world(tmp_path)
    path = write_manifest(root, JOBS[:3], group_size=1)
    proc = slow_batch(path, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (root / "outs/plain/resta_fast.json").exists():
        time.sleep(0.01)
    time.sleep(0.3)  # well into the second job (~20 tensors x 0.1 s each)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "resta-fast: terminated (SIGTERM); partial output removed"
    assert (root / "outs/plain").exists() and not (root / "outs/sweep").exists()
    assert not [p.name for p in (root / "outs").iterdir() if p.name.startswith(".")], "temp dir or lock left"
    first = {p.name: p.stat().st_ino for p in (root / "outs/plain").iterdir()}
    results = load_and_run(path)
    assert [r.status for r in results] == ["skipped", "done", "done"]
    assert {p.name: p.stat().st_ino for p in (root / "outs/plain").iterdir()} == first


def test_one_failing_job_does_not_stop_or_spoil_the_others(tmp_path):
    root = make_world(tmp_path)
    manifest = load_manifest(write_manifest(root, JOBS[:3]))
    victim = root / "ft_single" / "model.safetensors"

    class ModifyMidPass(local.Reporter):
        """Touches job 1's fine-tune once the fused pass is under way."""
        def job_progress(self, job, nbytes):
            if not hasattr(self, "done"):
                self.done = True
                os.utime(victim, ns=(time.time_ns(), time.time_ns() + 10**9))

    results = local.run_batch(manifest, reporter=ModifyMidPass())
    assert [r.status for r in results] == ["done", "failed", "done"]
    assert "modified" in results[1].error and str(victim) in results[1].error
    assert not (root / "outs/dare").exists()
    assert not [p for p in (root / "outs").iterdir() if p.name.startswith(".")]
    for job in (manifest.jobs[0], manifest.jobs[2]):
        assert files_of(job.out) == reference(job, root)


def test_cli_exit_codes_summary_and_busy_output(tmp_path, capsys):
    root = make_world(tmp_path)
    path = write_manifest(root, JOBS[:3])
    summary = root / "summary.json"
    with OutputLock(root / "outs/dare"):  # another run is writing this output
        code = cli_main(["batch", str(path), "--json", "--no-progress", "--summary", str(summary)])
    assert code == 1
    out = json.loads(capsys.readouterr().out)
    assert out == json.loads(summary.read_text())
    assert [j["status"] for j in out["jobs"]] == ["done", "failed", "done"]
    assert "another resta-fast run" in out["jobs"][1]["error"]
    assert cli_main(["batch", str(path), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "dare: done" in err and "plain: skipped" in err and "1 done, 2 skipped of 3 job(s)" in err


def test_manifest_validation_lists_every_problem_and_writes_nothing(tmp_path, capsys):
    root = make_world(tmp_path)
    write_model(root / "ft_wide", llama_tensors(5, hidden=48))
    (root / "outs/foreign").mkdir()
    jobs = [
        {"finetuned": "ft", "out": "outs/a", "betta": 0.3},
        {"finetuned": "missing", "out": "outs/b"},
        {"finetuned": "ft", "out": "outs/a"},
        {"finetuned": "ft", "out": "ft/inside"},
        {"finetuned": "ft_wide", "out": "outs/wide"},
        {"finetuned": "ft", "out": "outs/c", "dare": 1.5, "beta": "big"},
        {"finetuned": "ft", "out": "outs/foreign"},
    ]
    path = write_manifest(root, jobs, threds=2)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    msg = str(info.value)
    for needle in ("unknown key 'betta'; did you mean 'beta'", "unknown key 'threds'; did you mean 'threads'",
                   "jobs[2]", "dare must be a drop probability", "beta must be a finite number"):
        assert needle in msg, needle
    # Key and type errors come first; fix them and the path and plan checks all report together.
    for job in jobs:
        job.pop("betta", None)
    jobs[5] = {"finetuned": "ft", "out": "outs/c"}
    path = write_manifest(root, jobs)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    msg = str(info.value)
    for needle in ("jobs[1] (b): finetuned", "does not exist", "jobs[2] (a): out", "also the out of jobs[0]",
                   "jobs[3] (inside): out", "overlaps its own input"):
        assert needle in msg, needle
    jobs[1]["finetuned"], jobs[2]["out"], jobs[3]["out"] = "ft", "outs/a2", "outs/inside"
    path = write_manifest(root, jobs)
    manifest = load_manifest(path)  # data only: the plan checks are the batch command's deep check
    with pytest.raises(ManifestError) as info:
        local.check_manifest(manifest)
    msg = str(info.value)
    assert "jobs[4] (wide)" in msg and "disagree" in msg
    assert "jobs[6] (foreign)" in msg and "not a resta_fast output" in msg
    assert cli_main(["batch", str(path)]) == 2
    assert "nothing was written" in capsys.readouterr().err
    assert sorted(p.name for p in (root / "outs").iterdir()) == ["foreign"]


def test_a_finished_output_of_another_job_is_never_replaced(tmp_path):
    root = make_world(tmp_path)
    local.run_batch(load_manifest(write_manifest(root, JOBS[:1])))
    changed = dict(JOBS[0], beta=0.9)
    manifest = load_manifest(write_manifest(root, [changed]))
    with pytest.raises(ManifestError, match=r"different job's finished output \(beta 0.5 on disk vs 0.9 now"):
        local.check_manifest(manifest)


def test_slurm_script_passes_bash_n_and_names_every_job(tmp_path, capsys):
    root = make_world(tmp_path)
    path = write_manifest(root, JOBS, group_size=2, slurm={"partition": "cpu", "time": "01:00:00"})
    assert cli_main(["batch", str(path), "--emit-slurm", str(root / "slurm")]) == 0
    script = root / "slurm" / "resta_batch.sbatch"
    text = script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    for job in JOBS:
        assert Path(job["out"]).name in text
    assert "#SBATCH --array=0-2" in text and "#SBATCH --partition=cpu" in text
    assert '--group "$SLURM_ARRAY_TASK_ID"' in text and "--group-size 2" in text
    assert "--gres" not in text
    # A GPU manifest is emitted from a login node without GPUs: devices are checked on the nodes.
    write_manifest(root, JOBS, device="cuda")
    assert cli_main(["batch", str(path), "--emit-slurm", str(root / "slurm")]) == 0
    assert "#SBATCH --gres=gpu:1" in script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert not any((root / "outs").iterdir())
    if not torch.cuda.is_available():
        assert cli_main(["batch", str(path)]) == 2
        assert "no CUDA GPU is visible" in capsys.readouterr().err


def test_dry_run_prints_groups(tmp_path, capsys):
    root = make_world(tmp_path)
    path = write_manifest(root, JOBS, name="batch.json")
    assert cli_main(["batch", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "5 job(s) in 2 group(s)" in out and "[4] vec" in out
    assert not any((root / "outs").iterdir())


# --- Ray ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    # Workers must import resta_fast from this checkout.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    tmp = tmp_path_factory.mktemp("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(tmp / "r"))
    yield ray
    ray.shutdown()


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


def test_progress_status_lines(tmp_path, capsys):
    root = make_world(tmp_path)
    path = write_manifest(root, JOBS[:2])
    assert cli_main(["batch", str(path), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "resta-fast batch [1/2] plain: done" in err and "[2/2] dare: done" in err


def test_lora_adapter_jobs_match_patch(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "aligned")
    tensors = load_file(str(tmp_path / "aligned/model.safetensors"))
    g = torch.Generator().manual_seed(2)
    for name, scale in (("unaligned", 0.02), ("ft", 0.05)):
        (tmp_path / name).mkdir()
        noisy = {k: (v.float() + torch.randn(v.shape, generator=g) * scale).to(v.dtype)
                 for k, v in tensors.items()}
        save_file(noisy, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(tmp_path / "aligned/config.json", tmp_path / name / "config.json")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "aligned", dtype=torch.float32)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(tmp_path / "adapter")
    (tmp_path / "outs").mkdir()
    jobs = [{"finetuned": "adapter", "out": "outs/lora"},
            {"finetuned": "ft", "out": "outs/full", "dare": 0.3},
            {"finetuned": "adapter", "out": "outs/lora_dare", "dare": 0.2, "seed": 3}]
    manifest = load_manifest(write_manifest(tmp_path, jobs, backend="torch"))
    results = local.run_batch(manifest)
    assert [r.status for r in results] == ["done"] * 3, local.format_table(results)
    for job in manifest.jobs:
        assert files_of(job.out) == reference(job, tmp_path), job.name


# --- the prepare step on the batch path ---------------------------------------------------

def test_a_write_error_in_a_batch_job_is_a_clean_failure_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from resta_fast import report as report_mod
    root = make_world(tmp_path)
    manifest = load_manifest(write_manifest(root, JOBS[:2]))

    def disk_full(src, dst, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))
    monkeypatch.setattr(report_mod.shutil, "copyfile", disk_full)  # copying the fine-tune's side files
    results = local.run_batch(manifest)
    assert [r.status for r in results] == ["failed", "failed"]
    for r in results:
        assert r.error.endswith("write failed (No space left on device); the disk is full; free space or "
                                "choose another --out. Nothing was kept."), r.error
        assert "config.json" in r.error and not r.error.startswith("OSError") and not r.transient
    assert list((root / "outs").iterdir()) == []  # no output, temp dir or lock left


def test_manifest_errors_name_options_as_keys_not_flags(tmp_path):
    root = make_world(tmp_path)
    jobs = [{"finetuned": "ft", "out": "outs/a", "beta": float("inf"), "dtype": "int8", "device": "tpu",
             "beta_rules": ["noequals"]},
            {"finetuned": "ft", "out": "outs/b", "vector": "vec", "dare": 0.1}]
    with pytest.raises(ManifestError) as info:
        load_manifest(write_manifest(root, jobs, name="batch.json"))
    msg = str(info.value)
    for needle in ("jobs[0]: beta must be a finite number, got inf", "jobs[0]: dtype 'int8' is not supported",
                   "jobs[0]: device 'tpu': expected", "jobs[0]: beta_rules 'noequals': expected REGEX=BETA"):
        assert needle in msg, needle
    assert "--" not in msg, msg
    jobs = [{"finetuned": "ft", "out": "outs/b", "vector": "vec", "unaligned": None, "aligned": None, "dare": 0.1}]
    with pytest.raises(ManifestError) as info:
        load_manifest(write_manifest(root, jobs))
    assert "jobs[0] (b): dare needs the model the fine-tune started from: pass dare_base (or aligned)" \
        in str(info.value)
    assert "--" not in str(info.value)


def test_manifest_loading_is_data_only():
    code = ("import sys, resta_fast.batch.manifest; "
            "print([m for m in ('resta_fast.batch.local', 'resta_fast.api') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_batch_opens_and_plans_each_input_once(tmp_path, monkeypatch):
    """check_manifest prepares every group; run_batch runs those prepared jobs
    without opening anything again, and shared inputs are one object."""
    from resta_fast import api
    root = make_world(tmp_path)
    manifest = load_manifest(write_manifest(root, JOBS))
    opened, planned = [], []
    real_init, real_plan = api.Checkpoint.__init__, api.build_plan

    def counting_init(self, path, role="model"):
        opened.append(str(path))
        real_init(self, path, role)
    monkeypatch.setattr(api.Checkpoint, "__init__", counting_init)
    monkeypatch.setattr(api, "build_plan", lambda *a, **k: planned.append(1) or real_plan(*a, **k))
    with local.check_manifest(manifest) as prepared:
        assert sorted(manifest.out_bytes) == [0, 1, 2, 3, 4]
        assert sorted(opened) == sorted([str(root / p) for p in ("aligned", "unaligned", "ft", "ft_single",
                                                                 "ft_extra", "vec", "ft", "aligned")])
        results = local.run_batch(manifest, prepared=prepared)
    assert [r.status for r in results] == ["done"] * 5, local.format_table(results)
    assert len(opened) == 8 and len(planned) == 5  # nothing opened or planned again by the run


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
        manifest.write_text(json.dumps({"aligned": str(al), "unaligned": str(un), "fsync": False,
                                        "jobs": [{"finetuned": str(ft), "out": str(tmp_path / "o1")}]}))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(REPO))
        proc = subprocess.run([sys.executable, "-m", "resta_fast", "batch", str(manifest), "--executor", "ray",
                               "--num-cpus", "1", "--no-progress"], env=env, capture_output=True, text=True,
                              timeout=240)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (tmp_path / "o1" / "resta_fast.json").is_file()
    finally:
        subprocess.run([sys.executable, "-c", "import ray; ray.shutdown()"], capture_output=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
