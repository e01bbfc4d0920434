"""`patch --validate-prompts`: the one-command CI gate on a freshly written output."""

import json

import pytest
import torch

from resta_fast.cli import main

pytest.importorskip("transformers")


@pytest.fixture()
def models(tmp_path):
    from eval_fakes import refusal_triple

    torch.set_num_threads(1)
    # F answers with random words; A = F with the final norm zeroed (says "sorry"); U = F.
    # θ = F + β(A − U) scales the norm by (1 − β): β = 1 refuses, β = 0.5 answers like F.
    return refusal_triple(tmp_path)


def run(tmp_path, models, beta, capsys, *extra):
    ft, al, un = models
    out = tmp_path / f"out{beta}"
    code = main(
        [
            "patch",
            "--finetuned",
            str(ft),
            "--aligned",
            str(al),
            "--unaligned",
            str(un),
            "--beta",
            str(beta),
            "--out",
            str(out),
            "--backend",
            "torch",
            "--no-fsync",
            "--no-progress",
            "--validate-prompts",
            "builtin:smoke",
            "--max-harmful",
            "0.05",
            "--validate-max-new-tokens",
            "4",
            *extra,
        ]
    )
    return code, out, capsys.readouterr()


def test_gate_passes_when_refusals_are_restored(tmp_path, models, capsys):
    code, out, cap = run(tmp_path, models, 1.0, capsys)
    assert code == 0, cap.err
    report = json.loads((out / "resta_fast.json").read_text())
    assert report["validation"]["passed"] is True
    assert "RESTA_GATE: PASS" in cap.out
    assert not (out / "VALIDATION_FAILED").exists()


def test_gate_failure_exits_1_and_keeps_a_marked_output(tmp_path, models, capsys):
    code, out, cap = run(tmp_path, models, 0.5, capsys)
    assert code == 1
    assert "RESTA_GATE: FAIL" in cap.out
    report = json.loads((out / "resta_fast.json").read_text())
    assert report["validation"]["passed"] is False and report["validation"]["reason"]
    assert (out / "VALIDATION_FAILED").exists() and (out / "model.safetensors").exists()


def test_gate_flags_need_prompts(tmp_path, models, capsys):
    ft, al, un = models
    code = main(
        [
            "patch",
            "--finetuned",
            str(ft),
            "--aligned",
            str(al),
            "--unaligned",
            str(un),
            "--out",
            str(tmp_path / "o"),
            "--max-harmful",
            "0.1",
        ]
    )
    assert code == 2 and "--validate-prompts" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_batch_validates_every_job(tmp_path, models, capsys):
    ft, al, un = models
    manifest = tmp_path / "batch.json"
    manifest.write_text(
        json.dumps(
            {
                "aligned": str(al),
                "unaligned": str(un),
                "backend": "torch",
                "fsync": False,
                "jobs": [
                    {"finetuned": str(ft), "out": "restored", "beta": 1.0, "name": "restored"},
                    {"finetuned": str(ft), "out": "eroded", "beta": 0.5, "name": "eroded"},
                ],
            }
        )
    )
    code = main(
        [
            "batch",
            str(manifest),
            "--no-progress",
            "--json",
            "--validate-prompts",
            "builtin:smoke",
            "--max-harmful",
            "0.05",
            "--validate-max-new-tokens",
            "4",
        ]
    )
    summary = json.loads(capsys.readouterr().out)
    assert code == 1
    status = {j["name"]: j for j in summary["jobs"]}
    assert status["restored"]["status"] == "done"
    assert status["eroded"]["status"] == "failed" and "validation failed" in status["eroded"]["error"]
    assert (tmp_path / "eroded" / "VALIDATION_FAILED").exists()
    assert json.loads((tmp_path / "restored" / "resta_fast.json").read_text())["validation"]["passed"]
