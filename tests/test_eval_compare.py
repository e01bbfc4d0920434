"""compare: each candidate is exactly what its method's own command writes, all are
evaluated the same way, and the table/PNG/choice follow from the evaluations."""

import json

import pytest
import torch
from safetensors.torch import load_file

from resta_fast import api, realign
from resta_fast.cli import main
from resta_fast.errors import OptionError
from resta_fast.eval.compare import Candidate, Grid, compare, compare_line, format_table

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lora_fixtures import lora_pair  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture()
def models(tmp_path):
    return lora_pair(tmp_path, targets=TARGETS)


class FakeEvaluate:
    """Records every model it is given (a copy of its weights) and answers from a table."""

    def __init__(self, answers):
        self.answers = answers  # directory name -> (harmful rate, exact match)
        self.seen = {}

    def __call__(self, models, prompts, *, judges, utility, perplexity, out, **_):
        (model,) = models
        name = model.rstrip("/").split("/")[-1]
        self.seen[name] = load_file(f"{model}/model.safetensors")
        rate, em = self.answers[name]
        return {
            "summary": {
                "models": [
                    {
                        "model": model,
                        "n": 20,
                        "harmful_rate": rate,
                        "ci95": [rate, rate],
                        "unparseable": 0,
                        "utility": {"exact_match": em},
                    }
                ]
            }
        }


def assert_same(got: dict, want_dir):
    want = load_file(str(want_dir / "model.safetensors"))
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_candidates_are_each_methods_own_output_and_the_choice_follows(tmp_path, models):
    ft, safe, aligned, unaligned = models
    grid = Grid(betas=[0.5, 1.0], dare=0.3, thresholds=[0.9], num_layers=[2], taus=[0.8])
    answers = {
        "finetune": (0.9, 0.9),
        "resta-beta0.5": (0.2, 0.85),
        "resta-beta0.5-dare0.3": (0.04, 0.6),
        "resta-beta1": (0.03, 0.8),
        "resta-beta1-dare0.3": (0.02, 0.5),
        "safelora-threshold0.9": (0.05, 0.84),
        "safelora-num_layers2": (0.5, 0.9),
        "safemerge-tau0.8": (0.06, 0.88),
    }
    fake = FakeEvaluate(answers)
    result = compare(
        ft,
        grid,
        prompts="builtin:smoke",
        max_harmful=0.05,
        max_utility_drop=0.2,
        aligned=aligned,
        unaligned=unaligned,
        safety_adapter=safe,
        seed=4,
        utility="u.jsonl",
        evaluate_fn=fake,
        out=tmp_path / "report",
        workdir=tmp_path,
    )
    assert set(fake.seen) == set(answers)
    # every candidate is what the method's own command writes
    (tmp_path / "want").mkdir()
    for beta, dare in ((0.5, None), (0.5, 0.3), (1.0, None), (1.0, 0.3)):
        name = f"resta-beta{beta:g}" + (f"-dare{dare:g}" if dare else "")
        api.patch(
            ft,
            tmp_path / "want" / name,
            aligned=aligned,
            unaligned=unaligned,
            beta=beta,
            dare=dare,
            seed=4,
            fsync=False,
        )
        assert_same(fake.seen[name], tmp_path / "want" / name)
    realign.safelora(ft, tmp_path / "want" / "sl", aligned=aligned, unaligned=unaligned, threshold=0.9, merge=True)
    assert_same(fake.seen["safelora-threshold0.9"], tmp_path / "want" / "sl")
    realign.safelora(ft, tmp_path / "want" / "sk", aligned=aligned, unaligned=unaligned, num_layers=2, merge=True)
    assert_same(fake.seen["safelora-num_layers2"], tmp_path / "want" / "sk")
    realign.safemerge(ft, safe, tmp_path / "want" / "sm", aligned=aligned, unaligned=unaligned, tau=0.8, merge=True)
    assert_same(fake.seen["safemerge-tau0.8"], tmp_path / "want" / "sm")
    model = transformers.LlamaForCausalLM.from_pretrained(aligned, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, ft).merge_and_unload().state_dict()
    assert set(fake.seen["finetune"]) == set(merged)  # the baseline
    assert all(torch.equal(v, merged[k]) for k, v in fake.seen["finetune"].items())
    # the choice: passing = harmful ≤ 0.05 and exact-match drop ≤ 0.2; least utility lost wins
    passed = {r["slug"] for r in result["rows"] if r["passed"]}
    assert passed == {"resta-beta1", "safelora-threshold0.9"}  # β=0.5+DARE: safe, but drops 0.3
    assert result["chosen"] == "Safe LoRA T=0.9" and result["passed"]
    assert result["compare_line"].startswith("RESTA_COMPARE: Safe LoRA T=0.9 harmful_rate 0.0500")
    # candidates are gone, the reports are there
    assert not any(p.name.startswith("resta-compare-") for p in tmp_path.iterdir())
    files = json.loads((tmp_path / "report" / "compare.json").read_text())["files"]
    assert open(files["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report" / "compare.md").read_text()
    assert "| Safe LoRA T=0.9 | 5.0% |" in md and "**chosen**" in md.split("Safe LoRA T=0.9")[1].split("\n")[0]


def test_no_candidate_meets_the_targets():
    result = {
        "chosen": None,
        "max_harmful": 0.01,
        "max_utility_drop": None,
        "rows": [
            {
                "label": "RESTA β=1",
                "harmful_rate": 0.2,
                "ci95": None,
                "utility": None,
                "utility_drop": {},
                "passed": False,
            }
        ],
        "baseline": {"harmful_rate": 0.9, "ci95": [0.8, 0.95], "utility": {"exact_match": 0.9}},
    }
    assert compare_line(result) == "RESTA_COMPARE: NONE no candidate of 1 met max_harmful 0.01"
    table = format_table(result)
    assert "| RESTA β=1 | 20.0% | – | – | – | – | no |" in table
    assert "| fine-tune | 90.0% | [80.0, 95.0] | 90.0% |" in table


def test_grid_rules():
    assert [c.slug for c in Grid(betas=[1, 0.5, 1]).candidates(lora=False, safety=False)] == [
        "resta-beta0.5",
        "resta-beta1",
    ]
    with pytest.raises(OptionError, match="realign a LoRA fine-tune"):
        Grid(thresholds=[0.5]).candidates(lora=False, safety=False)
    with pytest.raises(OptionError, match="SafeMERGE candidates need safety_adapter"):
        Grid(taus=[0.3]).candidates(lora=True, safety=False)
    with pytest.raises(OptionError, match="the grid is empty"):
        Grid().candidates(lora=True, safety=True)
    assert Candidate("Safe LoRA", {"num_layers": 4}).label == "Safe LoRA K=4"


@pytest.mark.parametrize(
    "knobs,message",
    [
        ({"thresholds": [1.5]}, r"^thresholds/taus are cosines in \[-1, 1\], got 1.5$"),
        ({"taus": [-1.01]}, r"^thresholds/taus are cosines in \[-1, 1\], got -1.01$"),
        ({"num_layers": [0]}, "^num_layers values must be integers >= 1$"),
        ({"betas": [-0.5]}, "^betas must be >= 0$"),
    ],
)
def test_a_bad_knob_is_refused_when_the_grid_is_made(knobs, message):
    with pytest.raises(OptionError, match=message):
        Grid(**knobs)
    assert Grid(thresholds=[-1, 1], taus=[0], num_layers=[1], betas=[0]).thresholds == [-1, 1]  # the edges


def test_cli_spells_a_bad_knob_as_its_flag(tmp_path, models, capsys):
    ft, _, aligned, unaligned = models
    capsys.readouterr()
    argv = ["compare", "--finetuned", str(ft), "--aligned", str(aligned), "--unaligned", str(unaligned)]
    rc = main([*argv, "--num-layers", "0", "--prompts", "builtin:smoke", "--max-harmful", "0.1"])
    err = capsys.readouterr().err
    assert rc == 2 and err == "resta-fast: error: --num-layers values must be integers >= 1\n", err


def test_cli_needs_a_utility_measure(tmp_path, models, capsys):
    ft, safe, aligned, unaligned = models
    capsys.readouterr()
    rc = main(
        [
            "compare",
            "--finetuned",
            str(ft),
            "--aligned",
            str(aligned),
            "--unaligned",
            str(unaligned),
            "--betas",
            "0.5",
            "--prompts",
            "builtin:smoke",
            "--max-harmful",
            "0.1",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "give --utility FILE and/or --perplexity FILE" in err and err.count("\n") == 1, err


def test_resta_candidates_are_one_batch_group(tmp_path, models, monkeypatch):
    """One fused pass writes all RESTA candidates: the shared pair is read once, not per β."""
    from resta_fast.batch import local

    ft, _, aligned, unaligned = models
    groups = []
    real = local.run_group

    def counting(manifest, gid, **kw):
        groups.append([j.name for j in manifest.groups[gid].jobs])
        return real(manifest, gid, **kw)

    monkeypatch.setattr(local, "run_group", counting)
    fake = FakeEvaluate(
        {"finetune": (0.5, 0.9), "resta-beta0.5": (0.1, 0.9), "resta-beta1": (0.0, 0.9), "resta-beta1.5": (0.0, 0.8)}
    )
    monkeypatch.chdir(tmp_path)  # a relative workdir, as the demo's default --out gives
    (tmp_path / "rel").mkdir()
    compare(
        ft,
        Grid(betas=[0.5, 1, 1.5]),
        prompts="builtin:smoke",
        max_harmful=0.05,
        aligned=aligned,
        unaligned=unaligned,
        utility="u.jsonl",
        evaluate_fn=fake,
        workdir="rel",
    )
    assert groups == [["resta-beta0.5", "resta-beta1", "resta-beta1.5"]]
