"""`resta-fast batch MANIFEST`: argument parsing, progress and exit codes.

Exit codes: 0 every job done or already finished, 1 one or more jobs failed
(the summary says which and why), 2 the manifest is invalid (nothing written),
130 interrupted (Ctrl-C), 143 terminated (SIGTERM): finished jobs stay committed,
the running ones leave no partial output, and a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import threading
from pathlib import Path

from resta_fast import cli_args as A
from resta_fast.batch.local import JobResult, Reporter, format_table, human_bytes, summarize
from resta_fast.batch.manifest import BATCH, patch_keys, top_keys
from resta_fast.cli_args import add_validation_args, validation_options
from resta_fast.options import PATCH


def epilog() -> str:
    """The manifest's keys, as the manifest loader knows them (from the one option spec)."""
    job_keys, top = ", ".join(patch_keys()), ", ".join(k for k in top_keys() if k != "jobs")
    text = (
        "Manifest (YAML or JSON): top-level keys are defaults for every job and mirror the patch flags "
        f"({job_keys}); `jobs` lists {{finetuned, out, name?, ...overrides}}. Relative paths resolve against "
        "the manifest's folder. Any model or adapter may be a Hugging Face Hub id: a local path (relative to "
        "the manifest's folder) wins; otherwise ORG/NAME[@REV] or hf://ORG/NAME[@REV] is a Hub id, each distinct "
        "one resolved once per run (the cache first; HF_HUB_OFFLINE=1 never downloads). Execution settings: "
        f"{top} {{sbatch option: value}}."
    )
    return (
        textwrap.fill(text, 79) + "\n\nRerunning is safe: finished outputs are verified (sha256) and skipped,\n"
        "unfinished or corrupted ones are redone, finished ones are never rewritten.\n"
    )


def add_batch_parser(subparsers) -> None:
    """Add the ``batch`` subcommand to the resta-fast CLI."""
    p = subparsers.add_parser(
        "batch",
        help="realign many fine-tunes from a manifest (fused, resumable)",
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("manifest", type=A.existing_file, help="batch manifest (.yaml/.yml or .json)")
    p.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="local: fused passes in this process (default); ray: one Ray task per group",
    )
    p.add_argument(
        "--group",
        type=A.index,
        action="append",
        metavar="K",
        help="run only group K (repeatable); e.g. a Slurm array element",
    )
    BATCH.add_arguments(p, only=("group_size",), unset=True)
    p.add_argument("--dry-run", action="store_true", help="validate and print the groups; write nothing")
    p.add_argument(
        "--emit-slurm", metavar="DIR", type=A.creatable_dir, help="write an sbatch array script (one element per group)"
    )
    BATCH.add_arguments(p, only=("num_cpus", "num_gpus"), unset=True)
    p.add_argument("--ray-address", help="existing Ray cluster (default: RAY_ADDRESS, else a local one)")
    BATCH.add_arguments(p, only=("threads",), unset=True)
    p.add_argument(
        "--writers",
        type=A.count,
        metavar="N",
        help="writer threads per fused pass, each writing and hashing its jobs' files (default: cores/4, at most 8)",
    )
    p.add_argument(
        "--chunk-elems",
        type=PATCH.get("chunk_elems").parse_text,
        metavar="N",
        help="elements per fused chunk (default 1M; the shared chunk is reused while hot)",
    )
    p.add_argument(
        "--staging",
        choices=PATCH.get("staging").choices,
        default=PATCH.get("staging").default,
        help="how inputs are read: mmap (zero-copy; the CPU default), read (reader threads pread "
        "into reusable buffers: an input truncated mid-run fails its jobs cleanly; the GPU default)",
    )
    p.add_argument("--no-fsync", action="store_true", help="skip fsync before each job's final rename")
    A.add_record_paths(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--summary", metavar="FILE", type=A.creatable_file, help="also write the JSON summary to FILE")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (status lines stay)")
    add_validation_args(p)
    p.set_defaults(func=cmd_batch)


class ConsoleReporter(Reporter):
    """One overall bar (bytes, with jobs done in its postfix) plus a status line per job."""

    def __init__(self, total_jobs: int, total_bytes: int | None, bar: bool):
        from tqdm import tqdm

        self.total_jobs = total_jobs
        self.done = 0
        self.seen: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.lock = threading.Lock()
        self.bar = tqdm(
            total=total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="batch",
            disable=not bar,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"jobs {self.done}/{self.total_jobs}", refresh=False)

    def job_progress(self, job, nbytes: int) -> None:
        with self.lock:
            self.seen[job.index] = self.seen.get(job.index, 0) + nbytes
            self.bar.update(nbytes)

    def job_done(self, result: JobResult) -> None:
        with self.lock:
            self.done += 1
            rest = self.sizes.get(result.index, 0) - self.seen.get(result.index, 0)
            if rest > 0:  # skipped or failed jobs still move the bar to the end
                self.bar.update(rest)
            self._postfix()
            self.bar.write(_status_line(result, self.done, self.total_jobs), file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _status_line(r: JobResult, done: int, total: int) -> str:
    head = f"resta-fast batch [{done}/{total}] {r.name}: "
    if r.status == "failed":
        return head + f"FAILED: {r.error}"
    if r.status == "skipped":
        return head + f"skipped, already finished ({r.note}) -> {r.out}"
    rate = f" in {r.seconds:.2f} s" if r.seconds else ""
    note = f" ({r.note})" if r.note else ""
    return head + f"{r.status}, {human_bytes(r.bytes_written)}{rate}{note} -> {r.out}"


def cmd_batch(args) -> int:
    from resta_fast.batch.local import check_manifest
    from resta_fast.batch.manifest import load_manifest

    # Jobs running elsewhere (Ray, Slurm) are checked here except for their
    # devices and backends; each worker checks its own group again.
    here = args.executor == "local" and not args.emit_slurm
    manifest = load_manifest(args.manifest, group_size=args.group_size)
    selected = manifest.select(args.group)
    # The deep check (every job opened and planned) runs before anything is
    # written; a local run then reuses the prepared jobs.
    with check_manifest(manifest, args.group, here=here) as prepared:
        if args.emit_slurm or args.dry_run or args.executor != "local":
            prepared.close()  # Slurm and Ray workers prepare their own groups
        return _run(args, manifest, selected, prepared)


def _run(args, manifest, selected, prepared) -> int:
    if args.emit_slurm:
        from resta_fast.batch.slurm import emit_slurm

        path = emit_slurm(
            manifest,
            args.emit_slurm,
            num_cpus=args.num_cpus,
            gpus=bool(args.num_gpus) if args.num_gpus is not None else None,
            fsync=False if args.no_fsync else None,
            record_paths=args.record_paths,
        )
        print(
            f"wrote {path}: {len(manifest.groups)} array element(s) for {len(manifest.jobs)} job(s); "
            f"submit with: sbatch {path}",
            file=sys.stderr,
        )
        return 0
    if args.dry_run:
        _print_groups(manifest, selected)
        return 0
    jobs = [j for g in selected for j in g.jobs]
    total = sum(manifest.out_bytes.get(j.index, 0) for j in jobs) or None
    reporter = ConsoleReporter(len(jobs), total, bar=A.progress_wanted(args))
    reporter.sizes = dict(manifest.out_bytes)
    fsync = False if args.no_fsync else None
    fused = {k: v for k, v in (("writers", args.writers), ("chunk_elems", args.chunk_elems)) if v}
    if args.staging != "auto":
        fused["staging"] = args.staging
    fused["command_line"] = getattr(args, "command_line", None)  # each output's model card
    fused["record_paths"] = args.record_paths
    validate = validation_options(args)
    if validate:
        validate["progress"] = False  # one batch bar; per-job eval bars would interleave
        fused["validate"] = validate
    try:
        if args.executor == "ray":
            from resta_fast.batch.ray import run_ray

            results = run_ray(
                manifest,
                args.group,
                address=args.ray_address,
                num_cpus=args.num_cpus,
                num_gpus=args.num_gpus,
                threads=args.threads,
                fsync=fsync,
                reporter=reporter,
                **fused,
            )
        else:
            from resta_fast.batch.local import run_batch

            results = run_batch(
                manifest, args.group, prepared=prepared, reporter=reporter, fsync=fsync, threads=args.threads, **fused
            )
    finally:
        reporter.close()
    summary = summarize(results)
    summary["manifest"] = str(manifest.path)
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
    print(format_table(results), file=sys.stderr)
    return 0 if summary["ok"] else 1


def _print_groups(manifest, groups) -> None:
    print(
        f"{manifest.path}: {len(manifest.jobs)} job(s) in {len(manifest.groups)} group(s) "
        f"(group_size {manifest.group_size}); all valid"
    )
    for g in groups:
        shared = g.jobs[0]
        src = (
            f"vector {_named(shared, 'vector')}"
            if shared.vector
            else f"aligned {_named(shared, 'aligned')}, unaligned {_named(shared, 'unaligned')}"
        )
        print(f"group {g.index} ({len(g.jobs)} job(s), {g.device}, backend {shared.backend}; {src}):")
        for j in g.jobs:
            size = manifest.out_bytes.get(j.index)
            dare = f", dare {j.dare} seed {j.seed}" if j.dare is not None else ""
            print(
                f"  [{j.index}] {j.name}: beta {j.beta:g}{dare}  {_named(j, 'finetuned')} -> {j.out}"
                + (f"  ({human_bytes(size)})" if size else "")
            )


def _named(job, key: str) -> str:
    """An input as the manifest named it: a Hub id with the commit it resolved to, else its path."""
    found = job.hub.get(key)
    if found is None:
        return str(getattr(job, key))
    return f"{found.repo_id}@{found.revision} (commit {found.commit[:12]})"
