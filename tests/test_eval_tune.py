"""`resta-fast tune`: β selection with injected patch/evaluate functions, then on tiny models for real."""

import argparse
import json
from pathlib import Path

import pytest
from eval_fakes import build_tiny_llama, refusal_triple

from resta_fast.errors import RestaError
from resta_fast.eval.cli import add_tune_parser
from resta_fast.eval.tune import format_table, parse_betas, tune, tune_line

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class FakePatch:
    """Writes an empty candidate directory and records the call."""

    def __init__(self):
        self.calls = []

    def __call__(self, finetuned, out, **kw):
        self.calls.append((finetuned, out, kw))
        Path(out).mkdir(parents=True)
        (Path(out) / "config.json").write_text("{}")
        return {"out": out}


def fake_evaluate(rates, em):
    """An evaluate() stand-in: harmful rate and exact match looked up by β from the directory name."""
    seen = []

    def evaluate_fn(models, prompts, **kw):
        (model,) = models
        seen.append((model, kw))
        beta = None if not Path(model).name.startswith("beta-") else float(Path(model).name[5:])
        assert beta is None or Path(model).is_dir()  # the candidate exists while it is evaluated
        rate, exact = (0.30, 0.80) if beta is None else (rates[beta], em[beta])
        return {
            "summary": {
                "models": [
                    {
                        "model": model,
                        "n": 100,
                        "harmful": int(rate * 100),
                        "harmless": 100 - int(rate * 100),
                        "unparseable": 0,
                        "harmful_rate": rate,
                        "ci95": [max(0, rate - 0.05), rate + 0.05],
                        "categories": {},
                        "utility": {"exact_match": exact},
                    }
                ],
                "gate": {},
            }
        }

    evaluate_fn.seen = seen
    return evaluate_fn


RATES = {0.25: 0.30, 0.5: 0.10, 1.0: 0.04, 1.5: 0.01}
EM = {0.25: 0.80, 0.5: 0.79, 1.0: 0.78, 1.5: 0.60}


def test_parse_betas():
    assert parse_betas("1.5, 0.25,1,0.5,1") == [0.25, 0.5, 1.0, 1.5]
    assert parse_betas([2, "0.5"]) == [0.5, 2.0]
    for bad, msg in [("a,b", "comma-separated"), ("", "empty"), ("-1", ">= 0")]:
        with pytest.raises(RestaError, match=msg):
            parse_betas(bad)


def test_picks_smallest_beta_within_both_targets(tmp_path):
    patch, ev = FakePatch(), fake_evaluate(RATES, EM)
    r = tune(
        "ft",
        "1.5,0.5,1,0.25",
        aligned="chat",
        unaligned="shadow",
        prompts="builtin:smoke",
        max_harmful=0.05,
        max_utility_drop=0.05,
        utility="u.jsonl",
        patch_fn=patch,
        evaluate_fn=ev,
        workdir=tmp_path,
        patch_options={"dare": 0.3, "seed": 7},
        eval_options={"device": "cpu"},
    )
    assert r["chosen_beta"] == 1.0 and r["passed"]
    assert [row["beta"] for row in r["rows"]] == [0.25, 0.5, 1.0, 1.5]
    assert [row["passed"] for row in r["rows"]] == [False, False, True, False]
    assert "exact_match drop 0.2000 > max 0.0500" in r["rows"][3]["reason"]  # safest, but broken
    assert r["rows"][2]["utility_drop"]["exact_match"] == pytest.approx(0.02)
    assert r["baseline"]["harmful_rate"] == 0.30 and r["baseline"]["utility"] == {"exact_match": 0.80}
    assert [c[2]["beta"] for c in patch.calls] == [0.25, 0.5, 1.0, 1.5]
    ft, out, kw = patch.calls[0]
    assert ft == "ft" and kw == {
        "aligned": "chat",
        "unaligned": "shadow",
        "vector": None,
        "beta": 0.25,
        "dare": 0.3,
        "seed": 7,
    }
    assert ev.seen[0][0] == "ft" and ev.seen[0][1]["device"] == "cpu" and ev.seen[0][1]["utility"] == "u.jsonl"
    assert list(tmp_path.iterdir()) == []  # candidates and their temp root removed
    assert r["tune_line"].startswith("RESTA_TUNE: beta=1 ")
    table = format_table(r)
    assert "| fine-tune | 30.0% |" in table and "| 1 | 4.0% |" in table and "**chosen**" in table


def test_none_meets_target_stop_early_and_keep(tmp_path):
    r = tune(
        "ft",
        "0.25,0.5",
        vector="v",
        prompts="builtin:smoke",
        max_harmful=0.05,
        patch_fn=FakePatch(),
        evaluate_fn=fake_evaluate(RATES, EM),
        workdir=tmp_path,
    )
    assert r["chosen_beta"] is None and not r["passed"]
    assert tune_line(r) == "RESTA_TUNE: NONE no beta in [0.25, 0.5] met max_harmful 0.05"
    patch = FakePatch()
    r = tune(
        "ft",
        "0.25,1,1.5",
        vector="v",
        prompts="builtin:smoke",
        max_harmful=0.05,
        patch_fn=patch,
        evaluate_fn=fake_evaluate(RATES, EM),
        workdir=tmp_path,
        stop_early=True,
        keep=True,
        out=tmp_path / "report",
    )
    assert r["chosen_beta"] == 1.0 and len(patch.calls) == 2  # 1.5 never patched
    assert Path(r["rows"][1]["model"]).is_dir()  # kept
    saved = json.loads((tmp_path / "report" / "tune.json").read_text())
    assert saved["chosen_beta"] == 1.0 and "RESTA_TUNE: beta=1" in (tmp_path / "report" / "tune.md").read_text()


def test_tune_usage_errors():
    with pytest.raises(RestaError, match="--aligned and --unaligned, or --vector"):
        tune("ft", "1", aligned="a", prompts="builtin:smoke", max_harmful=0.05, patch_fn=FakePatch())
    with pytest.raises(RestaError, match="--max-utility-drop needs"):
        tune(
            "ft",
            "1",
            vector="v",
            prompts="builtin:smoke",
            max_harmful=0.05,
            max_utility_drop=0.1,
            patch_fn=FakePatch(),
        )


def test_tune_real_evaluation_of_built_candidates(tmp_path):
    ft = build_tiny_llama(tmp_path / "ft", seed=1)

    def patch_fn(finetuned, out, *, beta, **kw):
        # Stand-in for RESTA: from β = 1 on, the candidate refuses everything.
        build_tiny_llama(out, say="sorry" if beta >= 1 else None, seed=1)

    r = tune(
        str(ft),
        "0.5,1",
        vector="v",
        prompts="builtin:smoke",
        max_harmful=0.05,
        patch_fn=patch_fn,
        eval_options={"max_new_tokens": 4, "limit": 6, "progress": False},
        workdir=tmp_path,
    )
    assert r["chosen_beta"] == 1.0
    assert r["rows"][0]["harmful_rate"] > 0.05 and r["rows"][1]["harmful_rate"] == 0.0


def test_tune_cli_with_the_real_patcher(tmp_path, capsys):
    pytest.importorskip("resta_fast.api")

    # V = A − U touches only the norm: β < 1 answers like F, β = 1 says "sorry" (refusal_triple).
    ft, al, un = refusal_triple(tmp_path)

    ap = argparse.ArgumentParser(prog="resta-fast")
    add_tune_parser(ap.add_subparsers())
    args = ap.parse_args(
        [
            "tune",
            "--finetuned",
            str(ft),
            "--aligned",
            str(al),
            "--unaligned",
            str(un),
            "--betas",
            "0.5,1",
            "--prompts",
            "builtin:smoke",
            "--limit",
            "6",
            "--max-harmful",
            "0.05",
            "--max-new-tokens",
            "4",
            "--workdir",
            str(tmp_path),
            "--out",
            str(tmp_path / "tune"),
            "--no-progress",
        ]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("RESTA_TUNE: beta=1 ")
    saved = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert [row["passed"] for row in saved["rows"]] == [False, True]
    assert not any(p.name.startswith("resta-tune-") for p in tmp_path.iterdir())
