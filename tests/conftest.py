"""Shared pytest setup for every test file.

- Tests marked ``gpu`` skip cleanly when there is no CUDA device.
- ``one_thread``: torch on one thread for a test (tiny models: thread start-up
  costs more than the maths; 2 threads measured 5x slower than 1 on the CI box).
- Without CUDA, Triton kernels run through its CPU interpreter. TRITON_INTERPRET
  is read when triton (and each @triton.jit function) is first imported, so it is
  set here, before any test module can import triton.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        # The marker, not ``"gpu" in item.keywords``: keywords also hold the names of the
        # directories above the test, so a clone in a folder named gpu skipped every test.
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
