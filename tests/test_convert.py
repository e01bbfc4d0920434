"""convert.py and convert_cli.py: ``resta-fast convert IN OUT``, end to end.

A ``.bin`` model (single or sharded) or adapter becomes safetensors holding the same tensors bit for bit,
loadable by the official safetensors loader and transformers, with the side files, a report and a card,
and passing ``resta-fast verify``. Exit codes: 0 written, 2 refused (an existing OUT without
--overwrite, an input that is safetensors already, a hostile or unreadable input), with nothing written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bin_fixtures import as_bin, nothing_left, output_tensors, same_bits, save_bin_model
from checkpoints import llama_config, llama_tensors, three_models, write_adapter, write_model
from safetensors import safe_open

from resta_fast import api
from resta_fast.cli import main
from resta_fast.convert import convert
from resta_fast.errors import RestaError
from resta_fast.report import REPORT_NAME


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def bin_model(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = llama_tensors(5)
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].half()
    tensors["model.norm.weight"] = tensors["model.norm.weight"].float()
    d = save_bin_model(tmp_path / "ft_bin", tensors, config=llama_config())
    (d / "tokenizer_config.json").write_text("{}")
    (d / "training_args.bin").write_bytes(b"\x80\x02 a pickle that is not copied")
    return d, tensors


def test_convert_writes_the_same_tensors_as_safetensors_and_verifies(tmp_path, capsys, bin_model):
    src, tensors = bin_model
    out = tmp_path / "out"
    code, _, err = cli(capsys, "convert", src, out, "--no-progress")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        REPORT_NAME,
        "tokenizer_config.json",
    ]
    got = output_tensors(out)
    assert list(got) == list(tensors) and all(same_bits(got[n], tensors[n]) for n in tensors)
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # the official loader
        assert f.metadata()["format"] == "pt" and json.loads(f.metadata()["resta_fast"])["command"] == "convert"
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["command"] == "convert" and report["plan"]["summary"]["copy"] == len(tensors)
    assert "pytorch_model.bin" in report["inputs"]["input"]["files"]
    code, out_text, _ = cli(capsys, "verify", out)
    assert code == 0 and out_text.rstrip().endswith("PASS")


def test_transformers_loads_what_convert_wrote(tmp_path, bin_model):
    transformers = pytest.importorskip("transformers")
    src, tensors = bin_model
    convert(src, tmp_path / "out", fsync=False)
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert model.model.norm.weight.equal(tensors["model.norm.weight"])


def test_a_converted_model_patches_like_the_bin_it_came_from(tmp_path):
    ft, al, un = three_models(tmp_path)
    ftb = as_bin(ft, tmp_path / "ft_bin")
    convert(ftb, tmp_path / "ft_conv", fsync=False)
    kw = dict(aligned=al, unaligned=un, beta=0.5, dare=0.2, seed=2, fsync=False)
    api.patch(ftb, tmp_path / "from_bin", **kw)
    api.patch(tmp_path / "ft_conv", tmp_path / "from_conv", **kw)
    a, b = output_tensors(tmp_path / "from_bin"), output_tensors(tmp_path / "from_conv")
    assert list(a) == list(b) and all(same_bits(a[n], b[n]) for n in a)


def test_a_sharded_input_gives_sharded_output_under_safetensors_names(tmp_path):
    tensors = llama_tensors(6)
    src = save_bin_model(tmp_path / "ft_bin", tensors, shards=3, config=llama_config())
    report = convert(src, tmp_path / "out", fsync=False)
    names = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert report["plan"]["summary"]["files"] == 3
    for shard in names:  # each shard keeps its own tensors, in order
        want = torch.load(src / shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin"))
        with safe_open(str(tmp_path / "out" / shard), "pt") as f:
            assert set(f.keys()) == set(want)
            assert all(same_bits(f.get_tensor(k), want[k]) for k in want)


def test_a_sharded_input_gets_model_safetensors_index_json(tmp_path):
    src = save_bin_model(tmp_path / "ft_bin", llama_tensors(6), shards=2, config=llama_config())
    convert(src, tmp_path / "out", fsync=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}


def test_an_existing_out_is_refused_unless_overwrite(tmp_path, capsys, bin_model):
    src, _ = bin_model
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    code, _, err = cli(capsys, "convert", src, out)
    assert code == 2 and err.count("\n") == 1 and "already exists; pass --overwrite" in err
    assert (out / "keep").read_text() == "mine"
    code, _, err = cli(capsys, "convert", src, out, "--overwrite", "--no-fsync")
    assert code == 0 and not (out / "keep").exists() and (out / "model.safetensors").is_file()


def test_an_out_inside_the_input_is_refused(tmp_path, capsys, bin_model):
    src, _ = bin_model
    code, _, err = cli(capsys, "convert", src, src / "converted")
    assert code == 2 and "inside input" in err and not (src / "converted").exists()


def test_a_safetensors_input_has_nothing_to_convert(tmp_path, capsys):
    src = write_model(tmp_path / "st", llama_tensors(1))
    code, _, err = cli(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and "is safetensors already; nothing to convert" in err and nothing_left(tmp_path / "out")


@pytest.mark.parametrize(
    "weights, needle",
    [
        (b"\x80\x02 a legacy pickle", "legacy (pre-1.6, non-zip) torch format"),
        (b"PK\x03\x04 torn", "no zip end record"),
    ],
)
def test_an_unreadable_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, weights, needle):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "pytorch_model.bin").write_bytes(weights)
    code, _, err = cli(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and needle in err and "pytorch_model.bin" in err
    assert nothing_left(tmp_path / "out")


def test_a_hostile_input_runs_nothing_and_writes_nothing(tmp_path, capsys):
    import os

    from bin_fixtures import Payload, touch_command

    marker = tmp_path / "ran"
    src = save_bin_model(tmp_path / "evil", {"w": torch.ones(2), "x": Payload(os.system, touch_command(marker))})
    code, _, err = cli(capsys, "convert", src, tmp_path / "out")
    assert code == 2 and "the pickle imports posix.system" in err
    assert not marker.exists() and nothing_left(tmp_path / "out")


def test_a_missing_input_is_exit_2(tmp_path, capsys):
    code, _, err = cli(capsys, "convert", tmp_path / "nope", tmp_path / "out")
    assert code == 2 and "does not exist" in err


def test_a_bin_adapter_converts_to_adapter_model_safetensors(tmp_path, capsys):
    from safetensors.torch import load_file

    ft, al, un = three_models(tmp_path)
    adapter = write_adapter(tmp_path / "lora")
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    bin_adapter = tmp_path / "lora_bin"
    bin_adapter.mkdir()
    shutil.copyfile(adapter / "adapter_config.json", bin_adapter / "adapter_config.json")
    torch.save(tensors, bin_adapter / "adapter_model.bin")
    code, _, err = cli(capsys, "convert", bin_adapter, tmp_path / "lora_conv", "--no-fsync")
    assert code == 0, err
    out = tmp_path / "lora_conv"
    assert {"adapter_model.safetensors", "adapter_config.json", REPORT_NAME} <= {p.name for p in out.iterdir()}
    assert not (out / "adapter_model.bin").exists()
    got = load_file(str(out / "adapter_model.safetensors"))
    assert list(got) == list(tensors) and all(same_bits(got[k], tensors[k]) for k in tensors)
    kw = dict(aligned=al, unaligned=un, beta=0.5, fsync=False)
    api.patch(bin_adapter, tmp_path / "p_bin", **kw)
    api.patch(out, tmp_path / "p_conv", **kw)
    a, b = output_tensors(tmp_path / "p_bin"), output_tensors(tmp_path / "p_conv")
    assert list(a) == list(b) and all(same_bits(a[n], b[n]) for n in a)


def test_a_safetensors_adapter_has_nothing_to_convert(tmp_path):
    with pytest.raises(RestaError, match="nothing to convert"):
        convert(write_adapter(tmp_path / "lora"), tmp_path / "out")


def test_convert_needs_no_torch(tmp_path, bin_model):
    """With the C++ kernel built, converting imports no torch (like the CPU patch path)."""
    pytest.importorskip("resta_fast._C")
    src, _ = bin_model
    code = (
        "import sys; from resta_fast.cli import main\n"
        f"assert main(['convert', {str(src)!r}, {str(tmp_path / 'out')!r}, '--no-fsync']) == 0\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_the_card_says_conversion_and_the_output_names_no_path(tmp_path, capsys, bin_model):
    from huggingface_hub import ModelCard

    src, _ = bin_model
    assert cli(capsys, "convert", src, tmp_path / "out", "--no-fsync", "--no-progress")[0] == 0
    meta = ModelCard.load(tmp_path / "out" / "README.md").data.to_dict()
    assert meta["tags"] == ["safetensors"] and "base_model_relation" not in meta and "base_model" not in meta
    for p in (tmp_path / "out").iterdir():
        assert str(tmp_path).encode() not in p.read_bytes(), p.name
    assert cli(capsys, "convert", src, tmp_path / "rp", "--no-fsync", "--no-progress", "--record-paths")[0] == 0
    report = json.loads((tmp_path / "rp" / REPORT_NAME).read_text())
    assert report["sources"]["input"]["path"] == str(Path(src).absolute())
