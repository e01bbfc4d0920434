"""io/torch_bin.py: zip-format torch checkpoints read pickle-free, and refused when hostile.

Good files are what ``torch.save`` writes (every dtype, with and without ``_metadata``, pickle
protocols 2 and 4, parameters, views into a shared storage, tied aliases), compared with
``torch.load(weights_only=True)``. Every command reading one gives the tensors its safetensors copy
gives, bit for bit. Hostile files (code in the pickle, globals outside the allow-list, bad storage
references, bad strides, broken or compressed zips, escaping index entries) are one line, exit 2,
nothing run and nothing written; Hypothesis builds variants of each kind.
"""

from __future__ import annotations

import builtins
import importlib
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from bin_fixtures import (
    BIN_INDEX,
    Payload,
    as_bin,
    call,
    frag,
    members,
    nothing_left,
    output_tensors,
    same_bits,
    save_bin_model,
    state_dict_pickle,
    tensor_opcodes,
    torch_zip,
    touch_command,
    write_zip,
)
from checkpoints import llama_config, llama_tensors, three_models, write_adapter, write_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resta_fast import api
from resta_fast.cli import main
from resta_fast.errors import CheckpointError, RestaError
from resta_fast.io import torch_bin
from resta_fast.io.checkpoint import Checkpoint
from resta_fast.io.reader import DTYPES, ITEMSIZE
from resta_fast.io.torch_bin import MAX_ALIASES, TorchBinFile, safetensors_name

FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
_DIR = Path(tempfile.mkdtemp(prefix="resta-torchbin-"))


def read_all(path) -> dict[str, torch.Tensor]:
    """Every tensor of a .bin file through our reader, shaped."""
    f = TorchBinFile(path)
    try:
        return {n: f.view(n).view(i.shape).clone() for n, i in f.tensors.items()}
    finally:
        f.close()


def cli(capsys, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``resta-fast args``."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- what torch.save writes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    [
        torch.bfloat16,
        torch.float16,
        torch.float32,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.float8_e4m3fn,  # _rebuild_tensor_v3 with an UntypedStorage
        torch.uint16,
    ],
)
@pytest.mark.parametrize("protocol", [2, 4])
def test_every_dtype_torch_save_writes_reads_as_torch_load_gives_it(tmp_path, dtype, protocol):
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(5, 7, generator=g) * 3).to(dtype)
    tensors = {"w": base, "row": base[2], "scalar": base[0, 0].clone(), "empty": base[:0], "tail": base[3:]}
    torch.save(tensors, tmp_path / "x.bin", pickle_protocol=protocol)
    # weights_only=True refuses protocol 4 (its FRAME opcode): our own file, so the full loader compares
    got, want = read_all(tmp_path / "x.bin"), torch.load(tmp_path / "x.bin", weights_only=protocol == 2)
    assert list(got) == list(want)
    for name in want:
        assert same_bits(got[name], want[name]), name


@pytest.mark.parametrize("keep_vars", [False, True])  # True: parameters (_rebuild_parameter)
def test_a_module_state_dict_with_metadata_reads_like_torch_load(tmp_path, keep_vars):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LayerNorm(4), torch.nn.Embedding(9, 4)).bfloat16()
    state = model.state_dict(keep_vars=keep_vars)
    assert hasattr(model.state_dict(), "_metadata")  # the BUILD the unpickler must accept
    torch.save(state, tmp_path / "m.bin")
    got, want = read_all(tmp_path / "m.bin"), torch.load(tmp_path / "m.bin", weights_only=True)
    assert list(got) == list(want) and all(same_bits(got[n], want[n].detach()) for n in want)


def test_tied_weights_are_aliases_of_one_storage(tmp_path):
    emb = torch.randn(8, 4).bfloat16()
    torch.save({"model.embed_tokens.weight": emb, "lm_head.weight": emb}, tmp_path / "t.bin")
    f = TorchBinFile(tmp_path / "t.bin")
    a, b = f.tensors["model.embed_tokens.weight"], f.tensors["lm_head.weight"]
    assert (a.start, a.end) == (b.start, b.end) and same_bits(f.view("lm_head.weight").view(8, 4), emb)
    f.close()


def test_tensor_offsets_are_absolute_positions_of_the_bytes_in_the_file(tmp_path):
    t = torch.arange(12, dtype=torch.float32)
    torch.save({"a": t[4:]}, tmp_path / "o.bin")
    info = TorchBinFile(tmp_path / "o.bin").tensors["a"]
    raw = (tmp_path / "o.bin").read_bytes()[info.start : info.end]
    assert raw == t[4:].numpy().tobytes() and info.nbytes == 32


def test_reading_needs_no_torch(tmp_path):
    torch.save({"w": torch.ones(3, 2).half()}, tmp_path / "w.bin")
    code = (
        "import sys; from resta_fast.io.torch_bin import TorchBinFile\n"
        f"f = TorchBinFile({str(tmp_path / 'w.bin')!r}); a = f.array('w')\n"
        "assert a.tolist() == [1.0] * 6 and 'torch' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_safetensors_names_of_bin_files():
    assert safetensors_name("pytorch_model.bin") == "model.safetensors"
    assert safetensors_name("pytorch_model-00002-of-00003.bin") == "model-00002-of-00003.safetensors"
    assert safetensors_name("consolidated.pt") == "consolidated.safetensors"
    assert safetensors_name("model-00001-of-00002.safetensors") == "model-00001-of-00002.safetensors"


# --- every command: the .bin input gives what its safetensors copy gives ---------------------------


def _bin_world(root: Path, shards: int = 1):
    ft, al, un = three_models(root, shards=shards)
    return (ft, al, un), (as_bin(ft, root / "ft_bin"), as_bin(al, root / "al_bin"), as_bin(un, root / "un_bin"))


def assert_same_outputs(a: Path, b: Path) -> None:
    ta, tb = output_tensors(a), output_tensors(b)
    assert list(ta) == list(tb) and ta
    for name in ta:
        assert same_bits(ta[name], tb[name]), name
    assert sorted(p.name for p in a.glob("*.safetensors")) == sorted(p.name for p in b.glob("*.safetensors"))


@pytest.mark.parametrize("dare, staging", [(None, "mmap"), (0.3, "mmap"), (0.3, "read")])
def test_patch_of_bin_inputs_equals_patch_of_their_safetensors_copies(tmp_path, dare, staging):
    (ft, al, un), (ftb, alb, unb) = _bin_world(tmp_path)
    kw = dict(beta=0.5, dare=dare, seed=3, fsync=False)
    api.patch(ft, tmp_path / "st", aligned=al, unaligned=un, **kw)
    api.patch(ftb, tmp_path / "bin", aligned=alb, unaligned=unb, staging=staging, chunk_elems=100, **kw)
    assert_same_outputs(tmp_path / "st", tmp_path / "bin")
    assert (tmp_path / "bin" / "config.json").read_bytes() == (ft / "config.json").read_bytes()


def test_a_sharded_bin_fine_tune_keeps_its_layout_under_safetensors_names(tmp_path):
    (ft, al, un), (ftb, alb, unb) = _bin_world(tmp_path, shards=3)
    api.patch(ft, tmp_path / "st", aligned=al, unaligned=un, beta=0.5, fsync=False)
    api.patch(ftb, tmp_path / "bin", aligned=alb, unaligned=unb, beta=0.5, fsync=False)
    assert_same_outputs(tmp_path / "st", tmp_path / "bin")
    assert len(list((tmp_path / "bin").glob("model-0000?-of-00003.safetensors"))) == 3


def test_a_sharded_bin_fine_tune_gets_an_index(tmp_path):
    _, (ftb, alb, unb) = _bin_world(tmp_path, shards=2)
    api.patch(ftb, tmp_path / "bin", aligned=alb, unaligned=unb, beta=0.5, fsync=False)
    assert (tmp_path / "bin" / "model.safetensors.index.json").is_file()


def test_vector_batch_inspect_and_verify_against_read_bin_inputs(tmp_path, capsys):
    from batch_fixtures import load_and_run, write_manifest

    (ft, al, un), (ftb, alb, unb) = _bin_world(tmp_path)
    api.make_vector(al, un, tmp_path / "v_st", fsync=False)
    api.make_vector(alb, unb, tmp_path / "v_bin", fsync=False)
    assert_same_outputs(tmp_path / "v_st", tmp_path / "v_bin")
    jobs = [{"finetuned": "ft_bin", "out": "outs/b", "dare": 0.2, "seed": 1}]
    (tmp_path / "outs").mkdir()
    load_and_run(write_manifest(tmp_path, jobs, aligned="al_bin", unaligned="un_bin"))
    api.patch(ft, tmp_path / "ref", aligned=al, unaligned=un, beta=0.5, dare=0.2, seed=1, fsync=False)
    assert_same_outputs(tmp_path / "ref", tmp_path / "outs" / "b")
    code, out, _ = cli(capsys, "inspect", ftb, alb, unb, "--json")
    assert code == 0 and json.loads(out)
    code, out, _ = cli(capsys, "verify", tmp_path / "outs" / "b", "--against", ftb, alb, unb)
    assert code == 0 and out.rstrip().endswith("PASS")


def test_inspect_describes_a_bin_model(tmp_path):
    from resta_fast.inspect_cli import describe_model

    _, (ftb, _, _) = _bin_world(tmp_path)
    d = describe_model(ftb)
    assert (
        d["files"] == ["pytorch_model.bin"]
        and d["tensors"] == len(llama_tensors(0))
        and not d["missing_format_metadata"]
    )


def test_a_lora_adapter_saved_as_bin_merges_like_its_safetensors_copy(tmp_path):
    from safetensors.torch import load_file

    ft, al, un = three_models(tmp_path)
    adapter = write_adapter(tmp_path / "lora")
    bin_adapter = tmp_path / "lora_bin"
    bin_adapter.mkdir()
    shutil.copyfile(adapter / "adapter_config.json", bin_adapter / "adapter_config.json")
    torch.save(load_file(str(adapter / "adapter_model.safetensors")), bin_adapter / "adapter_model.bin")
    kw = dict(aligned=al, unaligned=un, beta=0.5, fsync=False)
    api.patch(adapter, tmp_path / "st", **kw)
    api.patch(bin_adapter, tmp_path / "bin", base=as_bin(al, tmp_path / "al_bin"), **kw)
    assert_same_outputs(tmp_path / "st", tmp_path / "bin")
    from resta_fast.inspect_cli import describe_model

    assert describe_model(bin_adapter)["files"] == ["adapter_model.bin"]


def test_the_adapter_writer_writes_a_bin_adapter_back_as_safetensors(tmp_path):
    """What Safe LoRA and SafeMERGE write from an adapter_model.bin input: adapter_model.safetensors only."""
    from safetensors.torch import load_file

    from resta_fast.io.adapter_writer import write_adapter as write_adapter_files
    from resta_fast.lora import LoraAdapter

    src = write_adapter(tmp_path / "lora")
    tensors = load_file(str(src / "adapter_model.safetensors"))
    (src / "adapter_model.safetensors").unlink()
    torch.save(tensors, src / "adapter_model.bin")
    out = tmp_path / "out"
    out.mkdir()
    adapter = LoraAdapter(src)
    files = write_adapter_files(out, adapter, {}, {"format": "pt"}, fsync=False)
    adapter.close()
    assert sorted(files) == ["adapter_config.json", "adapter_model.safetensors"]
    got = load_file(str(out / "adapter_model.safetensors"))
    assert list(got) == list(tensors) and all(same_bits(got[k], tensors[k]) for k in tensors)


# --- hostile files: one line, exit 2, nothing run, nothing written ---------------------------------


def _model_dir(root: Path, weights: Path) -> Path:
    """A model directory whose pytorch_model.bin is ``weights``."""
    d = root / "ft"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(llama_config()))
    shutil.move(weights, d / "pytorch_model.bin")
    return d


def assert_refused(capsys, root: Path, weights: Path, *needles: str, marker: Path | None = None) -> str:
    """``patch`` with ``weights`` as the fine-tune: exit 2, one line naming the file, no output, no marker."""
    _, al, un = three_models(root / "models")
    ft = _model_dir(root, weights)
    out = root / "out"
    code, _, err = cli(capsys, "patch", "--finetuned", ft, "--aligned", al, "--unaligned", un, "--out", out)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "pytorch_model.bin" in err, err
    for needle in needles:
        assert needle in err, err
    assert nothing_left(out)
    if marker is not None:
        assert not marker.exists(), "the payload ran"
    return err


def test_the_payload_used_below_really_runs_when_unpickled(tmp_path):
    """Control: the os.system payload creates its marker under plain pickle, so its absence below means
    our reader did not run it."""
    marker = tmp_path / "ran"
    torch.save({"w": Payload(os.system, touch_command(marker))}, tmp_path / "evil.bin")
    data = members(tmp_path / "evil.bin")["evil/data.pkl"]
    pickle.loads(data)  # the one place a hostile pickle is unpickled: to prove the payload is live
    assert marker.exists()


@pytest.mark.parametrize(
    "payload, global_name",  # protocol 2 spells some names as Python 2 did (__builtin__, commands)
    [
        (lambda m: Payload(os.system, touch_command(m)), "posix.system,"),
        (lambda m: Payload(eval, f"open({str(m)!r}, 'w')"), "eval, which"),
        (lambda m: Payload(exec, f"open({str(m)!r}, 'w')"), "exec, which"),
        (lambda m: Payload(importlib.import_module, "this"), "importlib.import_module,"),
        (lambda m: Payload(builtins.__import__, "json"), "__import__, which"),
        (lambda m: Payload(subprocess.call, ["touch", str(m)]), "call, which"),
        (lambda m: Payload(pickle.loads, pickle.dumps(Payload(os.system, touch_command(m)))), "pickle.loads,"),
        (lambda m: Payload(torch.load, str(m)), "torch.serialization.load,"),
    ],
    ids=["os.system", "eval", "exec", "import_module", "__import__", "subprocess", "nested_pickle", "torch.load"],
)
@pytest.mark.parametrize("protocol", [2, 4])  # GLOBAL and STACK_GLOBAL
def test_a_pickle_that_would_run_code_is_refused_before_anything_runs(tmp_path, capsys, payload, global_name, protocol):
    marker = tmp_path / "ran"
    state = {"model.norm.weight": torch.ones(4), "w": payload(marker)}
    torch.save(state, tmp_path / "evil.bin", pickle_protocol=protocol)
    err = assert_refused(capsys, tmp_path, tmp_path / "evil.bin", "the pickle imports ", global_name, marker=marker)
    assert "nothing in it was imported or run" in err


def test_a_payload_hidden_in_a_storage_entry_is_data_not_code(tmp_path, capsys):
    """A pickle inside a storage entry (a nested pickle) is read as bytes, never unpickled."""
    marker = tmp_path / "ran"
    inner = pickle.dumps(Payload(os.system, touch_command(marker)))
    inner += b"\0" * (-len(inner) % 4)
    pkl = state_dict_pickle({"w": tensor_opcodes("ByteStorage", "0", len(inner), 0, (len(inner),), (1,))})
    torch_zip(tmp_path / "n.bin", pkl, {"0": inner})
    assert TorchBinFile(tmp_path / "n.bin").array("w").tobytes() == inner and not marker.exists()


@pytest.mark.parametrize(
    "pkl, needle",
    [
        (b"\x80\x02cos\nsystem\n(S'true'\ntR.", "imports os.system"),
        (b"\x80\x02(S'true'\nios\nsystem\n.", "opcode INST"),
        (b"\x80\x02\x82\x01)R.", "opcode EXT1"),
        (b"\x80\x05\x97.", "opcode NEXT_BUFFER"),
        (b"\x80\x02Pstorage\n.", "opcode PERSID"),
        (b"\x80\x02ccollections\nOrderedDict\n)\x81.", "opcode NEWOBJ"),
        (b"\x80\x02ctorch\nComplexFloatStorage\n.", "not a storage dtype resta_fast reads"),
        (b"\x80\x02ctorch._utils\n_rebuild_sparse_tensor\n.", "imports torch._utils._rebuild_sparse_tensor"),
        (b"\x80\x02}r\xff\xff\xff\x7f.", "memo slot 2147483647"),
        (b"\x80\x02}.junk", "bytes after the pickle's end"),
        (b"\x80\x02K\x01.", "holds 'int', not a state dict"),
        (state_dict_pickle({"w": frag("a string")}), "not a tensor"),
        (state_dict_pickle({"w": call("collections", "OrderedDict")}), "not a tensor"),
        (b"\x80\x02ccollections\nOrderedDict\n)R}S'x'\nK\x01sb.", "attributes other than _metadata"),
        (state_dict_pickle({"w": tensor_opcodes()}), "storage '0', which is not in the archive"),
        (b"\x80\x02})" + b"\x85" * 100_000 + b"Ns.", "nests tuples more than 32 deep"),  # a key: hash would crash
        (b"\x80\x02}(" + b"(" * 40 + b"\x91" * 41 + b"Ns.", "nests tuples more than 32 deep"),  # frozensets
        (b"\x80\x02)" + b"\x85" * 40 + b"q\x000}h\x00Ns.", "nests tuples more than 32 deep"),  # through the memo
        (b"\x80\x02}X\x01\x00\x00\x00w" + b"]" * 100_000 + b"a" * 99_999 + b"s.", "is a list, not a tensor"),
        (state_dict_pickle({"w": b"(" + b"]" * 50_000 + b"a" * 49_999 + b"Q"}), "is not a torch storage reference"),
    ],
    ids=[
        "global",
        "inst",
        "ext",
        "buffer",
        "text_persid",
        "newobj",
        "complex",
        "sparse",
        "memo_bomb",
        "trailing",
        "not_dict",
        "str_value",
        "dict_value",
        "build",
        "missing_entry",
        "deep_key",
        "deep_frozenset",
        "deep_memo",
        "deep_list",
        "deep_pid",
    ],
)
def test_pickles_a_state_dict_never_holds_are_refused(tmp_path, capsys, pkl, needle):
    torch_zip(tmp_path / "p.bin", pkl, {})
    assert_refused(capsys, tmp_path, tmp_path / "p.bin", needle)


def _tensor_file(tmp_path, blob=b"\0" * 16, **kw) -> Path:
    """A one-tensor archive: ``tensor_opcodes(**kw)`` over storage "0" holding ``blob``."""
    return torch_zip(tmp_path / "t.bin", state_dict_pickle({"w": tensor_opcodes(**kw)}), {"0": blob})


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(numel=4, shape=(2, 4), stride=(4, 1)), "needs 32 bytes but storage '0' holds 16"),
        (dict(offset=3, shape=(2,), stride=(1,)), "needs 20 bytes"),
        (dict(shape=(2, 2), stride=(1, 2)), "not row-major contiguous"),
        (dict(shape=(2, 2), stride=(0, 1)), "not row-major contiguous"),
        (dict(shape=(2, 2), stride=(-2, 1)), "negative stride"),
        (dict(shape=(2, 2), stride=(2,)), "does not fit shape"),
        (dict(shape=(-1, 4), stride=(4, 1)), "non-negative integers"),
        (dict(offset=-1), "non-negative integer"),
        (dict(numel=5), "5 x FloatStorage = 20 bytes but its zip entry holds 16"),
        (dict(storage="UntypedStorage", numel=16, dtype="complex64"), "imports torch.complex64"),
        (dict(rebuild="_rebuild_tensor"), "imports torch._utils._rebuild_tensor"),
    ],
    ids=[
        "too_small",
        "offset_past",
        "transposed",
        "zero_stride",
        "negative",
        "rank",
        "neg_dim",
        "neg_off",
        "numel",
        "dtype",
        "v1",
    ],
)
def test_tensors_that_do_not_fit_their_storage_are_refused(tmp_path, capsys, kw, needle):
    assert_refused(capsys, tmp_path, _tensor_file(tmp_path, **kw), needle)


def test_views_overlapping_more_than_the_alias_limit_are_refused(tmp_path):
    items = {f"w{i}": tensor_opcodes() for i in range(MAX_ALIASES)}
    torch_zip(tmp_path / "ok.bin", state_dict_pickle(items), {"0": b"\0" * 16})
    assert len(TorchBinFile(tmp_path / "ok.bin").tensors) == MAX_ALIASES
    items["one_more"] = tensor_opcodes(offset=1, shape=(1,), stride=(1,))
    torch_zip(tmp_path / "bomb.bin", state_dict_pickle(items), {"0": b"\0" * 16})
    with pytest.raises(CheckpointError, match=f"more than {MAX_ALIASES} tensors name the same bytes"):
        TorchBinFile(tmp_path / "bomb.bin")


def test_one_storage_read_as_two_dtypes_is_refused(tmp_path):
    items = {
        "a": tensor_opcodes("UntypedStorage", "0", 16, 0, (4,), (1,), dtype="float32"),
        "b": tensor_opcodes("UntypedStorage", "0", 16, 0, (8,), (1,), dtype="bfloat16"),
    }
    torch_zip(tmp_path / "x.bin", state_dict_pickle(items), {"0": b"\0" * 16})
    with pytest.raises(CheckpointError, match="reads storage '0' as BF16, another tensor as F32"):
        TorchBinFile(tmp_path / "x.bin")


def test_zip_structure_attacks_are_refused(tmp_path, capsys):
    pkl = state_dict_pickle({"w": tensor_opcodes()})
    good = [{"name": "archive/data.pkl", "data": pkl}, {"name": "archive/data/0", "data": b"\0" * 16}]
    cases = {
        # a zip bomb: 64 MiB of zeros deflated to a few KiB; refused from its header, never inflated
        "bomb": ([good[0], {"name": "archive/data/0", "data": b"\0" * (64 << 20), "method": 8}], "is compressed"),
        "past_end": ([good[0], {**good[1], "usize": 1 << 20, "csize": 1 << 20}], "runs past the end of the entries"),
        "sizes": ([good[0], {**good[1], "csize": 8}], "sizes differ"),
        "local_name": ([good[0], {**good[1], "local_name": "archive/data/9"}], "local header names another entry"),
        "overlap": ([{**good[0], "usize": len(pkl) + 20, "csize": len(pkl) + 20}, good[1]], "overlap"),
        "duplicate": ([good[0], good[1], good[1]], "appears twice"),
        "two_pickles": ([good[0], {**good[0], "name": "other/data.pkl"}, good[1]], "2 (<name>/data.pkl)"),
        "no_pickle": ([good[1]], "no <name>/data.pkl"),
        "big_endian": ([*good, {"name": "archive/byteorder", "data": b"big"}], "b'big'-endian"),
    }
    for name, (mem, needle) in cases.items():
        root = tmp_path / name
        root.mkdir()
        write_zip(root / "z.bin", mem)
        assert_refused(capsys, root, root / "z.bin", needle)


def test_zip64_sizes_and_offsets_are_read_from_the_extra_field(tmp_path):
    pkl = state_dict_pickle({"w": tensor_opcodes()})
    data = bytes(range(16))
    mem = [
        {"name": "archive/data.pkl", "data": pkl, "zip64": True},
        {"name": "archive/data/0", "data": data, "zip64": True},
    ]
    write_zip(tmp_path / "z64.bin", mem)
    assert TorchBinFile(tmp_path / "z64.bin").array("w").tobytes() == data
    mem[1]["zip64_bytes"] = 12  # the offset missing from the field
    write_zip(tmp_path / "short.bin", mem)
    with pytest.raises(CheckpointError, match="needs a zip64 extra field for size, compressed size, offset"):
        TorchBinFile(tmp_path / "short.bin")


@pytest.mark.parametrize("cut", ["truncated", "no_end", "not_zip", "legacy", "empty"])
def test_broken_and_legacy_files_are_refused(tmp_path, capsys, cut):
    torch.save({"w": torch.ones(4)}, tmp_path / "w.bin")
    data = (tmp_path / "w.bin").read_bytes()
    needle = {
        "truncated": "zip",
        "no_end": "no zip end record",
        "not_zip": "not a zip-format torch checkpoint",
        "legacy": "legacy (pre-1.6, non-zip) torch format",
        "empty": "not a zip-format torch checkpoint",
    }[cut]
    if cut == "truncated":
        data = data[: len(data) - 30]
    elif cut == "no_end":
        data = data.replace(b"PK\x05\x06", b"PK\x05\x07")
    elif cut == "not_zip":
        data = b"GGUF" + data
    elif cut == "legacy":
        torch.save({"w": torch.ones(4)}, tmp_path / "w.bin", _use_new_zipfile_serialization=False)
        data = (tmp_path / "w.bin").read_bytes()
    else:
        data = b""
    (tmp_path / "w.bin").write_bytes(data)
    assert_refused(capsys, tmp_path, tmp_path / "w.bin", needle)


def _sharded_bin(root: Path) -> Path:
    return save_bin_model(root / "ft", llama_tensors(3), shards=2, config=llama_config())


@pytest.mark.parametrize("shard", ["../outside.bin", "/etc/passwd", "sub/x.bin", ".."])
def test_an_index_naming_files_outside_the_directory_is_refused(tmp_path, shard):
    ft = _sharded_bin(tmp_path)
    index = json.loads((ft / BIN_INDEX).read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (ft / BIN_INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        Checkpoint(ft)


def test_a_symlinked_shard_pointing_outside_is_refused(tmp_path):
    ft = _sharded_bin(tmp_path)
    shard = ft / "pytorch_model-00001-of-00002.bin"
    outside = tmp_path / "elsewhere.bin"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match="is a link pointing outside the model directory"):
        Checkpoint(ft)


def test_a_sharded_index_and_its_shards_must_agree(tmp_path):
    ft = _sharded_bin(tmp_path)
    assert len(Checkpoint(ft).names()) == len(llama_tensors(3))
    index = json.loads((ft / BIN_INDEX).read_text())
    index["weight_map"]["ghost.weight"] = "pytorch_model-00001-of-00002.bin"
    (ft / BIN_INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="does not contain it"):
        Checkpoint(ft)


def test_safetensors_wins_over_bin_and_other_pickles_are_not_guessed(tmp_path):
    ft = write_model(tmp_path / "both", llama_tensors(1))
    torch.save({"only.in.bin": torch.ones(1)}, ft / "pytorch_model.bin")
    assert "only.in.bin" not in Checkpoint(ft)
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"w": torch.ones(1)}, other / "training_args.bin")
    with pytest.raises(CheckpointError, match="no pytorch_model.bin or pytorch_model.bin.index.json; if one"):
        Checkpoint(other)
    assert "w" in Checkpoint(other / "training_args.bin")  # named directly, it is read


# --- Hypothesis: generated variants ----------------------------------------------------------------

DANGEROUS = [
    ("os", "system"),
    ("posix", "system"),
    ("builtins", "eval"),
    ("builtins", "exec"),
    ("builtins", "getattr"),
    ("builtins", "__import__"),
    ("importlib", "import_module"),
    ("subprocess", "Popen"),
    ("pickle", "loads"),
    ("torch", "load"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch.serialization", "_load"),
    ("collections", "OrderedDict.fromkeys"),
    ("torch", "storage.UntypedStorage"),
]
names = st.text(st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=12)


@settings(max_examples=120, **FUZZ)
@given(
    target=st.one_of(st.sampled_from(DANGEROUS), st.tuples(names, names)),
    stacked=st.booleans(),
    nested=st.integers(0, 2),
)
def test_any_global_outside_the_allow_list_is_refused_and_never_called(target, stacked, nested):
    module, name = target
    marker = _DIR / "ran"
    head = (
        call(module, name, touch_command(marker))
        if stacked
        else b"c" + f"{module}\n{name}\n".encode() + frag(("x",)) + b"R"
    )
    value = head
    for _ in range(nested):  # inside containers: a list, then a tuple
        value = b"]" + value + b"a" if _ % 2 == 0 else b"(" + value + b"t"
    path = torch_zip(_DIR / "g.bin", state_dict_pickle({"w": value}), {})
    allowed = (module, name) in torch_bin.ALLOWED_GLOBALS
    with pytest.raises(CheckpointError) as err:
        TorchBinFile(path)
    assert allowed or any(w in str(err.value) for w in ("imports", "storage dtype", "not a valid pickle"))
    assert "\n" not in str(err.value) and not marker.exists()


STORAGES = {
    "FloatStorage": "F32",
    "HalfStorage": "F16",
    "BFloat16Storage": "BF16",
    "LongStorage": "I64",
    "ByteStorage": "U8",
}


@settings(max_examples=200, **FUZZ)
@given(
    storage=st.sampled_from(sorted(STORAGES)),
    numel=st.integers(0, 24),
    offset=st.integers(-2, 26),
    shape=st.lists(st.integers(-1, 5), max_size=3),
    data=st.data(),
)
def test_generated_tensor_descriptors_are_read_exactly_or_refused(storage, numel, offset, shape, data):
    dtype = STORAGES[storage]
    rank = len(shape)
    contiguous = [math.prod(shape[i + 1 :]) for i in range(rank)]
    stride = data.draw(st.one_of(st.just(contiguous), st.lists(st.integers(-3, 30), min_size=rank, max_size=rank)))
    raw = (bytes(range(256)) * 2)[: numel * ITEMSIZE[dtype]]
    path = torch_zip(
        _DIR / "d.bin", state_dict_pickle({"w": tensor_opcodes(storage, "0", numel, offset, shape, stride)}), {"0": raw}
    )
    n = math.prod(shape) if all(d >= 0 for d in shape) else -1
    fits = (
        n >= 0
        and offset >= 0
        and all(s >= 0 for s in stride)
        and (n == 0 or all(d == 1 or s == c for d, s, c in zip(shape, stride, contiguous, strict=True)))
        and (offset + n) * ITEMSIZE[dtype] <= len(raw)
    )
    try:
        f = TorchBinFile(path)
    except CheckpointError as exc:
        assert not fits, exc
        assert "\n" not in str(exc)
        return
    assert fits
    info = f.tensors["w"]
    lo = offset * ITEMSIZE[dtype]
    assert info.shape == tuple(shape) and info.dtype == dtype
    assert f.array("w").tobytes() == raw[lo : lo + n * ITEMSIZE[dtype]]
    f.close()


# Opcodes that only build plain values, with what they need on the stack: random streams of them test the
# scanner's model of the unpickler's stack against the unpickler itself.
_OPS = [
    b")",
    b"\x85",
    b"\x86",
    b"\x87",
    b"(",
    b"t",
    b"]",
    b"a",
    b"e",
    b"}",
    b"s",
    b"u",
    b"K\x01",
    b"N",
    b"2",
    b"0",
    b"1",
    b"\x91",
    b"l",
    b"d",
]


@settings(max_examples=300, **FUZZ)
@given(
    body=st.lists(
        st.one_of(
            st.sampled_from(_OPS),
            st.integers(0, 3).map(lambda i: b"q" + bytes([i])),
            st.integers(0, 3).map(lambda i: b"h" + bytes([i])),
        ),
        max_size=60,
    )
)
def test_random_opcode_streams_are_refused_cleanly(body):
    path = torch_zip(_DIR / "ops.bin", b"\x80\x02" + b"".join(body) + b".", {})
    try:
        f = TorchBinFile(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
    else:  # no stream holds a tensor: at best an empty state dict
        assert f.tensors == {}


def _valid_file() -> bytes:
    path = _DIR / "valid.bin"
    if not path.exists():
        g = torch.Generator().manual_seed(0)
        torch.save(
            {"a": torch.randn(3, 4, generator=g).bfloat16(), "b": torch.arange(5), "c": torch.ones(2).half()}, path
        )
    return path.read_bytes()


@settings(max_examples=250, **FUZZ)
@given(st.data())
def test_corrupted_torch_files_are_refused_or_read_within_the_file(data):
    raw = bytearray(_valid_file())
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice", "append"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "splice":
        i = data.draw(st.integers(0, len(raw)))
        raw[i : i + data.draw(st.integers(0, 16))] = data.draw(st.binary(max_size=16))
    else:
        raw += data.draw(st.binary(min_size=1, max_size=32))
    path = _DIR / "c.bin"
    path.write_bytes(bytes(raw))
    try:
        f = TorchBinFile(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(path))
        return
    for name, info in f.tensors.items():
        assert 0 <= info.start <= info.end <= len(raw) and info.dtype in DTYPES
        assert f.array(name).nbytes == info.nbytes
    f.close()


def test_errors_are_checkpoint_errors_with_the_path_first(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    with pytest.raises(CheckpointError) as err:
        TorchBinFile(tmp_path / "x.bin")
    assert str(err.value).startswith(f"{tmp_path / 'x.bin'}: ") and isinstance(err.value, RestaError)
    assert zipfile.is_zipfile(tmp_path / "x.bin") is False
