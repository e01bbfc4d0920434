"""The local batch executor: one engine pass per group, resumable, job by job.

Each group of jobs (see ``manifest``) is prepared once (``api.prepare`` with a
shared ``api.Opener``: the shared aligned/unaligned pair or vector, and a
fine-tune used by several jobs, are one object) and handed to the one executor
as one pass (``executor.run``: one call of the streaming engine, on the CPU or a
GPU): each shared chunk is read once and every job's output for it is produced
before moving on. ``check_manifest``, the batch command's deep check, prepares every
group before anything is written; ``run_batch`` then runs those prepared groups
without opening their inputs again. ``run_batch`` takes a loaded manifest or
``JobSpec``s built in memory (``as_manifest``): the manifest is only a loader.

Every job's output is its own atomic directory (temp dir + rename) holding
``resta_fast.json`` with the sha256 of every file, so the batch's state is the
outputs themselves: a rerun verifies finished outputs and skips them, redoes
missing, interrupted or corrupted ones, and never rewrites a finished output.
One job failing is reported and leaves the others alone.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

from resta_fast import executor
from resta_fast.batch.manifest import DEFAULT_GROUP_SIZE, Group, JobSpec, Manifest, make_groups, problems_error
from resta_fast.errors import RestaError
from resta_fast.executor import Output, Written
from resta_fast.io.identity import changed_files
from resta_fast.report import REPORT_NAME


@dataclass
class JobResult:
    """What happened to one job. ``status``: done (written now), redone (a
    corrupt or unverifiable output was replaced), skipped (already finished and
    verified) or failed (``error`` says why)."""

    index: int
    name: str
    group: int
    out: str
    status: str
    error: str | None = None
    note: str = ""
    seconds: float = 0.0
    bytes_written: int = 0
    transient: bool = False  # failed with a plain OSError: worth retrying

    @property
    def ok(self) -> bool:
        return self.status != "failed"

    def to_json(self) -> dict:
        return asdict(self)


class Reporter:
    """Progress hooks; the CLI's implementation draws a bar and status lines."""

    def job_progress(self, job: JobSpec, nbytes: int) -> None:
        pass

    def job_done(self, result: JobResult) -> None:
        pass


class PreparedGroup:
    """A group's jobs opened and planned once, as ``patch`` would (``api.prepare``).

    ``jobs`` maps a job's index to its ``api.PreparedPatch``, or to the
    exception preparing it raised. Shared inputs are one object for the whole
    group; ``close`` (or leaving the ``with`` block) closes them all.
    ``here=False`` (checked for another machine) leaves the kernels unloaded:
    such a group is checked, not run.
    """

    def __init__(self, group: Group, *, here: bool = True):
        from resta_fast import api

        self.group = group
        self.here = here
        self.stack = ExitStack()
        self.jobs: dict[int, object] = {}
        opener = api.Opener(self.stack)
        try:
            for job in group.jobs:
                try:
                    self.jobs[job.index] = api.prepare(
                        job.input("finetuned"), **job.input_kwargs(), options=job.options(), opener=opener, here=here
                    )
                except Exception as exc:  # noqa: BLE001 - reported per job
                    self.jobs[job.index] = exc
        except BaseException:
            self.stack.close()
            raise

    def prepared(self, job: JobSpec):
        """The job's PreparedPatch; raises what preparing it raised."""
        prep = self.jobs[job.index]
        if isinstance(prep, BaseException):
            raise prep
        return prep

    def close(self) -> None:
        self.stack.close()

    def __enter__(self) -> PreparedGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class PreparedBatch:
    """The groups ``check_manifest`` prepared, by group index, still open for ``run_batch``."""

    groups: dict[int, PreparedGroup] = field(default_factory=dict)

    def close(self) -> None:
        for group in self.groups.values():
            group.close()

    def __enter__(self) -> PreparedBatch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- state of an existing output ---------------------------------------------------------


def _differences(report: dict, expected: dict) -> tuple[list[str], list[str]]:
    """(how an existing output's command, parameters or roles differ from this job's; which inputs'
    content changed). Inputs are compared by their content identities (``io.identity``), never by
    path or file time: a moved manifest, or inputs copied elsewhere or only ``touch``ed, still
    recognise their finished outputs."""
    diffs, changed_inputs = [], []
    if report.get("command") != expected["command"]:
        diffs.append(f"written by `{report.get('command')}`")
    old, new = report.get("params") or {}, expected["params"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            diffs.append(f"{key} {old.get(key)!r} on disk vs {new.get(key)!r} now")
    old_in, new_in = report.get("inputs") or {}, expected["inputs"]
    names = expected.get("sources") or {}
    for role in sorted(set(old_in) | set(new_in)):
        if role not in old_in or role not in new_in:
            diffs.append(f"{role} {'added' if role in new_in else 'dropped'}")
            continue
        changed = changed_files((old_in[role] or {}).get("files"), new_in[role]["files"])
        if changed:
            name = (names.get(role) or {}).get("name", role)
            changed_inputs.append(f"{role} {name}: its content changed since ({', '.join(changed[:2])} differ)")
    return diffs, changed_inputs


def _joined(diffs: list[str]) -> str:
    return "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")


class OutputConflict(RestaError):
    """A job's ``out`` holds the output of the same job made from inputs whose content has
    changed since: that job is refused when it runs, and the other jobs go on."""


def existing_state(out: Path, provenance: dict, *, verify: bool) -> tuple[str, str]:
    """("absent" | "finished" | "corrupt", detail) for ``out``.

    Raises RestaError when ``out`` is something the batch must not replace: not
    a directory, not a resta_fast output, or the finished output of another job.
    ``verify`` re-hashes every file listed in its ``resta_fast.json``.
    """
    if not out.exists() and not out.is_symlink():
        return "absent", ""
    if out.is_symlink() or not out.is_dir():
        raise RestaError(f"out {out} exists and is not a directory; refusing to replace it")
    report_path = out / REPORT_NAME
    if not report_path.is_file():
        raise RestaError(
            f"out {out} exists but has no {REPORT_NAME}, so it is not a resta_fast output; "
            "refusing to replace it: move it away or choose another out"
        )
    try:
        report = json.loads(report_path.read_text())
        files = report["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        return "corrupt", f"{REPORT_NAME} is unreadable"
    diffs, changed_inputs = _differences(report, provenance)
    if diffs or changed_inputs:
        # Other parameters or roles: the manifest names the wrong out (refused before anything runs).
        # Only an input's content changed: this job is refused, the others go on.
        error = RestaError if diffs else OutputConflict
        raise error(
            f"out {out} holds a different job's finished output ({_joined(diffs + changed_inputs)}); a batch never "
            "replaces a finished output: delete it or choose another out"
        )
    if not verify:
        return "finished", ""
    problem = verify_files(out, files)
    return ("corrupt", problem) if problem else ("finished", f"{len(files)} file(s) verified")


def verify_files(out: Path, files: dict) -> str:
    """'' if every file has its recorded sha256, else the first problem."""
    from resta_fast.io.digest import sha256_file

    for name, digest in sorted(files.items()):
        if not isinstance(name, str) or "/" in name or name in ("", ".", "..") or not isinstance(digest, str):
            return f"{REPORT_NAME} lists an invalid entry {name!r}"
        path = out / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} does not match its recorded sha256"
    return ""


# --- the deep check --------------------------------------------------------------------


def check_manifest(manifest: Manifest, groups: list[int] | None = None, *, here: bool = True) -> PreparedBatch:
    """The batch command's deep check: open and plan every job of the selected
    groups (``api.prepare``, as patch would), and check that existing outputs
    belong to their job. Fills ``manifest.out_bytes``.

    Args:
        groups: limit the check to these group indices (a Slurm element).
        here: the jobs will run on this machine, so check that their devices and
            backends exist here; False (Ray, Slurm) leaves that to each worker.
    Returns:
        The prepared groups, inputs still open: pass them to
        ``run_batch(prepared=...)`` so the run does not open them again, and
        close them (a context manager) when done.
    Raises:
        ManifestError listing every problem (nothing was written).

    Example:
        >>> manifest = load_manifest("batch.yaml")  # doctest: +SKIP
        >>> with check_manifest(manifest) as prepared:  # doctest: +SKIP
        ...     results = run_batch(manifest, prepared=prepared)
    """
    batch = PreparedBatch()
    problems: list[str] = []
    try:
        for group in manifest.select(groups):
            prepared = batch.groups[group.index] = PreparedGroup(group, here=here)
            for job in group.jobs:
                try:
                    prep = prepared.prepared(job)
                    manifest.out_bytes[job.index] = prep.out_bytes
                    existing_state(job.out, prep.provenance, verify=False)
                except OutputConflict:
                    pass  # refused when the job runs (run_group): the manifest's other jobs go on
                except RestaError as exc:
                    problems.append(f"{job.label}: {exc}")
    except BaseException:
        batch.close()
        raise
    if problems:
        batch.close()
        raise problems_error(manifest.path, problems)
    return batch


# --- execution --------------------------------------------------------------------------


# What errors and ``--group`` call a batch of job specs built in memory (it has no file).
IN_MEMORY = Path("<jobs in memory>")


def as_manifest(jobs: Manifest | Sequence[JobSpec], *, group_size: int | None = None) -> Manifest:
    """A loaded Manifest as it is, or job specs built in memory grouped as a manifest's jobs are
    (``manifest.make_groups``: shared inputs, device and backend, ``group_size`` at a time).

    JobSpecs built in memory are taken as given (their paths absolute, their options the
    library's); ``load_manifest`` is what checks what a file says.

    Example:
        >>> as_manifest([]).groups
        []
    """
    if isinstance(jobs, Manifest):
        if group_size is not None:
            raise ValueError("group_size groups job specs; a Manifest keeps its own groups")
        return jobs
    jobs = list(jobs)
    if len({job.index for job in jobs}) != len(jobs):
        raise ValueError("job specs need distinct indices (a result is reported by its job's index)")
    size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    return Manifest(path=IN_MEMORY, jobs=jobs, groups=make_groups(jobs, size), group_size=size)


def run_batch(
    manifest: Manifest | Sequence[JobSpec],
    groups: list[int] | None = None,
    *,
    group_size: int | None = None,
    prepared: PreparedBatch | None = None,
    reporter: Reporter | None = None,
    fsync: bool | None = None,
    threads: int | None = None,
    validate: dict | None = None,
    command_line: str | None = None,
    record_paths: bool = False,
    **engine_options,
) -> list[JobResult]:
    """Run the selected groups here, one after another.

    Args:
        manifest: a loaded ``Manifest``, or ``JobSpec``s built in memory (``as_manifest``).
        groups: the group indices to run (None: all).
        group_size: for job specs, how many share one engine pass (default: a manifest's default).
        prepared: from ``check_manifest``: its groups run without being opened
            again (and are closed once run); others are prepared when they run.
        validate: ``eval.make_validator`` options; each new output is evaluated
            before its rename, and a job whose output fails the gate is reported
            failed (its output kept, marked VALIDATION_FAILED).
        command_line: the batch command as typed, for each output's model card.
        record_paths: record the inputs' local paths in each ``resta_fast.json`` (``api.execute``).
        engine_options: ``pipeline.engine.run_jobs`` tuning (writers, chunk_elems, cores ...).
    Returns:
        One JobResult per job, in manifest order.

    Example:
        >>> results = run_batch(load_manifest("batch.yaml"))  # doctest: +SKIP
        >>> [r.status for r in results]  # doctest: +SKIP
        >>> run_batch([JobSpec(0, "math", Path("/ft/math"), Path("/out/math"), vector=Path("/v"))])  # doctest: +SKIP
    """
    manifest = as_manifest(manifest, group_size=group_size)
    results = []
    for group in manifest.select(groups):
        ready = prepared.groups.pop(group.index, None) if prepared is not None else None
        results += run_group(
            manifest,
            group.index,
            prepared=ready,
            reporter=reporter,
            fsync=fsync,
            threads=threads,
            validate=validate,
            command_line=command_line,
            record_paths=record_paths,
            **engine_options,
        )
    return sorted(results, key=lambda r: r.index)


def _failed(job: JobSpec, group: int, exc: BaseException, seconds: float = 0.0) -> JobResult:
    msg = str(exc) if isinstance(exc, RestaError) else f"{type(exc).__name__}: {exc}"
    return JobResult(
        job.index,
        job.name,
        group,
        str(job.out),
        "failed",
        error=msg,
        seconds=seconds,
        transient=isinstance(exc, OSError),
    )


def run_group(
    manifest: Manifest,
    gid: int,
    *,
    prepared: PreparedGroup | None = None,
    reporter: Reporter | None = None,
    fsync: bool | None = None,
    threads: int | None = None,
    validate: dict | None = None,
    command_line: str | None = None,
    record_paths: bool = False,
    **engine_options,
) -> list[JobResult]:
    """Run one group: verify and skip finished jobs, then write the rest in one
    engine pass. ``prepared`` (this group from ``check_manifest``) is used and
    closed; without it the group is prepared here. Never raises for a job's failure."""
    from resta_fast.pipeline.interrupt import tensor_boundary_signals

    group = manifest.groups[gid]
    reporter = reporter or Reporter()
    fsync = manifest.fsync if fsync is None else fsync
    threads = threads or manifest.threads
    results: dict[int, JobResult] = {}

    def finish(result: JobResult) -> None:
        results[result.index] = result
        reporter.job_done(result)

    # Signals first: a Ctrl-C while a lock is being taken must not leave its file behind.
    with tensor_boundary_signals(), ExitStack() as stack:
        if prepared is None or not prepared.here:
            if prepared is not None:
                prepared.close()  # checked for another machine: no kernels loaded
            prepared = PreparedGroup(group)
        stack.enter_context(prepared)  # closed last: after the outputs' temp dirs and locks
        todo = []
        for job in group.jobs:
            try:
                prep = prepared.prepared(job)
                state, detail = existing_state(job.out, prep.provenance, verify=True)
            except Exception as exc:  # noqa: BLE001 - reported per job
                finish(_failed(job, gid, exc))
                continue
            if state == "finished":
                finish(JobResult(job.index, job.name, gid, str(job.out), "skipped", note=detail))
            else:
                todo.append((job, prep, state, detail))
        if todo:
            _run_pass(todo, gid, reporter, finish, fsync, threads, engine_options, validate, command_line, record_paths)
    return [results[job.index] for job in group.jobs]


def _validation_result(job: JobSpec, gid: int, report: dict, status: str, **kw) -> JobResult:
    """The JobResult of a written job: failed when its validation gate failed."""
    verdict = report.get("validation")
    if verdict is not None and not verdict.get("passed", False):
        return JobResult(
            job.index,
            job.name,
            gid,
            str(job.out),
            "failed",
            error=f"validation failed (output kept, marked VALIDATION_FAILED): {verdict.get('reason', '')}",
            **kw,
        )
    return JobResult(job.index, job.name, gid, str(job.out), status, **kw)


def _gate(options: dict, job: JobSpec):
    """The job's validation gate (``eval.make_validator``), built when its output is ready to be judged."""

    def gate(model_dir: Path) -> dict:
        from resta_fast.eval.runner import make_validator

        return make_validator(options, job.finetuned)(model_dir)

    return gate


def _run_pass(
    todo,
    gid: int,
    reporter: Reporter,
    finish,
    fsync: bool,
    threads,
    engine_options: dict,
    validate: dict | None = None,
    command_line: str | None = None,
    record_paths: bool = False,
) -> None:
    """Hand every job's output to the one executor: claimed, written in one engine pass, each finished."""

    def output(job: JobSpec, prep, state: str) -> Output:
        return Output(
            job.out,
            prep.writing(),
            prep.recorded_provenance(record_paths),
            prep.input_paths,
            command="batch",
            overwrite=state == "corrupt",
            extra=lambda n: {"batch": {"job": job.name, "index": job.index, "group": gid, "jobs_in_pass": n}},
            validate=_gate(validate, job) if validate else None,
            command_line=command_line,
            progress=lambda nbytes, name: reporter.job_progress(job, nbytes),
        )

    outputs = [output(job, prep, state) for job, prep, state, _ in todo]
    by_output = {id(o): entry for o, entry in zip(outputs, todo, strict=True)}

    def done(written: Written) -> None:
        job, _, state, detail = by_output[id(written.output)]
        if written.error is not None:
            finish(_failed(job, gid, written.error, written.seconds))
            return
        finish(
            _validation_result(
                job,
                gid,
                written.report,
                "redone" if state == "corrupt" else "done",
                note=f"previous output: {detail}" if detail else "",
                seconds=round(written.seconds, 3),
                bytes_written=written.report["stats"]["bytes_written"],
            )
        )

    executor.run(outputs, fsync=fsync, on_done=done, threads=threads, **engine_options)


def summarize(results: list[JobResult]) -> dict:
    """The batch summary (``--json``): counts by status and every job's result."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    return {"ok": all(r.ok for r in results), "counts": counts, "jobs": [r.to_json() for r in results]}


def format_table(results: list[JobResult]) -> str:
    """A fixed-width table of the results, failures with their reason."""
    width = max([len(r.name) for r in results] + [4])
    row = "{:>4}  {:" + str(width) + "}  {:>5}  {:8}  {:>8}  {:>9}  {}"
    lines = [row.format("job", "name", "group", "status", "seconds", "written", "out / error")]
    for r in results:
        size = human_bytes(r.bytes_written) if r.bytes_written else "-"
        secs = f"{r.seconds:.2f}" if r.seconds else "-"
        tail = r.error if r.error else (r.out + (f"  ({r.note})" if r.note else ""))
        lines.append(row.format(r.index, r.name, r.group, r.status, secs, size, tail))
    counts = summarize(results)["counts"]
    lines.append(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f" of {len(results)} job(s)")
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"
