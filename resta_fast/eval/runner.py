"""The evaluation pipeline: generate (per model) → judge (per judge) → metrics → gate → reports.

All models generate first, each unloaded before the next, and only then do the
judges run, so a GPU never holds a candidate and a classifier judge at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from resta_fast.errors import RestaError
from resta_fast.eval import gate as gate_mod
from resta_fast.eval.generate import load_engine
from resta_fast.eval.judges import make_judge
from resta_fast.eval.metrics import by_group, judge_agreement, summarize
from resta_fast.eval.prompts import Columns, PromptSet, load_prompts
from resta_fast.eval.responses import load_responses, save_responses
from resta_fast.eval.utility import load_pairs, read_text, score_answers


def _label(path: str, taken: set[str]) -> str:
    base = Path(path).name or "model"
    # Also strip a responses file's suffix so a re-judged model keeps its label.
    base = base[: -len(".jsonl")] if base.endswith(".jsonl") else base
    label, i = base, 2
    while label in taken:
        label, i = f"{base}-{i}", i + 1
    taken.add(label)
    return label


def _same(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _responses_meta(entries, responses) -> dict:
    # Re-judged answers keep their prompt ids; "smoke:" ids mean the built-in smoke set.
    ids = [p.id for e in entries if "prompts" in e for p in e["prompts"]]
    return {
        "sources": responses,
        "n": None,
        "duplicates_removed": 0,
        "smoke_set": any(i.startswith("smoke:") for i in ids),
    }


def _judge_stats(prompts, labels) -> dict:
    s = summarize(labels)
    s["categories"] = by_group([p.category for p in prompts], labels)
    subs = [None if p.subcategory is None else f"{p.category} / {p.subcategory}" for p in prompts]
    s["subcategories"] = {k: v for k, v in by_group(subs, labels).items() if k != "(none)"}
    return s


def evaluate(
    models=(),
    prompts=None,
    *,
    responses=(),
    judges=("refusal",),
    utility=None,
    perplexity=None,
    reference=None,
    engine: str = "transformers",
    device: str = "cpu",
    dtype: str = "auto",
    batch_size: int | None = None,
    max_new_tokens: int = 128,
    utility_max_new_tokens: int = 32,
    system_prompt: str | None = None,
    chat_template: bool | None = None,
    columns: Columns | None = None,
    limit: int | None = None,
    perplexity_window: int = 1024,
    out=None,
    max_harmful: float | None = None,
    max_utility_drop: float | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> dict:
    """Evaluate one or more finished checkpoints for harmfulness (and utility), optionally gated.

    Args:
        models: model directories (or Hub ids, ``io.hub.HUB_RULE``) to generate with.
        prompts: prompt specs (see :func:`resta_fast.eval.prompts.load_prompts`) or a loaded
            :class:`PromptSet`; needed when ``models`` is given.
        responses: responses JSONL files from an earlier run, to re-judge without generating.
        judges: judge names (``refusal``) or judge objects (``RefusalJudge``, ``ClassifierJudge``,
            ``OpenAIJudge``); the first is the primary judge behind ``harmful_rate`` and the gate.
        utility: JSONL of prompt/answer pairs for exact-match accuracy.
        perplexity: text file for perplexity.
        reference: model the utility drop is measured against (evaluated for utility if it
            is not one of ``models``).
        engine: ``transformers`` or ``vllm``.
        device: ``cpu``, ``cuda``, ``cuda:N``.
        dtype: ``auto``, ``float32``, ``bfloat16``, ``float16``.
        batch_size: generation batch (None: 8 on CPU, 32 on GPU).
        max_new_tokens: bound on each answer to a harmful question.
        utility_max_new_tokens: bound on each utility answer.
        system_prompt: optional system message for the chat template.
        chat_template: force (True) or skip (False) the tokenizer's chat template; None uses it
            when the tokenizer has one.
        columns: prompt/category/subcategory column names for flat prompt files.
        limit: use only the first N prompts.
        perplexity_window: tokens per perplexity window.
        out: directory for responses, verdicts and reports (None: nothing written).
        max_harmful: gate threshold on the harmful rate.
        max_utility_drop: gate threshold on the utility drop (see :mod:`resta_fast.eval.gate`).
        seed: generation seed.
        progress: tqdm bars on stderr (None: only on a terminal).

    Returns:
        A dict with ``summary`` (the ``--json`` object: ``models`` and ``gate``), ``models``
        (details per model and judge), ``comparison``, ``gate_line``, ``prompts``, ``judges``,
        ``config`` and, with ``out``, ``files``.

    Example:
        >>> r = evaluate(["out/restored"], "builtin:smoke", max_harmful=0.05)  # doctest: +SKIP
        >>> r["summary"]["gate"]["passed"]  # doctest: +SKIP
        True
    """
    models = [str(m) for m in ([models] if isinstance(models, (str, os.PathLike)) else models)]
    # Hub ids (io.hub.HUB_RULE) -> their cache snapshots; labels keep the id's name.
    from resta_fast.io.hub import Resolver
    resolve, hub_names = Resolver(), {}

    def local(model, role: str) -> str:
        found = resolve(model, role)
        if found.is_hub:
            hub_names[str(found.path)] = found.spec
        return str(found.path) if found.is_hub else str(model)
    models = [local(m, "model") for m in models]
    if reference:
        reference = local(reference, "reference")
    responses = [str(r) for r in ([responses] if isinstance(responses, (str, os.PathLike)) else responses)]
    if not models and not responses:
        raise RestaError(
            "Nothing to evaluate: pass --model DIR (or --responses FILE to re-judge saved answers)."
        )
    if models and prompts is None:
        raise RestaError("--model needs --prompts FILE (or --prompts builtin:smoke for a quick smoke check).")
    if (utility or perplexity) and not models and not reference:
        raise RestaError("--utility/--perplexity need a --model to run; saved responses carry no utility.")
    if max_utility_drop is not None:
        if not reference:
            raise RestaError(
                "--max-utility-drop needs --reference MODEL (usually the fine-tune) to measure against."
            )
        if not (utility or perplexity):
            raise RestaError(
                "--max-utility-drop needs --utility FILE and/or --perplexity FILE to measure utility."
            )
    if max_harmful is not None and not 0.0 <= max_harmful <= 1.0:
        raise RestaError(f"--max-harmful is a rate in [0, 1], got {max_harmful}.")
    for f in [utility, perplexity]:
        if f and not Path(f).is_file():
            raise RestaError(f"{f} not found: pass an existing file.")

    judge_objs = [make_judge(j) if isinstance(j, str) else j for j in judges]
    if not judge_objs:
        raise RestaError("Pass at least one --judge (refusal, classifier or openai).")
    names = [j.name for j in judge_objs]
    if len(set(names)) != len(names):
        raise RestaError(f"Each judge may be given once; got {names}.")

    pset = None
    if models:
        if isinstance(prompts, PromptSet):
            pset = prompts
            if limit is not None:
                pset = dataclasses.replace(pset, prompts=pset.prompts[: max(0, int(limit))])
        else:
            pset = load_prompts(prompts, columns=columns, limit=limit)
    out_dir = Path(out) if out else None
    pairs = load_pairs(utility) if utility else None
    ppl_text = read_text(perplexity) if perplexity else None

    taken: set[str] = set()
    entries: list[dict] = []
    for m in models:
        role = "reference" if reference and _same(m, reference) else "candidate"
        entries.append({"model": m, "label": _label(hub_names.get(m, m), taken), "role": role, "source": "generated"})
    for r in responses:
        model, rprompts, rresp = load_responses(r)
        entries.append(
            {
                "model": model,
                "label": _label(model, taken),
                "role": "candidate",
                "source": r,
                "prompts": rprompts,
                "responses": rresp,
            }
        )
    if reference and not any(_same(e["model"], reference) for e in entries if e["source"] == "generated"):
        entries.append(
            {
                "model": str(reference),
                "label": _label(hub_names.get(str(reference), str(reference)), taken),
                "role": "reference",
                "source": "generated",
                "utility_only": True,
            }
        )

    # Phase 1: generation, one model in memory at a time.
    for e in entries:
        if e["source"] != "generated":
            continue
        eng = load_engine(e["model"], engine=engine, device=device, dtype=dtype, seed=seed, progress=progress)
        try:
            if not e.get("utility_only"):
                e["prompts"] = pset.prompts
                e["responses"] = eng.generate(
                    [p.text for p in pset.prompts],
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                    system_prompt=system_prompt,
                    chat_template=chat_template,
                    progress=progress,
                    desc=f"generate {e['label']}",
                )
                if out_dir:
                    e["responses_file"] = str(
                        save_responses(
                            out_dir / "responses" / f"{e['label']}.jsonl",
                            e["model"],
                            e["prompts"],
                            e["responses"],
                        )
                    )
            util: dict = {}
            if pairs:
                completions = eng.generate(
                    [q for q, _ in pairs],
                    max_new_tokens=utility_max_new_tokens,
                    batch_size=batch_size,
                    system_prompt=system_prompt,
                    chat_template=chat_template,
                    progress=progress,
                    desc=f"utility {e['label']}",
                )
                util.update(score_answers(completions, [a for _, a in pairs]))
                util["utility_n"] = util.pop("n")
                if out_dir:
                    _write_jsonl(
                        out_dir / "utility" / f"{e['label']}.jsonl",
                        (
                            {"prompt": q, "answer": a, "completion": c, "exact_match": c.strip() == a.strip()}
                            for (q, a), c in zip(pairs, completions, strict=True)
                        ),
                    )
            if ppl_text is not None:
                util["perplexity"] = eng.perplexity(ppl_text, window=perplexity_window, progress=progress)
            if util:
                e["utility"] = util
        finally:
            eng.close()

    # Phase 2: judging, one judge (and its model, if any) at a time.
    for j in judge_objs:
        try:
            for e in entries:
                if e.get("utility_only"):
                    continue
                verdicts = j.judge([p.text for p in e["prompts"]], e["responses"], progress=progress)
                e.setdefault("verdicts", {})[j.name] = verdicts
                if out_dir:
                    _write_jsonl(
                        out_dir / "verdicts" / f"{e['label']}.{j.name}.jsonl",
                        (
                            {"id": p.id, "category": p.category, "subcategory": p.subcategory, **v.to_dict()}
                            for p, v in zip(e["prompts"], verdicts, strict=True)
                        ),
                    )
        finally:
            j.close()

    # Phase 3: metrics, summary, comparison, gate.
    primary = names[0]
    details, summary_models = [], []
    for e in entries:
        d = {"model": e["model"], "label": e["label"], "role": e["role"], "source": e["source"]}
        if e.get("utility"):
            d["utility"] = e["utility"]
        if not e.get("utility_only"):
            labels = {n: [v.label for v in e["verdicts"][n]] for n in names}
            d["judges"] = {n: _judge_stats(e["prompts"], labels[n]) for n in names}
            if len(names) > 1:
                d["agreement"] = judge_agreement(labels)
            p = d["judges"][primary]
            s = {k: p[k] for k in ("n", "harmful", "harmless", "unparseable", "harmful_rate", "ci95")}
            s = {"model": e["model"], **s}
            s["categories"] = {
                c: {"n": v["n"], "harmful_rate": v["harmful_rate"]} for c, v in p["categories"].items()
            }
            if e.get("utility"):
                s["utility"] = {
                    k: e["utility"][k] for k in ("exact_match", "perplexity") if k in e["utility"]
                }
            summary_models.append(s)
            if e.get("responses_file"):
                d["responses_file"] = e["responses_file"]
        details.append(d)

    ref_entry = next((d for d in details if d["role"] == "reference"), None)
    ref_util = (ref_entry or {}).get("utility")
    gate = gate_mod.check_gate(
        summary_models,
        max_harmful=max_harmful,
        max_utility_drop=max_utility_drop,
        reference=ref_entry["model"] if ref_entry else None,
        reference_utility=ref_util,
    )

    # Comparison mode: every rated model against the reference (or, without one, the first model).
    comparison = []
    rated = [d for d in details if d.get("judges")]
    baseline = ref_entry or (rated[0] if rated else None)
    for d in rated:
        if d is baseline:
            continue
        c = {"model": d["label"], "baseline": baseline["label"], "harmful_rate_diff": None}
        if baseline.get("judges"):
            a, b = d["judges"][primary]["harmful_rate"], baseline["judges"][primary]["harmful_rate"]
            c["harmful_rate_diff"] = None if a is None or b is None else a - b
        c["utility_drop"] = gate_mod.utility_drops(d.get("utility"), baseline.get("utility"))
        comparison.append(c)

    result = {
        "summary": {"models": summary_models, "gate": gate},
        "gate_line": gate_mod.gate_line(gate),
        "primary_judge": primary,
        "judges": names,
        "prompts": pset.meta() if pset else _responses_meta(entries, responses),
        "models": details,
        "comparison": comparison,
        "config": {
            "engine": engine,
            "device": device,
            "dtype": dtype,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "utility_max_new_tokens": utility_max_new_tokens,
            "seed": seed,
            "greedy": True,
            "utility": utility,
            "perplexity": perplexity,
            "reference": reference,
            "max_harmful": max_harmful,
            "max_utility_drop": max_utility_drop,
        },
    }
    if out_dir:
        from resta_fast.eval.report import write_reports

        write_reports(result, out_dir)
    return result


def validate_checkpoint(
    model_dir,
    *,
    prompts,
    utility=None,
    perplexity=None,
    reference=None,
    max_harmful: float,
    max_utility_drop: float | None = None,
    judges=("refusal",),
    device: str = "cpu",
    batch_size: int | None = None,
    max_new_tokens: int = 128,
    utility_max_new_tokens: int = 32,
    out=None,
    progress: bool | None = None,
) -> dict:
    """Gate a freshly written checkpoint (``patch --validate-prompts``); what the patcher records.

    Args:
        model_dir: the patched output directory.
        prompts: prompt file(s) or spec(s).
        utility: prompt/answer JSONL for exact match (optional).
        perplexity: text file for perplexity (optional).
        reference: model for the utility drop, normally the fine-tune.
        max_harmful: highest acceptable harmful rate.
        max_utility_drop: highest acceptable utility drop (needs ``reference`` and a utility file).
        judges: judge names or objects.
        device: ``cpu`` / ``cuda``.
        batch_size: generation batch size.
        max_new_tokens: bound on each answer.
        utility_max_new_tokens: bound on each utility answer.
        out: directory for the evaluation's files (None: nothing written).
        progress: tqdm bars on stderr.

    Returns:
        ``{"passed": bool, "reason": str, "gate_line": str, "summary": the --json summary}``.

    Example:
        >>> v = validate_checkpoint("out/restored", prompts="catqa.json", max_harmful=0.05)  # doctest: +SKIP
        >>> v["passed"]  # doctest: +SKIP
        True
    """
    res = evaluate(
        [model_dir],
        prompts,
        judges=judges,
        utility=utility,
        perplexity=perplexity,
        reference=reference,
        device=device,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        utility_max_new_tokens=utility_max_new_tokens,
        out=out,
        max_harmful=max_harmful,
        max_utility_drop=max_utility_drop,
        progress=progress,
    )
    g = res["summary"]["gate"]
    return {
        "passed": g["passed"],
        "reason": g["reason"],
        "gate_line": res["gate_line"],
        "summary": res["summary"],
    }


def make_validator(options: dict | None, finetuned=None):
    """The validate-while-patching callable of ``api.execute`` / ``api.patch``, or None.

    Args:
        options: keyword arguments of :func:`validate_checkpoint` (``prompts``,
            ``max_harmful``, ``utility``, ``max_utility_drop`` ...); None or empty: no validation.
        finetuned: the fine-tune being patched: the utility reference, unless it
            is a LoRA adapter (which cannot be evaluated on its own) or
            ``options`` names a ``reference``.

    Returns:
        ``callable(model_dir) -> {"passed", "reason", "gate_line", "summary"}``, or None.

    Example:
        >>> gate = make_validator({"prompts": "catqa.json", "max_harmful": 0.05}, "ft")  # doctest: +SKIP
        >>> api.patch("ft", "out", vector="v", validate=gate)  # doctest: +SKIP
    """
    if not options:
        return None
    from resta_fast.io.hub import resolve_input
    from resta_fast.lora import is_adapter

    if finetuned is not None:  # a Hub id: its snapshot (the patch resolves the same one)
        found = resolve_input(finetuned, "finetuned", kind="any")
        finetuned = str(found.path) if found.is_hub else finetuned
    options = dict(options)
    options.setdefault("reference", None if finetuned is None or is_adapter(finetuned) else finetuned)
    if options.get("max_utility_drop") is not None and not (options.get("utility") or options.get("perplexity")):
        raise RestaError("--max-utility-drop needs --validate-utility or --validate-perplexity")
    return lambda model_dir: validate_checkpoint(model_dir, **options)


def print_summary(result: dict, *, as_json: bool, gated: bool, file=None) -> None:
    """Print the CLI's output: the JSON summary or a table, and the gate line when gated.

    With ``--json`` stdout carries exactly one JSON object, so the gate line goes to stderr.

    Args:
        result: what :func:`evaluate` returns.
        as_json: print the ``--json`` summary object.
        gated: thresholds were set; print the ``RESTA_GATE:`` line.
        file: stream for the main output (default stdout).

    Returns:
        None.

    Example:
        >>> print_summary(result, as_json=True, gated=False)  # doctest: +SKIP
    """
    from resta_fast.eval.report import summary_table

    file = file or sys.stdout
    if as_json:
        print(json.dumps(result["summary"], ensure_ascii=False), file=file)
    else:
        if result.get("prompts", {}).get("smoke_set"):
            print("note: built-in SMOKE SET, not a benchmark", file=file)
        print(summary_table(result["summary"]), file=file)
        if result.get("files"):
            files = result["files"]
            print(
                f"reports: {files['markdown']}, {files['json']}, {files['png']}",
                file=file,
            )
    if gated:
        print(result["gate_line"], file=sys.stderr if as_json else file)
