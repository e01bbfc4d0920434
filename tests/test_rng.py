"""docs/spec.md §3: the Philox stream and per-tensor seeds."""

import numpy as np
import pytest
import torch
from elementwise import philox, uniform_at

from resta_fast import rng


def test_philox_known_answer_vector():
    zero = torch.zeros(1, dtype=torch.int64)
    words = rng.philox4x32(zero, zero, zero, zero, 0, 0)
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert philox((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_philox_random123_known_answer_all_ones():
    # Random123 kat_vectors: philox4x32_10, counter = key = all 0xffffffff.
    m = 0xFFFFFFFF
    assert philox((m, m, m, m), (m, m)) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


@pytest.mark.parametrize("seed", [0, 1, 0xDEADBEEF, 2**63 + 12345, 2**64 - 1])
@pytest.mark.parametrize("offset", [0, 3, 2**31 - 2, 2**32 - 3, 2**34 + 1])
def test_uniform_matches_elementwise(seed, offset):
    got = rng.uniform(seed, offset, 9)
    want = [uniform_at(seed, offset + j) for j in range(9)]
    assert got.dtype == torch.float32
    assert np.array_equal(got.numpy(), np.array(want, dtype=np.float32))


def test_uniform_is_chunking_invariant():
    whole = rng.uniform(77, 5, 1000)
    parts = torch.cat([rng.uniform(77, 5 + lo, n) for lo, n in ((0, 3), (3, 1), (4, 500), (504, 496))])
    assert torch.equal(whole, parts)
    assert float(whole.min()) >= 0.0 and float(whole.max()) < 1.0


def test_tensor_seed_definition():
    # fnv1a64("a") is the published FNV-1a test vector.
    assert rng.fnv1a64(b"") == 0xCBF29CE484222325
    assert rng.fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    # splitmix64 from state 0: first output of the reference generator.
    assert rng.splitmix64(0) == 0xE220A8397B1DCDAF
    assert rng.tensor_seed(7, "w") == rng.splitmix64(7 ^ rng.fnv1a64(b"w"))
    assert rng.tensor_seed(7, "w") != rng.tensor_seed(7, "v")
    with pytest.raises(ValueError):
        rng.tensor_seed(-1, "w")
