"""The local batch executor (resta_fast/batch/local.py): fused outputs identical to
per-job `patch`, resume and rerun, the deep check, failure isolation."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from batch_fixtures import JOBS, files_of, load_and_run, make_world, reference, slow_batch, write_manifest

from resta_fast.batch import local
from resta_fast.batch.manifest import ManifestError, load_manifest
from resta_fast.kernels import backend_status

BACKENDS = ["torch"] + (["cpp"] if backend_status()["cpp"] == "ok" else [])


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


def test_a_finished_output_of_another_job_is_never_replaced(tmp_path):
    root = make_world(tmp_path)
    local.run_batch(load_manifest(write_manifest(root, JOBS[:1])))
    changed = dict(JOBS[0], beta=0.9)
    manifest = load_manifest(write_manifest(root, [changed]))
    with pytest.raises(ManifestError, match=r"different job's finished output \(beta 0.5 on disk vs 0.9 now"):
        local.check_manifest(manifest)


def test_lora_adapter_jobs_match_patch(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "aligned")
    tensors = load_file(str(tmp_path / "aligned/model.safetensors"))
    g = torch.Generator().manual_seed(2)
    for name, scale in (("unaligned", 0.02), ("ft", 0.05)):
        (tmp_path / name).mkdir()
        noisy = {k: (v.float() + torch.randn(v.shape, generator=g) * scale).to(v.dtype) for k, v in tensors.items()}
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
    jobs = [
        {"finetuned": "adapter", "out": "outs/lora"},
        {"finetuned": "ft", "out": "outs/full", "dare": 0.3},
        {"finetuned": "adapter", "out": "outs/lora_dare", "dare": 0.2, "seed": 3},
    ]
    manifest = load_manifest(write_manifest(tmp_path, jobs, backend="torch"))
    results = local.run_batch(manifest)
    assert [r.status for r in results] == ["done"] * 3, local.format_table(results)
    for job in manifest.jobs:
        assert files_of(job.out) == reference(job, tmp_path), job.name


def test_a_write_error_in_a_batch_job_is_a_clean_failure_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    from resta_fast.io import public as public_mod

    root = make_world(tmp_path)
    manifest = load_manifest(write_manifest(root, JOBS[:2]))

    def disk_full(src, dst, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))

    monkeypatch.setattr(public_mod.shutil, "copyfile", disk_full)  # copying the fine-tune's side files
    results = local.run_batch(manifest)
    assert [r.status for r in results] == ["failed", "failed"]
    for r in results:
        assert r.error.endswith(
            "write failed (No space left on device); the disk is full; free space or "
            "choose another --out. Nothing was kept."
        ), r.error
        assert "config.json" in r.error and not r.error.startswith("OSError") and not r.transient
    assert list((root / "outs").iterdir()) == []  # no output, temp dir or lock left


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
        assert sorted(opened) == sorted(
            [str(root / p) for p in ("aligned", "unaligned", "ft", "ft_single", "ft_extra", "vec", "ft", "aligned")]
        )
        results = local.run_batch(manifest, prepared=prepared)
    assert [r.status for r in results] == ["done"] * 5, local.format_table(results)
    assert len(opened) == 8 and len(planned) == 5  # nothing opened or planned again by the run


def _stable(out) -> dict:
    """An output's every byte but the report's time stamp and timings."""
    files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != local.REPORT_NAME}
    report = json.loads((out / local.REPORT_NAME).read_text())
    report.pop("created")
    report["stats"].pop("seconds"), report["stats"].pop("busy_seconds")
    return {**files, local.REPORT_NAME: report}


def test_run_batch_on_job_specs_in_memory_equals_the_same_manifest_file(tmp_path):
    """run_batch takes JobSpecs built in memory (what compare does) and writes what the same jobs
    loaded from a manifest file write, bit for bit: the manifest is only a loader."""
    import copy

    root = make_world(tmp_path)
    manifest = load_manifest(write_manifest(root, JOBS[:3], group_size=2))
    specs = [copy.copy(job) for job in manifest.jobs]
    for spec in specs:
        spec.out = root / "mem" / spec.out.name
    (root / "mem").mkdir()
    from_file = local.run_batch(manifest)
    in_memory = local.run_batch(specs, group_size=2, fsync=False)
    assert (
        [(r.status, r.group) for r in in_memory]
        == [(r.status, r.group) for r in from_file]
        == [
            ("done", 0),
            ("done", 0),
            ("done", 1),
        ]
    )
    for job, spec in zip(manifest.jobs, specs, strict=True):
        assert _stable(spec.out) == _stable(job.out), job.name
    assert local.run_batch(specs, group_size=2)[0].status == "skipped"  # resumable, like a manifest


def test_job_specs_need_distinct_indices_and_a_manifest_keeps_its_groups(tmp_path):
    root = make_world(tmp_path)
    manifest = load_manifest(write_manifest(root, JOBS[:2]))
    with pytest.raises(ValueError, match="distinct indices"):
        local.run_batch([manifest.jobs[0], manifest.jobs[0]])
    with pytest.raises(ValueError, match="keeps its own groups"):
        local.run_batch(manifest, group_size=1)
    assert local.as_manifest(manifest) is manifest
