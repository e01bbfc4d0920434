"""Command line: argument parsing, progress and exit codes; no logic of its own.

Exit codes: 0 ok, 1 a gate/validation failed, 2 bad input or refused
operation (one clear line on stderr), 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM); either stops at a tensor boundary and leaves no partial output.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import signal
import sys
import textwrap

from resta_fast import __version__
from resta_fast import cli_args as A
from resta_fast.cli_args import add_validation_args, validation_options
from resta_fast.errors import RestaError, cli_flag
from resta_fast.io.hub import HUB_RULE
from resta_fast.options import PATCH, VECTOR

HUB_EPILOG = textwrap.fill(f"Models and adapters are local paths or Hugging Face Hub ids: {HUB_RULE}.", 79) + "\n"
PATCH_EPILOG = (
    HUB_EPILOG
    + """
--no-fsync skips flushing the output to disk before the final rename: faster,
but after a power loss or kernel crash the output directory may exist with
incomplete or zeroed data. Use it for throwaway outputs only.
"""
)


def _add_common_patch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--finetuned",
        required=True,
        metavar="MODEL",
        help="fine-tuned model dir, .safetensors file or PEFT LoRA adapter; or a Hub id",
    )
    p.add_argument(
        "--aligned", metavar="MODEL", help="the safety-aligned model the fine-tune started from (path or Hub id)"
    )
    p.add_argument(
        "--unaligned", metavar="MODEL", help="the aligned model fine-tuned to comply (shadow model; path or Hub id)"
    )
    p.add_argument(
        "--vector", metavar="MODEL", help="precomputed safety vector (from `resta-fast vector`; path or Hub id)"
    )
    p.add_argument("--dare-base", metavar="MODEL", help="DARE base model (default: --aligned)")
    PATCH.add_arguments(p)


CORE_COMMANDS = ("patch", "vector", "env")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI parser; ``command`` (argv's first word) skips importing the
    optional subcommand modules when a core command is run (fast start-up)."""
    parser = A.Parser(
        prog="resta-fast",
        description=(
            "Restore safety to fine-tuned language models (RESTA): "
            "θ = θ_finetuned + β·(θ_aligned − θ_unaligned), optionally after DARE."
        ),
    )
    parser.add_argument("--version", action="version", version=f"resta_fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "patch",
        help="realign a fine-tuned checkpoint",
        epilog=PATCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common_patch_args(p)
    p.add_argument(
        "--base",
        metavar="MODEL",
        help="for a LoRA adapter as --finetuned: the model it was trained on (default: --aligned)",
    )
    p.add_argument("--out", required=True, type=A.creatable_dir, help="output directory (written atomically)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-fsync", action="store_true", help="skip fsync before rename (see below)")
    A.add_record_paths(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_validation_args(p)
    p.set_defaults(func=cmd_patch)

    v = sub.add_parser("vector", help="write the safety vector aligned − unaligned", epilog=HUB_EPILOG)
    v.add_argument("--aligned", required=True, metavar="MODEL", help="aligned model (path or Hub id)")
    v.add_argument("--unaligned", required=True, metavar="MODEL", help="unaligned (shadow) model (path or Hub id)")
    v.add_argument("--out", required=True, type=A.creatable_dir)
    VECTOR.add_arguments(v)
    v.add_argument("--overwrite", action="store_true")
    v.add_argument("--no-fsync", action="store_true")
    A.add_record_paths(v)
    v.add_argument("--json", action="store_true")
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(func=cmd_vector)

    e = sub.add_parser("env", help="versions, backends, CPU features, GPUs")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_env)

    if command not in CORE_COMMANDS:
        _add_optional_subcommands(sub)
    return parser


def _add_optional_subcommands(sub) -> None:
    """Subcommands living in sibling packages (eval, demo, batch ...)."""
    import importlib

    for module, adders in (
        ("resta_fast.eval.cli", ("add_eval_parser", "add_tune_parser")),
        ("resta_fast.eval.compare_cli", ("add_compare_parser",)),
        ("resta_fast.demo.cli", ("add_demo_parser",)),
        ("resta_fast.batch.cli", ("add_batch_parser",)),
        ("resta_fast.inspect_cli", ("add_inspect_parser",)),
        ("resta_fast.realign_cli", ("add_safelora_parser", "add_safemerge_parser")),
        ("resta_fast.verify_cli", ("add_verify_parser",)),
        ("resta_fast.push_cli", ("add_push_parser",)),
        ("resta_fast.convert_cli", ("add_convert_parser",)),
    ):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                continue  # that part of the package is not there (yet)
            raise
        for adder in adders:
            getattr(mod, adder)(sub)


def _print_result(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True, default=str))
        return
    if report.get("dry_run"):
        print(report["plan_text"])
        return
    s = report["plan"]["summary"]
    st = report["stats"]
    rate = st["bytes_written"] / max(st["seconds"], 1e-9) / 1e9
    print(
        f"wrote {report['out']}: {s.get('patch', 0)} tensors patched, {s.get('copy', 0)} copied, "
        f"{st['bytes_written'] / 1e9:.2f} GB in {st['seconds']:.2f} s ({rate:.2f} GB/s, "
        f"backend {report['backend']})",
        file=sys.stderr,
    )
    for note in report["plan"]["notes"]:
        print(f"note: {note}", file=sys.stderr)


def make_validator(options: dict | None, finetuned):
    """The validate-while-patching callable for ``options`` (None: no validation)."""
    if not options:
        return None
    from resta_fast.eval.runner import make_validator as build

    return build(options, finetuned)


def cmd_patch(args) -> int:
    from resta_fast import api

    checks = validation_options(args)
    finetuned, validate = args.finetuned, None
    if checks and not args.dry_run:
        from resta_fast.resolve import resolve

        # Resolved once: the gate's reference and the patch's fine-tune are the same input (a Hub id too).
        finetuned = resolve(args.finetuned, "finetuned", accepts="any")
        validate = make_validator(checks, finetuned)
    report = api.patch(
        finetuned,
        args.out,
        aligned=args.aligned,
        unaligned=args.unaligned,
        vector=args.vector,
        dare_base=args.dare_base,
        base=args.base,
        **PATCH.from_args(args),
        overwrite=args.overwrite,
        fsync=not args.no_fsync,
        dry_run=args.dry_run,
        validate=validate,
        progress=A.progress_wanted(args),
        command_line=getattr(args, "command_line", None),
        record_paths=args.record_paths,
    )
    _print_result(report, args.json)
    validation = report.get("validation")
    if validation is not None:
        print(validation.get("gate_line", ""), file=sys.stderr if args.json else sys.stdout)
        return 0 if validation.get("passed") else 1
    return 0


def cmd_vector(args) -> int:
    from resta_fast import api

    report = api.make_vector(
        args.aligned,
        args.unaligned,
        args.out,
        **VECTOR.from_args(args),
        overwrite=args.overwrite,
        fsync=not args.no_fsync,
        progress=A.progress_wanted(args),
        command_line=getattr(args, "command_line", None),
        record_paths=args.record_paths,
    )
    _print_result(report, args.json)
    return 0


def environment() -> dict:
    """What `env` reports: versions, backend status (and why not), CPU, GPUs."""
    import torch

    from resta_fast.kernels import backend_status

    info = {
        "resta_fast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    for mod in ("safetensors", "numpy", "triton", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - reported as missing
            info[mod] = f"not available ({type(exc).__name__})"
    info["backends"] = backend_status()
    try:
        from resta_fast.kernels import cpp

        info["native"] = cpp.build_info()
    except Exception as exc:  # noqa: BLE001 - reported, never fatal
        info["native"] = f"not loaded: {exc}"
    flags = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    info["cpu"] = {
        "cores": __import__("os").cpu_count(),
        "features": sorted(flags & {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "sha_ni"}),
    }
    info["cuda"] = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else "no CUDA device visible"
    )
    return info


def cmd_env(args) -> int:
    info = environment()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")
    return 0


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit cannot raise BrokenPipeError again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv[0] if argv else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad argument (2, one line already printed)
        return int(exc.code or 0)
    args.command_line = shlex.join(["resta-fast", *argv])  # the model card's "how to reproduce"
    try:
        return int(args.func(args) or 0)
    except RestaError as exc:
        print(f"resta-fast: error: {exc.render(cli_flag)}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `resta-fast inspect --json | head`: the reader left; say nothing more
        _quiet_stdout()
        return 128 + signal.SIGPIPE  # what a shell reports for a writer the pipe stopped
    except KeyboardInterrupt:
        from resta_fast.pipeline.interrupt import stop_signal

        signum = stop_signal()
        what = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
        print(f"resta-fast: {what}; partial output removed", file=sys.stderr)
        return 128 + signum
