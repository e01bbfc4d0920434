"""``resta-fast verify`` (resta_fast/verify_cli.py): its flags and what reaches verify(), exit 0 / 1 / 2, the
printed result (one line per check, at most MAX_LISTED problems each, the Hub inputs it came from) and --json.
What the checks find is tests/test_verify_*.py's; here verify() is replaced, and run for real once."""

import json
import shutil

import pytest
from verify_fixtures import patched_output

from resta_fast import verify as verify_pkg
from resta_fast.cli import build_parser, main
from resta_fast.verify_cli import MAX_LISTED, format_result


def check(name, ok=True, detail="", problems=()):
    return {"name": name, "ok": ok, "detail": detail, "problems": list(problems)}


@pytest.fixture()
def fake_verify(monkeypatch):
    """verify() replaced: records its arguments and returns ``fake_verify.result``."""
    calls = []

    def verify(out, against, **kw):
        calls.append({"out": out, "against": against, **kw})
        return fake_verify.result

    fake_verify.calls = calls
    fake_verify.result = {"out": "restored", "ok": True, "checks": [check("report", detail="resta_fast.json")]}
    monkeypatch.setattr(verify_pkg, "verify", verify)
    return fake_verify


@pytest.fixture(scope="module")
def real_output(tmp_path_factory):
    return patched_output(tmp_path_factory.mktemp("verify_cli"))[-1]


def test_format_result_one_line_per_check_and_the_verdict():
    result = {
        "out": "restored",
        "ok": True,
        "checks": [check("report", detail="resta_fast.json"), check("sha256", detail=None), check("headers")],
    }
    assert (
        format_result(result)
        == "verify restored\n  ok    report: resta_fast.json\n  ok    sha256:\n  ok    headers:\nPASS"
    )


def test_format_result_lists_at_most_max_listed_problems_per_check():
    problems = [f"model-{i}.safetensors: digest differs" for i in range(MAX_LISTED + 3)]
    result = {"out": "o", "ok": False, "checks": [check("sha256", False, f"{len(problems)} problem(s)", problems)]}
    lines = format_result(result).splitlines()
    assert lines[1] == f"  FAIL  sha256: {MAX_LISTED + 3} problem(s)"
    assert lines[2:] == [f"          {p}" for p in problems[:MAX_LISTED]] + [
        "          ... 3 more (see --json)",
        "FAIL",
    ]
    exactly = {"out": "o", "ok": False, "checks": [check("sha256", False, "", problems[:MAX_LISTED])]}
    assert "more (see --json)" not in format_result(exactly)


def test_format_result_names_the_hub_inputs_it_was_made_from():
    result = {
        "out": "o",
        "ok": True,
        "hub_inputs": {
            "finetuned": {"repo_id": "org/ft", "revision": "v1", "commit": "abc123"},
            "dare_base": {"repo_id": "org/base", "revision": "main", "commit": "def456"},
            "aligned": {"repo_id": "org/chat", "revision": None, "commit": "0f0f"},
        },
        "checks": [],
    }
    assert format_result(result).splitlines()[1:4] == [
        "  from  finetuned: org/ft@v1, commit abc123",
        "  from  dare base: org/base, commit def456",  # main is the default: not shown
        "  from  aligned: org/chat, commit 0f0f",
    ]


def test_the_flags_reach_verify(fake_verify, capsys):
    assert main(["verify", "out"]) == 0
    assert main(["verify", "out", "--against"]) == 0  # no paths: the recorded ones
    argv = ["verify", "out", "--against", "ft", "al", "un", "--dare-base", "db", "--base", "b"]
    assert main([*argv, "--samples", "0", "--seed", str(2**64 - 1)]) == 0
    common = {"out": "out", "dare_base": None, "base": None, "samples": 10000, "seed": 0}
    assert fake_verify.calls == [
        {**common, "against": None},
        {**common, "against": []},
        {**common, "against": ["ft", "al", "un"], "dare_base": "db", "base": "b", "samples": 0, "seed": 2**64 - 1},
    ]


@pytest.mark.parametrize("ok, code", [(True, 0), (False, 1)])
def test_exit_0_when_every_check_passes_1_when_one_fails(fake_verify, capsys, ok, code):
    fake_verify.result = {"out": "restored", "ok": ok, "checks": [check("sha256", ok, "2 file(s)")]}
    assert main(["verify", "restored"]) == code
    assert capsys.readouterr().out == format_result(fake_verify.result) + "\n"


def test_json_prints_the_whole_result(fake_verify, capsys):
    problems = [f"p{i}" for i in range(MAX_LISTED + 5)]
    fake_verify.result = {"out": "restored", "ok": False, "checks": [check("sha256", False, "", problems)]}
    assert main(["verify", "restored", "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == fake_verify.result  # every problem, not only MAX_LISTED


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--samples", "-1"], "resta-fast: error: --samples must be an integer >= 0, got -1"),
        (
            ["--seed", str(2**64)],
            "resta-fast: error: --seed must be an integer in [0, 2**64), got 18446744073709551616",
        ),
        (["--samples", "many"], "resta-fast: error: --samples must be an integer >= 0, got 'many'"),
    ],
)
def test_bad_values_are_one_line_exit_2_before_verify_runs(fake_verify, capsys, flags, message):
    assert main(["verify", "out", *flags]) == 2
    assert capsys.readouterr().err == f"{message} (see resta-fast verify --help)\n"
    assert fake_verify.calls == []


def test_a_missing_output_argument_is_one_line(fake_verify, capsys):
    assert main(["verify"]) == 2
    err = capsys.readouterr().err
    assert err == "resta-fast: error: the following arguments are required: out (see resta-fast verify --help)\n"
    assert fake_verify.calls == []


def test_against_is_optional_and_takes_any_number_of_paths():
    parser = build_parser("verify")
    assert parser.parse_args(["verify", "out"]).against is None
    assert parser.parse_args(["verify", "out", "--against", "ft", "vec"]).against == ["ft", "vec"]


def test_a_real_output_passes_and_a_flipped_byte_fails(real_output, tmp_path, capsys):
    assert main(["verify", str(real_output)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"verify {real_output}\n") and text.endswith("\nPASS\n")
    assert "FAIL" not in text
    broken = tmp_path / "broken"
    shutil.copytree(real_output, broken)
    shard = sorted(broken.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    assert main(["verify", str(broken)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "FAIL" and any(line.startswith("  FAIL  ") for line in lines)
