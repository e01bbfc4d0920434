"""``resta-fast safelora`` and ``resta-fast safemerge`` (resta_fast/realign_cli.py): the cosine type, flags and
defaults, one-line errors for bad values (exit 2, before any work), what reaches realign.safelora/safemerge,
and what is printed (the text on stdout and where it was written on stderr, or --json). The realignment itself
is tests/test_safelora.py's and tests/test_safemerge.py's; here realign's functions are replaced."""

import argparse
import json

import pytest

from resta_fast import realign
from resta_fast import safemerge as SM
from resta_fast.cli import build_parser, main
from resta_fast.errors import RestaError
from resta_fast.realign_cli import cosine

SAFELORA = ["safelora", "--adapter", "lora", "--aligned", "chat", "--unaligned", "base"]
SAFEMERGE = ["safemerge", "--adapter", "lora", "--safety-adapter", "safe", "--aligned", "chat", "--unaligned", "base"]


@pytest.fixture()
def fake_realign(monkeypatch):
    """realign.safelora and realign.safemerge replaced: record their arguments, return ``fake_realign.report``."""
    calls = []

    def record(command):
        def run(*args, **kw):
            calls.append((command, args, kw))
            if isinstance(fake_realign.report, Exception):
                raise fake_realign.report
            return fake_realign.report

        return run

    fake_realign.calls = calls
    fake_realign.report = {"text": "2 of 8 module(s) projected", "out": "OUT", "output": "adapter"}
    monkeypatch.setattr(realign, "safelora", record("safelora"))
    monkeypatch.setattr(realign, "safemerge", record("safemerge"))
    return fake_realign


@pytest.mark.parametrize("text, value", [("0.5", 0.5), ("-1", -1.0), ("1", 1.0), ("0", 0.0), ("1e-3", 0.001)])
def test_cosine_accepts_minus_one_to_one(text, value):
    assert cosine(text) == value


@pytest.mark.parametrize(
    "text, message",
    [
        ("1.5", "must be a cosine in [-1, 1], got 1.5"),
        ("-1.0001", "must be a cosine in [-1, 1], got -1.0001"),
        ("nan", "must be a finite number, got nan"),
        ("inf", "must be a finite number, got inf"),
        ("half", "must be a finite number, got 'half'"),
    ],
)
def test_cosine_refuses_the_rest(text, message):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        cosine(text)
    assert str(info.value) == message


def test_safelora_flags_reach_realign_safelora(tmp_path, fake_realign, capsys):
    out = str(tmp_path / "out")
    assert main([*SAFELORA, "--threshold", "0.5", "--out", out]) == 0
    argv = [*SAFELORA, "--num-layers", "3", "--out", out, "--merge", "--base", "b", "--overwrite", "--no-fsync"]
    assert main([*argv, "--dry-run", "--record-paths", "--no-progress"]) == 0
    (_, args1, kw1), (_, args2, kw2) = fake_realign.calls
    assert args1 == args2 == ("lora", out)
    assert kw1 == {
        "aligned": "chat",
        "unaligned": "base",
        "threshold": 0.5,
        "num_layers": None,
        "merge": False,
        "base": None,
        "overwrite": False,
        "fsync": True,
        "dry_run": False,
        "progress": False,  # stderr is not a terminal here
        "command_line": "resta-fast " + " ".join([*SAFELORA, "--threshold", "0.5", "--out", out]),
        "record_paths": False,
    }
    assert {k: kw2[k] for k in ("threshold", "num_layers", "merge", "base", "overwrite", "fsync")} == {
        "threshold": None,
        "num_layers": 3,
        "merge": True,
        "base": "b",
        "overwrite": True,
        "fsync": False,
    }
    assert kw2["dry_run"] and kw2["record_paths"] and not kw2["progress"]


def test_safemerge_flags_and_defaults_reach_realign_safemerge(tmp_path, fake_realign, capsys):
    out = str(tmp_path / "out")
    assert main([*SAFEMERGE, "--out", out]) == 0
    argv = [*SAFEMERGE, "--out", out, "--tau", "-0.25", "--weights", "1", "0", "--combination", "dare_linear"]
    assert main([*argv, "--density", "0.5", "--seed", "9"]) == 0
    (_, args1, kw1), (_, args2, kw2) = fake_realign.calls
    assert args1 == args2 == ("lora", "safe", out)
    # the command's defaults are the API's (resta_fast/safemerge.py)
    assert (kw1["tau"], kw1["weights"]) == (SM.DEFAULT_TAU, list(SM.DEFAULT_WEIGHTS))
    assert (kw1["combination"], kw1["density"], kw1["seed"]) == ("linear", None, 0)
    assert (kw1["aligned"], kw1["unaligned"], kw1["merge"], kw1["fsync"]) == ("chat", "base", False, True)
    assert {k: kw2[k] for k in ("tau", "weights", "combination", "density", "seed")} == {
        "tau": -0.25,
        "weights": [1.0, 0.0],
        "combination": "dare_linear",
        "density": 0.5,
        "seed": 9,
    }


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*SAFELORA, "--out", "o"], "one of the arguments --threshold --num-layers is required"),
        ([*SAFELORA, "--out", "o", "--threshold", "0.5", "--num-layers", "2"], "not allowed with argument"),
        ([*SAFELORA, "--out", "o", "--threshold", "2"], "--threshold must be a cosine in [-1, 1], got 2.0"),
        ([*SAFELORA, "--out", "o", "--num-layers", "0"], "--num-layers must be an integer >= 1, got 0"),
        ([*SAFELORA, "--threshold", "0.5"], "the following arguments are required: --out"),
        (["safelora", "--aligned", "a", "--unaligned", "u", "--threshold", "0.5", "--out", "o"], "--adapter"),
        ([*SAFEMERGE, "--out", "o", "--tau", "1.2"], "--tau must be a cosine in [-1, 1], got 1.2"),
        ([*SAFEMERGE, "--out", "o", "--weights", "0.8"], "--weights: expected 2 arguments"),
        ([*SAFEMERGE, "--out", "o", "--weights", "inf", "0"], "--weights must be a finite number, got inf"),
        ([*SAFEMERGE, "--out", "o", "--combination", "ties"], "invalid choice: 'ties'"),
        ([*SAFEMERGE, "--out", "o", "--density", "0"], "--density must be a fraction in (0, 1], got 0.0"),
        ([*SAFEMERGE, "--out", "o", "--seed", "-3"], "--seed must be an integer in [0, 2**64), got -3"),
        (SAFEMERGE[:-2] + ["--out", "o"], "the following arguments are required: --unaligned"),
    ],
)
def test_bad_flags_are_one_line_exit_2_before_any_work(fake_realign, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("resta-fast: error: ") and message in err and err.count("\n") == 1, err
    assert err.endswith(f"(see resta-fast {argv[0]} --help)\n"), err
    assert fake_realign.calls == []


def test_an_out_that_is_a_file_is_refused_while_parsing(tmp_path, fake_realign, capsys):
    (tmp_path / "f").write_text("")
    assert main([*SAFELORA, "--threshold", "0.5", "--out", str(tmp_path / "f")]) == 2
    assert f"--out needs a directory: {tmp_path / 'f'} is a file" in capsys.readouterr().err
    assert fake_realign.calls == []


@pytest.mark.parametrize("command", [SAFELORA + ["--threshold", "0.5"], SAFEMERGE])
def test_the_text_goes_to_stdout_and_where_it_was_written_to_stderr(fake_realign, capsys, command):
    fake_realign.report = {"text": "decisions\nper module", "out": "restored", "output": "merged"}
    assert main([*command, "--out", "restored"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "decisions\nper module\n"
    assert captured.err == "wrote restored (merged)\n"


def test_a_report_without_an_output_kind_was_an_adapter(fake_realign, capsys):
    fake_realign.report = {"text": "t", "out": "restored"}
    assert main([*SAFELORA, "--threshold", "0.5", "--out", "restored"]) == 0
    assert capsys.readouterr().err == "wrote restored (adapter)\n"


def test_a_dry_run_prints_the_decisions_and_says_nothing_was_written(fake_realign, capsys):
    fake_realign.report = {"dry_run": True, "text": "2 of 8 module(s) projected"}
    assert main([*SAFELORA, "--threshold", "0.5", "--out", "restored", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "2 of 8 module(s) projected\n" and captured.err == ""


def test_json_prints_the_report_without_its_text(fake_realign, capsys):
    fake_realign.report = {"text": "t", "out": "restored", "output": "adapter", "safelora": {"modules": [1, 2]}}
    assert main([*SAFEMERGE, "--out", "restored", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"out": "restored", "output": "adapter", "safelora": {"modules": [1, 2]}}
    assert captured.out.index('"out"') < captured.out.index('"output"') < captured.out.index('"safelora"')  # sorted
    assert captured.err == ""


def test_an_error_from_the_realignment_is_one_line_exit_2(fake_realign, capsys):
    fake_realign.report = RestaError("--adapter lora: no adapter_model.safetensors; expected a PEFT adapter")
    assert main([*SAFELORA, "--threshold", "0.5", "--out", "restored"]) == 2
    assert capsys.readouterr().err == (
        "resta-fast: error: --adapter lora: no adapter_model.safetensors; expected a PEFT adapter\n"
    )


def test_both_commands_have_the_shared_output_flags():
    parser = build_parser("safelora")
    for argv in ([*SAFELORA, "--threshold", "0.5", "--out", "o"], [*SAFEMERGE, "--out", "o"]):
        args = parser.parse_args(argv)
        flags = (args.merge, args.base, args.dry_run, args.overwrite, args.no_fsync, args.record_paths, args.json)
        assert flags == (False, None, False, False, False, False, False)
        assert args.no_progress is False
