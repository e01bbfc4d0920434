"""sha256 of whole files (side files, the index, resume and verify checks); no torch here."""

from __future__ import annotations

import hashlib

BLOCK_BYTES = 8 << 20


def sha256_file(path) -> str:
    """sha256 of a whole file, read in 8 MB blocks.

    Example:
        >>> sha256_file("out/model.safetensors")  # doctest: +SKIP
        '3f7c...'
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK_BYTES), b""):
            h.update(block)
    return h.hexdigest()
