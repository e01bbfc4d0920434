"""What an input *is*: an identity taken from its content, the same on every machine.

Every output records its inputs by identity, never by where they lay: the
weight files' provenance, ``resta_fast.json``, the model card, a batch resume
and ``verify`` all use what this module computes, so the same input bytes give
the same output bytes whether they sit in ``/data/ft``, a node-local copy with
fresh mtimes, or a Hugging Face cache snapshot.

One weight file's identity is ``{bytes, header_sha256, sample_sha256}``:

- ``bytes`` and ``header_sha256``: its size and its safetensors header (names,
  dtypes, shapes, offsets, metadata). Two fine-tunes of one architecture have
  equal headers, so a header alone cannot tell them apart;
- ``sample_sha256``: sha256 over sampled windows of the tensor data
  (``sample_windows``): for every tensor its first, middle and last
  ``WINDOW`` bytes, and one window every ``STRIDE`` bytes of the data region.
  The windows depend on the header only, so the same bytes always sample the
  same places. About 3.8 MB (937 windows) is read for a 2.4 GB model, once, when
  the input is opened (docs/identity.md has the measurements and the collision
  argument).

A directory's identity maps each weight file's name to that; an adapter's adds
the full sha256 of its ``adapter_config.json``. File times, paths, user and host
names are never part of it. ``io.reader`` still compares size, inode and mtime
to notice a file that changes *during* a run, which is a different question.

Where an input came from is recorded beside its identity, in the report only
(``origin``): its directory's name, its Hub id and commit when it came from the
Hub, and its absolute path only when the user asks (``--record-paths``).

Example:
    >>> same({"a.safetensors": {"bytes": 9, "header_sha256": "h", "sample_sha256": "s"}},
    ...      {"a.safetensors": {"bytes": 9, "header_sha256": "h", "sample_sha256": "s", "mtime_ns": 1}})
    True
    >>> short_id({"a.safetensors": {"bytes": 9}})
    '061f8fc97949872e'
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from resta_fast.errors import CheckpointError

if TYPE_CHECKING:
    from resta_fast.io.reader import SafetensorsFile

WINDOW = 4096  # one page: reading less costs the same
STRIDE = 8 << 20  # plus one window every 8 MiB of data, so a change inside a big tensor is seen too
# Keys an identity may hold that say nothing about content (old outputs recorded mtime_ns).
NOT_CONTENT = ("mtime_ns",)
# The keys two identities must share to be compared at all.
REQUIRED = ("bytes", "header_sha256")
_LFS_BLOB = re.compile(r"[0-9a-f]{64}")


def sample_windows(f: SafetensorsFile) -> list[tuple[int, int]]:
    """The sorted ``[start, end)`` byte ranges (they may overlap) of ``f`` that ``sample_sha256`` reads.

    Example:
        >>> class F:  # a stand-in with one 10 KiB tensor at offset 100
        ...     tensors = {"w": type("I", (), {"start": 100, "end": 10340})()}
        ...     size = 10340
        >>> sample_windows(F())
        [(100, 4196), (3172, 7268), (6244, 10340)]
    """
    starts: set[tuple[int, int]] = set()
    lo_data = min((t.start for t in f.tensors.values()), default=f.size)
    for t in f.tensors.values():
        if t.end <= t.start:
            continue
        for at in (t.start, (t.start + t.end - WINDOW) // 2, t.end - WINDOW):
            s = max(t.start, at)
            starts.add((s, min(t.end, s + WINDOW)))
    for s in range(lo_data, f.size, STRIDE):
        starts.add((s, min(f.size, s + WINDOW)))
    return sorted(starts)


def sample_sha256(f: SafetensorsFile) -> str:
    """sha256 of ``f``'s sampled windows, each prefixed by its offset (pread: no mapping, no mtime)."""
    h = hashlib.sha256()
    fd = os.open(f.path, os.O_RDONLY)
    try:
        for start, end in sample_windows(f):
            data = os.pread(fd, end - start, start)
            if len(data) != end - start:
                raise CheckpointError(
                    f"{f.path}: the file ends before byte {end}; it was truncated after it was opened, rerun once "
                    "it is complete"
                )
            h.update(start.to_bytes(8, "little"))
            h.update(data)
    finally:
        os.close(fd)
    return h.hexdigest()


def file_identity(f: SafetensorsFile) -> dict:
    """``{bytes, header_sha256, sample_sha256}`` of one safetensors file."""
    return {
        "bytes": f.size,
        "header_sha256": hashlib.sha256(f.header_bytes).hexdigest(),
        "sample_sha256": sample_sha256(f),
    }


def config_identity(path: Path) -> dict:
    """A small JSON file (an adapter's config) identified by its full sha256."""
    return {"sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def content_only(identity: dict) -> dict:
    """``identity`` without the keys that say nothing about content (an old output's mtimes)."""
    return {
        name: {k: v for k, v in entry.items() if k not in NOT_CONTENT} if isinstance(entry, dict) else entry
        for name, entry in identity.items()
    }


def same(recorded: dict, found: dict) -> bool:
    """Whether two identities name the same content.

    Keys only one side has are not compared (an output written before
    ``sample_sha256`` existed still matches its inputs by size and header), but
    every file must be on both sides and share the ``REQUIRED`` keys or a sha256.
    """
    if not isinstance(recorded, dict) or not isinstance(found, dict) or set(recorded) != set(found):
        return False
    found = content_only(found)
    for name, want in content_only(recorded).items():
        got = found[name]
        if not isinstance(want, dict) or not isinstance(got, dict):
            return False
        shared = set(want) & set(got)
        if not (set(REQUIRED) <= shared or "sha256" in shared):
            return False
        if any(want[k] != got[k] for k in shared):
            return False
    return True


def changed_files(recorded: dict, found: dict) -> list[str]:
    """The file names whose identity differs (added and removed files included), sorted.

    Example:
        >>> changed_files({"a": {"bytes": 1, "header_sha256": "x"}}, {"a": {"bytes": 2, "header_sha256": "x"}})
        ['a']
    """
    recorded, found = recorded or {}, found or {}
    return sorted(n for n in set(recorded) | set(found) if not same({n: recorded.get(n)}, {n: found.get(n)}))


def short_id(identity: dict) -> str:
    """16 hex digits naming an identity (the model card and messages show it)."""
    canonical = json.dumps(content_only(identity), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def lfs_sha256(path: Path, names) -> dict[str, str]:
    """{file: sha256} the Hub cache already knows for a snapshot's files, without reading them.

    A Hub cache snapshot links each LFS file to ``blobs/<sha256 of its content>``;
    files that are not such links (a plain local directory) are left out.
    """
    found = {}
    for name in names:
        p = Path(path) / name if Path(path).is_dir() else Path(path)
        try:
            target = os.readlink(p)
        except OSError:
            continue
        blob = os.path.basename(target)
        if _LFS_BLOB.fullmatch(blob) and os.path.basename(os.path.dirname(target)) == "blobs":
            found[name] = blob
    return found


def origin(path, hub=None, *, record_path: bool = False) -> dict:
    """Where an input came from, for the report and the card (not part of its identity).

    Args:
        path: the local file or directory that was read.
        hub: its ``io.hub.ResolvedInput`` when it came from the Hub, else None.
        record_path: also record the absolute local path (``--record-paths``).
    Returns:
        ``{name}`` (the directory's or file's name), plus ``hub: {repo_id, revision,
        commit}`` and ``lfs_sha256`` (``lfs_sha256``) for a Hub input, plus ``path`` when asked.

    Example:
        >>> origin("/data/customers/acme-ft")
        {'name': 'acme-ft'}
    """
    p = Path(path)
    entry: dict = {"name": hub.repo_id.split("/")[-1] if hub is not None and hub.is_hub else p.name}
    if hub is not None and hub.is_hub:
        entry["hub"] = hub.provenance()
        names = [c.name for c in p.iterdir()] if p.is_dir() else [p.name]
        lfs = lfs_sha256(p, sorted(n for n in names if n.endswith((".safetensors", ".bin"))))
        if lfs:
            entry["lfs_sha256"] = lfs
    if record_path:
        entry["path"] = str(p.absolute())
    return entry
