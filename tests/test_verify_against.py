"""resta_fast/verify/against.py: the plan rebuilt from the inputs and the recorded parameters, against the record."""

import json
import shutil

import pytest
from verify_fixtures import checks, patched_output

from resta_fast.verify import verify
from resta_fast.verify.against import PLAN_FIELDS, recorded_rows


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    return patched_output(tmp_path_factory.mktemp("verify"))


def tampered(out, tmp_path, edit):
    """A copy of ``out`` whose resta_fast.json went through ``edit(report)`` (the weights untouched)."""
    bad = tmp_path / "out"
    shutil.copytree(out, bad)
    report = json.loads((bad / "resta_fast.json").read_text())
    edit(report)
    (bad / "resta_fast.json").write_text(json.dumps(report))
    return bad


def rows(report):
    return [t for f in report["plan"]["files"] for t in f["tensors"]]


def test_a_clean_output_rebuilds_the_same_plan(patched):
    c = checks(verify(patched[4], [], samples=10))
    assert c["plan"]["ok"] and c["plan"]["detail"].startswith(
        "rebuilt from the inputs and recorded parameters: identical"
    )


def test_a_recorded_row_that_differs_is_named_with_the_field(patched, tmp_path):
    def edit(report):
        row = next(t for t in rows(report) if t["action"] == "patch" and "mlp." in t["name"])
        row["beta"] = 0.75  # the rule gave 0.25
        edit.name = row["name"]

    result = verify(tampered(patched[4], tmp_path, edit), [], samples=10)
    c = checks(result)
    assert not result["ok"] and c["headers"]["ok"] and c["sha256"]["ok"]
    assert c["plan"]["problems"] == [f"{edit.name}: beta is 0.25 from the inputs but 0.75 in resta_fast.json"]


def test_rows_missing_from_either_plan_are_named(patched, tmp_path):
    def edit(report):
        first = report["plan"]["files"][0]["tensors"]
        edit.dropped = first.pop(0)["name"]
        first.append(dict(first[0], name="model.ghost.weight"))

    c = checks(verify(tampered(patched[4], tmp_path, edit), [], samples=10))
    assert f"{edit.dropped}: in the rebuilt plan but not in the recorded one" in c["plan"]["problems"]
    assert "model.ghost.weight: in the recorded plan but not in the rebuilt one" in c["plan"]["problems"]


def test_recorded_parameters_that_cannot_plan_fail_the_plan_check_only(patched, tmp_path):
    def edit(report):
        report["params"]["exclude"] = ["("]  # not a regular expression

    result = verify(tampered(patched[4], tmp_path, edit), [], samples=10)
    c = checks(result)
    assert not result["ok"] and c["inputs"]["ok"] and "sample" not in c
    assert c["plan"]["problems"][0].startswith(
        "cannot rebuild the plan from the inputs: exclude '(' is not a valid regular expression"
    )


def test_recorded_rows_read_back_every_compared_field():
    row = {"name": "w", "action": "patch", "shape": [2, 3], "in_dtype": "BF16", "out_dtype": "BF16", "beta": 0.5}
    (t,) = recorded_rows({"w": row})
    assert (t.name, t.numel, t.beta) == ("w", 6, 0.5)
    assert set(PLAN_FIELDS) <= {f for f in vars(t)}
