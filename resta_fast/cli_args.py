"""What each command-line flag accepts, checked before any work starts, in one place.

Every sub-command builds its flags with these ``type=`` callables, so a value
that makes no sense (a negative count, a zero size, a non-finite number, a
directory that cannot be created) is refused while the arguments are parsed:
one line, exit 2, nothing written. ``Parser`` prints argparse's own errors
(unknown flags, missing values) as that one line too.

Example:
    >>> count("3"), probability("0.25"), finite("-1.5")
    (3, 0.25, -1.5)
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from resta_fast import spec as S
from resta_fast.errors import RestaError
from resta_fast.spec import Option


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line in the CLI's words:
    ``resta-fast: error: --threads must be an integer >= 1, got -1 (see resta-fast patch --help)``."""

    def error(self, message: str):
        flag = re.match(r"argument ([^:]+): (must be|needs|cannot|is |no such) ?(.*)$", message)
        if flag:  # one of our types: "--flag must be ..."
            message = f"{flag.group(1).split('/')[-1]} {flag.group(2)} {flag.group(3)}".rstrip()
        sys.stderr.write(f"resta-fast: error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def _flag(check, kind, doc: str):
    """A ``type=`` callable: the flag's text as ``kind``, checked by the spec's check of that name,
    so a flag and an option with the same rule say the same words."""
    option = Option("value", kind=kind, check=check("value"))

    def parse(text: str):
        return option.parse_text(text)

    parse.__doc__ = doc
    return parse


count = _flag(S.count, int, "An integer >= 1 (threads, sizes, token bounds).")
index = _flag(S.index, int, "An integer >= 0 (group numbers, retries).")
seed = _flag(S.seed, int, "A uint64 seed.")
finite = _flag(S.finite, float, "Any finite number (β may be negative or zero).")
nonnegative = _flag(S.nonnegative, float, "Seconds, utility drops, GPU shares.")
positive = _flag(S.positive, float, "Rates, CPU shares.")
probability = _flag(S.probability, float, "DARE's p.")
rate = _flag(S.rate, float, "A harmful-rate threshold.")


RECORD_PATHS_HELP = (
    "also record each input's absolute local path in resta_fast.json (and the command as typed in the model "
    "card); by default no file of the output holds a local path, user or host name, or file time"
)


def progress_wanted(args) -> bool:
    """A progress bar: unless ``--no-progress``, and only when stderr is a terminal (not a log or a pipe)."""
    return not args.no_progress and sys.stderr.isatty()


def add_record_paths(parser) -> None:
    """The ``--record-paths`` flag of every command that writes an output."""
    parser.add_argument("--record-paths", action="store_true", help=RECORD_PATHS_HELP)


def existing_file(text: str) -> str:
    """A file that exists (manifests, prompt and text files)."""
    path = Path(text)
    if not path.is_file():
        found = "a directory" if path.is_dir() else "missing"
        raise argparse.ArgumentTypeError(f"needs an existing file: {text} is {found}")
    return text


def creatable_dir(text: str) -> str:
    """A directory that exists or can be created: not a file, below a writable directory."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"needs a directory: {text} is a file")
    parent = path.absolute()
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"needs a directory that can be created: {parent} is a file")
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"needs a directory that can be created: {parent} is not writable")
    return text


def creatable_file(text: str) -> str:
    """A file that exists or can be created (summaries, caches)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"needs a file: {text} is a directory")
    creatable_dir(str(path.parent))
    return text


# The validate-while-patching flags are shared by ``patch`` (cli.py) and ``batch`` (batch/cli.py); they
# live here, below both, so that neither command module imports the other (cli.py imports batch/cli.py).
def add_validation_args(p: argparse.ArgumentParser) -> None:
    """The validate-while-patching flags shared by ``patch`` and ``batch``."""
    g = p.add_argument_group("validate while patching (needs the [eval] extra)")
    g.add_argument(
        "--validate-prompts",
        action="append",
        metavar="FILE",
        help="harmful prompts to evaluate the output on (repeatable); exit 1 if the gate fails",
    )
    g.add_argument(
        "--validate-utility", metavar="FILE", type=existing_file, help="prompt/answer JSONL for exact-match utility"
    )
    g.add_argument("--validate-perplexity", metavar="FILE", type=existing_file, help="text file for perplexity")
    g.add_argument("--max-harmful", type=rate, help="highest acceptable harmful rate (e.g. 0.05)")
    g.add_argument("--max-utility-drop", type=nonnegative, help="highest acceptable utility drop vs the fine-tune")
    g.add_argument("--validate-max-new-tokens", type=count, default=64)


def validation_options(args) -> dict | None:
    """``eval.make_validator`` options from the parsed validation flags."""
    if not args.validate_prompts:
        if args.max_harmful is not None or args.max_utility_drop is not None:
            raise RestaError("--max-harmful/--max-utility-drop need --validate-prompts FILE")
        return None
    if args.max_harmful is None:
        raise RestaError("--validate-prompts needs --max-harmful R (the gate's harmful-rate threshold)")
    return {
        "prompts": args.validate_prompts,
        "utility": args.validate_utility,
        "perplexity": args.validate_perplexity,
        "max_harmful": args.max_harmful,
        "max_utility_drop": args.max_utility_drop,
        "max_new_tokens": args.validate_max_new_tokens,
        "progress": progress_wanted(args),
    }
