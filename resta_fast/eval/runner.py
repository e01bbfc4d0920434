"""The evaluation pipeline: prepare → generate (per model) → judge (per judge) → score, gate, report.

``evaluate`` runs the three phases in turn, each a function of what the one
before it returned: :func:`generate_answers` → :func:`judge_answers` →
:func:`score_and_report`, after :func:`prepare` has decided what they do (a
:class:`EvalPlan`). All models generate first, each unloaded before the next, and
only then do the judges run, so a GPU never holds a candidate and a classifier
judge at once.

Example:
    >>> evaluate(prompts="builtin:smoke", bogus=1)
    Traceback (most recent call last):
    ...
    TypeError: evaluate() got an unexpected keyword argument 'bogus'
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
from resta_fast.eval.options import EvalOptions, as_paths, check_judges
from resta_fast.eval.prompts import PromptSet, load_prompts
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


@dataclasses.dataclass(frozen=True)
class Subject:
    """One model under evaluation, as :func:`prepare` names it.

    ``source`` is ``"generated"`` or the responses file being re-judged (whose
    prompts and answers ``saved`` holds); ``utility_only`` marks the reference
    when it is not among the models: it is scored for utility and nothing else.
    """

    model: str
    label: str
    role: str  # "candidate" or "reference"
    source: str
    utility_only: bool = False
    saved: tuple | None = None  # (prompts, responses) read from ``source``


@dataclasses.dataclass(frozen=True)
class EvalPlan:
    """What an evaluation does, decided before any model loads: the output of :func:`prepare`."""

    subjects: tuple[Subject, ...]
    prompt_set: PromptSet | None  # None when only saved responses are re-judged
    judges: tuple  # judge objects, the primary one first
    pairs: list[tuple[str, str]] | None  # utility prompt/answer pairs
    perplexity_text: str | None
    out_dir: Path | None
    reference: str | None  # as resolved (a Hub id's cache snapshot)


@dataclasses.dataclass(frozen=True)
class Answers:
    """What :func:`generate_answers` has for one subject (for a re-judged one: what its file held)."""

    subject: Subject
    prompts: list | None = None  # None for a utility-only subject
    responses: list[str] | None = None
    responses_file: str | None = None
    utility: dict | None = None  # exact_match, contains, utility_n, perplexity; None: not measured


def _responses_meta(answers: list[Answers], responses) -> dict:
    # Re-judged answers keep their prompt ids; "smoke:" ids mean the built-in smoke set.
    ids = [p.id for a in answers if a.prompts is not None for p in a.prompts]
    return {
        "sources": list(responses),
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


def _options(options: EvalOptions | None, overrides: dict) -> EvalOptions:
    if options is not None and not isinstance(options, EvalOptions):
        raise TypeError(f"evaluate() options must be an EvalOptions, got {type(options).__name__}")
    known = EvalOptions.field_names()
    for name in overrides:
        if name not in known:  # what Python says for a keyword the signature lacks
            raise TypeError(f"evaluate() got an unexpected keyword argument {name!r}")
    if options is None:
        return EvalOptions(**overrides)
    return dataclasses.replace(options, **overrides) if overrides else options


def evaluate(models=(), prompts=None, options: EvalOptions | None = None, **overrides) -> dict:
    """Evaluate one or more finished checkpoints for harmfulness (and utility), optionally gated.

    Three phases, one after the other: :func:`generate_answers` (every model, one
    in memory at a time), :func:`judge_answers` (one judge at a time), then
    :func:`score_and_report` (metrics, gate, comparison, report files); :func:`prepare`
    decides beforehand what they do.

    Args:
        models: model directories (or Hub ids, ``io.hub.HUB_RULE``) to generate with.
        prompts: prompt specs (see :func:`resta_fast.eval.prompts.load_prompts`) or a loaded
            :class:`PromptSet`; needed when ``models`` is given.
        options: an :class:`~resta_fast.eval.options.EvalOptions` (None: the defaults).
        **overrides: fields of :class:`~resta_fast.eval.options.EvalOptions` (``responses``,
            ``judges``, ``utility``, ``max_harmful`` ...), replacing those of ``options``.

    Returns:
        A dict with ``summary`` (the ``--json`` object: ``models`` and ``gate``), ``models``
        (details per model and judge), ``comparison``, ``gate_line``, ``prompts``, ``judges``,
        ``config`` and, with ``out``, ``files``.

    Raises:
        RestaError: nothing to evaluate, or options that do not fit (before any model loads).
        TypeError: a keyword that is not an option.

    Example:
        >>> evaluate(prompts="builtin:smoke")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        resta_fast.errors.RestaError: nothing to evaluate: pass --model DIR (or --responses FILE ...)
        >>> r = evaluate(["out/restored"], "builtin:smoke", max_harmful=0.05)  # doctest: +SKIP
        >>> r["summary"]["gate"]["passed"]  # doctest: +SKIP
        True

    (The second example needs a model directory on disk.)
    """
    opts = _options(options, overrides)
    plan = prepare(models, prompts, opts)
    answers = generate_answers(plan, opts)
    verdicts = judge_answers(plan, answers, opts)
    return score_and_report(plan, answers, verdicts, opts)


def prepare(models, prompts, opts: EvalOptions) -> EvalPlan:
    """Resolve the inputs, check that there is something to evaluate, and load prompts and utility data.

    Args:
        models: as :func:`evaluate`.
        prompts: as :func:`evaluate`.
        opts: the options.

    Returns:
        The :class:`EvalPlan`: one :class:`Subject` per model, then per responses file, then the
        reference when it is not among the models.

    Example:
        >>> prepare(["out/restored"], "builtin:smoke", EvalOptions()).subjects[0].label  # doctest: +SKIP
        'restored'

    (Skipped: it needs the model directory on disk.)
    """
    models = list(as_paths(models))
    # Hub ids (io.hub.HUB_RULE) -> their cache snapshots (the resolve step, each id once); labels keep the id's name.
    from resta_fast.resolve import Resolver, resolve

    resolver, hub_names = Resolver(), {}

    def local(model, role: str) -> str:
        found = resolve(model, role, resolver=resolver)
        if found.is_hub:
            hub_names[found.path] = found.given
        return found.path

    models = [local(m, "model") for m in models]
    reference = local(opts.reference, "reference") if opts.reference else opts.reference
    if not models and not opts.responses:
        raise RestaError("nothing to evaluate: pass --model DIR (or --responses FILE to re-judge saved answers)")
    if models and prompts is None:
        raise RestaError("--model needs --prompts FILE (or --prompts builtin:smoke for a quick smoke check)")
    if (opts.utility or opts.perplexity) and not models and not reference:
        raise RestaError("--utility/--perplexity need a --model to run; saved responses carry no utility")
    opts.check()
    judges = check_judges(make_judge(j) if isinstance(j, str) else j for j in opts.judges)
    pset = None
    if models:
        if isinstance(prompts, PromptSet):
            pset = prompts
            if opts.limit is not None:
                pset = dataclasses.replace(pset, prompts=pset.prompts[: max(0, int(opts.limit))])
        else:
            pset = load_prompts(prompts, columns=opts.columns, limit=opts.limit)
    pairs = load_pairs(opts.utility) if opts.utility else None
    ppl_text = read_text(opts.perplexity) if opts.perplexity else None
    return EvalPlan(
        subjects=_subjects(models, opts.responses, reference, hub_names),
        prompt_set=pset,
        judges=judges,
        pairs=pairs,
        perplexity_text=ppl_text,
        out_dir=Path(opts.out) if opts.out else None,
        reference=reference,
    )


def _subjects(models: list[str], responses, reference: str | None, hub_names: dict) -> tuple[Subject, ...]:
    taken: set[str] = set()
    subjects = []
    for m in models:
        role = "reference" if reference and _same(m, reference) else "candidate"
        subjects.append(Subject(m, _label(hub_names.get(m, m), taken), role, "generated"))
    for r in responses:
        model, rprompts, rresp = load_responses(r)
        subjects.append(Subject(model, _label(model, taken), "candidate", r, saved=(rprompts, rresp)))
    if reference and not any(_same(m, reference) for m in models):
        label = _label(hub_names.get(str(reference), str(reference)), taken)
        subjects.append(Subject(str(reference), label, "reference", "generated", utility_only=True))
    return tuple(subjects)


def generate_answers(plan: EvalPlan, opts: EvalOptions) -> list[Answers]:
    """Phase 1: every model answers the prompts (and the utility set), one model in memory at a time.

    Args:
        plan: from :func:`prepare`.
        opts: the options (engine, device, generation bounds, ...).

    Returns:
        One :class:`Answers` per subject, in the plan's order; re-judged subjects get
        what their file held. With ``out``, responses and utility answers are written.

    Example:
        >>> answers = generate_answers(prepare(["out/restored"], "builtin:smoke", opts), opts)  # doctest: +SKIP

    (Skipped: it needs the model directory on disk.)
    """
    answers = []
    for s in plan.subjects:
        if s.saved is not None:
            answers.append(Answers(s, *s.saved))
            continue
        eng = load_engine(
            s.model, engine=opts.engine, device=opts.device, dtype=opts.dtype, seed=opts.seed, progress=opts.progress
        )
        try:
            answers.append(_answer(eng, s, plan, opts))
        finally:
            eng.close()
    return answers


def _generate(eng, texts, max_new_tokens: int, desc: str, opts: EvalOptions) -> list[str]:
    return eng.generate(
        texts,
        max_new_tokens=max_new_tokens,
        batch_size=opts.batch_size,
        system_prompt=opts.system_prompt,
        chat_template=opts.chat_template,
        progress=opts.progress,
        desc=desc,
    )


def _answer(eng, s: Subject, plan: EvalPlan, opts: EvalOptions) -> Answers:
    prompts = responses = responses_file = None
    if not s.utility_only:
        prompts = plan.prompt_set.prompts
        responses = _generate(eng, [p.text for p in prompts], opts.max_new_tokens, f"generate {s.label}", opts)
        if plan.out_dir:
            path = plan.out_dir / "responses" / f"{s.label}.jsonl"
            responses_file = str(save_responses(path, s.model, prompts, responses))
    util: dict = {}
    if plan.pairs:
        completions = _generate(
            eng, [q for q, _ in plan.pairs], opts.utility_max_new_tokens, f"utility {s.label}", opts
        )
        util.update(score_answers(completions, [a for _, a in plan.pairs]))
        util["utility_n"] = util.pop("n")
        if plan.out_dir:
            _write_jsonl(
                plan.out_dir / "utility" / f"{s.label}.jsonl",
                (
                    {"prompt": q, "answer": a, "completion": c, "exact_match": c.strip() == a.strip()}
                    for (q, a), c in zip(plan.pairs, completions, strict=True)
                ),
            )
    if plan.perplexity_text is not None:
        util["perplexity"] = eng.perplexity(plan.perplexity_text, window=opts.perplexity_window, progress=opts.progress)
    return Answers(s, prompts, responses, responses_file, util or None)


def judge_answers(plan: EvalPlan, answers: list[Answers], opts: EvalOptions) -> list[dict[str, list]]:
    """Phase 2: every judge rates every subject's answers, one judge (and its model, if any) at a time.

    Args:
        plan: from :func:`prepare` (its judges, closed here once done, and ``out_dir``).
        answers: from :func:`generate_answers`.
        opts: the options (``progress``).

    Returns:
        Per subject, in order, ``{judge name: [Verdict, ...]}`` (empty for a utility-only
        subject). With ``out``, ``verdicts/LABEL.JUDGE.jsonl`` is written for each.

    Example:
        >>> verdicts = judge_answers(plan, answers, opts)  # doctest: +SKIP

    (Skipped: ``plan`` and ``answers`` come from models on disk, see :func:`generate_answers`.)
    """
    verdicts: list[dict[str, list]] = [{} for _ in answers]
    for j in plan.judges:
        try:
            for a, got in zip(answers, verdicts, strict=True):
                if a.subject.utility_only:
                    continue
                got[j.name] = j.judge([p.text for p in a.prompts], a.responses, progress=opts.progress)
                if plan.out_dir:
                    _write_jsonl(
                        plan.out_dir / "verdicts" / f"{a.subject.label}.{j.name}.jsonl",
                        (
                            {"id": p.id, "category": p.category, "subcategory": p.subcategory, **v.to_dict()}
                            for p, v in zip(a.prompts, got[j.name], strict=True)
                        ),
                    )
        finally:
            j.close()
    return verdicts


def score_and_report(plan: EvalPlan, answers: list[Answers], verdicts: list[dict], opts: EvalOptions) -> dict:
    """Phase 3: metrics per model and judge, the gate, the comparison, and the report files.

    Args:
        plan: from :func:`prepare`.
        answers: from :func:`generate_answers`.
        verdicts: from :func:`judge_answers`.
        opts: the options (gate thresholds; the rest is recorded under ``config``).

    Returns:
        What :func:`evaluate` returns; with ``out``, report.json/md/png are written.

    Example:
        >>> result = score_and_report(plan, answers, verdicts, opts)  # doctest: +SKIP

    (Skipped: its inputs come from models on disk, see :func:`generate_answers`.)
    """
    names = [j.name for j in plan.judges]
    details, summary_models = [], []
    for a, got in zip(answers, verdicts, strict=True):
        d, s = _scores(a, got, names)
        details.append(d)
        if s is not None:
            summary_models.append(s)
    ref_entry = next((d for d in details if d["role"] == "reference"), None)
    gate = gate_mod.check_gate(
        summary_models,
        max_harmful=opts.max_harmful,
        max_utility_drop=opts.max_utility_drop,
        reference=ref_entry["model"] if ref_entry else None,
        reference_utility=(ref_entry or {}).get("utility"),
    )
    result = {
        "summary": {"models": summary_models, "gate": gate},
        "gate_line": gate_mod.gate_line(gate),
        "primary_judge": names[0],
        "judges": names,
        "prompts": plan.prompt_set.meta() if plan.prompt_set else _responses_meta(answers, opts.responses),
        "models": details,
        "comparison": _comparison(details, ref_entry, names[0]),
        "config": _config(plan, opts),
    }
    if plan.out_dir:
        from resta_fast.eval.report import write_reports

        write_reports(result, plan.out_dir)
    return result


def _scores(a: Answers, verdicts: dict, names: list[str]) -> tuple[dict, dict | None]:
    """A subject's details entry, and its line of the summary (None for a utility-only one)."""
    s = a.subject
    d = {"model": s.model, "label": s.label, "role": s.role, "source": s.source}
    if a.utility:
        d["utility"] = a.utility
    if s.utility_only:
        return d, None
    labels = {n: [v.label for v in verdicts[n]] for n in names}
    d["judges"] = {n: _judge_stats(a.prompts, labels[n]) for n in names}
    if len(names) > 1:
        d["agreement"] = judge_agreement(labels)
    p = d["judges"][names[0]]
    line = {"model": s.model, **{k: p[k] for k in ("n", "harmful", "harmless", "unparseable", "harmful_rate", "ci95")}}
    line["categories"] = {c: {"n": v["n"], "harmful_rate": v["harmful_rate"]} for c, v in p["categories"].items()}
    if a.utility:
        line["utility"] = {k: a.utility[k] for k in ("exact_match", "perplexity") if k in a.utility}
    if a.responses_file:
        d["responses_file"] = a.responses_file
    return d, line


def _comparison(details: list[dict], ref_entry: dict | None, primary: str) -> list[dict]:
    """Every rated model against the reference (or, without one, the first model)."""
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
    return comparison


def _config(plan: EvalPlan, opts: EvalOptions) -> dict:
    return {
        "engine": opts.engine,
        "device": opts.device,
        "dtype": opts.dtype,
        "batch_size": opts.batch_size,
        "max_new_tokens": opts.max_new_tokens,
        "utility_max_new_tokens": opts.utility_max_new_tokens,
        "seed": opts.seed,
        "greedy": True,
        "utility": opts.utility,
        "perplexity": opts.perplexity,
        "reference": plan.reference,
        "max_harmful": opts.max_harmful,
        "max_utility_drop": opts.max_utility_drop,
    }


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
    from resta_fast.resolve import resolve

    found = resolve(finetuned, "finetuned", accepts="any")  # a Hub id: its snapshot (the patch resolves the same one)
    options = dict(options)
    options.setdefault("reference", None if found is None or found.is_adapter else found.path)
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
