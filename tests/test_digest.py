"""sha256 of whole files (resta_fast/io/digest.py), across its block boundaries: the
digests that resume and `verify` compare must be hashlib's over the whole file."""

import hashlib

import pytest

from resta_fast.io import digest


@pytest.mark.parametrize("size", [0, 1, 7, 8, 9, 16, 8 * 5 + 3])
def test_sha256_file_is_hashlib_of_the_whole_file_at_every_block_boundary(tmp_path, monkeypatch, size):
    monkeypatch.setattr(digest, "BLOCK_BYTES", 8)  # so a few bytes cross several blocks
    data = bytes((i * 37 + 11) % 256 for i in range(size))
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert digest.sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert digest.sha256_file(str(path)) == hashlib.sha256(data).hexdigest()  # a str path too
