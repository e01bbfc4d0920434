"""sha256 of whole files (side files, the index, resume and verify checks); no torch here."""

from __future__ import annotations

import hashlib

BLOCK_BYTES = 8 << 20


def sha256_file(path) -> str:
    """sha256 of a whole file, read in 8 MB blocks.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile() as f:
        ...     _ = f.write(b"abc"); f.flush()
        ...     sha256_file(f.name)
        'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK_BYTES), b""):
            h.update(block)
    return h.hexdigest()
