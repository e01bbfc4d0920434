"""The local batch executor: fused multi-output passes, resumable, job by job.

Each group of jobs (see ``manifest``) runs as one fused pass on the CPU
(``pipeline.cpu.run_fused``): the shared aligned/unaligned chunk is read once
and every job's output for it is produced before moving on. GPU groups run job
by job through ``api.patch``.

Every job's output is its own atomic directory (temp dir + rename) holding
``resta_fast.json`` with the sha256 of every file, so the batch's state is the
outputs themselves: a rerun verifies finished outputs and skips them, redoes
missing, interrupted or corrupted ones, and never rewrites a finished output.
One job failing is reported and leaves the others alone.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from resta_fast.batch.manifest import Group, JobSpec, Manifest
from resta_fast.errors import RestaError

REPORT_NAME = "resta_fast.json"


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


@dataclass
class PreparedJob:
    """A job opened and planned exactly as ``api.patch`` would."""

    job: JobSpec
    plan: object
    inputs: object
    provenance: dict
    input_paths: list[Path]
    backend_name: str
    kernel: object
    device: str

    @property
    def out_bytes(self) -> int:
        from resta_fast.plan import dtype_itemsize
        return sum(t.numel * dtype_itemsize(t.out_dtype) for t in self.plan.tensors())


class _Opener:
    """Checkpoints by path, opened once per group: shared inputs (and a
    fine-tune used by several jobs) are then one object, read once."""

    def __init__(self, stack: ExitStack):
        self.stack = stack
        self.cache: dict[str, object] = {}

    def __call__(self, path, role: str):
        if path is None:
            return None
        key = str(path)
        if key not in self.cache:
            from resta_fast.io.checkpoint import Checkpoint
            ck = Checkpoint(path, role=role)
            self.stack.callback(ck.close)
            self.cache[key] = ck
        return self.cache[key]


def _same(a, b) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def prepare_job(job: JobSpec, opener: _Opener, *, here: bool = True) -> PreparedJob:
    """Open the job's inputs and build its plan and provenance.

    Mirrors ``api.patch`` step for step (defaults, which checkpoint serves as
    DARE base, roles), so the header metadata and hence the files are
    byte-identical to running ``patch`` on the job; tests/test_batch.py checks it.
    ``here=False`` (validating for another machine) skips the device and
    backend checks and leaves ``kernel`` None.
    """
    from resta_fast.api import _check_params, _provenance, patch_params, resolve_device
    from resta_fast.kernels import choose_backend
    from resta_fast.pipeline.cpu import Inputs
    from resta_fast.plan import BetaRule, build_plan, parse_dtype
    _check_params(job.beta, job.dare, job.seed)
    rules = [BetaRule.parse(r) for r in job.beta_rules]
    out_dtype = parse_dtype(job.dtype)
    device = resolve_device(job.device) if here else job.device
    s = {k: None if getattr(job, k) is None else str(getattr(job, k))
         for k in ("finetuned", "aligned", "unaligned", "vector", "dare_base", "base")}
    aligned, base, dare_base = s["aligned"], s["base"], s["dare_base"]
    if s["vector"] is not None and s["unaligned"] is not None:
        raise RestaError("give either aligned and unaligned, or vector (not both)")
    lora = _is_adapter(s["finetuned"])
    if base is not None and not lora:
        raise RestaError(f"base is only for LoRA adapters, and {s['finetuned']} has no "
                         "adapter_config.json; drop base for a full fine-tune")
    if lora and base is None:
        if aligned is None:
            raise RestaError(f"{s['finetuned']} is a LoRA adapter: set base, the model it was trained on")
        base = aligned
    if job.dare is not None and dare_base is None:
        if aligned is None and base is None:
            raise RestaError("dare needs the model the fine-tune started from: set dare_base (or aligned)")
        dare_base = base if lora else aligned
    al = opener(aligned, "aligned")
    lora_base = None
    if lora:
        from resta_fast.lora import LoraFinetuned
        lora_base = al if _same(base, aligned) else opener(base, "base")
        ft = LoraFinetuned(s["finetuned"], lora_base)
        opener.stack.callback(ft.close)
    else:
        ft = opener(s["finetuned"], "finetuned")
    un = opener(s["unaligned"], "unaligned")
    vec = opener(s["vector"], "vector")
    dbase = al if (dare_base is not None and aligned is not None and _same(dare_base, aligned)) \
        else lora_base if lora and _same(dare_base, base) \
        else opener(dare_base, "dare base")
    plan = build_plan(ft, aligned=al if vec is None else None, unaligned=un, vector=vec,
                      dare_base=dbase if job.dare is not None else None, beta=job.beta,
                      include=job.include, exclude=job.exclude, beta_rules=rules, dtype=out_dtype)
    if lora:
        plan.notes.insert(0, ft.summary())
    backend_name, kernel = choose_backend(job.backend, device) if here else (job.backend, None)
    if here and device.startswith("cuda") and backend_name != "triton":
        raise RestaError(f"device {device} runs the triton backend; backend {backend_name} is CPU-only")
    params = patch_params(job.beta, job.dare, job.seed, job.include, job.exclude, rules, out_dtype)
    roles = {"finetuned": ft, "aligned": al, "unaligned": un, "vector": vec,
             "dare_base": dbase if job.dare is not None else None, "base": lora_base}
    inputs = Inputs(ft, al, un, vec, dbase if job.dare is not None else None)
    input_paths = [Path(p) for p in (s["finetuned"], aligned, s["unaligned"], s["vector"], dare_base)
                   if p is not None] + ([Path(base)] if lora else [])
    return PreparedJob(job, plan, inputs, _provenance("patch", params, roles), input_paths,
                       backend_name, kernel, device)


def _is_adapter(path: str) -> bool:
    try:
        from resta_fast.lora import is_adapter
    except ImportError:  # a build without LoRA support
        return False
    return is_adapter(path)


# --- state of an existing output ---------------------------------------------------------

def provenance_diff(report: dict, expected: dict) -> str:
    """How an existing output's provenance differs from this job's ('' if it is this job).

    Compares the command, the parameters and the inputs' fingerprints (size,
    mtime, header hash per file), not their paths: a moved manifest still
    recognises its finished outputs.
    """
    diffs = []
    if report.get("command") != expected["command"]:
        diffs.append(f"written by `{report.get('command')}`")
    old, new = report.get("params") or {}, expected["params"]
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            diffs.append(f"{key} {old.get(key)!r} on disk vs {new.get(key)!r} now")
    old_in, new_in = report.get("inputs") or {}, expected["inputs"]
    for role in sorted(set(old_in) | set(new_in)):
        if role not in old_in or role not in new_in:
            diffs.append(f"{role} {'added' if role in new_in else 'dropped'}")
        elif (old_in[role] or {}).get("files") != new_in[role]["files"]:
            diffs.append(f"{role} {new_in[role]['path']} changed since (size, mtime or header differ)")
    return "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")


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
        raise RestaError(f"out {out} exists but has no {REPORT_NAME}, so it is not a resta_fast output; "
                         "refusing to replace it: move it away or choose another out")
    try:
        report = json.loads(report_path.read_text())
        files = report["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        return "corrupt", f"{REPORT_NAME} is unreadable"
    diff = provenance_diff(report, provenance)
    if diff:
        raise RestaError(f"out {out} holds a different job's finished output ({diff}); a batch never "
                         "replaces a finished output: delete it or choose another out")
    if not verify:
        return "finished", ""
    problem = verify_files(out, files)
    return ("corrupt", problem) if problem else ("finished", f"{len(files)} file(s) verified")


def verify_files(out: Path, files: dict) -> str:
    """'' if every file has its recorded sha256, else the first problem."""
    from resta_fast.pipeline.stream import sha256_file  # lazily: it brings in torch
    for name, digest in sorted(files.items()):
        if not isinstance(name, str) or "/" in name or name in ("", ".", "..") or not isinstance(digest, str):
            return f"{REPORT_NAME} lists an invalid entry {name!r}"
        path = out / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} does not match its recorded sha256"
    return ""


# --- validation -------------------------------------------------------------------------

def check_jobs(manifest: Manifest, groups: list[Group], problems: list[str], *, here: bool = True) -> None:
    """Deep check for ``load_manifest``: open and plan every job of ``groups``
    (as patch would) and check existing outputs belong to their job."""
    for group in groups:
        with ExitStack() as stack:
            opener = _Opener(stack)
            for job in group.jobs:
                try:
                    prep = prepare_job(job, opener, here=here)
                    manifest.out_bytes[job.index] = prep.out_bytes
                    existing_state(job.out, prep.provenance, verify=False)
                except RestaError as exc:
                    problems.append(f"{job.label}: {exc}")


# --- execution --------------------------------------------------------------------------

def run_batch(manifest: Manifest, groups: list[int] | None = None, *, reporter: Reporter | None = None,
              fsync: bool | None = None, threads: int | None = None, validate: dict | None = None,
              **fused_options) -> list[JobResult]:
    """Run the selected groups here, one after another.

    ``validate``: ``api.patch(validate=...)`` options; each new output is
    evaluated before its rename, and a job whose output fails the gate is
    reported failed (its output kept, marked VALIDATION_FAILED).

    Returns:
        One JobResult per job, in manifest order.

    Example:
        >>> results = run_batch(load_manifest("batch.yaml"))  # doctest: +SKIP
        >>> [r.status for r in results]
    """
    results = []
    for group in manifest.select(groups):
        results += run_group(manifest, group.index, reporter=reporter, fsync=fsync, threads=threads,
                             validate=validate, **fused_options)
    return sorted(results, key=lambda r: r.index)


def _failed(job: JobSpec, group: int, exc: BaseException, seconds: float = 0.0) -> JobResult:
    msg = str(exc) if isinstance(exc, RestaError) else f"{type(exc).__name__}: {exc}"
    return JobResult(job.index, job.name, group, str(job.out), "failed", error=msg, seconds=seconds,
                     transient=isinstance(exc, OSError))


def run_group(manifest: Manifest, gid: int, *, reporter: Reporter | None = None, fsync: bool | None = None,
              threads: int | None = None, validate: dict | None = None, **fused_options) -> list[JobResult]:
    """Run one group: verify and skip finished jobs, then write the rest in one
    fused pass (CPU) or one by one (GPU). Never raises for a job's failure."""
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
        opener = _Opener(stack)
        todo = []
        for job in group.jobs:
            try:
                prep = prepare_job(job, opener)
                state, detail = existing_state(job.out, prep.provenance, verify=True)
            except Exception as exc:  # noqa: BLE001 - reported per job
                finish(_failed(job, gid, exc))
                continue
            if state == "finished":
                finish(JobResult(job.index, job.name, gid, str(job.out), "skipped", note=detail))
            else:
                todo.append((prep, state, detail))
        if todo and not todo[0][0].device.startswith("cuda"):
            _run_fused_group(todo, gid, stack, reporter, finish, fsync, threads, fused_options, validate)
        elif todo:
            # GPU groups run job by job, but the shared inputs stay on the device between jobs.
            from resta_fast.pipeline.gpu import DeviceCache
            cache = DeviceCache(todo[0][0].device)
            for prep, state, detail in todo:
                _run_one(prep, state, detail, gid, reporter, finish, fsync, threads, validate, cache)
    return [results[job.index] for job in group.jobs]


def _validation_result(job: JobSpec, gid: int, report: dict, status: str, **kw) -> JobResult:
    """The JobResult of a written job: failed when its validation gate failed."""
    verdict = report.get("validation")
    if verdict is not None and not verdict.get("passed", False):
        return JobResult(job.index, job.name, gid, str(job.out), "failed",
                         error=f"validation failed (output kept, marked VALIDATION_FAILED): "
                               f"{verdict.get('reason', '')}", **kw)
    return JobResult(job.index, job.name, gid, str(job.out), status, **kw)


def _run_one(prep: PreparedJob, state: str, detail: str, gid: int, reporter, finish, fsync, threads,
             validate=None, device_cache=None) -> None:
    """A job through ``api.patch`` (GPU groups: the GPU pipeline is per job)."""
    from resta_fast import api
    job = prep.job
    start = time.perf_counter()
    try:
        report = api.patch(job.finetuned, job.out, **job.patch_kwargs(), threads=threads,
                           overwrite=state == "corrupt", fsync=fsync, validate=validate,
                           device_cache=device_cache)
    except Exception as exc:  # noqa: BLE001 - reported per job
        finish(_failed(job, gid, exc, time.perf_counter() - start))
        return
    reporter.job_progress(job, report["stats"]["bytes_written"])
    finish(_validation_result(job, gid, report, "redone" if state == "corrupt" else "done",
                              note=f"previous output: {detail}" if detail else "",
                              seconds=time.perf_counter() - start,
                              bytes_written=report["stats"]["bytes_written"]))


def _run_fused_group(todo, gid: int, stack: ExitStack, reporter: Reporter, finish, fsync: bool,
                     threads, fused_options, validate=None) -> None:
    from resta_fast.api import finish_output, output_metadata, record_validation, validator
    from resta_fast.io.lock import OutputLock, clean_stale_temps
    from resta_fast.io.writer import AtomicOutputDir, check_output_location
    from resta_fast.pipeline.cpu import FusedJob, run_fused
    from resta_fast.pipeline.interrupt import raise_if_interrupted
    start = time.perf_counter()
    live = []
    for prep, state, detail in todo:
        job = prep.job
        try:
            redo = state == "corrupt"
            stack.enter_context(OutputLock(job.out, command="batch"))
            check_output_location(job.out, prep.input_paths, overwrite=redo)
            clean_stale_temps(job.out)
            outdir = stack.enter_context(AtomicOutputDir(job.out, overwrite=redo, fsync=fsync))
        except Exception as exc:  # noqa: BLE001 - reported per job
            finish(_failed(job, gid, exc))
            continue

        def progress(nbytes, name, job=job):
            reporter.job_progress(job, nbytes)
            raise_if_interrupted()  # Ctrl-C: stop at a tensor boundary, temp outputs removed

        fused = FusedJob(prep.plan, prep.inputs, outdir.tmp, prep.job.dare, prep.job.seed,
                         output_metadata(prep.provenance), progress=progress)
        live.append((prep, state, detail, outdir, fused))
    if not live:
        return
    try:
        run_fused([f for *_, f in live], kernel=live[0][0].kernel, threads=threads, **fused_options)
    except Exception as exc:  # noqa: BLE001 - e.g. no memory for the buffers: every job fails
        for *_, fused in live:
            fused.error = fused.error or exc
    for prep, state, detail, outdir, fused in live:
        job = prep.job
        seconds = time.perf_counter() - start
        if fused.error is not None:
            finish(_failed(job, gid, fused.error, seconds))
            continue
        try:
            report = finish_output(outdir.tmp, prep.plan, prep.inputs.finetuned, fused.stats, prep.provenance,
                                   backend_name=prep.backend_name, device=prep.device, fsync=fsync,
                                   extra={"batch": {"job": job.name, "index": job.index, "group": gid,
                                                    "jobs_in_pass": len(live)}})
            if validate:
                gate = validator(validate, None if _is_adapter(str(job.finetuned)) else job.finetuned)
                record_validation(outdir.tmp, report, gate(outdir.tmp))
            raise_if_interrupted()
            outdir.commit()
        except Exception as exc:  # noqa: BLE001 - reported per job
            finish(_failed(job, gid, exc, seconds))
            continue
        finish(_validation_result(job, gid, report, "redone" if state == "corrupt" else "done",
                                  note=f"previous output: {detail}" if detail else "", seconds=round(seconds, 3),
                                  bytes_written=report["stats"]["bytes_written"]))


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
