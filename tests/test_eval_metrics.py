"""Metrics, Wilson intervals, judge agreement, utility scoring and the gate, against hand-computed values."""

import doctest
import importlib
import json

import pytest

from resta_fast.errors import RestaError
from resta_fast.eval.gate import check_gate, check_model, gate_line, utility_drops
from resta_fast.eval.metrics import agreement, by_group, judge_agreement, summarize, wilson
from resta_fast.eval.utility import load_pairs, score_answers

H, L, U = "harmful", "harmless", "unparseable"


@pytest.mark.parametrize(
    "k,n,lo,hi",
    [
        # By hand: z=1.959964, centre=(p+z²/2n)/(1+z²/n), half=z·sqrt(p(1-p)/n+z²/4n²)/(1+z²/n).
        (1, 10, 0.01788, 0.40415),
        (5, 20, 0.11186, 0.46871),
        (0, 10, 0.0, 0.27753),  # upper = (z²/n)/(1+z²/n)
        (10, 10, 0.72247, 1.0),  # lower = 1/(1+z²/n)
        (50, 100, 0.40383, 0.59617),
    ],
)
def test_wilson_hand_computed(k, n, lo, hi):
    got = wilson(k, n)
    assert got[0] == pytest.approx(lo, abs=5e-5) and got[1] == pytest.approx(hi, abs=5e-5)


def test_wilson_edges():
    assert wilson(0, 0) is None
    assert wilson(0, 7)[0] == 0.0 and wilson(7, 7)[1] == 1.0
    lo, hi = wilson(3, 30)
    assert lo < 3 / 30 < hi


def test_summarize_excludes_unparseable():
    s = summarize([H, L, L, U, U, H, L])
    assert (s["n"], s["harmful"], s["harmless"], s["unparseable"]) == (7, 2, 3, 2)
    assert s["harmful_rate"] == pytest.approx(2 / 5)
    assert s["ci95"] == pytest.approx(list(wilson(2, 5)))
    empty = summarize([U, U])
    assert empty["harmful_rate"] is None and empty["ci95"] is None and empty["unparseable"] == 2


def test_by_group_per_category():
    g = by_group(["A", "B", "A", None, "A"], [H, L, L, H, U])
    assert list(g) == ["A", "B", "(none)"]
    assert (g["A"]["n"], g["A"]["harmful_rate"], g["A"]["unparseable"]) == (3, 0.5, 1)
    assert g["B"]["harmful_rate"] == 0.0 and g["(none)"]["harmful_rate"] == 1.0


def test_agreement_and_kappa_hand_computed():
    # 6 comparable pairs (the U is dropped): 4 agree; each judge says harmful 3 times of 6.
    # po = 4/6, pe = .5·.5 + .5·.5 = .5, κ = (2/3 − 1/2)/(1/2) = 1/3.
    a = agreement([H, H, L, L, H, L, U], [H, L, L, L, H, H, H])
    assert (
        a["n"] == 6
        and a["percent_agreement"] == pytest.approx(4 / 6)
        and a["cohen_kappa"] == pytest.approx(1 / 3)
    )
    # po = .75, pa = .75, pb = .5 → pe = .375 + .125 = .5 → κ = .5
    assert agreement([H, H, H, L], [H, H, L, L])["cohen_kappa"] == pytest.approx(0.5)
    assert agreement([H, H], [H, H]) == {"n": 2, "percent_agreement": 1.0, "cohen_kappa": None}
    assert agreement([U], [H]) == {"n": 0, "percent_agreement": None, "cohen_kappa": None}
    pairs = judge_agreement({"refusal": [H, L], "openai": [H, H], "classifier": [L, L]})
    assert list(pairs) == ["refusal vs openai", "refusal vs classifier", "openai vs classifier"]


def test_utility_scoring_and_loader(tmp_path):
    s = score_answers([" Paris ", "It is Paris.", "London"], ["Paris", "paris", "Paris"])
    assert s == {"n": 3, "exact_match": pytest.approx(1 / 3), "contains": pytest.approx(2 / 3)}
    f = tmp_path / "u.jsonl"
    f.write_text(
        json.dumps({"prompt": "2+2?", "answer": 4})
        + "\n\n"
        + json.dumps({"question": "cap?", "output": "Paris"})
        + "\n"
    )
    assert load_pairs(f) == [("2+2?", "4"), ("cap?", "Paris")]
    g = tmp_path / "k.jsonl"
    g.write_text(json.dumps({"q": "x", "a": "y"}) + "\n")
    assert load_pairs(g, prompt_key="q", answer_key="a") == [("x", "y")]
    with pytest.raises(RestaError, match="lacks a prompt/answer field"):
        load_pairs(g)
    with pytest.raises(RestaError, match="not found"):
        load_pairs(tmp_path / "none.jsonl")


def test_utility_drops():
    d = utility_drops({"exact_match": 0.5, "perplexity": 15.0}, {"exact_match": 0.75, "perplexity": 10.0})
    assert d == {"exact_match": 0.25, "perplexity": 0.5}
    assert utility_drops({"exact_match": 0.9}, {"perplexity": 3.0}) == {}
    assert utility_drops(None, None) == {}


def test_gate_decisions():
    good = {"model": "good", "n": 100, "harmful_rate": 0.02, "utility": {"exact_match": 0.79}}
    bad = {"model": "bad", "n": 100, "harmful_rate": 0.12, "utility": {"exact_match": 0.80}}
    dumb = {"model": "dumb", "n": 100, "harmful_rate": 0.0, "utility": {"exact_match": 0.50}}
    ref_util = {"exact_match": 0.80}
    assert check_gate([good]) == {"passed": True, "reason": "no gate thresholds set"}
    assert check_gate([good], max_harmful=0.05)["passed"]
    g = check_gate([good, bad], max_harmful=0.05)
    assert not g["passed"] and g["reason"] == "bad: harmful_rate 0.1200 > max 0.0500 (n=100)"
    g = check_gate([dumb], max_harmful=0.05, max_utility_drop=0.02, reference_utility=ref_util)
    assert not g["passed"] and g["reason"].startswith("dumb: exact_match drop 0.3000 > max 0.0200")
    g = check_gate([good], max_harmful=0.05, max_utility_drop=0.02, reference_utility=ref_util)
    assert g["passed"] and "exact_match drop 0.0100 <= 0.0200" in g["reason"]
    # The reference itself is not gated.
    ref = {"model": "ft", "n": 100, "harmful_rate": 0.3, "utility": ref_util}
    assert check_gate([ref, good], max_harmful=0.05, reference="ft", reference_utility=ref_util)["passed"]
    assert not check_gate([ref], max_harmful=0.05, reference="ft")["passed"]
    unknown = check_model({"model": "u", "n": 5, "harmful_rate": None}, max_harmful=0.05)
    assert not unknown["passed"] and "no parseable verdicts" in unknown["reason"]
    no_util = check_model(good, max_utility_drop=0.02, reference_utility={"perplexity": 3.0})
    assert not no_util["passed"] and "utility drop unknown" in no_util["reason"]
    ppl = check_model(
        {"model": "p", "utility": {"perplexity": 10.5}},
        max_utility_drop=0.02,
        reference_utility={"perplexity": 10.0},
    )
    assert not ppl["passed"] and "perplexity drop 0.0500 > max 0.0200" in ppl["reason"]


def test_gate_line_is_greppable():
    assert gate_line({"passed": True, "reason": "m: ok"}) == "RESTA_GATE: PASS m: ok"
    line = gate_line(check_gate([{"model": "m", "n": 4, "harmful_rate": 0.5}], max_harmful=0.1))
    assert line.startswith("RESTA_GATE: FAIL m: harmful_rate 0.5000") and "\n" not in line


@pytest.mark.parametrize(
    "module",
    [*(f"resta_fast.eval.{m}" for m in ("prompts", "generate", "chat", "responses", "judges", "judges.verdict",
                                         "judges.refusal", "judges.classifier", "judges.http", "judges.cache",
                                         "judges.openai", "metrics", "utility", "gate", "report", "tune", "cli")),
     "eval_fakes"],
)
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
