"""Validated safetensors reading (resta_fast/io/reader.py) against hostile files: every bad file is one
CheckpointError naming the file (and tensor) with the exact message, alone and as a fine-tune given to
``patch`` (exit 2, one line, nothing written). The corpus is tests/hostile_files.py; the fuzzer
(test_fuzz_reader.py) covers what the named cases do not."""

import shutil

import pytest
from checkpoints import three_models
from fault_fixtures import SMALL, patch_argv
from hostile_files import HOSTILE

from resta_fast.cli import main
from resta_fast.errors import CheckpointError
from resta_fast.io.reader import SafetensorsFile


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_exact_error(tmp_path, case):
    raw, message = HOSTILE[case]
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(raw)
    with pytest.raises(CheckpointError) as info:
        SafetensorsFile(path)
    assert str(info.value) == f"{path}{message}"


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    """(finetuned, aligned, unaligned) of the SMALL shape, shared read-only by a module's tests."""
    root = tmp_path_factory.mktemp("small")
    return three_models(root, **SMALL)


def test_hostile_files_through_the_cli(tmp_path, small_models, capsys):
    """Each hostile file as the fine-tune: exit 2, one line naming it, nothing written."""
    _, al, un = small_models
    ft = tmp_path / "ft"
    shutil.copytree(small_models[0], ft)
    for case, (raw, message) in sorted(HOSTILE.items()):
        (ft / "model.safetensors").write_bytes(raw)
        out = tmp_path / "out"
        code = main(patch_argv(ft, al, un, out, "--no-fsync"))
        err = capsys.readouterr().err
        assert code == 2, case
        assert err == f"resta-fast: error: {ft / 'model.safetensors'}{message}\n", case
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ft"], case
