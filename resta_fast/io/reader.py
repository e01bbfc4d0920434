"""Validated, memory-mapped, zero-copy reading of safetensors files.

Every header is checked against the file before any pointer into it is used:
header length, JSON shape, dtype names, shapes, offsets (in range, contiguous,
non-overlapping) and byte sizes. A bad file raises CheckpointError naming the
file and tensor; nothing else escapes.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resta_fast.errors import CheckpointError

# safetensors' own loader refuses headers over 100 MB; a real 70B-parameter
# checkpoint shard's header is well under 1 MB, so this only stops hostile files
# from making us allocate and parse gigabytes of JSON.
MAX_HEADER_BYTES = 100_000_000
# A valid header is 3 levels deep ({name: {"shape": [...]}}); anything deeper is hostile.
MAX_JSON_DEPTH = 8
# Headers at least this big get their object count checked before parsing (see
# _container_budget_exceeded); ~10k tensors' worth, so real headers rarely do.
BUDGET_CHECK_BYTES = 1 << 20
# No real checkpoint has a tensor of rank > 64 (numpy's and most kernels' limit);
# bounding it keeps a hostile `shape` list from being an allocation bomb.
MAX_RANK = 64

# safetensors dtype -> (the torch dtype's name, bytes per element). Names, not
# torch objects, so reading headers and streaming on the CPU need no torch;
# ``torch_dtype`` resolves one when a torch view is asked for.
DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "F64": ("float64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
ITEMSIZE: dict[str, int] = {name: size for name, (_, size) in DTYPES.items()}
# How the engine holds each dtype in host memory (numpy arrays, no torch): numpy
# has no bfloat16, so BF16 is carried as its uint16 bits (the kernels take raw
# storage and know the dtype from it), FP8 as bytes.
NUMPY_STORAGE: dict[str, type] = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "I16": np.int16,
    "U16": np.uint16,
    "F16": np.float16,
    "BF16": np.uint16,
    "I32": np.int32,
    "U32": np.uint32,
    "F32": np.float32,
    "I64": np.int64,
    "U64": np.uint64,
    "F64": np.float64,
    "F8_E4M3": np.uint8,
    "F8_E5M2": np.uint8,
}
# Dtypes the fused kernels compute with (docs/spec.md §2); other floats are copied.
KERNEL_DTYPES = ("BF16", "F16", "F32")
FLOAT_DTYPES = ("BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2")


def torch_dtype(name: str):
    """The torch dtype of safetensors dtype ``name`` (imports torch)."""
    import torch

    return getattr(torch, DTYPES[name][0])


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: absolute byte range [start, end) in its file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _clip(value, limit: int = 80) -> str:
    """repr() short enough for a one-line error, whatever a hostile file put there."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _parse_int(text: str):
    # JSON "-0" is an integer to Python but a float to serde (the official
    # loader rejects it as a shape/offset): make it a float so we reject it too.
    return -0.0 if text == "-0" else int(text)


def _reject_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _json_depth(obj) -> int:
    """Nesting depth, iteratively: a recursive walk could itself overflow."""
    deepest, stack = 0, [(obj, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((v, depth) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


# Unrolled-loop form: linear time, no backtracking on long strings.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def _container_budget_exceeded(header: bytes) -> tuple[int, int] | None:
    """(found, allowed) when the header holds more JSON objects/lists than a valid one can.

    A valid header has one object per tensor entry plus two lists (shape,
    data_offsets), the top-level object and ``__metadata__``. Counting before
    json.loads stops a header of ``[{},{},...]`` from costing ~20x its size in
    Python objects. Braces inside strings (JSON metadata values) are not
    structure, so the exact count strips strings first; the raw count is a
    cheap upper bound that settles almost every real header. Headers under
    1 MB are cheap to parse whatever they hold, and skip the check so their
    errors can name the offending tensor.
    """
    if len(header) < BUDGET_CHECK_BYTES:
        return None
    allowed = 2 + 3 * header.count(b'"data_offsets"')
    if header.count(b"{") + header.count(b"[") <= allowed:
        return None
    bare = _JSON_STRING.sub(b'""', header)
    found = bare.count(b"{") + bare.count(b"[")
    return (found, allowed) if found > allowed else None


def _valid_utf8(text: str) -> bool:
    """False for strings JSON escapes can build but UTF-8 cannot hold (lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_header(path: Path, header: bytes, file_size: int):
    """Validate a raw header; return (metadata, {name: TensorInfo} in file order)."""

    def bad(msg, tensor=None):
        where = f"{path}" + (f", tensor {_clip(tensor, 200)}" if tensor is not None else "")
        return CheckpointError(f"{where}: {msg}")

    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(
            f"header is not valid UTF-8 (byte {exc.start} of the header); tensor names and "
            "metadata must be UTF-8 — the file is corrupt or not safetensors"
        ) from None
    excess = _container_budget_exceeded(header)
    if excess is not None:
        raise bad(
            f"header JSON holds {excess[0]} objects/lists where a valid header can hold at most "
            f"{excess[1]}; the file is corrupt or hostile"
        )
    try:
        obj = json.loads(text, object_pairs_hook=_reject_duplicates, parse_int=_parse_int)
    except RecursionError:
        raise bad("header JSON is nested deeper than safetensors allows; the file is corrupt") from None
    except ValueError as exc:
        raise bad(
            f"header is not valid JSON ({exc}); the file is corrupt or not safetensors — re-export or re-download it"
        ) from None
    if not isinstance(obj, dict):
        raise bad("header must be a JSON object of tensors; the file is corrupt")
    if _json_depth(obj) > MAX_JSON_DEPTH:
        raise bad("header JSON is nested deeper than safetensors allows; the file is corrupt")
    metadata = obj.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise bad("__metadata__ must map strings to strings; the file is corrupt")
    if not all(_valid_utf8(k) and _valid_utf8(v) for k, v in metadata.items()):
        raise bad("__metadata__ holds a string that is not valid UTF-8 (a lone surrogate escape)")
    data_start = 8 + len(header)
    data_len = file_size - data_start
    infos = []
    for name, entry in obj.items():
        if not _valid_utf8(name):
            raise bad(
                "tensor name is not valid UTF-8 (a lone surrogate escape); the file is corrupt", name
            )  # repr() escapes the surrogate, so the message itself stays printable
        if not isinstance(entry, dict):
            raise bad(
                f"entry is a JSON {type(entry).__name__}, not an object with dtype, shape, "
                "data_offsets; the file is corrupt",
                name,
            )
        if set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(
                f"entry has keys {_clip(sorted(entry))}; it must have exactly dtype, shape, "
                "data_offsets — the file is corrupt",
                name,
            )
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise bad(f"unknown dtype {_clip(dtype)} (known: {', '.join(DTYPES)})", name)
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_RANK
            or not all(type(d) is int and 0 <= d < 2**62 for d in shape)
        ):
            raise bad(f"shape must be a list of at most {MAX_RANK} non-negative integers, got {_clip(shape)}", name)
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int and 0 <= o < 2**63 for o in offsets)
            and offsets[0] <= offsets[1]
        ):
            raise bad(f"data_offsets must be [begin, end] with 0 <= begin <= end, got {_clip(offsets)}", name)
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * DTYPES[dtype][1]
        if offsets[1] - offsets[0] != expected:
            raise bad(
                f"byte size {offsets[1] - offsets[0]} != shape {shape} x {dtype} "
                f"({expected} bytes); the file is corrupt",
                name,
            )
        if offsets[1] > data_len:
            raise bad(
                f"data_offsets {offsets} run past the end of the file "
                f"(data section is {data_len} bytes); the file is truncated",
                name,
            )
        infos.append(TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1]))
    infos.sort(key=lambda t: (t.start, t.end))
    cursor = data_start
    for info in infos:
        if info.start < cursor:
            raise bad(
                f"byte range overlaps the previous tensor (starts at {info.start - data_start}, "
                f"previous ends at {cursor - data_start}); the file is corrupt",
                info.name,
            )
        if info.start > cursor:
            raise bad(
                f"gap of {info.start - cursor} bytes before this tensor; safetensors "
                "requires tensors packed back to back — the file is corrupt",
                info.name,
            )
        cursor = info.end
    if cursor != file_size:
        raise bad(f"{file_size - cursor} trailing bytes after the last tensor; the file is corrupt or was appended to")
    return metadata, {info.name: info for info in infos}


class SafetensorsFile:
    """One validated safetensors file, memory-mapped on first use.

    Example:
        >>> f = SafetensorsFile("model.safetensors")  # doctest: +SKIP
        >>> f.view("lm_head.weight").shape  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as fh:
                stat = os.fstat(fh.fileno())
                head = fh.read(8)
                if len(head) < 8:
                    raise CheckpointError(
                        f"{self.path}: file is {len(head)} bytes, too short for "
                        "a safetensors header; it is truncated or empty"
                    )
                (header_len,) = struct.unpack("<Q", head)
                if header_len > MAX_HEADER_BYTES:
                    raise CheckpointError(
                        f"{self.path}: header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte "
                        "cap (real headers are < 1 MB); the file is corrupt or not safetensors"
                    )
                if 8 + header_len > stat.st_size:
                    raise CheckpointError(
                        f"{self.path}: header length {header_len} is larger than the file "
                        f"({stat.st_size} bytes); the file is truncated or not safetensors"
                    )
                self.header_bytes = fh.read(header_len)
        except OSError as exc:
            raise CheckpointError(
                f"{self.path}: cannot read ({exc.strerror}); check the path and permissions"
            ) from None
        self.stat = stat
        self.size = stat.st_size
        self.metadata, self.tensors = parse_header(self.path, self.header_bytes, self.size)
        self._mmap: mmap.mmap | None = None
        self._fd: int | None = None  # for read_into (pread), opened on first use
        self._fd_lock = threading.Lock()

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                st = os.fstat(fd)
                if (st.st_size, st.st_ino, st.st_mtime_ns) != (
                    self.stat.st_size,
                    self.stat.st_ino,
                    self.stat.st_mtime_ns,
                ):
                    raise CheckpointError(
                        f"{self.path}: file changed while resta_fast was reading it; rerun once the file is stable"
                    )
                # ACCESS_COPY: a private mapping torch can wrap without a read-only
                # warning; we never write to it, so the file is never touched.
                self._mmap = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY) if self.size else None
            finally:
                os.close(fd)
            if self._mmap is not None and hasattr(mmap, "MADV_SEQUENTIAL"):
                self._mmap.madvise(mmap.MADV_SEQUENTIAL)
        return self._mmap

    def view(self, name: str):
        """Flat zero-copy torch tensor for ``name`` in its stored dtype (imports torch;
        the engine reads ``array`` instead)."""
        import torch

        raw = torch.from_numpy(self.array(name).view(np.uint8))
        return raw.view(torch_dtype(self.tensors[name].dtype))

    def array(self, name: str) -> np.ndarray:
        """Flat zero-copy numpy view of ``name`` in its storage type (``NUMPY_STORAGE``)."""
        info = self.tensors[name]
        storage = NUMPY_STORAGE[info.dtype]
        if info.nbytes == 0:
            return np.empty(0, dtype=storage)
        mapping = self._map()
        if info.end > len(mapping):  # validated at open; re-checked so no kernel sees a bad range
            raise CheckpointError(
                f"{self.path}, tensor {name!r}: byte range [{info.start}, {info.end}) "
                f"is past the mapping ({len(mapping)} bytes)"
            )
        return np.frombuffer(mapping, dtype=np.uint8, count=info.nbytes, offset=info.start).view(storage)

    def raw(self, name: str) -> memoryview:
        """The tensor's bytes as a memoryview into the mapping (zero-copy)."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return memoryview(b"")
        return memoryview(self._map())[info.start : info.end]

    def read_into(self, buf: memoryview, start: int, tensor: str | None = None) -> None:
        """Fill ``buf`` with the file's bytes from absolute offset ``start`` (pread).

        Unlike touching a mapping, a file that shrank underneath us gives a clean
        CheckpointError naming it, not a SIGBUS. Safe to call from several threads.
        """
        if self._fd is None:
            with self._fd_lock:
                if self._fd is None:
                    fd = os.open(self.path, os.O_RDONLY)
                    st = os.fstat(fd)
                    if (st.st_size, st.st_ino, st.st_mtime_ns) != (
                        self.stat.st_size,
                        self.stat.st_ino,
                        self.stat.st_mtime_ns,
                    ):
                        os.close(fd)
                        raise CheckpointError(
                            f"{self.path}: file changed while resta_fast was reading it; rerun once the file is stable"
                        )
                    self._fd = fd
        pos, n = 0, len(buf)
        while pos < n:
            got = os.preadv(self._fd, [buf[pos:]], start + pos)
            if got <= 0:
                where = f", tensor {tensor!r}" if tensor else ""
                raise CheckpointError(
                    f"{self.path}{where}: the file ends at byte {start + pos} but the data runs to byte "
                    f"{start + n}; it was truncated during the run, so nothing was written. Rerun once "
                    "the file is complete"
                )
            pos += got

    def prefetch(self, start: int, length: int) -> None:
        """Ask the kernel to start reading [start, start+length) ahead of use."""
        self._advise(start, length, getattr(mmap, "MADV_WILLNEED", None))

    def release(self, start: int, length: int) -> None:
        """Drop mapped pages we are done with so RSS stays bounded."""
        self._advise(start, length, getattr(mmap, "MADV_DONTNEED", None))

    def _advise(self, start, length, advice):
        if advice is None or self._mmap is None or length <= 0:
            return
        page = mmap.PAGESIZE
        lo = start - start % page
        hi = min(start + length, self.size)
        if hi > lo:
            self._mmap.madvise(advice, lo, hi - lo)

    def check_unchanged(self) -> None:
        """Raise if the file on disk is no longer the one we validated."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise CheckpointError(f"{self.path}: disappeared during the run ({exc.strerror})") from None
        if (st.st_size, st.st_ino, st.st_mtime_ns) != (self.stat.st_size, self.stat.st_ino, self.stat.st_mtime_ns):
            raise CheckpointError(
                f"{self.path}: file was modified or replaced during the run; "
                "the output would be inconsistent, so nothing was written"
            )

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # a torch view still references it; the GC unmaps it later
            self._mmap = None
