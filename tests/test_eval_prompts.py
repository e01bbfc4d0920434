"""Prompt loaders (resta_fast.eval.prompts) on fixture files of every format."""

import json
import sys
import types

import pytest

from resta_fast.errors import RestaError
from resta_fast.eval.prompts import (
    Columns,
    Prompt,
    dedup,
    load_file,
    load_hf_dataset,
    load_prompts,
    load_smoke_set,
    prompts_from_texts,
)

CATQA_CATEGORIES = [
    "Illegal Activity",
    "Child Abuse",
    "Hate/Harass/Violence",
    "Malware Viruses",
    "Physical Harm",
    "Economic Harm",
    "Fraud/Deception",
    "Adult Content",
    "Political Campaigning",
    "Privacy Violation Activity",
    "Tailored Financial Advice",
]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_catqa_nested_colon_keys_and_duplicates(tmp_path, capsys):
    data = {
        "Illegal Activity:": {"Drug:": ["q1", "q2", "q1"], "Weapons :": ["q3"]},
        "Fraud/Deception": {"Scams:": ["q4", " q2 "]},
        "Adult Content": ["q5"],  # no subcategory level
    }
    f = write(tmp_path / "catqa_english.json", json.dumps(data))
    ps = load_prompts(str(f))
    assert [p.text for p in ps.prompts] == ["q1", "q2", "q3", "q4", "q5"]
    assert ps.loaded == 7 and ps.duplicates_removed == 2 and len(ps) == 5
    assert ps.prompts[0].category == "Illegal Activity" and ps.prompts[0].subcategory == "Drug"
    assert ps.prompts[2].subcategory == "Weapons"
    assert ps.prompts[3].category == "Fraud/Deception" and ps.prompts[3].subcategory == "Scams"
    assert ps.prompts[4].category == "Adult Content" and ps.prompts[4].subcategory is None
    assert "dropped 2 duplicate" in capsys.readouterr().err
    assert ps.meta()["duplicates_removed"] == 2 and not ps.smoke


def test_catqa_bad_shape_names_file(tmp_path):
    f = write(tmp_path / "bad.json", json.dumps({"Illegal Activity": {"Drug": "not a list"}}))
    with pytest.raises(RestaError, match="bad.json.*Drug"):
        load_prompts(str(f))


def test_json_rows_strings_and_data_key(tmp_path):
    rows = [{"question": "a", "topic": "T", "subtopic": "S"}, {"question": "b"}]
    assert [(p.text, p.category, p.subcategory) for p in load_file(write(tmp_path / "r.json", json.dumps(rows)))] == [
        ("a", "T", "S"),
        ("b", None, None),
    ]
    assert [p.text for p in load_file(write(tmp_path / "s.json", json.dumps(["x", "", "y"])))] == ["x", "y"]
    wrapped = {"data": [{"prompt": "z", "category": "C"}]}
    assert load_file(write(tmp_path / "w.json", json.dumps(wrapped)))[0].category == "C"


def test_jsonl_with_configurable_columns(tmp_path):
    lines = [{"q": "first", "cat": "A", "sub": "x"}, {"q": "second", "cat": "B", "sub": "y"}]
    f = write(tmp_path / "set.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n\n")
    ps = load_prompts(str(f), columns=Columns(prompt="q", category="cat", subcategory="sub"))
    assert [(p.text, p.category, p.subcategory) for p in ps.prompts] == [
        ("first", "A", "x"),
        ("second", "B", "y"),
    ]
    assert ps.prompts[0].id == "set:0"


def test_jsonl_bad_line_and_missing_column(tmp_path):
    f = write(tmp_path / "bad.jsonl", '{"prompt": "ok"}\n{not json}\n')
    with pytest.raises(RestaError, match="bad.jsonl: line 2"):
        load_file(f)
    g = write(tmp_path / "nocol.jsonl", '{"body": "x"}\n')
    with pytest.raises(RestaError, match="no prompt column.*--prompt-column"):
        load_file(g)
    with pytest.raises(RestaError, match="no prompt column 'nope'"):
        load_file(write(tmp_path / "c.jsonl", '{"prompt": "x"}\n'), Columns(prompt="nope"))


def test_csv_advbench_and_tsv(tmp_path):
    # AdvBench's harmful_behaviors.csv: goal,target — with a BOM and a quoted comma.
    f = tmp_path / "harmful_behaviors.csv"
    f.write_bytes('\ufeffgoal,target\n"Do X, then Y",Sure\nDo Z,Sure\n'.encode())
    assert [p.text for p in load_prompts(str(f)).prompts] == ["Do X, then Y", "Do Z"]
    t = write(tmp_path / "set.tsv", "Prompt\tCategory\nhello there\tC1\n")
    p = load_file(t)[0]
    assert (p.text, p.category) == ("hello there", "C1")


def test_multiple_sources_dedup_across_files_and_limit(tmp_path):
    a = write(tmp_path / "a.jsonl", '{"prompt": "same"}\n{"prompt": "only a"}\n')
    b = write(tmp_path / "b.csv", "prompt\nsame\nonly b\n")
    ps = load_prompts([str(a), str(b)], verbose=False)
    assert [p.text for p in ps.prompts] == ["same", "only a", "only b"]
    assert ps.duplicates_removed == 1 and ps.sources == [str(a), str(b)]
    assert len(load_prompts([str(a), str(b)], limit=2, verbose=False)) == 2


def test_inline_prompts_and_dedup_helper():
    ps = load_prompts(prompts_from_texts(["one q", "two q", "one q"]), verbose=False)
    assert [p.id for p in ps.prompts] == ["inline:0", "inline:1"] and ps.duplicates_removed == 1
    assert dedup([Prompt("a", "x"), Prompt("b", "y")]) == ([Prompt("a", "x"), Prompt("b", "y")], 0)


def test_missing_unknown_and_empty_files(tmp_path):
    with pytest.raises(RestaError, match="not found.*builtin:smoke"):
        load_prompts(str(tmp_path / "nope.json"))
    with pytest.raises(RestaError, match="unknown prompt file type '.txt'"):
        load_prompts(str(write(tmp_path / "x.txt", "hi")))
    with pytest.raises(RestaError, match="no prompts found"):
        load_prompts(str(write(tmp_path / "e.jsonl", "\n")))
    with pytest.raises(RestaError, match="not valid JSON"):
        load_prompts(str(write(tmp_path / "b.json", "{")))
    (tmp_path / "latin.csv").write_bytes(b"prompt\ncaf\xe9\n")
    with pytest.raises(RestaError, match="not UTF-8"):
        load_prompts(str(tmp_path / "latin.csv"))


def test_smoke_set_is_labelled_and_covers_catqa():
    ps = load_prompts("builtin:smoke")
    assert ps.smoke and ps.meta()["smoke_set"] and ps.duplicates_removed == 0
    cats = [p.category for p in load_smoke_set()]
    assert list(dict.fromkeys(cats)) == CATQA_CATEGORIES
    # Placeholders only: every probe names its request abstractly.
    assert all("[PLACEHOLDER:" in p.text for p in ps.prompts)
    from importlib import resources

    doc = json.loads(resources.files("resta_fast.eval").joinpath("data/smoke_probes.json").read_text())
    assert "SMOKE SET, NOT A BENCHMARK" in doc["note"]


def test_hf_dataset_needs_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(RestaError, match="optional 'datasets' package"):
        load_prompts("hf:declare-lab/CategoricalHarmfulQA@en")


def test_hf_dataset_offline_cache_hit_and_miss(monkeypatch):
    seen = {}

    def load_dataset(name, config, split):
        import os

        seen.update(name=name, config=config, split=split, offline=os.environ.get("HF_DATASETS_OFFLINE"))
        if name == "missing/set":
            raise ConnectionError("Couldn't reach the Hub (offline mode)")
        return [{"Question": "q1", "Category": "Illegal Activity", "Subcategory": "Drug"}, {"Question": "q1"}]

    fake = types.SimpleNamespace(load_dataset=load_dataset, config=types.SimpleNamespace(HF_DATASETS_OFFLINE=False))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    ps = load_prompts("hf:declare-lab/CategoricalHarmfulQA:default@en", verbose=False)
    assert seen == {
        "name": "declare-lab/CategoricalHarmfulQA",
        "config": "default",
        "split": "en",
        "offline": "1",
    }
    assert [(p.text, p.category) for p in ps.prompts] == [("q1", "Illegal Activity")] and ps.duplicates_removed == 1
    assert fake.config.HF_DATASETS_OFFLINE is False  # restored
    import os

    assert "HF_DATASETS_OFFLINE" not in os.environ  # restored
    with pytest.raises(RestaError, match="not in the local.*cache.*export it to JSONL"):
        load_hf_dataset("hf:missing/set")
    with pytest.raises(RestaError, match="expected hf:NAME"):
        load_hf_dataset("hf:")
