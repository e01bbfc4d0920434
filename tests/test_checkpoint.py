"""Hugging Face model directories (resta_fast/io/checkpoint.py) against hostile ones: an index.json that
names shards outside the directory, links that escape it, a broken index or config; each is one
CheckpointError naming the file with the exact message. The hub cache's own links into blobs/ are allowed."""

import hashlib
import json
import os
import shutil

import pytest
from checkpoints import three_models
from fault_fixtures import SMALL

from resta_fast.errors import CheckpointError
from resta_fast.io.checkpoint import Checkpoint

ESCAPE = " is not a plain file name; refusing to read outside the model directory"


def _sharded(tmp_path):
    ft, _, _ = three_models(tmp_path / "m", shards=2, **SMALL)
    return ft, json.loads((ft / "model.safetensors.index.json").read_text())


def _write_index(ft, index):
    (ft / "model.safetensors.index.json").write_text(json.dumps(index))


def _rename_shard(ft, index, new_name):
    index["weight_map"] = {k: (new_name if v.startswith("model-00002") else v) for k, v in index["weight_map"].items()}
    _write_index(ft, index)


def _case_shard_in_subdir(tmp_path):
    ft, index = _sharded(tmp_path)
    (ft / "sub").mkdir()
    os.rename(ft / "model-00002-of-00002.safetensors", ft / "sub" / "s.safetensors")
    _rename_shard(ft, index, "sub/s.safetensors")
    return ft, "shard name 'sub/s.safetensors'" + ESCAPE


def _case_shard_dotdot(tmp_path):
    ft, index = _sharded(tmp_path)
    shutil.copy(ft / "model-00002-of-00002.safetensors", ft.parent / "stolen.safetensors")
    _rename_shard(ft, index, "../stolen.safetensors")
    return ft, (
        "shard name '../stolen.safetensors' is not a plain file name; refusing to read outside the model directory"
    )


def _case_shard_absolute(tmp_path):
    ft, index = _sharded(tmp_path)
    _rename_shard(ft, index, "/etc/passwd")
    return ft, "shard name '/etc/passwd'" + ESCAPE


def _case_shard_backslash(tmp_path):
    ft, index = _sharded(tmp_path)
    _rename_shard(ft, index, "..\\stolen.safetensors")
    return ft, (
        "shard name '..\\\\stolen.safetensors' is not a plain file name; refusing to read outside the model directory"
    )


def _case_shard_dotdot_alone(tmp_path):
    ft, index = _sharded(tmp_path)
    _rename_shard(ft, index, "..")
    return ft, "shard name '..'" + ESCAPE


def _case_shard_nul(tmp_path):
    ft, index = _sharded(tmp_path)
    _rename_shard(ft, index, "model.safetensors\x00.txt")
    return ft, (
        "shard name 'model.safetensors\\x00.txt' is not a plain file name; refusing to read outside the model directory"
    )


def _case_shard_symlink_outside(tmp_path):
    ft, _ = _sharded(tmp_path)
    shard = ft / "model-00002-of-00002.safetensors"
    elsewhere = tmp_path / "secret.safetensors"
    os.rename(shard, elsewhere)
    os.symlink(elsewhere, shard)
    return ft, (
        f"shard 'model-00002-of-00002.safetensors' is a link pointing outside the model directory "
        f"({os.path.realpath(elsewhere)}); refusing to read it"
    )


def _case_shard_missing(tmp_path):
    ft, _ = _sharded(tmp_path)
    os.remove(ft / "model-00002-of-00002.safetensors")
    return ft, (
        f"names shard 'model-00002-of-00002.safetensors', which does not exist in {ft}; re-download the missing shard"
    )


def _case_index_not_json(tmp_path):
    ft, _ = _sharded(tmp_path)
    (ft / "model.safetensors.index.json").write_text("{'weight_map': }")
    return ft, (
        "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
        "(char 1)); regenerate the index"
    )


def _case_index_recursion_bomb(tmp_path):
    ft, _ = _sharded(tmp_path)
    (ft / "model.safetensors.index.json").write_text("[" * 100_000 + "]" * 100_000)
    return ft, "JSON nested too deeply; regenerate the index"


def _case_index_over_cap(tmp_path):
    ft, _ = _sharded(tmp_path)
    with open(ft / "model.safetensors.index.json", "r+b") as fh:
        fh.truncate(100_000_001)  # sparse: costs no disk
    return ft, "100000001 bytes is over the 100000000-byte cap; the index is corrupt, regenerate it"


def _case_index_weight_map_not_strings(tmp_path):
    ft, index = _sharded(tmp_path)
    index["weight_map"]["model.norm.weight"] = ["model-00001-of-00002.safetensors"]
    _write_index(ft, index)
    return ft, "needs a 'weight_map' object of tensor -> shard file"


def _case_index_names_wrong_shard(tmp_path):
    ft, index = _sharded(tmp_path)
    name, shard = next(iter(index["weight_map"].items()))
    other = next(v for v in index["weight_map"].values() if v != shard)
    index["weight_map"][name] = other
    _write_index(ft, index)
    return ft, (
        f"says tensor {name!r} is in {other}, but that shard does not contain it; the index and shards disagree"
    )


def _case_config_not_object(tmp_path):
    ft, _ = _sharded(tmp_path)
    (ft / "config.json").write_text("[1, 2]")
    return ft, "must be a JSON object, got list; fix or remove it"


INDEX_CASES = {
    f.__name__[len("_case_") :]: f
    for f in (
        _case_shard_in_subdir,
        _case_shard_dotdot,
        _case_shard_absolute,
        _case_shard_backslash,
        _case_shard_dotdot_alone,
        _case_shard_nul,
        _case_shard_symlink_outside,
        _case_shard_missing,
        _case_index_not_json,
        _case_index_recursion_bomb,
        _case_index_over_cap,
        _case_index_weight_map_not_strings,
        _case_index_names_wrong_shard,
        _case_config_not_object,
    )
}


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_hostile_model_directory_exact_error(tmp_path, case):
    ft, message = INDEX_CASES[case](tmp_path)
    where = ft / ("config.json" if case.startswith("config") else "model.safetensors.index.json")
    with pytest.raises(CheckpointError) as info:
        Checkpoint(ft, role="finetuned")
    assert str(info.value) == f"{where}: {message}"


def test_hf_cache_snapshot_links_into_blobs_are_allowed(tmp_path):
    """The hub cache links snapshots/REV/* to ../../blobs/*: that is not an escape."""
    ft, _ = _sharded(tmp_path)
    repo = tmp_path / "models--org--name"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in ft.iterdir():
        blob = repo / "blobs" / hashlib.sha256(p.name.encode()).hexdigest()
        shutil.copy(p, blob)
        os.symlink(os.path.relpath(blob, snap), snap / p.name)
    ck = Checkpoint(snap)
    assert len(ck.files) == 2
    ck.close()
