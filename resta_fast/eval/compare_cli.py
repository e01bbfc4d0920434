"""``resta-fast compare``: RESTA, Safe LoRA and SafeMERGE candidates evaluated side by side.

Parsing and printing only; the work is ``eval.compare.compare``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from resta_fast import cli_args as A
from resta_fast.eval.cli import (
    _add_generation_args,
    _add_judge_args,
    _add_prompt_args,
    _add_util_gate_args,
    _columns,
    _split_list,
    build_judges,
    generation_options,
)


def _numbers(values, kind, flag: str) -> list:
    out = []
    for text in _split_list(values):
        try:
            out.append(kind(text))
        except ValueError:
            from resta_fast.errors import RestaError

            raise RestaError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    return out


def add_compare_parser(subparsers):
    """Add the ``compare`` subcommand.

    Example:
        >>> import argparse
        >>> add_compare_parser(argparse.ArgumentParser().add_subparsers())  # doctest: +ELLIPSIS
        ArgumentParser(...)
    """
    p = subparsers.add_parser(
        "compare",
        help="realign with every method over a grid of knobs, evaluate all on the same prompts, pick one",
        description="Write RESTA (β, with/without DARE), Safe LoRA (T or K) and SafeMERGE (τ) candidates, "
        "evaluate each and the fine-tune with the same prompts and judges, and print one table: harmful rate "
        "(Wilson 95%% CI) against utility; the candidate meeting --max-harmful and --max-utility-drop with the "
        "least utility lost is chosen (exit 0; 1 when none does). --out also gets compare.png.",
    )
    m = p.add_argument_group("models")
    m.add_argument(
        "--finetuned",
        required=True,
        metavar="DIR",
        help="the fine-tune: a full model, or a PEFT LoRA adapter (needed for Safe LoRA/SafeMERGE)",
    )
    m.add_argument("--aligned", required=True, metavar="DIR", help="the aligned model the fine-tune started from")
    m.add_argument(
        "--unaligned", required=True, metavar="DIR", help="RESTA's shadow model, and Safe LoRA's pre-alignment model"
    )
    m.add_argument(
        "--pre-aligned",
        metavar="DIR",
        help="the model --aligned was aligned from, for Safe LoRA/SafeMERGE (default: --unaligned)",
    )
    m.add_argument("--base", metavar="DIR", help="a LoRA fine-tune's base (default: --aligned)")
    m.add_argument("--safety-adapter", metavar="DIR", help="SafeMERGE's safety adapter")
    g = p.add_argument_group("the grid")
    g.add_argument("--betas", action="append", help="RESTA β values, e.g. 0.5,1,1.5")
    g.add_argument("--resta-dare", type=A.probability, metavar="P", help="also try each β with DARE p")
    g.add_argument("--dare-seed", type=A.seed, default=0, help="RESTA's DARE seed (default 0)")
    g.add_argument("--thresholds", action="append", help="Safe LoRA thresholds T, e.g. 0.3,0.5")
    g.add_argument("--num-layers", action="append", help="Safe LoRA layer counts K, e.g. 2,4")
    g.add_argument("--taus", action="append", help="SafeMERGE τ values, e.g. 0.2,0.35")
    g.add_argument("--safemerge-weights", type=A.finite, nargs=2, default=[0.8, 0.2], metavar=("W1", "W2"))
    g.add_argument("--safemerge-combination", choices=("linear", "dare_linear"), default="linear")
    g.add_argument("--safemerge-density", type=A.positive, metavar="D")
    g.add_argument("--workdir", metavar="DIR", type=A.creatable_dir, help="where candidates are written")
    g.add_argument("--keep-candidates", action="store_true", help="keep the candidate models")
    _add_prompt_args(p)
    _add_generation_args(p)
    _add_judge_args(p)
    _add_util_gate_args(p, tune=True)
    p.set_defaults(func=run_compare)
    return p


def run_compare(args) -> int:
    """The ``compare`` subcommand: 0 when a candidate met the targets, 1 when none did."""
    from resta_fast.errors import RestaError
    from resta_fast.extras import require

    require("transformers", "eval", "`resta-fast compare`")
    from resta_fast.eval.compare import Grid, compare, format_table
    from resta_fast.eval.prompts import load_prompts
    from resta_fast.safemerge import check_combination

    if not args.prompts:
        raise RestaError("resta-fast compare needs --prompts FILE (or builtin:smoke)")
    grid = Grid(
        betas=_numbers(args.betas, float, "--betas"),
        dare=args.resta_dare,
        thresholds=_numbers(args.thresholds, float, "--thresholds"),
        num_layers=_numbers(args.num_layers, int, "--num-layers"),
        taus=_numbers(args.taus, float, "--taus"),
    )
    safemerge_options = {
        "weights": tuple(args.safemerge_weights),
        "combination": args.safemerge_combination,
        "density": check_combination(args.safemerge_combination, args.safemerge_density),
        "seed": args.dare_seed,
    }
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    result = compare(
        args.finetuned,
        grid,
        prompts=load_prompts(args.prompts, columns=_columns(args), limit=args.limit),
        max_harmful=args.max_harmful,
        aligned=args.aligned,
        unaligned=args.unaligned,
        base=args.base,
        pre_aligned=args.pre_aligned,
        safety_adapter=args.safety_adapter,
        seed=args.dare_seed,
        safemerge_options=safemerge_options,
        max_utility_drop=args.max_utility_drop,
        utility=args.utility,
        perplexity=args.perplexity,
        judges=build_judges(args),
        eval_options=generation_options(args),
        workdir=args.workdir,
        keep=args.keep_candidates,
        out=args.out,
        progress=bool(args.progress),
    )
    if args.json:
        print(json.dumps(result))
        print(result["compare_line"], file=sys.stderr)
    else:
        print(format_table(result))
        print(result["compare_line"])
    return 0 if result["passed"] else 1
