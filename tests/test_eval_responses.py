"""Responses files: what save_responses writes, load_responses reads back, and each bad file's error."""

import json

import pytest

from resta_fast.errors import RestaError
from resta_fast.eval.prompts import Prompt
from resta_fast.eval.responses import load_responses, save_responses


def test_responses_roundtrip_and_errors(tmp_path):
    prompts = [Prompt("s:0", "q one", "Cat", "Sub"), Prompt("s:1", "q two")]
    f = save_responses(tmp_path / "r" / "m.jsonl", "/models/m", prompts, ["a1", ""])
    rows = [json.loads(x) for x in f.read_text().splitlines()]
    assert rows[0] == {
        "id": "s:0",
        "prompt": "q one",
        "category": "Cat",
        "subcategory": "Sub",
        "response": "a1",
        "model": "/models/m",
    }
    model, p2, r2 = load_responses(f)
    assert model == "/models/m" and p2 == prompts and r2 == ["a1", ""]
    with pytest.raises(RestaError, match="not found"):
        load_responses(tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(RestaError, match="line 1.*'prompt' and 'response'"):
        load_responses(bad)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "x", "response": "y", "model": "a"}\n{"prompt": "x", "response": "y", "model": "b"}\n')
    with pytest.raises(RestaError, match="mixes responses"):
        load_responses(mixed)


def test_roundtrip_keeps_unicode_order_and_one_line_per_prompt(tmp_path):
    prompts = [Prompt(f"s:{i}", q) for i, q in enumerate(["Wie geht's?", "你好", 'a "quoted"\nline'])]
    responses = ["Gut, danke.", "不行", "line one\nline two"]
    f = save_responses(tmp_path / "deep" / "er" / "m.jsonl", "out/m", prompts, responses)
    assert f == tmp_path / "deep" / "er" / "m.jsonl"
    text = f.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 3 and "你好" in text  # written as UTF-8, not \u escapes
    assert load_responses(f) == ("out/m", prompts, responses)
    assert load_responses(str(f)) == ("out/m", prompts, responses)


def test_save_needs_one_response_per_prompt(tmp_path):
    with pytest.raises(ValueError):
        save_responses(tmp_path / "m.jsonl", "m", [Prompt("s:0", "q")], ["a", "b"])


def test_defaults_for_missing_fields_and_blank_lines(tmp_path):
    f = tmp_path / "ckpt.jsonl"
    f.write_text('\n{"prompt": "x", "response": null}\n  \n{"prompt": "y", "response": "r", "id": 7}\n')
    model, prompts, responses = load_responses(f)
    # No model recorded: the file's stem; no id: <stem>:<line index>; a null response reads as "".
    assert model == "ckpt"
    assert prompts == [Prompt("ckpt:1", "x"), Prompt("7", "y")]
    assert responses == ["", "r"]


def test_not_found_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(RestaError, match=r"responses file .*none\.jsonl not found.*resta-fast eval --out"):
        load_responses(tmp_path / "none.jsonl")
    with pytest.raises(RestaError, match="not found"):
        load_responses(tmp_path)  # a directory is not a responses file


def test_bad_json_line_names_the_line(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text('{"prompt": "x", "response": "y"}\n\n{"prompt": "x", "response"\n')
    with pytest.raises(RestaError, match=r"m\.jsonl: line 3 is not a responses record \(JSONDecodeError"):
        load_responses(f)


def test_missing_response_key_names_it(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text('{"response": "y"}\n')
    with pytest.raises(RestaError, match=r"line 1 is not a responses record \(KeyError: 'prompt'\)"):
        load_responses(f)


@pytest.mark.parametrize("line", ["5", '"x"', "[1, 2]", "null"])
def test_a_json_line_that_is_not_an_object_names_the_line(tmp_path, line):
    f = tmp_path / "m.jsonl"
    f.write_text('{"prompt": "x", "response": "y"}\n' + line + "\n")
    want = r"m\.jsonl: line 2 is not a responses record \(TypeError: a JSON \w+, not an object"
    with pytest.raises(RestaError, match=want):
        load_responses(f)


def test_mixed_models_lists_them(tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text('{"prompt": "x", "response": "y", "model": "b"}\n{"prompt": "x", "response": "y", "model": "a"}\n')
    with pytest.raises(RestaError, match=r"mixes responses of several models \(\['a', 'b'\]\); keep one model"):
        load_responses(f)


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file_holds_no_responses(tmp_path, content):
    f = tmp_path / "m.jsonl"
    f.write_text(content)
    with pytest.raises(RestaError, match=r"m\.jsonl holds no responses$"):
        load_responses(f)
