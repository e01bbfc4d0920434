"""`resta-fast env` (resta_fast/cli.py: environment, cmd_env): versions, backend status
and why not, the native extension's build facts or why it did not load, CPU
features, GPUs; text and --json, exit codes. A missing or broken native module is
simulated in-process (a None in sys.modules, an import hook that fails) and in a
child interpreter."""

import io
import json
import os
import platform
import subprocess
import sys

import pytest
import torch

import resta_fast
from resta_fast import cli
from resta_fast.kernels import backend_status, cpp

NATIVE = backend_status()["cpp"] == "ok"
needs_native = pytest.mark.skipif(not NATIVE, reason="the C++ extension is not built here")


def run_env(capsys, *flags) -> tuple[int, str]:
    code = cli.main(["env", *flags])
    out = capsys.readouterr().out
    return code, out


def env_json(capsys) -> dict:
    code, out = run_env(capsys, "--json")
    assert code == 0, out
    return json.loads(out)


@pytest.fixture
def no_native(monkeypatch):
    """``resta_fast._C`` as if it were not built: its import finds None in sys.modules."""
    monkeypatch.setattr(cpp, "_native", None)  # forget a module loaded by an earlier test
    monkeypatch.setitem(sys.modules, "resta_fast._C", None)


@pytest.fixture
def broken_native(monkeypatch):
    """``resta_fast._C`` built but failing to import, as a .so with an undefined symbol does."""

    class Broken:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "resta_fast._C":
                raise ImportError("resta_fast/_C.so: undefined symbol: _ZN6resta3isaEv")
            return None

    monkeypatch.setattr(cpp, "_native", None)
    monkeypatch.delitem(sys.modules, "resta_fast._C", raising=False)
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])


def test_json_reports_the_versions_of_this_interpreter(capsys):
    info = env_json(capsys)
    assert info["resta_fast"] == resta_fast.__version__
    assert info["python"] == platform.python_version()
    assert info["torch"] == torch.__version__
    assert info["platform"] == platform.platform()
    import numpy
    import safetensors

    assert info["numpy"] == numpy.__version__ and info["safetensors"] == safetensors.__version__
    for mod in ("triton", "transformers"):
        assert isinstance(info[mod], str) and info[mod], mod


def test_a_missing_optional_package_is_reported_not_fatal(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    info = env_json(capsys)
    assert info["transformers"] == "not available (ModuleNotFoundError)"
    assert info["torch"] == torch.__version__


def test_backends_say_ok_or_why_not(capsys):
    backends = env_json(capsys)["backends"]
    assert list(backends) == ["cpp", "triton", "torch"]
    assert backends["torch"] == "ok"
    for name, status in backends.items():
        assert status == "ok" or (status.startswith("unavailable: ") and len(status) > len("unavailable: ")), name


@needs_native
def test_a_loaded_native_extension_reports_its_build(capsys):
    info = env_json(capsys)
    native = info["native"]
    assert isinstance(native, dict), native
    assert os.path.basename(native["module"]).startswith("_C")
    assert os.path.dirname(native["module"]) == os.path.dirname(resta_fast.__file__)  # this checkout's build
    assert native["isa"] in native["isa_supported"] and native["isa"] in native["isa_compiled"]
    assert native["fp_contract_off"] is True  # docs/spec.md §2: bit-exactness needs -ffp-contract=off
    assert info["backends"]["cpp"] == "ok"


def test_a_native_extension_that_is_not_built_says_how_to_build_it(capsys, no_native):
    code, out = run_env(capsys, "--json")
    assert code == 0, out  # diagnostics never fail on what they diagnose
    info = json.loads(out)
    assert info["native"].startswith("not loaded: native extension resta_fast._C did not load (ModuleNotFoundError: ")
    assert "build it with `python setup.py build_ext --inplace`" in info["native"]
    assert info["backends"]["cpp"].startswith("unavailable: native extension resta_fast._C did not load")
    assert info["backends"]["torch"] == "ok"  # the fallback is still there


def test_a_native_extension_that_fails_to_import_shows_the_original_error(capsys, broken_native):
    info = env_json(capsys)
    assert "undefined symbol: _ZN6resta3isaEv" in info["native"], info["native"]
    assert "it is installed but failed to import; fix the cause above or rebuild it" in info["native"]
    assert "build_ext" not in info["native"]  # not the not-built hint
    assert info["backends"]["cpp"].startswith("unavailable: native extension resta_fast._C did not load (ImportError")


def test_python_m_resta_fast_env_without_the_native_module():
    """The real entry point in a fresh interpreter, with the extension hidden before anything imports."""
    code = (
        "import sys, runpy; sys.modules['resta_fast._C'] = None\n"
        "sys.argv = ['resta_fast', 'env', '--json']\n"
        "runpy.run_module('resta_fast', run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["native"].startswith("not loaded: native extension resta_fast._C did not load")
    assert info["resta_fast"] == resta_fast.__version__


def test_cpu_features_are_the_known_flags_of_proc_cpuinfo(capsys, monkeypatch):
    cpuinfo = (
        "processor\t: 0\nmodel name\t: Fake CPU\n"
        "flags\t\t: fpu sse4_2 avx2 fma avx512f sha_ni avx512_vnni f16c\n"
        "processor\t: 1\nflags\t\t: fpu\n"
    )
    real_open = open

    def fake_open(path, *a, **k):
        return io.StringIO(cpuinfo) if path == "/proc/cpuinfo" else real_open(path, *a, **k)

    monkeypatch.setattr(cli, "open", fake_open, raising=False)  # cli's global shadows the builtin
    cpu = env_json(capsys)["cpu"]
    assert cpu == {"cores": os.cpu_count(), "features": ["avx2", "avx512f", "f16c", "fma", "sha_ni"]}


def test_no_proc_cpuinfo_means_no_features_not_an_error(capsys, monkeypatch):
    def no_file(path, *a, **k):
        raise FileNotFoundError(2, "No such file or directory", path)

    monkeypatch.setattr(cli, "open", no_file, raising=False)
    assert env_json(capsys)["cpu"]["features"] == []


@needs_native
def test_cpu_features_agree_with_the_native_modules_cpuid(capsys):
    """Two sources for one fact: /proc/cpuinfo (what env lists) and the extension's cpuid."""
    info = env_json(capsys)
    for flag, present in info["native"]["cpu_flags"].items():
        if flag in ("avx2", "fma", "f16c", "avx512f", "avx512bw"):
            assert (flag in info["cpu"]["features"]) == present, flag


def test_gpus_are_listed_by_name(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"Fake GPU {i}")
    assert env_json(capsys)["cuda"] == ["Fake GPU 0", "Fake GPU 1"]
    code, out = run_env(capsys)
    assert code == 0 and "cuda: ['Fake GPU 0', 'Fake GPU 1']" in out.splitlines()


def test_no_gpu_says_so(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert env_json(capsys)["cuda"] == "no CUDA device visible"


def test_text_output_has_one_line_per_fact_and_indents_groups(capsys, no_native):
    code, out = run_env(capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"resta_fast: {resta_fast.__version__}"
    assert f"torch: {torch.__version__}" in lines
    i = lines.index("backends:")
    assert [ln.split(":")[0] for ln in lines[i + 1 : i + 4]] == ["  cpp", "  triton", "  torch"]
    assert lines[i + 3] == "  torch: ok"
    assert any(ln.startswith("native: not loaded: native extension resta_fast._C did not load") for ln in lines)
    i = lines.index("cpu:")
    assert lines[i + 1] == f"  cores: {os.cpu_count()}" and lines[i + 2].startswith("  features: [")
    assert lines[-1].startswith("cuda: ")
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


@needs_native
def test_text_output_lists_the_native_build_under_its_heading(capsys):
    code, out = run_env(capsys)
    assert code == 0
    lines = out.splitlines()
    i = lines.index("native:")
    assert lines[i + 1].startswith("  isa: ")
    assert any(ln.startswith("  module: ") and "_C" in ln for ln in lines[i + 1 :])


def test_an_unknown_flag_is_exit_2(capsys):
    assert cli.main(["env", "--jsno"]) == 2
    assert "--jsno" in capsys.readouterr().err
