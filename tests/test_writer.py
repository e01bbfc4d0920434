"""Preallocated, in-place, atomic output (resta_fast/io/writer.py): the safetensors header we compute, files
written at their final offsets (read back by the official loader), every write error as one line with what to
do, where --out may go, and the temp directory renamed into place only on commit."""

import errno
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from resta_fast.errors import RestaError
from resta_fast.io import writer
from resta_fast.io.reader import SafetensorsFile
from resta_fast.io.writer import (
    TMP_MARKER,
    AtomicOutputDir,
    TensorFileWriter,
    check_output_location,
    safetensors_header,
    write_all,
)

TENSORS = [("a", "F32", (2, 3)), ("b", "BF16", (5,)), ("empty", "F16", (0, 4)), ("scalar", "I64", ())]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# --- the header -------------------------------------------------------------------------------------


def test_header_is_padded_to_8_bytes_and_offsets_are_packed_in_order():
    header, offsets = safetensors_header(TENSORS, {"format": "pt"})
    length = int.from_bytes(header[:8], "little")
    assert length == len(header) - 8 and length % 8 == 0
    assert offsets == {"a": (0, 24), "b": (24, 34), "empty": (34, 34), "scalar": (34, 42)}
    parsed = json.loads(header[8:].decode("utf-8").rstrip(" "))
    assert list(parsed) == ["__metadata__", "a", "b", "empty", "scalar"]  # our order, metadata first
    assert parsed["__metadata__"] == {"format": "pt"}
    assert parsed["b"] == {"dtype": "BF16", "shape": [5], "data_offsets": [24, 34]}
    assert parsed["scalar"] == {"dtype": "I64", "shape": [], "data_offsets": [34, 42]}


def test_header_of_no_tensors_is_only_the_metadata():
    header, offsets = safetensors_header([], {})
    assert offsets == {} and len(header) % 8 == 0
    assert json.loads(header[8:]) == {"__metadata__": {}}


# --- a file written in place -----------------------------------------------------------------------


def test_a_file_written_in_place_reads_back_with_the_official_loader(tmp_path):
    values = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([1.5, -2.0, 3.25, 0.0, -0.0], dtype=torch.bfloat16),
        "empty": torch.zeros((0, 4), dtype=torch.float16),
        "scalar": torch.tensor(-7, dtype=torch.int64),
    }
    path = tmp_path / "model.safetensors"
    out = TensorFileWriter(path, TENSORS, {"format": "pt", "note": "é"})
    assert os.path.getsize(path) == out.size  # preallocated before any tensor is written
    for name in reversed(list(values)):  # any order: each lands at its own offset
        data = values[name].contiguous().view(-1).view(torch.uint8).numpy()
        write_all(out.fd, memoryview(data), out.offsets[name][0], path)
    out.close(fsync=True)
    assert out.fd == -1
    out.close(fsync=True)  # a second close is a no-op
    got = load_file(str(path))
    assert list(got) == list(values)
    for name, want in values.items():
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt", "note": "é"}
    ours = SafetensorsFile(path)  # and our own validating reader accepts it, nothing trailing
    assert [(i.name, i.dtype, tuple(i.shape)) for i in ours.tensors.values()] == TENSORS
    ours.close()


def test_an_existing_file_is_never_opened_for_writing(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        TensorFileWriter(path, TENSORS, {})
    assert path.read_bytes() == b"someone else's"


def test_write_all_finishes_short_pwrites_and_casts_any_buffer_to_bytes(tmp_path, monkeypatch):
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    real = os.pwrite

    def at_most_3_bytes(fd, data, offset):
        return real(fd, bytes(data)[:3], offset)

    monkeypatch.setattr(writer.os, "pwrite", at_most_3_bytes)
    arr = np.arange(10, dtype=np.float32).reshape(2, 5)  # 2-D, 4-byte items
    try:
        write_all(fd, memoryview(arr), 4, path)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\0" * 4 + arr.tobytes()


# --- write errors: one line, what happened, what to do ----------------------------------------------


@pytest.mark.parametrize(
    "code, strerror, hint",
    [
        (errno.ENOSPC, "No space left on device", "the disk is full; free space or choose another --out"),
        (errno.EFBIG, "File too large", "the file-size limit was hit (ulimit -f); raise it or choose another --out"),
        (errno.EDQUOT, "Disk quota exceeded", "the disk quota is exhausted; free space or choose another --out"),
        (
            errno.EFAULT,
            "Bad address",
            "an input file was probably truncated during the run; rerun once inputs are stable",
        ),
        (errno.EIO, "Input/output error", "check the output location"),
    ],
)
def test_a_failed_pwrite_is_one_line_naming_the_file_and_what_to_do(tmp_path, monkeypatch, code, strerror, hint):
    def failing(fd, data, offset):
        raise OSError(code, strerror)

    monkeypatch.setattr(writer.os, "pwrite", failing)
    path = tmp_path / "model.safetensors"
    with pytest.raises(RestaError) as info:
        write_all(-1, memoryview(b"data"), 0, path)
    assert str(info.value) == f"{path}: write failed ({strerror}); {hint}. Nothing was kept."


def test_a_failed_preallocation_closes_the_file_and_says_why(tmp_path, monkeypatch):
    def too_large(fd, size):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(writer.os, "ftruncate", too_large)
    path = tmp_path / "model.safetensors"
    before = open_fds()
    with pytest.raises(RestaError, match=r"model.safetensors: write failed \(File too large\); the file-size limit"):
        TensorFileWriter(path, TENSORS, {})
    assert open_fds() == before


def test_a_failed_fsync_on_close_is_a_clean_error_and_closes_the_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    before = open_fds()
    out = TensorFileWriter(path, TENSORS, {})

    def failing(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(writer.os, "fsync", failing)
    with pytest.raises(RestaError, match=r"write failed \(Input/output error\); check the output location"):
        out.close(fsync=True)
    assert out.fd == -1 and open_fds() == before


# --- where --out may go --------------------------------------------------------------------------------


def test_a_fresh_output_beside_its_inputs_is_accepted(tmp_path):
    (tmp_path / "model").mkdir()
    check_output_location(tmp_path / "out", [tmp_path / "model"], overwrite=False)
    (tmp_path / "out").mkdir()
    check_output_location(tmp_path / "out", [tmp_path / "model"], overwrite=True)


def test_an_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RestaError) as info:
        check_output_location(out, [], overwrite=False)
    assert str(info.value) == f"--out {out} already exists; pass --overwrite to replace it, or choose another path"


@pytest.mark.parametrize("kind", ["file", "link"])
def test_overwrite_never_replaces_a_file_or_a_link(tmp_path, kind):
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("not a model")
    else:
        (tmp_path / "real").mkdir()
        out.symlink_to(tmp_path / "real", target_is_directory=True)
    with pytest.raises(RestaError) as info:
        check_output_location(out, [], overwrite=True)
    assert str(info.value) == f"--out {out} exists and is not a directory; refusing to replace it"


@pytest.mark.parametrize("where", ["same", "inside", "through_a_link"])
def test_an_output_inside_an_input_is_refused(tmp_path, where):
    model = tmp_path / "model"
    model.mkdir()
    out = {"same": model, "inside": model / "restored", "through_a_link": tmp_path / "link" / "restored"}[where]
    (tmp_path / "link").symlink_to(model, target_is_directory=True)
    with pytest.raises(RestaError) as info:
        check_output_location(out, [model], overwrite=True)
    assert str(info.value) == (
        f"--out {out} is inside input {model}; write the output elsewhere (inputs are never modified)"
    )


def test_an_output_that_is_an_input_file_is_refused(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(RestaError, match="is inside input"):
        check_output_location(weights, [weights], overwrite=True)
    check_output_location(tmp_path / "out", [weights], overwrite=False)  # a sibling of a file input is fine


def test_an_output_containing_an_input_is_refused(tmp_path):
    model = tmp_path / "runs" / "model"
    model.mkdir(parents=True)
    out = tmp_path / "runs"
    with pytest.raises(RestaError) as info:
        check_output_location(out, [model], overwrite=True)
    assert str(info.value) == f"--out {out} contains input {model}; choose a fresh output directory"


def test_an_output_whose_parent_is_missing_or_not_writable_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "missing" / "out"
    with pytest.raises(RestaError) as info:
        check_output_location(out, [], overwrite=False)
    assert str(info.value) == f"--out {out}: parent directory {out.parent} does not exist; create it first"
    monkeypatch.setattr(writer.os, "access", lambda path, mode: False)  # root may write anywhere: ask os.access
    with pytest.raises(RestaError) as info:
        check_output_location(tmp_path / "out", [], overwrite=False)
    assert str(info.value) == f"--out {tmp_path / 'out'}: parent directory {tmp_path} is not writable"


# --- the atomic output directory ------------------------------------------------------------------


def test_commit_renames_the_hidden_temp_directory_into_place(tmp_path):
    out = tmp_path / "out"
    with AtomicOutputDir(out, overwrite=False, fsync=True) as d:
        assert d.tmp.parent == tmp_path and d.tmp.name.startswith(f".out{TMP_MARKER}") and d.tmp.is_dir()
        assert f"-{os.getpid()}-" in d.tmp.name  # lock.clean_stale_temps tells a dead run's by its pid
        (d.tmp / "model.safetensors").write_bytes(b"weights")
        assert not out.exists()
        d.commit()
        assert d.committed
    assert (out / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leaving_without_commit_or_with_an_error_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with AtomicOutputDir(out, overwrite=False, fsync=False) as d:
        (d.tmp / "model.safetensors").write_bytes(b"half")
    with pytest.raises(ValueError), AtomicOutputDir(out, overwrite=False, fsync=False) as d:
        (d.tmp / "model.safetensors").write_bytes(b"half")
        raise ValueError("the kernel failed")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_previous_output_and_leaves_no_old_copy(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("previous run")
    with AtomicOutputDir(out, overwrite=True, fsync=True) as d:
        (d.tmp / "model.safetensors").write_bytes(b"new")
        d.commit()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_output_that_appears_during_the_run_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with AtomicOutputDir(out, overwrite=False, fsync=False) as d:
        (d.tmp / "model.safetensors").write_bytes(b"ours")
        out.mkdir()
        (out / "theirs.txt").write_text("another run's")
        with pytest.raises(RestaError) as info:
            d.commit()
    assert str(info.value) == (
        f"--out {out} appeared while we were writing; not replacing it (pass --overwrite to replace)"
    )
    assert (out / "theirs.txt").read_text() == "another run's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_rename_puts_the_previous_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous")
    real = os.rename

    def rename(src, dst):
        if TMP_MARKER in os.path.basename(src):
            raise OSError(errno.EIO, "Input/output error")  # the new output cannot be moved in
        return real(src, dst)

    monkeypatch.setattr(writer.os, "rename", rename)
    with AtomicOutputDir(out, overwrite=True, fsync=False) as d:
        (d.tmp / "model.safetensors").write_bytes(b"new")
        with pytest.raises(RestaError) as info:
            d.commit()
        assert str(info.value) == (
            f"{d.tmp}: write failed (Input/output error); check the output location. Nothing was kept."
        )
    assert (out / "model.safetensors").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_temp_directory_that_cannot_be_made_is_one_line(tmp_path):
    out = tmp_path / "missing" / "out"
    d = AtomicOutputDir(out, overwrite=False, fsync=False)
    with pytest.raises(RestaError) as info:
        d.__enter__()
    assert str(info.value) == f"cannot create {d.tmp} (No such file or directory); check --out's parent"
