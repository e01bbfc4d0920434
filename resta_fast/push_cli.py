"""``resta-fast push OUT REPO_ID``: its flags, exit codes and printed result; the push itself is ``push.py``.

Kept apart so that building the CLI (``--help``) imports neither huggingface_hub nor the verifier.
"""

from __future__ import annotations

import json
import sys

from resta_fast import cli_args as A

EPILOG = """\
OUT is checked first, as `resta-fast verify OUT` checks it; an output that fails, or
that carries VALIDATION_FAILED, is refused (exit 2) unless --force. The token is
huggingface_hub's: HF_TOKEN, else the one `hf auth login` saved; there is no flag
for it. Every file of OUT is uploaded, in one commit; OUT is never modified.
"""


def cmd_push(args) -> int:
    from resta_fast.push import push

    result = push(
        args.out,
        args.repo_id,
        revision=args.revision,
        private=args.private,
        commit_message=args.commit_message,
        create_pr=args.create_pr,
        force=args.force,
        progress=A.progress_wanted(args),
    )
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    print(format_result(result), file=sys.stderr)
    print(result["pr_url"] or result["commit_url"])
    return 0


def format_result(result: dict) -> str:
    """The line ``push`` prints on stderr (the commit's or pull request's URL goes to stdout).

    Example:
        >>> print(format_result({"repo_id": "org/x", "revision": "main", "create_pr": False, "forced": [],
        ...                      "files": {"README.md": {"size": 2000}, "model.safetensors": {"size": 5000}}}))
        pushed 2 files (0.0 MB) to org/x@main in one commit
    """
    size = sum(f["size"] or 0 for f in result["files"].values())
    what = "opened a pull request with" if result["create_pr"] else "pushed"
    line = f"{what} {len(result['files'])} files ({size / 1e6:.1f} MB) to {result['repo_id']}@{result['revision']}"
    line += " in one commit"
    if result["forced"]:
        line += " (forced: the uploaded README.md says why)"
    return line


def add_push_parser(subparsers) -> None:
    """Register ``resta-fast push``."""
    import argparse

    p = subparsers.add_parser(
        "push",
        help="publish a verified output directory to the Hugging Face Hub",
        description="Exit 0 when the commit is made; 2 when the push is refused or fails\n(then nothing is committed).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", metavar="OUT", help="output directory written by resta-fast (patch, vector, batch, ...)")
    p.add_argument("repo_id", metavar="REPO_ID", help="Hub model repo, ORG/NAME; created when missing")
    p.add_argument("--revision", metavar="BRANCH", help="branch to commit to, created when missing (default main)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its own)")
    p.add_argument("--commit-message", metavar="TEXT", help="commit title (default: Upload with resta-fast push)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    p.add_argument(
        "--force",
        action="store_true",
        help="upload even if OUT fails verify or is marked VALIDATION_FAILED (the uploaded card says so)",
    )
    p.add_argument("--json", action="store_true", help="print what was committed as JSON on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.set_defaults(func=cmd_push)
