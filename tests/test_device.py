"""pipeline/device.py: what the engine asks of a device, held to one contract on every device
here. The asynchronous stand-in (tests/device_standin.py) runs everywhere, with the C++ kernel
and the torch reference; CUDA, with the Triton kernel, runs where a GPU is (the ``gpu`` marker,
so benchmarks/gpu_session.sh runs it). Each case goes through ``compute.Compute``, which asks
for the waits, and must give the host path's bytes and non-finite count."""

import numpy as np
import pytest
import torch
from device_standin import StandinDevice

from resta_fast.kernels import BackendUnavailable, load_backend, reference
from resta_fast.pipeline.compute import Compute
from resta_fast.pipeline.device import CudaDevice, open_device

STORAGE = {"bf16": np.uint16, "f16": np.float16, "f32": np.float32}  # host arrays: BF16 as its bits
TORCH = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


@pytest.fixture(params=["standin-torch", "standin-cpp", pytest.param("cuda-triton", marks=pytest.mark.gpu)])
def on_device(request):
    """(device, kernel) for one kind of device."""
    where, backend = request.param.split("-")
    try:
        kernel = reference if backend == "torch" else load_backend(backend)
    except BackendUnavailable as exc:
        pytest.skip(f"{backend} unavailable: {exc}")
    if where == "cuda":
        yield CudaDevice("cuda"), kernel
        return
    dev = StandinDevice(seed=7, delay=0.001, delays={"d2h": (0.001, 0.003)})  # downloads lag: memory reuse shows
    yield dev, kernel
    dev.close()
    assert not dev.races and not dev.failures, (dev.races, dev.failures)


def host_array(seed: int, n: int, dtype: str, specials: bool = False) -> np.ndarray:
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.05
    if specials:
        x[1], x[n // 2], x[-1] = float("inf"), float("nan"), float("-inf")
    t = x.to(TORCH[dtype])
    return (t.view(torch.int16) if dtype == "bf16" else t).numpy().view(STORAGE[dtype]).copy()


def on_host(out, f, a, u, b, **kw):
    """The host path's (bytes, non-finite count): the torch reference on host arrays."""
    _, bad = Compute(reference).patch(out, f, a, u, b, **kw)
    return out.tobytes(), bad


def queue(c: Compute, out: np.ndarray, *ins, **kw):
    """Upload the host arrays among ``ins`` (device arrays and None pass) and queue the patch:
    its download's event."""
    up = [c.upload(x) if isinstance(x, np.ndarray) else x for x in ins]
    landed, bad = c.patch(out, *up, **{"beta": 0.5, "p": 0.0, "seed": 0, "offset": 0, "counter": None, **kw})
    assert bad is None, "a device counts on the device, never per chunk on the host"
    return landed


def test_device_names():
    assert open_device("cpu") is None
    with pytest.raises(ValueError, match="cuda:N"):
        open_device("tpu")


@pytest.mark.parametrize(
    "ins, out_dtype, vector, dare",
    [
        ("bf16", "bf16", False, None),
        ("bf16", "bf16", True, 0.3),
        ("f16", "f32", False, 0.5),
        ("f32", "bf16", True, None),
    ],
)
def test_a_chunk_on_the_device_is_the_host_chunk(on_device, ins, out_dtype, vector, dare):
    dev, kernel = on_device
    n = 1029  # not a multiple of any block
    f = host_array(1, n, ins, specials=True)
    a, u = host_array(2, n, ins), None if vector else host_array(3, n, ins)
    b = host_array(4, n, ins) if dare else None
    kw = dict(beta=0.75, p=dare or 0.0, seed=12345, offset=3 * n)
    want, want_bad = on_host(np.empty(n, STORAGE[out_dtype]), f, a, u, b, **kw)
    c = Compute(kernel, dev)
    counter = c.new_counter()
    out = np.empty(n, STORAGE[out_dtype])
    queue(c, out, f, a, u, b, counter=counter, **kw).synchronize()
    c.synchronize()  # the counter is read next
    assert out.tobytes() == want
    assert int(counter) == want_bad and want_bad > 0


def test_chunks_in_a_row_each_land_whole(on_device):
    """Each chunk's output memory is freed as soon as it is queued; the next chunks reuse it
    while its download may still be pending."""
    dev, kernel = on_device
    c = Compute(kernel, dev)
    outs, wants, events = [], [], []
    for k in range(6):
        ins = [host_array(10 * k + j, 300, "bf16") for j in range(3)]
        wants.append(on_host(np.empty(300, np.uint16), *ins, None, beta=0.5, p=0.0, seed=0, offset=0)[0])
        outs.append(np.empty(300, np.uint16))
        events.append(queue(c, outs[-1], *ins, None, counter=c.new_counter()))
    for out, want, landed in zip(outs, wants, events, strict=True):
        landed.synchronize()
        assert out.tobytes() == want


def test_a_kept_tensor_is_read_by_the_kernel_stream(on_device):
    """``Compute.keep`` (the device cache) copies on another stream; slices of it feed kernels."""
    dev, kernel = on_device
    c = Compute(kernel, dev)
    whole = host_array(5, 2000, "bf16")
    kept = c.keep(whole)
    f, u = host_array(6, 700, "bf16"), host_array(7, 700, "bf16")
    want, _ = on_host(np.empty(700, np.uint16), f, whole[900:1600], u, None, beta=1.5, p=0.0, seed=0, offset=0)
    out = np.empty(700, np.uint16)
    queue(c, out, f, kept[900:1600], u, None, beta=1.5, counter=c.new_counter()).synchronize()
    assert out.tobytes() == want


def test_a_staged_buffer_is_reusable_after_the_inputs_done_event(on_device):
    """The staging pool hands a buffer out again after ``inputs_done``'s event: by then the
    upload has copied it, so overwriting it changes nothing downstream."""
    dev, kernel = on_device
    c = Compute(kernel, dev)
    staged = [host_array(20 + j, 500, "f32") for j in range(3)]
    want, _ = on_host(np.empty(500, np.float32), *staged, None, beta=0.5, p=0.0, seed=0, offset=0)
    out = np.empty(500, np.float32)
    landed = queue(c, out, *staged, None, counter=c.new_counter())
    c.inputs_done().synchronize()
    for x in staged:
        x.fill(np.nan)  # a reader thread refilling the buffer
    landed.synchronize()
    assert out.tobytes() == want
