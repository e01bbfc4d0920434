"""``resta-fast verify``: its arguments and exit codes; the checks are in the verify package.

Kept apart so that building the CLI (``--help``) imports nothing heavy.
"""

from __future__ import annotations

import json
import sys

from resta_fast import cli_args as A


def cmd_verify(args) -> int:
    from resta_fast.verify import format_result, verify

    result = verify(
        args.out, args.against, dare_base=args.dare_base, base=args.base, samples=args.samples, seed=args.seed
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_result(result), file=sys.stdout)
    return 0 if result["ok"] else 1


def add_verify_parser(subparsers) -> None:
    """Register ``resta-fast verify``."""
    v = subparsers.add_parser(
        "verify",
        help="re-check an output's hashes and headers; with --against, recompute a sample",
        description="Exit 0 when every check passes, 1 when one fails, 2 on bad arguments.",
    )
    v.add_argument("out", help="output directory written by `resta-fast patch` or `vector`")
    v.add_argument(
        "--against",
        nargs="*",
        metavar="MODEL",
        help="recompute sampled elements from the inputs: FINETUNED ALIGNED UNALIGNED "
        "(or FINETUNED VECTOR; ALIGNED UNALIGNED for a vector). With no paths, the "
        "paths recorded in resta_fast.json are used. Put OUT before --against.",
    )
    v.add_argument("--dare-base", help="DARE base model, when it was not the aligned model")
    v.add_argument(
        "--base", help="for a LoRA fine-tune: the model the adapter was merged into, when it was not the aligned model"
    )
    v.add_argument("--samples", type=A.index, default=10000, help="elements to recompute (default 10000)")
    v.add_argument("--seed", type=A.seed, default=0, help="which elements are sampled (default 0)")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.set_defaults(func=cmd_verify)
