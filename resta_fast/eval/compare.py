"""Every realignment method side by side: one grid of candidates, one evaluation, one table and one PNG.

The user's question is "which method, with which knob, is safe and still
useful on my model?". ``compare`` writes one candidate per grid point —

- RESTA at each β (and with DARE when asked), written through the batch
  machinery as one fused pass, so the shared aligned/unaligned pair is read once;
- Safe LoRA at each threshold T or layer count K, and SafeMERGE at each τ, from
  one ``realign.Session``: every module's cosine is computed once (the reads
  of both models) and each candidate is a merge of the adapter;

evaluates each, and the fine-tune itself, with the same prompts and judges,
gates each against the harmful-rate and utility targets, and chooses the
candidate that meets them with the least utility lost (then the lowest harmful
rate). Candidates live in a temporary work directory, removed after their
evaluation unless ``keep``.

Example:
    >>> grid = Grid(betas=[0.5, 1.0], thresholds=[0.5], taus=[0.35])
    >>> [c.label for c in grid.candidates(lora=True, safety=True)]
    ['RESTA β=0.5', 'RESTA β=1', 'Safe LoRA T=0.5', 'SafeMERGE τ=0.35']
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from resta_fast.errors import OptionError, RestaError
from resta_fast.eval import gate as gate_mod

COMPARE_PREFIX = "RESTA_COMPARE:"
METHODS = ("RESTA", "Safe LoRA", "SafeMERGE")


@dataclass
class Candidate:
    """One grid point: a method and its knobs."""

    method: str  # one of METHODS
    knobs: dict

    @property
    def label(self) -> str:
        names = {"beta": "β", "dare": "DARE p", "threshold": "T", "num_layers": "K", "tau": "τ"}
        return f"{self.method} " + " ".join(f"{names[k]}={v:g}" for k, v in self.knobs.items() if v is not None)

    @property
    def slug(self) -> str:
        return "-".join(
            [self.method.lower().replace(" ", "")] + [f"{k}{v:g}" for k, v in self.knobs.items() if v is not None]
        )


@dataclass
class Grid:
    """The knobs to try: RESTA β (each also with DARE p when ``dare``), Safe LoRA T or K, SafeMERGE τ."""

    betas: list[float] = field(default_factory=list)
    dare: float | None = None
    thresholds: list[float] = field(default_factory=list)
    num_layers: list[int] = field(default_factory=list)
    taus: list[float] = field(default_factory=list)

    def __post_init__(self):
        # Checked when the grid is made, so compare() refuses a bad knob before it writes a candidate.
        for t in [*self.thresholds, *self.taus]:
            if not -1 <= t <= 1:
                raise OptionError("thresholds", "{thresholds}/{taus} are cosines in [-1, 1], got {t}", t=t)
        if any(k < 1 for k in self.num_layers):
            raise OptionError("num_layers", "{num_layers} values must be integers >= 1")
        if any(b < 0 for b in self.betas):
            raise OptionError("betas", "{betas} must be >= 0")

    def candidates(self, *, lora: bool, safety: bool) -> list[Candidate]:
        """The grid's candidates; Safe LoRA and SafeMERGE need a LoRA fine-tune (and a safety adapter)."""
        if (self.thresholds or self.num_layers or self.taus) and not lora:
            raise OptionError(
                "finetuned",
                "Safe LoRA and SafeMERGE realign a LoRA fine-tune: give a PEFT "
                "adapter as {finetuned}, or drop the Safe LoRA/SafeMERGE knobs",
            )
        if self.taus and not safety:
            raise OptionError("safety_adapter", "SafeMERGE candidates need {safety_adapter} DIR")
        out = []
        for beta in sorted(set(self.betas)):
            out.append(Candidate("RESTA", {"beta": beta}))
            if self.dare is not None:
                out.append(Candidate("RESTA", {"beta": beta, "dare": self.dare}))
        out += [Candidate("Safe LoRA", {"threshold": t}) for t in sorted(set(self.thresholds))]
        out += [Candidate("Safe LoRA", {"num_layers": k}) for k in sorted(set(self.num_layers))]
        out += [Candidate("SafeMERGE", {"tau": t}) for t in sorted(set(self.taus))]
        if not out:
            raise OptionError("betas", "the grid is empty: give {betas}, {thresholds}, {num_layers} and/or {taus}")
        return out


def write_candidates(
    candidates: list[Candidate],
    root: Path,
    *,
    finetuned,
    aligned,
    unaligned,
    base=None,
    pre_aligned=None,
    safety_adapter=None,
    seed: int = 0,
    safemerge_options: dict | None = None,
    progress: bool = False,
    resolver=None,
) -> tuple[Path, dict[str, Path]]:
    """Write the fine-tune baseline and every candidate under ``root``: (baseline dir, {slug: dir}).

    A full fine-tune is its own baseline; a LoRA fine-tune's is its merge into ``base``.
    ``pre_aligned`` is Safe LoRA's "unaligned" model, the one ``aligned`` was aligned
    from (default: ``unaligned``, RESTA's shadow model). Inputs are paths or Hub ids
    (or ``resolve.Input``, already resolved); ``resolver``: the run's ``io.hub.Resolver``.
    """
    from resta_fast.resolve import Resolver

    resolver = resolver or Resolver()
    ins = resolve_inputs(
        resolver,
        finetuned=finetuned,
        aligned=aligned,
        unaligned=unaligned,
        base=base,
        pre_aligned=pre_aligned,
        safety_adapter=safety_adapter,
    )
    lora = ins["finetuned"].is_adapter
    dirs = {c.slug: root / c.slug for c in candidates}
    resta = [c for c in candidates if c.method == "RESTA"]
    if resta:
        _write_resta(
            resta,
            dirs,
            finetuned=ins["finetuned"],
            aligned=ins["aligned"],
            unaligned=ins["unaligned"],
            base=ins["base"] if lora else None,
            seed=seed,
        )
    baseline = Path(ins["finetuned"].path)
    if lora:
        from resta_fast import realign

        with realign.Session(
            ins["finetuned"],
            aligned=ins["aligned"],
            unaligned=ins["pre_aligned"] or ins["unaligned"],
            safety_adapter=ins["safety_adapter"],
            base=ins["base"],
            progress=progress,
        ) as session:
            baseline = root / "finetune"
            session.finetune(baseline, fsync=False)
            for c in candidates:
                if c.method == "Safe LoRA":
                    session.safelora(dirs[c.slug], merge=True, fsync=False, **c.knobs)
                elif c.method == "SafeMERGE":
                    session.safemerge(
                        dirs[c.slug], merge=True, fsync=False, tau=c.knobs["tau"], **(safemerge_options or {})
                    )
    return baseline, dirs


def resolve_inputs(resolver=None, **given) -> dict:
    """compare's inputs (role -> path, Hub id or None) through the one resolve step: role -> ``resolve.Input``.

    Each Hub id is resolved once (``resolver``: the run's ``io.hub.Resolver``), and
    ``Input.is_adapter`` says whether the fine-tune is a PEFT adapter, wherever it lay.
    """
    from resta_fast.resolve import resolve_all
    from resta_fast.roles import REALIGN_KINDS, ROLE_KINDS

    return resolve_all(given, {**ROLE_KINDS, **REALIGN_KINDS, "pre_aligned": "model"}, resolver)


def _as_job(**inputs) -> dict:
    """Resolved inputs (``resolve.Input`` or None) as a batch JobSpec holds them, as batch's manifest loader
    makes them: a local path absolute and normalised, a Hub input its snapshot with its origin in ``hub``."""
    kw: dict = {
        role: None if inp is None else Path(inp.path if inp.is_hub else os.path.abspath(inp.path))
        for role, inp in inputs.items()
    }
    kw["hub"] = {role: inp.hub for role, inp in inputs.items() if inp is not None and inp.is_hub}
    return kw


def _write_resta(cands: list[Candidate], dirs: dict, *, finetuned, aligned, unaligned, base, seed: int) -> None:
    """RESTA candidates as one batch group: the shared inputs are read once for all of them."""
    from resta_fast.batch.local import run_batch
    from resta_fast.batch.manifest import JobSpec

    inputs = _as_job(finetuned=finetuned, aligned=aligned, unaligned=unaligned, base=base)
    jobs = [
        JobSpec(
            i,
            c.slug,
            out=Path(os.path.abspath(dirs[c.slug])),
            **inputs,
            beta=float(c.knobs["beta"]),
            **({"dare": float(c.knobs["dare"]), "seed": seed} if c.knobs.get("dare") is not None else {}),
        )
        for i, c in enumerate(cands)
    ]
    for job in jobs:
        job.options()  # a bad knob is refused before any candidate is written
    # In memory: nothing is written but the candidates.
    failed = [r for r in run_batch(jobs, group_size=len(jobs), fsync=False) if not r.ok]
    if failed:
        raise RestaError(f"compare: RESTA candidate {failed[0].name} failed: {failed[0].error}")


def _score(row: dict) -> tuple:
    """Sort key of passing candidates: least utility lost, then lowest harmful rate."""
    drops = row.get("utility_drop") or {}
    lost = max(drops.values()) if drops else math.inf
    return (lost, row["harmful_rate"] if row["harmful_rate"] is not None else math.inf)


def compare(
    finetuned,
    grid: Grid,
    *,
    prompts,
    max_harmful: float,
    aligned,
    unaligned,
    base=None,
    pre_aligned=None,
    safety_adapter=None,
    seed: int = 0,
    safemerge_options: dict | None = None,
    max_utility_drop: float | None = None,
    utility=None,
    perplexity=None,
    judges=("refusal",),
    eval_options: dict | None = None,
    workdir=None,
    keep: bool = False,
    out=None,
    progress: bool = False,
    evaluate_fn=None,
) -> dict:
    """Write the grid's candidates, evaluate each and the fine-tune on the same prompts, choose one.

    Args:
        finetuned: a full fine-tune or a PEFT LoRA adapter (Safe LoRA/SafeMERGE need an adapter).
        grid: the knobs to try (``Grid``).
        prompts: harmful prompt spec(s) or a loaded PromptSet.
        max_harmful: the harmful-rate target; max_utility_drop: the utility budget against the fine-tune.
        aligned, unaligned: RESTA's pair (the safety vector is their difference).
        pre_aligned: the model ``aligned`` was aligned from, for Safe LoRA's and SafeMERGE's
            projection (default: ``unaligned``).
        base: a LoRA fine-tune's base (default: aligned). safety_adapter: SafeMERGE's.
        seed: RESTA's DARE seed. safemerge_options: weights, combination, density, seed.
        utility, perplexity: utility measures (at least one: the table's x axis).
        judges, eval_options: as ``resta_fast.eval.evaluate``.
        workdir, keep: where candidates are written, and whether they are kept.
        out: directory for compare.json, compare.md, compare.png and each model's evaluation.
    Returns:
        ``{"chosen", "passed", "rows", "baseline", "compare_line", ...}``; each row has the
        candidate's ``label``, ``method``, ``knobs``, ``harmful_rate``, ``ci95``, ``utility``,
        ``utility_drop``, ``passed``, ``reason``.
    """
    from resta_fast.eval.judges import make_judge
    from resta_fast.eval.prompts import PromptSet, load_prompts
    from resta_fast.eval.runner import evaluate
    from resta_fast.resolve import Resolver

    if not (utility or perplexity):
        raise OptionError(
            "utility", "compare plots harmful rate against utility: give {utility} FILE and/or {perplexity} FILE"
        )
    # The one resolve step, once for the whole run: a Hub id is resolved here and nowhere again.
    resolver = Resolver()
    ins = resolve_inputs(
        resolver,
        finetuned=finetuned,
        aligned=aligned,
        unaligned=unaligned,
        base=base,
        pre_aligned=pre_aligned,
        safety_adapter=safety_adapter,
    )
    candidates = grid.candidates(lora=ins["finetuned"].is_adapter, safety=safety_adapter is not None)
    evaluate_fn = evaluate_fn or evaluate
    pset = prompts if isinstance(prompts, PromptSet) else load_prompts(prompts)
    judge_objs = [make_judge(j) if isinstance(j, str) else j for j in judges]
    out_dir = Path(out) if out else None
    # Absolute: the candidates' directories are named by absolute paths (the RESTA ones as batch job specs).
    root = Path(tempfile.mkdtemp(prefix="resta-compare-", dir=workdir)).absolute()
    try:
        baseline_dir, dirs = write_candidates(
            candidates,
            root,
            **ins,
            seed=seed,
            safemerge_options=safemerge_options,
            progress=progress,
            resolver=resolver,
        )

        def run_eval(model_dir: Path, label: str) -> dict:
            res = evaluate_fn(
                [str(model_dir)],
                pset,
                judges=judge_objs,
                utility=utility,
                perplexity=perplexity,
                out=(out_dir / label) if out_dir else None,
                **(eval_options or {}),
            )
            return res["summary"]["models"][0]

        base_summary = run_eval(baseline_dir, "finetune")
        ref_util = base_summary.get("utility")
        rows = []
        for c in candidates:
            s = run_eval(dirs[c.slug], c.slug)
            chk = gate_mod.check_model(
                s, max_harmful=max_harmful, max_utility_drop=max_utility_drop, reference_utility=ref_util
            )
            rows.append(
                {
                    "label": c.label,
                    "method": c.method,
                    "knobs": c.knobs,
                    "slug": c.slug,
                    "model": str(dirs[c.slug]) if keep else None,
                    "n": s.get("n"),
                    "harmful_rate": s.get("harmful_rate"),
                    "ci95": s.get("ci95"),
                    "unparseable": s.get("unparseable"),
                    "utility": s.get("utility"),
                    "utility_drop": chk["utility_drop"],
                    "passed": chk["passed"],
                    "reason": chk["reason"],
                }
            )
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    passing = sorted((r for r in rows if r["passed"]), key=_score)
    chosen = passing[0]["label"] if passing else None
    result = {
        "chosen": chosen,
        "passed": chosen is not None,
        "max_harmful": max_harmful,
        "max_utility_drop": max_utility_drop,
        "grid": asdict(grid),
        "baseline": {
            "model": str(finetuned),
            "harmful_rate": base_summary.get("harmful_rate"),
            "ci95": base_summary.get("ci95"),
            "n": base_summary.get("n"),
            "utility": ref_util,
        },
        "rows": rows,
        "workdir": str(root) if keep else None,
    }
    result["compare_line"] = compare_line(result)
    if out_dir:
        write_reports(result, out_dir)
    return result


def compare_line(result: dict) -> str:
    """One grep-able line naming the chosen candidate, or NONE.

    Example:
        >>> compare_line({"chosen": None, "rows": [{"label": "RESTA β=1"}], "max_harmful": 0.05})
        'RESTA_COMPARE: NONE no candidate of 1 met max_harmful 0.05'
    """
    if result["chosen"] is None:
        budget = result.get("max_utility_drop")
        extra = f" within utility drop {budget}" if budget is not None else ""
        return (
            f"{COMPARE_PREFIX} NONE no candidate of {len(result['rows'])} met max_harmful "
            f"{result['max_harmful']}{extra}"
        )
    row = next(r for r in result["rows"] if r["label"] == result["chosen"])
    return f"{COMPARE_PREFIX} {row['label']} {row['reason'].split(': ', 1)[-1]}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _ci(c) -> str:
    return "–" if not c else f"[{100 * c[0]:.1f}, {100 * c[1]:.1f}]"


def _utility_cells(u) -> tuple[str, str]:
    u = u or {}
    ppl = u.get("perplexity")
    return _pct(u.get("exact_match")), "–" if ppl is None else f"{ppl:.3f}"


def format_table(result: dict) -> str:
    """The comparison as a Markdown table: the fine-tune first, then every candidate, the chosen one marked."""
    lines = [
        "| candidate | harmful rate | 95% CI | exact match | perplexity | utility drop | meets targets |",
        "|---|---|---|---|---|---|---|",
    ]
    b = result["baseline"]
    em, ppl = _utility_cells(b.get("utility"))
    lines.append(f"| fine-tune | {_pct(b.get('harmful_rate'))} | {_ci(b.get('ci95'))} | {em} | {ppl} | – | – |")
    for r in result["rows"]:
        em, ppl = _utility_cells(r.get("utility"))
        drop = ", ".join(f"{k} {v:+.4f}" for k, v in (r.get("utility_drop") or {}).items()) or "–"
        mark = "**chosen**" if r["label"] == result["chosen"] else ("yes" if r["passed"] else "no")
        lines.append(
            f"| {r['label']} | {_pct(r['harmful_rate'])} | {_ci(r.get('ci95'))} | {em} | {ppl} | {drop} | {mark} |"
        )
    return "\n".join(lines)


def utility_axis(result: dict) -> tuple[str, str]:
    """(utility key, axis label): exact match when measured, else perplexity."""
    have = [result["baseline"].get("utility") or {}] + [r.get("utility") or {} for r in result["rows"]]
    if any(u.get("exact_match") is not None for u in have):
        return "exact_match", "utility: exact match, % (higher is better)"
    return "perplexity", "utility: perplexity (lower is better)"


def plot(result: dict, path, title: str = "Realignment methods side by side") -> Path:
    """Harmful rate (Wilson 95% CI) against utility, one point per candidate, as a PNG.

    The fine-tune is a grey square, the chosen candidate a star, the
    harmful-rate target a dashed line. Uses matplotlib's object API with the
    Agg canvas (no GUI backend, the caller's pyplot state left alone).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    key, xlabel = utility_axis(result)
    scale = 100 if key == "exact_match" else 1
    fig = Figure(figsize=(7.5, 5.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    def point(entry, **style):
        x = (entry.get("utility") or {}).get(key)
        rate = entry.get("harmful_rate")
        if x is None or rate is None:
            return
        ci = entry.get("ci95") or (rate, rate)
        ax.errorbar(
            [scale * x], [100 * rate], yerr=[[100 * (rate - ci[0])], [100 * (ci[1] - rate)]], capsize=3, **style
        )

    point(result["baseline"], fmt="s", color="grey", label="fine-tune")
    colors = {"RESTA": "tab:blue", "Safe LoRA": "tab:orange", "SafeMERGE": "tab:green"}
    seen = set()
    for r in result["rows"]:
        first = r["method"] not in seen
        seen.add(r["method"])
        point(r, fmt="o", color=colors.get(r["method"], "black"), alpha=0.8, label=r["method"] if first else None)
        x = (r.get("utility") or {}).get(key)
        if x is not None and r.get("harmful_rate") is not None:
            knobs = r["label"][len(r["method"]) + 1 :] if r["label"].startswith(r["method"] + " ") else r["label"]
            ax.annotate(
                knobs, (scale * x, 100 * r["harmful_rate"]), fontsize=7, xytext=(4, 3), textcoords="offset points"
            )
    chosen = next((r for r in result["rows"] if r["label"] == result["chosen"]), None)
    if chosen is not None:
        point(chosen, fmt="*", color="red", markersize=14, label=f"chosen: {chosen['label']}")
    ax.axhline(100 * result["max_harmful"], color="red", linestyle="--", linewidth=0.8, label="harmful target")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("harmful rate, % (Wilson 95% CI)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p)
    return p


def write_reports(result: dict, out_dir) -> dict[str, str]:
    """compare.json, compare.md (the table and the line) and compare.png into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": str(out / "compare.json"), "markdown": str(out / "compare.md"), "png": str(out / "compare.png")}
    result["files"] = files
    Path(files["markdown"]).write_text(
        format_table(result) + "\n\n`" + result["compare_line"] + "`\n", encoding="utf-8"
    )
    plot(result, files["png"])
    Path(files["json"]).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return files
