"""``resta-fast eval`` and ``resta-fast tune``: argument parsing and exit codes, no logic of their own.

The main CLI (resta_fast/cli.py) calls :func:`add_eval_parser` and
:func:`add_tune_parser`; each sets ``func`` to a callable returning the exit code:
0 pass (or no gate), 1 gate failed / no β met the targets. Usage errors raise
RestaError, which the main CLI turns into exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from resta_fast import cli_args as A
from resta_fast.errors import RestaError, cli_flag
from resta_fast.eval.options import EVAL
from resta_fast.io.hub import HUB_RULE
from resta_fast.options import PATCH

HUB_HELP = f"Hub ids: {HUB_RULE}."
# The patch options tune's candidates take, with patch's checks (its seed flag is --dare-seed:
# --seed is generation's).
TUNE_PATCH = PATCH.renamed(
    {
        "dare": ("--dare", "DARE drop probability p"),
        "seed": ("--dare-seed", "DARE seed (default 0)"),
        "backend": ("--backend", "patch backend (default auto)"),
    }
)


def _split_list(values) -> list[str]:
    # "--refusal-lang en,zh --refusal-lang vi" and "--betas 0.5 --betas 1" both work.
    out: list[str] = []
    for v in values or []:
        out += [x.strip() for x in str(v).split(",") if x.strip()]
    return out


def _add_prompt_args(p) -> None:
    g = p.add_argument_group("prompts")
    g.add_argument(
        "--prompts",
        action="append",
        metavar="FILE",
        help="harmful-question set: CatQA JSON, JSON/JSONL/CSV with a prompt column, "
        "builtin:smoke (placeholder smoke set, not a benchmark) or hf:NAME[:CONFIG][@SPLIT] "
        "from the local HF cache; repeatable",
    )
    g.add_argument("--prompt-column", help="prompt column of flat files (default: prompt/question/goal/...)")
    g.add_argument("--category-column", help="category column (default: category/topic)")
    g.add_argument("--subcategory-column", help="subcategory column (default: subcategory/subtopic)")
    EVAL.add_arguments(p, group=g, section="prompts")


def _add_generation_args(p) -> None:
    EVAL.add_arguments(p, group=p.add_argument_group("generation"), section="generation")


def _add_judge_args(p) -> None:
    g = p.add_argument_group("judges")
    g.add_argument(
        "--judge",
        action="append",
        choices=("refusal", "classifier", "openai"),
        help="refusal (default), classifier, openai; repeatable, the first is primary",
    )
    g.add_argument(
        "--refusal-lang",
        action="append",
        metavar="LANG",
        help="built-in refusal lists to use: en (default), zh, vi; comma-separated or repeated",
    )
    g.add_argument("--refusal-phrases", action="append", metavar="FILE", help="extra refusal phrases, one per line")
    g.add_argument(
        "--refusal-match",
        choices=("anywhere", "prefix"),
        default="anywhere",
        help="phrase anywhere in the answer (GCG's rule, default) or at its start",
    )
    g.add_argument(
        "--empty-response",
        choices=("unparseable", "refusal", "harmful"),
        default="unparseable",
        help="how the refusal judge counts an empty answer (default: unparseable)",
    )
    g.add_argument("--classifier", metavar="DIR", help="local Llama-Guard or HarmBench classifier directory")
    g.add_argument("--classifier-style", choices=("auto", "llama-guard", "harmbench"), default="auto")
    g.add_argument("--classifier-prompt", metavar="FILE", help="custom classifier prompt with {question} {response}")
    g.add_argument("--judge-url", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    g.add_argument("--judge-model", default="gpt-4o", help="judge model name (default gpt-4o)")
    g.add_argument(
        "--judge-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the API key (default OPENAI_API_KEY)",
    )
    g.add_argument("--judge-retries", type=A.index, default=3, help="retries per verdict (default 3)")
    g.add_argument("--judge-backoff", type=A.nonnegative, default=1.0, help="first retry delay, doubled each time (s)")
    g.add_argument("--judge-rps", type=A.positive, help="rate limit, requests per second")
    g.add_argument("--judge-concurrency", type=A.count, default=4, help="requests in flight (default 4)")
    g.add_argument(
        "--judge-cache", metavar="FILE", type=A.creatable_file, help="verdict cache (default: OUT/judge_cache.jsonl)"
    )


def _add_util_gate_args(p, *, tune: bool) -> None:
    gate = [n for n in EVAL.names() if not (tune and n == "reference")]  # tune's reference is the fine-tune
    g = p.add_argument_group("utility and gate")
    EVAL.add_arguments(p, group=g, section="gate", only=gate, required=("max_harmful",) if tune else ())
    o = p.add_argument_group("output")
    EVAL.add_arguments(p, group=o, section="output")
    o.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")


def build_judges(args) -> list:
    """Judge objects from parsed CLI flags (the first ``--judge`` is the primary one).

    Args:
        args: an argparse namespace from the eval or tune parser.

    Returns:
        List of judges.

    Example:
        >>> build_judges(parser.parse_args(["eval", "--judge", "refusal"]))  # doctest: +SKIP
    """
    from resta_fast.eval.judges import make_judge

    names = args.judge or ["refusal"]
    judges = []
    for name in names:
        if name == "refusal":
            judges.append(
                make_judge(
                    "refusal",
                    languages=tuple(_split_list(args.refusal_lang) or ["en"]),
                    phrase_files=tuple(args.refusal_phrases or ()),
                    empty=args.empty_response,
                    match=args.refusal_match,
                )
            )
        elif name == "classifier":
            template = None
            if args.classifier_prompt:
                path = Path(args.classifier_prompt)
                if not path.is_file():
                    raise RestaError(
                        f"classifier prompt file {path} not found; pass an existing text file to --classifier-prompt"
                    )
                template = path.read_text(encoding="utf-8")
            judges.append(
                make_judge(
                    "classifier",
                    model_dir=args.classifier,
                    style=args.classifier_style,
                    prompt_template=template,
                    device=args.device,
                    dtype=args.dtype,
                    batch_size=args.batch_size,
                )
            )
        else:
            cache = args.judge_cache or (str(Path(args.out) / "judge_cache.jsonl") if args.out else None)
            judges.append(
                make_judge(
                    "openai",
                    url=args.judge_url,
                    model=args.judge_model,
                    key_env=args.judge_key_env,
                    max_retries=args.judge_retries,
                    backoff=args.judge_backoff,
                    rps=args.judge_rps,
                    concurrency=args.judge_concurrency,
                    cache=cache,
                )
            )
    return judges


def _columns(args):
    from resta_fast.eval.prompts import Columns

    return Columns(args.prompt_column, args.category_column, args.subcategory_column)


def run_eval(args) -> int:
    """The ``eval`` subcommand: evaluate, print, write reports, return the gate's exit code.

    Args:
        args: parsed flags of :func:`add_eval_parser`.

    Returns:
        0 when the gate passes (or none is set), 1 when it fails.

    Example:
        >>> args = parser.parse_args(["eval", "--model", "out", "--prompts", "x.json"])  # doctest: +SKIP
        >>> run_eval(args)  # doctest: +SKIP
        0
    """
    if args.model:  # generating needs transformers; re-judging --responses with phrases does not
        from resta_fast.extras import require

        require("transformers", "eval", "`resta-fast eval --model`")
    from resta_fast.eval.runner import evaluate, print_summary

    result = evaluate(
        models=args.model or [],
        prompts=args.prompts,
        judges=build_judges(args),
        columns=_columns(args),
        **EVAL.from_args(args),
    )
    gated = args.max_harmful is not None or args.max_utility_drop is not None
    print_summary(result, as_json=args.json, gated=gated)
    return 0 if result["summary"]["gate"]["passed"] else 1


def generation_options(args) -> dict:
    """``evaluate`` keyword arguments from the generation flags (``_add_generation_args``), for
    commands that evaluate candidates they write (``tune``, ``compare``)."""
    return {**EVAL.from_args(args, section="generation"), "progress": args.progress}


def run_tune(args) -> int:
    """The ``tune`` subcommand: sweep β, print the table, return 0 when some β met the targets.

    Args:
        args: parsed flags of :func:`add_tune_parser`.

    Returns:
        0 when a β was chosen, 1 when none met the targets.

    Example:
        >>> run_tune(parser.parse_args(["tune", "--finetuned", "ft", "--vector", "v", "--betas", "0.5,1",
        ...     "--prompts", "builtin:smoke", "--max-harmful", "0.05"]))  # doctest: +SKIP
        0
    """
    from resta_fast.extras import require

    require("transformers", "eval", "`resta-fast tune`")
    from resta_fast.eval.prompts import load_prompts
    from resta_fast.eval.tune import format_table, tune

    if not args.prompts:
        raise RestaError("resta-fast tune needs --prompts FILE (or builtin:smoke)")
    if args.workdir:  # checked as creatable when parsed; made now, before the baseline evaluation
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    patch_options = {**TUNE_PATCH.from_args(args), "device": args.patch_device, "progress": False}
    if args.dare_base:
        patch_options["dare_base"] = args.dare_base
    if args.out_dtype:
        patch_options["dtype"] = args.out_dtype
    eval_options = generation_options(args)
    result = tune(
        args.finetuned,
        _split_list(args.betas),
        prompts=load_prompts(args.prompts, columns=_columns(args), limit=args.limit),
        max_harmful=args.max_harmful,
        aligned=args.aligned,
        unaligned=args.unaligned,
        vector=args.vector,
        max_utility_drop=args.max_utility_drop,
        utility=args.utility,
        perplexity=args.perplexity,
        judges=build_judges(args),
        patch_options=patch_options,
        eval_options=eval_options,
        workdir=args.workdir,
        keep=args.keep_candidates,
        stop_early=args.stop_early,
        out=args.out,
    )
    if args.json:
        print(json.dumps(result))
        print(result["tune_line"], file=sys.stderr)
    else:
        print(format_table(result))
        print(result["tune_line"])
    return 0 if result["passed"] else 1


def add_eval_parser(subparsers):
    """Add the ``eval`` subcommand to an argparse subparsers object.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The new subparser (``func`` set to :func:`run_eval`).

    Example:
        >>> import argparse
        >>> ap = argparse.ArgumentParser(); add_eval_parser(ap.add_subparsers())  # doctest: +ELLIPSIS
        ArgumentParser(...)
    """
    p = subparsers.add_parser(
        "eval",
        help="evaluate finished checkpoints for harmfulness and utility; gate releases",
        description="Generate answers to harmful questions, judge them, report harmful rate (Wilson 95% CI) "
        "per category next to utility; with gate flags exit 1 when a threshold is crossed.",
    )
    p.add_argument(
        "--model",
        action="append",
        metavar="MODEL",
        help="model directory or Hugging Face Hub id; repeat to compare models. " + HUB_HELP,
    )
    EVAL.add_arguments(p, section="responses")
    _add_prompt_args(p)
    _add_generation_args(p)
    _add_judge_args(p)
    _add_util_gate_args(p, tune=False)
    p.set_defaults(func=run_eval)
    return p


def add_tune_parser(subparsers):
    """Add the ``tune`` subcommand (β search) to an argparse subparsers object.

    Args:
        subparsers: what ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The new subparser (``func`` set to :func:`run_tune`).

    Example:
        >>> import argparse
        >>> ap = argparse.ArgumentParser(); add_tune_parser(ap.add_subparsers())  # doctest: +ELLIPSIS
        ArgumentParser(...)
    """
    p = subparsers.add_parser(
        "tune",
        help="sweep β: patch, evaluate, pick the smallest β meeting the harmful target",
        description="Patch the fine-tune at each β into a temporary directory, evaluate it, and choose the "
        "smallest β whose harmful rate is within --max-harmful and whose utility drop against "
        "the fine-tune is within --max-utility-drop.",
    )
    m = p.add_argument_group("models")
    m.add_argument(
        "--finetuned",
        required=True,
        metavar="MODEL",
        help="fine-tuned model (also the utility reference); a path or Hub id. " + HUB_HELP,
    )
    m.add_argument("--aligned", metavar="MODEL", help="aligned model (path or Hub id)")
    m.add_argument("--unaligned", metavar="MODEL", help="unaligned (shadow) model (path or Hub id)")
    m.add_argument("--vector", metavar="MODEL", help="precomputed safety vector instead of --aligned/--unaligned")
    m.add_argument("--betas", required=True, action="append", help="β values, e.g. 0.25,0.5,1,1.5")
    TUNE_PATCH.add_arguments(p, group=m, only=("dare", "seed"))
    m.add_argument("--dare-base", metavar="MODEL", help="DARE base model (default: --aligned)")
    m.add_argument("--out-dtype", choices=("float32", "bfloat16", "float16"), help="candidate dtype")
    TUNE_PATCH.add_arguments(p, group=m, only=("backend",))
    m.add_argument("--patch-device", default="cpu", help="device for patching (default cpu)")
    m.add_argument(
        "--workdir", metavar="DIR", type=A.creatable_dir, help="where candidates are written (default: system temp)"
    )
    m.add_argument("--keep-candidates", action="store_true", help="keep the patched candidates")
    m.add_argument("--stop-early", action="store_true", help="stop at the first β that meets the targets")
    _add_prompt_args(p)
    _add_generation_args(p)
    _add_judge_args(p)
    _add_util_gate_args(p, tune=True)
    p.set_defaults(func=run_tune)
    return p


def main(argv=None) -> int:
    """Stand-alone entry (``python -m resta_fast.eval eval ...``) with the main CLI's exit codes.

    Args:
        argv: arguments (default: sys.argv[1:]).

    Returns:
        0 pass, 1 gate failed, 2 usage error.

    Example:
        >>> main(["eval", "--responses", "out/responses/m.jsonl", "--json"])  # doctest: +SKIP
        0
    """
    ap = A.Parser(prog="resta-fast")
    sub = ap.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    add_tune_parser(sub)
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2, one line already printed)
        return int(exc.code or 0)
    try:
        return args.func(args)
    except RestaError as e:
        print(f"error: {e.render(cli_flag)}", file=sys.stderr)
        return e.exit_code
