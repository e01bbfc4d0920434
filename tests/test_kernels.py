"""Backend choice (resta_fast/kernels/__init__.py): ``auto`` falls back to the next
backend and says so once; a backend asked for by name raises its own load error."""

import sys
import warnings

import pytest

from resta_fast import kernels
from resta_fast.kernels import BackendUnavailable, choose_backend, cpp, load_backend, reference


@pytest.fixture
def no_native(monkeypatch):
    monkeypatch.setattr(cpp, "_native", None)
    monkeypatch.setitem(sys.modules, "resta_fast._C", None)  # as if it were not built
    monkeypatch.setattr(kernels, "_warned_fallback", False)


def test_auto_on_the_cpu_falls_back_to_torch_and_warns_once(no_native):
    with pytest.warns(
        UserWarning,
        match=r"^resta_fast: cpp backend unavailable \(native extension "
        r"resta_fast\._C did not load .*\); falling back to torch$",
    ):
        assert choose_backend("auto", "cpu") == ("torch", reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        assert choose_backend("auto", "cpu") == ("torch", reference)


def test_a_backend_asked_for_by_name_raises_its_load_error(no_native):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BackendUnavailable, match="native extension resta_fast._C did not load") as info:
            choose_backend("cpp", "cpu")
    assert isinstance(info.value.__cause__, ImportError)


@pytest.mark.skipif(kernels.backend_status()["cpp"] != "ok", reason="the C++ extension is not built here")
def test_auto_on_the_cpu_is_cpp_when_it_loads(monkeypatch):
    monkeypatch.setattr(kernels, "_warned_fallback", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose_backend("auto", "cpu") == ("cpp", cpp)


def test_auto_on_a_gpu_tries_triton_then_torch(monkeypatch):
    tried = []

    def fake_load(name):
        tried.append(name)
        if name == "triton":
            raise BackendUnavailable("no triton here")
        return reference

    monkeypatch.setattr(kernels, "load_backend", fake_load)
    monkeypatch.setattr(kernels, "_warned_fallback", False)
    with pytest.warns(UserWarning, match=r"triton backend unavailable \(no triton here\); falling back to torch"):
        assert choose_backend("auto", "cuda:1") == ("torch", reference)
    assert tried == ["triton", "torch"]  # never cpp: it is a CPU kernel


def test_an_unknown_backend_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"^unknown backend 'gpu'; choose one of auto, cpp, triton, torch$"):
        load_backend("gpu")
