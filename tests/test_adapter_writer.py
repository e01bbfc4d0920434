"""A PEFT adapter written from an input adapter with some tensors replaced (resta_fast/io/adapter_writer.py):
names, dtypes, shapes and order kept, the other tensors copied byte for byte, side files copied without local
paths, the input's own card and our own files left behind, and every file's sha256 returned."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from checkpoints import write_adapter as make_adapter
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from resta_fast.errors import CheckpointError, RestaError
from resta_fast.io.adapter_writer import write_adapter
from resta_fast.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LoraAdapter

B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
A1 = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def adapter(tmp_path):
    path = make_adapter(tmp_path / "adapter", layers=2, r=4)
    yield LoraAdapter(path)


@pytest.fixture()
def out(tmp_path):
    path = tmp_path / "out"
    path.mkdir()
    return path


def test_replaced_tensors_are_swapped_in_and_the_rest_copied_byte_for_byte(adapter, out):
    before = load_file(str(adapter.path / ADAPTER_WEIGHTS))
    new_b = torch.full_like(before[B0], 0.25)
    new_a = np.full(tuple(before[A1].shape), -1.5, dtype=np.float32)  # numpy works as well as torch
    files = write_adapter(out, adapter, {B0: new_b, A1: new_a}, {"format": "pt", "resta_fast": "1"}, fsync=False)
    got = load_file(str(out / ADAPTER_WEIGHTS))
    assert list(got) == list(adapter.file.tensors)  # the input's order
    assert torch.equal(got[B0], new_b) and torch.equal(got[A1], torch.from_numpy(new_a))
    for name, want in before.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        if name not in (B0, A1):
            assert got[name].numpy().tobytes() == want.numpy().tobytes(), name
    with safe_open(str(out / ADAPTER_WEIGHTS), "pt") as f:
        assert f.metadata() == {"format": "pt", "resta_fast": "1"}
    assert files == {p.name: sha256(p) for p in out.iterdir()}
    assert sorted(files) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]


def test_a_bf16_adapter_keeps_its_dtype(tmp_path, out):
    path = make_adapter(tmp_path / "bf16")
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(str(path / ADAPTER_WEIGHTS)).items()}
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    new_b = torch.ones_like(tensors[B0])
    write_adapter(out, LoraAdapter(path), {B0: new_b}, {"format": "pt"}, fsync=False)
    got = load_file(str(out / ADAPTER_WEIGHTS))
    assert got[B0].dtype == torch.bfloat16 and torch.equal(got[B0], new_b)
    assert torch.equal(got[A1], tensors[A1])


def test_side_files_are_copied_and_the_input_card_and_our_files_are_not(adapter, out):
    (adapter.path / "tokenizer.json").write_text('{"model": "bpe"}')
    (adapter.path / "special_tokens_map.json").write_text('{"base_model_name_or_path": "/home/ana/llama"}')
    (adapter.path / "README.md").write_text("the input's own card")
    (adapter.path / "resta_fast.json").write_text("{}")
    (adapter.path / "VALIDATION_FAILED").write_text("from an earlier run")
    (adapter.path / "checkpoint-100").mkdir()
    files = write_adapter(out, adapter, {}, {"format": "pt"}, fsync=False)
    assert sorted(files) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS, "special_tokens_map.json", "tokenizer.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    assert (out / "tokenizer.json").read_bytes() == (adapter.path / "tokenizer.json").read_bytes()
    # a JSON side file naming a local path loses the path (io/public.py)
    assert json.loads((out / "special_tokens_map.json").read_text()) == {"base_model_name_or_path": "llama"}
    assert files == {name: sha256(out / name) for name in files}


def test_the_config_is_copied_without_local_paths_or_rewritten_when_given(adapter, tmp_path):
    cfg = json.loads((adapter.path / ADAPTER_CONFIG).read_text())
    (adapter.path / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "base_model_name_or_path": "/data/llama-chat"}))
    copied = tmp_path / "copied"
    copied.mkdir()
    write_adapter(copied, LoraAdapter(adapter.path), {}, {}, fsync=False)
    assert json.loads((copied / ADAPTER_CONFIG).read_text()) == {**cfg, "base_model_name_or_path": "llama-chat"}

    given = tmp_path / "given"
    given.mkdir()
    new = {**cfg, "lora_alpha": cfg["r"], "base_model_name_or_path": "/data/llama-chat"}
    files = write_adapter(given, adapter, {}, {}, config=new, fsync=False)
    text = (given / ADAPTER_CONFIG).read_text()
    assert text == json.dumps({**new, "base_model_name_or_path": "llama-chat"}, indent=2, sort_keys=True) + "\n"
    assert files[ADAPTER_CONFIG] == sha256(given / ADAPTER_CONFIG)
    plain = tmp_path / "plain"
    plain.mkdir()
    write_adapter(plain, adapter, {}, {}, config=cfg, fsync=False)  # no path in it: written as given
    assert (plain / ADAPTER_CONFIG).read_text() == json.dumps(cfg, indent=2, sort_keys=True) + "\n"


@pytest.mark.parametrize("second", ["adapter_model.bin", "adapter_model-00001.safetensors"])
def test_a_second_weights_file_is_refused(adapter, out, second):
    (adapter.path / second).write_bytes(b"weights peft might load instead")
    with pytest.raises(RestaError) as info:
        write_adapter(out, adapter, {}, {}, fsync=False)
    assert str(info.value) == (
        f"{adapter.path}: holds a second weights file {second}; remove it (peft would load it instead of "
        f"{ADAPTER_WEIGHTS})"
    )


def test_replacements_must_fit_the_slot_they_fill(adapter, out):
    b = adapter.file.tensors[B0]
    with pytest.raises(AssertionError, match=r"replacements for tensors the adapter does not have: \['nope'\]"):
        write_adapter(out, adapter, {"nope": torch.zeros(1)}, {}, fsync=False)
    (out / "x").mkdir()
    with pytest.raises(AssertionError) as info:
        write_adapter(out / "x", adapter, {B0: torch.zeros(3, 3)}, {}, fsync=False)
    assert str(info.value) == f"replacement for {B0} has shape [3, 3], expected {list(b.shape)}"
    (out / "y").mkdir()
    with pytest.raises(AssertionError) as info:
        write_adapter(out / "y", adapter, {B0: torch.zeros(tuple(b.shape), dtype=torch.float64)}, {}, fsync=False)
    assert str(info.value) == f"replacement for {B0} is not stored as F32"


def test_an_input_adapter_changed_during_the_copy_is_a_clean_error(adapter, out):
    weights = adapter.path / ADAPTER_WEIGHTS
    adapter.file.raw(B0)  # mapped already, as after the scoring pass: the copy reads the old bytes
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    new = weights.with_suffix(".new")
    new.write_bytes(bytes(data))
    os.replace(new, weights)
    with pytest.raises(CheckpointError) as info:
        write_adapter(out, adapter, {}, {}, fsync=False)
    assert str(info.value) == (
        f"{weights}: file was modified or replaced during the run; the output would be inconsistent, "
        "so nothing was written"
    )
