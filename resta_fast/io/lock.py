"""One writer per output: a lock file beside it, and cleanup of dead runs' leftovers.

``OutputLock(out)`` holds ``.NAME.resta-lock`` in ``out``'s parent with an
exclusive ``flock``. The kernel drops a flock when its holder exits however it
exits (SIGKILL included), so a lock file left by a dead run is simply taken
over; the pid/host/start time written into the file are only there so that a
second run can say *who* holds the lock. On filesystems without flock (some
NFSv3 mounts, some FUSE) the lock degrades to the recorded pid: a holder on this
host that is no longer alive is stale and taken over; a holder on another host
is trusted until the file is removed by hand.

``clean_stale_temps(out)`` removes the temporary siblings of ``out`` left by
killed runs (``.NAME.resta-tmp-HOST-PID-*`` of dead pids on this host, and
``.NAME.old-*`` from an overwrite interrupted between its two renames). Call it
only while holding the lock.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path

from resta_fast.errors import RestaError
from resta_fast.io.writer import TMP_MARKER

LOCK_SUFFIX = ".resta-lock"
OLD_MARKER = ".old-"


class OutputBusy(RestaError):
    """Another run holds the output's lock."""


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}{LOCK_SUFFIX}"


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` names a live process on this host (EPERM: alive, not ours)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "a run that has not written its details yet"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"


class OutputLock:
    """Exclusive right to write ``out``; a context manager.

    Example:
        >>> with OutputLock(Path("restored")):  # doctest: +SKIP
        ...     clean_stale_temps(Path("restored"))
        ...     ...  # write .restored.resta-tmp-*, rename to restored
    """

    def __init__(self, out: Path, command: str = "patch"):
        self.out = Path(out)
        self.path = lock_path(self.out)
        self.command = command
        self.fd = -1
        self.took_over: dict | None = None  # details of a stale holder we replaced

    def acquire(self) -> OutputLock:
        # Retry: a holder may unlink the file between our open and our flock,
        # in which case we locked an orphaned inode and must start again.
        for _ in range(20):
            try:
                # O_NOFOLLOW: a planted symlink must not make us truncate its target.
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise RestaError(
                    f"cannot create lock file {self.path} ({exc.strerror}); check that "
                    f"{self.out.parent} is writable and {self.path.name} is a plain "
                    "file"
                ) from None
            try:
                self._lock_fd(fd)
                if not self._still_linked(fd):
                    os.close(fd)
                    continue
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            self._write_details()
            return self
        raise RestaError(f"could not lock {self.path}: it keeps being replaced by another process")

    def _lock_fd(self, fd: int) -> None:
        previous = _read_holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusy(
                f"--out {self.out} is being written by another resta-fast run ({_describe(previous)}; "
                f"lock file {self.path}); wait for it to finish or choose another --out"
            ) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise RestaError(f"cannot lock {self.path} ({exc.strerror})") from None
            self._pid_fallback(previous)
            return
        if previous and previous.get("pid") != os.getpid():
            self.took_over = previous  # its flock is gone: that run ended without cleaning up

    def _pid_fallback(self, holder: dict) -> None:
        """No flock on this filesystem: judge the recorded holder by its pid."""
        if not holder:
            return
        same_host = holder.get("host") == socket.gethostname()
        pid = holder.get("pid")
        if same_host and isinstance(pid, int) and not pid_alive(pid):
            self.took_over = holder
            return
        where = "" if same_host else " (on another host, so resta-fast cannot check it is alive)"
        raise OutputBusy(
            f"--out {self.out} is locked by {_describe(holder)}{where}; this filesystem has no flock; "
            f"wait for that run, or delete {self.path} if you are sure no run is active"
        )

    def _still_linked(self, fd: int) -> bool:
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _write_details(self) -> None:
        details = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "out": str(self.out),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        data = (json.dumps(details) + "\n").encode()
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, data, 0)
        except OSError:
            pass  # the flock is what excludes; the details are only for messages

    def release(self) -> None:
        """Remove the lock file (while still holding it) and drop the lock."""
        if self.fd < 0:
            return
        try:
            if self._still_linked(self.fd):
                os.unlink(self.path)
        except OSError:
            pass  # a leftover lock file is harmless: the next run takes it over
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def parse_temp_name(out: Path, entry: str) -> tuple[str, int] | None:
    """(host, pid) from ``.NAME.resta-tmp-HOST-PID-TAG``, or None if not one of ``out``'s."""
    prefix = f".{out.name}{TMP_MARKER}"
    if not entry.startswith(prefix):
        return None
    parts = entry[len(prefix) :].rsplit("-", 2)  # host names may contain '-'
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def clean_stale_temps(out: Path) -> list[Path]:
    """Remove leftovers of dead runs targeting ``out``; return what was removed.

    Only temp dirs whose recorded host is this host and whose pid is dead are
    removed: a live run elsewhere on a shared filesystem keeps its files.
    Call while holding ``OutputLock(out)``.
    """
    out = Path(out)
    host = socket.gethostname()
    removed = []
    try:
        entries = os.listdir(out.parent)
    except OSError:
        return removed
    for entry in entries:
        path = out.parent / entry
        parsed = parse_temp_name(out, entry)
        stale = (parsed is not None and parsed[0] == host and not pid_alive(parsed[1])) or entry.startswith(
            f".{out.name}{OLD_MARKER}"
        )
        if stale and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
    return removed
