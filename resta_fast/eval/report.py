"""Reports under ``--out``: report.json (machine), report.md (tables), report.png (per-category chart)."""

from __future__ import annotations

import json
from pathlib import Path


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _ci(ci) -> str:
    return "–" if not ci else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _num(x, fmt="{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def summary_table(summary: dict) -> str:
    """The per-model overview as a Markdown table (also printed by the CLI without ``--json``).

    Args:
        summary: the ``{"models": [...], "gate": ...}`` summary.

    Returns:
        Markdown text.

    Example:
        >>> row = {"model": "m", "n": 2, "harmful": 1, "harmless": 1, "unparseable": 0,
        ...        "harmful_rate": 0.5, "ci95": [0.09, 0.91]}
        >>> print(summary_table({"models": [row]}))
        | model | n | harmful | harmless | unparseable | harmful rate | 95% CI | exact match | perplexity |
        |---|---|---|---|---|---|---|---|---|
        | m | 2 | 1 | 1 | 0 | 50.0% | [9.0, 91.0] | – | – |
    """
    lines = [
        "| model | n | harmful | harmless | unparseable | harmful rate | 95% CI | exact match | perplexity |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in summary["models"]:
        u = m.get("utility", {})
        lines.append(
            f"| {m['model']} | {m.get('n', '–')} | {m.get('harmful', '–')} | {m.get('harmless', '–')} | "
            f"{m.get('unparseable', '–')} | {_pct(m.get('harmful_rate'))} | {_ci(m.get('ci95'))} | "
            f"{_pct(u.get('exact_match'))} | {_num(u.get('perplexity'))} |"
        )
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The full Markdown report: overview, per category, per judge, agreement, comparison, gate.

    Args:
        result: what :func:`resta_fast.eval.evaluate` returns.

    Returns:
        Markdown text.

    Example:
        >>> text = markdown(result)  # doctest: +SKIP
    """
    out = ["# resta-fast safety evaluation", ""]
    meta = result.get("prompts", {})
    if meta.get("smoke_set"):
        out += [
            "> **Smoke set, not a benchmark.** These numbers come from the built-in placeholder probes; "
            "they show the pipeline runs, not how safe the model is. Use CatQA or another real set.",
            "",
        ]
    if meta:
        n = meta.get("n")
        if n is None:  # re-judged responses: the count is per model
            n = ", ".join(str(m.get("n")) for m in result["summary"]["models"])
        out.append(
            f"Prompts: {n} from {', '.join(meta.get('sources', []))} "
            f"({meta.get('duplicates_removed', 0)} duplicate(s) removed). "
            f"Primary judge: `{result.get('primary_judge')}`. Harmful rate = harmful / (harmful + harmless); "
            "unparseable verdicts are excluded and counted separately. CI: Wilson 95%."
        )
        out.append("")
    out += ["## Overview", "", summary_table(result["summary"]), ""]

    models = [m for m in result["models"] if m.get("judges")]
    primary = result.get("primary_judge")
    cats: list[str] = []
    for m in models:
        for c in m["judges"][primary]["categories"]:
            if c not in cats:
                cats.append(c)
    if cats and cats != ["(none)"]:
        out += ["## Harmful rate per category", ""]
        out.append("| category | " + " | ".join(m["label"] for m in models) + " |")
        out.append("|---|" + "---|" * len(models))
        for c in cats:
            cells = []
            for m in models:
                s = m["judges"][primary]["categories"].get(c)
                cells.append("–" if s is None else f"{_pct(s['harmful_rate'])} (n={s['n']})")
            out.append(f"| {c} | " + " | ".join(cells) + " |")
        out.append("")

    if len(result.get("judges", [])) > 1:
        out += [
            "## Judges",
            "",
            "| model | judge | harmful | harmless | unparseable | harmful rate | 95% CI |",
        ]
        out.append("|---|---|---|---|---|---|---|")
        for m in models:
            for j, s in m["judges"].items():
                out.append(
                    f"| {m['label']} | {j} | {s['harmful']} | {s['harmless']} | {s['unparseable']} | "
                    f"{_pct(s['harmful_rate'])} | {_ci(s['ci95'])} |"
                )
        out += ["", "| model | judges | compared | agreement | Cohen's κ |", "|---|---|---|---|---|"]
        for m in models:
            for pair, a in m.get("agreement", {}).items():
                out.append(
                    f"| {m['label']} | {pair} | {a['n']} | {_pct(a['percent_agreement'])} | {_num(a['cohen_kappa'])} |"
                )
        out.append("")

    utils = [m for m in result["models"] if m.get("utility")]
    if utils:
        out += [
            "## Utility",
            "",
            "| model | role | exact match | contains | perplexity |",
            "|---|---|---|---|---|",
        ]
        for m in utils:
            u = m["utility"]
            out.append(
                f"| {m['label']} | {m['role']} | {_pct(u.get('exact_match'))} | {_pct(u.get('contains'))} | "
                f"{_num(u.get('perplexity'))} |"
            )
        out.append("")

    if result.get("comparison"):
        out += ["## Differences", "", "| model | vs | Δ harmful rate | utility drop |", "|---|---|---|---|"]
        for c in result["comparison"]:
            d = c.get("harmful_rate_diff")
            drops = ", ".join(f"{k} {v:+.4f}" for k, v in c.get("utility_drop", {}).items()) or "–"
            diff = "–" if d is None else f"{100 * d:+.1f} pts"
            out.append(f"| {c['model']} | {c['baseline']} | {diff} | {drops} |")
        out.append("")

    gate = result["summary"].get("gate")
    if gate:
        out += ["## Gate", "", f"`{result.get('gate_line', '')}`", ""]
    return "\n".join(out)


def plot(result: dict, path) -> Path:
    """Per-category harmful rate, models side by side, Wilson 95% error bars, as a PNG.

    Uses matplotlib's object API with the Agg canvas, so no GUI backend is touched and
    the caller's pyplot state is left alone.

    Args:
        result: what :func:`resta_fast.eval.evaluate` returns.
        path: PNG file to write.

    Returns:
        The path written.

    Example:
        >>> plot(result, "out/report.png")  # doctest: +SKIP
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    primary = result.get("primary_judge")
    models = [m for m in result["models"] if m.get("judges")]
    cats: list[str] = []
    for m in models:
        for c in m["judges"][primary]["categories"]:
            if c not in cats:
                cats.append(c)
    groups = ["overall"] + [c for c in cats if c != "(none)" or len(cats) > 1]
    n_models = max(1, len(models))
    width = 0.8 / n_models
    fig = Figure(figsize=(max(6.0, 0.9 * len(groups) * max(1, n_models / 2) + 2), 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, m in enumerate(models):
        j = m["judges"][primary]
        stats = [j] + [j["categories"].get(c) for c in groups[1:]]
        rates = [(s or {}).get("harmful_rate") or 0.0 for s in stats]
        lo = [r - (s["ci95"][0] if s and s.get("ci95") else r) for r, s in zip(rates, stats, strict=True)]
        hi = [(s["ci95"][1] if s and s.get("ci95") else r) - r for r, s in zip(rates, stats, strict=True)]
        xs = [g + (i - (n_models - 1) / 2) * width for g in range(len(groups))]
        ax.bar(
            xs,
            [100 * r for r in rates],
            width,
            label=m["label"],
            yerr=[[100 * v for v in lo], [100 * v for v in hi]],
            capsize=2,
        )
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel(f"harmful rate, % ({primary} judge)")
    ax.set_ylim(0, 100)
    title = "Harmful rate per category (Wilson 95% CI)"
    if result.get("prompts", {}).get("smoke_set"):
        title += " — SMOKE SET, not a benchmark"
    ax.set_title(title, fontsize=10)
    if models:
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p)
    return p


def write_reports(result: dict, out_dir) -> dict[str, str]:
    """Write report.json, report.md and report.png into ``out_dir``.

    Args:
        result: what :func:`resta_fast.eval.evaluate` returns.
        out_dir: the ``--out`` directory (created if needed).

    Returns:
        ``{"json": path, "markdown": path, "png": path}``.

    Example:
        >>> write_reports(result, "out")  # doctest: +SKIP
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": str(out / "report.json"),
        "markdown": str(out / "report.md"),
        "png": str(out / "report.png"),
    }
    result.setdefault("files", {}).update(files)
    Path(files["markdown"]).write_text(markdown(result), encoding="utf-8")
    plot(result, files["png"])
    Path(files["json"]).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return files
