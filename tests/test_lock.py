"""One writer per output (resta_fast/io/lock.py), unit by unit: who holds the lock and
what a second run is told, taking over a dead run's lock file, releasing only our own
file, and which temp names are a dead run's to clean. The end-to-end cases (a second
`patch` while one runs, no flock, a planted symlink) are in test_hardening.py."""

import fcntl
import json
import os
import socket
import subprocess

import pytest

from resta_fast.io.lock import OutputBusy, OutputLock, clean_stale_temps, lock_path, parse_temp_name, pid_alive

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
