"""Preallocated, in-place, atomic output.

Each output file gets its header computed up front and its full size
preallocated; tensors are then written at their final offsets as they are
produced. Everything goes into a temporary sibling directory that is fsynced
and renamed into place only when complete, so an interrupted run never leaves a
directory that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import uuid
from pathlib import Path

from resta_fast.errors import RestaError
from resta_fast.io.reader import DTYPES

TMP_MARKER = ".resta-tmp-"


def safetensors_header(tensors, metadata: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """Header bytes and each tensor's [start, end) data offsets.

    Args:
        tensors: iterable of (name, dtype name, shape) in the order to store them.
        metadata: str -> str safetensors metadata.
    Returns:
        (header including the 8-byte length prefix, {name: (begin, end)} relative
        to the data section).
    """
    entries: dict = {"__metadata__": dict(metadata)}
    offsets = {}
    cursor = 0
    for name, dtype, shape in tensors:
        n = 1
        for d in shape:
            n *= d
        size = n * DTYPES[dtype][1]
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + size]}
        offsets[name] = (cursor, cursor + size)
        cursor += size
    body = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)  # safetensors pads the header to 8 bytes
    return len(body).to_bytes(8, "little") + body, offsets


class TensorFileWriter:
    """One preallocated safetensors file written in place with pwrite."""

    def __init__(self, path: Path, tensors, metadata: dict[str, str]):
        self.path = path
        self.header, rel = safetensors_header(tensors, metadata)
        base = len(self.header)
        self.offsets = {name: (base + a, base + b) for name, (a, b) in rel.items()}
        self.size = base + (max((b for _, b in rel.values()), default=0))
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.ftruncate(self.fd, self.size)
            write_all(self.fd, memoryview(self.header), 0, path)  # raises RestaError itself
        except OSError as exc:
            os.close(self.fd)
            raise _write_error(path, exc) from None
        except BaseException:
            os.close(self.fd)
            raise

    def close(self, fsync: bool) -> None:
        if self.fd < 0:
            return
        try:
            if fsync:
                os.fsync(self.fd)
        except OSError as exc:
            raise _write_error(self.path, exc) from None
        finally:
            os.close(self.fd)
            self.fd = -1


def write_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    """pwrite ``data`` fully at ``offset`` (pwrite may write less than asked)."""
    data = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    while len(data):
        try:
            n = os.pwrite(fd, data, offset)
        except OSError as exc:
            raise _write_error(path, exc) from None
        data = data[n:]
        offset += n


def _write_error(path: Path, exc: OSError) -> RestaError:
    hint = {
        28: "the disk is full; free space or choose another --out",
        27: "the file-size limit was hit (ulimit -f); raise it or choose another --out",
        122: "the disk quota is exhausted; free space or choose another --out",
        # pwrite from an mmap'd input whose file shrank underneath us.
        14: "an input file was probably truncated during the run; rerun once inputs are stable",
    }
    return RestaError(
        f"{path}: write failed ({exc.strerror}); {hint.get(exc.errno, 'check the output location')}. Nothing was kept."
    )


def check_output_location(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an existing output (unless overwrite) and an output inside an input."""
    out_real = Path(os.path.realpath(out))
    for inp in inputs:
        in_real = Path(os.path.realpath(inp))
        if out_real == in_real or (in_real.is_dir() and out_real.is_relative_to(in_real)):
            raise RestaError(
                f"--out {out} is inside input {inp}; write the output elsewhere (inputs are never modified)"
            )
        if in_real.is_relative_to(out_real):
            raise RestaError(f"--out {out} contains input {inp}; choose a fresh output directory")
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise RestaError(f"--out {out} already exists; pass --overwrite to replace it, or choose another path")
        if not out.is_dir() or out.is_symlink():
            raise RestaError(f"--out {out} exists and is not a directory; refusing to replace it")
    if not out.parent.exists():
        raise RestaError(f"--out {out}: parent directory {out.parent} does not exist; create it first")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise RestaError(f"--out {out}: parent directory {out.parent} is not writable")


class AtomicOutputDir:
    """A temporary sibling directory renamed to ``out`` only on commit.

    Example:
        >>> with AtomicOutputDir(Path("out"), overwrite=False, fsync=True) as d:  # doctest: +SKIP
        ...     (d.tmp / "model.safetensors").write_bytes(data)
        ...     d.commit()
    """

    def __init__(self, out: Path, *, overwrite: bool, fsync: bool):
        self.out = out
        self.overwrite = overwrite
        self.fsync = fsync
        tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp = out.parent / f".{out.name}{TMP_MARKER}{tag}"
        self.committed = False

    def __enter__(self) -> AtomicOutputDir:
        try:
            self.tmp.mkdir()
        except OSError as exc:
            raise RestaError(f"cannot create {self.tmp} ({exc.strerror}); check --out's parent") from None
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self) -> None:
        """fsync the files and directory, then rename into place."""
        try:
            self._commit()
        except OSError as exc:
            raise _write_error(Path(exc.filename or self.tmp), exc) from None

    def _commit(self) -> None:
        if self.fsync:
            for child in self.tmp.iterdir():
                if child.is_file():
                    fd = os.open(child, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            _fsync_dir(self.tmp)
        trash = None
        if self.out.exists():
            if not self.overwrite:
                raise RestaError(
                    f"--out {self.out} appeared while we were writing; not replacing it (pass --overwrite to replace)"
                )
            trash = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.out, trash)
        try:
            os.rename(self.tmp, self.out)
        except OSError:
            if trash is not None:
                os.rename(trash, self.out)  # put the previous output back
            raise
        self.committed = True
        if self.fsync:
            _fsync_dir(self.out.parent)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
