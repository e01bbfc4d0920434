"""resta_fast/verify/inputs.py: which inputs an output is checked against, and their fingerprints."""

import pytest
from checkpoints import three_models
from verify_fixtures import checks, patched_output

from resta_fast.errors import RestaError
from resta_fast.verify import verify
from resta_fast.verify.inputs import input_paths


def patch_report(**inputs):
    """A patch's resta_fast.json as input_paths reads it: the command, the plan's mode, params, the
    inputs' identities (one per path: equal paths, equal content) and their recorded paths."""
    dare = inputs.pop("dare", None)
    mode = "vector" if "vector" in inputs else "difference"
    return {
        "command": "patch",
        "plan": {"mode": mode},
        "params": {"dare": dare},
        "inputs": {role: {"files": {"m": {"bytes": 1, "header_sha256": path}}} for role, path in inputs.items()},
        "sources": {role: {"name": path, "path": path} for role, path in inputs.items()},
    }


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    return patched_output(tmp_path_factory.mktemp("verify"))


def test_recorded_paths_by_role_for_each_mode():
    rep = patch_report(finetuned="ft", aligned="chat", unaligned="shadow")
    assert input_paths(rep, [], None) == {"finetuned": "ft", "aligned": "chat", "unaligned": "shadow"}
    rep = patch_report(finetuned="ft", vector="v")
    assert input_paths(rep, [], None) == {"finetuned": "ft", "vector": "v"}


def test_against_paths_replace_the_recorded_ones_in_the_commands_order():
    rep = patch_report(finetuned="ft", aligned="chat", unaligned="shadow")
    assert input_paths(rep, ["a", "b", "c"], None) == {"finetuned": "a", "aligned": "b", "unaligned": "c"}
    with pytest.raises(RestaError, match=r"made by `patch` from FINETUNED, ALIGNED, UNALIGNED; give those 3 paths"):
        input_paths(rep, ["a", "b"], None)


def test_a_dare_base_that_was_the_aligned_model_follows_the_aligned_path():
    rep = patch_report(finetuned="ft", aligned="chat", unaligned="shadow", dare_base="chat", dare=0.3)
    assert input_paths(rep, ["a", "b", "c"], None)["dare_base"] == "b"
    assert input_paths(rep, [], None)["dare_base"] == "chat"


def test_a_separate_dare_base_is_recorded_or_must_be_passed():
    rep = patch_report(finetuned="ft", aligned="chat", unaligned="shadow", dare_base="base", dare=0.3)
    assert input_paths(rep, [], None)["dare_base"] == "base"  # recorded paths: all of them
    with pytest.raises(RestaError, match="used a separate dare base model; pass it with --dare-base"):
        input_paths(rep, ["a", "b", "c"], None)  # explicit inputs: the record's base may be stale
    assert input_paths(rep, ["a", "b", "c"], "mine")["dare_base"] == "mine"


def test_a_lora_base_defaults_like_the_dare_base():
    rep = patch_report(finetuned="adapter", aligned="chat", unaligned="shadow", base="chat")
    assert input_paths(rep, ["a", "b", "c"], None)["base"] == "b"
    rep = patch_report(finetuned="adapter", aligned="chat", unaligned="shadow", base="llama")
    with pytest.raises(RestaError, match="used a separate base model; pass it with --base"):
        input_paths(rep, ["a", "b", "c"], None)


def test_missing_recorded_paths_and_other_commands_are_refused():
    rep = patch_report(finetuned="ft", aligned="chat")
    with pytest.raises(RestaError, match="records no path for unaligned; give the input paths explicitly"):
        input_paths(rep, [], None)
    with pytest.raises(RestaError, match="cannot recompute outputs of command 'safelora'"):
        input_paths({"command": "safelora"}, [], None)


def test_wrong_inputs_are_reported(patched, tmp_path):
    root, ft, al, un, out = patched
    # Swapped aligned/unaligned: same headers, but their content identities (sampled data) differ,
    # and so do the recomputed values.
    c = checks(verify(out, [str(ft), str(un), str(al)], samples=5000))
    assert not c["inputs"]["ok"] and not c["sample"]["ok"]
    assert c["inputs"]["problems"][0].startswith(f"aligned {un}: model.safetensors: its content differs")
    other, _, _ = three_models(tmp_path, vocab=24, hidden=8, layers=1, inter=12)
    result = verify(out, [str(other), str(al), str(un)], samples=5000)
    c = checks(result)
    assert not result["ok"] and not c["inputs"]["ok"] and not c["plan"]["ok"]
    assert c["inputs"]["problems"][0].startswith(
        f"finetuned {other}: files ['model.safetensors'] but the run read ['model-00001-of-00002.safetensors'"
    )
