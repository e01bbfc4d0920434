"""β search: patch at several β, evaluate each, pick the smallest β that meets the targets.

Smallest, because β trades safety against task skill: the least safety vector
that reaches the harmful-rate target keeps the most of the fine-tune. Candidates
are written by the patcher into a temporary directory and removed after their
evaluation (``keep=True`` keeps them).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from resta_fast.errors import RestaError
from resta_fast.eval import gate as gate_mod

TUNE_PREFIX = "RESTA_TUNE:"


def parse_betas(text) -> list[float]:
    """Parse ``"0.25,0.5,1"`` (or a list) into sorted, unique, non-negative floats.

    Args:
        text: comma-separated string or iterable of numbers.

    Returns:
        The β values, ascending.

    Example:
        >>> parse_betas("1, 0.5,0.5,2")
        [0.5, 1.0, 2.0]
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        betas = sorted({float(str(b).strip()) for b in items if str(b).strip()})
    except ValueError as e:
        raise RestaError(f"--betas must be comma-separated numbers like 0.25,0.5,1; got {text!r}") from e
    if not betas:
        raise RestaError("--betas is empty; give e.g. --betas 0.25,0.5,1,1.5")
    if betas[0] < 0:
        raise RestaError(f"β must be >= 0; got {betas[0]}")
    return betas


def _default_patch():
    try:
        from resta_fast.api import patch
    except ImportError as e:
        raise RestaError(
            f"resta-fast tune needs the patcher (resta_fast.api.patch), which failed to import: {e}"
        ) from e
    return patch


def tune(
    finetuned,
    betas,
    *,
    prompts,
    max_harmful: float,
    aligned=None,
    unaligned=None,
    vector=None,
    max_utility_drop: float | None = None,
    utility=None,
    perplexity=None,
    judges=("refusal",),
    patch_options: dict | None = None,
    eval_options: dict | None = None,
    workdir=None,
    keep: bool = False,
    stop_early: bool = False,
    out=None,
    patch_fn=None,
    evaluate_fn=None,
) -> dict:
    """Sweep β, evaluate each restored model, choose the smallest β within both targets.

    Args:
        finetuned: the fine-tuned model directory (also the utility reference).
        betas: β values (string ``"0.25,0.5,1"`` or numbers).
        prompts: harmful prompt spec(s) or a loaded PromptSet.
        max_harmful: harmful-rate target.
        aligned, unaligned: the models whose difference is the safety vector...
        vector: ...or a precomputed safety vector instead.
        max_utility_drop: utility budget against the fine-tune (needs ``utility`` or ``perplexity``).
        utility: prompt/answer JSONL; perplexity: text file.
        judges: judge names or objects (the first decides).
        patch_options: extra keyword arguments for the patcher (dare, seed, dtype, backend, device...).
        eval_options: extra keyword arguments for :func:`resta_fast.eval.evaluate` (device, batch_size...).
        workdir: where candidate directories go (a temp dir inside it; default: system temp).
        keep: keep the candidate directories.
        stop_early: stop at the first β that passes (β ascending).
        out: directory for per-candidate evaluation files and tune.json / tune.md.
        patch_fn: ``patch(finetuned, out, *, aligned, unaligned, vector, beta, **patch_options)``;
            defaults to :func:`resta_fast.api.patch` (injected in tests).
        evaluate_fn: defaults to :func:`resta_fast.eval.evaluate` (injected in tests).

    Returns:
        ``{"chosen_beta", "passed", "rows", "baseline", "max_harmful", "max_utility_drop",
        "tune_line"}``; each row has ``beta``, ``harmful_rate``, ``ci95``, ``utility``,
        ``utility_drop``, ``passed``, ``reason``.

    Example:
        >>> r = tune("ft", "0.5,1", aligned="chat", unaligned="shadow", prompts="catqa.json",
        ...          max_harmful=0.05)  # doctest: +SKIP
        >>> r["chosen_beta"]  # doctest: +SKIP
        0.5
    """
    from resta_fast.eval.judges import make_judge
    from resta_fast.eval.prompts import PromptSet, load_prompts
    from resta_fast.eval.runner import evaluate

    beta_list = parse_betas(betas)
    if vector is None and (aligned is None or unaligned is None):
        raise RestaError("resta-fast tune needs --aligned and --unaligned, or --vector")
    if max_utility_drop is not None and not (utility or perplexity):
        raise RestaError("--max-utility-drop needs --utility FILE and/or --perplexity FILE")
    patch_fn = patch_fn or _default_patch()
    evaluate_fn = evaluate_fn or evaluate
    eval_options = dict(eval_options or {})
    patch_options = dict(patch_options or {})
    pset = prompts if isinstance(prompts, PromptSet) else load_prompts(prompts)
    judge_objs = [make_judge(j) if isinstance(j, str) else j for j in judges]
    out_dir = Path(out) if out else None

    def run_eval(model_dir: str, label: str) -> dict:
        res = evaluate_fn(
            [model_dir],
            pset,
            judges=judge_objs,
            utility=utility,
            perplexity=perplexity,
            out=(out_dir / label) if out_dir else None,
            **eval_options,
        )
        return res["summary"]["models"][0]

    base = run_eval(str(finetuned), "finetuned")
    ref_util = base.get("utility")
    rows = []
    tmp_root = Path(tempfile.mkdtemp(prefix="resta-tune-", dir=workdir))
    try:
        for beta in beta_list:
            cand = tmp_root / f"beta-{beta:g}"
            patch_fn(
                str(finetuned),
                str(cand),
                aligned=aligned,
                unaligned=unaligned,
                vector=vector,
                beta=beta,
                **patch_options,
            )
            try:
                s = run_eval(str(cand), f"beta-{beta:g}")
            finally:
                if not keep:
                    shutil.rmtree(cand, ignore_errors=True)
            chk = gate_mod.check_model(
                s, max_harmful=max_harmful, max_utility_drop=max_utility_drop, reference_utility=ref_util
            )
            rows.append(
                {
                    "beta": beta,
                    "model": str(cand) if keep else None,
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
            if stop_early and chk["passed"]:
                break
    finally:
        if not keep:
            shutil.rmtree(tmp_root, ignore_errors=True)

    chosen = next((r["beta"] for r in rows if r["passed"]), None)
    result = {
        "chosen_beta": chosen,
        "passed": chosen is not None,
        "max_harmful": max_harmful,
        "max_utility_drop": max_utility_drop,
        "baseline": {
            "model": str(finetuned),
            "harmful_rate": base.get("harmful_rate"),
            "ci95": base.get("ci95"),
            "n": base.get("n"),
            "utility": ref_util,
        },
        "rows": rows,
        "workdir": str(tmp_root) if keep else None,
    }
    result["tune_line"] = tune_line(result)
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "tune.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (out_dir / "tune.md").write_text(format_table(result) + "\n\n`" + result["tune_line"] + "`\n", encoding="utf-8")
    return result


def tune_line(result: dict) -> str:
    """One grep-able line: ``RESTA_TUNE: beta=0.5 harmful_rate=0.0200 ...`` or ``RESTA_TUNE: NONE ...``.

    Args:
        result: what :func:`tune` returns (``rows``, ``chosen_beta``, ``max_harmful``).

    Returns:
        The line.

    Example:
        >>> tune_line({"chosen_beta": None, "rows": [], "max_harmful": 0.05})
        'RESTA_TUNE: NONE no beta in [] met max_harmful 0.05'
    """
    if result["chosen_beta"] is None:
        tried = [r["beta"] for r in result["rows"]]
        budget = result.get("max_utility_drop")
        extra = f" within utility drop {budget}" if budget is not None else ""
        return f"{TUNE_PREFIX} NONE no beta in {tried} met max_harmful {result['max_harmful']}{extra}"
    row = next(r for r in result["rows"] if r["beta"] == result["chosen_beta"])
    return f"{TUNE_PREFIX} beta={row['beta']:g} {row['reason']}"


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def format_table(result: dict) -> str:
    """The sweep as a Markdown table, fine-tune first, chosen β marked.

    Args:
        result: what :func:`tune` returns.

    Returns:
        Markdown text.

    Example:
        >>> print(format_table(result))  # doctest: +SKIP
    """
    lines = [
        "| β | harmful rate | 95% CI | exact match | perplexity | utility drop | meets targets |",
        "|---|---|---|---|---|---|---|",
    ]

    def util_cells(u):
        u = u or {}
        ppl = u.get("perplexity")
        return _pct(u.get("exact_match")), "–" if ppl is None else f"{ppl:.3f}"

    def ci(c):
        return "–" if not c else f"[{100 * c[0]:.1f}, {100 * c[1]:.1f}]"

    b = result["baseline"]
    em, ppl = util_cells(b.get("utility"))
    lines.append(f"| fine-tune | {_pct(b.get('harmful_rate'))} | {ci(b.get('ci95'))} | {em} | {ppl} | – | – |")
    for r in result["rows"]:
        em, ppl = util_cells(r.get("utility"))
        drop = ", ".join(f"{k} {v:+.4f}" for k, v in (r.get("utility_drop") or {}).items()) or "–"
        mark = "**chosen**" if r["beta"] == result["chosen_beta"] else ("yes" if r["passed"] else "no")
        rate, interval = _pct(r["harmful_rate"]), ci(r.get("ci95"))
        lines.append(f"| {r['beta']:g} | {rate} | {interval} | {em} | {ppl} | {drop} | {mark} |")
    return "\n".join(lines)
