"""``resta-fast demo``: the whole RESTA story on tiny models, on a CPU, in minutes."""

from __future__ import annotations

import argparse

from resta_fast import cli_args as A
from resta_fast.demo import DEFAULT_SEED
from resta_fast.extras import require

DEMO_EPILOG = """\
Trains four tiny Llama models once (base, aligned, unaligned, fine-tuned on a new
skill) and two LoRA adapters (the skill, and a safety adapter), cached under
~/.cache/resta_fast/demo/ (or $RESTA_FAST_CACHE/demo/); patches the fine-tune with
RESTA at several β, with DARE, and with a random vector of the same per-tensor norm,
then evaluates all of them on held-out prompts. Then it compares RESTA, Safe LoRA
and SafeMERGE on the LoRA fine-tune (resta-fast compare's grid on validation
prompts, each method's pick on held-out prompts). Placeholder content only: "harm"
is abstract category verbs applied to invented words. Exit code 0 when the RESTA
effect reproduced on the full fine-tune, 1 when it did not.
"""


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand to the main CLI's subparsers."""
    p = subparsers.add_parser(
        "demo",
        help="reproduce RESTA end to end on tiny models (CPU, minutes)",
        epilog=DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out",
        default="resta_fast_demo",
        type=A.creatable_dir,
        help="directory for reports and patched models (default ./resta_fast_demo)",
    )
    p.add_argument(
        "--seed",
        type=A.seed,
        default=DEFAULT_SEED,
        help=f"seed for training, DARE and the random control (default {DEFAULT_SEED})",
    )
    p.add_argument("--retrain", action="store_true", help="ignore cached models and train again")
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "cpp", "triton", "torch"],
        help="patch backend (default auto: C++ when built)",
    )
    p.set_defaults(func=cmd_demo)
    return p


def cmd_demo(args) -> int:
    require("transformers", "eval", "the demo")
    require("peft", "eval", "the demo")
    from resta_fast.demo.report import summary_text
    from resta_fast.demo.run import run_demo

    result = run_demo(args.out, seed=args.seed, retrain=args.retrain, backend=args.backend)
    print(summary_text(result))
    print(f"\nreports: {', '.join(result['reports'].values())}")
    return 0 if result["passed"] else 1
