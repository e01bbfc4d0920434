"""resta_fast/io/public.py: side files copied into outputs carry no local path."""

import json

from resta_fast.io.public import copy_public, is_local_path, public_json


def test_local_paths_in_the_known_fields_become_their_last_part(tmp_path):
    src = tmp_path / "adapter_config.json"
    src.write_text(json.dumps({"base_model_name_or_path": "/home/ana/models/llama/", "r": 8, "note": "/keep/me"}))
    copy_public(src, tmp_path / "out.json")
    got = json.loads((tmp_path / "out.json").read_text())
    assert got == {"base_model_name_or_path": "llama", "r": 8, "note": "/keep/me"}  # only the known fields
    assert (tmp_path / "out.json").read_text().endswith("}\n")


def test_hub_ids_relative_names_and_other_files_are_copied_byte_for_byte(tmp_path):
    for name, text in (
        ("config.json", '{"_name_or_path": "meta-llama/Llama-2-7b-hf",   "x": 1}'),
        ("tokenizer_config.json", '{"_name_or_path": "llama"}'),
        ("broken.json", "{not json"),
        ("tokenizer.model", "\x00binary /abs/path"),
    ):
        (tmp_path / name).write_text(text)
        copy_public(tmp_path / name, tmp_path / f"out-{name}")
        assert (tmp_path / f"out-{name}").read_bytes() == (tmp_path / name).read_bytes(), name


def test_what_counts_as_a_local_path():
    assert is_local_path("/abs") and is_local_path("~/x") and is_local_path("C:\\models\\x")
    assert not any(is_local_path(v) for v in ("org/name", "name", "", None, 3))
    assert public_json({"_name_or_path": "C:\\models\\x"}) == {"_name_or_path": "x"}
