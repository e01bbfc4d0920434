"""Batch manifests (resta_fast/batch/manifest.py): grouping, validation that lists
every problem, errors naming manifest keys, loading that is data only."""

import json
import subprocess
import sys

import pytest
from batch_fixtures import JOBS, make_world, write_manifest
from checkpoints import llama_tensors, write_model

from resta_fast.batch import local
from resta_fast.batch.manifest import ManifestError, load_manifest
from resta_fast.cli import main as cli_main


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
    for needle in (
        "unknown key 'betta'; did you mean 'beta'",
        "unknown key 'threds'; did you mean 'threads'",
        "jobs[2]",
        "dare must be a drop probability",
        "beta must be a finite number",
    ):
        assert needle in msg, needle
    # Key and type errors come first; fix them and the path and plan checks all report together.
    for job in jobs:
        job.pop("betta", None)
    jobs[5] = {"finetuned": "ft", "out": "outs/c"}
    path = write_manifest(root, jobs)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    msg = str(info.value)
    for needle in (
        "jobs[1] (b): finetuned",
        "does not exist",
        "jobs[2] (a): out",
        "also the out of jobs[0]",
        "jobs[3] (inside): out",
        "overlaps its own input",
    ):
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


def test_manifest_errors_name_options_as_keys_not_flags(tmp_path):
    root = make_world(tmp_path)
    jobs = [
        {
            "finetuned": "ft",
            "out": "outs/a",
            "beta": float("inf"),
            "dtype": "int8",
            "device": "tpu",
            "beta_rules": ["noequals"],
        },
        {"finetuned": "ft", "out": "outs/b", "vector": "vec", "dare": 0.1},
    ]
    with pytest.raises(ManifestError) as info:
        load_manifest(write_manifest(root, jobs, name="batch.json"))
    msg = str(info.value)
    for needle in (
        "jobs[0]: beta must be a finite number, got inf",
        "jobs[0]: dtype 'int8' is not supported",
        "jobs[0]: device 'tpu': expected",
        "jobs[0]: beta_rules 'noequals': expected REGEX=BETA",
    ):
        assert needle in msg, needle
    assert "--" not in msg, msg
    jobs = [{"finetuned": "ft", "out": "outs/b", "vector": "vec", "unaligned": None, "aligned": None, "dare": 0.1}]
    with pytest.raises(ManifestError) as info:
        load_manifest(write_manifest(root, jobs))
    assert "jobs[0] (b): dare needs the model the fine-tune started from: pass dare_base (or aligned)" in str(
        info.value
    )
    assert "--" not in str(info.value)


def test_manifest_loading_is_data_only():
    code = (
        "import sys, resta_fast.batch.manifest; "
        "print([m for m in ('resta_fast.batch.local', 'resta_fast.api') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_manifest_built_in_memory_equals_the_same_manifest_loaded_from_a_file(tmp_path):
    from resta_fast.batch.manifest import manifest_from_mapping

    root = make_world(tmp_path)
    path = write_manifest(root, JOBS[:2], name="batch.json")
    raw = json.loads(path.read_text())
    built = manifest_from_mapping(raw, "in memory", root=root)
    loaded = load_manifest(path)
    assert built.jobs == loaded.jobs and [g.jobs for g in built.groups] == [g.jobs for g in loaded.groups]
    assert not (tmp_path / "in memory").exists()
    with pytest.raises(ManifestError, match=r"^manifest in memory: 1 problem\(s\); nothing was written"):
        manifest_from_mapping({**raw, "betta": 1}, "in memory", root=root)
