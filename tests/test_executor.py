"""The one executor (resta_fast/executor.py): claim → write → finish → validate → commit.

A failure in any step leaves nothing of that output (no directory, no temp dir, no lock file) and,
in a pass of several outputs, the others are written and verify; every output kind stamps its
report's ``created`` through one clock (``report._now``); both write kinds (the engine, the adapter
writer) go through it.
"""

import errno
import json
from pathlib import Path

import pytest
import torch
from checkpoints import three_models, write_adapter
from safetensors.torch import load_file

from resta_fast import api, convert, executor, realign, report
from resta_fast.batch import local
from resta_fast.batch.manifest import JobSpec
from resta_fast.errors import RestaError
from resta_fast.io.lock import OutputBusy, OutputLock
from resta_fast.io.writer import AtomicOutputDir
from resta_fast.verify import verify

STEPS = ("claim", "write", "finish", "validate", "commit")


@pytest.fixture
def world(tmp_path):
    ft, al, un = three_models(tmp_path / "in")
    adapter = write_adapter(tmp_path / "in" / "adapter")
    outs = tmp_path / "outs"
    outs.mkdir()
    with api.prepare(ft, aligned=al, unaligned=un, options=api.PatchOptions(beta=0.5)) as prepared:
        yield {"prepared": prepared, "outs": outs, "adapter": adapter}


def verified(out: Path) -> bool:
    """Every file the report lists has its sha256 (and a patch's output passes ``verify``)."""
    rep = json.loads((out / report.REPORT_NAME).read_text())
    return local.verify_files(out, rep["files"]) == "" and (rep["command"] != "patch" or verify(out)["ok"])


def engine_output(world, name: str, **kw) -> executor.Output:
    p = world["prepared"]
    return executor.Output(world["outs"] / name, p.writing(), p.provenance, p.input_paths, **kw)


def adapter_output(world, name: str, **kw) -> executor.Output:
    prov = {"tool": "resta_fast", "command": "safelora", "params": {}, "inputs": {}, "sources": {}}
    write = executor.AdapterWrite(world["adapter"])
    return executor.Output(world["outs"] / name, write, prov, [world["adapter"]], command="safelora", **kw)


def break_step(monkeypatch, step: str, victim: Path, outputs: list) -> None:
    """Make ``step`` fail for the output written to ``victim`` only."""
    ours = lambda tmp: Path(tmp).name.startswith(f".{victim.name}.")  # noqa: E731 - its temp dir

    if step == "claim":  # another run holds the output's lock
        lock = OutputLock(victim, command="other")
        lock.__enter__()
        monkeypatch.setattr(break_step, "lock", lock, raising=False)
    elif step == "write":
        real_jobs, real_adapter = executor.run_jobs, executor.write_adapter

        def run_jobs(jobs, **kw):
            real_jobs(jobs, **kw)
            for job in jobs:  # the engine wrote the files, then a job failed (its input changed)
                if ours(job.out_dir):
                    job.error = RestaError("an input changed during the run")

        def write_adapter(tmp, *a, **kw):
            files = real_adapter(tmp, *a, **kw)
            if ours(tmp):
                raise RestaError("an input changed during the run")
            return files

        monkeypatch.setattr(executor, "run_jobs", run_jobs)
        monkeypatch.setattr(executor, "write_adapter", write_adapter)
    elif step == "finish":  # a full disk while the card and the report are written
        real_card = report.write_report

        def write_report(tmp, rep, **kw):
            real_card(tmp, rep, **kw)
            if ours(tmp):
                raise OSError(errno.ENOSPC, "No space left on device", str(Path(tmp) / report.REPORT_NAME))

        monkeypatch.setattr(report, "write_report", write_report)
    elif step == "validate":

        def gate(model_dir):
            if ours(model_dir):
                raise RuntimeError("the judge is down")
            return {"passed": True, "reason": "ok"}

        for o in outputs:
            o.validate = gate
    elif step == "commit":
        real_commit = AtomicOutputDir._commit

        def commit(self):
            if ours(self.tmp):
                raise OSError(errno.EIO, "Input/output error", str(self.tmp))
            real_commit(self)

        monkeypatch.setattr(AtomicOutputDir, "_commit", commit)


def release_lock():
    lock = getattr(break_step, "lock", None)
    if lock is not None:
        lock.__exit__(None, None, None)
        break_step.lock = None


@pytest.mark.parametrize("kind", ["engine", "adapter"])
@pytest.mark.parametrize("step", STEPS)
def test_a_failure_in_any_step_leaves_nothing_of_that_output_and_the_others_are_written(world, monkeypatch, step, kind):
    make = engine_output if kind == "engine" else adapter_output
    outputs = [make(world, "a"), make(world, "b")]
    victim = outputs[0].out
    break_step(monkeypatch, step, victim, outputs)
    done = []
    try:
        written = executor.run(outputs, fsync=False, on_done=done.append)
    finally:
        release_lock()
    assert [w.ok for w in written] == [False, True], [w.error for w in written]
    assert done == written  # each reported as soon as it was done
    if step == "claim":
        assert isinstance(written[0].error, OutputBusy)
    assert not victim.exists()
    assert sorted(p.name for p in world["outs"].iterdir()) == ["b"]  # no temp dir, no lock file
    assert verified(outputs[1].out)
    if kind == "adapter":
        got = load_file(str(outputs[1].out / "adapter_model.safetensors"))
        want = load_file(str(world["adapter"] / "adapter_model.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("step", STEPS)
def test_write_one_raises_a_clean_error_and_leaves_nothing(world, monkeypatch, step):
    output = engine_output(world, "a")
    break_step(monkeypatch, step, output.out, [output])
    try:
        with pytest.raises((RestaError, RuntimeError)) as caught:
            executor.write_one(output, fsync=False)
    finally:
        release_lock()
    if step in ("finish", "commit"):  # an OSError becomes one line naming the file
        assert isinstance(caught.value, RestaError) and "write failed" in str(caught.value)
    assert list(world["outs"].iterdir()) == []


def test_a_pass_writes_engine_and_adapter_outputs_together(world):
    outputs = [engine_output(world, "model", extra=lambda n: {"pass": n}), adapter_output(world, "adapter")]
    written = executor.run(outputs, fsync=False)
    assert all(w.ok for w in written), [w.error for w in written]
    assert written[0].report["pass"] == 2  # extra as a callable: how many outputs the pass claimed
    assert written[1].report["output"] == "adapter" and "plan" not in written[1].report
    assert all(verified(o.out) for o in outputs)


def test_every_output_kind_stamps_created_through_one_clock(tmp_path, monkeypatch):
    """patch, vector, a batch job, Safe LoRA (adapter and merged), SafeMERGE's adapter, the fine-tune's
    merge and convert (model and adapter) all take ``created`` from ``report._now``."""
    from bin_fixtures import as_bin

    stamp = "2001-02-03T04:05:06+00:00"
    monkeypatch.setattr(report, "_now", lambda: stamp)
    ft, al, un = three_models(tmp_path / "in")
    ad = write_adapter(tmp_path / "in" / "adapter")
    safety = write_adapter(tmp_path / "in" / "safety", seed=11)
    ad_bin = tmp_path / "in" / "adapter_bin"
    ad_bin.mkdir()
    torch.save(load_file(str(ad / "adapter_model.safetensors")), ad_bin / "adapter_model.bin")
    (ad_bin / "adapter_config.json").write_text((ad / "adapter_config.json").read_text())
    o = tmp_path / "outs"
    o.mkdir()
    api.patch(ft, o / "patch", aligned=al, unaligned=un, fsync=False)
    api.make_vector(al, un, o / "vector", fsync=False)
    spec = JobSpec(0, "job", Path(ft), o / "batch", aligned=Path(al), unaligned=Path(un))
    assert [r.status for r in local.run_batch([spec], fsync=False)] == ["done"]
    realign.safelora(ad, o / "sl", aligned=al, unaligned=un, num_layers=1, fsync=False)
    realign.safelora(ad, o / "sl_merged", aligned=al, unaligned=un, num_layers=1, merge=True, fsync=False)
    realign.safemerge(ad, safety, o / "sm", aligned=al, unaligned=un, tau=1.0, fsync=False)
    with realign.Session(ad, aligned=al, unaligned=un) as session:
        session.finetune(o / "finetune", fsync=False)
    convert.convert(as_bin(ft, tmp_path / "in" / "ft_bin"), o / "convert", fsync=False)
    convert.convert(ad_bin, o / "convert_adapter", fsync=False)
    kinds = sorted(p.name for p in o.iterdir())
    assert len(kinds) == 9, kinds
    for name in kinds:
        assert json.loads((o / name / report.REPORT_NAME).read_text())["created"] == stamp, name


def test_an_engine_oserror_is_kept_by_run_and_one_clean_line_from_write_one(world, monkeypatch):
    """A batch retries a plain OSError (``JobResult.transient``), so ``run`` keeps it as it is;
    ``write_one`` (patch, vector, realign, convert) raises it as one line naming the file."""

    def run_jobs(jobs, **kw):
        for job in jobs:
            job.error = OSError(errno.EIO, "Input/output error", str(job.out_dir / "model.safetensors"))

    monkeypatch.setattr(executor, "run_jobs", run_jobs)
    [written] = executor.run([engine_output(world, "a")], fsync=False)
    assert type(written.error) is OSError
    with pytest.raises(RestaError, match=r"model.safetensors: write failed \(Input/output error\)"):
        executor.write_one(engine_output(world, "a"), fsync=False)
    assert list(world["outs"].iterdir()) == []
