"""Hardening (issue 9): hostile files, faults mid-run, signals, concurrent runs.

Invariants checked throughout:
* every bad input is one CheckpointError/RestaError naming the file (and tensor);
* inputs are never modified;
* ``--out`` either does not exist or is complete (``verify`` passes); no
  temp dir, lock file or old-output dir outlives the next run.

Runs that must be signalled or resource-limited run in children forked from
one long-lived worker process that has already imported torch, so ~50 child
runs cost milliseconds each instead of a fresh interpreter start each.
"""

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkpoints import three_models

from resta_fast import api
from resta_fast.cli import main
from resta_fast.errors import CheckpointError, RestaError
from resta_fast.io import lock as lock_mod
from resta_fast.io.checkpoint import Checkpoint
from resta_fast.io.lock import OutputBusy, OutputLock, clean_stale_temps, parse_temp_name
from resta_fast.io.reader import SafetensorsFile
from resta_fast.verify import verify

SMALL = {"vocab": 16, "hidden": 8, "layers": 1, "inter": 12}
MID = {"vocab": 256, "hidden": 32, "layers": 1, "inter": 48}
TESTS = Path(__file__).resolve().parent
HOST = socket.gethostname()


# --- hostile files: one named case per thing a file can try -----------------


def sf(header, data=b"", length=None):
    """Raw safetensors bytes: header (dict or bytes) padded to 8, then data."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def one(dtype="F32", shape=(2,), offsets=(0, 8), **extra):
    return {"w": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets), **extra}}


def entry(dtype, shape, offsets):
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


Z8 = b"\0" * 8
W = ", tensor 'w': "
CORRUPT_JSON = "; the file is corrupt or not safetensors — re-export or re-download it"
SHAPE = W + "shape must be a list of at most 64 non-negative integers, got "
OFFSETS = W + "data_offsets must be [begin, end] with 0 <= begin <= end, got "
DTYPE = " (known: BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64, F8_E4M3, F8_E5M2)"
NESTED = ": header JSON is nested deeper than safetensors allows; the file is corrupt"
NOT_OBJECT = ": header must be a JSON object of tensors; the file is corrupt"
ENTRY_KEYS = "; it must have exactly dtype, shape, data_offsets — the file is corrupt"

# name -> (file bytes, the exact error after the file's path)
HOSTILE = {
    "empty_file": (b"", ": file is 0 bytes, too short for a safetensors header; it is truncated or empty"),
    "seven_bytes": (b"\x01" * 7, ": file is 7 bytes, too short for a safetensors header; it is truncated or empty"),
    "header_length_over_cap": (
        sf(one(), Z8, length=100_000_001),
        ": header length 100000001 exceeds the 100000000-byte cap (real headers are "
        "< 1 MB); the file is corrupt or not safetensors",
    ),
    "header_length_u64_max": (
        sf(one(), Z8, length=2**64 - 1),
        ": header length 18446744073709551615 exceeds the 100000000-byte cap (real "
        "headers are < 1 MB); the file is corrupt or not safetensors",
    ),
    "header_length_past_eof": (
        sf(one(), Z8, length=4096),
        ": header length 4096 is larger than the file (80 bytes); the file is truncated or not safetensors",
    ),
    "header_length_zero": (
        struct.pack("<Q", 0) + Z8,
        ": header is not valid JSON (Expecting value: line 1 column 1 (char 0))" + CORRUPT_JSON,
    ),
    "header_invalid_utf8": (
        sf(b'{"w\xff\xfe":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', Z8),
        ": header is not valid UTF-8 (byte 3 of the header); tensor names and metadata "
        "must be UTF-8 — the file is corrupt or not safetensors",
    ),
    "header_is_a_zip": (
        sf(b"PK\x03\x04 this is a zip", Z8),
        ": header is not valid JSON (Expecting value: line 1 column 1 (char 0))" + CORRUPT_JSON,
    ),
    "header_json_array": (sf(b"[1,2,3]", Z8), NOT_OBJECT),
    "header_json_string": (sf(b'"hello"', Z8), NOT_OBJECT),
    "header_with_bom": (
        sf("\ufeff".encode() + json.dumps(one()).encode(), Z8),
        ": header is not valid JSON (Unexpected UTF-8 BOM (decode using utf-8-sig): line 1 "
        "column 1 (char 0))" + CORRUPT_JSON,
    ),
    "header_nan_literal": (sf(b'{"w":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', Z8), SHAPE + "[nan]"),
    "header_integer_5000_digits": (
        sf(b'{"w":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,8]}}', Z8),
        ": header is not valid JSON (Exceeds the limit (4300 digits) for integer string conversion: value "
        "has 5000 digits; use sys.set_int_max_str_digits() to increase the limit)" + CORRUPT_JSON,
    ),
    "header_nested_12_deep": (sf(b'{"__metadata__":' + b'{"data_offsets":' * 12 + b'"x"' + b"}" * 13), NESTED),
    "header_recursion_bomb": (
        sf(b'{"__metadata__":' + b'{"data_offsets":' * 100_000 + b'"x"' + b"}" * 100_001),
        NESTED,
    ),
    "header_object_bomb_2mb": (
        sf(b'{"__metadata__":{"k":"v"},"x":[' + b"{}," * 700_000 + b"{}]}"),
        ": header JSON holds 700004 objects/lists where a valid header can hold at "
        "most 2; the file is corrupt or hostile",
    ),
    "duplicate_tensor_name": (
        sf(
            b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            b'"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
            Z8,
        ),
        ": header is not valid JSON (duplicate key 'w')" + CORRUPT_JSON,
    ),
    "duplicate_field_in_entry": (
        sf(b'{"w":{"dtype":"F32","dtype":"I64","shape":[2],"data_offsets":[0,8]}}', Z8),
        ": header is not valid JSON (duplicate key 'dtype')" + CORRUPT_JSON,
    ),
    "entry_is_list": (
        sf({"w": ["F32", [2], [0, 8]]}, Z8),
        W + "entry is a JSON list, not an object with dtype, shape, data_offsets; the file is corrupt",
    ),
    "entry_is_null": (
        sf({"w": None}, Z8),
        W + "entry is a JSON NoneType, not an object with dtype, shape, data_offsets; the file is corrupt",
    ),
    "entry_missing_shape": (
        sf({"w": {"dtype": "F32", "data_offsets": [0, 8]}}, Z8),
        W + "entry has keys ['data_offsets', 'dtype']" + ENTRY_KEYS,
    ),
    "entry_extra_field": (
        sf(one(pointer=123), Z8),
        W + "entry has keys ['data_offsets', 'dtype', 'pointer', 'shape']" + ENTRY_KEYS,
    ),
    "dtype_unknown": (sf(one(dtype="F13"), Z8), W + "unknown dtype 'F13'" + DTYPE),
    "dtype_lowercase": (sf(one(dtype="f32"), Z8), W + "unknown dtype 'f32'" + DTYPE),
    "dtype_not_a_string": (sf(one(dtype=["F32"]), Z8), W + "unknown dtype ['F32']" + DTYPE),
    "shape_negative_dim": (sf(one(shape=(-2,)), Z8), SHAPE + "[-2]"),
    "shape_float_dim": (sf(one(shape=(2.0,)), Z8), SHAPE + "[2.0]"),
    "shape_bool_dim": (sf(one(shape=(True, 2)), Z8), SHAPE + "[True, 2]"),
    "shape_string": (sf({"w": entry("F32", "2", [0, 8])}, Z8), SHAPE + "'2'"),
    "shape_dim_2_pow_62": (sf(one(shape=(2**62,)), Z8), SHAPE + "[4611686018427387904]"),
    "shape_rank_65": (sf(one(shape=(1,) * 64 + (2,)), Z8), SHAPE + "[1" + ", 1" * 26 + "..."),
    "shape_product_overflows_u64": (
        sf(one(shape=(2**32,) * 3, offsets=(0, 0))),
        W + "byte size 0 != shape [4294967296, 4294967296, 4294967296] x F32 "
        "(316912650057057350374175801344 bytes); the file is corrupt",
    ),
    # In C, 2**61 * 8 elements * 4 bytes wraps to 0 (and + 8 to 8): a size check done
    # in uint64 would pass and hand a kernel a 2**66-byte tensor. Python ints do not wrap.
    "shape_times_itemsize_wraps_to_0": (
        sf(one(shape=(2**61, 8), offsets=(0, 0))),
        W + "byte size 0 != shape [2305843009213693952, 8] x F32 (73786976294838206464 bytes); the file is corrupt",
    ),
    "shape_times_itemsize_wraps_to_8": (
        sf(one(shape=(2**61 + 1, 8), offsets=(0, 8)), Z8),
        W + "byte size 8 != shape [2305843009213693953, 8] x F32 (73786976294838206496 bytes); the file is corrupt",
    ),
    "offsets_negative": (sf(one(offsets=(-8, 0)), Z8), OFFSETS + "[-8, 0]"),
    "offsets_reversed": (sf(one(offsets=(8, 0)), Z8), OFFSETS + "[8, 0]"),
    "offsets_three_values": (sf(one(offsets=(0, 8, 16)), Z8), OFFSETS + "[0, 8, 16]"),
    "offsets_float": (sf(one(offsets=(0, 8.0)), Z8), OFFSETS + "[0, 8.0]"),
    "offsets_minus_zero": (sf(b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[-0,8]}}', Z8), OFFSETS + "[-0.0, 8]"),
    "offsets_wrap_2_pow_64": (
        sf(one(offsets=(2**64 - 8, 2**64)), Z8),
        OFFSETS + "[18446744073709551608, 18446744073709551616]",
    ),
    "offsets_past_eof": (
        sf(one(offsets=(8, 16)), Z8),
        W + "data_offsets [8, 16] run past the end of the file (data section is 8 bytes); the file is truncated",
    ),
    "offsets_size_mismatch": (
        sf(one(shape=(3,)), Z8),
        W + "byte size 8 != shape [3] x F32 (12 bytes); the file is corrupt",
    ),
    "offsets_overlap": (
        sf({"a": entry("F32", [2], [0, 8]), "b": entry("F32", [2], [4, 12])}, b"\0" * 12),
        ", tensor 'b': byte range overlaps the previous tensor (starts at 4, previous ends at 8); the file is corrupt",
    ),
    "offsets_alias_same_bytes": (
        sf({"a": entry("F32", [2], [0, 8]), "b": entry("I32", [2], [0, 8])}, Z8),
        ", tensor 'b': byte range overlaps the previous tensor (starts at 0, previous ends at 8); the file is corrupt",
    ),
    "offsets_gap": (
        sf({"a": entry("F32", [1], [0, 4]), "b": entry("F32", [1], [8, 12])}, b"\0" * 12),
        ", tensor 'b': gap of 4 bytes before this tensor; safetensors requires tensors packed "
        "back to back — the file is corrupt",
    ),
    "offsets_gap_at_start": (
        sf(one(offsets=(4, 12)), b"\0" * 12),
        W + "gap of 4 bytes before this tensor; safetensors requires tensors packed back to back — the file is corrupt",
    ),
    "trailing_hidden_payload": (
        sf(one(), Z8 + b"hidden payload"),
        ": 14 trailing bytes after the last tensor; the file is corrupt or was appended to",
    ),
    "truncated_data": (
        sf(one(), b"\0" * 5),
        W + "data_offsets [0, 8] run past the end of the file (data section is 5 bytes); the file is truncated",
    ),
    "metadata_not_object": (
        sf({"__metadata__": ["format", "pt"], **one()}, Z8),
        ": __metadata__ must map strings to strings; the file is corrupt",
    ),
    "metadata_value_not_string": (
        sf({"__metadata__": {"format": 1}, **one()}, Z8),
        ": __metadata__ must map strings to strings; the file is corrupt",
    ),
    "metadata_lone_surrogate": (
        sf(b'{"__metadata__":{"format":"\\udc00"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', Z8),
        ": __metadata__ holds a string that is not valid UTF-8 (a lone surrogate escape)",
    ),
    "name_lone_surrogate": (
        sf(b'{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', Z8),
        ", tensor '\\ud800': tensor name is not valid UTF-8 (a lone surrogate escape); the file is corrupt",
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_exact_error(tmp_path, case):
    raw, message = HOSTILE[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError) as info:
        SafetensorsFile(path)
    assert str(info.value) == f"{path}{message}"


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    """(finetuned, aligned, unaligned) of the SMALL shape, shared read-only by a module's tests."""
    root = tmp_path_factory.mktemp("small")
    return three_models(root, **SMALL)


def test_hostile_files_through_the_cli(tmp_path, small_models, capsys):
    """Each hostile file as the fine-tune: exit 2, one line naming it, nothing written."""
    _, al, un = small_models
    ft = tmp_path / "ft"
    shutil.copytree(small_models[0], ft)
    for case, (raw, message) in sorted(HOSTILE.items()):
        (ft / "model.safetensors").write_bytes(raw)
        out = tmp_path / "out"
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
                str(out),
                "--backend",
                "torch",
                "--no-fsync",
                "--no-progress",
            ]
        )
        err = capsys.readouterr().err
        assert code == 2, case
        assert err == f"resta-fast: error: {ft / 'model.safetensors'}{message}\n", case
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ft"], case


# --- hostile model directories (index.json, links, config) --------------------

ESCAPE = " is not a plain file name; refusing to read outside the model directory"


def _sharded(tmp_path):
    ft, _, _ = three_models(tmp_path / "m", shards=2, **SMALL)
    return ft, json.loads((ft / "model.safetensors.index.json").read_text())


def _write_index(ft, index):
    (ft / "model.safetensors.index.json").write_text(json.dumps(index))


def _rename_shard(ft, index, new_name):
    index["weight_map"] = {k: (new_name if v.startswith("model-00002") else v) for k, v in index["weight_map"].items()}
    _write_index(ft, index)


def _case_shard_in_subdir(tmp_path):
    ft, index = _sharded(tmp_path)
    (ft / "sub").mkdir()
    os.rename(ft / "model-00002-of-00002.safetensors", ft / "sub" / "s.safetensors")
    _rename_shard(ft, index, "sub/s.safetensors")
    return ft, "shard name 'sub/s.safetensors'" + ESCAPE


def _case_shard_dotdot(tmp_path):
    ft, index = _sharded(tmp_path)
    shutil.copy(ft / "model-00002-of-00002.safetensors", ft.parent / "stolen.safetensors")
    _rename_shard(ft, index, "../stolen.safetensors")
    return ft, (
        "shard name '../stolen.safetensors' is not a plain file name; refusing to read outside the model directory"
    )


def _case_shard_absolute(tmp_path):
    ft, index = _sharded(tmp_path)
    _rename_shard(ft, index, "/etc/passwd")
    return ft, "shard name '/etc/passwd'" + ESCAPE


def _case_shard_backslash(tmp_path):
    ft, index = _sharded(tmp_path)
    _rename_shard(ft, index, "..\\stolen.safetensors")
    return ft, (
        "shard name '..\\\\stolen.safetensors' is not a plain file name; refusing to read outside the model directory"
    )


def _case_shard_dotdot_alone(tmp_path):
    ft, index = _sharded(tmp_path)
    _rename_shard(ft, index, "..")
    return ft, "shard name '..'" + ESCAPE


def _case_shard_nul(tmp_path):
    ft, index = _sharded(tmp_path)
    _rename_shard(ft, index, "model.safetensors\x00.txt")
    return ft, (
        "shard name 'model.safetensors\\x00.txt' is not a plain file name; refusing to read outside the model directory"
    )


def _case_shard_symlink_outside(tmp_path):
    ft, _ = _sharded(tmp_path)
    shard = ft / "model-00002-of-00002.safetensors"
    elsewhere = tmp_path / "secret.safetensors"
    os.rename(shard, elsewhere)
    os.symlink(elsewhere, shard)
    return ft, (
        f"shard 'model-00002-of-00002.safetensors' is a link pointing outside the model directory "
        f"({os.path.realpath(elsewhere)}); refusing to read it"
    )


def _case_shard_missing(tmp_path):
    ft, _ = _sharded(tmp_path)
    os.remove(ft / "model-00002-of-00002.safetensors")
    return ft, (
        f"names shard 'model-00002-of-00002.safetensors', which does not exist in {ft}; re-download the missing shard"
    )


def _case_index_not_json(tmp_path):
    ft, _ = _sharded(tmp_path)
    (ft / "model.safetensors.index.json").write_text("{'weight_map': }")
    return ft, (
        "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
        "(char 1)); regenerate the index"
    )


def _case_index_recursion_bomb(tmp_path):
    ft, _ = _sharded(tmp_path)
    (ft / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)
    return ft, "JSON nested too deeply; regenerate the index"


def _case_index_over_cap(tmp_path):
    ft, _ = _sharded(tmp_path)
    with open(ft / "model.safetensors.index.json", "r+b") as fh:
        fh.truncate(100_000_001)  # sparse: costs no disk
    return ft, "100000001 bytes is over the 100000000-byte cap; the index is corrupt, regenerate it"


def _case_index_weight_map_not_strings(tmp_path):
    ft, index = _sharded(tmp_path)
    index["weight_map"]["model.norm.weight"] = ["model-00001-of-00002.safetensors"]
    _write_index(ft, index)
    return ft, "needs a 'weight_map' object of tensor -> shard file"


def _case_index_names_wrong_shard(tmp_path):
    ft, index = _sharded(tmp_path)
    name, shard = next(iter(index["weight_map"].items()))
    other = next(v for v in index["weight_map"].values() if v != shard)
    index["weight_map"][name] = other
    _write_index(ft, index)
    return ft, (
        f"says tensor {name!r} is in {other}, but that shard does not contain it; the index and shards disagree"
    )


def _case_config_not_object(tmp_path):
    ft, _ = _sharded(tmp_path)
    (ft / "config.json").write_text("[1, 2]")
    return ft, "must be a JSON object, got list; fix or remove it"


INDEX_CASES = {
    f.__name__[len("_case_") :]: f
    for f in (
        _case_shard_in_subdir,
        _case_shard_dotdot,
        _case_shard_absolute,
        _case_shard_backslash,
        _case_shard_dotdot_alone,
        _case_shard_nul,
        _case_shard_symlink_outside,
        _case_shard_missing,
        _case_index_not_json,
        _case_index_recursion_bomb,
        _case_index_over_cap,
        _case_index_weight_map_not_strings,
        _case_index_names_wrong_shard,
        _case_config_not_object,
    )
}


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_hostile_model_directory_exact_error(tmp_path, case):
    ft, message = INDEX_CASES[case](tmp_path)
    where = ft / ("config.json" if case.startswith("config") else "model.safetensors.index.json")
    with pytest.raises(CheckpointError) as info:
        Checkpoint(ft, role="finetuned")
    assert str(info.value) == f"{where}: {message}"


def test_hf_cache_snapshot_links_into_blobs_are_allowed(tmp_path):
    """The hub cache links snapshots/REV/* to ../../blobs/*: that is not an escape."""
    ft, _ = _sharded(tmp_path)
    repo = tmp_path / "models--org--name"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in ft.iterdir():
        blob = repo / "blobs" / hashlib.sha256(p.name.encode()).hexdigest()
        shutil.copy(p, blob)
        os.symlink(os.path.relpath(blob, snap), snap / p.name)
    ck = Checkpoint(snap)
    assert len(ck.files) == 2
    ck.close()


# --- the fork-server worker -------------------------------------------------

WORKER = r"""
import json, os, resource, signal, sys, time, traceback
sys.path[:0] = [%(repo)r, %(tests)r]
import torch
torch.set_num_threads(1)  # no thread pools exist when we fork
import resta_fast.pipeline.engine as engine
import resta_fast.pipeline.interrupt as interrupt
from resta_fast import api
from resta_fast.cli import main


def child(req):
    fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 99
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if req.get("fsize"):
            resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], resource.RLIM_INFINITY))
        if req.get("delay"):
            orig, done = engine._Pass._finish_tensor, [0]

            def slow(*a, **k):
                orig(*a, **k)
                done[0] += 1
                if req.get("marker") and done[0] == req.get("marker_after", 1):
                    open(req["marker"], "w").close()
                time.sleep(req["delay"])
            engine._Pass._finish_tensor = slow

        def recording():  # where the KeyboardInterrupt came from: a tensor boundary
            if interrupt.interrupt_requested() and req.get("origin"):
                open(req["origin"], "w").write("boundary")
            interrupt.raise_if_interrupted()
        engine.raise_if_interrupted = api.raise_if_interrupted = recording
        code = main(req["argv"])
    except KeyboardInterrupt:
        code = 130  # before main() got going: nothing was written
        print("resta-fast: interrupted before the run started", file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(req)
    print(json.dumps({"pid": pid}), flush=True)
    # Reap only when asked: until then a finished child stays a zombie, so a
    # signal sent late hits nothing instead of a recycled pid.
    sys.stdin.readline()
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Worker:
    """Forks patch runs on request; ``start`` returns the child pid, ``wait`` its exit code
    (negative: killed by that signal)."""

    def __init__(self):
        script = WORKER % {"repo": str(TESTS.parent), "tests": str(TESTS)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        assert json.loads(self.proc.stdout.readline())["ready"], "worker failed to start"

    def start(self, **req) -> int:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "worker died"
        return json.loads(line)["pid"]

    def wait(self) -> int:
        self.proc.stdin.write("wait\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "worker died"
        return json.loads(line)["code"]

    def run(self, **req) -> int:
        self.start(**req)
        return self.wait()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def patch_argv(ft, al, un, out, *extra):
    return [
        "patch",
        "--finetuned",
        str(ft),
        "--aligned",
        str(al),
        "--unaligned",
        str(un),
        "--out",
        str(out),
        "--backend",
        "torch",
        "--no-progress",
        *extra,
    ]


def snapshot(*dirs) -> dict:
    """Content hash, size and mtime of every file under ``dirs`` (to prove inputs untouched)."""
    out = {}
    for d in dirs:
        for p in sorted(Path(d).rglob("*")):
            if p.is_file():
                st = p.stat()
                out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
    return out


def leftovers(parent: Path, out_name: str = "out") -> list[str]:
    """Temp dirs, lock files and old-output dirs of ``out`` in its parent."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{out_name}."))


def one_line_error(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


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


# --- signals -------------------------------------------------------------------


def _calibrate(worker, tmp_path, argv_for, **req) -> float:
    """Wall time of one uninterrupted run (kill times are drawn over ~1.3x of it)."""
    out = tmp_path / "calibration"
    t0 = time.perf_counter()
    code = worker.run(argv=argv_for(out), log=str(tmp_path / "calibration.log"), **req)
    elapsed = time.perf_counter() - t0
    assert code == 0, (tmp_path / "calibration.log").read_text()
    assert verify(out)["ok"]
    shutil.rmtree(out)
    return elapsed


TRIALS = 20


@pytest.mark.parametrize(
    "signum, code_if_stopped, trials", [(signal.SIGINT, 130, TRIALS), (signal.SIGTERM, 143, TRIALS // 2)]
)
def test_stop_signal_at_random_points(tmp_path, worker, capsys, signum, code_if_stopped, trials):
    """SIGINT (20) or SIGTERM (10) at seeded random moments: exit 130 / 143 with nothing
    left, or a finished, verified output; a stopped run stops at a tensor boundary.
    A SIGTERM that lands before the run takes it over, or after it has committed and
    given the signal back, kills the child (as it would kill any process); that must
    leave nothing, or the finished, verified output."""
    ft, al, un = three_models(tmp_path / "in", shards=2, **SMALL)
    before = snapshot(ft, al, un)
    work = tmp_path / "runs"
    work.mkdir()
    out = work / "out"
    name = signal.Signals(signum).name

    def argv_for(o):
        return patch_argv(ft, al, un, o, "--no-fsync")

    span = 1.3 * _calibrate(worker, tmp_path, argv_for, delay=0.01)
    rng = random.Random(20240901 + signum)
    outcomes = []
    for trial in range(trials):
        log, origin = tmp_path / f"{name}{trial}.log", tmp_path / f"origin{trial}"
        pid = worker.start(argv=argv_for(out), log=str(log), delay=0.01, origin=str(origin))
        time.sleep(rng.uniform(0, span))
        os.kill(pid, signum)
        code = worker.wait()
        if code == code_if_stopped:
            word = "interrupted" if signum == signal.SIGINT else "terminated (SIGTERM)"
            assert one_line_error(log).startswith(f"resta-fast: {word}"), trial
            assert not out.exists(), f"trial {trial}: a stopped run left --out"
            outcomes.append("stopped at a tensor boundary" if origin.exists() else "stopped before writing")
        elif code == -signum:
            assert signum == signal.SIGTERM, (trial, code)
            if out.exists():  # killed after the run committed and gave SIGTERM back, before it exited
                assert (out / "resta_fast.json").is_file() and verify(out)["ok"], (
                    f"trial {trial}: a killed run left an incomplete --out"
                )
                shutil.rmtree(out)
                outcomes.append("killed after the run finished")
            else:
                outcomes.append("killed before the run took the signal over")
        else:
            assert code == 0, (trial, code, log.read_text())
            assert verify(out)["ok"], trial
            shutil.rmtree(out)
            outcomes.append("finished before the signal")
        assert leftovers(work) == [], f"trial {trial}: {leftovers(work)}"
    assert snapshot(ft, al, un) == before
    summary = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    with capsys.disabled():
        print(f"\n{name} trials: {trials}: {summary}")
    # Loose floors: timing varies on shared machines; they only prove the paths were exercised.
    assert summary.get("stopped at a tensor boundary", 0) >= trials // 4, summary


@pytest.fixture()
def default_sigterm():
    """SIGTERM at its default action for the test (an in-process Ray, started by an
    earlier test, installs its own), restored afterwards."""
    old = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, old)


def test_stop_signal_between_nested_runs_is_kept(default_sigterm):
    """A GPU batch group wraps each job's api.patch in its own signal context: a SIGTERM
    that lands between two jobs must stop the next one, not be cleared by it; and the
    handlers are back to what they were once the outer context ends."""
    from resta_fast.pipeline import interrupt

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with interrupt.tensor_boundary_signals():
        with interrupt.tensor_boundary_signals():  # job 1
            interrupt.raise_if_interrupted()
        os.kill(os.getpid(), signal.SIGTERM)  # between the jobs
        time.sleep(0.05)  # the handler runs at the next bytecode boundary
        with pytest.raises(KeyboardInterrupt), interrupt.tensor_boundary_signals():  # job 2
            interrupt.raise_if_interrupted()
        assert interrupt.stop_signal() == signal.SIGTERM
    assert not interrupt.interrupt_requested()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_host_sigterm_handler_is_left_alone():
    """Whoever embeds us and handles SIGTERM (Ray's workers) keeps its handler."""
    from resta_fast.pipeline import interrupt

    def host_handler(signum, frame):
        pass

    old = signal.signal(signal.SIGTERM, host_handler)
    try:
        with interrupt.tensor_boundary_signals():
            assert signal.getsignal(signal.SIGTERM) is host_handler
        assert signal.getsignal(signal.SIGTERM) is host_handler
    finally:
        signal.signal(signal.SIGTERM, old)


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

    span = 1.3 * _calibrate(worker, tmp_path, argv_for, delay=0.01)
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


# --- concurrent runs and locks ------------------------------------------------


def test_second_run_on_same_output_fails_fast(tmp_path, worker, small_models, capsys):
    ft, al, un = small_models
    out, log, marker = tmp_path / "out", tmp_path / "log", tmp_path / "marker"
    pid = worker.start(argv=patch_argv(ft, al, un, out, "--no-fsync"), log=str(log), delay=0.2, marker=str(marker))
    deadline = time.time() + 30
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.005)
    t0 = time.perf_counter()
    with pytest.raises(OutputBusy) as info:
        api.patch(ft, out, aligned=al, unaligned=un, backend="torch", fsync=False)
    assert time.perf_counter() - t0 < 5
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
    dead = _dead_pid()
    (tmp_path / ".out.resta-lock").write_text(json.dumps({"pid": dead, "host": HOST, "started": "then"}))
    api.patch(ft, out, aligned=al, unaligned=un, backend="torch", fsync=False)
    assert verify(out)["ok"] and leftovers(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("holder, busy", [("live_same_host", True), ("dead_same_host", False), ("other_host", True)])
def test_lock_without_flock_falls_back_to_pid(tmp_path, monkeypatch, holder, busy):
    """On filesystems without flock the recorded pid/host decides."""

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock_mod.fcntl, "flock", no_flock)
    out = tmp_path / "out"
    pid = {"live_same_host": os.getppid(), "dead_same_host": _dead_pid(), "other_host": 1}[holder]
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
    dead = _dead_pid()
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
