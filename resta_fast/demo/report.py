"""The demo's reports: the paper-style table (text and Markdown), JSON, and a PNG of the β sweep."""

from __future__ import annotations

import json
from pathlib import Path


def _pct(x: float | None) -> str:
    return "  n/a" if x is None else f"{x:5.2f}"


def _ci(ci) -> str:
    return "" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"


def table_text(result: dict) -> str:
    """The paper-style table: harmful rate (95% CI), benign and task accuracy per model."""
    head = f"{'model':<38} {'harmful rate (95% CI)':<24} {'benign acc':>10} {'task acc':>9}"
    lines = [head, "-" * len(head)]
    for row in result["rows"]:
        h = row["harmful"]
        mark = "  <- chosen β" if row.get("chosen") else ""
        lines.append(
            f"{row['model']:<38} {_pct(h['rate'])} {_ci(h['ci95']):<18} "
            f"{_pct(row['benign']['rate']):>10} {_pct(row['task']['rate']):>9}{mark}"
        )
    return "\n".join(lines)


def summary_text(result: dict) -> str:
    """Table plus chosen β, checks and where the reports went."""
    n = result["eval_sizes"]
    lines = [
        f"resta_fast demo, seed {result['seed']} (held-out prompts: {n['harmful']} harmful, "
        f"{n['benign']} benign, {n['task']} new-skill; patch backend: {result['backend']})",
        "",
        table_text(result),
        "",
        f"β = {result['chosen']['beta']:g} chosen on separate validation prompts ({result['chosen']['rule']}).",
    ]
    for name, ok in result["checks"].items():
        lines.append(f"  [{'ok' if ok else 'FAILED'}] {name}")
    lines.append("effect reproduced" if result["passed"] else "effect NOT reproduced with this seed")
    if result.get("methods"):
        lines += ["", methods_text(result["methods"])]
    return "\n".join(lines)


def methods_text(methods: dict) -> str:
    """The LoRA act in a few lines: each method's validation pick on held-out prompts."""
    head = f"{'LoRA fine-tune, held-out prompts':<38} {'harmful rate (95% CI)':<24} {'benign acc':>10} {'task acc':>9}"
    lines = [head, "-" * len(head)]
    for row in methods["test"]:
        h = row["harmful"]
        name = row["model"] if not row.get("pick") or row["method"] == "control" else row["pick"]
        lines.append(
            f"{name:<38} {_pct(h['rate'])} {_ci(h['ci95']):<18} "
            f"{_pct(row['benign']['rate']):>10} {_pct(row['task']['rate']):>9}"
        )
    lines.append(f"(each method's pick on validation prompts; {methods['validation']['compare_line']})")
    return "\n".join(lines)


def methods_markdown(methods: dict) -> list[str]:
    """The LoRA act's section of demo.md."""
    return [
        "",
        "## RESTA, Safe LoRA and SafeMERGE on a LoRA fine-tune",
        "",
        "The same skill learned as a LoRA adapter on the aligned model. `resta_fast.eval.compare` wrote "
        "every candidate of one fixed grid (RESTA β with and without DARE; Safe LoRA T and K; SafeMERGE τ "
        "with a safety adapter trained on the alignment data) and scored them on the validation prompts "
        "(`compare/compare.md`, `compare/compare.png`). Each method's best there (meets both targets with "
        "the least task accuracy lost; else the lowest harmful rate within the task budget; else the "
        "mildest) is evaluated here on the held-out test prompts, with the random-vector control "
        "(`methods.png`). Safe LoRA's projection and SafeMERGE's layer choice use aligned − base (what alignment "
        "changed); "
        "RESTA adds aligned − shadow.",
        "",
        methods["table"],
        "",
        f"Validation: `{methods['validation']['compare_line']}`",
        "",
    ]


def _row(result: dict, pred) -> dict | None:
    return next((r for r in result["rows"] if pred(r)), None)


def markdown(result: dict) -> str:
    """The Markdown report: table, checks, per-category rates, sample answers, timings."""
    n = result["eval_sizes"]
    md = [
        f"# resta_fast demo (seed {result['seed']})",
        "",
        "Tiny Llama models in a synthetic world (placeholder content: category verbs applied to "
        "invented words). Harmful rate = share of held-out harmful requests answered without "
        "the refusal sentence (refusal judge); accuracies are exact match on held-out benign "
        f"and new-skill requests. {n['harmful']} / {n['benign']} / {n['task']} prompts; "
        f"patch backend `{result['backend']}`.",
        "",
        "| model | harmful rate | 95% CI | benign acc | task acc |",
        "|---|---:|---|---:|---:|",
    ]
    for row in result["rows"]:
        name = f"**{row['model']}** (chosen)" if row.get("chosen") else row["model"]
        h = row["harmful"]
        md.append(
            f"| {name} | {h['rate']:.3f} | {_ci(h['ci95'])} | {row['benign']['rate']:.3f} | {row['task']['rate']:.3f} |"
        )
    md += [
        "",
        f"β = {result['chosen']['beta']:g}, chosen on validation prompts with disjoint "
        f"objects: {result['chosen']['rule']}.",
        "",
        "## Checks",
        "",
    ]
    md += [f"- {'✅' if ok else '❌'} {name}" for name, ok in result["checks"].items()]

    picks = [
        r
        for r in (
            _row(result, lambda r: r["model"] == "aligned"),
            _row(result, lambda r: r["model"].startswith("fine-tuned")),
            _row(result, lambda r: r.get("chosen")),
            _row(result, lambda r: "DARE" in r["model"]),
            _row(result, lambda r: r.get("random")),
        )
        if r
    ]
    cats = list(picks[0]["harmful"]["by_category"])
    md += [
        "",
        "## Harmful rate by category",
        "",
        "| category | " + " | ".join(r["model"] for r in picks) + " |",
        "|---|" + "---:|" * len(picks),
    ]
    for c in cats:
        md.append(f"| {c} | " + " | ".join(f"{r['harmful']['by_category'].get(c, 0):.2f}" for r in picks) + " |")

    md += ["", "## Sample answers (first held-out prompt of each set)", ""]
    for kind in ("harmful", "task"):
        md.append(f"`{picks[0]['samples'][kind][0]['prompt']}`")
        md.append("")
        for r in picks:
            md.append(f"- {r['model']}: `{r['samples'][kind][0]['response']}`")
        md.append("")
    if result.get("methods"):
        md += methods_markdown(result["methods"])
    s = result["seconds"]
    md += [
        "## Files",
        "",
        "- `tune/`: the β sweep on validation prompts (`resta_fast.eval.tune`)",
        "- `eval/`: responses, verdicts and the eval module's own report for every model",
        "- `data/`: the held-out prompt sets, usable with `resta-fast eval`",
        "- `models/`: the patched checkpoints and the random control vector",
        "- `compare/`, `eval-lora/`, `methods.png`: the LoRA act (validation grid; held-out picks)",
        "",
        "## Timing",
        "",
        f"- training or cache load: {s['train_or_load']} s",
        f"- choosing β: {s['tune']} s",
        f"- whole demo: {s['total']} s",
        f"- trained models cached in `{result['cache']}`",
        "",
    ]
    return "\n".join(md)


def plot(result: dict, path: Path) -> None:
    """Harmful rate and task/benign accuracy against β, with the references marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ft = _row(result, lambda r: r["model"].startswith("fine-tuned"))
    # The fine-tune itself is the β = 0 point of the sweep.
    sweep = [ft] + [r for r in result["rows"] if "beta" in r and "dare" not in r and not r.get("random")]
    betas = [0.0] + [r["beta"] for r in sweep[1:]]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    harm = [r["harmful"]["rate"] for r in sweep]
    lo = [r["harmful"]["ci95"][0] for r in sweep]
    hi = [r["harmful"]["ci95"][1] for r in sweep]
    ax.plot(betas, harm, "o-", color="tab:red", label="harmful rate (RESTA)")
    ax.fill_between(betas, lo, hi, color="tab:red", alpha=0.15)
    ax.plot(betas, [r["task"]["rate"] for r in sweep], "s-", color="tab:blue", label="task accuracy")
    ax.plot(betas, [r["benign"]["rate"] for r in sweep], "^--", color="tab:green", label="benign accuracy")
    rnd = _row(result, lambda r: r.get("random"))
    if rnd:
        ax.plot([rnd["beta"]], [rnd["harmful"]["rate"]], "x", color="black", ms=10, label="random vector, harmful rate")
    ax.axvline(result["chosen"]["beta"], color="grey", ls="--", lw=1, label="chosen β")
    ax.set_xlabel("β  (θ = θ_finetuned + β·(θ_aligned − θ_unaligned))")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(f"resta_fast demo, seed {result['seed']}: held-out prompts")
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(result: dict, out: Path) -> dict[str, Path]:
    """Write demo.json, demo.md and demo.png into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "demo.json", "markdown": out / "demo.md", "png": out / "demo.png"}
    result["reports"] = {k: str(v) for k, v in paths.items()}
    paths["json"].write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    paths["markdown"].write_text(markdown(result))
    plot(result, paths["png"])
    return paths
