"""`resta-fast eval` end to end on tiny local Llamas: reports, --json shape, gate exit codes, re-judging.

The library call itself (evaluate, validate_checkpoint) is tested in test_eval_runner.py."""

import argparse
import json

import pytest
from eval_fakes import eval_trio, write_utility

from resta_fast.errors import RestaError
from resta_fast.eval.cli import add_eval_parser, add_tune_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return eval_trio(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_utility(root)  # the "sorry" model scores 1.0 on it, the random one ~0
    (root / "heldout.txt").write_text("the capital of france is paris . one two three four five .\n" * 3)
    return root


def parse(argv):
    ap = argparse.ArgumentParser(prog="resta-fast")
    sub = ap.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    add_tune_parser(sub)
    return ap.parse_args(argv)


def run(argv):
    args = parse(argv)
    return args.func(args)


FAST = ["--max-new-tokens", "6", "--utility-max-new-tokens", "1", "--no-progress"]


def test_eval_end_to_end_reports_and_json(models, data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "eval",
        "--model",
        models["rand"],
        "--model",
        models["sorry"],
        "--prompts",
        "builtin:smoke",
        "--utility",
        str(data / "utility.jsonl"),
        "--perplexity",
        str(data / "heldout.txt"),
        "--out",
        str(out),
        "--json",
        *FAST,
    ]
    assert run(argv) == 0
    cap = capsys.readouterr()
    summary = json.loads(cap.out)  # stdout is exactly one JSON object
    assert set(summary) == {"models", "gate"}
    assert summary["gate"] == {"passed": True, "reason": "no gate thresholds set"}
    assert "RESTA_GATE" not in cap.out + cap.err  # no thresholds, no gate line
    rand, sorry = summary["models"]
    assert set(rand) == {
        "model",
        "n",
        "harmful",
        "harmless",
        "unparseable",
        "harmful_rate",
        "ci95",
        "categories",
        "utility",
    }
    assert rand["model"] == models["rand"] and rand["n"] == 33
    assert rand["harmful"] + rand["harmless"] + rand["unparseable"] == 33
    assert sorry["harmful"] == 0 and sorry["harmless"] == 33 and sorry["harmful_rate"] == 0.0
    assert sorry["ci95"][0] == 0.0 and 0.0 < sorry["ci95"][1] < 0.15
    assert len(sorry["categories"]) == 11
    assert sorry["categories"]["Malware Viruses"] == {"n": 3, "harmful_rate": 0.0}
    assert set(sorry["utility"]) == {"exact_match", "perplexity"} and sorry["utility"]["exact_match"] == 1.0
    assert sorry["utility"]["perplexity"] > 1.0

    for name in [
        "report.json",
        "report.md",
        "report.png",
        "responses/rand.jsonl",
        "responses/sorry.jsonl",
        "verdicts/rand.refusal.jsonl",
        "verdicts/sorry.refusal.jsonl",
        "utility/sorry.jsonl",
    ]:
        assert (out / name).is_file(), name
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    assert report["summary"] == summary and report["prompts"]["smoke_set"] is True
    assert report["comparison"][0]["model"] == "sorry" and report["comparison"][0]["baseline"] == "rand"
    md = (out / "report.md").read_text()
    assert "Smoke set, not a benchmark" in md and "| Tailored Financial Advice |" in md
    lines = (out / "responses" / "sorry.jsonl").read_text().splitlines()
    assert len(lines) == 33 and json.loads(lines[0])["response"] == "sorry sorry sorry sorry sorry sorry"


def test_eval_is_deterministic(models, tmp_path):
    for d in ("a", "b"):
        assert (
            run(
                [
                    "eval",
                    "--model",
                    models["rand"],
                    "--prompts",
                    "builtin:smoke",
                    "--out",
                    str(tmp_path / d),
                    "--batch-size",
                    "4",
                    *FAST,
                ]
            )
            == 0
        )
    a = (tmp_path / "a" / "responses" / "rand.jsonl").read_text()
    assert a == (tmp_path / "b" / "responses" / "rand.jsonl").read_text()


def test_gate_exit_codes_and_lines(models, data, tmp_path, capsys):
    smoke = ["--prompts", "builtin:smoke", "--limit", "6", *FAST]
    assert run(["eval", "--model", models["sorry"], "--max-harmful", "0.05", *smoke]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("RESTA_GATE: PASS ")

    assert run(["eval", "--model", models["rand"], "--max-harmful", "0.05", *smoke]) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("RESTA_GATE: FAIL ") and "harmful_rate" in last and models["rand"] in last

    # With --json the gate line goes to stderr so stdout stays one JSON object.
    assert run(["eval", "--model", models["rand"], "--max-harmful", "0.05", "--json", *smoke]) == 1
    cap = capsys.readouterr()
    assert json.loads(cap.out)["gate"]["passed"] is False
    assert any(x.startswith("RESTA_GATE: FAIL ") for x in cap.err.splitlines())

    # Utility budget: the random model is "safe enough" at 100% but loses all exact match vs the reference.
    argv = [
        "eval",
        "--model",
        models["rand"],
        "--reference",
        models["sorry"],
        "--max-harmful",
        "1.0",
        "--max-utility-drop",
        "0.02",
        "--utility",
        str(data / "utility.jsonl"),
        "--json",
        *smoke,
    ]
    assert run(argv) == 1
    cap = capsys.readouterr()
    gate = json.loads(cap.out)["gate"]
    assert gate["passed"] is False and "exact_match drop 1.0000 > max 0.0200" in gate["reason"]
    # The reference (not among --model) was evaluated for utility only, and is not in the summary.
    assert [m["model"] for m in json.loads(cap.out)["models"]] == [models["rand"]]

    # Reference among the models: it is reported but not gated.
    argv = [
        "eval",
        "--model",
        models["rand"],
        "--model",
        models["sorry"],
        "--reference",
        models["rand"],
        "--max-harmful",
        "0.05",
        "--json",
        *smoke,
    ]
    assert run(argv) == 0
    assert len(json.loads(capsys.readouterr().out)["models"]) == 2


def test_usage_errors_exit_2(models, data, capsys):
    with pytest.raises(RestaError, match="--max-utility-drop needs --reference"):
        run(
            [
                "eval",
                "--model",
                models["sorry"],
                "--prompts",
                "builtin:smoke",
                "--max-utility-drop",
                "0.1",
                "--utility",
                str(data / "utility.jsonl"),
            ]
        )
    with pytest.raises(RestaError, match="needs --utility FILE"):
        run(
            [
                "eval",
                "--model",
                models["sorry"],
                "--prompts",
                "builtin:smoke",
                "--max-utility-drop",
                "0.1",
                "--reference",
                models["rand"],
            ]
        )
    with pytest.raises(RestaError, match="--model needs --prompts"):
        run(["eval", "--model", models["sorry"]])
    with pytest.raises(RestaError, match="nothing to evaluate"):
        run(["eval", "--prompts", "builtin:smoke"])
    # A rate outside [0, 1]: refused while the CLI parses its flags (one line, exit 2),
    # and still by the library for API callers.
    assert main(["eval", "--model", models["sorry"], "--prompts", "builtin:smoke", "--max-harmful", "5"]) == 2
    assert "--max-harmful must be a fraction in [0, 1], got 5.0" in capsys.readouterr().err
    from resta_fast.eval.runner import evaluate

    with pytest.raises(RestaError, match="^--max-harmful must be a fraction in \\[0, 1\\], got 5$"):  # the CLI's words
        evaluate([models["sorry"]], "builtin:smoke", max_harmful=5)
    assert main(["eval", "--model", "/nonexistent/model", "--prompts", "builtin:smoke"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_rejudge_saved_responses_without_a_model(models, tmp_path, capsys):
    out = tmp_path / "gen"
    assert run(["eval", "--model", models["sorry"], "--prompts", "builtin:smoke", "--out", str(out), *FAST]) == 0
    capsys.readouterr()
    # Re-judge with a stricter, prefix-only rule and the Chinese list added; no model is loaded.
    argv = [
        "eval",
        "--responses",
        str(out / "responses" / "sorry.jsonl"),
        "--refusal-lang",
        "en,zh",
        "--refusal-match",
        "prefix",
        "--out",
        str(tmp_path / "rejudge"),
        "--json",
        "--no-progress",
    ]
    assert run(argv) == 0
    s = json.loads(capsys.readouterr().out)["models"][0]
    assert s["model"] == models["sorry"] and s["harmless"] == 33 and len(s["categories"]) == 11
    assert (tmp_path / "rejudge" / "verdicts" / "sorry.refusal.jsonl").is_file()
    assert json.loads((tmp_path / "rejudge" / "report.json").read_text())["prompts"]["smoke_set"] is True
    utility = tmp_path / "u.jsonl"  # exists: the flag's own check (an existing file) passes
    utility.write_text('{"prompt": "q", "answer": "a"}\n')
    with pytest.raises(RestaError, match="saved responses carry no utility"):
        run(["eval", "--responses", str(out / "responses" / "sorry.jsonl"), "--utility", str(utility)])


def test_no_chat_template_flag(models, capsys):
    # --no-chat-template on a model that has one: raw prompts, still one answer per prompt.
    argv = [
        "eval",
        "--model",
        models["rand"],
        "--prompts",
        "builtin:smoke",
        "--limit",
        "3",
        "--no-chat-template",
        "--json",
        *FAST,
    ]
    assert run(argv) == 0 and json.loads(capsys.readouterr().out)["models"][0]["n"] == 3


def test_wired_into_main_cli(models, capsys):
    cli = pytest.importorskip("resta_fast.cli")
    try:
        cli.build_parser("eval")
    except ImportError as e:
        # Another optional subcommand (demo, batch, ...) failing to import is not this module's bug.
        if "resta_fast.eval" in str(e) or "resta_fast/eval" in str(e):
            raise
        pytest.skip(f"the main CLI does not build right now: {e}")
    rc = cli.main(
        [
            "eval",
            "--model",
            models["sorry"],
            "--prompts",
            "builtin:smoke",
            "--limit",
            "3",
            "--max-harmful",
            "0",
            "--json",
            *FAST,
        ]
    )
    assert rc == 0 and json.loads(capsys.readouterr().out)["gate"]["passed"] is True
