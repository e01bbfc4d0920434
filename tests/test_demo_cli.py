"""``resta-fast demo`` (resta_fast/demo/cli.py): its flags and defaults, one-line errors for bad values, a missing
extra named in one line, and what it prints and returns for a demo that reproduced the effect or did not. The
demo itself (run_demo) is replaced here by a synthetic result; tests/test_demo.py runs it for real (slow)."""

import argparse

import pytest
from demo_fixtures import demo_result

from resta_fast.cli import build_parser, main
from resta_fast.demo import DEFAULT_SEED
from resta_fast.demo import run as demo_run
from resta_fast.demo.cli import DEMO_EPILOG, add_demo_parser, cmd_demo
from resta_fast.demo.report import summary_text


@pytest.fixture()
def fake_run(monkeypatch):
    """run_demo replaced: records its arguments, returns a synthetic result (``passed`` settable)."""
    calls = []

    def run_demo(out, seed, *, retrain, backend):
        calls.append({"out": out, "seed": seed, "retrain": retrain, "backend": backend})
        result = demo_result(passed=fake_run.passed)
        result["reports"] = {"json": f"{out}/demo.json", "markdown": f"{out}/demo.md", "png": f"{out}/demo.png"}
        return result

    fake_run.passed = True
    monkeypatch.setattr(demo_run, "run_demo", run_demo)
    fake_run.calls = calls
    return fake_run


def test_demo_subcommand_registered():
    from resta_fast.cli import build_parser

    args = build_parser().parse_args(["demo", "--out", "x", "--seed", "3"])
    assert args.out == "x" and args.seed == 3 and callable(args.func)


def test_add_demo_parser_registers_demo_with_its_epilog(capsys):
    parser = argparse.ArgumentParser(prog="resta-fast")
    p = add_demo_parser(parser.add_subparsers())
    assert p.epilog == DEMO_EPILOG and parser.parse_args(["demo"]).func is cmd_demo
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--help"])
    assert "Exit code 0 when the RESTA\neffect reproduced" in capsys.readouterr().out  # printed as written


def test_cmd_demo_returns_the_exit_code(tmp_path, capsys, fake_run):
    args = argparse.Namespace(out=str(tmp_path), seed=1, retrain=False, backend="cpp")
    assert cmd_demo(args) == 0
    fake_run.passed = False
    assert cmd_demo(args) == 1
    assert fake_run.calls == [{"out": str(tmp_path), "seed": 1, "retrain": False, "backend": "cpp"}] * 2


def test_the_defaults():
    args = build_parser().parse_args(["demo"])
    assert (args.out, args.seed, args.retrain, args.backend) == ("resta_fast_demo", DEFAULT_SEED, False, "auto")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--seed", "-1"], "resta-fast: error: --seed must be an integer in [0, 2**64), got -1"),
        (["--backend", "cuda"], "resta-fast: error: argument --backend: invalid choice: 'cuda'"),
        (["--out", "FILE"], "resta-fast: error: --out needs a directory: "),
    ],
)
def test_bad_values_are_one_line_and_exit_2_before_anything_runs(tmp_path, capsys, fake_run, flags, message):
    (tmp_path / "FILE").write_text("a file, not a directory")
    flags = [str(tmp_path / "FILE") if f == "FILE" else f for f in flags]
    assert main(["demo", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert err.endswith("(see resta-fast demo --help)\n"), err
    assert fake_run.calls == []


@pytest.mark.parametrize("passed, code", [(True, 0), (False, 1)])
def test_it_prints_the_summary_and_the_reports_and_exits_by_the_effect(tmp_path, capsys, fake_run, passed, code):
    fake_run.passed = passed
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--seed", "7", "--retrain", "--backend", "torch"]
    assert main(argv) == code
    assert fake_run.calls == [{"out": str(out), "seed": 7, "retrain": True, "backend": "torch"}]
    printed = capsys.readouterr().out
    assert printed == (
        summary_text(demo_result(passed=passed)) + f"\n\nreports: {out}/demo.json, {out}/demo.md, {out}/demo.png\n"
    )


@pytest.mark.parametrize("missing", ["transformers", "peft"])
def test_a_missing_extra_is_one_line_naming_it(capsys, monkeypatch, fake_run, missing):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    assert main(["demo"]) == 2
    assert capsys.readouterr().err == (
        f"resta-fast: error: the demo needs {missing}, which is not installed: pip install 'resta-fast[eval]'\n"
    )
    assert fake_run.calls == []
