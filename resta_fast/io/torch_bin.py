"""Pickle-free reading of zip-format torch checkpoints (``pytorch_model*.bin``, ``adapter_model.bin``).

``torch.save`` (torch >= 1.6) writes a zip archive: ``<prefix>/data.pkl``, a pickle of the
state dict whose tensors name their storages by persistent id, then one uncompressed entry
``<prefix>/data/<key>`` per storage, ``<prefix>/byteorder`` and a few version records.
``TorchBinFile`` reads one without running anything in it:

- the zip's end records, central directory and every entry's local header are parsed here, so
  each entry's byte range is known and checked (stored, not compressed; inside the file, before
  the central directory; no two entries overlapping) before anything is read;
- the opcodes of ``data.pkl`` are scanned first (``pickletools.genops`` only decodes them): an
  opcode that builds objects from classes, an extension code, an out-of-band buffer or a
  ``GLOBAL`` outside the allow-list refuses the file before it is unpickled. The stdlib
  ``pickle.Unpickler`` then runs it with ``find_class`` resolving only the names a state dict
  uses (``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``/``_v3``/
  ``_rebuild_parameter``, ``torch.*Storage``, ``torch.storage.UntypedStorage`` and dtypes), each
  to a function or token of ours that records a plain descriptor; ``persistent_load`` maps a
  storage id to its zip entry. Nothing is imported and no callable of the file's choosing runs;
- every tensor is checked against its storage (known dtype, row-major contiguous strides,
  offset + dtype × shape inside the storage, one dtype per storage, no byte named by more than
  ``MAX_ALIASES`` tensors) and becomes a ``reader.TensorInfo`` with absolute file offsets, so the engine
  stages it exactly like a safetensors tensor: mmap views or pread, with bounded memory.

Anything else (the legacy non-zip format, compressed entries, non-contiguous views, big-endian
data) is one ``CheckpointError`` naming the file and what to do.

Example:
    >>> f = TorchBinFile("ft/pytorch_model.bin")  # doctest: +SKIP
    >>> f.tensors["lm_head.weight"].shape  # doctest: +SKIP
    (32000, 4096)
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import reprlib
import struct
import threading
import warnings
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from resta_fast.errors import CheckpointError
from resta_fast.io.reader import DTYPES, ITEMSIZE, MAX_HEADER_BYTES, MAX_RANK, SafetensorsFile, TensorInfo

SINGLE_NAME = "pytorch_model.bin"
INDEX_NAME = "pytorch_model.bin.index.json"
ADAPTER_NAME = "adapter_model.bin"
# File names read with this module rather than as safetensors.
SUFFIXES = (".bin", ".pt", ".pth")
# data.pkl takes ~150 bytes per tensor, so 32 MB is 200k tensors, past any real shard. Its cap bounds memory:
# the unpickler's stack (and the scan's model of it) may hold a pointer per byte of pickle.
MAX_PICKLE_BYTES = 32 << 20
# A central directory entry is at least 46 bytes; real archives hold 2 entries per tensor at most.
MAX_CENTRAL_BYTES = MAX_HEADER_BYTES
# Tied weights name the same bytes twice (embedding and LM head; T5 four times). More names for
# one range would let a small file ask for an output many times its size.
MAX_ALIASES = 8
# A state dict's pickle nests tuples 3 deep (a tensor's rebuild arguments hold its shape); the bound
# stops a hostile dict key nested deep enough to overflow the C stack when it is hashed.
MAX_NESTING = 32
# A reason to re-save, for files this reader cannot stream.
RESAVE = "re-save it with torch.save (torch >= 1.6 writes the zip format, uncompressed) or as safetensors"

# torch.<X>Storage -> safetensors dtype (torch.storage._dtype_to_storage_type_map, readable kinds only).
_STORAGE_DTYPES = {
    "DoubleStorage": "F64",
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "IntStorage": "I32",
    "ShortStorage": "I16",
    "CharStorage": "I8",
    "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}
# torch.<dtype> (what _rebuild_tensor_v3 is given with an UntypedStorage: float8, uint16 ...) -> dtype.
_TORCH_DTYPES = {torch_name: name for name, (torch_name, _) in DTYPES.items()}

# Opcodes that build objects from a class (INST, OBJ, NEWOBJ...), use copyreg's extension
# registry, read out-of-band buffers or use text persistent ids: a state dict needs none of them.
_REFUSED_OPCODES = {
    "INST",
    "OBJ",
    "NEWOBJ",
    "NEWOBJ_EX",
    "EXT1",
    "EXT2",
    "EXT4",
    "PERSID",
    "NEXT_BUFFER",
    "READONLY_BUFFER",
}
_MEMO_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}

_LOCAL = b"PK\x03\x04"
_CENTRAL = b"PK\x01\x02"
_END = b"PK\x05\x06"
_END64 = b"PK\x06\x06"
_LOCATOR64 = b"PK\x06\x07"
_ZIP64 = 0xFFFFFFFF


def safetensors_name(file_name: str) -> str:
    """The safetensors file an output writes for input weight file ``file_name`` (transformers' names).

    Example:
        >>> safetensors_name("pytorch_model-00001-of-00002.bin"), safetensors_name("adapter_model.bin")
        ('model-00001-of-00002.safetensors', 'adapter_model.safetensors')
        >>> safetensors_name("model.safetensors")
        'model.safetensors'
    """
    stem, suffix = os.path.splitext(file_name)
    if suffix not in SUFFIXES:
        return file_name
    if stem == "pytorch_model" or stem.startswith("pytorch_model-"):
        stem = "model" + stem[len("pytorch_model") :]
    return stem + ".safetensors"


def is_torch_bin(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a torch checkpoint (by its suffix), to be read with ``TorchBinFile``.

    Example:
        >>> is_torch_bin("pytorch_model.bin"), is_torch_bin("model.safetensors")
        (True, False)
    """
    return os.path.splitext(os.fspath(path))[1] in SUFFIXES


def open_weight_file(path: str | os.PathLike) -> SafetensorsFile:
    """A validated weight file: ``TorchBinFile`` for a torch checkpoint, else ``SafetensorsFile``."""
    return TorchBinFile(path) if is_torch_bin(path) else SafetensorsFile(path)


class _Refused(Exception):
    """Why the file is refused; ``TorchBinFile`` adds the path."""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 200


def _clip(value, limit: int = 80) -> str:
    """A short repr for a one-line error, whatever a hostile file built (reprlib bounds depth and length)."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - an object whose repr fails is still named by its type
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


# --- the zip archive -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ZipEntry:
    """One stored member of the archive: its local header's offset and its data's [start, start + size)."""

    name: str
    header: int
    start: int
    size: int


def _pread(fd: int, size: int, offset: int) -> bytes:
    """Up to ``size`` bytes at ``offset`` (fewer at the end of the file)."""
    parts, got = [], 0
    while got < size:
        chunk = os.pread(fd, size - got, offset + got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _exact(fd: int, size: int, offset: int, what: str) -> bytes:
    data = _pread(fd, size, offset)
    if len(data) != size:
        raise _Refused(f"{what} at byte {offset} runs past the end of the file; the file is truncated")
    return data


def _find_end(fd: int, file_size: int) -> tuple[int, bytes]:
    """The end-of-central-directory record: (its offset, its 22 fixed bytes)."""
    span = min(file_size, 22 + 0xFFFF)  # the record, then a comment of at most 64 KiB
    tail = _pread(fd, span, file_size - span)
    pos = len(tail)
    while True:
        pos = tail.rfind(_END, 0, pos)
        if pos < 0:
            raise _Refused(f"no zip end record; the file is truncated or not a torch checkpoint ({RESAVE})")
        if len(tail) - pos >= 22:
            (comment,) = struct.unpack_from("<H", tail, pos + 20)
            if pos + 22 + comment == len(tail):  # the real record ends the file, with its comment
                return file_size - span + pos, tail[pos : pos + 22]


def _central_directory(fd: int, file_size: int) -> tuple[int, int, int]:
    """(offset, size, entry count) of the central directory, zip64 records honoured."""
    end_at, end = _find_end(fd, file_size)
    _, disk, cd_disk, _, count, cd_size, cd_offset, _ = struct.unpack("<4sHHHHIIH", end)
    limit = end_at
    locator_at = end_at - 20
    if locator_at >= 0 and _pread(fd, 4, locator_at) == _LOCATOR64:
        _, _, end64_at, _ = struct.unpack("<4sIQI", _exact(fd, 20, locator_at, "the zip64 locator"))
        if end64_at + 56 > locator_at:
            raise _Refused(f"the zip64 end record at byte {end64_at} is not before its locator; the file is corrupt")
        rec = _exact(fd, 56, end64_at, "the zip64 end record")
        sig, _, _, _, disk, cd_disk, _, count, cd_size, cd_offset = struct.unpack("<4sQHHIIQQQQ", rec)
        if sig != _END64:
            raise _Refused(f"no zip64 end record at byte {end64_at}, where its locator points; the file is corrupt")
        limit = end64_at
    elif _ZIP64 in (cd_size, cd_offset) or count == 0xFFFF:
        raise _Refused("the zip end record asks for zip64 records that are not there; the file is corrupt")
    if disk or cd_disk:
        raise _Refused("a multi-part (spanned) zip archive; join it into one file first")
    if cd_size > MAX_CENTRAL_BYTES or count > cd_size // 46:
        raise _Refused(f"the zip central directory claims {count} entries in {cd_size} bytes; the file is corrupt")
    if cd_offset + cd_size > limit:
        raise _Refused(
            f"the zip central directory [{cd_offset}, {cd_offset + cd_size}) runs past its end record "
            f"(byte {limit}); the file is truncated or corrupt"
        )
    return cd_offset, cd_size, count


def _zip64_fields(extra: bytes, wanted: list[str], name: str) -> dict[str, int]:
    """The 8-byte values a zip64 extra field (id 1) holds, in order, for the ``wanted`` 32-bit fields."""
    pos = 0
    while pos + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + length]
        if tag == 1:
            if len(body) < 8 * len(wanted):
                break
            return {field: struct.unpack_from("<Q", body, 8 * i)[0] for i, field in enumerate(wanted)}
        pos += 4 + length
    raise _Refused(f"zip entry {name!r} needs a zip64 extra field for {', '.join(wanted)}; the file is corrupt")


def read_zip(fd: int, file_size: int) -> dict[str, ZipEntry]:
    """Every member of the zip archive open on ``fd``, checked: stored (uncompressed), not encrypted,
    inside the file before the central directory, no two overlapping. Raises ``_Refused``."""
    cd_offset, cd_size, count = _central_directory(fd, file_size)
    cd = _exact(fd, cd_size, cd_offset, "the zip central directory")
    entries: dict[str, ZipEntry] = {}
    pos = 0
    for _ in range(count):
        if cd[pos : pos + 4] != _CENTRAL or pos + 46 > len(cd):
            raise _Refused(f"zip central directory entry at byte {cd_offset + pos} is malformed; the file is corrupt")
        (flags, method, csize, usize, nlen, elen, clen, disk, local) = struct.unpack_from("<8xHH8xIIHHHH6xI", cd, pos)
        raw_name = cd[pos + 46 : pos + 46 + nlen]
        extra = cd[pos + 46 + nlen : pos + 46 + nlen + elen]
        pos += 46 + nlen + elen + clen
        if pos > len(cd):
            raise _Refused(
                f"zip central directory entry {raw_name[:40]!r} runs past the directory; the file is corrupt"
            )
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise _Refused(
                f"zip entry name {raw_name[:40]!r} is not UTF-8; the file is not a torch checkpoint"
            ) from None
        wanted = [f for f, v in (("size", usize), ("compressed size", csize), ("offset", local)) if v == _ZIP64]
        if wanted:
            big = _zip64_fields(extra, wanted, name)
            usize, csize, local = big.get("size", usize), big.get("compressed size", csize), big.get("offset", local)
        if flags & 1:
            raise _Refused(f"zip entry {name!r} is encrypted; {RESAVE}")
        if method != 0:
            raise _Refused(
                f"zip entry {name!r} is compressed (method {method}); resta_fast reads only the uncompressed "
                f"entries torch.save writes and never inflates one: {RESAVE}"
            )
        if csize != usize:
            raise _Refused(
                f"zip entry {name!r} is stored but its sizes differ ({csize} != {usize}); the file is corrupt"
            )
        if disk:
            raise _Refused("a multi-part (spanned) zip archive; join it into one file first")
        if name in entries:
            raise _Refused(f"zip entry {name!r} appears twice; the file is corrupt or hostile")
        head = _exact(fd, 30, local, f"the local header of zip entry {name!r}")
        sig, local_method, local_nlen, local_elen = struct.unpack("<4s4xH16xHH", head)
        if sig != _LOCAL or local_method != method:
            raise _Refused(f"zip entry {name!r}: no matching local header at byte {local}; the file is corrupt")
        if _pread(fd, local_nlen, local + 30) != raw_name:
            raise _Refused(f"zip entry {name!r}: its local header names another entry; the file is corrupt")
        start = local + 30 + local_nlen + local_elen
        if start + usize > cd_offset:
            raise _Refused(
                f"zip entry {name!r}: data [{start}, {start + usize}) runs past the end of the entries (byte "
                f"{cd_offset}); the file is truncated or corrupt"
            )
        entries[name] = ZipEntry(name, local, start, usize)
    ordered = sorted(entries.values(), key=lambda e: e.header)
    for prev, entry in pairwise(ordered):
        if entry.header < prev.start + prev.size:
            raise _Refused(
                f"zip entries {prev.name!r} and {entry.name!r} overlap; the file is corrupt or hostile "
                "(overlapping entries are how zip bombs share bytes)"
            )
    return entries


# --- the pickle ----------------------------------------------------------------------------------


class _Sealed:
    """No pickle BUILD may change one of ours after it is made (BUILD calls ``__setstate__``)."""

    __slots__ = ()

    def __setstate__(self, state):
        raise _Refused(f"the pickle sets the state of a {type(self).__name__.strip('_')}; a state dict never does")


@dataclass(frozen=True, eq=False)  # identity hash: hashing one never recurses into the file's data
class _StorageType(_Sealed):
    """torch.<X>Storage or torch.storage.UntypedStorage: only ever the 2nd item of a persistent id."""

    name: str
    dtype: str | None  # None: untyped bytes (the tensor says its dtype)


@dataclass(frozen=True, eq=False)  # identity hash: hashing one never recurses into the file's data
class _Dtype(_Sealed):
    """torch.<dtype>, the dtype argument of _rebuild_tensor_v3."""

    dtype: str


@dataclass(frozen=True, eq=False)  # identity hash: hashing one never recurses into the file's data
class Storage(_Sealed):
    """A storage the pickle refers to: its key, zip entry, element dtype (None: bytes) and byte size."""

    key: str
    entry: ZipEntry
    dtype: str | None
    nbytes: int


@dataclass(frozen=True, eq=False)  # identity hash: hashing one never recurses into the file's data
class TensorRef(_Sealed):
    """What a ``_rebuild_tensor`` call in the pickle describes; checked by ``_tensor_info``."""

    storage: object
    offset: object
    shape: object
    stride: object
    dtype: str | None
    extra: tuple  # requires_grad, backward_hooks, metadata: must be plain


class _StateDict(dict, _Sealed):
    """collections.OrderedDict as a state dict pickles it: a plain dict whose ``_metadata`` (per-module
    versions, set by BUILD) is dropped."""

    def __setstate__(self, state):
        if not isinstance(state, dict) or not set(state) <= {"_metadata"}:
            raise _Refused("the pickle sets attributes other than _metadata on an OrderedDict; a state dict never does")


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None, *rest):
    return TensorRef(storage, offset, size, stride, None, (requires_grad, hooks, metadata, *rest))


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None, *rest):
    if not isinstance(dtype, _Dtype):
        raise _Refused(f"_rebuild_tensor_v3 is given dtype {type(dtype).__name__}, not a torch dtype")
    return TensorRef(storage, offset, size, stride, dtype.dtype, (requires_grad, hooks, metadata, *rest))


def _rebuild_parameter(data, requires_grad, hooks):
    if not isinstance(data, TensorRef):
        raise _Refused(f"_rebuild_parameter wraps a {type(data).__name__}, not a tensor")
    return TensorRef(
        data.storage, data.offset, data.shape, data.stride, data.dtype, (*data.extra, requires_grad, hooks)
    )


def _allowed_globals() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): _StateDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", None),
        ("torch", "UntypedStorage"): _StorageType("UntypedStorage", None),
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, dtype)
    for torch_name, dtype in _TORCH_DTYPES.items():
        allowed[("torch", torch_name)] = _Dtype(dtype)
    return allowed


ALLOWED_GLOBALS = _allowed_globals()


def _refuse_global(module, name) -> _Refused:
    where = f"{module}.{name}" if isinstance(module, str) and isinstance(name, str) else repr((module, name))
    where = repr(where)[1:-1][:120]  # one printable line, whatever the strings hold
    if isinstance(name, str) and name.endswith("Storage") and module == "torch":
        return _Refused(f"the pickle names {where}: not a storage dtype resta_fast reads (complex, quantized ...)")
    return _Refused(
        f"the pickle imports {where}, which a state dict never needs, so nothing in it was imported or run "
        "(the file may be hostile); use a safetensors copy of the weights from a source you trust"
    )


def scan_opcodes(data: bytes) -> None:
    """Refuse a pickle by its opcodes alone, before anything is unpickled: the globals it names must be
    on the allow-list, no opcode may build objects from classes, memo indices must be ones a pickler
    writes (sequential, so a hostile index cannot make the unpickler allocate a huge memo), and no
    tuple may nest deeper than ``MAX_NESTING``.

    The last needs the unpickler's stack, modelled here as each item's tuple depth: hashing a tuple
    (a dict key, a frozenset item) recurses through nested tuples in C without a recursion check, so
    a key nested a million deep would crash the process instead of raising. Lists and dicts count
    as 0: they are unhashable, so hashing stops at them.

    Example:
        >>> scan_opcodes(pickle.dumps({"a": (1, 2.5)}, protocol=2))
        >>> try:
        ...     scan_opcodes(b"cos\\nsystem\\n(S'touch pwned'\\ntR.")
        ... except Exception as exc:
        ...     print(str(exc)[:37])
        the pickle imports os.system, which a
    """
    with warnings.catch_warnings():  # genops warns on odd escapes in text opcodes: the file's problem
        warnings.simplefilter("ignore")
        try:
            end = _scan(pickletools.genops(data))
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Refused(f"data.pkl is not a valid pickle ({_clip(str(exc), 100)}); the file is corrupt") from None
    if end + 1 != len(data):  # genops stops at STOP
        raise _Refused(f"data.pkl has {len(data) - end - 1} bytes after the pickle's end; the file is corrupt")


def _scan(ops) -> int:
    """``scan_opcodes`` over decoded opcodes; returns the position of the last (STOP)."""
    end = -1
    malformed = _Refused("data.pkl is not a valid pickle (its stack runs dry); the file is corrupt")
    stack: list[int] = []  # the tuple depth of each item
    marks: list[int] = []  # where each MARK is in ``stack``
    memo: dict[int, int] = {}
    for op, arg, pos in ops:
        end, name = pos, op.name
        if name in _REFUSED_OPCODES:
            raise _Refused(f"the pickle uses opcode {name}, which a state dict never needs; the file may be hostile")
        if name == "GLOBAL":
            module, _, attr = arg.partition(" ")
            if (module, attr) not in ALLOWED_GLOBALS:
                raise _refuse_global(module, attr)
        if name == "MARK":
            marks.append(len(stack))
            continue
        if name in _MEMO_PUTS or name == "MEMOIZE":
            slot = len(memo) if name == "MEMOIZE" else arg
            if not 0 <= slot <= len(memo) or not stack:
                raise _Refused(
                    f"the pickle stores memo slot {slot} after {len(memo)} slots; the file is corrupt or hostile"
                )
            memo[slot] = stack[-1]
            continue
        if name == "POP" and marks and marks[-1] == len(stack):  # POP drops a MARK when one is on top
            marks.pop()
            continue
        below: list[int] = []
        if pickletools.markobject in op.stack_before:  # [below..., mark, items since the mark]
            if not marks:
                raise malformed
            top = marks.pop()
            items, n_below = stack[top:], op.stack_before.index(pickletools.markobject)
            del stack[top:]
        else:
            items, n_below = [], len(op.stack_before)
        if n_below > len(stack):
            raise malformed
        if n_below:
            below = stack[-n_below:]
            del stack[-n_below:]
        if name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "FROZENSET", "EMPTY_TUPLE"):
            depth = 1 + max(items or below or [0])
            if depth > MAX_NESTING:
                raise _Refused(
                    f"the pickle nests tuples more than {MAX_NESTING} deep, which a state dict never does; the "
                    "file may be hostile (hashing such a key would overflow the stack)"
                )
            stack.append(depth)
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(arg, 0))
        elif name == "DUP":
            stack += below * 2
        elif name in ("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"):
            stack.append(below[0])  # the container (or the object BUILD sets) stays; mutable ones are 0
        else:
            stack += [0] * len(op.stack_after)
    return end


class _StateDictUnpickler(pickle.Unpickler):
    """The stdlib unpickler with every way out closed but the allowed globals and storage ids."""

    def __init__(self, data: bytes, storages):
        super().__init__(io.BytesIO(data))
        self._storages = storages  # key, storage type, numel -> Storage

    def find_class(self, module, name):
        found = ALLOWED_GLOBALS.get((module, name)) if isinstance(module, str) and isinstance(name, str) else None
        if found is None:
            raise _refuse_global(module, name)
        return found

    def persistent_load(self, pid):
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"persistent id {_clip(pid)} is not a torch storage reference")
        _, kind, key, location, numel = pid
        if not isinstance(kind, _StorageType) or type(key) is not str or type(location) is not str:
            raise _Refused(f"persistent id {_clip(pid)} is not a torch storage reference")
        if type(numel) is not int or numel < 0:
            raise _Refused(f"storage {key!r} has element count {_clip(numel)}; the file is corrupt")
        return self._storages(key, kind, numel)


def unpickle_state_dict(data: bytes, storages) -> dict:
    """The state dict a torch ``data.pkl`` describes, as {name: TensorRef}; raises ``_Refused``.

    Args:
        data: the pickle's bytes.
        storages: ``(key, storage type, numel) -> Storage`` (checks the key names a zip entry).
    """
    if len(data) > MAX_PICKLE_BYTES:
        raise _Refused(f"data.pkl is {len(data)} bytes, over the {MAX_PICKLE_BYTES}-byte cap; the file is corrupt")
    scan_opcodes(data)
    unpickler = _StateDictUnpickler(data, storages)
    try:
        obj = unpickler.load()
    except _Refused:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of a hostile pickle is one clean refusal
        raise _Refused(
            f"data.pkl cannot be read as a state dict ({type(exc).__name__}: {_clip(str(exc), 100)})"
        ) from None
    if not isinstance(obj, dict):
        raise _Refused(f"data.pkl holds {type(obj).__name__!r}, not a state dict of tensors; save model.state_dict()")
    for name, value in obj.items():
        if type(name) is not str:
            raise _Refused(f"state dict key {_clip(name)} is not a string")
        if not isinstance(value, TensorRef):
            raise _Refused(
                f"state dict entry {_clip(name)} is a {type(value).__name__}, not a tensor (a training checkpoint?); "
                "save model.state_dict() on its own"
            )
    return obj


# --- tensors -------------------------------------------------------------------------------------


def _is_ints(value) -> bool:
    return isinstance(value, (tuple, list)) and all(type(v) is int for v in value)


def _tensor_info(name: str, ref: TensorRef) -> TensorInfo:
    """Check one tensor against its storage; its absolute byte range in the file. Raises ``_Refused``."""

    def bad(msg: str) -> _Refused:
        return _Refused(f"tensor {_clip(name, 200)}: {msg}")

    if name == "__metadata__":
        raise bad("this name is reserved by safetensors; rename the tensor")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise bad("the name is not valid UTF-8 (a lone surrogate); the file is corrupt") from None
    storage = ref.storage
    if not isinstance(storage, Storage):
        raise bad(f"its storage is a {type(storage).__name__}, not a storage of the archive")
    requires_grad, hooks, metadata, *rest = ref.extra
    if type(requires_grad) is not bool or not (isinstance(hooks, dict) and not hooks) or metadata not in (None, {}):
        raise bad("it carries backward hooks or tensor metadata (a conjugate or negative view?); " + RESAVE)
    if rest and not (len(rest) == 2 and type(rest[0]) is bool and isinstance(rest[1], dict) and not rest[1]):
        raise bad("it is rebuilt with extra arguments a state dict does not have; " + RESAVE)
    dtype = ref.dtype or storage.dtype or "U8"
    if ref.dtype is not None and storage.dtype is not None and ref.dtype != storage.dtype:
        raise bad(f"dtype {ref.dtype} does not match its {storage.dtype} storage; the file is corrupt")
    shape, stride, offset = ref.shape, ref.stride, ref.offset
    if not _is_ints(shape) or len(shape) > MAX_RANK or not all(0 <= d < 2**62 for d in shape):
        raise bad(f"shape must be at most {MAX_RANK} non-negative integers, got {_clip(shape)}")
    if not _is_ints(stride) or len(stride) != len(shape):
        raise bad(f"stride {_clip(stride)} does not fit shape {list(shape)}; the file is corrupt")
    if type(offset) is not int or offset < 0:
        raise bad(f"storage offset must be a non-negative integer, got {_clip(offset)}")
    if any(s < 0 for s in stride):
        raise bad(f"negative stride {list(stride)}; " + RESAVE)
    numel = 1
    for d in shape:
        numel *= d
    if numel:
        expected = 1
        for d, s in zip(reversed(shape), reversed(stride), strict=True):
            if d != 1 and s != expected:
                raise bad(
                    f"stride {list(stride)} is not row-major contiguous for shape {list(shape)} (a transposed or "
                    "sliced view); resta_fast streams contiguous tensors only: save t.contiguous(), or " + RESAVE
                )
            expected *= d
    itemsize = ITEMSIZE[dtype]
    lo, nbytes = offset * itemsize, numel * itemsize
    if lo + nbytes > storage.nbytes:
        raise bad(
            f"storage offset {offset} + shape {list(shape)} x {dtype} needs {lo + nbytes} bytes but storage "
            f"{storage.key!r} holds {storage.nbytes}; the file is corrupt"
        )
    start = storage.entry.start + lo
    return TensorInfo(name, dtype, tuple(shape), start, start + nbytes)


def _check_overlaps(infos: list[TensorInfo]) -> None:
    """Refuse a file in which one byte is named by more than MAX_ALIASES tensors.

    Tensors sharing bytes are harmless to a reader that never writes its inputs (tied weights do it,
    and so does a view saved beside its base), but each name is its own copy in a safetensors output:
    a small file naming the same bytes thousands of times would ask for an output thousands of times
    its size. A sweep over the byte ranges finds the deepest overlap.
    """
    events = sorted(
        [(i.start, 1, i.name) for i in infos if i.nbytes] + [(i.end, -1, i.name) for i in infos if i.nbytes]
    )
    depth = 0
    for _, step, name in events:  # at one offset, ends (-1) sort before starts: touching ranges do not overlap
        depth += step
        if depth > MAX_ALIASES:
            raise _Refused(
                f"more than {MAX_ALIASES} tensors name the same bytes (at tensor {_clip(name)}); that is not a "
                "checkpoint but a way to blow up the output"
            )


def _archive_prefix(entries: dict[str, ZipEntry]) -> str:
    pickles = [n[: -len("/data.pkl")] for n in entries if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        what = f"{len(pickles)} (<name>/data.pkl)" if pickles else "no <name>/data.pkl"
        raise _Refused(f"the zip archive holds {what}; it is not one torch.save checkpoint ({RESAVE})")
    return pickles[0]


def read_state_dict(fd: int, file_size: int) -> tuple[bytes, dict[str, TensorInfo]]:
    """(data.pkl's bytes, {name: TensorInfo} in state-dict order) of the torch zip checkpoint open on ``fd``.
    Raises ``_Refused``."""
    head = _pread(fd, 4, 0)
    if head != _LOCAL:
        if head[:1] == b"\x80":  # a pickle's PROTO opcode: torch.save(..., _use_new_zipfile_serialization=False)
            raise _Refused(
                "this is the legacy (pre-1.6, non-zip) torch format, which cannot be read without running its "
                f"pickle; {RESAVE} (the conversion needs torch.load: use weights_only=True on torch >= 2.6)"
            )
        raise _Refused(f"not a zip-format torch checkpoint (it does not start with a zip header); {RESAVE}")
    entries = read_zip(fd, file_size)
    prefix = _archive_prefix(entries)
    order = entries.get(f"{prefix}/byteorder")
    if order is not None:
        value = _pread(fd, min(order.size, 16), order.start)
        if value != b"little":
            raise _Refused(f"the tensors are stored {value[:16]!r}-endian; re-save it on a little-endian machine")
    pkl = entries[f"{prefix}/data.pkl"]
    if pkl.size > MAX_PICKLE_BYTES:
        raise _Refused(f"data.pkl is {pkl.size} bytes, over the {MAX_PICKLE_BYTES}-byte cap; the file is corrupt")
    data = _exact(fd, pkl.size, pkl.start, "data.pkl")
    seen: dict[str, Storage] = {}

    def storage(key: str, kind: _StorageType, numel: int) -> Storage:
        entry = entries.get(f"{prefix}/data/{key}")
        if entry is None:
            raise _Refused(
                f"the pickle refers to storage {_clip(key)}, which is not in the archive; the file is corrupt"
            )
        nbytes = numel * (ITEMSIZE[kind.dtype] if kind.dtype else 1)
        if nbytes != entry.size:
            raise _Refused(
                f"storage {key!r} is {numel} x {kind.name} = {nbytes} bytes but its zip entry holds {entry.size}; "
                "the file is corrupt"
            )
        found = seen.setdefault(key, Storage(key, entry, kind.dtype, nbytes))
        if (found.dtype, found.nbytes) != (kind.dtype, nbytes):
            raise _Refused(f"storage {key!r} is read as two different types; the file is corrupt")
        return found

    state = unpickle_state_dict(data, storage)
    infos = [_tensor_info(name, ref) for name, ref in state.items()]
    dtypes: dict[str, str] = {}
    for info, ref in zip(infos, state.values(), strict=True):
        if dtypes.setdefault(ref.storage.key, info.dtype) != info.dtype:  # torch.save refuses to write this
            raise _Refused(
                f"tensor {_clip(info.name)} reads storage {ref.storage.key!r} as {info.dtype}, another tensor as "
                f"{dtypes[ref.storage.key]}; the file is corrupt"
            )
    _check_overlaps(infos)
    return data, {info.name: info for info in infos}


class TorchBinFile(SafetensorsFile):
    """One validated zip-format torch checkpoint, read like a safetensors file.

    Everything but the parsing is ``SafetensorsFile``'s: the same mmap views, pread, prefetch,
    page release and change checks over the absolute byte ranges in ``tensors``.
    ``header_bytes`` is ``data.pkl`` (what describes the tensors, for fingerprints) and
    ``metadata`` is ``{"format": "pt"}``: the tensors are PyTorch's by construction.

    Example:
        >>> TorchBinFile("ft/pytorch_model.bin").view("lm_head.weight").dtype  # doctest: +SKIP
        torch.bfloat16
    """

    def __init__(self, path: str | os.PathLike):  # noqa: D107 - not SafetensorsFile's: the header is not JSON
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise CheckpointError(
                f"{self.path}: cannot read ({exc.strerror}); check the path and permissions"
            ) from None
        try:
            self.stat = os.fstat(fd)
            self.size = self.stat.st_size
            self.header_bytes, self.tensors = read_state_dict(fd, self.size)
        except _Refused as exc:
            raise CheckpointError(f"{self.path}: {exc}") from None
        except OSError as exc:
            raise CheckpointError(
                f"{self.path}: cannot read ({exc.strerror}); check the path and permissions"
            ) from None
        finally:
            os.close(fd)
        self.metadata = {"format": "pt"}
        self._mmap = None
        self._fd = None
        self._fd_lock = threading.Lock()
