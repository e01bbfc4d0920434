"""The one streaming engine on a CUDA device: the same bytes as the CPU path, one
fused pass for a group, shared inputs cached in device memory. Skipped without CUDA
(tests/conftest.py); tests/test_engine.py runs the GPU configuration on CPU buffers, and
tests/test_device_standin.py on an asynchronous stand-in for the device (docs/gpu.md)."""

import pytest
from engine_fixtures import engine_models, plan_and_inputs, run

from resta_fast import api
from resta_fast.pipeline import compute


@pytest.fixture()
def models(tmp_path):
    return engine_models(tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("dare", [None, 0.3])
def test_gpu_pipeline_matches_cpu(tmp_path, models, dare):
    ft, al, un = models
    cpu_out, gpu_out = tmp_path / "cpu", tmp_path / "gpu"
    api.patch(ft, cpu_out, aligned=al, unaligned=un, beta=0.5, dare=dare, seed=2, backend="torch", fsync=False)
    api.patch(
        ft, gpu_out, aligned=al, unaligned=un, beta=0.5, dare=dare, seed=2, backend="triton", device="cuda", fsync=False
    )
    names = sorted(p.name for p in cpu_out.glob("*.safetensors"))
    assert names and names == sorted(p.name for p in gpu_out.glob("*.safetensors"))
    for name in names:
        assert (cpu_out / name).read_bytes() == (gpu_out / name).read_bytes()


@pytest.mark.gpu
def test_gpu_group_and_device_cache_match_cpu(tmp_path, models):
    from resta_fast.kernels import load_backend

    plan, inputs = plan_and_inputs(*models)
    (ref,) = run(tmp_path, "cpu", plan, inputs)
    cache = compute.DeviceCache("cuda")
    for k in range(2):
        jobs = run(tmp_path, f"gpu{k}_", plan, inputs, n=3, kernel=load_backend("triton"), device="cuda", cache=cache)
        assert all(job.stats.sha256 == ref.stats.sha256 for job in jobs)
    assert cache.hits > 0
    held = list(cache._tensors.values())
    assert held and all(t.is_cuda for t in held), "the cache must hold the shared inputs in device memory"
