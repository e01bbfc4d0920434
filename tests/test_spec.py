"""An option written once (resta_fast/spec.py): every form of it derived from its one entry.

The test the issue asked for is the first one: an option added to the patch spec, by one
edit, is at once a flag in ``--help``, a manifest key, an API keyword, a ``params`` entry of
the provenance, and part of the model card's "how to reproduce" command.
"""

from __future__ import annotations

import argparse
import inspect
import json

import pytest
from batch_fixtures import make_world, write_manifest
from checkpoints import three_models

from resta_fast import api
from resta_fast import spec as S
from resta_fast.batch.local import run_batch
from resta_fast.batch.manifest import ManifestError, load_manifest
from resta_fast.card import reproduce_command
from resta_fast.cli import build_parser, main
from resta_fast.errors import OptionError, cli_flag
from resta_fast.options import PATCH, PatchOptions
from resta_fast.safelora import SAFELORA
from resta_fast.safemerge import SAFEMERGE
from resta_fast.spec import Option, Spec

# The new option: recorded, so it reaches the headers, the report and the card.
NOTE = Option("note", None, "a note recorded with the output", kind=str, record=lambda v: v)


@pytest.fixture()
def with_note(monkeypatch):
    monkeypatch.setattr(PATCH, "options", PATCH.options + (NOTE,))


def _help(command: str) -> str:
    sub = next(a for a in build_parser(command)._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command].format_help()


def test_an_option_added_to_the_spec_is_a_flag_a_key_a_keyword_a_param_and_in_the_card(tmp_path, with_note):
    assert "--note NOTE" in _help("patch") and "a note recorded with the output" in _help("patch")
    assert PatchOptions(note="x").note == "x"
    ft, al, un = three_models(tmp_path / "in")
    # The CLI.
    out = tmp_path / "cli"
    argv = ["patch", "--finetuned", ft, "--aligned", al, "--unaligned", un, "--note", "v2", "--out", out]
    assert main([str(a) for a in argv] + ["--no-fsync", "--no-progress"]) == 0
    report = json.loads((out / "resta_fast.json").read_text())
    assert report["params"]["note"] == "v2"
    assert "--note v2" in reproduce_command(report) and "--note v2" in (out / "README.md").read_text()
    # The API: the same keyword, the same record.
    api_report = api.patch(ft, tmp_path / "api", aligned=al, unaligned=un, note="v2", fsync=False)
    assert api_report["params"] == report["params"]
    with pytest.raises(TypeError, match="unexpected keyword argument 'nite'"):
        api.patch(ft, tmp_path / "typo", aligned=al, unaligned=un, nite="v2")
    # The manifest: a job key (and a top-level default), in the job's provenance.
    root = make_world(tmp_path / "batch")
    manifest = load_manifest(write_manifest(root, [{"finetuned": "ft", "out": "outs/a", "note": "v2"}]))
    assert manifest.jobs[0].note == "v2" and manifest.jobs[0].options().note == "v2"
    assert all(r.ok for r in run_batch(manifest, fsync=False))
    assert json.loads((root / "outs/a/resta_fast.json").read_text())["params"]["note"] == "v2"


def test_without_the_option_its_key_flag_and_keyword_are_refused(tmp_path):
    root = make_world(tmp_path)
    with pytest.raises(ManifestError, match=r"jobs\[0\]: unknown key 'note'"):
        load_manifest(write_manifest(root, [{"finetuned": "ft", "out": "outs/a", "note": "v2"}]))
    assert "--note" not in _help("patch")
    with pytest.raises(TypeError, match="unexpected keyword argument 'note'"):
        api.patch("ft", "out", vector="v", note="v2")


def test_a_check_runs_once_and_speaks_the_same_words_everywhere(tmp_path, capsys):
    """The CLI at parse time, the manifest under its job, the API when the options are made."""
    assert main(["patch", "--finetuned", "f", "--vector", "v", "--out", str(tmp_path / "o"), "--beta", "inf"]) == 2
    cli = capsys.readouterr().err
    root = make_world(tmp_path / "b")
    with pytest.raises(ManifestError) as info:
        load_manifest(write_manifest(root, [{"finetuned": "ft", "out": "outs/a", "beta": float("inf")}]))
    with pytest.raises(OptionError) as api:
        PatchOptions(beta=float("inf"))
    words = "must be a finite number, got inf"
    assert (
        f"--beta {words}" in cli and f"jobs[0]: beta {words}" in str(info.value) and str(api.value) == f"beta {words}"
    )


def test_safemerge_density_is_checked_by_one_rule_for_the_cli_and_the_library(capsys):
    """It used to be > 0 on the command line and (0, 1] in the library."""
    argv = ["safemerge", "--adapter", "a", "--safety-adapter", "s", "--aligned", "al", "--unaligned", "u"]
    assert main([*argv, "--out", "o", "--combination", "dare_linear", "--density", "1.5"]) == 2
    assert "--density must be a fraction in (0, 1], got 1.5" in capsys.readouterr().err
    with pytest.raises(OptionError, match=r"density must be a fraction in \(0, 1\], got 1.5"):
        SAFEMERGE.get("density").run_check(1.5)


def test_realign_specs_give_the_api_its_keywords_and_the_params_their_keys():
    from resta_fast import realign

    pairs = [(SAFELORA, realign.safelora), (SAFEMERGE, realign.safemerge)]
    pairs += [(SAFELORA, realign.Session.safelora), (SAFEMERGE, realign.Session.safemerge)]  # compare calls these
    for spec, func in pairs:
        params = inspect.signature(func).parameters
        assert all(params[name].default == spec.get(name).default for name in spec.names()), spec.command
    values = {"tau": 0.3, "weights": (0.7, 0.3), "combination": "dare_linear", "density": 0.5, "seed": 2, "merge": True}
    assert SAFEMERGE.params(values) == {**values, "weights": [0.7, 0.3]}
    args = SAFEMERGE.reproduce(SAFEMERGE.params(values))
    assert args == ["--tau", "0.3", "--weights", "0.7", "0.3", "--combination", "dare_linear"] + [
        "--density",
        "0.5",
        "--seed",
        "2",
        "--merge",
    ]


def test_spec_check_lists_every_problem_and_refuses_unknown_names():
    spec = Spec("t", (Option("a", 1, check=S.count("a")), Option("b", 0.5, check=S.probability("b"))))
    kept, problems = spec.check({"a": 0, "b": 2})
    assert [p.option for p in problems] == ["a", "b"] and kept == {"a": 0, "b": 2}
    assert spec.check({})[0] == {"a": 1, "b": 0.5}
    with pytest.raises(TypeError, match="unknown t option"):
        spec.check({"c": 1})


def test_a_flag_is_spelled_once_with_its_option():
    assert cli_flag("beta_rules") == PATCH.get("beta_rules").cli == "--beta-rule"
    assert cli_flag("gpu_pool_bytes") == "--gpu-pool-mb" and cli_flag("dare_base") == "--dare-base"
    args = build_parser("patch").parse_args(["patch", "--finetuned", "f", "--vector", "v", "--out", "o"])
    assert PATCH.from_args(args)["gpu_pool_bytes"] == 256 << 20  # the flag's MiB, the API's bytes


def test_every_declared_eval_option_is_a_flag_and_reaches_evaluate(monkeypatch):
    """EvalOptions' declared fields are the eval command's flags and evaluate()'s keywords: none is
    written a second time in the CLI (a field declared there and forgotten in the CLI would be missing)."""
    from resta_fast.eval import runner
    from resta_fast.eval.cli import run_eval
    from resta_fast.eval.options import EVAL, EvalOptions

    declared = [f for f in EvalOptions.field_names() if f not in ("judges", "columns")]
    assert list(EVAL.names()) == declared
    text = _help("eval")
    assert all(EVAL.get(name).cli in text for name in declared)
    seen = {}
    monkeypatch.setattr(runner, "evaluate", lambda **kw: seen.update(kw) or {"summary": {"gate": {"passed": True}}})
    monkeypatch.setattr(runner, "print_summary", lambda *a, **k: None)
    args = build_parser("eval").parse_args(["eval", "--responses", "r.jsonl", "--limit", "3", "--no-chat-template"])
    assert run_eval(args) == 0
    assert set(declared) <= set(seen) and seen["limit"] == 3 and seen["chat_template"] is False


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--safemerge-density", "1.5"], "--safemerge-density must be a fraction in (0, 1], got 1.5"),
        (["--safemerge-density", "0.5"], "--safemerge-density is for --safemerge-combination dare_linear"),
        (["--resta-dare", "1"], "--resta-dare must be a drop probability in [0, 1), got 1.0"),
    ],
)
def test_compare_takes_the_methods_options_under_its_own_flags_with_their_checks(flags, message, capsys):
    """compare's --resta-dare and --safemerge-* are patch's and SafeMERGE's options renamed: their
    checks, and every message spells compare's flag (it said --density before)."""
    pytest.importorskip("transformers")
    argv = ["compare", "--finetuned", "a", "--aligned", "b", "--unaligned", "c", "--prompts", "x"]
    assert main([*argv, "--max-harmful", "0.1", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_a_batch_run_setting_has_one_check_for_its_manifest_key_and_its_flag(tmp_path, capsys):
    root = make_world(tmp_path)
    with pytest.raises(ManifestError) as info:
        load_manifest(write_manifest(root, [{"finetuned": "ft", "out": "outs/a"}], num_cpus=0, group_size=0))
    assert "num_cpus must be a finite number > 0, got 0" in str(info.value)
    assert "group_size must be an integer >= 1, got 0" in str(info.value)
    manifest = write_manifest(root, [{"finetuned": "ft", "out": "outs/a"}])
    assert main(["batch", str(manifest), "--num-cpus", "0", "--dry-run"]) == 2
    assert "--num-cpus must be a finite number > 0, got 0.0" in capsys.readouterr().err
