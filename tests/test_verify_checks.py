"""`resta-fast verify` without inputs (resta_fast/verify/checks.py): the report, hashes and headers."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from verify_fixtures import checks, patched_output

from resta_fast.cli import main
from resta_fast.verify import verify


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    return patched_output(tmp_path_factory.mktemp("verify"))


def test_a_single_flipped_bit_is_caught(patched, tmp_path, capsys):
    _, ft, al, un, out = patched
    bad = tmp_path / "out"
    shutil.copytree(out, bad)
    shard = bad / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor's data
    shard.write_bytes(bytes(data))
    assert main(["verify", str(bad), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    c = checks(result)
    assert not result["ok"] and not c["sha256"]["ok"] and c["headers"]["ok"]
    assert c["sha256"]["problems"] == [
        f"{shard.name}: sha256 {c['sha256']['problems'][0].split()[2]} but resta_fast.json records "
        f"{json.loads((bad / 'resta_fast.json').read_text())['files'][shard.name][:16]}..."
    ]
    assert main(["verify", str(bad)]) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "FAIL"


def test_unrecorded_weight_file_and_missing_report(patched, tmp_path, capsys):
    _, _, _, _, out = patched
    bad = tmp_path / "out"
    shutil.copytree(out, bad)
    save_file({"x": torch.zeros(2)}, str(bad / "extra.safetensors"))
    c = checks(verify(bad))
    assert c["sha256"]["problems"] == [
        "extra.safetensors: weight file not recorded in resta_fast.json; loaders would read it"
    ]
    (bad / "resta_fast.json").unlink()
    result = verify(bad)
    assert not result["ok"] and checks(result)["report"]["problems"][0].endswith(
        "is missing: this is not a finished resta-fast output"
    )
    assert main(["verify", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_a_recorded_failed_validation_fails_verify(patched, tmp_path):
    _, _, _, _, out = patched
    bad = tmp_path / "out"
    shutil.copytree(out, bad)
    report = json.loads((bad / "resta_fast.json").read_text())
    report["validation"] = {"passed": False, "reason": "harmful rate 40% > 10%"}
    (bad / "resta_fast.json").write_text(json.dumps(report))
    result = verify(bad)
    assert not result["ok"] and checks(result)["validation"]["problems"] == [
        "patch --validate-prompts marked this output as failed: harmful rate 40% > 10%"
    ]
    report["validation"]["passed"] = True
    (bad / "resta_fast.json").write_text(json.dumps(report))
    assert verify(bad)["ok"]


@pytest.mark.parametrize("text", ["[]", "5", '"report"', "{not json"])
def test_a_report_that_is_not_a_json_object_fails_one_check_and_exits_1(patched, tmp_path, capsys, text):
    _, _, _, _, out = patched
    bad = tmp_path / "out"
    shutil.copytree(out, bad)
    (bad / "resta_fast.json").write_text(text)
    assert main(["verify", str(bad), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in result["checks"]] == ["report"]
    assert "resta_fast.json is unreadable (" in result["checks"][0]["problems"][0]
