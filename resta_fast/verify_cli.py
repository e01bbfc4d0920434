"""``resta-fast verify``: its arguments, exit codes and printed result; the checks are in the verify package.

Kept apart so that building the CLI (``--help``) imports nothing heavy.
"""

from __future__ import annotations

import json
import sys

from resta_fast import cli_args as A

MAX_LISTED = 10  # problems printed per check; --json has them all


def cmd_verify(args) -> int:
    from resta_fast.verify import verify

    result = verify(
        args.out, args.against, dare_base=args.dare_base, base=args.base, samples=args.samples, seed=args.seed
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_result(result), file=sys.stdout)
    return 0 if result["ok"] else 1


def format_result(result: dict) -> str:
    """``verify``'s result as the CLI prints it: one line per check, at most MAX_LISTED problems each.

    Example:
        >>> print(format_result({"out": "restored", "ok": False, "checks": [
        ...     {"name": "sha256", "ok": False, "detail": "1 problem(s)", "problems": ["a.safetensors: missing"]}]}))
        verify restored
          FAIL  sha256: 1 problem(s)
                  a.safetensors: missing
        FAIL
    """
    lines = [f"verify {result['out']}"]
    for role, hub in (result.get("hub_inputs") or {}).items():
        rev = hub.get("revision")
        lines.append(
            f"  from  {role.replace('_', ' ')}: {hub.get('repo_id')}"
            + (f"@{rev}" if rev and rev != "main" else "")
            + f", commit {hub.get('commit')}"
        )
    for c in result["checks"]:
        lines.append(f"  {'ok  ' if c['ok'] else 'FAIL'}  {c['name']}: {c['detail'] or ''}".rstrip())
        for problem in c["problems"][:MAX_LISTED]:
            lines.append(f"          {problem}")
        if len(c["problems"]) > MAX_LISTED:
            lines.append(f"          ... {len(c['problems']) - MAX_LISTED} more (see --json)")
    lines.append("PASS" if result["ok"] else "FAIL")
    return "\n".join(lines)


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
