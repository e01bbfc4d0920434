"""One writer per output (resta_fast/io/lock.py), unit by unit: who holds the lock and
what a second run is told, taking over a dead run's lock file, releasing only our own
file, and which temp names are a dead run's to clean. Then end to end: a second `patch`
while one runs (forked from the worker in fault_fixtures.py), a dead run's lock and temp
dirs, no flock, a planted symlink."""

import errno
import fcntl
import json
import os
import socket
import subprocess
import time

import pytest
from checkpoints import three_models
from fault_fixtures import SMALL, Worker, leftovers, patch_argv

from resta_fast import api
from resta_fast.cli import main
from resta_fast.errors import RestaError
from resta_fast.io import lock as lock_mod
from resta_fast.io.lock import OutputBusy, OutputLock, clean_stale_temps, lock_path, parse_temp_name, pid_alive
from resta_fast.verify import verify

HOST = socket.gethostname()


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_second_lock_is_busy_names_the_holder_and_is_free_after_release(tmp_path):
    out = tmp_path / "restored"
    first = OutputLock(out, command="batch").acquire()
    assert lock_path(out) == tmp_path / ".restored.resta-lock" and lock_path(out).is_file()
    with pytest.raises(OutputBusy) as info:
        OutputLock(out).acquire()  # a second open file: flock excludes it even in this process
    msg = str(info.value)
    assert msg.startswith(
        f"--out {out} is being written by another resta-fast run (pid {os.getpid()} on host {HOST}, started "
    ), msg
    assert msg.endswith(f"lock file {lock_path(out)}); wait for it to finish or choose another --out"), msg
    first.release()
    assert not lock_path(out).exists()
    with OutputLock(out) as again:
        assert again.took_over is None


def test_a_holder_that_has_not_written_its_details_is_still_a_holder(tmp_path):
    out = tmp_path / "restored"
    fd = os.open(lock_path(out), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(OutputBusy, match=r"another resta-fast run \(a run that has not written its details yet;"):
            OutputLock(out).acquire()
    finally:
        os.close(fd)


def test_the_lock_file_of_a_run_that_ended_is_taken_over_and_rewritten(tmp_path):
    out = tmp_path / "restored"
    stale = {"pid": dead_pid(), "host": HOST, "command": "patch", "started": "then"}
    lock_path(out).write_text(json.dumps(stale))  # no flock on it: its run is gone
    with OutputLock(out, command="batch") as lk:
        assert lk.took_over == stale
        mine = json.loads(lock_path(out).read_text())
        assert (mine["pid"], mine["host"], mine["command"], mine["out"]) == (os.getpid(), HOST, "batch", str(out))
    assert not lock_path(out).exists()


def test_release_leaves_a_lock_file_that_is_not_ours(tmp_path):
    """Someone deleted our lock file by hand and another run made a new one: that one stays."""
    out = tmp_path / "restored"
    lk = OutputLock(out).acquire()
    os.unlink(lock_path(out))
    lock_path(out).write_text("another run's lock\n")
    lk.release()
    assert lock_path(out).read_text() == "another run's lock\n"
    lk.release()  # a second release is a no-op


@pytest.mark.parametrize(
    "entry, parsed",
    [
        (".restored.resta-tmp-node-07.example-1234-ab12cd34", ("node-07.example", 1234)),  # '-' in the host
        (".restored.resta-tmp-host-12x-ab12cd34", None),  # the pid is not a number
        (".restored.resta-tmp-host-ab12cd34", None),  # no pid at all
        (".other.resta-tmp-host-1234-ab12cd34", None),  # another output's temp dir
        ("restored.resta-tmp-host-1234-ab12cd34", None),  # not hidden: not ours
        (".restored.old-ab12cd34", None),  # an interrupted overwrite, not a temp dir
    ],
)
def test_parse_temp_name(tmp_path, entry, parsed):
    assert parse_temp_name(tmp_path / "restored", entry) == parsed


def test_pid_alive():
    assert pid_alive(os.getpid())
    assert not pid_alive(dead_pid())
    assert not pid_alive(0) and not pid_alive(-1)  # os.kill(0 or -1, 0) would signal a whole group


def test_clean_stale_temps_removes_dead_runs_directories_only_never_through_a_link(tmp_path):
    out, dead = tmp_path / "restored", dead_pid()
    removed = tmp_path / f".restored.resta-tmp-{HOST}-{dead}-deadbeef"
    removed.mkdir()
    (removed / "model.safetensors").write_bytes(b"partial")
    a_file = tmp_path / f".restored.resta-tmp-{HOST}-{dead}-0000f11e"
    a_file.write_bytes(b"not a directory")
    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    link = tmp_path / f".restored.resta-tmp-{HOST}-{dead}-11111111"
    link.symlink_to(target, target_is_directory=True)
    assert clean_stale_temps(out) == [removed]
    assert not removed.exists() and a_file.is_file() and link.is_symlink()
    assert (target / "keep.txt").read_text() == "keep"
    assert clean_stale_temps(tmp_path / "missing" / "restored") == []  # no parent: nothing to clean


# --- end to end: concurrent runs and locks ----------------------------------------


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    """(finetuned, aligned, unaligned) of the SMALL shape, shared read-only by a module's tests."""
    root = tmp_path_factory.mktemp("small")
    return three_models(root, **SMALL)


def test_second_run_on_same_output_fails_fast(tmp_path, worker, small_models, capsys):
    ft, al, un = small_models
    out, log, marker = tmp_path / "out", tmp_path / "log", tmp_path / "marker"
    pid = worker.start(argv=patch_argv(ft, al, un, out, "--no-fsync"), log=str(log), delay=0.2, marker=str(marker))
    deadline = time.time() + 30
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.005)
    with pytest.raises(OutputBusy) as info:
        api.patch(ft, out, aligned=al, unaligned=un, backend="torch", fsync=False)
    # Fast means without waiting for the lock: the first run (slowed per tensor) has not committed yet.
    assert not out.exists(), "the second run waited for the first to finish"
    assert f"pid {pid} on host {HOST}" in str(info.value)
    assert str(info.value).startswith(f"--out {out} is being written by another resta-fast run (")
    assert str(info.value).endswith("); wait for it to finish or choose another --out")
    code = main(patch_argv(ft, al, un, out, "--no-fsync"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"pid {pid}" in err
    assert worker.wait() == 0  # the first run was not disturbed
    assert verify(out)["ok"] and leftovers(tmp_path) == []


def test_stale_lock_of_dead_process_is_taken_over(tmp_path, small_models):
    ft, al, un = small_models
    out = tmp_path / "out"
    dead = dead_pid()
    (tmp_path / ".out.resta-lock").write_text(json.dumps({"pid": dead, "host": HOST, "started": "then"}))
    api.patch(ft, out, aligned=al, unaligned=un, backend="torch", fsync=False)
    assert verify(out)["ok"] and leftovers(tmp_path) == []


@pytest.mark.parametrize("holder, busy", [("live_same_host", True), ("dead_same_host", False), ("other_host", True)])
def test_lock_without_flock_falls_back_to_pid(tmp_path, monkeypatch, holder, busy):
    """On filesystems without flock the recorded pid/host decides."""

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_mod.fcntl, "flock", no_flock)
    out = tmp_path / "out"
    pid = {"live_same_host": os.getppid(), "dead_same_host": dead_pid(), "other_host": 1}[holder]
    host = "elsewhere.example" if holder == "other_host" else HOST
    (tmp_path / ".out.resta-lock").write_text(json.dumps({"pid": pid, "host": host, "started": "t"}))
    lk = OutputLock(out)
    if busy:
        with pytest.raises(OutputBusy, match=f"locked by pid {pid} on host {host}"):
            lk.acquire()
    else:
        with lk:
            assert lk.took_over["pid"] == pid
        assert not (tmp_path / ".out.resta-lock").exists()


def test_planted_lock_symlink_is_not_followed(tmp_path, small_models):
    ft, al, un = small_models
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / ".out.resta-lock")
    with pytest.raises(RestaError, match="cannot create lock file"):
        api.patch(ft, tmp_path / "out", aligned=al, unaligned=un, backend="torch", fsync=False)
    assert victim.read_text() == "precious" and not (tmp_path / "out").exists()


def test_stale_temp_dirs_of_dead_runs_are_removed(tmp_path, small_models):
    ft, al, un = small_models
    dead = dead_pid()
    names = {
        f".out.resta-tmp-{HOST}-{dead}-deadbeef": False,  # dead run on this host: removed
        ".out.old-1234abcd": False,  # interrupted overwrite: removed
        f".out.resta-tmp-{HOST}-{os.getpid()}-live0000": True,  # live pid: kept
        f".out.resta-tmp-other-host-{dead}-cafe1234": True,  # another host's: kept
        f".other.resta-tmp-{HOST}-{dead}-00000000": True,  # another output's: kept
        ".out.resta-tmp-garbage": True,  # not ours to judge: kept
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"partial")
    api.patch(ft, tmp_path / "out", aligned=al, unaligned=un, backend="torch", fsync=False)
    for name, kept in names.items():
        assert (tmp_path / name).exists() == kept, name
    assert parse_temp_name(tmp_path / "out", f".out.resta-tmp-my-host-1-{dead}-ab") == ("my-host-1", dead)
    assert clean_stale_temps(tmp_path / "out") == []
