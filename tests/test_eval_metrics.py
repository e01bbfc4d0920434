"""Metrics, Wilson intervals and judge agreement, against hand-computed values; every eval module's docstring examples.

Utility scoring is tested in test_eval_utility.py, the gate in test_eval_gate.py."""

import doctest
import importlib

import pytest

from resta_fast.eval.metrics import agreement, by_group, judge_agreement, summarize, wilson

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
    assert a["n"] == 6 and a["percent_agreement"] == pytest.approx(4 / 6) and a["cohen_kappa"] == pytest.approx(1 / 3)
    # po = .75, pa = .75, pb = .5 → pe = .375 + .125 = .5 → κ = .5
    assert agreement([H, H, H, L], [H, H, L, L])["cohen_kappa"] == pytest.approx(0.5)
    assert agreement([H, H], [H, H]) == {"n": 2, "percent_agreement": 1.0, "cohen_kappa": None}
    assert agreement([U], [H]) == {"n": 0, "percent_agreement": None, "cohen_kappa": None}
    pairs = judge_agreement({"refusal": [H, L], "openai": [H, H], "classifier": [L, L]})
    assert list(pairs) == ["refusal vs openai", "refusal vs classifier", "openai vs classifier"]


@pytest.mark.parametrize(
    "module",
    [
        *(
            f"resta_fast.eval.{m}"
            for m in (
                "prompts",
                "generate",
                "chat",
                "responses",
                "judges",
                "judges.verdict",
                "judges.refusal",
                "judges.classifier",
                "judges.http",
                "judges.cache",
                "judges.openai",
                "metrics",
                "utility",
                "gate",
                "report",
                "tune",
                "cli",
            )
        ),
        "eval_fakes",
    ],
)
def test_docstring_examples(module):
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
