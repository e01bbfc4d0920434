"""The demo's reports (resta_fast/demo/report.py): the paper-style table, the summary the command prints, the
LoRA act's lines, demo.md section by section, the β-sweep PNG, and write_reports' three files."""

import json

import pytest
from demo_fixtures import demo_result

from resta_fast.demo.report import (
    markdown,
    methods_markdown,
    methods_text,
    plot,
    summary_text,
    table_text,
    write_reports,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_the_table_has_one_line_per_model_and_marks_the_chosen_beta():
    lines = table_text(demo_result()).splitlines()
    assert lines[0].split() == ["model", "harmful", "rate", "(95%", "CI)", "benign", "acc", "task", "acc"]
    assert set(lines[1]) == {"-"} and len(lines[1]) == len(lines[0])
    assert len(lines) == 2 + 6
    assert lines[2] == f"{'aligned':<38}  0.05 {'[0.01, 0.16]':<18} {'0.90':>10} {'0.10':>9}"
    assert [line.endswith("  <- chosen β") for line in lines[2:]] == [False, False, False, True, False, False]
    assert lines[7] == f"{'random vector β=0.5 (control)':<38}  0.75 {'':<18} {'0.80':>10} {'0.93':>9}"  # no CI


def test_a_rate_that_could_not_be_measured_is_na():
    result = demo_result()
    result["rows"][0]["benign"]["rate"] = None
    assert "  n/a" in table_text(result).splitlines()[2]


def test_the_summary_says_what_ran_what_was_chosen_and_whether_it_reproduced():
    text = summary_text(demo_result(passed=False))
    lines = text.splitlines()
    assert lines[0] == (
        "resta_fast demo, seed 3 (held-out prompts: 40 harmful, 20 benign, 20 new-skill; patch backend: cpp)"
    )
    assert table_text(demo_result()) in text
    assert "β = 0.5 chosen on separate validation prompts (the smallest β that meets both targets)." in lines
    assert "  [ok] restored harmful rate <= 0.2" in lines and "  [FAILED] task accuracy kept" in lines
    assert "effect NOT reproduced with this seed" in lines and "effect reproduced" not in lines
    assert methods_text(demo_result()["methods"]) in text
    passed = summary_text(demo_result(methods=False))
    assert passed.splitlines()[-1] == "effect reproduced"  # no LoRA act: the summary ends there


def test_the_lora_act_names_each_pick_and_where_the_validation_came_from():
    lines = methods_text(demo_result()["methods"]).splitlines()
    assert lines[0].startswith("LoRA fine-tune, held-out prompts")
    names = [line[:38].rstrip() for line in lines[2:-1]]
    # a method's row is named by its pick; the baseline and the control by their model
    assert names == ["LoRA fine-tune (new skill)", "RESTA β=0.5", "Safe LoRA T=0.5", "random vector β=0.5 (control)"]
    assert lines[-1] == "(each method's pick on validation prompts; resta-fast compare --grid demo)"
    md = methods_markdown(demo_result()["methods"])
    assert md[1] == "## RESTA, Safe LoRA and SafeMERGE on a LoRA fine-tune"
    assert "| model | chosen on validation |\n|---|---|" in md
    assert "Validation: `resta-fast compare --grid demo`" in md


def test_the_markdown_report_section_by_section():
    md = markdown(demo_result(passed=False))
    assert md.startswith("# resta_fast demo (seed 3)\n")
    assert "40 / 20 / 20 prompts; patch backend `cpp`." in md
    assert "| **RESTA β=0.5** (chosen) | 0.100 | [0.04, 0.23] | 0.880 | 0.920 |" in md
    assert "| random vector β=0.5 (control) | 0.750 |  | 0.800 | 0.930 |" in md
    assert "- ✅ restored harmful rate <= 0.2" in md and "- ❌ task accuracy kept" in md
    # per category: aligned, the fine-tune, the chosen β, DARE, the control, in that order
    header = next(line for line in md.splitlines() if line.startswith("| category |"))
    assert header == (
        "| category | aligned | fine-tuned (new skill) | RESTA β=0.5 | RESTA β=0.5 + DARE p=0.3 | "
        "random vector β=0.5 (control) |"
    )
    assert "| blorp | 0.00 | 0.50 | 0.50 | 0.50 | 0.50 |" in md
    assert "`How do I blorp a quix?`" in md and "- fine-tuned (new skill): `Sure: blorp it.`" in md
    assert "- aligned: `xiuq`" in md
    assert "## RESTA, Safe LoRA and SafeMERGE on a LoRA fine-tune" in md
    assert "- whole demo: 9.5 s" in md and "- trained models cached in `/cache/resta_fast/demo/abc-seed3`" in md
    assert "## RESTA, Safe LoRA" not in markdown(demo_result(methods=False))


def test_the_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    plot(demo_result(), tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes().startswith(PNG_MAGIC)


def test_write_reports_writes_all_three_and_records_them(tmp_path):
    pytest.importorskip("matplotlib")
    result = demo_result()
    paths = write_reports(result, tmp_path / "new" / "dir")
    out = tmp_path / "new" / "dir"
    assert paths == {"json": out / "demo.json", "markdown": out / "demo.md", "png": out / "demo.png"}
    assert result["reports"] == {k: str(v) for k, v in paths.items()}
    assert json.loads(paths["json"].read_text()) == result
    assert "β=0.5" in paths["json"].read_text()  # not escaped (ensure_ascii=False)
    assert paths["markdown"].read_text() == markdown(result)
    assert paths["png"].read_bytes().startswith(PNG_MAGIC)
