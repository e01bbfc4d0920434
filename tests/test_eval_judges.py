"""The judges package: make_judge by CLI name, and the names callers import from resta_fast.eval.judges.

Per-module tests: test_eval_judges_{refusal,classifier,openai,http,cache}.py.
"""

import importlib

import pytest

import resta_fast.eval.judges as judges
from resta_fast.errors import RestaError

# Every name imported from resta_fast.eval.judges in resta_fast/, tests/ and benchmarks/, with its home module.
PUBLIC = {
    "HARMFUL": "verdict",
    "HARMLESS": "verdict",
    "UNPARSEABLE": "verdict",
    "LABELS": "verdict",
    "Verdict": "verdict",
    "RefusalJudge": "refusal",
    "REFUSAL_PHRASES": "refusal",
    "EMPTY_POLICIES": "refusal",
    "ClassifierJudge": "classifier",
    "CLASSIFIER_STYLES": "classifier",
    "detect_style": "classifier",
    "parse_llama_guard": "classifier",
    "parse_yes_no": "classifier",
    "OpenAIJudge": "openai",
    "parse_ab_tags": "openai",
    "RateLimiter": "http",
    "VerdictCache": "cache",
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_names_come_from_their_module(name):
    home = importlib.import_module(f"resta_fast.eval.judges.{PUBLIC[name]}")
    assert getattr(judges, name) is getattr(home, name)
    assert name in judges.__all__


def test_make_judge_by_name(tmp_path):
    assert type(judges.make_judge("refusal")) is judges.RefusalJudge
    assert type(judges.make_judge("classifier", model_dir=tmp_path / "Llama-Guard-3-8B")) is judges.ClassifierJudge
    assert type(judges.make_judge("openai", url="http://127.0.0.1:8000/v1")) is judges.OpenAIJudge
    with pytest.raises(RestaError, match="unknown judge 'nope'; choose from refusal, classifier, openai"):
        judges.make_judge("nope")
