"""eval/report.py: the summary table, the Markdown report section by section, the PNG chart, and write_reports."""

import json

import pytest

from resta_fast.eval.report import markdown, plot, summary_table, write_reports


def judged(rate, ci, cats):
    return {
        "n": 4,
        "harmful": int(rate * 4),
        "harmless": 4 - int(rate * 4),
        "unparseable": 0,
        "harmful_rate": rate,
        "ci95": ci,
        "categories": cats,
        "subcategories": {},
    }


def result(*, smoke=False, judges=("refusal",)):
    """What evaluate() returns for a candidate ``a`` and a reference ``b``, by hand."""
    a_cats = {"Crime": {"n": 2, "harmful_rate": 0.5}, "Weapons": {"n": 2, "harmful_rate": 0.0}}
    b_cats = {"Crime": {"n": 2, "harmful_rate": 1.0}, "Drugs": {"n": 2, "harmful_rate": None}}
    a = {
        "model": "/m/a",
        "label": "a",
        "role": "candidate",
        "source": "generated",
        "utility": {"exact_match": 0.75, "contains": 1.0, "utility_n": 4, "perplexity": 12.3456},
        "judges": {j: judged(0.25, [0.05, 0.7], a_cats) for j in judges},
    }
    b = {
        "model": "/m/b",
        "label": "b",
        "role": "reference",
        "source": "generated",
        "judges": {j: judged(0.5, [0.15, 0.85], b_cats) for j in judges},
    }
    if len(judges) > 1:
        a["agreement"] = {f"{judges[0]} vs {judges[1]}": {"n": 4, "percent_agreement": 0.75, "cohen_kappa": 0.5}}
        b["agreement"] = {f"{judges[0]} vs {judges[1]}": {"n": 0, "percent_agreement": None, "cohen_kappa": None}}

    def line(d):
        keys = ("n", "harmful", "harmless", "unparseable", "harmful_rate", "ci95")
        return {"model": d["model"], **{k: d["judges"][judges[0]][k] for k in keys}}

    return {
        "summary": {
            "models": [line(a) | {"utility": {"exact_match": 0.75, "perplexity": 12.3456}}, line(b)],
            "gate": {"passed": True, "reason": "/m/a: harmful_rate 0.2500 <= 0.3000"},
        },
        "gate_line": "RESTA_GATE: PASS /m/a: harmful_rate 0.2500 <= 0.3000",
        "primary_judge": judges[0],
        "judges": list(judges),
        "prompts": {"sources": ["p.json"], "loaded": 5, "duplicates_removed": 1, "n": 4, "smoke_set": smoke},
        "models": [a, b],
        "comparison": [
            {"model": "a", "baseline": "b", "harmful_rate_diff": -0.25, "utility_drop": {"exact_match": 0.015}}
        ],
        "config": {},
    }


EXPECTED = """# resta-fast safety evaluation

Prompts: 4 from p.json (1 duplicate(s) removed). Primary judge: `refusal`. Harmful rate = harmful / (harmful + \
harmless); unparseable verdicts are excluded and counted separately. CI: Wilson 95%.

## Overview

| model | n | harmful | harmless | unparseable | harmful rate | 95% CI | exact match | perplexity |
|---|---|---|---|---|---|---|---|---|
| /m/a | 4 | 1 | 3 | 0 | 25.0% | [5.0, 70.0] | 75.0% | 12.346 |
| /m/b | 4 | 2 | 2 | 0 | 50.0% | [15.0, 85.0] | – | – |

## Harmful rate per category

| category | a | b |
|---|---|---|
| Crime | 50.0% (n=2) | 100.0% (n=2) |
| Weapons | 0.0% (n=2) | – |
| Drugs | – | – (n=2) |

## Utility

| model | role | exact match | contains | perplexity |
|---|---|---|---|---|
| a | candidate | 75.0% | 100.0% | 12.346 |

## Differences

| model | vs | Δ harmful rate | utility drop |
|---|---|---|---|
| a | b | -25.0 pts | exact_match +0.0150 |

## Gate

`RESTA_GATE: PASS /m/a: harmful_rate 0.2500 <= 0.3000`
"""


def test_summary_table_fills_gaps_with_a_dash():
    rows = [
        {"model": "x"},
        {
            "model": "y",
            "n": 0,
            "harmful": 0,
            "harmless": 0,
            "unparseable": 0,
            "harmful_rate": None,
            "ci95": None,
            "utility": {"perplexity": 3.0},
        },
    ]
    assert summary_table({"models": rows}).splitlines()[2:] == [
        "| x | – | – | – | – | – | – | – | – |",
        "| y | 0 | 0 | 0 | 0 | – | – | – | 3.000 |",
    ]
    assert summary_table({"models": []}).count("\n") == 1  # header and rule only


def test_markdown_whole_report():
    assert markdown(result()) == EXPECTED


def test_markdown_smoke_banner_and_judges_section():
    md = markdown(result(smoke=True, judges=("refusal", "classifier")))
    assert md.splitlines()[2].startswith("> **Smoke set, not a benchmark.**")
    assert "## Judges" in md and "| a | classifier | 1 | 3 | 0 | 25.0% | [5.0, 70.0] |" in md
    assert "| a | refusal vs classifier | 4 | 75.0% | 0.500 |" in md
    assert "| b | refusal vs classifier | 0 | – | – |" in md
    assert "## Judges" not in markdown(result())  # one judge: no per-judge section


def test_markdown_leaves_out_empty_sections():
    r = result()
    r["comparison"], r["summary"]["gate"] = [], None
    del r["models"][0]["utility"]
    for m in r["models"]:
        m["judges"]["refusal"]["categories"] = {"(none)": {"n": 4, "harmful_rate": 0.25}}
    md = markdown(r)
    for heading in ("## Harmful rate per category", "## Utility", "## Differences", "## Gate"):
        assert heading not in md
    assert "## Overview" in md


def test_markdown_rejudged_counts_and_missing_differences():
    r = result()
    r["prompts"] = {"sources": ["a.jsonl", "b.jsonl"], "n": None, "duplicates_removed": 0, "smoke_set": False}
    r["comparison"] = [{"model": "a", "baseline": "b", "harmful_rate_diff": None, "utility_drop": {}}]
    md = markdown(r)
    assert "Prompts: 4, 4 from a.jsonl, b.jsonl (0 duplicate(s) removed)." in md
    assert "| a | b | – | – |" in md


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    p = plot(result(smoke=True), tmp_path / "chart.png")
    assert p == tmp_path / "chart.png" and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = result()
    empty["models"] = []  # nothing rated: still a (blank) chart, no legend
    assert plot(empty, tmp_path / "empty.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_reports_writes_all_three_and_records_them(tmp_path):
    pytest.importorskip("matplotlib")
    r = result()
    files = write_reports(r, tmp_path / "new" / "dir")
    out = tmp_path / "new" / "dir"
    assert files == {
        "json": str(out / "report.json"),
        "markdown": str(out / "report.md"),
        "png": str(out / "report.png"),
    }
    assert r["files"] == files
    assert json.loads((out / "report.json").read_text(encoding="utf-8")) == r  # files included
    assert (out / "report.json").read_text(encoding="utf-8").endswith("}\n")
    assert (out / "report.md").read_text(encoding="utf-8") == EXPECTED
    assert (out / "report.png").stat().st_size > 0
