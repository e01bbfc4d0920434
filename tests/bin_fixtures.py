"""Torch ``.bin`` checkpoints for test_torch_bin.py and test_convert.py: real ``torch.save`` files in
transformers' layout, and hand-built zip archives and pickles for the hostile ones."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file

from resta_fast.io.checkpoint import INDEX_NAME

BIN_INDEX = "pytorch_model.bin.index.json"


def save_bin_model(path: Path, tensors: dict[str, torch.Tensor], *, shards: int = 1, config: dict | None = None):
    """What transformers' ``save_pretrained(safe_serialization=False)`` writes: ``pytorch_model.bin``, or
    round-robin shards ``pytorch_model-0000K-of-0000N.bin`` and their index."""
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if shards == 1:
        torch.save(tensors, path / "pytorch_model.bin")
        return path
    names, weight_map = list(tensors), {}
    for s in range(shards):
        fname = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: tensors[n] for n in names[s::shards]}, path / fname)
        weight_map.update({n: fname for n in names[s::shards]})
    (path / BIN_INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return path


def as_bin(src: Path, dst: Path) -> Path:
    """The safetensors model directory ``src`` (tests/checkpoints.py) as ``.bin`` files in ``dst``: the same
    tensors in the same shards and order, the same config."""
    dst.mkdir(parents=True)
    shutil.copyfile(src / "config.json", dst / "config.json")
    if not (src / INDEX_NAME).is_file():
        torch.save(load_file(str(src / "model.safetensors")), dst / "pytorch_model.bin")
        return dst
    index = json.loads((src / INDEX_NAME).read_text())
    weight_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        name = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
        part = load_file(str(src / shard))
        torch.save(part, dst / name)
        weight_map.update({n: name for n in part})
    (dst / BIN_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def output_tensors(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output directory, whatever its shards."""
    found = {}
    for f in sorted(out.glob("*.safetensors")):
        found.update(load_file(str(f)))
    return found


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.reshape(-1).contiguous().view(torch.uint8).equal(b.reshape(-1).contiguous().view(torch.uint8))
    )


# --- hand-built pickles ----------------------------------------------------------------------------


def frag(obj) -> bytes:
    """The protocol-2 opcodes of a plain value (str, int, tuple of those), without PROTO, STOP or memo."""
    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=2)
    p.fast = True  # no memo: fragments can be pasted together
    p.dump(obj)
    return buf.getvalue()[2:-1]


def stack_global(module: str, name: str) -> bytes:
    return frag(module) + frag(name) + b"\x93"  # STACK_GLOBAL (protocol 4), any strings


def call(module: str, name: str, *args) -> bytes:
    """Opcodes that look up ``module.name`` and call it with ``args`` (what a malicious __reduce__ pickles)."""
    return stack_global(module, name) + frag(tuple(args)) + b"R"


def tensor_opcodes(
    storage="FloatStorage", key="0", numel=4, offset=0, shape=(2, 2), stride=(2, 1), dtype=None, rebuild=None
) -> bytes:
    """One ``_rebuild_tensor_v2`` call as torch.save writes it (``dtype``: ``_v3`` with an untyped storage)."""
    module = "torch.storage" if storage == "UntypedStorage" else "torch"
    pid = b"(" + frag("storage") + stack_global(module, storage) + frag(key) + frag("cpu") + frag(numel) + b"t"
    args = (
        pid
        + b"Q"
        + frag(offset)
        + frag(tuple(shape))
        + frag(tuple(stride))
        + b"\x89"
        + call("collections", "OrderedDict")
    )
    if dtype is not None:
        args += stack_global("torch", dtype)
    fn = rebuild or ("_rebuild_tensor_v3" if dtype is not None else "_rebuild_tensor_v2")
    return stack_global("torch._utils", fn) + b"(" + args + b"tR"


def state_dict_pickle(items: dict[str, bytes], *, protocol: int = 4) -> bytes:
    """A state dict pickle whose values are the given opcodes (``tensor_opcodes``, ``call`` ...)."""
    body = b"".join(frag(name) + value for name, value in items.items())
    return bytes([0x80, protocol]) + call("collections", "OrderedDict") + b"(" + body + b"u."


# --- hand-built zip archives -----------------------------------------------------------------------


def write_zip(path: Path, members: list[dict]) -> Path:
    """A zip archive with full control of each member: ``name``, ``data``, ``method`` (8: deflate it),
    ``usize``/``csize`` (claimed sizes), ``local_name`` (the name in the local header) and ``zip64``
    (sizes and offset in a zip64 extra field, ``zip64_bytes`` of it)."""
    out, central = bytearray(), bytearray()
    for m in members:
        name = m["name"].encode()
        data = m["data"]
        method = m.get("method", 0)
        payload = zlib.compress(data)[2:-4] if method == 8 else data
        crc = zlib.crc32(data)
        csize, usize = m.get("csize", len(payload)), m.get("usize", len(data))
        local_name = m.get("local_name", m["name"]).encode()
        offset = len(out)
        out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, method, 0, 0, crc, csize, usize, len(local_name), 0)
        out += local_name + payload
        extra = b""
        if m.get("zip64"):  # what a > 4 GiB torch.save writes: sizes and offset in a zip64 extra field
            extra = struct.pack("<HHQQQ", 1, 24, usize, csize, offset)[: m.get("zip64_bytes", 28)]
            csize = usize = offset = 0xFFFFFFFF
        fields = (20, 20, 0, method, 0, 0, crc, csize, usize, len(name), len(extra), 0, 0, 0, 0, offset)
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", *fields) + name + extra
    cd_offset = len(out)
    out += central
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(members), len(members), len(central), cd_offset, 0)
    path.write_bytes(bytes(out))
    return path


def torch_zip(path: Path, pickle_bytes: bytes, storages: dict[str, bytes], *, prefix="archive", **member_kw) -> Path:
    """A torch.save-shaped archive: ``prefix/data.pkl``, ``prefix/data/<key>``, ``prefix/byteorder``.
    ``member_kw``: {storage key: extra member fields} (e.g. ``{"0": {"method": 8}}``)."""
    members = [{"name": f"{prefix}/data.pkl", "data": pickle_bytes}]
    for key, data in storages.items():
        members.append({"name": f"{prefix}/data/{key}", "data": data, **member_kw.get(key, {})})
    members.append({"name": f"{prefix}/byteorder", "data": b"little"})
    return write_zip(path, members)


def members(path: Path) -> dict[str, bytes]:
    """The stored members of a zip (to rebuild a torch.save file with changes)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        return {i.filename: z.read(i) for i in z.infolist()}


def nothing_left(out: Path) -> bool:
    """No output and no temporary sibling of it."""
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith("." + out.name)]


class Payload:
    """An object whose unpickling calls ``fn(*args)``: what a malicious checkpoint carries."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def touch_command(marker: Path) -> str:
    return f"touch {os.fspath(marker)}"
