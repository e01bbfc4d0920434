"""``resta-fast safelora`` and ``resta-fast safemerge``: adapter realignment from the command line.

Parsing and printing only; the work is ``realign.safelora`` / ``realign.safemerge``.
"""

from __future__ import annotations

import argparse
import json
import sys

from resta_fast import cli_args as A
from resta_fast.safelora import SAFELORA
from resta_fast.safemerge import SAFEMERGE

SAFELORA_EPILOG = """\
Safe LoRA (Hsu et al., NeurIPS 2024): for every LoRA module, V = W_aligned − W_unaligned,
B' = V·(Vᵀ·B)/‖V‖_F (the projection C·B, never formed), and cos = cosine(B'·A, B·A)
rounded to 5 decimals. Modules with cos <= T (or the K lowest) get lora_B := B'.
"""


def cosine(text: str) -> float:
    """A cosine threshold in [-1, 1] (``--threshold``'s check, for the commands that take one too)."""
    return SAFELORA.get("threshold").parse_text(text)


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=A.creatable_dir, help="output directory (written atomically)")
    p.add_argument("--base", help="with --merge: the model to merge into (default: --aligned)")
    p.add_argument("--dry-run", action="store_true", help="score the modules and print the decisions; write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-fsync", action="store_true", help="skip fsync before rename (throwaway outputs only)")
    A.add_record_paths(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def add_safelora_parser(sub) -> None:
    p = sub.add_parser(
        "safelora",
        help="Safe LoRA: project a LoRA adapter's unsafe layers onto the alignment",
        epilog=SAFELORA_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory (or Hub id) trained on --aligned")
    p.add_argument("--aligned", required=True, help="the aligned (chat) model the adapter was trained on")
    p.add_argument(
        "--unaligned", required=True, help="the model --aligned was aligned from (e.g. the -hf base of a -chat model)"
    )
    sel = p.add_mutually_exclusive_group(required=True)
    SAFELORA.add_arguments(p, only=("threshold", "num_layers"), group=sel)
    SAFELORA.add_arguments(p, only=("merge",))
    _add_output_args(p)
    p.set_defaults(func=cmd_safelora)


SAFEMERGE_EPILOG = """\
SafeMERGE (Djuhera et al., 2025): layers whose Safe LoRA cosine is below TAU become
W1·(fine-tune) + W2·(safety adapter); the others keep the fine-tune. Without --merge
the output is the adapter-space merge as published (peft's add_weighted_adapter per
layer: A and B are mixed separately, which adds cross terms); --merge writes the
full model merged exactly in weight space, W + W1·ΔW_ft + W2·ΔW_safe.
"""


def add_safemerge_parser(sub) -> None:
    p = sub.add_parser(
        "safemerge",
        help="SafeMERGE: merge a safety adapter into a fine-tune's unsafe layers",
        epilog=SAFEMERGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--adapter", required=True, help="the fine-tune's PEFT LoRA adapter (trained on --aligned)")
    p.add_argument(
        "--safety-adapter", required=True, help="a LoRA safety-tuned from the same base (same target modules and rank)"
    )
    p.add_argument("--aligned", required=True, help="the aligned model both adapters were trained on")
    p.add_argument("--unaligned", required=True, help="the model --aligned was aligned from")
    SAFEMERGE.add_arguments(p)
    _add_output_args(p)
    p.set_defaults(func=cmd_safemerge)


def _progress(args) -> bool:
    return A.progress_wanted(args)


def _print(report: dict, args) -> None:
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "text"}, indent=2, sort_keys=True, default=str))
        return
    print(report["text"])
    if not report.get("dry_run"):
        print(f"wrote {report['out']} ({report.get('output', 'adapter')})", file=sys.stderr)


def cmd_safelora(args) -> int:
    from resta_fast import realign

    report = realign.safelora(
        args.adapter,
        args.out,
        aligned=args.aligned,
        unaligned=args.unaligned,
        **SAFELORA.from_args(args),
        base=args.base,
        overwrite=args.overwrite,
        fsync=not args.no_fsync,
        dry_run=args.dry_run,
        progress=_progress(args),
        command_line=getattr(args, "command_line", None),
        record_paths=args.record_paths,
    )
    _print(report, args)
    return 0


def cmd_safemerge(args) -> int:
    from resta_fast import realign

    report = realign.safemerge(
        args.adapter,
        args.safety_adapter,
        args.out,
        aligned=args.aligned,
        unaligned=args.unaligned,
        **SAFEMERGE.from_args(args),
        base=args.base,
        overwrite=args.overwrite,
        fsync=not args.no_fsync,
        dry_run=args.dry_run,
        progress=_progress(args),
        command_line=getattr(args, "command_line", None),
        record_paths=args.record_paths,
    )
    _print(report, args)
    return 0
