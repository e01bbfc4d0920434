"""Faults in the middle of a run: a file-size limit, a full disk, an input truncated or replaced, SIGKILL.
Each is one clean line (exit 2) or, for SIGKILL, an --out that is absent or verifies; the inputs are never
modified, and no temp dir, lock file or old output outlives the next run. Runs that must be resource-limited
or killed are forked from one worker (tests/fault_fixtures.py)."""

import json
import os
import random
import signal
import subprocess
import time

import pytest
from checkpoints import three_models
from fault_fixtures import MID, SMALL, TRIALS, Worker, calibrate, leftovers, one_line_error, patch_argv, snapshot

from resta_fast import api
from resta_fast.cli import main
from resta_fast.verify import verify


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


# --- disk full and file-size limits ----------------------------------------


@pytest.fixture()
def mid_models(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    ft, al, un = three_models(root, shards=2, **MID)
    return ft, al, un


@pytest.mark.parametrize("case", ["preallocate", "side_file"])
def test_file_size_limit_is_a_clean_error(tmp_path, worker, mid_models, case):
    """RLIMIT_FSIZE: EFBIG on preallocating a shard, or later while copying a side file."""
    ft, al, un = mid_models
    if case == "side_file":
        (ft / "tokenizer.json").write_text(json.dumps({"vocab": ["tok"] * 20_000}))  # ~140 kB
    before = snapshot(ft, al, un)
    out = tmp_path / "out"
    log = tmp_path / "log"
    code = worker.run(
        argv=patch_argv(ft, al, un, out), log=str(log), fsize=8192 if case == "preallocate" else 64 * 1024
    )
    line = one_line_error(log)
    assert code == 2
    culprit = "model-00001-of-00002.safetensors" if case == "preallocate" else "tokenizer.json"
    assert line.startswith("resta-fast: error: ") and culprit in line and str(tmp_path) in line
    assert line.endswith(
        "write failed (File too large); the file-size limit was hit (ulimit -f); raise it "
        "or choose another --out. Nothing was kept."
    )
    assert ".resta-tmp-" in line  # it names the temp file it was writing, inside --out's parent
    assert not out.exists() and leftovers(tmp_path) == []
    assert snapshot(ft, al, un) == before


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A 32 kB tmpfs (needs CAP_SYS_ADMIN; skipped without it)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()})")
    try:
        yield mnt
    finally:
        res = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
        if res.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
            raise AssertionError(f"umount {mnt} failed ({res.stderr.strip()}): files left open?")


def test_disk_full_is_a_clean_error(tmp_path, small_tmpfs, mid_models, capsys):
    """ENOSPC from the writer thread's pwrite (the shards are preallocated sparse)."""
    ft, al, un = mid_models
    before = snapshot(ft, al, un)
    out = small_tmpfs / "out"
    code = main(patch_argv(ft, al, un, out))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("resta-fast: error: ") and err.count("\n") == 1
    assert err.endswith(
        "write failed (No space left on device); the disk is full; free space or choose "
        "another --out. Nothing was kept.\n"
    )
    assert os.listdir(small_tmpfs) == []  # temp output, lock file: all gone
    assert snapshot(ft, al, un) == before


# --- inputs changing under a run ---------------------------------------------


@pytest.mark.parametrize("how, target", [("truncate", "aligned"), ("replace", "aligned"), ("truncate", "finetuned")])
def test_input_changed_mid_run_is_a_clean_error(tmp_path, worker, how, target):
    ft, al, un = three_models(tmp_path / "in", shards=2, **SMALL)
    out = tmp_path / "out"
    log, marker = tmp_path / "log", tmp_path / "marker"
    victim = {"aligned": al / "model.safetensors", "finetuned": ft / "model-00002-of-00002.safetensors"}[target]
    pid = worker.start(
        argv=patch_argv(ft, al, un, out, "--no-fsync"), log=str(log), delay=0.3, marker=str(marker), marker_after=2
    )
    deadline = time.time() + 30
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.005)
    assert marker.exists(), log.read_text()
    if how == "truncate":
        os.truncate(victim, victim.stat().st_size // 2)
    else:
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        tmp = victim.with_suffix(".new")
        tmp.write_bytes(bytes(data))
        os.replace(tmp, victim)
    code = worker.wait()
    line = one_line_error(log)
    assert code == 2, (pid, line)
    assert line == (
        f"resta-fast: error: {victim}: file was modified or replaced during the run; the "
        "output would be inconsistent, so nothing was written"
    )
    assert not out.exists() and leftovers(tmp_path) == []


# --- SIGKILL -----------------------------------------------------------------


def test_sigkill_at_random_points_then_rerun(tmp_path, worker, capsys):
    """SIGKILL at 20 seeded random moments: --out is absent or verifies; the next run
    for the same --out succeeds and leaves no temp dir, lock file or old output."""
    ft, al, un = three_models(tmp_path / "in", shards=2, **SMALL)
    before = snapshot(ft, al, un)
    work = tmp_path / "runs"
    work.mkdir()
    out = work / "out"

    def argv_for(o):
        return patch_argv(ft, al, un, o, "--overwrite")

    span = 1.3 * calibrate(worker, tmp_path, argv_for, delay=0.01)
    rng = random.Random(7)
    outcomes = []
    for trial in range(TRIALS):
        had_output = out.exists()
        pid = worker.start(argv=argv_for(out), log=str(tmp_path / f"kill{trial}.log"), delay=0.01)
        time.sleep(rng.uniform(0, span))
        os.kill(pid, signal.SIGKILL)
        code = worker.wait()
        left = leftovers(work)
        if out.exists():
            assert verify(out)["ok"], f"trial {trial}: --out exists but does not verify"
        kind = (
            "finished"
            if code == 0
            else "killed, temp dir left"
            if any(".resta-tmp-" in n for n in left)
            else "killed, nothing written yet"
        )
        outcomes.append(kind)
        if trial % 2 or not had_output:  # every other trial, start clean; else rerun over the old output
            api.patch(ft, out, aligned=al, unaligned=un, backend="torch", fsync=False, overwrite=True)
            assert verify(out)["ok"]
            assert leftovers(work) == [], f"trial {trial}: the rerun left {leftovers(work)}"
    api.patch(ft, out, aligned=al, unaligned=un, backend="torch", fsync=False, overwrite=True)
    assert verify(out)["ok"] and leftovers(work) == []
    assert snapshot(ft, al, un) == before
    summary = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    with capsys.disabled():
        print(f"\nSIGKILL trials: {TRIALS}: {summary}")
    assert summary.get("killed, temp dir left", 0) >= TRIALS // 4, summary
