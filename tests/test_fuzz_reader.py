"""Property tests: the reader returns the right tensors or raises CheckpointError, nothing else.

Hypothesis builds valid safetensors files (random names, dtypes, shapes,
metadata, tensor order) and corrupts them (flipped bits, truncation, appended
bytes, a rewritten length prefix, edited or removed header fields, spliced
bytes). For every file:

* our reader either raises ``CheckpointError`` or returns tensors;
* when it returns tensors, the official ``safetensors`` loader accepts the
  file too and returns the same names, dtypes, shapes and bytes (we may be
  stricter than the official loader, never looser);
* valid files are always accepted.

The example count is ``RESTA_FUZZ_EXAMPLES`` (default 2,400 across the tests
below, derandomized so CI is reproducible); a crash (segfault, SIGBUS) would
kill the test process, which pytest reports as a failure.
"""

import json
import os
import re
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as official_load

from resta_fast.errors import CheckpointError
from resta_fast.io.reader import DTYPES, SafetensorsFile, torch_dtype

SCALE = float(os.environ.get("RESTA_FUZZ_EXAMPLES", "2400")) / 2400
FUZZ = dict(
    deadline=None,
    derandomize=not os.environ.get("RESTA_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# Dtypes the official loader and torch both know; their bytes are compared raw.
FUZZ_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL"]
COUNTS = {"valid": 400, "bytes": 900, "header": 900, "json": 200}
_DIR = Path(tempfile.mkdtemp(prefix="resta-fuzz-"))


def examples(kind: str) -> int:
    return max(1, int(COUNTS[kind] * SCALE))


@st.composite
def tensor_specs(draw):
    """[(name, dtype, shape, data)] with unique names, and a metadata dict."""
    names = draw(st.lists(st.text(min_size=0, max_size=10), max_size=5, unique=True))
    names = [n for n in names if n != "__metadata__"]
    specs = []
    for name in names:
        dtype = draw(st.sampled_from(FUZZ_DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        numel = 1
        for d in shape:
            numel *= d
        data = draw(st.binary(min_size=numel * DTYPES[dtype][1], max_size=numel * DTYPES[dtype][1]))
        specs.append((name, dtype, shape, data))
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=6), st.text(max_size=12), max_size=3))
    return specs, metadata


def header_dict(specs, metadata, order) -> dict:
    """Header JSON object with data laid out in ``order`` (a permutation of specs)."""
    entries = {}
    if metadata is not None:
        entries["__metadata__"] = metadata
    cursor = 0
    offsets = {}
    for i in order:
        name, _, _, data = specs[i]
        offsets[name] = [cursor, cursor + len(data)]
        cursor += len(data)
    for name, dtype, shape, _ in specs:
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": offsets[name]}
    return entries


def serialize(header: dict | bytes, data: bytes, pad: bool = True) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    if pad:
        body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + data


@st.composite
def valid_files(draw):
    specs, metadata = draw(tensor_specs())
    order = draw(st.permutations(range(len(specs))))
    data = b"".join(specs[i][3] for i in order)
    return serialize(header_dict(specs, metadata, order), data, pad=draw(st.booleans())), specs, order


def ours(raw: bytes):
    """Our reader on ``raw``: {name: (dtype, shape, bytes)} or the CheckpointError."""
    fd, name = tempfile.mkstemp(dir=_DIR, suffix=".safetensors")
    with os.fdopen(fd, "wb") as fh:
        fh.write(raw)
    try:
        f = SafetensorsFile(name)
        try:
            got = {
                n: (i.dtype, i.shape, bytes(f.view(n).view(torch.uint8).numpy().tobytes()))
                for n, i in f.tensors.items()
            }
        finally:
            f.close()
        return got
    except CheckpointError as exc:
        assert name in str(exc), f"error does not name the file: {exc}"
        return exc
    finally:
        os.unlink(name)


def official(raw: bytes):
    try:
        loaded = official_load(raw)
    except Exception as exc:  # noqa: BLE001 - the official loader's verdict, any type
        return exc
    names = {torch_dtype(k): k for k in DTYPES}
    return {
        n: (names[t.dtype], tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
        for n, t in loaded.items()
    }


def check(raw: bytes) -> object:
    """The property: CheckpointError, or exactly what the official loader returns."""
    got = ours(raw)
    if isinstance(got, CheckpointError):
        # Shown by --hypothesis-show-statistics: which checks the corruptions hit.
        reason = str(got).split(": ", 1)[-1]
        event("rejected: " + re.sub(r"[\d\[\]'\"]+", "", " ".join(reason.split()[:5])))
        return got
    want = official(raw)
    assert not isinstance(want, Exception), f"we accepted a file the official loader rejects: {want!r}"
    assert got == want
    event("accepted, identical to the official loader")
    return got


@settings(max_examples=examples("valid"), **FUZZ)
@given(valid_files())
def test_valid_files_read_exactly(case):
    raw, specs, _ = case
    got = check(raw)
    assert not isinstance(got, CheckpointError), f"valid file rejected: {got}"
    assert got == {n: (d, tuple(s), data) for n, d, s, data in specs}


@st.composite
def byte_mutations(draw):
    raw, _, _ = draw(valid_files())
    kind = draw(st.sampled_from(["flip", "flip_header", "truncate", "append", "length", "splice"]))
    buf = bytearray(raw)
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    if kind in ("flip", "flip_header"):
        hi = header_end if kind == "flip_header" else len(buf)
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, hi - 1))
            buf[pos] ^= 1 << draw(st.integers(0, 7))
    elif kind == "truncate":
        del buf[draw(st.integers(0, len(buf) - 1)) :]
    elif kind == "append":
        buf += draw(st.binary(min_size=1, max_size=16))
    elif kind == "length":
        value = draw(
            st.one_of(
                st.integers(0, 2**64 - 1),
                st.integers(0, len(buf) + 16),
                st.sampled_from([0, 2**63, 2**64 - 1, 100_000_001]),
            )
        )
        buf[:8] = struct.pack("<Q", value)
    else:
        pos = draw(st.integers(8, header_end))
        buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(buf)


@settings(max_examples=examples("bytes"), **FUZZ)
@given(byte_mutations())
def test_corrupted_bytes_are_clean_errors_or_exact(raw):
    check(raw)


JSON_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
FIELD_VALUES = {
    "dtype": st.sampled_from(list(DTYPES) + ["F13", "", "f32", "Q4"]) | JSON_JUNK,
    "shape": st.lists(st.integers(-3, 2**64), max_size=4) | st.lists(st.integers(0, 4), max_size=70) | JSON_JUNK,
    "data_offsets": st.lists(st.integers(-2, 2**64 + 5), min_size=0, max_size=3) | JSON_JUNK,
}


@st.composite
def header_mutations(draw):
    """A valid file with one or more header fields edited, removed, added or duplicated."""
    specs, metadata = draw(tensor_specs())
    specs = specs or [("w", "F32", [1], b"\0\0\0\0")]
    order = list(range(len(specs)))
    header = header_dict(specs, metadata, order)
    data = b"".join(s[3] for s in specs)
    names = [s[0] for s in specs]
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(names))
        kind = draw(
            st.sampled_from(
                [
                    "edit",
                    "edit",
                    "edit",
                    "remove",
                    "add",
                    "entry",
                    "metadata",
                    "swap_offsets",
                    "shift_offsets",
                    "shift_offsets",
                ]
            )
        )
        entry = header[target]
        if kind == "edit" and isinstance(entry, dict):
            field = draw(st.sampled_from(list(FIELD_VALUES)))
            entry[field] = draw(FIELD_VALUES[field])
        elif kind == "remove" and isinstance(entry, dict) and entry:
            entry.pop(draw(st.sampled_from(sorted(entry))))
        elif kind == "add" and isinstance(entry, dict):
            entry[draw(st.text(max_size=5))] = draw(JSON_JUNK)
        elif kind == "entry":
            header[target] = draw(JSON_JUNK)
        elif kind == "metadata":
            header["__metadata__"] = draw(JSON_JUNK)
        elif (
            kind == "shift_offsets"
            and isinstance(entry, dict)
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
        ):
            # Same size, moved: overlaps, gaps and runs past the end.
            k = draw(st.integers(-8, 8))
            entry["data_offsets"] = [o + k if isinstance(o, int) else o for o in entry["data_offsets"]]
        elif kind == "swap_offsets" and len(names) > 1:
            other = draw(st.sampled_from(names))
            a, b = header[target], header[other]
            if isinstance(a, dict) and isinstance(b, dict) and "data_offsets" in a and "data_offsets" in b:
                a["data_offsets"], b["data_offsets"] = b["data_offsets"], a["data_offsets"]
    text = json.dumps(header, allow_nan=True)
    if draw(st.integers(0, 4)) == 0:  # a duplicate key, which dicts cannot express
        dup = json.dumps(names[0])
        text = text[:-1] + ("," if len(header) else "") + f"{dup}: {json.dumps(header.get(names[0]))}" + "}"
    return serialize(text.encode("utf-8", "surrogatepass"), data)


@settings(max_examples=examples("header"), **FUZZ)
@given(header_mutations())
def test_edited_header_fields_are_clean_errors_or_exact(raw):
    check(raw)


@settings(max_examples=examples("json"), **FUZZ)
@given(JSON_JUNK, st.binary(max_size=32))
def test_arbitrary_json_headers_are_clean_errors(header, data):
    text = json.dumps(header, allow_nan=True).encode("utf-8", "surrogatepass")
    check(serialize(text, data))


def _nested(depth: int, key: str) -> bytes:
    """A header whose metadata nests ``depth`` objects under ``key``. Keyed
    "data_offsets", each level also raises the object budget (3 per such key),
    so only the depth checks can stop it."""
    deep = f'{{"{key}":' * depth + '"x"' + "}" * depth
    return serialize(f'{{"__metadata__":{deep}}}'.encode(), b"")


@pytest.mark.parametrize(
    "depth, key, message",
    [
        (9, "data_offsets", "nested deeper than safetensors allows"),  # our depth check
        (50_000, "data_offsets", "nested deeper than safetensors allows"),  # json's recursion guard
        (50_000, "a", "nested deeper than safetensors allows"),  # small header: parsed, recursion guard
        (250_000, "a", "objects/lists where a valid header can hold at most"),  # > 1 MB: budget, unparsed
    ],
)
def test_deep_nesting_is_a_clean_error(depth, key, message):
    got = ours(_nested(depth, key))
    assert isinstance(got, CheckpointError) and message in str(got), got


def test_atheris_harness_property_holds_on_seeds_and_hostile_corpus(tmp_path):
    """Keeps tests/fuzz/fuzz_reader.py working without atheris installed."""
    import importlib.util

    from hostile_files import HOSTILE

    path = Path(__file__).parent / "fuzz" / "fuzz_reader.py"
    spec = importlib.util.spec_from_file_location("fuzz_reader", path)
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    assert harness.make_seeds(tmp_path) >= 5
    for p in sorted(tmp_path.iterdir()):
        harness.one_input(p.read_bytes())
    for raw, _ in HOSTILE.values():
        harness.one_input(raw)
