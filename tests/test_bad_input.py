"""Bad input: one clear error line naming file/tensor and the fix, exit 2, nothing left behind."""

import json
import os
import struct

import pytest
from checkpoints import three_models
from fault_fixtures import patch_argv

from resta_fast.cli import main


def raw_file(path, header: dict | bytes, data: bytes = b"", header_len: int | None = None):
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


def good_header(**override):
    entry = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    entry.update(override)
    return {"w": entry}


@pytest.fixture()
def models(tmp_path):
    return three_models(tmp_path, vocab=16, hidden=8, layers=1, inter=12)


def run_cli(capsys, tmp_path, ft, al, un, *extra):
    out = tmp_path / "out"
    code = main(patch_argv(ft, al, un, out, "--no-fsync", *extra))
    err = capsys.readouterr().err
    return code, err, out


CORRUPT = {
    "truncated": (lambda p: raw_file(p, good_header(), b"\0" * 10), r"past the end of the file.*truncated"),
    "header_longer_than_file": (
        lambda p: raw_file(p, good_header(), b"", header_len=10**6),
        r"header length 1000000 is larger than the file",
    ),
    "header_not_json": (lambda p: raw_file(p, b"{not json!", b""), r"header is not valid JSON"),
    "unknown_dtype": (lambda p: raw_file(p, good_header(dtype="F13"), b"\0" * 16), r"unknown dtype 'F13'"),
    "offsets_past_end": (lambda p: raw_file(p, good_header(data_offsets=[16, 32]), b"\0" * 16), r"run past the end"),
    "size_not_shape_times_itemsize": (
        lambda p: raw_file(p, good_header(shape=[3, 2]), b"\0" * 16),
        r"byte size 16 != shape \[3, 2\] x F32 \(24 bytes\)",
    ),
    "overlapping": (
        lambda p: raw_file(
            p,
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
        ),
        r"overlaps",
    ),
    "tiny_file": (lambda p: p.write_bytes(b"abc"), r"too short for a safetensors header"),
    "header_cap": (lambda p: raw_file(p, good_header(), b"", header_len=2**40), r"exceeds the .*cap"),
    "duplicate_keys": (
        lambda p: raw_file(
            p,
            b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            b'"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
            b"\0" * 4,
        ),
        r"duplicate key",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_finetuned_file(tmp_path, capsys, models, case):
    ft, al, un = models
    make, pattern = CORRUPT[case]
    make(ft / "model.safetensors")
    code, err, out = run_cli(capsys, tmp_path, ft, al, un)
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("resta-fast: error: ")
    assert str(ft / "model.safetensors") in err
    import re

    assert re.search(pattern, err), err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".resta-tmp-" in p.name]


def test_index_naming_missing_shard(tmp_path, capsys):
    ft, al, un = three_models(tmp_path, vocab=16, hidden=8, layers=1, inter=12, shards=2)
    os.remove(ft / "model-00002-of-00002.safetensors")
    code, err, out = run_cli(capsys, tmp_path, ft, al, un)
    assert code == 2 and "names shard 'model-00002-of-00002.safetensors', which does not exist" in err
    assert not out.exists()


def test_index_naming_missing_tensor(tmp_path, capsys):
    ft, al, un = three_models(tmp_path, vocab=16, hidden=8, layers=1, inter=12, shards=2)
    index = json.loads((ft / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.ghost.weight"] = "model-00001-of-00002.safetensors"
    (ft / "model.safetensors.index.json").write_text(json.dumps(index))
    code, err, _ = run_cli(capsys, tmp_path, ft, al, un)
    assert code == 2 and "'model.ghost.weight'" in err and "does not contain it" in err


def test_output_exists_is_refused_then_overwritten(tmp_path, capsys, models):
    ft, al, un = models
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    code, err, out = run_cli(capsys, tmp_path, ft, al, un)
    assert code == 2 and "already exists; pass --overwrite" in err
    assert (out / "keep.txt").read_text() == "precious"
    code, err, out = run_cli(capsys, tmp_path, ft, al, un, "--overwrite")
    assert code == 0 and (out / "model.safetensors").exists() and not (out / "keep.txt").exists()


def test_output_inside_input_is_refused(tmp_path, capsys, models):
    ft, al, un = models
    code = main(
        [
            "patch",
            "--finetuned",
            str(ft),
            "--aligned",
            str(al),
            "--unaligned",
            str(un),
            "--out",
            str(al / "restored"),
            "--backend",
            "torch",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "is inside input" in err
    assert not (al / "restored").exists()


def test_unreadable_or_missing_path(tmp_path, capsys, models):
    ft, al, un = models
    code, err, _ = run_cli(capsys, tmp_path, ft, tmp_path / "nope", un)
    assert code == 2 and "aligned" in err and "does not exist" in err
    if os.geteuid() != 0:  # root reads everything; the permission case needs a normal user
        os.chmod(ft / "model.safetensors", 0)
        code, err, _ = run_cli(capsys, tmp_path, ft, al, un)
        assert code == 2 and "cannot read" in err


def test_a_pytorch_model_bin_that_is_not_a_torch_zip_gets_a_resave_hint(tmp_path, capsys, models):
    ft, al, un = models
    os.remove(ft / "model.safetensors")
    (ft / "pytorch_model.bin").write_bytes(b"not unpickled")
    code, err, _ = run_cli(capsys, tmp_path, ft, al, un)
    assert code == 2 and "pytorch_model.bin: not a zip-format torch checkpoint" in err and "safetensors" in err


def test_bad_parameters(tmp_path, capsys, models):
    ft, al, un = models
    for extra, msg in (
        (["--dare", "1.0"], "--dare must be"),
        (["--beta-rule", "noequals"], "REGEX=BETA"),
        (["--include", "("], "not a valid regular expression"),
        (["--dtype", "int8"], "--dtype 'int8' is not supported"),
    ):
        code, err, _ = run_cli(capsys, tmp_path, ft, al, un, *extra)
        assert code == 2 and msg in err, (extra, err)


def test_triton_backend_without_gpu_or_interpreter_says_what_is_needed(tmp_path, models):
    import subprocess
    import sys

    ft, al, un = models
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "resta_fast",
            "patch",
            "--finetuned",
            str(ft),
            "--aligned",
            str(al),
            "--unaligned",
            str(un),
            "--out",
            str(tmp_path / "out"),
            "--backend",
            "triton",
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=os.getcwd(),
    )
    if "CUDA" not in proc.stderr and proc.returncode == 0:
        pytest.skip("a GPU is visible; the triton backend runs")
    assert proc.returncode == 2, proc.stderr
    assert "TRITON_INTERPRET=1" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_input_truncated_during_the_run_is_one_clean_error_with_read_staging(tmp_path, capsys, monkeypatch):
    """``--staging read`` (the GPU default) preads every input chunk: an input that
    shrinks mid-run is exit 2 with one line naming it, where a mapping would SIGBUS.
    The per-chunk stat check would usually catch it first, so it is switched off here:
    only the pread stands between the truncation and the kernel."""
    from resta_fast.io.reader import SafetensorsFile
    from resta_fast.pipeline import engine

    ft, al, un = three_models(tmp_path, vocab=64, hidden=32, layers=2, inter=48)
    victim = un / "model.safetensors"
    real, done = engine._Pass._finish_tensor, [0]

    def truncate_after_the_first_tensor(self, tensor):
        real(self, tensor)
        done[0] += 1
        if done[0] == 1:
            os.truncate(victim, victim.stat().st_size // 2)

    monkeypatch.setattr(engine._Pass, "_finish_tensor", truncate_after_the_first_tensor)
    monkeypatch.setattr(SafetensorsFile, "check_unchanged", lambda self: None)
    code, err, out = run_cli(capsys, tmp_path, ft, al, un, "--staging", "read")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("resta-fast: error: "), err
    assert str(victim) in err and "truncated during the run" in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".resta-tmp-" in p.name]


def test_a_reader_that_leaves_the_pipe_early_gets_no_traceback(tmp_path):
    """`resta-fast inspect --json | head -2`: more output than a pipe holds, and a reader that stops."""
    import subprocess
    import sys

    ft, al, un = three_models(tmp_path, vocab=16, hidden=8, layers=60, inter=12)
    cmd = [sys.executable, "-m", "resta_fast", "inspect", str(ft), "--aligned", str(al), "--unaligned", str(un)]
    proc = subprocess.Popen([*cmd, "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(2) == b"{\n"
    proc.stdout.close()  # the reader leaves with most of the JSON unread
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err  # 128 + SIGPIPE, as a shell reports it
