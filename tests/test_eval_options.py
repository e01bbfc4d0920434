"""eval/options.py: EvalOptions' defaults, normalisation and checks, and check_judges."""

import dataclasses
import json

import pytest

from resta_fast.errors import RestaError
from resta_fast.eval.options import EvalOptions, check_judges


class Named:
    def __init__(self, name):
        self.name = name


@pytest.fixture
def utility_file(tmp_path):
    f = tmp_path / "utility.jsonl"
    f.write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n")
    return str(f)


# --- EvalOptions --------------------------------------------------------------------------------


def test_options_defaults_are_evaluates_old_defaults():
    o = EvalOptions()
    assert (o.responses, o.judges, o.utility, o.perplexity, o.reference) == ((), ("refusal",), None, None, None)
    assert (o.engine, o.device, o.dtype, o.batch_size) == ("transformers", "cpu", "auto", None)
    assert (o.max_new_tokens, o.utility_max_new_tokens, o.perplexity_window, o.seed) == (128, 32, 1024, 0)
    assert (o.system_prompt, o.chat_template, o.columns, o.limit, o.out) == (None, None, None, None, None)
    assert (o.max_harmful, o.max_utility_drop, o.progress) == (None, None, None)


def test_options_normalise_responses_and_judges(tmp_path):
    assert EvalOptions(responses="a.jsonl").responses == ("a.jsonl",)
    assert EvalOptions(responses=tmp_path / "a.jsonl").responses == (str(tmp_path / "a.jsonl"),)
    assert EvalOptions(responses=["a.jsonl", tmp_path / "b.jsonl"]).responses == ("a.jsonl", str(tmp_path / "b.jsonl"))
    assert EvalOptions(judges=iter(["refusal"])).judges == ("refusal",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        EvalOptions().device = "cuda"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_utility_drop": 0.1, "utility": "U"}, "--max-utility-drop needs --reference MODEL"),
        ({"max_utility_drop": 0.1, "reference": "ft"}, "--max-utility-drop needs --utility FILE and/or --perplexity"),
        ({"max_harmful": 1.0001}, r"--max-harmful must be a fraction in \[0, 1\], got 1.0001$"),
        ({"max_harmful": -0.0001}, r"--max-harmful must be a fraction in \[0, 1\], got -0.0001$"),
        ({"utility": "/nonexistent/u.jsonl"}, "^--utility needs an existing file: /nonexistent/u.jsonl is missing$"),
        ({"perplexity": "/nonexistent/h.txt"}, "^--perplexity needs an existing file: /nonexistent/h.txt is missing$"),
        ({"limit": -1}, "^--limit must be an integer >= 1, got -1$"),
    ],
)
def test_options_refuse_what_does_not_fit(kwargs, message, utility_file):
    kwargs = {k: utility_file if v == "U" else v for k, v in kwargs.items()}
    opts = EvalOptions(**kwargs)  # construction only normalises: evaluate checks in its order
    with pytest.raises(RestaError, match=message) as e:
        opts.check()
    assert not str(e.value).endswith(".")  # core style


@pytest.mark.parametrize(
    "judges,message",
    [
        ([], "^pass at least one --judge"),
        (
            [Named("refusal"), Named("refusal")],
            r"^each judge may be given once; got \['refusal', 'refus",
        ),
    ],
)
def test_judges_refused_once_built(judges, message):
    with pytest.raises(RestaError, match=message):
        check_judges(judges)
    assert check_judges(iter([Named("a"), Named("b")]))[1].name == "b"


def test_options_accept_the_boundaries_and_recheck_on_replace(utility_file):
    assert EvalOptions(max_harmful=0.0).max_harmful == 0.0
    assert EvalOptions(max_harmful=1.0).max_harmful == 1.0
    ok = EvalOptions(max_utility_drop=0.0, reference="ft", utility=utility_file)
    assert ok.max_utility_drop == 0.0
    with pytest.raises(RestaError, match="--max-utility-drop needs --reference"):
        dataclasses.replace(ok, reference=None).check()
    assert EvalOptions.field_names()[-1] == "progress" and len(EvalOptions.field_names()) == 21
