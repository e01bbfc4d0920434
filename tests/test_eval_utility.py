"""eval/utility.py: exact-match/contains scoring, the prompt/answer loader and the perplexity text reader."""

import json

import pytest

from resta_fast.errors import RestaError
from resta_fast.eval.utility import ANSWER_KEYS, PROMPT_KEYS, load_pairs, read_text, score_answers


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


def test_score_answers_strips_for_exact_match_and_casefolds_for_contains():
    s = score_answers(["  4\n", "FOUR apples", "4.0"], ["4", "four", "4"])
    assert s == {"n": 3, "exact_match": pytest.approx(1 / 3), "contains": pytest.approx(1.0)}
    # Contains strips the answer, not the completion: " a " is found inside "bab".
    assert score_answers(["bab"], [" a "])["contains"] == 1.0
    assert score_answers(iter(["x"]), iter(["x"])) == {"n": 1, "exact_match": 1.0, "contains": 1.0}


def test_score_answers_empty_and_mismatched():
    assert score_answers([], []) == {"n": 0, "exact_match": None, "contains": None}
    with pytest.raises(ValueError):
        score_answers(["a"], ["a", "b"])  # one completion per answer, or the rates lie


def test_load_pairs_guesses_each_usual_key(tmp_path):
    rows = [{pk: f"q{i}", ak: i} for i, (pk, ak) in enumerate(zip(PROMPT_KEYS, ANSWER_KEYS[:4], strict=True))]
    f = tmp_path / "keys.jsonl"
    # A byte-order mark and blank lines are tolerated.
    f.write_text("\ufeff" + "\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_pairs(f) == [(f"q{i}", str(i)) for i in range(len(rows))]


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"prompt": "q", "answer": "a"}\n{not json\n', r"line 2 is not valid JSON \(.*\); fix that line$"),
        ('["q", "a"]\n', r"line 1 is not a JSON object; write one \{\"prompt\": ..., \"answer\": ...\} per line$"),
        (
            '{"prompt": "q"}\n',
            r"line 1 lacks a prompt/answer field \(has \['prompt'\]\); use keys 'prompt' and 'answer'$",
        ),
        ("\n  \n", r"has no prompt/answer pairs: add"),
    ],
)
def test_load_pairs_refuses_bad_lines(tmp_path, text, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(text)
    with pytest.raises(RestaError, match=message) as e:
        load_pairs(f)
    assert str(f) in str(e.value) and not str(e.value)[0].isupper()


def test_read_text(tmp_path):
    f = tmp_path / "h.txt"
    f.write_bytes(b"one two\n" + b"\xff three\n")
    assert read_text(f) == "one two\n\ufffd three\n"  # undecodable bytes replaced, not fatal
    with pytest.raises(RestaError, match="^perplexity text .* not found: pass a UTF-8 text file"):
        read_text(tmp_path / "none.txt")
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    with pytest.raises(RestaError, match="^perplexity text .*blank.txt is empty"):
        read_text(tmp_path / "blank.txt")
