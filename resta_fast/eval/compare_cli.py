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
from resta_fast.options import PATCH
from resta_fast.safemerge import SAFEMERGE

# Patch's and SafeMERGE's own options (their checks, defaults, keywords) under compare's flags: the
# grid writes RESTA candidates with DARE p and every SafeMERGE candidate with these weights.
RESTA_GRID = PATCH.renamed(
    {"dare": ("--resta-dare", "also try each β with DARE p"), "seed": ("--dare-seed", "RESTA's DARE seed (default 0)")}
)
SAFEMERGE_GRID = SAFEMERGE.renamed(
    {
        "weights": ("--safemerge-weights", "SafeMERGE's fine-tune and safety weights (default 0.8 0.2)"),
        "combination": ("--safemerge-combination", "how SafeMERGE merges a layer (default linear)"),
        "density": ("--safemerge-density", "dare_linear: the fraction of each delta kept, in (0, 1]"),
    }
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
    RESTA_GRID.add_arguments(p, group=g, only=("dare", "seed"))
    g.add_argument("--thresholds", action="append", help="Safe LoRA thresholds T, e.g. 0.3,0.5")
    g.add_argument("--num-layers", action="append", help="Safe LoRA layer counts K, e.g. 2,4")
    g.add_argument("--taus", action="append", help="SafeMERGE τ values, e.g. 0.2,0.35")
    SAFEMERGE_GRID.add_arguments(p, group=g)
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
    from resta_fast.errors import OptionError, RestaError, cli_flag
    from resta_fast.extras import require

    require("transformers", "eval", "`resta-fast compare`")
    from resta_fast.eval.compare import Grid, compare, format_table
    from resta_fast.eval.prompts import load_prompts
    from resta_fast.safemerge import check_combination

    if not args.prompts:
        raise RestaError("resta-fast compare needs --prompts FILE (or builtin:smoke)")
    grid = Grid(
        betas=_numbers(args.betas, float, "--betas"),
        dare=args.resta_dare,  # RESTA_GRID's dare
        thresholds=_numbers(args.thresholds, float, "--thresholds"),
        num_layers=_numbers(args.num_layers, int, "--num-layers"),
        taus=_numbers(args.taus, float, "--taus"),
    )
    safemerge_options = {**SAFEMERGE_GRID.from_args(args), "seed": args.dare_seed}
    safemerge_options["weights"] = tuple(safemerge_options["weights"])
    try:
        safemerge_options["density"] = check_combination(safemerge_options["combination"], safemerge_options["density"])
    except OptionError as exc:  # spelled as compare's flags (--safemerge-density), not safemerge's
        raise RestaError(exc.render(lambda name: SAFEMERGE_GRID.flag_of(name) or cli_flag(name))) from None
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
