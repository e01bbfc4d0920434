"""``resta-fast convert``: its arguments and printed result; the conversion is in ``convert``.

Kept apart so that building the CLI (``--help``) imports nothing heavy.
"""

from __future__ import annotations

import json
import sys

from resta_fast import cli_args as A


def add_convert_parser(subparsers) -> None:
    """Register ``resta-fast convert``."""
    c = subparsers.add_parser(
        "convert",
        help="rewrite a torch .bin model or adapter as safetensors; nothing in its pickle runs",
        description=(
            "Stream a zip-format torch checkpoint (pytorch_model.bin, its sharded index, a .bin file, or a PEFT "
            "adapter with adapter_model.bin) into safetensors: the same layout under safetensors names, the "
            "config and tokenizer files, a model card and resta_fast.json (check it with `resta-fast verify OUT`). "
            "Nothing in the pickle runs: only the tensors it describes are read."
        ),
    )
    c.add_argument("input", metavar="IN", help="the .bin model directory or file, or the adapter directory")
    c.add_argument("out", metavar="OUT", type=A.creatable_dir, help="output directory (written atomically)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    c.add_argument("--no-fsync", action="store_true", help="skip fsync before the final rename (throwaway outputs)")
    A.add_record_paths(c)
    c.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    c.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    c.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from pathlib import Path

    from resta_fast.convert import convert
    from resta_fast.errors import RestaError

    out = Path(args.out)
    if (out.exists() or out.is_symlink()) and not args.overwrite:  # said here: OUT is positional, not --out
        raise RestaError(f"OUT {out} already exists; pass --overwrite to replace it, or choose another path")
    report = convert(
        args.input,
        args.out,
        overwrite=args.overwrite,
        fsync=not args.no_fsync,
        progress=A.progress_wanted(args),
        command_line=getattr(args, "command_line", None),
        record_paths=args.record_paths,
    )
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True, default=str))
    elif "plan" in report:
        s, st = report["plan"]["summary"], report["stats"]
        print(
            f"wrote {report['out']}: {s['tensors']} tensors in {s['files']} safetensors file(s), "
            f"{st['bytes_written'] / 1e9:.2f} GB in {st['seconds']:.2f} s",
            file=sys.stderr,
        )
    else:
        print(f"wrote {report['out']}: the adapter as adapter_model.safetensors", file=sys.stderr)
    return 0
