"""The one executor: claim → write → finish → validate → commit, for one output or a pass of many.

Every command that writes an output goes through ``run`` (``write_one`` for a single output):
patch and vector (``api.execute``), batch jobs (several outputs in one engine pass), Safe LoRA
and SafeMERGE (an adapter, or a merged model), a fine-tune's merge, and convert. Each output is

1. claimed: its location checked, its lock taken (``io.lock``), dead runs' leftovers cleared,
   a temporary sibling directory made (``io.writer.AtomicOutputDir``);
2. written: by the streaming engine from a plan (``EngineWrite``: every such output of the
   pass in one ``pipeline.engine.run_jobs`` call, the shared inputs read once), or by the
   adapter writer with some tensors swapped in (``AdapterWrite``: ``io.adapter_writer``);
3. finished: index, side files, the model card and ``resta_fast.json``
   (``report.finish_output`` / ``report.finish_adapter_output``; ``created`` is stamped there);
4. validated, when asked: the gate's verdict recorded (``report.record_validation``);
5. committed: renamed into place after a last look for Ctrl-C.

A failure in any step leaves no output behind (the temporary directory is removed and the lock
released) and, in a pass of several outputs, leaves the others alone: ``run`` records it in
that output's ``Written.error``; ``write_one`` raises it. Ctrl-C and SIGTERM stop at a tensor
boundary (``pipeline.interrupt``) and leave no output.

Example:
    >>> run([], fsync=False)
    []
    >>> write_one(Output(Path("out"), prepared.writing(), prepared.provenance, prepared.input_paths))  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from resta_fast.io.adapter_writer import write_adapter
from resta_fast.io.lock import OutputLock, clean_stale_temps
from resta_fast.io.writer import AtomicOutputDir, _write_error, check_output_location
from resta_fast.lora import LoraAdapter
from resta_fast.pipeline.engine import run_jobs
from resta_fast.pipeline.interrupt import raise_if_interrupted, tensor_boundary_signals
from resta_fast.pipeline.job import Inputs, Job
from resta_fast.plan import Plan
from resta_fast.report import (
    finish_adapter_output,
    finish_output,
    output_bytes,
    output_metadata,
    record_validation,
)

Validator = Callable[[Path], dict]
Progress = Callable[[int, str], None]


@dataclass
class EngineWrite:
    """Tensors the streaming engine writes from ``plan``: a patch, a vector, a batch job, a merged
    model, a conversion. ``kernel`` is a backend module for ``device`` (a copy plan never calls it);
    ``dare`` and ``seed`` are the DARE settings (None: no DARE)."""

    plan: Plan
    inputs: Inputs
    kernel: ModuleType
    backend_name: str
    device: str = "cpu"
    dare: float | None = None
    seed: int = 0


@dataclass
class AdapterWrite:
    """A PEFT adapter written from the adapter directory ``adapter`` with the tensors of ``replace``
    (``{key: tensor in its stored dtype}``) swapped in; ``config``: a new ``adapter_config.json``
    (None: the input's). Unchanged tensors are copied byte for byte (``io.adapter_writer``)."""

    adapter: Path
    replace: dict = field(default_factory=dict)
    config: dict | None = None


@dataclass
class Output:
    """One output directory to write, and how.

    Attributes:
        out: the output directory (refused when it exists, unless ``overwrite``).
        write: an ``EngineWrite`` or an ``AdapterWrite``.
        provenance: ``report.provenance`` (``report.with_paths`` applied when paths are recorded).
        input_paths: the inputs' paths; the output must lie outside every one.
        command: the command named in the output's lock file (who holds it).
        extra: report sections beside the provenance, or ``callable(n) -> sections`` given how
            many outputs of the pass were claimed (a batch records ``jobs_in_pass``).
        validate: ``callable(model_dir) -> verdict`` run before the commit (``eval.make_validator``).
        command_line: the command as typed, for the model card's "how to reproduce".
        progress: ``callable(nbytes, tensor name)`` after each tensor the engine writes.
        bar: a progress bar's title, drawn while the engine writes (None: no bar).
    """

    out: Path
    write: EngineWrite | AdapterWrite
    provenance: dict
    input_paths: list[Path]
    command: str = "patch"
    overwrite: bool = False
    extra: dict | Callable[[int], dict] | None = None
    validate: Validator | None = None
    command_line: str | None = None
    progress: Progress | None = None
    bar: str | None = None


@dataclass
class Written:
    """What became of one ``Output``: its report (committed), or the error that stopped it (nothing
    kept). ``seconds``: from the start of the pass to the start of its finishing."""

    output: Output
    report: dict | None = None
    error: Exception | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def progress_bar(total: int, enabled: bool, desc: str):
    """(a tqdm bar over ``total`` bytes, ``update(nbytes, name)`` advancing it); ``enabled=False``
    draws nothing. A context manager: the bar is cleared when it closes."""
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        disable=not enabled,
        dynamic_ncols=True,
        leave=False,
    )
    count = [0]

    def update(nbytes: int, name: str) -> None:
        count[0] += 1
        bar.update(nbytes)
        bar.set_postfix_str(f"{count[0]} tensors", refresh=False)

    return bar, update


@contextmanager
def clean_write_errors(out: Path):
    """Turn an OSError (a full disk while copying side files or writing the report) into one clean
    RestaError naming the file."""
    try:
        yield
    except OSError as exc:
        # filename2 is the destination when shutil.copyfile fails.
        raise _write_error(Path(exc.filename2 or exc.filename or out), exc) from None


def claim(stack: ExitStack, output: Output, *, fsync: bool) -> AtomicOutputDir:
    """Own ``output.out`` until ``stack`` closes: check where it goes, lock it, check again under
    the lock, clear dead runs' leftovers; returns its temporary directory (removed on close
    unless committed)."""
    out = output.out
    check_output_location(out, output.input_paths, output.overwrite)  # before the lock: no lock file left
    stack.enter_context(OutputLock(out, command=output.command))
    check_output_location(out, output.input_paths, output.overwrite)  # again: the lock makes it authoritative
    clean_stale_temps(out)
    return stack.enter_context(AtomicOutputDir(out, overwrite=output.overwrite, fsync=fsync))


def _hook(output: Output, bar_update: Progress | None) -> Progress:
    """The engine's per-tensor callback: the output's progress, its bar, then Ctrl-C at this tensor boundary."""

    def progress(nbytes: int, name: str) -> None:
        if output.progress is not None:
            output.progress(nbytes, name)
        if bar_update is not None:
            bar_update(nbytes, name)
        raise_if_interrupted()

    return progress


@dataclass
class _Claimed:
    """An output of the pass whose directory is ours: its temp dir, the stack releasing it, its engine Job."""

    written: Written
    outdir: AtomicOutputDir
    stack: ExitStack
    job: Job | None = None


def _engine_pass(claimed: list[_Claimed], engine: dict) -> None:
    """Write every claimed engine output in one ``run_jobs`` call; an error that stops the pass fails them all."""
    todo = [c for c in claimed if isinstance(c.written.output.write, EngineWrite)]
    if not todo:
        return
    first = todo[0].written.output.write
    if any(
        c.written.output.write.kernel is not first.kernel or c.written.output.write.device != first.device for c in todo
    ):
        raise ValueError("the engine outputs of one pass share one kernel and one device")
    with ExitStack() as bars:
        for c in todo:
            output, w = c.written.output, c.written.output.write
            update = None
            if output.bar is not None:
                bar, update = progress_bar(output_bytes(w.plan), True, output.bar)
                bars.enter_context(bar)
            meta = output_metadata(output.provenance)
            c.job = Job(w.plan, w.inputs, c.outdir.tmp, w.dare, w.seed, meta, progress=_hook(output, update))
        try:
            run_jobs([c.job for c in todo], kernel=first.kernel, device=first.device, **engine)
        except Exception as exc:  # noqa: BLE001 - e.g. no memory for the buffers: every output fails
            for c in todo:
                c.job.error = c.job.error or exc


def _finish(c: _Claimed, n_claimed: int, fsync: bool) -> dict:
    """Write an adapter output's files, then finish, validate and commit either kind; returns the report."""
    output, outdir = c.written.output, c.outdir
    if c.job is not None and c.job.error is not None:
        raise c.job.error
    extra = output.extra(n_claimed) if callable(output.extra) else output.extra
    with clean_write_errors(output.out):
        w = output.write
        if isinstance(w, AdapterWrite):
            with ExitStack() as stack:
                adapter = LoraAdapter(w.adapter)
                stack.callback(adapter.close)
                meta = output_metadata(output.provenance)
                files = write_adapter(outdir.tmp, adapter, w.replace, meta, config=w.config, fsync=fsync)
            report = finish_adapter_output(
                outdir.tmp, files, output.provenance, fsync=fsync, extra=extra, command_line=output.command_line
            )
        else:
            report = finish_output(
                outdir.tmp,
                w.plan,
                w.inputs.finetuned,
                c.job.stats,
                output.provenance,
                backend_name=w.backend_name,
                device=w.device,
                fsync=fsync,
                extra=extra,
                command_line=output.command_line,
            )
        if output.validate is not None:
            record_validation(outdir.tmp, report, output.validate(outdir.tmp), command_line=output.command_line)
        raise_if_interrupted()  # Ctrl-C after the last tensor: still no output
        outdir.commit()
    report["out"] = str(output.out)
    return report


def run(
    outputs: Sequence[Output],
    *,
    fsync: bool = True,
    on_done: Callable[[Written], None] | None = None,
    **engine,
) -> list[Written]:
    """Claim, write, finish, validate and commit ``outputs`` in one pass; never raises for one output's failure.

    Args:
        outputs: the outputs; those the engine writes share one kernel and device, and are
            written by one ``run_jobs`` call (the inputs they share read once).
        fsync: make each output durable before its rename.
        on_done: called with each output's ``Written`` as soon as it is committed or has failed.
        engine: ``pipeline.engine.run_jobs`` tuning (threads, chunk_elems, writers, cache, staging ...).
    Returns:
        One ``Written`` per output, in order. KeyboardInterrupt (a stop request) propagates,
        and no output it caught before its commit is kept.

    Example:
        >>> [w.ok for w in run([Output(Path("out"), prepared.writing(), prov, paths)])]  # doctest: +SKIP
        [True]
    """
    written = [Written(o) for o in outputs]
    done = on_done or (lambda w: None)
    start = time.perf_counter()
    # Signals first: a Ctrl-C while a lock is being taken must not leave its file behind.
    with tensor_boundary_signals(), ExitStack() as stack:
        claimed: list[_Claimed] = []
        for w in written:
            own = stack.enter_context(ExitStack())  # this output's lock and temp dir, released once it is done
            try:
                claimed.append(_Claimed(w, claim(own, w.output, fsync=fsync), own))
            except Exception as exc:  # noqa: BLE001 - recorded for this output
                own.close()
                w.error = exc
                done(w)
        _engine_pass(claimed, engine)
        for c in claimed:
            c.written.seconds = time.perf_counter() - start
            try:
                c.written.report = _finish(c, len(claimed), fsync)
            except Exception as exc:  # noqa: BLE001 - recorded for this output
                c.written.error = exc
            c.stack.close()
            done(c.written)
    return written


def write_one(output: Output, *, fsync: bool = True, **engine) -> dict:
    """``run`` for one output: its report, or the error that stopped it raised (an OSError as a
    RestaError naming the file). ``engine``: as ``run``'s.

    Example:
        >>> report = write_one(Output(Path("out"), prepared.writing(), prov, paths), fsync=False)  # doctest: +SKIP
        >>> report["files"]  # doctest: +SKIP
    """
    [written] = run([output], fsync=fsync, **engine)
    if written.error is not None:
        with clean_write_errors(output.out):
            raise written.error
    return written.report
