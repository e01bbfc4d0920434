"""The demo's LoRA act: RESTA, Safe LoRA and SafeMERGE on the same LoRA fine-tune.

``resta_fast.eval.compare`` writes one candidate per knob (RESTA β with and
without DARE, Safe LoRA T and K, SafeMERGE τ) and scores all of them on the
*validation* prompts; each method's best candidate there is then evaluated,
with the LoRA fine-tune and a random-vector control, on the held-out *test*
prompts, which no choice has seen. Nothing here is tuned until a method wins:
the grid is fixed, and the report says what each method did at this scale.

Safe LoRA and SafeMERGE project onto what alignment changed, so their
"unaligned" model is the base the aligned model was aligned from; RESTA's is
the shadow model (aligned, then fine-tuned to comply).
"""

from __future__ import annotations

import math
from pathlib import Path

LORA_BETAS = (0.25, 0.5, 0.75, 1.0, 1.5)
SAFELORA_THRESHOLDS = (0.5,)  # the paper's default
SAFELORA_LAYERS = (2, 4, 7, 14)  # of 14 LoRA modules (7 per block, 2 blocks)
SAFEMERGE_TAUS = (0.2, 0.35, 0.5, 1.0)  # 0.35 is the paper's default; 1.0 merges every layer


def best_per_method(rows: list[dict], max_drop: float) -> dict[str, dict]:
    """Each method's candidate on validation: the compare rule (meets both targets, least
    utility lost), else the lowest harmful rate within the utility budget, else the mildest.

    Example:
        >>> rows = [{"method": "RESTA", "passed": False, "harmful_rate": 0.3, "utility_drop": {"exact_match": 0.0}},
        ...         {"method": "RESTA", "passed": False, "harmful_rate": 0.1, "utility_drop": {"exact_match": 0.5}}]
        >>> best_per_method(rows, 0.1)["RESTA"]["harmful_rate"]
        0.3
    """

    def lost(r) -> float:
        return max((r.get("utility_drop") or {}).values(), default=math.inf)

    picks = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        passing = [r for r in mine if r["passed"]]
        if passing:
            picks[method] = min(passing, key=lambda r: (lost(r), r["harmful_rate"]))
            continue
        kept = [r for r in mine if lost(r) <= max_drop]
        picks[method] = min(kept, key=lambda r: (r["harmful_rate"], lost(r))) if kept else min(mine, key=lost)
    return picks


def compare_on_validation(stages: dict, data: dict, *, out: Path, workdir: Path, seed: int, options: dict) -> dict:
    """``eval.compare`` over the fixed grid, on validation prompts; the candidates are kept."""
    from resta_fast.eval.compare import Grid, compare

    grid = Grid(
        betas=list(LORA_BETAS),
        dare=options["dare_p"],
        thresholds=list(SAFELORA_THRESHOLDS),
        num_layers=list(SAFELORA_LAYERS),
        taus=list(SAFEMERGE_TAUS),
    )
    return compare(
        str(stages["lora-finetuned"]),
        grid,
        prompts=str(data["harmful_val"]),
        max_harmful=options["max_harmful"],
        max_utility_drop=options["max_drop"],
        aligned=str(stages["aligned"]),
        unaligned=str(stages["unaligned"]),
        pre_aligned=str(stages["base"]),
        safety_adapter=str(stages["safety-adapter"]),
        seed=seed,
        utility=str(data["task_val"]),
        judges=[options["judge"]],
        eval_options=dict(options["eval"]),
        workdir=workdir,
        keep=True,
        out=out,
    )


def random_control(stages: dict, vector: Path, beta: float, out: Path) -> Path:
    """RESTA on the LoRA fine-tune with the random vector of the safety vector's norms."""
    from resta_fast import api

    api.patch(
        stages["lora-finetuned"], out, vector=vector, beta=beta, base=stages["aligned"], overwrite=True, fsync=False
    )
    return out


def heldout_table(rows: list[dict]) -> str:
    """Markdown: the LoRA fine-tune and each method's validation pick, on held-out test prompts."""
    lines = [
        "| model | chosen on validation | harmful rate (95% CI) | task accuracy | benign accuracy |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        h = r["harmful"]
        ci = "" if not h["ci95"] else f" [{h['ci95'][0]:.2f}, {h['ci95'][1]:.2f}]"
        lines.append(
            f"| {r['model']} | {r.get('pick', '–')} | {h['rate']:.2f}{ci} | {r['task']['rate']:.2f} | "
            f"{r['benign']['rate']:.2f} |"
        )
    return "\n".join(lines)


def plot_test(rows: list[dict], chosen: str | None, max_harmful: float, path: Path) -> Path:
    """The held-out points on compare's axes: harmful rate (CI) against task accuracy."""
    from resta_fast.eval.compare import plot

    def entry(r):
        return {
            "harmful_rate": r["harmful"]["rate"],
            "ci95": r["harmful"]["ci95"],
            "utility": {"exact_match": r["task"]["rate"]},
        }

    base = rows[0]
    result = {
        "baseline": entry(base),
        "max_harmful": max_harmful,
        "chosen": chosen,
        "rows": [{"label": r.get("pick") or r["model"], "method": r["method"], **entry(r)} for r in rows[1:]],
    }
    return plot(result, path, title="LoRA fine-tune: each method's validation pick, on held-out test prompts")
